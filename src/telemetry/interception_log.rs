//! The contract's interception log records (`docs/contract.md#interception-log-records`) (`message = "interception log"`, one `record_type`
//! per event) for one finished interception, queued as one block (see `super::defer`).
//!
//! With structured (JSON) logs the lines are written here by hand, in exactly the shape
//! tracing's JSON formatter gives every other line: same keys in the same order, same
//! escaping (serde_json's), numbers as numbers, absent `upstream_status` left out. A test
//! formats a record both ways and compares them. Why: the formatter's per-field visitors and
//! its string conversions were 8 % of Tollgate's CPU at 11k requests/s (issue 9). Text logs,
//! and a `TOLLGATE_LOG` filter that turns these records off, still go through tracing.
//!
//! Not here: any other log line (tracing), deciding what an interception holds (the gateway).

use std::io::Write;

use uuid::Uuid;

use super::{LineBatch, GATHERED};
use crate::store::InterceptionRecord;

const TARGET: &str = "tollgate::interception";
const MESSAGE: &str = "interception log";

/// Emits the records for one finished interception (written to stdout together with other
/// interceptions' within `super::LOG_LINGER`).
pub fn log_interception(r: &InterceptionRecord) {
    let _batch = LineBatch::start();
    if super::structured() && tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        let timestamp = timestamp(std::time::SystemTime::now());
        GATHERED.with_borrow_mut(|out| write_records(out, r, &timestamp));
    } else {
        log_through_tracing(r);
    }
}

/// tracing-subscriber's `SystemTime` format: UTC, microseconds, `Z`.
fn timestamp(now: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(now)
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// Appends the interception's JSON lines to `out`, each stamped `timestamp`.
fn write_records(out: &mut Vec<u8>, r: &InterceptionRecord, timestamp: &str) {
    let id =
        r.id.hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .to_owned();
    let started_at = r.started_at.to_rfc3339();
    let ended_at = r.ended_at.to_rfc3339();
    let msg_id = r.response_id.as_deref().unwrap_or("");

    Line::start(out, timestamp, "interception_start")
        .str("interception_id", &id)
        .id("initiator_id", Some(r.user_id))
        .id("api_key_id", r.api_key_id)
        .str("provider", &r.provider)
        .str("model", &r.model)
        .str("client", r.client)
        .str(
            "client_session_id",
            r.client_session_id.as_deref().unwrap_or(""),
        )
        .str("started_at", &started_at)
        .id("thread_parent_id", r.thread_parent_id)
        .id("thread_root_id", r.thread_root_id)
        .end();
    if let Some(prompt) = &r.prompt {
        Line::start(out, timestamp, "prompt_usage")
            .str("interception_id", &id)
            .str("msg_id", msg_id)
            .str("prompt", prompt)
            .str("created_at", &started_at)
            .end();
    }
    for t in &r.thoughts {
        Line::start(out, timestamp, "model_thought")
            .str("interception_id", &id)
            .str("content", &t.content)
            .str("created_at", &ended_at)
            .end();
    }
    for t in &r.tool_calls {
        Line::start(out, timestamp, "tool_usage")
            .str("interception_id", &id)
            .str("msg_id", msg_id)
            .str("tool_call_id", &t.id)
            .str("tool", &t.name)
            .str("input", &t.input)
            .bool("injected", false)
            .str("created_at", &ended_at)
            .end();
    }
    Line::start(out, timestamp, "token_usage")
        .str("interception_id", &id)
        .str("msg_id", msg_id)
        .num("input_tokens", r.usage.input)
        .num("output_tokens", r.usage.output)
        .num("cache_read_input_tokens", r.usage.cache_read)
        .num("cache_write_input_tokens", r.usage.cache_write)
        .num("reasoning_tokens", r.usage.reasoning)
        .str("usage_source", r.usage_source.as_str())
        .str("created_at", &ended_at)
        .end();
    let mut end = Line::start(out, timestamp, "interception_end");
    end.str("interception_id", &id)
        .str("ended_at", &ended_at)
        .str("status", r.status.as_str());
    // As tracing records an `Option`: nothing at all when absent.
    if let Some(status) = r.upstream_status {
        end.num("upstream_status", u64::from(status));
    }
    end.int("cost_nano_usd", r.cost.0).end();
}

/// One JSON log line being written: the fixed head, then fields, then the target.
struct Line<'a>(&'a mut Vec<u8>);

