//! The `q` filter language of the interception and session lists: space-separated `key:value`
//! terms (`initiator`, `provider`, `model`, `client`, `session_id`, `started_after`,
//! `started_before`), a value in double quotes may contain spaces. Also where a member's view is
//! narrowed to their own records.
//!
//! Not here: running the filter (`store::Queries`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::parse_time;
use crate::store::{InterceptionFilter, Store};

/// The keys `q` understands.
pub const Q_KEYS: &[&str] = &[
    "initiator",
    "provider",
    "model",
    "client",
    "session_id",
    "started_after",
    "started_before",
];

/// `q` parsed, before `initiator` is resolved to a user.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedQ {
    /// `me`, a user id or a username.
    pub initiator: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub client: Option<String>,
    pub session_id: Option<String>,
    pub started_after: Option<DateTime<Utc>>,
    pub started_before: Option<DateTime<Utc>>,
}

/// Splits on whitespace outside double quotes; quotes are removed.
fn terms(q: &str) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in q.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if quoted {
        return Err(ApiError::BadRequest(
            "q: a double quote is not closed".to_string(),
        ));
    }
    if started {
        out.push(current);
    }
    Ok(out)
}

pub fn parse_q(q: &str) -> Result<ParsedQ, ApiError> {
    let mut parsed = ParsedQ::default();
    for term in terms(q)? {
        let Some((key, value)) = term.split_once(':') else {
            return Err(ApiError::BadRequest(format!(
                "q: term `{term}` is not key:value (keys: {})",
                Q_KEYS.join(", ")
            )));
        };
        if value.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "q: term `{term}` has no value"
            )));
        }
        let duplicate = match key {
            "initiator" => parsed.initiator.replace(value.to_string()).is_some(),
            "provider" => parsed.provider.replace(value.to_string()).is_some(),
            "model" => parsed.model.replace(value.to_string()).is_some(),
            "client" => parsed.client.replace(value.to_string()).is_some(),
            "session_id" => parsed.session_id.replace(value.to_string()).is_some(),
            "started_after" => parsed
                .started_after
                .replace(parse_time(&format!("q: term `{term}`"), value)?)
                .is_some(),
            "started_before" => parsed
                .started_before
                .replace(parse_time(&format!("q: term `{term}`"), value)?)
                .is_some(),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "q: unknown key in term `{term}` (keys: {})",
                    Q_KEYS.join(", ")
                )))
            }
        };
        if duplicate {
            return Err(ApiError::BadRequest(format!(
                "q: key `{key}` is given more than once"
            )));
        }
    }
    Ok(parsed)
}

/// Resolves `initiator` to a user id, for `caller`. A member sees only their own records: no
/// initiator means themselves, anyone else is 403. An admin naming an unknown user gets an empty
/// result rather than an error (a filter that matches nothing).
pub async fn resolve_initiator(
    caller: &Caller,
    initiator: Option<&str>,
    store: &Store,
) -> Result<Option<Uuid>, ApiError> {
    let me = caller.0.user_id;
    let resolved = match initiator {
        None => None,
        Some("me") => Some(me),
        Some(reference) => Some(
            store
                .queries()
                .find_user_ref(reference)
                .await?
                .map(|u| u.id)
                // The nil id belongs to no one: the filter matches nothing.
                .unwrap_or_else(Uuid::nil),
        ),
    };
    if caller.is_admin() {
        return Ok(resolved);
    }
    match resolved {
        None => Ok(Some(me)),
        Some(id) if id == me => Ok(Some(me)),
        Some(_) => Err(ApiError::Forbidden(
            "members can only see their own records (initiator:me)".into(),
        )),
    }
}

/// `q` as a store filter for `caller`.
pub async fn filter_for(
    caller: &Caller,
    q: Option<&str>,
    store: &Store,
) -> Result<InterceptionFilter, ApiError> {
    let parsed = parse_q(q.unwrap_or(""))?;
    if let (Some(a), Some(b)) = (parsed.started_after, parsed.started_before) {
        if a >= b {
            return Err(ApiError::BadRequest(
                "q: started_after must be earlier than started_before".into(),
            ));
        }
    }
    Ok(InterceptionFilter {
        user_id: resolve_initiator(caller, parsed.initiator.as_deref(), store).await?,
        provider: parsed.provider,
        model: parsed.model,
        client: parsed.client,
        session_key: parsed.session_id,
        started_after: parsed.started_after,
        started_before: parsed.started_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_quotes() {
        let q = parse_q(
            r#"initiator:me provider:openai model:gpt-4o client:"Claude Code" session_id:s1 started_after:2025-01-01T00:00:00Z started_before:2025-02-01T00:00:00+01:00"#,
        )
        .unwrap();
        assert_eq!(q.initiator.as_deref(), Some("me"));
        assert_eq!(q.provider.as_deref(), Some("openai"));
        assert_eq!(q.model.as_deref(), Some("gpt-4o"));
        assert_eq!(q.client.as_deref(), Some("Claude Code"));
        assert_eq!(q.session_id.as_deref(), Some("s1"));
        assert_eq!(
            q.started_before.unwrap().to_rfc3339(),
            "2025-01-31T23:00:00+00:00"
        );
        assert_eq!(parse_q("   ").unwrap(), ParsedQ::default());
    }

    #[test]
    fn bad_terms_name_the_term() {
        for (q, needle) in [
            ("color:red", "color:red"),
            ("started_after:yesterday", "started_after:yesterday"),
            ("model", "`model`"),
            ("model:", "model:"),
            ("model:a model:b", "more than once"),
            ("client:\"open", "not closed"),
        ] {
            let e = parse_q(q).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{q}");
            assert!(e.to_string().contains(needle), "{q}: {e}");
        }
    }
}
