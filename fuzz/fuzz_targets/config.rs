//! The config loader, from TOML text and `TOLLGATE_*` environment overrides: anything either
//! loads or is refused with every problem named by its key path; it never panics (a panic at
//! start-up would hide which key was wrong), and the result does not depend on anything but
//! its input.
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use tollgate::config::Config;

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    // After a NUL byte come override lines `TOLLGATE_SECTION__KEY=value`, as the process
    // environment would carry them.
    let (toml, env) = text.split_once('\0').unwrap_or((&text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let first = Config::from_parts("fuzz", Some(toml), &env);
    if let Err(e) = &first {
        assert!(!e.problems.is_empty(), "a refusal without a problem");
        for p in &e.problems {
            assert!(!p.path.is_empty(), "a problem without a key path: {p}");
        }
    }
    let second = Config::from_parts("fuzz", Some(toml), &env);
    assert_eq!(
        format!(
            "{:?}",
            first.as_ref().map(|_| ()).map_err(|e| e.to_string())
        ),
        format!(
            "{:?}",
            second.as_ref().map(|_| ()).map_err(|e| e.to_string())
        ),
        "loading the same text twice gave different answers"
    );
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
