//! The OpenAI wire format: Chat Completions and Responses, for api.openai.com itself
//! ([`OpenAi::FULL`]) and for servers that only speak Chat Completions ([`OpenAi::COMPATIBLE`]).
//!
//! Copilot speaks the same JSON under other paths and reuses the parsers here. This file also holds
//! the small pieces every adapter shares (request-object reading, the capped blocking-body parser,
//! the retained-text budget), so that each provider file only describes its own JSON.
//!
//! Not for: routing decisions beyond "is this one of our paths", authentication, or error bodies
//! the gateway writes itself.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Method;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::request_body::parse_request_object;
use super::{
    CredentialHeader, Endpoint, ParsedRequest, Provider, ProviderKind, RequestError,
    ResponseParser, ResponseSummary, RouteMatch, Thought, ThoughtSource, TokenUsage, ToolCall,
};
use crate::sse::{SseEvent, SseParser};

/// A blocking body is held whole until it ends so it can be parsed once; past this size it is not
/// a completion any client would send, and holding it would let an upstream exhaust memory.
pub(super) const MAX_BLOCKING_BODY_BYTES: usize = 32 << 20;

/// The usage-only chunk is a few hundred bytes; an event larger than this cannot be it and is
/// forwarded as it arrives instead of being held back for inspection.
const MAX_INSPECTED_EVENT_BYTES: usize = 64 << 10;

/// What a new reassembly slot (tool call, output item) is charged against a [`TextBudget`], so that
/// a stream of distinct empty slots is bounded too.
const SLOT_COST: usize = 64;

/// An OpenAI-shaped provider. Only the set of routes differs between the two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenAi {
    kind: ProviderKind,
}

impl OpenAi {
    /// `kind = "openai"`: Chat Completions, Responses, models, stored responses.
    pub const FULL: OpenAi = OpenAi {
        kind: ProviderKind::OpenAi,
    };
    /// `kind = "openai-compatible"`: Chat Completions and the models list, which is all that
    /// vLLM, Ollama, LiteLLM and friends reliably implement.
    pub const COMPATIBLE: OpenAi = OpenAi {
        kind: ProviderKind::OpenAiCompatible,
    };
}

impl Provider for OpenAi {
    fn route(&self, method: &Method, path: &str) -> RouteMatch {
        let post = *method == Method::POST;
        let get = *method == Method::GET;
        if post && path == "/v1/chat/completions" {
            return RouteMatch::Intercept(Endpoint::ChatCompletions);
        }
        if get && path == "/v1/models" {
            return RouteMatch::Passthrough;
        }
        if self.kind != ProviderKind::OpenAi {
            return RouteMatch::NotFound;
        }
        if post && path == "/v1/responses" {
            return RouteMatch::Intercept(Endpoint::Responses);
        }
        if get
            && (is_one_segment_under(path, "/v1/models/")
                || is_one_segment_under(path, "/v1/responses/"))
        {
            return RouteMatch::Passthrough;
        }
        RouteMatch::NotFound
    }

    fn parse_request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
    ) -> Result<ParsedRequest, RequestError> {
        match endpoint {
            Endpoint::Responses => parse_responses_request(body),
            Endpoint::ChatCompletions | Endpoint::Messages => parse_chat_request(body),
        }
    }

    fn rewrite_request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        parsed: &ParsedRequest,
    ) -> Option<Vec<u8>> {
        rewrite_request(endpoint, body, parsed)
    }

    fn response_parser(&self, endpoint: Endpoint, streaming: bool) -> Box<dyn ResponseParser> {
        response_parser(endpoint, streaming)
    }

    fn credential_header(&self) -> CredentialHeader {
        CredentialHeader::Bearer
    }
}

/// `/v1/models/{id}`-style paths: exactly one segment after `prefix` that is a plain id.
///
/// The raw path goes upstream with Tollgate's central key, so a segment the upstream (or a proxy
/// in front of it) could resolve elsewhere is refused: `.` and `..`, and any percent-encoding or
/// backslash (`..%2F..%2Ffiles` decodes to a walk out of `/v1/models`). Real model and response
/// ids (`gpt-4o-2024-08-06`, `ft:gpt-4o:org::id`, `resp_123`) need none of that.
pub(super) fn is_one_segment_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|id| {
        !id.is_empty()
            && id.bytes().any(|b| b != b'.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@~+".contains(&b))
    })
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// The text of a message `content`: the string itself, or the `text` of the parts whose `type`
/// is one of `part_types`, joined with "\n". `None` when there is no text part.
pub(super) fn text_content(content: &Value, part_types: &[&str]) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|part| {
                    part.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| part_types.contains(&t))
                })
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

pub(super) fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

pub(super) fn string_field(value: &Value, key: &str) -> Option<String> {
    str_field(value, key).map(str::to_owned)
}

/// A token count at a JSON pointer; absent, null or not a non-negative integer counts as 0.
pub(super) fn count_at(value: &Value, pointer: &str) -> u64 {
    value.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

pub(super) fn array_field<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The trailing run of `items` that satisfy `is_member`, in their original order.
fn trailing_run(items: &[Value], is_member: impl Fn(&Value) -> bool) -> &[Value] {
    let run = items
        .iter()
        .rev()
        .take_while(|item| is_member(item))
        .count();
    items.get(items.len() - run..).unwrap_or_default()
}

pub(super) fn parse_chat_request(body: &[u8]) -> Result<ParsedRequest, RequestError> {
    let (object, mut parsed) = parse_request_object(body)?;
    let request = Value::Object(object);
    parsed.max_output_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| request.get(*key).and_then(Value::as_u64));
    let messages = array_field(&request, "messages");
    parsed.last_user_prompt = messages
        .iter()
        .rev()
        .find(|message| str_field(message, "role") == Some("user"))
        .and_then(|message| message.get("content"))
        .and_then(|content| text_content(content, &["text"]));
    parsed.tool_result_ids = trailing_run(messages, |message| {
        str_field(message, "role") == Some("tool")
    })
    .iter()
    .filter_map(|message| string_field(message, "tool_call_id"))
    .collect();
    parsed.client_requested_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    parsed.choices = request.get("n").and_then(Value::as_u64);
    Ok(parsed)
}

/// Input items that answer a tool call. Custom (free-form) tools, which Codex uses for
/// `apply_patch`, answer with their own item type.
const TOOL_OUTPUT_ITEM_TYPES: [&str; 2] = ["function_call_output", "custom_tool_call_output"];

pub(super) fn parse_responses_request(body: &[u8]) -> Result<ParsedRequest, RequestError> {
    let (object, mut parsed) = parse_request_object(body)?;
    if object.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(RequestError::Background);
    }
    let request = Value::Object(object);
    parsed.max_output_tokens = request.get("max_output_tokens").and_then(Value::as_u64);
    match request.get("input") {
        Some(Value::String(prompt)) => parsed.last_user_prompt = Some(prompt.clone()),
        Some(Value::Array(items)) => {
            parsed.last_user_prompt = items
                .iter()
                .rev()
                .find(|item| str_field(item, "role") == Some("user"))
                .and_then(|item| item.get("content"))
                .and_then(|content| text_content(content, &["input_text", "text"]));
            parsed.tool_result_ids = trailing_run(items, |item| {
                str_field(item, "type").is_some_and(|t| TOOL_OUTPUT_ITEM_TYPES.contains(&t))
            })
            .iter()
            .filter_map(|item| string_field(item, "call_id"))
            .collect();
        }
        _ => {}
    }
    Ok(parsed)
}

/// Chat streams only report usage when asked, and an unpriced stream is not acceptable, so
/// Tollgate asks on the client's behalf (and [`UsageChunkStripper`] hides the extra chunk).
pub(super) fn rewrite_request(
    endpoint: Endpoint,
    body: &[u8],
    parsed: &ParsedRequest,
) -> Option<Vec<u8>> {
    if endpoint != Endpoint::ChatCompletions || !parsed.stream || parsed.client_requested_usage {
        return None;
    }
    let mut request: Value = serde_json::from_slice(body).ok()?;
    let options = request
        .as_object_mut()?
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    options
        .as_object_mut()?
        .insert("include_usage".to_owned(), Value::Bool(true));
    serde_json::to_vec(&request).ok()
}

// ---------------------------------------------------------------------------------------------
// Responses: shared plumbing
// ---------------------------------------------------------------------------------------------

pub(super) fn response_parser(endpoint: Endpoint, streaming: bool) -> Box<dyn ResponseParser> {
    match (endpoint, streaming) {
        (Endpoint::ChatCompletions, false) => {
            Box::new(BlockingJsonParser::new(chat_summary).reading_narrowly(chat_body_summary))
        }
        (Endpoint::ChatCompletions, true) => Box::new(ChatStreamParser::default()),
        (Endpoint::Responses, false) => Box::new(BlockingJsonParser::new(responses_summary)),
        (Endpoint::Responses, true) => Box::new(ResponsesStreamParser::default()),
        (Endpoint::Messages, _) => Box::new(NoResponseDetails),
    }
}

