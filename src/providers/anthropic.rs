//! The Anthropic Messages wire format (`/v1/messages`), blocking and streamed.
//!
//! Usage follows the contract: `input_tokens` is already non-cached input, cache writes and reads
//! are reported separately, and a stream's output count is the final cumulative `output_tokens`
//! of `message_delta`. Tool inputs are recorded as compact JSON so that a streamed call and its
//! blocking twin are recorded identically.
//!
//! Not for: the Anthropic error body Tollgate writes itself (the gateway builds it from
//! [`ErrorFormat`](super::ErrorFormat)), or any Anthropic API other than Messages.

use std::collections::BTreeMap;

use http::Method;
use serde_json::Value;

use super::openai::{
    array_field, count_at, is_one_segment_under, str_field, string_field, text_content,
    BlockingJsonParser, NoResponseDetails, TextBudget,
};
use super::request_body::parse_request_object;
use super::{
    CredentialHeader, Endpoint, ParsedRequest, Provider, RequestError, ResponseParser,
    ResponseSummary, RouteMatch, Thought, ThoughtSource, TokenUsage, ToolCall,
};
use crate::sse::{SseEvent, SseParser};

/// What a `redacted_thinking` block is recorded as: its content is encrypted.
const REDACTED_THOUGHT: &str = "[redacted]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anthropic;

impl Provider for Anthropic {
    fn route(&self, method: &Method, path: &str) -> RouteMatch {
        if *method == Method::POST {
            match path {
                "/v1/messages" => RouteMatch::Intercept(Endpoint::Messages),
                "/v1/messages/count_tokens" => RouteMatch::Passthrough,
                _ => RouteMatch::NotFound,
            }
        } else if *method == Method::GET
            && (path == "/v1/models" || is_one_segment_under(path, "/v1/models/"))
        {
            RouteMatch::Passthrough
        } else {
            RouteMatch::NotFound
        }
    }

    fn parse_request(
        &self,
        _endpoint: Endpoint,
        body: &[u8],
    ) -> Result<ParsedRequest, RequestError> {
        parse_messages_request(body)
    }

    fn rewrite_request(
        &self,
        _endpoint: Endpoint,
        _body: &[u8],
        _parsed: &ParsedRequest,
    ) -> Option<Vec<u8>> {
        // Anthropic streams always report usage; nothing to ask for.
        None
    }

    fn response_parser(&self, endpoint: Endpoint, streaming: bool) -> Box<dyn ResponseParser> {
        match (endpoint, streaming) {
            (Endpoint::Messages, false) => Box::new(BlockingJsonParser::new(messages_summary)),
            (Endpoint::Messages, true) => Box::new(MessagesStreamParser::default()),
            (Endpoint::ChatCompletions | Endpoint::Responses, _) => Box::new(NoResponseDetails),
        }
    }

    fn credential_header(&self) -> CredentialHeader {
        CredentialHeader::XApiKey
    }
}

fn is_user(message: &Value) -> bool {
    str_field(message, "role") == Some("user")
}

