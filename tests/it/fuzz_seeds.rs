//! Every fuzz target's body (`check` in fuzz/fuzz_targets/<target>.rs, included here as a module)
//! run over the target's seed corpus, as an ordinary test: the no-crash properties are held on
//! every `cargo test`, without cargo-fuzz or its instrumented build. The seeds are the ones
//! fuzz/seeds.py writes for the fuzzer (built from tests/fixtures, the shipped configs and a few
//! hand-made inputs), plus every input committed under fuzz/regressions/<target>/ (inputs that
//! once crashed a target; see fuzz/regressions/README.md).

// Each target that cuts its input includes fuzz_targets/split.rs itself, as its fuzz build needs.
#![allow(clippy::duplicate_mod)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

#[path = "../../fuzz/fuzz_targets/client_hello.rs"]
mod client_hello;
#[path = "../../fuzz/fuzz_targets/config.rs"]
mod config;
#[path = "../../fuzz/fuzz_targets/provider_request.rs"]
mod provider_request;
#[path = "../../fuzz/fuzz_targets/provider_response.rs"]
mod provider_response;
#[path = "../../fuzz/fuzz_targets/proxy_head.rs"]
mod proxy_head;
#[path = "../../fuzz/fuzz_targets/query_filter.rs"]
mod query_filter;
#[path = "../../fuzz/fuzz_targets/sse.rs"]
mod sse;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The seed corpus, written once per test process by fuzz/seeds.py into a temporary directory.
fn corpus() -> &'static Path {
    static CORPUS: OnceLock<tempfile::TempDir> = OnceLock::new();
    CORPUS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let out = Command::new("python3")
                .arg(fuzz_dir().join("seeds.py"))
                .arg(dir.path())
                .output()
                .expect("run python3 fuzz/seeds.py (the seed corpus needs python3)");
            assert!(out.status.success(), "fuzz/seeds.py failed: {out:?}");
            dir
        })
        .path()
}

/// The files of `dir`, sorted (none when it does not exist).
fn inputs_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("read dir entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs `check` over every seed and committed regression input of `target`; fails naming each
/// input that panicked (the panic itself is printed above).
fn replay(target: &str, check: fn(&[u8])) {
    let seeds = inputs_in(&corpus().join(target));
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds.py wrote no seed for {target}"
    );
    let regressions = inputs_in(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for path in seeds.iter().chain(&regressions) {
        let input = std::fs::read(path).expect("read input");
        if std::panic::catch_unwind(|| check(&input)).is_err() {
            failed.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs panicked: {failed:?}",
        failed.len(),
        seeds.len() + regressions.len()
    );
}

#[test]
fn client_hello_seeds() {
    replay("client_hello", client_hello::check);
}

#[test]
fn config_seeds() {
    replay("config", config::check);
}

#[test]
fn provider_request_seeds() {
    replay("provider_request", provider_request::check);
}

#[test]
fn provider_response_seeds() {
    replay("provider_response", provider_response::check);
}

#[test]
fn proxy_head_seeds() {
    replay("proxy_head", proxy_head::check);
}

#[test]
fn query_filter_seeds() {
    replay("query_filter", query_filter::check);
}

#[test]
fn sse_seeds() {
    replay("sse", sse::check);
}

/// Every target of fuzz/Cargo.toml is replayed above (a new target must be added here too).
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let mut targets: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|name| *name != "tollgate-fuzz")
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "client_hello",
            "config",
            "provider_request",
            "provider_response",
            "proxy_head",
            "query_filter",
            "sse"
        ]
    );
}
