//! The `q` filter of the interception and session lists: any text is either refused as a bad
//! request or parsed, never a panic (it comes straight from a URL), and what parses means the
//! same when written back as `key:"value"` terms.
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use tollgate::api::error::ApiError;
use tollgate::api::query::{parse_q, ParsedQ};

fn rendered(q: &ParsedQ) -> Option<String> {
    let mut terms = Vec::new();
    for (key, value) in [
        ("initiator", &q.initiator),
        ("provider", &q.provider),
        ("model", &q.model),
        ("client", &q.client),
        ("session_id", &q.session_id),
    ] {
        if let Some(v) = value {
            terms.push(format!("{key}:\"{v}\""));
        }
    }
    for (key, time) in [
        ("started_after", q.started_after),
        ("started_before", q.started_before),
    ] {
        if let Some(t) = time {
            // RFC 3339 has four-digit years only; an offset can push a parsed time outside them.
            if !(0..=9999).contains(&chrono::Datelike::year(&t)) {
                return None;
            }
            terms.push(format!("{key}:{}", t.to_rfc3339()));
        }
    }
    Some(terms.join(" "))
}

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match parse_q(text) {
        Ok(parsed) => {
            let Some(again) = rendered(&parsed) else {
                return;
            };
            assert_eq!(
                parse_q(&again).ok().as_ref(),
                Some(&parsed),
                "{text:?} re-rendered as {again:?}"
            );
        }
        Err(ApiError::BadRequest(message)) => assert!(message.starts_with("q: ")),
        Err(other) => panic!("q parsing answered {other:?}, not a bad request"),
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