/// A summary read straight from a body's bytes, or `None` for a body it does not take.
type NarrowSummary = fn(&[u8]) -> Option<ResponseSummary>;

/// Holds a blocking JSON body (up to [`MAX_BLOCKING_BODY_BYTES`]) and summarises it at the end.
/// A body that is too large, cut, or not JSON (an HTML error page) gives an empty summary.
pub(super) struct BlockingJsonParser {
    body: Vec<u8>,
    /// Every byte fed, kept or not: the output an estimate starts from.
    fed: u64,
    too_large: bool,
    summarise: fn(&Value) -> ResponseSummary,
    /// `summarise` without parsing the whole body (`None`: a body it does not take).
    narrow: Option<NarrowSummary>,
}

impl BlockingJsonParser {
    pub(super) fn new(summarise: fn(&Value) -> ResponseSummary) -> Self {
        BlockingJsonParser {
            body: Vec::new(),
            fed: 0,
            too_large: false,
            summarise,
            narrow: None,
        }
    }

    /// Tries `narrow` before parsing the whole body into a `Value`.
    pub(super) fn reading_narrowly(mut self, narrow: NarrowSummary) -> Self {
        self.narrow = Some(narrow);
        self
    }
}

impl ResponseParser for BlockingJsonParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.fed = self.fed.saturating_add(chunk.len() as u64);
        if self.too_large {
            return;
        }
        if self.body.len() + chunk.len() > MAX_BLOCKING_BODY_BYTES {
            self.too_large = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    fn finish(&mut self) -> ResponseSummary {
        let body = std::mem::take(&mut self.body);
        let whole = if self.too_large {
            None
        } else if let Some(summary) = self.narrow.and_then(|narrow| narrow(&body)) {
            Some(summary)
        } else {
            serde_json::from_slice::<Value>(&body)
                .ok()
                .map(|response| (self.summarise)(&response))
        };
        let ended = whole.is_some();
        ResponseSummary {
            output_bytes: self.fed,
            ended,
            ..whole.unwrap_or_default()
        }
    }
}

/// For an endpoint a provider does not serve: the gateway never asks, but the trait must answer.
pub(super) struct NoResponseDetails;

impl ResponseParser for NoResponseDetails {
    fn feed(&mut self, _chunk: &[u8]) {}

    fn finish(&mut self) -> ResponseSummary {
        ResponseSummary::default()
    }
}

/// Bounds what a stream parser retains while reassembling (tool arguments, thoughts, slots) to
/// what a blocking body may hold, so an endless stream of deltas cannot grow memory without limit.
/// Spending is never refunded: replacements count again, which only matters for hostile streams.
pub(super) struct TextBudget {
    remaining: usize,
}

impl Default for TextBudget {
    fn default() -> Self {
        TextBudget {
            remaining: MAX_BLOCKING_BODY_BYTES,
        }
    }
}

impl TextBudget {
    /// Spends `bytes` if they fit, for something that is kept whole or not at all.
    pub(super) fn try_spend(&mut self, bytes: usize) -> bool {
        let fits = bytes <= self.remaining;
        if fits {
            self.remaining -= bytes;
        }
        fits
    }

    /// Spends room for a new reassembly slot plus its initial text.
    pub(super) fn try_spend_slot(&mut self, text_bytes: usize) -> bool {
        self.try_spend(SLOT_COST.saturating_add(text_bytes))
    }

    /// Appends as much of `piece` as fits (cut at a character boundary).
    pub(super) fn append(&mut self, target: &mut String, piece: &str) {
        let mut take = piece.len().min(self.remaining);
        while !piece.is_char_boundary(take) {
            take -= 1;
        }
        target.push_str(piece.get(..take).unwrap_or_default());
        self.remaining -= take;
    }

