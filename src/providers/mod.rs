//! Provider adapters: everything Tollgate knows about one provider's wire format.
//!
//! Each provider lives in its own file behind [`Provider`]: which routes it intercepts, how to read
//! a request body (model, stream flag, prompt, tool results), how to pull usage, tool calls and
//! thoughts out of a blocking JSON body or an SSE stream, how its errors look, and which header
//! carries its credential. Nothing outside this module knows a provider's JSON.
//!
//! Not here: authentication, governance, the upstream connection, or recording. Those live in
//! `gateway`, `governance` and `store`, and only see the neutral types defined below.

mod anthropic;
mod copilot;
mod openai;
mod request_body;

use std::fmt;

use http::Method;
use serde::{Deserialize, Serialize};

pub use anthropic::Anthropic;
pub use copilot::Copilot;
pub use openai::{OpenAi, UsageChunkStripper};

/// The provider kinds of the contract (`kind = ...` in a `[providers.NAME]` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    #[serde(rename = "openai")]
    OpenAi,
    Anthropic,
    #[serde(rename = "openai-compatible")]
    OpenAiCompatible,
    Copilot,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenAiCompatible => "openai-compatible",
            ProviderKind::Copilot => "copilot",
        }
    }

    /// The provider name its models carry in the price book, whose dearest model a model the
    /// book lacks is reserved at; `None`: the whole book (compatible servers, Copilot).
    pub fn price_family(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("openai"),
            ProviderKind::Anthropic => Some("anthropic"),
            ProviderKind::OpenAiCompatible | ProviderKind::Copilot => None,
        }
    }

    /// The error body shape clients of this kind understand.
    pub fn error_format(self) -> ErrorFormat {
        match self {
            ProviderKind::Anthropic => ErrorFormat::Anthropic,
            _ => ErrorFormat::OpenAi,
        }
    }

    /// The adapter for this kind.
    pub fn adapter(self) -> &'static dyn Provider {
        match self {
            ProviderKind::OpenAi => &OpenAi::FULL,
            ProviderKind::OpenAiCompatible => &OpenAi::COMPATIBLE,
            ProviderKind::Anthropic => &Anthropic,
            ProviderKind::Copilot => &Copilot,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which family of error JSON a client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFormat {
    /// `{"error":{"message":…,"type":…,"code":…}}`
    OpenAi,
    /// `{"type":"error","error":{"type":…,"message":…}}`
    Anthropic,
}

/// An API whose calls become interceptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// OpenAI Chat Completions (`/v1/chat/completions`, Copilot `/chat/completions`).
    ChatCompletions,
    /// OpenAI Responses (`POST /v1/responses`, Copilot `/responses`).
    Responses,
    /// Anthropic Messages (`/v1/messages`).
    Messages,
}

/// What a provider says about a method + path (the path after the provider prefix, with its
/// query string removed, always starting with `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    /// Intercepted: parsed, governed, priced, recorded.
    Intercept(Endpoint),
    /// Passthrough (models list, count_tokens, GET a stored response): authenticated, rate
    /// limited, counted, never priced.
    Passthrough,
    /// Not a route of this provider: 404 in the provider's error format.
    NotFound,
}

/// Where the upstream credential goes for this provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `Authorization: Bearer <key>` (OpenAI and compatibles).
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// The client's own `Authorization` is forwarded unchanged (Copilot: the GitHub token).
    ClientAuthorization,
}

/// Token counts, already normalised to the contract's meaning (`docs/contract.md#token-usage`):
/// `input` is non-cached input; `reasoning` is informational (already inside `output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

/// Where an interception's token counts come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The provider's own usage report.
    #[default]
    Reported,
    /// Tollgate's estimate: the response ended without a usage report (client or upstream
    /// cut, an unreadable or oversized body, a server that reports none) after the request
    /// reached the provider.
    Estimated,
    /// No usage: the request never reached a model, or the upstream refused it.
    #[serde(rename = "none")]
    Absent,
}

impl UsageSource {
    pub const ALL: [UsageSource; 3] = [
        UsageSource::Reported,
        UsageSource::Estimated,
        UsageSource::Absent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Absent => "none",
        }
    }
}

/// What the gateway needs from a request body before it goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens` if the client set one.
    pub max_output_tokens: Option<u64>,
    /// Text of the last user message (text parts joined with "\n"), if the last user turn has text.
    pub last_user_prompt: Option<String>,
    /// Tool-call ids answered by tool results in the *last* message(s) of the request
    /// (Anthropic `tool_result.tool_use_id`, chat `role=tool` `tool_call_id` trailing messages,
    /// Responses `function_call_output.call_id` trailing input items).
    pub tool_result_ids: Vec<String>,
    /// Anthropic `metadata.user_id` (Claude Code puts its session id in there).
    pub metadata_user_id: Option<String>,
    /// Chat Completions only: the client itself asked for `stream_options.include_usage`.
    pub client_requested_usage: bool,
    /// Chat Completions `n`: how many choices are generated (each up to the output limit).
    /// `None` when not set (one).
    pub choices: Option<u64>,
    /// What the gateway can and cannot see of the request's input (see [`InputShape`]).
    pub input: InputShape,
}