fn parse_messages_request(body: &[u8]) -> Result<ParsedRequest, RequestError> {
    let (object, mut parsed) = parse_request_object(body)?;
    let request = Value::Object(object);
    parsed.max_output_tokens = request.get("max_tokens").and_then(Value::as_u64);
    parsed.metadata_user_id = request
        .pointer("/metadata/user_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let messages = array_field(&request, "messages");
    // The last user turn only: a turn of nothing but tool results has no prompt, and an earlier
    // prompt must not be recorded against this call.
    parsed.last_user_prompt = messages
        .iter()
        .rev()
        .find(|message| is_user(message))
        .and_then(|message| message.get("content"))
        .and_then(|content| text_content(content, &["text"]));
    if let Some(last) = messages.last().filter(|message| is_user(message)) {
        parsed.tool_result_ids = array_field(last, "content")
            .iter()
            .filter(|block| str_field(block, "type") == Some("tool_result"))
            .filter_map(|block| string_field(block, "tool_use_id"))
            .collect();
    }
    Ok(parsed)
}

fn messages_usage(usage: &Value) -> Option<TokenUsage> {
    if !usage.is_object() {
        return None;
    }
    Some(TokenUsage {
        input: count_at(usage, "/input_tokens"),
        output: count_at(usage, "/output_tokens"),
        cache_read: count_at(usage, "/cache_read_input_tokens"),
        cache_write: count_at(usage, "/cache_creation_input_tokens"),
        reasoning: 0,
    })
}

/// A content block, reduced to what Tollgate records.
enum ContentBlock {
    ToolUse {
        id: String,
        name: String,
        /// `input` of the block as compact JSON (in a stream: of `content_block_start`).
        input: String,
        /// Streams only: the concatenated `input_json_delta` pieces.
        partial_json: String,
    },
    Thinking(String),
    RedactedThinking,
}

impl ContentBlock {
    /// `None` for blocks with nothing to record (text, images, server tools).
    fn from_json(block: &Value) -> Option<ContentBlock> {
        match str_field(block, "type")? {
            "tool_use" => Some(ContentBlock::ToolUse {
                id: string_field(block, "id").unwrap_or_default(),
                name: string_field(block, "name").unwrap_or_default(),
                input: block.get("input").map(Value::to_string).unwrap_or_default(),
                partial_json: String::new(),
            }),
            "thinking" => Some(ContentBlock::Thinking(
                string_field(block, "thinking").unwrap_or_default(),
            )),
            "redacted_thinking" => Some(ContentBlock::RedactedThinking),
            _ => None,
        }
    }

    fn text_len(&self) -> usize {
        match self {
            ContentBlock::ToolUse {
                id,
                name,
                input,
                partial_json,
            } => id.len() + name.len() + input.len() + partial_json.len(),
            ContentBlock::Thinking(text) => text.len(),
            ContentBlock::RedactedThinking => 0,
        }
    }
}

/// The input JSON a streamed tool call ends with: the deltas re-serialised compactly, so it equals
/// the blocking form; the raw text if it does not parse (a cut stream); the start block's input if
/// no delta came.
fn final_tool_input(input: String, partial_json: String) -> String {
    if partial_json.is_empty() {
        return input;
    }
    match serde_json::from_str::<Value>(&partial_json) {
        Ok(value) => value.to_string(),
        Err(_) => partial_json,
    }
}

/// Tool calls and thoughts of `blocks` in block order. An empty thinking block is not a thought.
fn summarise_blocks(
    blocks: impl IntoIterator<Item = ContentBlock>,
) -> (Vec<ToolCall>, Vec<Thought>) {
    let mut tool_calls = Vec::new();
    let mut thoughts = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::ToolUse {
                id,
                name,
                input,
                partial_json,
            } => {
                tool_calls.push(ToolCall {
                    id,
                    name,
                    input: final_tool_input(input, partial_json),
                });
            }
            ContentBlock::Thinking(content) if !content.is_empty() => {
                thoughts.push(Thought {
                    content,
                    source: ThoughtSource::Thinking,
                });
            }
            ContentBlock::Thinking(_) => {}
            ContentBlock::RedactedThinking => {
                thoughts.push(Thought {
                    content: REDACTED_THOUGHT.to_owned(),
                    source: ThoughtSource::Thinking,
                });
            }
        }
    }
    (tool_calls, thoughts)
}

fn messages_summary(response: &Value) -> ResponseSummary {
    let blocks = array_field(response, "content")
        .iter()
        .filter_map(ContentBlock::from_json);
    let (tool_calls, thoughts) = summarise_blocks(blocks);
    ResponseSummary {
        response_id: string_field(response, "id"),
        model: string_field(response, "model"),
        usage: response.get("usage").and_then(messages_usage),
        tool_calls,
        thoughts,
        ..ResponseSummary::default()
    }
}

#[derive(Default)]
struct MessagesStreamParser {
    sse: SseParser,
    state: MessagesStreamState,
}

