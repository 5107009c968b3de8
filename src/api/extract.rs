//! Request parsing that turns every malformed input into an [`ApiError`] (400 or 422 with a
//! JSON body) instead of axum's plain-text rejections: query parameters, path segments, ids,
//! limits, timestamps and JSON bodies.
//!
//! Not here: the `q` filter language (`api::query`).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::Uri;
use chrono::{DateTime, NaiveDate, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;

/// Default and maximum page sizes of every list.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// A JSON request body. Not JSON at all → 400; JSON of the wrong shape → 422. The content type
/// is not checked: a body either parses or it does not.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text()))
        })?;
        // Syntax first, shape second: parsing straight into `T` would report whichever error
        // it meets first, and `[1,2` would pass for a shape problem.
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
        serde_json::from_value(value)
            .map(ApiJson)
            .map_err(|e| ApiError::Unprocessable(format!("request body: {e}")))
    }
}

/// Path segments, percent-decoded, as strings (handlers parse ids with [`parse_id`]).
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The query string as named parameters. Unknown or repeated parameters are refused, so a typo
/// (`limt=5`) is an error rather than silently ignored.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn from_uri(uri: &Uri, allowed: &[&str]) -> Result<Params, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri).map_err(|e| {
            ApiError::BadRequest(format!("malformed query string: {}", e.body_text()))
        })?;
        let mut seen: Vec<&str> = Vec::new();
        for (k, _) in &pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter `{k}`; this route takes: {}",
                    allowed.join(", ")
                )));
            }
            if seen.contains(&k.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "query parameter `{k}` is given more than once"
                )));
            }
            seen.push(k);
        }
        Ok(Params(pairs))
    }

    /// The value of `name`; an empty value counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// `limit`: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
    pub fn limit(&self) -> Result<u32, ApiError> {
        let Some(text) = self.get("limit") else {
            return Ok(DEFAULT_LIMIT);
        };
        match text.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "limit `{text}` must be a whole number from 1 to {MAX_LIMIT}"
            ))),
        }
    }
}

/// A UUID from a path or cursor; `what` names it in the error.
pub fn parse_id(what: &str, text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::BadRequest(format!("{what} `{text}` is not a valid id (a UUID)")))
}

/// An RFC 3339 timestamp; `term` names where it came from in the error.
pub fn parse_time(term: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{term}: `{text}` is not an RFC 3339 timestamp (e.g. 2025-01-31T00:00:00Z)"
            ))
        })
}

/// An RFC 3339 timestamp or a `YYYY-MM-DD` date. A date means that day's start, or with
/// `end_of_day` the next day's start (so `to=2025-01-31` includes the 31st).
pub fn parse_time_or_date(
    term: &str,
    text: &str,
    end_of_day: bool,
) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = if end_of_day {
            date.succ_opt()
        } else {
            Some(date)
        };
        if let Some(day) = day {
            return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
        }
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{term}: `{text}` is neither a date (2025-01-31) nor an RFC 3339 timestamp (2025-01-31T00:00:00Z)"
            ))
        })
}
