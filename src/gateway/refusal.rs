//! Refusals: the one type that becomes a provider-shaped error response.
//!
//! Every way Tollgate itself says no (bad key, budget, rate limit, key policy, bad body, unknown
//! route, unreachable upstream) is a [`Refusal`]; the gateway renders it in exactly one place,
//! in the error format the client's SDK understands ([`Gateway::refuse`]). Messages never
//! contain secrets; every refusal the gateway's phases make that is not a one-line condition of
//! its phase is built here (governance denials, cooling keys, open breakers, throttled
//! authentication).

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::governance::budget::LimitScope;
use crate::governance::Denial;
use crate::providers::ErrorFormat;
use crate::telemetry::metric;
use crate::upstream::keypool;

use super::Gateway;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    Unauthenticated,
    BudgetExceeded,
    RateLimited,
    KeyPolicy,
    Unpriced,
    BodyTooLarge,
    BadRequest,
    NotFound,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// The database cannot be reached for a decision that needs it (a key not seen before, or
    /// a capped request with `budgets.when_database_down = "refuse"`): 503.
    StoreUnavailable,
    /// The provider's circuit breaker for this model is open.
    CircuitOpen,
    /// Every central key of the provider was rejected by the upstream (disabled until reload).
    NoUsableKey,
    /// The client stalled while sending its request body.
    ClientTimeout,
}

impl RefusalKind {
    fn status(self) -> u16 {
        match self {
            RefusalKind::Unauthenticated => 401,
            RefusalKind::BudgetExceeded => 402,
            RefusalKind::RateLimited => 429,
            RefusalKind::KeyPolicy => 403,
            RefusalKind::Unpriced => 403,
            RefusalKind::BodyTooLarge => 413,
            RefusalKind::BadRequest => 400,
            RefusalKind::NotFound => 404,
            RefusalKind::UpstreamUnreachable => 502,
            RefusalKind::UpstreamTimeout => 504,
            RefusalKind::StoreUnavailable => 503,
            RefusalKind::CircuitOpen | RefusalKind::NoUsableKey => 503,
            RefusalKind::ClientTimeout => 408,
        }
    }

    /// (OpenAI `type`, OpenAI `code`, Anthropic `type`) per the contract's refusal table
    /// (`docs/contract.md#refusal-table`).
    fn wire_names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            RefusalKind::Unauthenticated => (
                "invalid_request_error",
                "invalid_api_key",
                "authentication_error",
            ),
            RefusalKind::BudgetExceeded => {
                ("insufficient_quota", "budget_exceeded", "billing_error")
            }
            RefusalKind::RateLimited => (
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                "rate_limit_error",
            ),
            RefusalKind::KeyPolicy => (
                "permission_error",
                "user_api_key_required",
                "permission_error",
            ),
            RefusalKind::Unpriced => ("permission_error", "model_not_priced", "permission_error"),
            RefusalKind::BodyTooLarge => (
                "invalid_request_error",
                "request_too_large",
                "invalid_request_error",
            ),
            RefusalKind::BadRequest => (
                "invalid_request_error",
                "invalid_request",
                "invalid_request_error",
            ),
            RefusalKind::NotFound => ("invalid_request_error", "unknown_url", "not_found_error"),
            RefusalKind::UpstreamUnreachable => {
                ("upstream_error", "upstream_unreachable", "api_error")
            }
            RefusalKind::UpstreamTimeout => ("upstream_error", "upstream_timeout", "api_error"),
            RefusalKind::StoreUnavailable => ("api_error", "store_unavailable", "api_error"),
            // Anthropic's SDKs retry `overloaded_error` with backoff, which is what an open
            // breaker asks for.
            RefusalKind::CircuitOpen => ("upstream_error", "circuit_open", "overloaded_error"),
            RefusalKind::NoUsableKey => ("upstream_error", "no_usable_provider_key", "api_error"),
            RefusalKind::ClientTimeout => (
                "invalid_request_error",
                "request_timeout",
                "invalid_request_error",
            ),
        }
    }

    /// Label for `tollgate_refusals_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            RefusalKind::Unauthenticated => "unauthenticated",
            RefusalKind::BudgetExceeded => "budget_exceeded",
            RefusalKind::RateLimited => "rate_limited",
            RefusalKind::KeyPolicy => "key_policy",
            RefusalKind::Unpriced => "unpriced_model",
            RefusalKind::BodyTooLarge => "body_too_large",
            RefusalKind::BadRequest => "bad_request",
            RefusalKind::NotFound => "not_found",
            RefusalKind::UpstreamUnreachable => "upstream_unreachable",
            RefusalKind::UpstreamTimeout => "upstream_timeout",
            RefusalKind::StoreUnavailable => "store_unavailable",
            RefusalKind::CircuitOpen => "circuit_open",
            RefusalKind::NoUsableKey => "no_usable_provider_key",
            RefusalKind::ClientTimeout => "client_timeout",
        }
    }
}