#[derive(Default)]
struct MessagesStreamState {
    response_id: Option<String>,
    model: Option<String>,
    usage: Option<TokenUsage>,
    /// `message_delta` brought the final output count.
    usage_final: bool,
    /// By content block `index`.
    blocks: BTreeMap<u64, ContentBlock>,
    budget: TextBudget,
    output_bytes: u64,
    ended: bool,
}

impl MessagesStreamState {
    fn on_event(&mut self, event: SseEvent<'_>) {
        let Ok(payload) = serde_json::from_slice::<Value>(event.data) else {
            return;
        };
        match str_field(&payload, "type")
            .or(event.event)
            .unwrap_or_default()
        {
            "message_start" => {
                if let Some(message) = payload.get("message") {
                    self.response_id = string_field(message, "id");
                    self.model = string_field(message, "model");
                    // Its `output_tokens` is provisional; message_delta brings the real count.
                    self.usage = message.get("usage").and_then(messages_usage);
                }
            }
            "content_block_start" => {
                let index = payload.get("index").and_then(Value::as_u64);
                let block = payload
                    .get("content_block")
                    .and_then(ContentBlock::from_json);
                if let (Some(index), Some(block)) = (index, block) {
                    if self.budget.try_spend_slot(block.text_len()) {
                        self.blocks.insert(index, block);
                    }
                }
            }
            "content_block_delta" => {
                self.count_output(&payload);
                self.apply_block_delta(&payload);
            }
            "message_stop" => self.ended = true,
            "message_delta" => {
                if let Some(delta_usage) = payload.get("usage").filter(|usage| usage.is_object()) {
                    self.apply_usage_delta(delta_usage);
                }
            }
            // `error` (overloaded mid-stream), `ping`, `content_block_stop`.
            _ => {}
        }
    }

    /// Generated text of any block (text, tool input, thinking, citations), counted whether or
    /// not the block is one Tollgate records.
    fn count_output(&mut self, payload: &Value) {
        if let Some(delta) = payload.get("delta") {
            self.output_bytes += ["text", "partial_json", "thinking"]
                .iter()
                .filter_map(|key| str_field(delta, key))
                .map(|text| text.len() as u64)
                .sum::<u64>();
        }
    }

    fn apply_block_delta(&mut self, payload: &Value) {
        let Some(block) = payload
            .get("index")
            .and_then(Value::as_u64)
            .and_then(|i| self.blocks.get_mut(&i))
        else {
            return;
        };
        let Some(delta) = payload.get("delta") else {
            return;
        };
        match (block, str_field(delta, "type")) {
            (ContentBlock::Thinking(text), Some("thinking_delta")) => {
                self.budget
                    .append(text, str_field(delta, "thinking").unwrap_or_default());
            }
            (ContentBlock::ToolUse { partial_json, .. }, Some("input_json_delta")) => {
                self.budget.append(
                    partial_json,
                    str_field(delta, "partial_json").unwrap_or_default(),
                );
            }
            _ => {}
        }
    }

    /// `output_tokens` is cumulative (replace, never add). Newer API versions also repeat the
    /// input and cache counts here; a non-zero value there is the more recent word.
    fn apply_usage_delta(&mut self, delta: &Value) {
        self.usage_final = true;
        let usage = self.usage.get_or_insert_with(TokenUsage::default);
        if let Some(output) = delta.get("output_tokens").and_then(Value::as_u64) {
            usage.output = output;
        }
        let overrides = [
            ("input_tokens", &mut usage.input),
            ("cache_creation_input_tokens", &mut usage.cache_write),
            ("cache_read_input_tokens", &mut usage.cache_read),
        ];
        for (key, count) in overrides {
            if let Some(value) = delta.get(key).and_then(Value::as_u64).filter(|&v| v != 0) {
                *count = value;
            }
        }
    }
}

impl ResponseParser for MessagesStreamParser {
    fn feed(&mut self, chunk: &[u8]) {
        let state = &mut self.state;
        self.sse.feed(chunk, |event| state.on_event(event));
    }

    fn ended(&self) -> bool {
        self.state.ended
    }

