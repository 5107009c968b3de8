//! The command line as an operator uses it: check-config, users, keys, exit codes.

use crate::common;

use std::process::Command;

use common::server::BIN;

fn run(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_DATABASE__URL")
        .output()
        .unwrap()
}

#[test]
fn check_config_reports_every_problem_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\ngateway_listen = \"nowhere\"\n[limits]\nrequests_per_minute = -5\n[budgets]\nperiod = \"fortnight\"\n[keys]\ncentral_api_key_enabled = false\nallow_user_api_key = false\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["check-config", "--config", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "server.gateway_listen",
        "limits.requests_per_minute",
        "budgets.period",
        "keys:",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
    // The same config is a usage error (2) for any other command.
    let out = run(dir.path(), &["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/tollgate.example.toml"
        ))
        .unwrap(),
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["check-config", "--config", good.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Environment overrides are validated too.
    let out = Command::new(BIN)
        .args(["check-config", "--config", good.to_str().unwrap()])
        .env("TOLLGATE_LIMITS__MAX_CONCURRENT", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_concurrent"));
    // Unknown flags are usage errors.
    assert_eq!(
        run(dir.path(), &["serve", "--bogus"]).status.code(),
        Some(2)
    );
}

#[test]
fn users_and_keys_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"sqlite://{}/t.db\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let out = run(
        dir.path(),
        &[
            "users", "create", "ada", "--admin", "--group", "eng", "--config", c,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("created user ada"));
    // A second user of the same name is refused (runtime failure, exit 1).
    assert_eq!(
        run(dir.path(), &["users", "create", "ada", "--config", c])
            .status
            .code(),
        Some(1)
    );
    let out = run(
        dir.path(),
        &[
            "keys", "create", "--user", "ada", "--name", "laptop", "--config", c,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(out.stdout).unwrap();
    let key = key.trim();
    assert!(key.starts_with("tg_") && key.len() == 51, "{key}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stderr.split_whitespace().nth(2).unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{stderr}");
    assert_eq!(
        run(
            dir.path(),
            &["keys", "create", "--user", "nobody", "--config", c]
        )
        .status
        .code(),
        Some(1)
    );
    assert!(run(dir.path(), &["keys", "revoke", &id, "--config", c])
        .status
        .success());
    assert_eq!(
        run(dir.path(), &["keys", "revoke", &id, "--config", c])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        run(dir.path(), &["keys", "revoke", "not-a-uuid", "--config", c])
            .status
            .code(),
        Some(2)
    );
    // Only the hash of the key is stored.
    let db = std::fs::read(dir.path().join("t.db")).unwrap();
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()));
}

/// A start against a PostgreSQL server that is not there stops at once with a message that
/// names the server and never the password. Needs no PostgreSQL: nothing listens on port 1.
#[test]
fn an_unreachable_postgres_fails_fast_naming_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"postgres://tg:sekrit-pw@127.0.0.1:1/tollgate\"\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = run(dir.path(), &["serve", "--config", config.to_str().unwrap()]);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("cannot connect to PostgreSQL at 127.0.0.1:1/tollgate"),
        "{all}"
    );
    assert!(!all.contains("sekrit-pw"), "{all}");
}