impl<'a> Line<'a> {
    fn start(out: &'a mut Vec<u8>, timestamp: &str, record_type: &str) -> Line<'a> {
        out.extend_from_slice(b"{\"timestamp\":\"");
        out.extend_from_slice(timestamp.as_bytes());
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"");
        out.extend_from_slice(MESSAGE.as_bytes());
        out.extend_from_slice(b"\",\"record_type\":\"");
        out.extend_from_slice(record_type.as_bytes());
        out.push(b'"');
        Line(out)
    }

    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        // Writing to a Vec cannot fail; serde_json escapes as tracing's formatter does.
        let _ = serde_json::to_writer(&mut *self.0, value);
        self
    }

    /// An id, or an empty string when there is none (every record of a type has its fields).
    fn id(&mut self, key: &str, id: Option<Uuid>) -> &mut Self {
        self.key(key);
        self.0.push(b'"');
        if let Some(id) = id {
            let mut buf = Uuid::encode_buffer();
            let text = id.hyphenated().encode_lower(&mut buf);
            self.0.extend_from_slice(text.as_bytes());
        }
        self.0.push(b'"');
        self
    }

    fn num(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }

    fn int(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }

    fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.0
            .extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    fn end(&mut self) {
        self.0.extend_from_slice(b",\"target\":\"");
        self.0.extend_from_slice(TARGET.as_bytes());
        self.0.extend_from_slice(b"\"}\n");
    }
}

/// The same records through tracing (text logs, or a filter that may drop them).
fn log_through_tracing(r: &InterceptionRecord) {
    let id = r.id.to_string();
    let started_at = r.started_at.to_rfc3339();
    let ended_at = r.ended_at.to_rfc3339();
    tracing::info!(
        target: "tollgate::interception",
        record_type = "interception_start",
        interception_id = %id,
        initiator_id = %r.user_id,
        api_key_id = %optional(r.api_key_id),
        provider = %r.provider,
        model = %r.model,
        client = r.client,
        client_session_id = r.client_session_id.as_deref().unwrap_or(""),
        started_at = %started_at,
        thread_parent_id = %optional(r.thread_parent_id),
        thread_root_id = %optional(r.thread_root_id),
        "{MESSAGE}"
    );
    let msg_id = r.response_id.as_deref().unwrap_or("");
    if let Some(prompt) = &r.prompt {
        tracing::info!(
            target: "tollgate::interception",
            record_type = "prompt_usage",
            interception_id = %id,
            msg_id,
            prompt = %prompt,
            created_at = %started_at,
            "{MESSAGE}"
        );
    }
    for t in &r.thoughts {
        tracing::info!(
            target: "tollgate::interception",
            record_type = "model_thought",
            interception_id = %id,
            content = %t.content,
            created_at = %ended_at,
            "{MESSAGE}"
        );
    }
    for t in &r.tool_calls {
        tracing::info!(
            target: "tollgate::interception",
            record_type = "tool_usage",
            interception_id = %id,
            msg_id,
            tool_call_id = %t.id,
            tool = %t.name,
            input = %t.input,
            injected = false,
            created_at = %ended_at,
            "{MESSAGE}"
        );
    }
    tracing::info!(
        target: "tollgate::interception",
        record_type = "token_usage",
        interception_id = %id,
        msg_id,
        input_tokens = r.usage.input,
        output_tokens = r.usage.output,
        cache_read_input_tokens = r.usage.cache_read,
        cache_write_input_tokens = r.usage.cache_write,
        reasoning_tokens = r.usage.reasoning,
        usage_source = r.usage_source.as_str(),
        created_at = %ended_at,
        "{MESSAGE}"
    );
    tracing::info!(
        target: "tollgate::interception",
        record_type = "interception_end",
        interception_id = %id,
        ended_at = %ended_at,
        status = r.status.as_str(),
        upstream_status = r.upstream_status,
        cost_nano_usd = r.cost.0,
        "{MESSAGE}"
    );
}

/// Absent ids are logged as empty strings so every record of a type has the same fields.
fn optional(id: Option<Uuid>) -> OptionalId {
    OptionalId(id)
}