    fn finish(&mut self) -> ResponseSummary {
        self.sse.finish(|_| {});
        let state = std::mem::take(&mut self.state);
        let (tool_calls, thoughts) = summarise_blocks(state.blocks.into_values());
        ResponseSummary {
            response_id: state.response_id,
            model: state.model,
            usage: state.usage.filter(|_| state.usage_final),
            partial_usage: state.usage.filter(|_| !state.usage_final),
            tool_calls,
            thoughts,
            output_bytes: state.output_bytes,
            ended: state.ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::tests::{
        assert_matches_manifest, assert_rechunking_invariant, content, cut_before,
        summarise_chunks, with_comments, with_crlf,
    };
    use proptest::prelude::*;

    const MESSAGES: &[u8] = include_bytes!("../../tests/fixtures/anthropic-messages.json");
    const MESSAGES_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/anthropic-messages-stream.sse");
    const OVERLOADED: &[u8] =
        include_bytes!("../../tests/fixtures/anthropic-error-overloaded.json");

    fn summarise(streaming: bool, body: &[u8]) -> ResponseSummary {
        summarise_chunks(&Anthropic, Endpoint::Messages, streaming, [body])
    }

    #[test]
    fn routes() {
        let cases = [
            (
                Method::POST,
                "/v1/messages",
                RouteMatch::Intercept(Endpoint::Messages),
            ),
            (
                Method::POST,
                "/v1/messages/count_tokens",
                RouteMatch::Passthrough,
            ),
            (Method::GET, "/v1/models", RouteMatch::Passthrough),
            (
                Method::GET,
                "/v1/models/claude-sonnet-4-5",
                RouteMatch::Passthrough,
            ),
            (Method::GET, "/v1/messages", RouteMatch::NotFound),
            (Method::GET, "/v1/models/a/b", RouteMatch::NotFound),
            (Method::POST, "/v1/messages/batches", RouteMatch::NotFound),
            (Method::POST, "/v1/chat/completions", RouteMatch::NotFound),
            (Method::POST, "/v1/complete", RouteMatch::NotFound),
        ];
        for (method, path, expected) in cases {
            assert_eq!(Anthropic.route(&method, path), expected, "{method} {path}");
        }
        assert_eq!(Anthropic.credential_header(), CredentialHeader::XApiKey);
    }

    #[test]
    fn request_fields() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":32000,"stream":true,
            "metadata":{"user_id":"user_abc_account_1_session_2"},
            "messages":[
                {"role":"user","content":"fix the flaky test"},
                {"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"read","input":{}},
                                               {"type":"tool_use","id":"toolu_2","name":"read","input":{}}]},
                {"role":"user","content":[
                    {"type":"tool_result","tool_use_id":"toolu_1","content":"..."},
                    {"type":"tool_result","tool_use_id":"toolu_2","content":[{"type":"text","text":"inner"}]},
                    {"type":"text","text":"also check"},{"type":"text","text":"the retry loop"}]}
            ]}"#;
        let parsed = Anthropic.parse_request(Endpoint::Messages, body).unwrap();
        assert_eq!(
            parsed,
            ParsedRequest {
                model: "claude-sonnet-4-5".into(),
                stream: true,
                max_output_tokens: Some(32000),
                last_user_prompt: Some("also check\nthe retry loop".into()),
                tool_result_ids: vec!["toolu_1".into(), "toolu_2".into()],
                metadata_user_id: Some("user_abc_account_1_session_2".into()),
                client_requested_usage: false,
                ..ParsedRequest::default()
            }
        );
        assert_eq!(
            Anthropic.rewrite_request(Endpoint::Messages, body, &parsed),
            None
        );
    }

    #[test]
    fn a_last_user_turn_of_only_tool_results_has_no_prompt() {
        let body = br#"{"model":"m","messages":[
            {"role":"user","content":"earlier prompt"},
            {"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"x","input":{}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"ok"}]}]}"#;
        let parsed = Anthropic.parse_request(Endpoint::Messages, body).unwrap();
        assert_eq!(parsed.last_user_prompt, None);
        assert_eq!(parsed.tool_result_ids, vec!["toolu_1".to_owned()]);
        assert!(!parsed.stream);
        assert_eq!(parsed.metadata_user_id, None);
    }

    #[test]
    fn tool_results_only_count_when_the_last_message_is_the_users() {
        let body = br#"{"model":"m","messages":[
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1"},{"type":"text","text":"hi"}]},
            {"role":"assistant","content":"prefill"}]}"#;
        let parsed = Anthropic.parse_request(Endpoint::Messages, body).unwrap();
        assert!(parsed.tool_result_ids.is_empty());
        assert_eq!(parsed.last_user_prompt.as_deref(), Some("hi"));
    }

    #[test]
    fn request_errors() {
        assert!(matches!(
            Anthropic.parse_request(Endpoint::Messages, b"nope"),
            Err(RequestError::NotJson(_))
        ));
        assert_eq!(
            Anthropic.parse_request(Endpoint::Messages, b"\"s\""),
            Err(RequestError::NotObject)
        );
        assert_eq!(
            Anthropic.parse_request(Endpoint::Messages, br#"{"messages":[]}"#),
            Err(RequestError::MissingModel)
        );
        let odd = br#"{"model":"m","messages":{"role":"user"},"metadata":"x","max_tokens":"9"}"#;
        let parsed = Anthropic.parse_request(Endpoint::Messages, odd).unwrap();
        assert_eq!(
            (parsed.max_output_tokens, parsed.metadata_user_id),
            (None, None)
        );
    }

    #[test]
    fn fixtures_match_manifest_and_stream_equals_blocking_twin() {
        let blocking = summarise(false, MESSAGES);
        assert_matches_manifest(&blocking, "anthropic-messages.json");
        let stream = summarise(true, MESSAGES_STREAM);
        assert_matches_manifest(&stream, "anthropic-messages-stream.sse");
        assert_eq!(content(stream.clone()), content(blocking));
        assert!(stream.ended);
        assert_eq!(
            stream.output_bytes, 136,
            "thinking, text and tool input deltas"
        );
        assert_eq!(
            stream.tool_calls[0].input,
            r#"{"max_lines":200,"path":"tests/retry.rs"}"#
        );
        assert_eq!(stream.thoughts[0].source, ThoughtSource::Thinking);
    }

    #[test]
    fn stream_rechunked_and_reformatted_gives_the_same_summary() {
        assert_rechunking_invariant(&Anthropic, Endpoint::Messages, MESSAGES_STREAM);
        let whole = summarise(true, MESSAGES_STREAM);
        assert_eq!(summarise(true, &with_crlf(MESSAGES_STREAM)), whole);
        assert_eq!(summarise(true, &with_comments(MESSAGES_STREAM)), whole);
    }

    #[test]
    fn cut_stream_keeps_what_was_seen() {
        let cut = cut_before(MESSAGES_STREAM, "\"partial_json\":\"\\\"max_line\"");
        let summary = summarise(true, &cut);
        // Input and cache counts are known from message_start; output is still the provisional
        // 1: a partial report, not the final one (the gateway estimates the output).
        assert_eq!(summary.usage, None);
        assert_eq!(
            summary.partial_usage,
            Some(TokenUsage {
                input: 420,
                output: 1,
                cache_read: 9000,
                cache_write: 1800,
                reasoning: 0
            })
        );
        assert_eq!(summary.tool_calls.len(), 1);
        assert_eq!(summary.tool_calls[0].id, "toolu_01TGreadfile");
        assert_eq!(
            summary.tool_calls[0].input,
            r#"{"path": "tests/retry.rs", "#
        );
        assert_eq!(summary.thoughts, summarise(false, MESSAGES).thoughts);

        let in_thinking = cut_before(MESSAGES_STREAM, "xed. Look");
        let summary = summarise(true, &in_thinking);
        assert_eq!(
            summary.thoughts[0].content,
            "The user wants the flaky test fi"
        );
        assert!(summary.tool_calls.is_empty());

        assert_eq!(
            summarise(true, b"event: message_start\ndata: {\"type\":\"mess").usage,
            None
        );
    }

    #[test]
    fn redacted_thinking_and_empty_thinking() {
        let body = br#"{"id":"msg_1","model":"claude","content":[
            {"type":"redacted_thinking","data":"EmwKAhgB"},
            {"type":"thinking","thinking":"","signature":"s"},
            {"type":"text","text":"hi"}],
            "usage":{"input_tokens":1,"output_tokens":2}}"#;
        let blocking = summarise(false, body);
        assert_eq!(
            blocking.thoughts,
            vec![Thought {
                content: "[redacted]".into(),
                source: ThoughtSource::Thinking
            }]
        );

        let stream = br#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1","model":"claude","usage":{"input_tokens":1,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"redacted_thinking","data":"EmwKAhgB"}}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"thinking","thinking":""}}