/// How much of a request's billable input is in its body, for the budget's upper bound.
///
/// Text in the body costs at most one token per byte. Inline media does not (a tiny image is
/// priced by its pixels, up to a few thousand tokens), so those parts are counted. Some input
/// is not in the body at all: server-side state, files and URLs the provider fetches, tools
/// the provider runs itself. Such a request's cost has no bound the gateway can compute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputShape {
    /// Inline images and audio clips.
    pub media_parts: u32,
    /// The first reason found that the input is not all in the body.
    pub unseen: Option<UnseenInput>,
}

/// Why part of a request's input is invisible to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnseenInput {
    /// Responses `previous_response_id`, `conversation` or a stored `prompt`.
    ServerState(&'static str),
    /// An image, file or document the provider fetches by URL or file id.
    Reference(&'static str),
    /// An inline document (a PDF is priced per page, not per byte).
    Document,
    /// A tool the provider runs itself (web search, code execution, MCP, …).
    ServerTool(String),
}

impl fmt::Display for UnseenInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnseenInput::ServerState(field) => write!(f, "server-side state ({field})"),
            UnseenInput::Reference(kind) => write!(f, "a {kind} the provider fetches itself"),
            UnseenInput::Document => f.write_str("an inline document"),
            UnseenInput::ServerTool(tool) => write!(f, "a tool the provider runs ({tool})"),
        }
    }
}

/// Why a request body was refused (400 in the provider's format).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("request body has no \"model\" string")]
    MissingModel,
    /// A top-level key given twice: Tollgate reads one and the upstream may read the other, so
    /// what is priced might not be what is served.
    #[error("request body has the key \"{0}\" more than once")]
    DuplicateKey(String),
    /// Responses `background: true`: the queued response carries no usage and its later
    /// retrieval cannot be priced, so the call could never be charged.
    #[error("background responses (\"background\": true) are not supported through this gateway: their usage cannot be metered; send the request without it")]
    Background,
}

/// One tool call made by the model, arguments reassembled as the model produced them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (Anthropic `input` serialised compactly; OpenAI the
    /// `arguments` string verbatim).
    pub input: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThoughtSource {
    /// Anthropic `thinking` blocks.
    Thinking,
    /// OpenAI Responses reasoning summaries.
    ReasoningSummary,
}

impl ThoughtSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ThoughtSource::Thinking => "thinking",
            ThoughtSource::ReasoningSummary => "reasoning_summary",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thought {
    pub content: String,
    pub source: ThoughtSource,
}

/// Everything extracted from a response, complete or cut short.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseSummary {
    pub response_id: Option<String>,
    /// The model the upstream says answered (may differ from the requested alias).
    pub model: Option<String>,
    /// The provider's final usage report; `None` when none was seen (e.g. a stream cut
    /// before its usage event).
    pub usage: Option<TokenUsage>,
    /// Counts a stream reported before its final usage, when that never came (Anthropic sends
    /// input counts first and the output count last): exact where given, provisional for
    /// output.
    pub partial_usage: Option<TokenUsage>,
    pub tool_calls: Vec<ToolCall>,
    pub thoughts: Vec<Thought>,
    /// Bytes of generated output the response carried (text, tool arguments, thoughts; the
    /// whole body for a blocking response): what an estimate of output tokens starts from when
    /// the response reported no usage.
    pub output_bytes: u64,
    /// The response's own end was seen (`[DONE]`, `response.completed`, `message_stop`, or a
    /// whole blocking body).
    pub ended: bool,
}

/// Incremental response reader. Fed every body chunk as it passes; never blocks the stream.
pub trait ResponseParser: Send + Sync {
    /// Feed the next chunk of the response body, exactly as it came from upstream.
    fn feed(&mut self, chunk: &[u8]);
    /// What was seen so far. Called once, at the end (also after an abort: partial values).
    fn finish(&mut self) -> ResponseSummary;
    /// Whether the response's final event has been fed (streams); the gateway then knows the
    /// client has the whole answer once those bytes are written.
    fn ended(&self) -> bool {
        false
    }
}

/// One provider's wire format.
pub trait Provider: Send + Sync {
    /// Which route a method and path (after the provider prefix) is.
    fn route(&self, method: &Method, path: &str) -> RouteMatch;
    /// Reads what the gateway needs out of a request body.
    fn parse_request(&self, endpoint: Endpoint, body: &[u8])
        -> Result<ParsedRequest, RequestError>;
    /// The body to send upstream if it must differ from the client's (e.g. adding
    /// `stream_options.include_usage` to a chat stream). `None` = send the client's bytes.
    fn rewrite_request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        parsed: &ParsedRequest,
    ) -> Option<Vec<u8>>;
    /// A parser for the response of `endpoint`; `streaming` when the response is `text/event-stream`.
    fn response_parser(&self, endpoint: Endpoint, streaming: bool) -> Box<dyn ResponseParser>;
    /// Where the upstream credential goes.
    fn credential_header(&self) -> CredentialHeader;
}