/// An id, or nothing, formatted straight into the log line.
struct OptionalId(Option<Uuid>);

impl std::fmt::Display for OptionalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(id) => id.fmt(f),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::NanoUsd;
    use crate::providers::{Thought, ThoughtSource, TokenUsage, ToolCall};
    use crate::store::{CredentialKind, InterceptionStatus};
    use std::sync::{Arc, Mutex};

    /// A record that exercises every line and every kind of value, escapes included.
    fn record(upstream_status: Option<u16>, with_ids: bool) -> InterceptionRecord {
        let now = chrono::Utc::now();
        let id = with_ids.then(Uuid::now_v7);
        InterceptionRecord {
            id: Uuid::now_v7(),
            user_id: Uuid::new_v4(),
            api_key_id: id,
            provider: "open\"ai".into(),
            provider_kind: "openai",
            endpoint: "chat_completions",
            model: "gpt-4o".into(),
            response_model: Some("gpt-4o-2024-08-06".into()),
            client: "claude-code",
            client_session_id: with_ids.then(|| "s-\u{1}1".into()),
            session_key: "s-1".into(),
            thread_parent_id: id,
            thread_root_id: id,
            credential_kind: CredentialKind::Central,
            credential_hint: Some("sk-…1234".into()),
            status: InterceptionStatus::Completed,
            upstream_status,
            error: None,
            streaming: true,
            started_at: now,
            ended_at: now + chrono::Duration::milliseconds(1234),
            ttfb_ms: Some(12),
            response_id: with_ids.then(|| "chatcmpl-1".into()),
            usage: TokenUsage {
                input: 10,
                output: 20,
                cache_read: 3,
                cache_write: 4,
                reasoning: u64::MAX,
            },
            usage_source: Default::default(),
            prompt: Some("hello \u{1F600} \"quoted\"\n\ttab \\ </script> \u{7f}".into()),
            tool_calls: vec![
                ToolCall {
                    id: "call_1".into(),
                    name: "bash".into(),
                    input: "{\"cmd\":\"ls\"}".into(),
                },
                ToolCall {
                    id: "call_2".into(),
                    name: "read".into(),
                    input: String::new(),
                },
            ],
            thoughts: vec![Thought {
                content: "thinking\r\n…".into(),
                source: ThoughtSource::Thinking,
            }],
            cost: NanoUsd(-5),
            price: None,
            spend_period_start: now,
            shared_reservation: None,
        }
    }

    /// What tracing's JSON formatter, configured as `init_logging` configures it, writes.
    fn through_tracing(r: &InterceptionRecord) -> String {
        #[derive(Clone)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured(Arc::new(Mutex::new(Vec::new())));
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || log_through_tracing(r));
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn hand_written_lines_are_what_tracing_writes() {
        for (status, ids) in [(Some(200), true), (None, false)] {
            let r = record(status, ids);
            let expected = through_tracing(&r);
            let mut out = Vec::new();
            write_records(&mut out, &r, "2026-12-02T10:00:00.000000Z");
            let got = String::from_utf8(out).unwrap();
            let (expected, got): (Vec<&str>, Vec<&str>) =
                (expected.lines().collect(), got.lines().collect());
            assert_eq!(
                expected.len(),
                7,
                "start, prompt, thought, 2 tools, tokens, end"
            );
            assert_eq!(got.len(), expected.len());
            for (want, have) in expected.iter().zip(&got) {
                // Byte for byte once the timestamp (taken at a different moment) is aligned.
                let (_, want_rest) = want.split_once("\",\"level\"").unwrap();
                let (_, have_rest) = have.split_once("\",\"level\"").unwrap();
                assert_eq!(have_rest, want_rest);
                let stamp: serde_json::Value = serde_json::from_str(want).unwrap();
                let stamp = stamp["timestamp"].as_str().unwrap().to_string();
                assert_eq!(stamp.len(), "2026-12-02T10:00:00.000000Z".len(), "{stamp}");
            }
        }
    }

    #[test]
    fn the_timestamp_is_tracings_format() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_796_206_129_209_886);
        assert_eq!(timestamp(t), "2026-12-02T10:08:49.209886Z");
    }
}