event: message_delta
data: {"type":"message_delta","delta":{},"usage":{"output_tokens":2}}

"#;
        assert_eq!(content(summarise(true, stream)), content(blocking));
    }

    #[test]
    fn message_delta_usage_overrides_only_non_zero_fields() {
        let stream = br#"data: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":10,"cache_read_input_tokens":5,"cache_creation_input_tokens":7,"output_tokens":1}}}

data: {"type":"message_delta","usage":{"output_tokens":50,"input_tokens":12,"cache_read_input_tokens":0}}

data: {"type":"message_delta","usage":{"output_tokens":60}}

"#;
        assert_eq!(
            summarise(true, stream).usage,
            Some(TokenUsage {
                input: 12,
                output: 60,
                cache_read: 5,
                cache_write: 7,
                reasoning: 0
            })
        );
    }

    #[test]
    fn tool_use_without_deltas_and_unparseable_deltas() {
        let stream = br#"data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t0","name":"now","input":{}}}

data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t1","name":"x","input":{}}}

data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\": [1, "}}

data: {"type":"content_block_delta","index":7,"delta":{"type":"input_json_delta","partial_json":"orphan"}}

"#;
        let calls = summarise(true, stream).tool_calls;
        assert_eq!(calls[0].input, "{}");
        assert_eq!(calls[1].input, r#"{"a": [1, "#);
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn error_event_mid_stream_and_error_bodies() {
        let cut = cut_before(MESSAGES_STREAM, "content_block_start\",\"index\":2");
        let mut stream = cut.clone();
        stream.extend_from_slice(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        );
        assert_eq!(summarise(true, &stream), summarise(true, &cut));

        assert_eq!(
            content(summarise(false, OVERLOADED)),
            ResponseSummary::default()
        );
        assert_eq!(summarise(true, OVERLOADED), ResponseSummary::default());
        assert_eq!(
            content(summarise(false, b"\xff\x00{")),
            ResponseSummary::default()
        );
    }

    #[test]
    fn other_endpoints_extract_nothing() {
        let parser = summarise_chunks(
            &Anthropic,
            Endpoint::ChatCompletions,
            true,
            [MESSAGES_STREAM],
        );
        assert_eq!(parser, ResponseSummary::default());
    }

    proptest! {
        /// Usage, tool calls, thoughts and ids do not depend on where the stream is cut.
        #[test]
        fn fixture_stream_split_anywhere_parses_alike(
            points in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let mut points: Vec<usize> =
                points.into_iter().map(|p| p % (MESSAGES_STREAM.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for point in points {
                chunks.push(&MESSAGES_STREAM[start..point]);
                start = point;
            }
            chunks.push(&MESSAGES_STREAM[start..]);
            prop_assert_eq!(
                summarise_chunks(&Anthropic, Endpoint::Messages, true, chunks),
                summarise(true, MESSAGES_STREAM)
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            prefix_len in 0..MESSAGES_STREAM.len(),
            noise in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            // Real events followed by garbage: what was seen before stays.
            let mut stream = MESSAGES_STREAM[..prefix_len].to_vec();
            stream.extend_from_slice(&noise);
            summarise(true, &stream);
            summarise(false, &stream);
            summarise(true, &noise);
        }
    }
}