/// A response Tollgate gives instead of (or in place of) the upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
    /// Extra response headers (`Retry-After`, `x-tollgate-budget-reset`, …).
    pub headers: Vec<(&'static str, String)>,
    /// OpenAI `code` override where the table allows a more specific one.
    pub code: Option<&'static str>,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
            headers: Vec::new(),
            code: None,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Refusal {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Refusal {
        self.code = Some(code);
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body in the client's provider format.
    pub fn body(&self, format: ErrorFormat) -> Vec<u8> {
        let (openai_type, openai_code, anthropic_type) = self.kind.wire_names();
        let value = match format {
            ErrorFormat::OpenAi => serde_json::json!({
                "error": {
                    "message": self.message,
                    "type": openai_type,
                    "param": null,
                    "code": self.code.unwrap_or(openai_code),
                }
            }),
            ErrorFormat::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": anthropic_type, "message": self.message }
            }),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

impl Gateway {
    /// 429 in the provider's format for an address that failed authentication too often: its
    /// key was not looked up.
    pub(super) fn throttled_refusal(throttled: crate::auth::failures::Throttled) -> Refusal {
        let secs = throttled.retry_after.as_secs().max(1);
        Refusal::new(
            RefusalKind::RateLimited,
            format!("too many failed authentications from this address; retry in {secs} s"),
        )
        .with_header("retry-after", secs.to_string())
        .with_code("too_many_failed_authentications")
    }

    /// Renders a refusal in the client's provider format (the one place this happens).
    pub(super) async fn refuse(
        &self,
        session: &mut Session,
        format: ErrorFormat,
        refusal: &Refusal,
    ) {
        metrics::counter!(metric::REFUSALS_TOTAL, "reason" => refusal.kind.reason()).increment(1);
        tracing::info!(
            status = refusal.status(),
            reason = refusal.kind.reason(),
            path = %session.req_header().uri.path(),
            detail = %refusal.message,
            "request refused"
        );
        let body = Bytes::from(refusal.body(format));
        let Ok(mut head) = ResponseHeader::build(refusal.status(), Some(4 + refusal.headers.len()))
        else {
            return;
        };
        let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
        for (name, value) in &refusal.headers {
            let _ = head.insert_header(*name, value.as_str());
        }
        if session
            .write_response_header(Box::new(head), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
}

/// Renders a governance denial as the contract's refusal (429, 402, 403; 503 when the budget
/// store is down and `budgets.when_database_down = "refuse"`: `docs/contract.md#refusal-table`). `unseen` is why the
/// request's cost had no bound, if it had none (a 402 then says why it had to run alone).
pub(super) fn denial_refusal(
    denial: Denial,
    unseen: Option<&crate::providers::UnseenInput>,
) -> Refusal {
    match denial {
        Denial::RateLimited { retry_after } => {
            let secs = retry_after.as_secs().max(1);
            Refusal::new(
                RefusalKind::RateLimited,
                format!("rate limit reached: too many requests per minute for this user; retry in {secs} s"),
            )
            .with_header("retry-after", secs.to_string())
        }
        Denial::TooManyInFlight { limit } => Refusal::new(
            RefusalKind::RateLimited,
            format!("too many concurrent requests: at most {limit} may be in flight per user"),
        )
        .with_header("retry-after", "1"),
        Denial::Budget { refusal, reset } => {
            let scope = match &refusal.scope {
                LimitScope::User => "your user limit".to_string(),
                LimitScope::Group(name) => format!("the limit of group {name}"),
                LimitScope::Default => "the default limit".to_string(),
            };
            let reset = reset.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let message = if refusal.spent >= refusal.cap {
                format!(
                    "spend cap reached: ${} of ${} spent this period ({scope}); the budget resets at {reset}",
                    refusal.spent, refusal.cap
                )
            } else if let Some(unseen) = unseen {
                format!(
                    "this request's cost has no bound the gateway can see (it uses {unseen}), so under a spend cap it runs only while nothing else of yours is in flight; ${} spent and ${} reserved by your in-flight requests, of ${} ({scope}); retry when they finish",
                    refusal.spent, refusal.reserved, refusal.cap
                )
            } else {
                format!(
                    "spend cap reached: ${} spent and ${} reserved by your in-flight requests, of ${} ({scope}); the budget resets at {reset}",
                    refusal.spent, refusal.reserved, refusal.cap
                )
            };
            Refusal::new(RefusalKind::BudgetExceeded, message)
                .with_header("x-tollgate-budget-reset", reset)
                .with_header("x-tollgate-budget-scope", refusal.scope.as_str())
                .with_header("x-tollgate-budget-limit", refusal.cap.to_string())
                .with_header("x-tollgate-budget-spent", refusal.spent.to_string())
        }
        Denial::Unpriced { model } => Refusal::new(
            RefusalKind::Unpriced,
            format!("model {model} has no price, and this gateway refuses unpriced models (budgets.unpriced = \"deny\")"),
        ),
        Denial::BudgetUnavailable => Refusal::new(
            RefusalKind::StoreUnavailable,
            "the budget store cannot be reached, and this gateway refuses capped requests until it is back (budgets.when_database_down = \"refuse\")",
        )
        .with_header("retry-after", "5"),
    }
}

pub(super) fn keys_cooling_refusal(provider: &str, retry_after: Duration) -> Refusal {
    let secs = keypool::retry_after_secs(retry_after);
    Refusal::new(
        RefusalKind::RateLimited,
        format!("every central key of provider {provider} is rate limited by the upstream; retry in {secs} s"),
    )
    .with_header("retry-after", secs.to_string())
}

pub(super) fn circuit_open_refusal(provider: &str, model: &str, wait: Duration) -> Refusal {
    let secs = keypool::retry_after_secs(wait);
    Refusal::new(
        RefusalKind::CircuitOpen,
        format!("provider {provider} is failing for model {model}: the gateway stopped sending requests for now (circuit breaker open); retry in {secs} s"),
    )
    .with_header("retry-after", secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_shapes() {
        let r = Refusal::new(RefusalKind::Unauthenticated, "missing key");
        let v: serde_json::Value = serde_json::from_slice(&r.body(ErrorFormat::OpenAi)).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["message"], "missing key");
        let v: serde_json::Value = serde_json::from_slice(&r.body(ErrorFormat::Anthropic)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        let table = [
            (
                RefusalKind::BudgetExceeded,
                402,
                "insufficient_quota",
                "budget_exceeded",
                "billing_error",
            ),
            (
                RefusalKind::RateLimited,
                429,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                "rate_limit_error",
            ),
            (
                RefusalKind::KeyPolicy,
                403,
                "permission_error",
                "user_api_key_required",
                "permission_error",
            ),
            (
                RefusalKind::UpstreamUnreachable,
                502,
                "upstream_error",
                "upstream_unreachable",
                "api_error",
            ),
        ];
        for (kind, status, t, c, a) in table {
            let r = Refusal::new(kind, "m");
            assert_eq!(r.status(), status);
            let v: serde_json::Value =
                serde_json::from_slice(&r.body(ErrorFormat::OpenAi)).unwrap();
            assert_eq!(
                (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
                (Some(t), Some(c))
            );
            let v: serde_json::Value =
                serde_json::from_slice(&r.body(ErrorFormat::Anthropic)).unwrap();
            assert_eq!(v["error"]["type"], a);
        }
    }
}
