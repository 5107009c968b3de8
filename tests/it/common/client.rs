//! The test side of a call, shared by every module: HTTP clients for the instance's listeners,
//! a request body several modules send, and what a test reads back from a response.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::{json, Value};

use super::server::Tollgate;

/// A client for the instance's own listeners: never through a proxy from the environment, and a
/// request that hangs fails after 20 s instead of hanging the suite.
pub fn http() -> reqwest::Client {
    http_builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// [`http`] without the timeout, for tests whose calls may legitimately wait (held streams,
/// bursts queued behind a cap).
pub fn http_untimed() -> reqwest::Client {
    http_builder().build().unwrap()
}

/// The builder behind [`http`] (no proxy, nothing else set), for a client with other settings.
pub fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().no_proxy()
}

/// A blocking Anthropic Messages call (the fixture answers it at 14_205_000 nano-USD).
pub fn messages_request() -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Fix the flaky test."}]
    })
}

/// The interception id the gateway puts on every intercepted response.
pub fn interception_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-tollgate-interception-id")
        .expect("intercepted responses carry their id")
        .to_str()
        .unwrap()
        .to_string()
}

/// The id of user `name`, as text, on either backend.
pub async fn user_id(tg: &Tollgate, name: &str) -> String {
    tg.scalar(
        "SELECT CAST(id AS TEXT) FROM users WHERE username = ?",
        &[name],
    )
    .await
}
