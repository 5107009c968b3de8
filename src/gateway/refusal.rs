//! Refusals: the one type that becomes a provider-shaped error response.
//!
//! Every way Tollgate itself says no (bad key, budget, rate limit, key policy, bad body, unknown
//! route, unreachable upstream) is a [`Refusal`]; the gateway renders it in exactly one place,
//! in the error format the client's SDK understands. Messages never contain secrets.

use crate::providers::ErrorFormat;

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

    /// (OpenAI `type`, OpenAI `code`, Anthropic `type`) per the contract's refusal table.
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