    /// Replaces `target` with `text` if it fits; otherwise keeps what was reassembled.
    pub(super) fn replace(&mut self, target: &mut String, text: &str) {
        if self.try_spend(text.len()) {
            target.clear();
            target.push_str(text);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chat Completions responses
// ---------------------------------------------------------------------------------------------

fn chat_usage(usage: &Value) -> Option<TokenUsage> {
    if !usage.is_object() {
        return None;
    }
    let prompt = count_at(usage, "/prompt_tokens");
    let cached = count_at(usage, "/prompt_tokens_details/cached_tokens");
    Some(TokenUsage {
        input: prompt.saturating_sub(cached),
        output: count_at(usage, "/completion_tokens"),
        cache_read: cached,
        cache_write: 0,
        reasoning: count_at(usage, "/completion_tokens_details/reasoning_tokens"),
    })
}

fn chat_tool_call(call: &Value) -> ToolCall {
    ToolCall {
        id: string_field(call, "id").unwrap_or_default(),
        name: call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        input: call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// [`chat_summary`] of a Chat Completions body, reading only the fields it uses into typed
/// values instead of building the whole body (message text, logprobs, usage details) as a
/// `Value`: that was 6 % of Tollgate's CPU per small request (issue 9). `None` for a body
/// this narrower reading does not take (a duplicate key, `choices` not a list of objects,
/// `usage` not an object…): the caller then parses the whole body, so no answer is summarised
/// differently (a unit test and a property test over bodies of any shape hold the two side by
/// side).
fn chat_body_summary(body: &[u8]) -> Option<ResponseSummary> {
    #[derive(Deserialize)]
    struct Body {
        id: Option<Value>,
        model: Option<Value>,
        usage: Option<Object<Usage>>,
        choices: Option<Vec<Object<Choice>>>,
    }
    #[derive(Deserialize)]
    struct Usage {
        #[serde(default)]
        prompt_tokens: Count,
        #[serde(default)]
        completion_tokens: Count,
        prompt_tokens_details: Option<Object<PromptDetails>>,
        completion_tokens_details: Option<Object<CompletionDetails>>,
    }
    #[derive(Deserialize)]
    struct PromptDetails {
        #[serde(default)]
        cached_tokens: Count,
    }
    #[derive(Deserialize)]
    struct CompletionDetails {
        #[serde(default)]
        reasoning_tokens: Count,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: Option<Object<Message>>,
    }
    #[derive(Deserialize)]
    struct Message {
        tool_calls: Option<Value>,
    }
    let Object(body) = serde_json::from_slice::<Object<Body>>(body).ok()?;
    let text = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let usage = body.usage.map(|Object(u)| {
        let cached = u.prompt_tokens_details.map_or(0, |d| d.0.cached_tokens.0);
        TokenUsage {
            input: u.prompt_tokens.0.saturating_sub(cached),
            output: u.completion_tokens.0,
            cache_read: cached,
            cache_write: 0,
            reasoning: u
                .completion_tokens_details
                .map_or(0, |d| d.0.reasoning_tokens.0),
        }
    });
    let tool_calls = body
        .choices
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.0.message?.0.tool_calls)
        .filter_map(|calls| match calls {
            Value::Array(calls) => Some(calls),
            _ => None,
        })
        .flatten()
        .map(|call| chat_tool_call(&call))
        .collect();
    Some(ResponseSummary {
        response_id: text(body.id),
        model: text(body.model),
        usage,
        tool_calls,
        ..ResponseSummary::default()
    })
}

/// A JSON object read as `T`, and only an object: serde's derived structs also accept an array
/// of their fields in order, which a `Value` lookup by key would not see.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Object<T>, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(a)).map(Object)
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A token count read as [`count_at`] reads one: a non-negative integer, else 0, whatever the
/// JSON value is.
#[derive(Default)]
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Count, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(0))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Count, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(0))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Tool calls of every choice (with `n > 1` each choice may call tools), in choice order.
pub(super) fn chat_summary(response: &Value) -> ResponseSummary {
    let tool_calls = array_field(response, "choices")
        .iter()
        .filter_map(|choice| {
            choice
                .pointer("/message/tool_calls")
                .and_then(Value::as_array)
        })
        .flatten()
        .map(chat_tool_call)
        .collect();
    ResponseSummary {
        response_id: string_field(response, "id"),
        model: string_field(response, "model"),
        usage: response.get("usage").and_then(chat_usage),
        tool_calls,
        ..ResponseSummary::default()
    }
}

#[derive(Default)]
struct StreamedChatToolCall {
    id: String,
    name: String,
    arguments: String,
}

/// Reassembles a Chat Completions stream. Tool calls are keyed by (choice index, tool call
/// index) so their order matches the blocking body's.
#[derive(Default)]
struct ChatStreamParser {
    sse: SseParser,
    state: ChatStreamState,
}

#[derive(Default)]
struct ChatStreamState {
    response_id: Option<String>,
    model: Option<String>,
    usage: Option<TokenUsage>,
    tool_calls: BTreeMap<(u64, u64), StreamedChatToolCall>,
    budget: TextBudget,
    output_bytes: u64,
    ended: bool,
}

impl ChatStreamState {
    fn on_event(&mut self, event: SseEvent<'_>) {
        if event.data == b"[DONE]" {
            self.ended = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(event.data) else {
            return;
        };
        if self.response_id.is_none() {
            self.response_id = string_field(&chunk, "id");
        }
        if self.model.is_none() {
            self.model = string_field(&chunk, "model");
        }
        // Some compatible servers repeat cumulative usage on every chunk: the last one wins.
        if let Some(usage) = chunk.get("usage").and_then(chat_usage) {
            self.usage = Some(usage);
        }
        for choice in array_field(&chunk, "choices") {
            self.output_bytes += ["content", "refusal", "reasoning_content", "reasoning"]
                .iter()
                .filter_map(|key| choice.get("delta").and_then(|d| str_field(d, key)))
                .map(|text| text.len() as u64)
                .sum::<u64>();
            let choice_index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let deltas = choice
                .pointer("/delta/tool_calls")
                .and_then(Value::as_array);
            for (position, delta) in deltas.into_iter().flatten().enumerate() {
                // A few compatible servers omit `index` when each call arrives whole.
                let index = delta
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(position as u64);
                self.apply_tool_call_delta((choice_index, index), delta);
            }
        }
    }

    fn apply_tool_call_delta(&mut self, key: (u64, u64), delta: &Value) {
        let id = str_field(delta, "id").unwrap_or_default();
        let name = delta
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let arguments = delta
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        self.output_bytes += (name.len() + arguments.len()) as u64;
        if !self.tool_calls.contains_key(&key) && !self.budget.try_spend_slot(0) {
            return;
        }
        let call = self.tool_calls.entry(key).or_default();
        // The id and name come in the first delta; later deltas may repeat them or send "".
        if call.id.is_empty() {
            self.budget.append(&mut call.id, id);
        }
        if call.name.is_empty() {
            self.budget.append(&mut call.name, name);
        }
        self.budget.append(&mut call.arguments, arguments);
    }
}

impl ResponseParser for ChatStreamParser {
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
        ResponseSummary {
            response_id: state.response_id,
            model: state.model,
            usage: state.usage,
            tool_calls: state
                .tool_calls
                .into_values()
                .map(|call| ToolCall {
                    id: call.id,
                    name: call.name,
                    input: call.arguments,
                })
                .collect(),
            thoughts: Vec::new(),
            output_bytes: state.output_bytes,
            ended: state.ended,
            partial_usage: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses API responses
// ---------------------------------------------------------------------------------------------

fn responses_usage(usage: &Value) -> Option<TokenUsage> {
    if !usage.is_object() {
        return None;
    }
    let input = count_at(usage, "/input_tokens");
    let cached = count_at(usage, "/input_tokens_details/cached_tokens");
    Some(TokenUsage {
        input: input.saturating_sub(cached),
        output: count_at(usage, "/output_tokens"),
        cache_read: cached,
        cache_write: 0,
        reasoning: count_at(usage, "/output_tokens_details/reasoning_tokens"),
    })
}

/// A Responses output item, reduced to what Tollgate records.
enum OutputItem {
    /// `function_call` (`arguments`) or `custom_tool_call` (`input`): both are tool calls.
    ToolCall(ToolCall),
    /// `reasoning`: summary texts by `summary_index`.
    Reasoning(BTreeMap<u64, String>),
    /// Messages and everything else: nothing to record.
    Other,
}

impl OutputItem {
    fn from_json(item: &Value) -> OutputItem {
        match str_field(item, "type") {
            Some("function_call") => OutputItem::ToolCall(ToolCall {
                id: string_field(item, "call_id").unwrap_or_default(),
                name: string_field(item, "name").unwrap_or_default(),
                input: string_field(item, "arguments").unwrap_or_default(),
            }),
            Some("custom_tool_call") => OutputItem::ToolCall(ToolCall {
                id: string_field(item, "call_id").unwrap_or_default(),
                name: string_field(item, "name").unwrap_or_default(),
                input: string_field(item, "input").unwrap_or_default(),
            }),
            Some("reasoning") => OutputItem::Reasoning(
                array_field(item, "summary")
                    .iter()
                    .enumerate()
                    .filter_map(|(index, part)| Some((index as u64, string_field(part, "text")?)))
                    .collect(),
            ),
            _ => OutputItem::Other,
        }
    }

    /// Text the item holds, to charge against a [`TextBudget`].
    fn text_len(&self) -> usize {
        match self {
            OutputItem::ToolCall(call) => call.id.len() + call.name.len() + call.input.len(),
            OutputItem::Reasoning(summaries) => summaries.values().map(String::len).sum(),
            OutputItem::Other => 0,
        }
    }
}

/// Tool calls and thoughts of output items in output order. Empty summaries are not thoughts.
fn summarise_output_items<'a>(
    items: impl IntoIterator<Item = &'a OutputItem>,
) -> (Vec<ToolCall>, Vec<Thought>) {
    let mut tool_calls = Vec::new();
    let mut thoughts = Vec::new();
    for item in items {
        match item {
            OutputItem::ToolCall(call) => tool_calls.push(call.clone()),
            OutputItem::Reasoning(summaries) => thoughts.extend(
                summaries
                    .values()
                    .filter(|text| !text.is_empty())
                    .map(|text| Thought {
                        content: text.clone(),
                        source: ThoughtSource::ReasoningSummary,
                    }),
            ),
            OutputItem::Other => {}
        }
    }
    (tool_calls, thoughts)
}

pub(super) fn responses_summary(response: &Value) -> ResponseSummary {
    let items: Vec<OutputItem> = array_field(response, "output")
        .iter()
        .map(OutputItem::from_json)
        .collect();
    let (tool_calls, thoughts) = summarise_output_items(&items);
    ResponseSummary {
        response_id: string_field(response, "id"),
        model: string_field(response, "model"),
        usage: response.get("usage").and_then(responses_usage),
        tool_calls,
        thoughts,
        ..ResponseSummary::default()
    }
}

/// Reads a Responses stream. The terminal event carries the whole response and is what counts;
/// the deltas are reassembled too, so that a stream cut before it still yields what was seen.
#[derive(Default)]
struct ResponsesStreamParser {
    sse: SseParser,
    state: ResponsesStreamState,
}

#[derive(Default)]
struct ResponsesStreamState {
    response_id: Option<String>,
    model: Option<String>,
    /// By `output_index`, with each item's `id` for events that only name the item.
    items: BTreeMap<u64, (Option<String>, OutputItem)>,
    terminal: Option<ResponseSummary>,
    budget: TextBudget,
    output_bytes: u64,
}

impl ResponsesStreamState {
    fn on_event(&mut self, event: SseEvent<'_>) {
        let Ok(payload) = serde_json::from_slice::<Value>(event.data) else {
            return;
        };
        let kind = str_field(&payload, "type")
            .or(event.event)
            .unwrap_or_default();
        // Every kind of generated output (text, refusals, tool arguments, reasoning, audio
        // transcripts) streams as `*.delta` events with a string `delta`.
        if kind.ends_with(".delta") {
            if let Some(delta) = str_field(&payload, "delta") {
                self.output_bytes += delta.len() as u64;
            }
        }
        match kind {
            "response.created" | "response.in_progress" => {
                if let Some(response) = payload.get("response") {
                    self.response_id = string_field(response, "id").or(self.response_id.take());
                    self.model = string_field(response, "model").or(self.model.take());
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(response) = payload.get("response").filter(|r| r.is_object()) {
                    self.terminal = Some(responses_summary(response));
                }
            }
            "response.output_item.added" | "response.output_item.done" => self.set_item(&payload),
            "response.function_call_arguments.delta" | "response.custom_tool_call_input.delta" => {
                let delta = str_field(&payload, "delta").unwrap_or_default();
                if let Some(OutputItem::ToolCall(call)) = Self::item_mut(&mut self.items, &payload)
                {
                    self.budget.append(&mut call.input, delta);
                }
            }
            "response.function_call_arguments.done" | "response.custom_tool_call_input.done" => {
                let key = if kind == "response.function_call_arguments.done" {
                    "arguments"
                } else {
                    "input"
                };
                if let Some(whole) = str_field(&payload, key) {
                    if let Some(OutputItem::ToolCall(call)) =
                        Self::item_mut(&mut self.items, &payload)
                    {
                        self.budget.replace(&mut call.input, whole);
                    }
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_summary_text.done" => {
                self.apply_summary_text(&payload, kind.ends_with(".done"));
            }
            _ => {}
        }
    }

    fn set_item(&mut self, payload: &Value) {
        let (Some(index), Some(item)) = (
            payload.get("output_index").and_then(Value::as_u64),
            payload.get("item"),
        ) else {
            return;
        };
        let parsed = OutputItem::from_json(item);
        if self.budget.try_spend_slot(parsed.text_len()) {
            self.items.insert(index, (string_field(item, "id"), parsed));
        }
    }

    /// The item an event is about: by `output_index`, or by `item_id` when the index is absent.
    fn item_mut<'a>(
        items: &'a mut BTreeMap<u64, (Option<String>, OutputItem)>,
        payload: &Value,
    ) -> Option<&'a mut OutputItem> {
        if let Some(index) = payload.get("output_index").and_then(Value::as_u64) {
            return items.get_mut(&index).map(|(_, item)| item);
        }
        let item_id = str_field(payload, "item_id")?;
        items
            .values_mut()
            .find(|(id, _)| id.as_deref() == Some(item_id))
            .map(|(_, item)| item)
    }

    fn apply_summary_text(&mut self, payload: &Value, done: bool) {
        let summary_index = payload
            .get("summary_index")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let text = str_field(payload, if done { "text" } else { "delta" }).unwrap_or_default();
        let Some(OutputItem::Reasoning(summaries)) = Self::item_mut(&mut self.items, payload)
        else {
            return;
        };
        if !summaries.contains_key(&summary_index) && !self.budget.try_spend_slot(0) {
            return;
        }
        let summary = summaries.entry(summary_index).or_default();
        if done {
            self.budget.replace(summary, text);
        } else {
            self.budget.append(summary, text);
        }
    }
}

impl ResponseParser for ResponsesStreamParser {
    fn feed(&mut self, chunk: &[u8]) {
        let state = &mut self.state;
        self.sse.feed(chunk, |event| state.on_event(event));
    }

    fn ended(&self) -> bool {
        self.state.terminal.is_some()
    }

    fn finish(&mut self) -> ResponseSummary {
        self.sse.finish(|_| {});
        let state = std::mem::take(&mut self.state);
        if let Some(mut terminal) = state.terminal {
            terminal.response_id = terminal.response_id.or(state.response_id);
            terminal.model = terminal.model.or(state.model);
            terminal.output_bytes = state.output_bytes;
            terminal.ended = true;
            return terminal;
        }
        let (tool_calls, thoughts) =
            summarise_output_items(state.items.values().map(|(_, item)| item));
        ResponseSummary {
            response_id: state.response_id,
            model: state.model,
            usage: None,
            tool_calls,
            thoughts,
            output_bytes: state.output_bytes,
            ended: false,
            partial_usage: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hiding the injected usage chunk
// ---------------------------------------------------------------------------------------------

/// Removes the usage-only chunk from a Chat Completions stream whose `include_usage` Tollgate
/// injected, so the client sees exactly the stream it asked for.
///
/// Works on bytes: every complete event is forwarded byte for byte, except an event whose JSON has
/// `"choices": []` and a non-null `usage`, which is dropped whole (with its blank line). An event
/// whose end has not arrived is held back until it does, because until then it cannot be told
/// apart from the usage chunk.
pub struct UsageChunkStripper {
    /// Bytes of the current, not yet complete event.
    held: Vec<u8>,
    /// The current line has bytes, so its end is not a blank line.
    line_has_bytes: bool,
    /// The last byte was a `\r` line end: a following `\n` belongs to it.
    after_cr: bool,
    /// An event ended with a blank `\r` line at the end of a chunk: its `\n`, if any, is next.
    ended_on_cr: bool,
    /// The current event is too big to be the usage chunk: forwarded as it arrives.
    forwarding: bool,
    sse: SseParser,
}

impl Default for UsageChunkStripper {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageChunkStripper {
    pub fn new() -> Self {
        UsageChunkStripper {
            held: Vec::new(),
            line_has_bytes: false,
            after_cr: false,
            ended_on_cr: false,
            forwarding: false,
            sse: SseParser::new(),
        }
    }

    /// The bytes to send to the client for this upstream chunk (possibly empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(self.held.len() + chunk.len());
        let mut rest = chunk;
        if self.ended_on_cr && !rest.is_empty() {
            self.ended_on_cr = false;
            self.after_cr = false;
            let lf_len = usize::from(rest.starts_with(b"\n"));
            let (lf, after) = rest.split_at(lf_len);
            self.end_event(lf, &mut out);
            rest = after;
        }
        let mut event_start = 0;
        let mut position = 0;
        while let Some(&byte) = rest.get(position) {
            position += 1;
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    if self.line_has_bytes {
                        self.line_has_bytes = false;
                        continue;
                    }
                    // A blank line ends the event; the `\n` of a blank `\r\n` line belongs to it.
                    if byte == b'\r' {
                        match rest.get(position) {
                            Some(b'\n') => {
                                position += 1;
                                self.after_cr = false;
                            }
                            Some(_) => {}
                            None => {
                                self.ended_on_cr = true;
                                break;
                            }
                        }
                    }
                    if !self.ended_on_cr {
                        self.end_event(
                            rest.get(event_start..position).unwrap_or_default(),
                            &mut out,
                        );
                        event_start = position;
                    }
                }
                _ => {
                    self.after_cr = false;
                    self.line_has_bytes = true;
                }
            }
        }
        self.hold(rest.get(event_start..).unwrap_or_default(), &mut out);
        Bytes::from(out)
    }

    /// Ends the stream: a held incomplete event is returned unchanged (a complete one still goes
    /// through the usage check).
    pub fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        if self.ended_on_cr {
            self.end_event(&[], &mut out);
        } else {
            out.append(&mut self.held);
        }
        self.held.clear();
        self.line_has_bytes = false;
        self.after_cr = false;
        self.ended_on_cr = false;
        self.forwarding = false;
        self.sse.finish(|_| {});
        Bytes::from(out)
    }

    fn hold(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        if self.forwarding {
            out.extend_from_slice(piece);
            return;
        }
        self.held.extend_from_slice(piece);
        if self.held.len() > MAX_INSPECTED_EVENT_BYTES {
            out.append(&mut self.held);
            self.forwarding = true;
        }
    }

    /// `tail` is the rest of the current event, up to and including its blank line.
    fn end_event(&mut self, tail: &[u8], out: &mut Vec<u8>) {
        if self.forwarding {
            self.forwarding = false;
            out.extend_from_slice(tail);
            return;
        }
        if self.held.is_empty() {
            if !self.is_usage_only_event(tail) {
                out.extend_from_slice(tail);
            }
            return;
        }
        self.held.extend_from_slice(tail);
        let event = std::mem::take(&mut self.held);
        if !self.is_usage_only_event(&event) {
            out.extend_from_slice(&event);
        }
        self.held = event;
        self.held.clear();
    }

    fn is_usage_only_event(&mut self, event: &[u8]) -> bool {
        let mut usage_only = false;
        self.sse
            .feed(event, |event| usage_only |= is_usage_only_chunk(event.data));
        usage_only
    }
}

/// Only the two fields that identify the usage-only chunk; the rest is skipped unparsed.
#[derive(Deserialize)]
struct ChunkShape {
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
}

fn is_usage_only_chunk(data: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<ChunkShape>(data),
        Ok(ChunkShape { choices: Some(choices), usage: Some(_) }) if choices.is_empty()
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::providers::{InputShape, UnseenInput};
    use proptest::prelude::*;

    pub(in crate::providers) const MANIFEST: &str =
        include_str!("../../tests/fixtures/manifest.json");
    const CHAT: &[u8] = include_bytes!("../../tests/fixtures/openai-chat.json");
    const CHAT_STREAM: &[u8] = include_bytes!("../../tests/fixtures/openai-chat-stream.sse");
    const CHAT_TOOLS_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/openai-chat-tools-stream.sse");
    const RESPONSES: &[u8] = include_bytes!("../../tests/fixtures/openai-responses.json");
    const RESPONSES_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/openai-responses-stream.sse");
    const RATE_LIMIT: &[u8] = include_bytes!("../../tests/fixtures/openai-error-ratelimit.json");

    /// Asserts a summary equals the manifest entry for `fixture`; arguments compare as JSON.
    pub(in crate::providers) fn assert_matches_manifest(summary: &ResponseSummary, fixture: &str) {
        let manifest: Value = serde_json::from_str(MANIFEST).unwrap();
        let expected = &manifest[fixture];
        assert!(expected.is_object(), "{fixture} not in manifest");
        assert_eq!(
            summary.model.as_deref(),
            expected["model"].as_str(),
            "{fixture} model"
        );
        assert_eq!(
            summary.response_id.as_deref(),
            expected["response_id"].as_str(),
            "{fixture} id"
        );
        let usage = summary
            .usage
            .unwrap_or_else(|| panic!("{fixture}: no usage"));
        let count = |key: &str| expected[key].as_u64().unwrap();
        assert_eq!(
            usage,
            TokenUsage {
                input: count("input"),
                output: count("output"),
                cache_read: count("cache_read"),
                cache_write: count("cache_write"),
                reasoning: count("reasoning"),
            },
            "{fixture} usage"
        );
        let expected_calls = expected["tool_calls"].as_array().unwrap();
        assert_eq!(
            summary.tool_calls.len(),
            expected_calls.len(),
            "{fixture} tool calls"
        );
        for (call, want) in summary.tool_calls.iter().zip(expected_calls) {
            assert_eq!(call.id, want["id"].as_str().unwrap());
            assert_eq!(call.name, want["name"].as_str().unwrap());
            let arguments: Value = serde_json::from_str(&call.input).unwrap();
            assert_eq!(
                arguments, want["arguments"],
                "{fixture} arguments of {}",
                call.id
            );
        }
        let thoughts: Vec<&str> = summary
            .thoughts
            .iter()
            .map(|t| t.content.as_str())
            .collect();
        let expected_thoughts: Vec<&str> = expected["thoughts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(thoughts, expected_thoughts, "{fixture} thoughts");
    }

    /// A summary's content, without how much output it carried or whether it ended (a stream
    /// and its blocking twin differ in both by nature).
    pub(in crate::providers) fn content(summary: ResponseSummary) -> ResponseSummary {
        ResponseSummary {
            output_bytes: 0,
            ended: false,
            ..summary
        }
    }

    pub(in crate::providers) fn summarise_chunks<'a>(
        provider: &dyn Provider,
        endpoint: Endpoint,
        streaming: bool,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> ResponseSummary {
        let mut parser = provider.response_parser(endpoint, streaming);
        for chunk in chunks {
            parser.feed(chunk);
        }
        parser.finish()
    }

    fn summarise(endpoint: Endpoint, streaming: bool, body: &[u8]) -> ResponseSummary {
        summarise_chunks(&OpenAi::FULL, endpoint, streaming, [body])
    }

    /// The stream re-chunked at every offset (two pieces) and one byte at a time gives `whole`.
    pub(in crate::providers) fn assert_rechunking_invariant(
        provider: &dyn Provider,
        endpoint: Endpoint,
        stream: &[u8],
    ) {
        let whole = summarise_chunks(provider, endpoint, true, [stream]);
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(
                summarise_chunks(provider, endpoint, true, [a, b]),
                whole,
                "split at {split}"
            );
        }
        assert_eq!(
            summarise_chunks(provider, endpoint, true, stream.chunks(1)),
            whole
        );
    }

    pub(in crate::providers) fn with_crlf(stream: &[u8]) -> Vec<u8> {
        String::from_utf8(stream.to_vec())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes()
    }

    /// Keep-alive comments between events and a comment line inside each event.
    pub(in crate::providers) fn with_comments(stream: &[u8]) -> Vec<u8> {
        let text = String::from_utf8(stream.to_vec()).unwrap();
        let mut out = String::from(": hello\n\n");
        for event in text.split_terminator("\n\n") {
            out.push_str(": keep-alive\n\n:ping\n");
            out.push_str(event);
            out.push_str("\n\n");
        }
        out.into_bytes()
    }

    /// The stream up to (not including) the first event whose data contains `marker`.
    pub(in crate::providers) fn cut_before(stream: &[u8], marker: &str) -> Vec<u8> {
        let text = std::str::from_utf8(stream).unwrap();
        let at = text.find(marker).unwrap();
        let event_start = text[..at].rfind("\n\n").map_or(0, |p| p + 2);
        stream[..event_start].to_vec()
    }

    #[test]
    fn routes_of_the_full_api() {
        let openai = OpenAi::FULL;
        let cases = [
            (
                Method::POST,
                "/v1/chat/completions",
                RouteMatch::Intercept(Endpoint::ChatCompletions),
            ),
            (
                Method::POST,
                "/v1/responses",
                RouteMatch::Intercept(Endpoint::Responses),
            ),
            (Method::GET, "/v1/models", RouteMatch::Passthrough),
            (Method::GET, "/v1/models/gpt-4o", RouteMatch::Passthrough),
            (
                Method::GET,
                "/v1/responses/resp_123",
                RouteMatch::Passthrough,
            ),
            (Method::GET, "/v1/chat/completions", RouteMatch::NotFound),
            (Method::POST, "/v1/models", RouteMatch::NotFound),
            (Method::GET, "/v1/models/", RouteMatch::NotFound),
            (
                Method::GET,
                "/v1/responses/resp_123/input_items",
                RouteMatch::NotFound,
            ),
            (
                Method::DELETE,
                "/v1/responses/resp_123",
                RouteMatch::NotFound,
            ),
            (Method::POST, "/v1/embeddings", RouteMatch::NotFound),
            (Method::POST, "/chat/completions", RouteMatch::NotFound),
            (
                Method::GET,
                "/v1/models/ft:gpt-4o-mini-2024-07-18:acme::AbC12",
                RouteMatch::Passthrough,
            ),
            (Method::GET, "/v1/models/gpt-4.1", RouteMatch::Passthrough),
        ];
        for (method, path, expected) in cases {
            assert_eq!(openai.route(&method, path), expected, "{method} {path}");
        }
        assert_eq!(openai.credential_header(), CredentialHeader::Bearer);
    }

    /// Regression: `GET /openai/v1/models/..` went upstream as a passthrough with the central
    /// key, and an upstream that normalises or decodes the path would have answered another
    /// endpoint (`..%2F..%2Ffiles`: the organisation's files).
    #[test]
    fn id_segments_that_could_leave_their_collection_are_not_routes() {
        for id in [
            ".",
            "..",
            "...",
            "%2e%2e",
            "..%2F..%2Ffiles",
            "a%2Fb",
            "..%5Cadmin",
            "a\\b",
            "a b",
            "a?b",
            "a#b",
            "%00",
        ] {
            for prefix in ["/v1/models/", "/v1/responses/"] {
                let path = format!("{prefix}{id}");
                assert_eq!(
                    OpenAi::FULL.route(&Method::GET, &path),
                    RouteMatch::NotFound,
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn routes_of_compatible_servers() {
        let compatible = OpenAi::COMPATIBLE;
        let cases = [
            (
                Method::POST,
                "/v1/chat/completions",
                RouteMatch::Intercept(Endpoint::ChatCompletions),
            ),
            (Method::GET, "/v1/models", RouteMatch::Passthrough),
            (Method::POST, "/v1/responses", RouteMatch::NotFound),
            (Method::GET, "/v1/models/llama", RouteMatch::NotFound),
            (Method::GET, "/v1/responses/resp_1", RouteMatch::NotFound),
        ];
        for (method, path, expected) in cases {
            assert_eq!(compatible.route(&method, path), expected, "{method} {path}");
        }
        assert_eq!(compatible.credential_header(), CredentialHeader::Bearer);
    }

    #[test]
    fn chat_request_fields() {
        let body = br#"{
            "model": "gpt-4o", "stream": true, "max_tokens": 100, "max_completion_tokens": 200,
            "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_a"}, {"id": "call_b"}]},
                {"role": "tool", "tool_call_id": "call_early", "content": "x"},
                {"role": "user", "content": [
                    {"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": "u"}},
                    {"type": "text", "text": "this"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_a"}, {"id": "call_b"}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "1"},
                {"role": "tool", "tool_call_id": "call_b", "content": "2"}
            ]}"#;
        let parsed = OpenAi::FULL
            .parse_request(Endpoint::ChatCompletions, body)
            .unwrap();
        assert_eq!(
            parsed,
            ParsedRequest {
                model: "gpt-4o".into(),
                stream: true,
                max_output_tokens: Some(200),
                last_user_prompt: Some("look at\nthis".into()),
                tool_result_ids: vec!["call_a".into(), "call_b".into()],
                metadata_user_id: None,
                client_requested_usage: true,
                choices: None,
                // The image part is a URL: the provider fetches it, so its cost is unseen.
                input: InputShape {
                    media_parts: 0,
                    unseen: Some(UnseenInput::Reference("image")),
                },
            }
        );
    }

    #[test]
    fn chat_request_defaults_and_max_tokens_fallback() {
        let body = br#"{"model":"m","max_tokens":7,"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
        let parsed = OpenAi::COMPATIBLE
            .parse_request(Endpoint::ChatCompletions, body)
            .unwrap();
        assert!(!parsed.stream);
        assert_eq!(parsed.max_output_tokens, Some(7));
        assert_eq!(parsed.last_user_prompt.as_deref(), Some("hi"));
        assert!(parsed.tool_result_ids.is_empty());
        assert!(!parsed.client_requested_usage);

        let image_only =
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}],
            "stream_options":{"include_usage":false}}"#;
        let parsed = OpenAi::FULL
            .parse_request(Endpoint::ChatCompletions, image_only)
            .unwrap();
        assert_eq!(parsed.last_user_prompt, None);
        assert!(!parsed.client_requested_usage);
    }

    #[test]
    fn request_errors() {
        let parse = |body: &[u8]| OpenAi::FULL.parse_request(Endpoint::ChatCompletions, body);
        assert!(matches!(parse(b"{nope"), Err(RequestError::NotJson(_))));
        assert!(matches!(parse(b"\xff\xfe"), Err(RequestError::NotJson(_))));
        assert_eq!(parse(b"[1,2]"), Err(RequestError::NotObject));
        assert_eq!(parse(b"{}"), Err(RequestError::MissingModel));
        assert_eq!(parse(br#"{"model":5}"#), Err(RequestError::MissingModel));
        assert_eq!(parse(br#"{"model":""}"#), Err(RequestError::MissingModel));
        assert_eq!(
            OpenAi::FULL.parse_request(Endpoint::Responses, br#"{"input":"x"}"#),
            Err(RequestError::MissingModel)
        );
    }

    #[test]
    fn hostile_request_shapes_do_not_panic() {
        let bodies: [&[u8]; 6] = [
            br#"{"model":"m","messages":"nope","stream":"yes","max_tokens":-1}"#,
            br#"{"model":"m","messages":[1,null,{"role":5},{"role":"tool"}]}"#,
            br#"{"model":"m","input":{"role":"user"}}"#,
            br#"{"model":"m","input":[null,{"type":"function_call_output"}]}"#,
            br#"{"model":"m","stream_options":"x","stream":true}"#,
            &[b'['; 100_000],
        ];
        for body in bodies {
            for endpoint in [
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Messages,
            ] {
                if let Ok(parsed) = OpenAi::FULL.parse_request(endpoint, body) {
                    let _ = OpenAi::FULL.rewrite_request(endpoint, body, &parsed);
                }
            }
        }
    }

    #[test]
    fn responses_request_with_string_input() {
        let body =
            br#"{"model":"gpt-5","stream":true,"max_output_tokens":900,"input":"fix the test"}"#;
        let parsed = OpenAi::FULL
            .parse_request(Endpoint::Responses, body)
            .unwrap();
        assert_eq!(parsed.model, "gpt-5");
        assert!(parsed.stream);
        assert_eq!(parsed.max_output_tokens, Some(900));
        assert_eq!(parsed.last_user_prompt.as_deref(), Some("fix the test"));
        assert!(parsed.tool_result_ids.is_empty());
    }

    #[test]
    fn responses_request_with_items() {
        let body = br#"{"model":"gpt-5","input":[
            {"role":"user","content":"old"},
            {"type":"message","role":"user","content":[{"type":"input_text","text":"run"},
                {"type":"input_image","image_url":"x"},{"type":"input_text","text":"tests"}]},
            {"type":"function_call","call_id":"call_1","name":"shell","arguments":"{}"},
            {"type":"function_call_output","call_id":"call_0","output":"early"},
            {"type":"message","role":"assistant","content":[{"type":"output_text","text":"ok"}]},
            {"type":"function_call_output","call_id":"call_1","output":"done"},
            {"type":"custom_tool_call_output","call_id":"call_2","output":"patched"}
        ]}"#;
        let parsed = OpenAi::FULL
            .parse_request(Endpoint::Responses, body)
            .unwrap();
        assert_eq!(parsed.last_user_prompt.as_deref(), Some("run\ntests"));
        assert_eq!(
            parsed.tool_result_ids,
            vec!["call_1".to_owned(), "call_2".to_owned()]
        );
        assert_eq!(parsed.max_output_tokens, None);
    }

    #[test]
    fn rewrite_injects_include_usage_into_chat_streams() {
        let body =
            br#"{"model":"m","stream":true,"stream_options":{"continuous":true},"messages":[]}"#;
        let parsed = OpenAi::FULL
            .parse_request(Endpoint::ChatCompletions, body)
            .unwrap();
        let rewritten = OpenAi::FULL
            .rewrite_request(Endpoint::ChatCompletions, body, &parsed)
            .unwrap();
        let value: Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"model":"m","stream":true,"messages":[],
                "stream_options":{"continuous":true,"include_usage":true}})
        );
        let reparsed = OpenAi::FULL
            .parse_request(Endpoint::ChatCompletions, &rewritten)
            .unwrap();
        assert!(reparsed.client_requested_usage);

        let no_options = br#"{"model":"m","stream":true,"stream_options":null}"#;
        let parsed = OpenAi::COMPATIBLE
            .parse_request(Endpoint::ChatCompletions, no_options)
            .unwrap();
        let rewritten = OpenAi::COMPATIBLE
            .rewrite_request(Endpoint::ChatCompletions, no_options, &parsed)
            .unwrap();
        let value: Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(
            value["stream_options"],
            serde_json::json!({"include_usage": true})
        );
    }

    #[test]
    fn rewrite_leaves_other_requests_alone() {
        let cases: [(Endpoint, &[u8]); 4] = [
            (
                Endpoint::ChatCompletions,
                br#"{"model":"m","stream":false}"#,
            ),
            (Endpoint::ChatCompletions, br#"{"model":"m"}"#),
            (
                Endpoint::ChatCompletions,
                br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (Endpoint::Responses, br#"{"model":"m","stream":true}"#),
        ];
        for (endpoint, body) in cases {
            let parsed = OpenAi::FULL.parse_request(endpoint, body).unwrap();
            assert_eq!(OpenAi::FULL.rewrite_request(endpoint, body, &parsed), None);
        }
    }

    #[test]
    fn blocking_fixtures_match_manifest() {
        assert_matches_manifest(
            &summarise(Endpoint::ChatCompletions, false, CHAT),
            "openai-chat.json",
        );
        assert_matches_manifest(
            &summarise(Endpoint::Responses, false, RESPONSES),
            "openai-responses.json",
        );
        let thoughts = summarise(Endpoint::Responses, false, RESPONSES).thoughts;
        assert!(thoughts
            .iter()
            .all(|t| t.source == ThoughtSource::ReasoningSummary));
    }

    #[test]
    fn stream_fixtures_match_manifest_and_their_twins() {
        let chat = summarise(Endpoint::ChatCompletions, true, CHAT_STREAM);
        assert_matches_manifest(&chat, "openai-chat-stream.sse");
        assert_eq!(
            content(chat.clone()),
            content(summarise(Endpoint::ChatCompletions, false, CHAT))
        );

        let tools = summarise(Endpoint::ChatCompletions, true, CHAT_TOOLS_STREAM);
        assert_matches_manifest(&tools, "openai-chat-tools-stream.sse");
        // OpenAI arguments are kept verbatim, as the model produced them.
        assert_eq!(
            tools.tool_calls[0].input,
            r#"{"path": "src/main.rs", "start_line": 1, "end_line": 40}"#
        );

        let responses = summarise(Endpoint::Responses, true, RESPONSES_STREAM);
        assert_matches_manifest(&responses, "openai-responses-stream.sse");
        assert_eq!(
            content(responses.clone()),
            content(summarise(Endpoint::Responses, false, RESPONSES))
        );
        // What each carried and that each ended.
        assert!(responses.ended && chat.ended);
        assert_eq!(chat.output_bytes, 78, "the content deltas");
        assert_eq!(
            summarise(Endpoint::ChatCompletions, false, CHAT).output_bytes,
            CHAT.len() as u64,
            "a blocking body is all output"
        );
    }

    #[test]
    fn streams_rechunked_anywhere_give_the_same_summary() {
        assert_rechunking_invariant(&OpenAi::FULL, Endpoint::ChatCompletions, CHAT_STREAM);
        assert_rechunking_invariant(&OpenAi::FULL, Endpoint::ChatCompletions, CHAT_TOOLS_STREAM);
        assert_rechunking_invariant(&OpenAi::FULL, Endpoint::Responses, RESPONSES_STREAM);
    }

    #[test]
    fn crlf_and_comment_variants_give_the_same_summary() {
        for (endpoint, stream) in [
            (Endpoint::ChatCompletions, CHAT_STREAM),
            (Endpoint::ChatCompletions, CHAT_TOOLS_STREAM),
            (Endpoint::Responses, RESPONSES_STREAM),
        ] {
            let whole = summarise(endpoint, true, stream);
            assert_eq!(summarise(endpoint, true, &with_crlf(stream)), whole);
            assert_eq!(summarise(endpoint, true, &with_comments(stream)), whole);
            let crlf = with_crlf(stream);
            assert_eq!(
                summarise_chunks(&OpenAi::FULL, endpoint, true, crlf.chunks(7)),
                whole
            );
        }
    }

    #[test]
    fn chat_stream_cut_mid_tool_call() {
        let cut = cut_before(CHAT_TOOLS_STREAM, "\"arguments\":\"rkspace\"");
        let summary = summarise(Endpoint::ChatCompletions, true, &cut);
        assert_eq!(summary.usage, None);
        assert_eq!(summary.response_id.as_deref(), Some("chatcmpl-TG0002"));
        assert_eq!(summary.tool_calls.len(), 2);
        assert_eq!(summary.tool_calls[1].id, "call_tgB2");
        assert_eq!(summary.tool_calls[1].name, "run_command");
        assert_eq!(
            summary.tool_calls[1].input,
            r#"{"command": "cargo test --wo"#
        );

        // Cut inside an event: the partial event is not used.
        let mid_event = &CHAT_TOOLS_STREAM[..cut.len() + 40];
        assert_eq!(
            summarise(Endpoint::ChatCompletions, true, mid_event),
            summary
        );
    }

    #[test]
    fn chat_stream_without_usage_chunk() {
        let cut = cut_before(CHAT_STREAM, "\"choices\":[]");
        let mut without_usage = cut.clone();
        without_usage.extend_from_slice(b"data: [DONE]\n\n");
        let summary = summarise(Endpoint::ChatCompletions, true, &without_usage);
        assert_eq!(summary.usage, None);
        assert_eq!(summary.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(summary.response_id.as_deref(), Some("chatcmpl-TG0001"));
    }

    /// The narrow reading of a chat body summarises exactly as the whole-body `Value` does, and
    /// declines (so the whole body is parsed) whatever it cannot read the same way.
    #[test]
    fn chat_body_parts_summarise_as_the_whole_body() {
        let bodies: Vec<&[u8]> = vec![
            CHAT,
            br#"{"id":"chatcmpl-9","model":"gpt-4.1","choices":[
                {"index":0,"message":{"role":"assistant","content":"x","tool_calls":[
                    {"id":"call_1","type":"function","function":{"name":"read","arguments":"{}"}}]}},
                {"index":1,"message":null},{"index":2},{"message":{"tool_calls":null}}],
                "usage":{"prompt_tokens":10,"completion_tokens":5,
                    "prompt_tokens_details":{"cached_tokens":4},
                    "completion_tokens_details":{"reasoning_tokens":2}}}"#,
            br#"{"id":null,"model":7,"usage":"none","choices":null}"#,
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":{"prompt_tokens":-3,"completion_tokens":2.0,"total_tokens":"9",
                "prompt_tokens_details":{"cached_tokens":[1]},
                "completion_tokens_details":{"reasoning_tokens":{"a":1}}}}"#,
            br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":null,
                "completion_tokens_details":7}}"#,
            br#"{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":true}}"#,
            br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":4,"prompt_tokens_details":{"cached_tokens":9}}}"#,
            br#"{"usage":{"prompt_tokens":4,"prompt_tokens_details":[9]},"choices":[[{}]]}"#,
            br#"["chatcmpl-1","gpt-4o",{"prompt_tokens":4}]"#,
            br#"{"id":"a","id":"b","choices":[]}"#,
            br#"{"choices":[1,2]}"#,
            br#"{"choices":{"0":{"message":{}}}}"#,
            br#"{"choices":[{"message":"text"}]}"#,
            br#"{"choices":[{"message":{"tool_calls":[{"id":1}]}}]}"#,
            br#"[1,2,3]"#,
            br#"{"id":"x"} trailing"#,
            b"not json",
            b"",
        ];
        for body in bodies {
            let whole = serde_json::from_slice::<Value>(body)
                .map(|v| chat_summary(&v))
                .unwrap_or_default();
            let mut parser = response_parser(Endpoint::ChatCompletions, false);
            parser.feed(body);
            assert_eq!(
                content(parser.finish()),
                whole,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(
            chat_body_summary(CHAT).is_some(),
            "the usual body is read narrowly"
        );
        assert!(chat_body_summary(br#"{"id":"a","id":"b"}"#).is_none());
    }

    #[test]
    fn chat_blocking_body_with_tool_calls() {
        let body = br#"{"id":"chatcmpl-9","model":"gpt-4.1","choices":[
            {"index":0,"message":{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"read","arguments":"{\"p\":1}"}},
                {"id":"call_2","type":"function","function":{"name":"write","arguments":"{}"}}]}}],
            "usage":{"prompt_tokens":10,"completion_tokens":5}}"#;
        let summary = summarise(Endpoint::ChatCompletions, false, body);
        assert_eq!(
            summary,
            ResponseSummary {
                response_id: Some("chatcmpl-9".into()),
                model: Some("gpt-4.1".into()),
                usage: Some(TokenUsage {
                    input: 10,
                    output: 5,
                    ..TokenUsage::default()
                }),
                tool_calls: vec![
                    ToolCall {
                        id: "call_1".into(),
                        name: "read".into(),
                        input: r#"{"p":1}"#.into()
                    },
                    ToolCall {
                        id: "call_2".into(),
                        name: "write".into(),
                        input: "{}".into()
                    },
                ],
                thoughts: vec![],
                output_bytes: body.len() as u64,
                ended: true,
                partial_usage: None,
            }
        );
    }

    #[test]
    fn cached_tokens_above_prompt_tokens_saturate() {
        let body = br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":9}}}"#;
        let usage = summarise(Endpoint::ChatCompletions, false, body)
            .usage
            .unwrap();
        assert_eq!((usage.input, usage.cache_read), (0, 9));
    }

    #[test]
    fn responses_stream_cut_before_completed() {
        let cut = cut_before(RESPONSES_STREAM, "\"delta\":\" test \"");
        let summary = summarise(Endpoint::Responses, true, &cut);
        assert_eq!(summary.usage, None);
        assert_eq!(summary.response_id.as_deref(), Some("resp_tg0001"));
        assert_eq!(summary.model.as_deref(), Some("gpt-5-2025-08-07"));
        assert_eq!(
            summary.tool_calls,
            vec![ToolCall {
                id: "call_tgR1".into(),
                name: "shell".into(),
                input: r#"{"command": "cargo"#.into()
            }]
        );
        assert_eq!(
            summary.thoughts,
            summarise(Endpoint::Responses, false, RESPONSES).thoughts
        );

        // Cut after the last item is done: everything but usage.
        let nearly = cut_before(RESPONSES_STREAM, "\"type\":\"response.completed\"");
        let summary = summarise(Endpoint::Responses, true, &nearly);
        let blocking = summarise(Endpoint::Responses, false, RESPONSES);
        assert!(!summary.ended, "no terminal event");
        assert!(summary.output_bytes > 0, "but output was streamed");
        assert_eq!(
            content(summary),
            content(ResponseSummary {
                usage: None,
                ..blocking
            })
        );

        // Cut mid reasoning summary: the thought so far.
        let early = cut_before(RESPONSES_STREAM, "\"delta\":\"n the Cargo \"");
        let thoughts = summarise(Endpoint::Responses, true, &early).thoughts;
        assert_eq!(thoughts.len(), 1);
        assert_eq!(thoughts[0].content, "Checking the failing test first, the");
        assert!(summarise(Endpoint::Responses, true, &early)
            .tool_calls
            .is_empty());
    }

    #[test]
    fn responses_terminal_event_wins_over_deltas() {
        let stream = br#"event: response.output_item.added
data: {"type":"response.output_item.added","output_index":0,"item":{"id":"fc_1","type":"function_call","call_id":"call_x","name":"shell","arguments":""}}

data: {"type":"response.function_call_arguments.delta","item_id":"fc_1","delta":"{\"a\":"}

data: {"type":"response.incomplete","response":{"id":"resp_2","model":"gpt-5","output":[{"type":"function_call","call_id":"call_y","name":"edit","arguments":"{}"}],"usage":{"input_tokens":3,"output_tokens":4}}}

"#;
        let summary = summarise(Endpoint::Responses, true, stream);
        assert_eq!(summary.response_id.as_deref(), Some("resp_2"));
        assert_eq!(
            summary.tool_calls,
            vec![ToolCall {
                id: "call_y".into(),
                name: "edit".into(),
                input: "{}".into()
            }]
        );
        assert_eq!(
            summary.usage,
            Some(TokenUsage {
                input: 3,
                output: 4,
                ..TokenUsage::default()
            })
        );

        // Without the terminal event, the delta found its item by `item_id`.
        let cut = cut_before(stream, "response.incomplete");
        let summary = summarise(Endpoint::Responses, true, &cut);
        assert_eq!(summary.tool_calls[0].input, "{\"a\":");
        assert_eq!(summary.usage, None);
    }

    #[test]
    fn error_bodies_and_garbage_give_empty_summaries() {
        for streaming in [false, true] {
            for endpoint in [
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Messages,
            ] {
                for body in [
                    RATE_LIMIT,
                    b"\xff\xfe\x00garbage\n\ndata: {\"id\":\n\n",
                    b"<html>502</html>",
                ] {
                    let summary = summarise(endpoint, streaming, body);
                    assert_eq!(summary.usage, None);
                    assert!(summary.tool_calls.is_empty());
                }
            }
        }
        let hostile = b"data: {\"choices\":[{\"index\":18446744073709551615,\"delta\":{\"tool_calls\":[{\"index\":-1,\"function\":{\"arguments\":5}}]}}],\"usage\":{\"prompt_tokens\":-3}}\n\n\
data: {\"type\":\"response.reasoning_summary_text.delta\",\"output_index\":0,\"summary_index\":99,\"delta\":\"x\"}\n\n\
data: {\"type\":\"response.completed\",\"response\":[]}\n\n";
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Responses] {
            let _ = summarise(endpoint, true, hostile);
        }
    }

    #[test]
    fn blocking_body_over_the_cap_is_not_parsed() {
        let mut parser = OpenAi::FULL.response_parser(Endpoint::ChatCompletions, false);
        let filler = vec![b' '; 1 << 20];
        parser.feed(b"{\"id\":\"x\",");
        for _ in 0..33 {
            parser.feed(&filler);
        }
        parser.feed(b"\"usage\":{\"prompt_tokens\":1}}");
        let summary = parser.finish();
        assert_eq!(content(summary.clone()), ResponseSummary::default());
        // Not parsed, but every byte counts towards an output estimate.
        assert_eq!(summary.output_bytes, 10 + 33 * (1 << 20) + 28);
        assert!(!summary.ended);
    }

    #[test]
    fn text_budget_cuts_at_character_boundaries() {
        let mut budget = TextBudget { remaining: 4 };
        let mut text = String::new();
        budget.append(&mut text, "ab✓cd");
        assert_eq!(text, "ab");
        budget.append(&mut text, "cd");
        assert_eq!(text, "abcd");
        budget.append(&mut text, "e");
        assert_eq!(text, "abcd");
        budget.replace(&mut text, "z");
        assert_eq!(text, "abcd");
    }

    /// JSON trees built from the keys a chat summary reads (and a few it does not), with every
    /// kind of value at every place: the shapes a narrow reading could get wrong.
    fn chat_shaped_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e3f64..1e3).prop_map(Value::from),
            "[a-z0-9_-]{0,6}".prop_map(Value::from),
        ];
        let keys = prop_oneof![
            Just("id"),
            Just("model"),
            Just("usage"),
            Just("choices"),
            Just("message"),
            Just("tool_calls"),
            Just("function"),
            Just("name"),
            Just("arguments"),
            Just("prompt_tokens"),
            Just("completion_tokens"),
            Just("prompt_tokens_details"),
            Just("cached_tokens"),
            Just("completion_tokens_details"),
            Just("reasoning_tokens"),
            Just("content"),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((keys.clone(), inner), 0..6).prop_map(|entries| {
                    Value::Object(
                        entries
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect(),
                    )
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn chat_bodies_of_any_shape_summarise_as_the_whole_body(
            entries in proptest::collection::vec(("id|model|usage|choices|object", chat_shaped_json()), 0..5),
        ) {
            let body = Value::Object(entries.into_iter().collect());
            let text = serde_json::to_vec(&body).unwrap();
            let mut parser = response_parser(Endpoint::ChatCompletions, false);
            parser.feed(&text);
            prop_assert_eq!(content(parser.finish()), chat_summary(&body));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..400),
            split in any::<usize>(),
        ) {
            let (a, b) = body.split_at(split % (body.len() + 1));
            for streaming in [false, true] {
                for endpoint in [Endpoint::ChatCompletions, Endpoint::Responses] {
                    summarise_chunks(&OpenAi::FULL, endpoint, streaming, [a, b]);
                }
            }
            let mut stripper = UsageChunkStripper::new();
            let mut out = stripper.push(a).to_vec();
            out.extend_from_slice(&stripper.push(b));
            out.extend_from_slice(&stripper.finish());
            // Nothing in random bytes is a usage chunk, so nothing may be lost.
            prop_assert_eq!(out, body);
        }

        #[test]
        fn fixture_streams_split_anywhere_parse_alike(
            which in 0..3usize,
            points in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let (endpoint, stream) = [
                (Endpoint::ChatCompletions, CHAT_STREAM),
                (Endpoint::ChatCompletions, CHAT_TOOLS_STREAM),
                (Endpoint::Responses, RESPONSES_STREAM),
            ][which];
            let mut points: Vec<usize> = points.into_iter().map(|p| p % (stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for point in points {
                chunks.push(&stream[start..point]);
                start = point;
            }
            chunks.push(&stream[start..]);
            prop_assert_eq!(
                summarise_chunks(&OpenAi::FULL, endpoint, true, chunks),
                summarise(endpoint, true, stream)
            );
        }
    }

    // -- UsageChunkStripper ----------------------------------------------------------------------

    fn strip_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut stripper = UsageChunkStripper::new();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&stripper.push(chunk));
        }
        out.extend_from_slice(&stripper.finish());
        out
    }

    /// The stream with its usage-only event (and that event's blank line) removed.
    fn without_usage_event(stream: &[u8], separator: &str) -> Vec<u8> {
        let text = std::str::from_utf8(stream).unwrap();
        let mut kept = String::new();
        for event in text.split_inclusive(&format!("{separator}{separator}")) {
            if !event.contains("\"choices\":[],\"usage\":{") {
                kept.push_str(event);
            }
        }
        assert!(kept.len() < text.len(), "the fixture has a usage chunk");
        kept.into_bytes()
    }

    #[test]
    fn stripper_removes_only_the_usage_chunk_at_every_split() {
        for (stream, separator) in [
            (CHAT_STREAM.to_vec(), "\n"),
            (CHAT_TOOLS_STREAM.to_vec(), "\n"),
            (with_crlf(CHAT_STREAM), "\r\n"),
            (
                String::from_utf8(CHAT_STREAM.to_vec())
                    .unwrap()
                    .replace('\n', "\r")
                    .into_bytes(),
                "\r",
            ),
        ] {
            let expected = without_usage_event(&stream, separator);
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                assert_eq!(strip_chunks([a, b]), expected, "split at {split}");
            }
            assert_eq!(strip_chunks(stream.chunks(1)), expected);
            // Whatever was stripped, the client still gets a complete, parseable stream.
            let summary = summarise(Endpoint::ChatCompletions, true, &expected);
            assert_eq!(summary.usage, None);
        }
    }

    #[test]
    fn stripper_holds_incomplete_events_until_they_end() {
        let mut stripper = UsageChunkStripper::new();
        assert_eq!(
            &stripper.push(b"data: {\"choices\":[{}]}\n\ndata: {\"cho")[..],
            b"data: {\"choices\":[{}]}\n\n"
        );
        assert_eq!(
            &stripper.push(b"ices\":[],\"usage\":{\"prompt_tokens\":1}}\n")[..],
            b""
        );
        assert_eq!(
            &stripper.push(b"\n: keep-alive\n\ndata: [DONE]\n\ndata: tail")[..],
            b": keep-alive\n\ndata: [DONE]\n\n"
        );
        assert_eq!(&stripper.finish()[..], b"data: tail");
    }

    #[test]
    fn stripper_keeps_chunks_with_choices_or_null_usage() {
        let stream: &[u8] = b"data: {\"choices\":[],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0}],\"usage\":{\"prompt_tokens\":1}}\n\n\
data: {\"usage\":{\"prompt_tokens\":1}}\n\n\
event: x\ndata: not json\n\n";
        assert_eq!(strip_chunks([stream]), stream);
    }

    #[test]
    fn stripper_forwards_large_events_without_holding_them() {
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(100_000)
        );
        let mut stripper = UsageChunkStripper::new();
        let (a, b) = big.as_bytes().split_at(70_000);
        assert_eq!(stripper.push(a).len(), 70_000);
        assert_eq!(&stripper.push(b)[..], b);
        assert_eq!(
            &stripper.push(b"data: {\"choices\":[],\"usage\":{}}\r")[..],
            b""
        );
        assert_eq!(&stripper.push(b"\r")[..], b"");
        assert_eq!(
            &stripper.push(b"\ndata: [DONE]\n\n")[..],
            b"data: [DONE]\n\n"
        );
        assert_eq!(&stripper.finish()[..], b"");
    }
}
