//! Reading a request body the way every provider's requests are read: one JSON object whose
//! top-level keys each appear once, and what its input is made of.
//!
//! Two rules live here because a member could otherwise spend past their cap with them:
//! - A top-level key given twice (`{"model":"cheap",…,"model":"expensive"}`) is refused. JSON
//!   parsers disagree on which of the two wins, so Tollgate could price one model while the
//!   upstream serves the other.
//! - [`input_shape`] says how much of the billable input is in the body: text costs at most a
//!   token per byte, inline media is counted part by part, and input the provider fetches or
//!   holds itself (server-side state, URLs and file ids, documents, server-run tools) makes the
//!   request's cost unbounded as far as the gateway can tell.
//!
//! Not here: the fields each API reads (its provider file), or what the budget does with the
//! shape (`governance`).

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::{InputShape, ParsedRequest, RequestError, UnseenInput};

/// Reads the part of a request every endpoint shares: a JSON object with a non-empty `model`
/// string and an optional `stream` flag, each top-level key at most once. An empty model is
/// treated as missing: nothing can be routed or priced under it.
pub(super) fn parse_request_object(
    body: &[u8],
) -> Result<(Map<String, Value>, ParsedRequest), RequestError> {
    let mut duplicate = None;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = TopLevel {
        duplicate: &mut duplicate,
    }
    .deserialize(&mut deserializer)
    .and_then(|object| deserializer.end().map(|()| object));
    let object = match (parsed, duplicate) {
        (_, Some(key)) => return Err(RequestError::DuplicateKey(key)),
        (Ok(Some(object)), None) => object,
        (Ok(None), None) => return Err(RequestError::NotObject),
        (Err(e), None) => return Err(RequestError::NotJson(e.to_string())),
    };
    let model = object
        .get("model")
        .and_then(Value::as_str)
        .filter(|model| !model.is_empty())
        .ok_or(RequestError::MissingModel)?
        .to_owned();
    let stream = object
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let input = input_shape(&object);
    Ok((
        object,
        ParsedRequest {
            model,
            stream,
            input,
            ..ParsedRequest::default()
        },
    ))
}

/// The body's top level: `Some(object)` with unique keys, `None` for any other JSON value. A
/// repeated key is written to `duplicate` (and ends the parse with an error).
struct TopLevel<'a> {
    duplicate: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = Option<Map<String, Value>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            let value: Value = access.next_value()?;
            if object.contains_key(&key) {
                let message = format!("duplicate key {key:?}");
                *self.duplicate = Some(key);
                return Err(de::Error::custom(message));
            }
            object.insert(key, value);
        }
        Ok(Some(object))
    }

    // Any other value parses (so a body of `[]` is "not an object", not "not JSON") and is
    // thrown away.
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        while access.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Top-level keys holding input the provider keeps on its side.
const SERVER_STATE_KEYS: [&str; 4] = [
    "previous_response_id",
    "conversation",
    "prompt",
    "container",
];

/// Tool `type` prefixes of tools the provider runs itself, whose results become input the
/// gateway never sees (OpenAI and Anthropic names).
const SERVER_TOOL_PREFIXES: [&str; 8] = [
    "web_search",
    "web_fetch",
    "code_execution",
    "code_interpreter",
    "file_search",
    "image_generation",
    "mcp",
    "tool_search",
];

/// Keys under which a request carries its conversation (messages, instructions, tool results).
const CONTENT_KEYS: [&str; 3] = ["messages", "input", "system"];

/// Deeper than any real message nests its parts; a hostile body cannot make the walk long.
const MAX_DEPTH: usize = 16;

/// What of `request`'s input is in its body; see the module docs.
pub(super) fn input_shape(request: &Map<String, Value>) -> InputShape {
    let mut shape = InputShape::default();
    for key in SERVER_STATE_KEYS {
        let present = match request.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if present {
            // Anthropic's `prompt` does not exist and OpenAI's is a stored prompt template;
            // both `container`s hold files the gateway cannot see.
            shape.unseen = Some(UnseenInput::ServerState(key));
            return shape;
        }
    }
    if request.contains_key("web_search_options") {
        shape.unseen = Some(UnseenInput::ServerTool("web_search".into()));
        return shape;
    }
    if request
        .get("mcp_servers")
        .and_then(Value::as_array)
        .is_some_and(|servers| !servers.is_empty())
    {
        shape.unseen = Some(UnseenInput::ServerTool("mcp".into()));
        return shape;
    }
    for tool in request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or_default();
        if SERVER_TOOL_PREFIXES.iter().any(|p| kind.starts_with(p)) {
            shape.unseen = Some(UnseenInput::ServerTool(kind.chars().take(64).collect()));
            return shape;
        }
    }
    for key in CONTENT_KEYS {
        if let Some(value) = request.get(key) {
            walk_content(value, 0, &mut shape);
            if shape.unseen.is_some() {
                break;
            }
        }
    }
    shape
}

fn walk_content(value: &Value, depth: usize, shape: &mut InputShape) {
    if depth > MAX_DEPTH || shape.unseen.is_some() {
        return;
    }
    match value {
        Value::Array(items) => {
            for item in items {
                walk_content(item, depth + 1, shape);
            }
        }
        Value::Object(part) => {
            if let Some(kind) = part.get("type").and_then(Value::as_str) {
                classify_part(kind, part, shape);
            }
            for child in part.values() {
                walk_content(child, depth + 1, shape);
            }
        }
        _ => {}
    }
}

/// Counts an inline media part, or marks a part whose content the provider fetches.
fn classify_part(kind: &str, part: &Map<String, Value>, shape: &mut InputShape) {
    let text = |key: &str| part.get(key).and_then(Value::as_str);
    let inline = |url: Option<&str>| url.is_some_and(|u| u.starts_with("data:"));
    match kind {
        // Chat Completions: {"type":"image_url","image_url":{"url":…}}
        "image_url" => {
            let url = part
                .get("image_url")
                .and_then(|i| i.get("url").or(Some(i)))
                .and_then(Value::as_str);
            if inline(url) {
                shape.media_parts += 1;
            } else {
                shape.unseen = Some(UnseenInput::Reference("image"));
            }
        }
        // Responses: {"type":"input_image","image_url":…} or {"file_id":…}
        "input_image" => {
            if inline(text("image_url")) {
                shape.media_parts += 1;
            } else {
                shape.unseen = Some(UnseenInput::Reference("image"));
            }
        }
        "input_audio" => shape.media_parts += 1,
        // Chat Completions `file` and Responses `input_file`: inline data is a document,
        // anything else a reference.
        "file" | "input_file" => {
            let inline_data = text("file_data").is_some()
                || part
                    .get("file")
                    .is_some_and(|f| f.get("file_data").is_some());
            shape.unseen = Some(if inline_data {
                UnseenInput::Document
            } else {
                UnseenInput::Reference("file")
            });
        }
        // Anthropic: {"type":"image"|"document","source":{"type":"base64"|"url"|"file"|"text"}}
        "image" | "document" => {
            let source = part
                .get("source")
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str);
            match (kind, source) {
                ("image", Some("base64")) => shape.media_parts += 1,
                ("document", Some("text" | "content")) => {}
                ("document", Some("base64")) => shape.unseen = Some(UnseenInput::Document),
                (_, _) => {
                    shape.unseen = Some(UnseenInput::Reference(if kind == "image" {
                        "image"
                    } else {
                        "document"
                    }))
                }
            }
        }
        "container_upload" => shape.unseen = Some(UnseenInput::Reference("file")),
        // Responses: an earlier output item named by id only.
        "item_reference" => shape.unseen = Some(UnseenInput::ServerState("item_reference")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(body: &str) -> InputShape {
        parse_request_object(body.as_bytes()).unwrap().1.input
    }

    #[test]
    fn repeated_top_level_keys_are_refused_whichever_they_are() {
        for body in [
            r#"{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}"#,
            r#"{"model":"a","max_tokens":1,"max_tokens":100000}"#,
            r#"{"model":"a","stream":false,"stream":true}"#,
            r#"{"model":"a","mo\u0064el":"b"}"#,
            r#"{"model":"a","anything":1,"anything":2}"#,
        ] {
            let err = parse_request_object(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, RequestError::DuplicateKey(_)),
                "{body}: {err}"
            );
        }
        assert_eq!(
            parse_request_object(br#"{"model":"a","x":1,"model":"b"}"#).unwrap_err(),
            RequestError::DuplicateKey("model".into())
        );
        // Nested objects may repeat keys of the top level, and their own keys are theirs.
        let (_, parsed) =
            parse_request_object(br#"{"model":"a","metadata":{"model":"b"},"messages":[{"role":"user"},{"role":"user"}]}"#)
                .unwrap();
        assert_eq!(parsed.model, "a");
    }

    #[test]
    fn other_shapes_keep_their_errors() {
        assert_eq!(
            parse_request_object(b"[]").unwrap_err(),
            RequestError::NotObject
        );
        assert_eq!(
            parse_request_object(b"\"x\"").unwrap_err(),
            RequestError::NotObject
        );
        assert!(matches!(
            parse_request_object(b"{\"model\":").unwrap_err(),
            RequestError::NotJson(_)
        ));
        assert!(matches!(
            parse_request_object(b"{\"model\":\"a\"} {}").unwrap_err(),
            RequestError::NotJson(_)
        ));
        assert_eq!(
            parse_request_object(b"{\"model\":\"\"}").unwrap_err(),
            RequestError::MissingModel
        );
    }

    #[test]
    fn text_only_requests_are_bounded() {
        let s = shape(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"file":{"type":"string"}}}}},
                         {"name":"bash","input_schema":{"type":"object"}},{"type":"custom","name":"apply_patch"},
                         {"type":"bash_20250124","name":"bash"}]}"#,
        );
        assert_eq!(s, InputShape::default());
    }

    #[test]
    fn inline_media_is_counted() {
        let s = shape(
            r#"{"model":"m","messages":[{"role":"user","content":[
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
                {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}},
                {"type":"tool_result","content":[{"type":"image","source":{"type":"base64","data":"AA"}}]}]}]}"#,
        );
        assert_eq!(s.media_parts, 3);
        assert_eq!(s.unseen, None);
        let s = shape(
            r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"data:image/png;base64,AA"}]}]}"#,
        );
        assert_eq!((s.media_parts, s.unseen), (1, None));
    }

    #[test]
    fn input_the_provider_holds_or_fetches_is_unseen() {
        let cases = [
            (
                r#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#,
                UnseenInput::ServerState("previous_response_id"),
            ),
            (
                r#"{"model":"m","input":"hi","conversation":{"id":"conv_1"}}"#,
                UnseenInput::ServerState("conversation"),
            ),
            (
                r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#,
                UnseenInput::ServerState("prompt"),
            ),
            (
                r#"{"model":"m","messages":[],"container":"cntr_1"}"#,
                UnseenInput::ServerState("container"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
                UnseenInput::Reference("image"),
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","file_id":"file_1"}]}]}"#,
                UnseenInput::Reference("image"),
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_url":"https://x/a.pdf"}]}]}"#,
                UnseenInput::Reference("file"),
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_data":"data:application/pdf;base64,AA"}]}]}"#,
                UnseenInput::Document,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file_1"}}]}]}"#,
                UnseenInput::Reference("file"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"base64","data":"AA"}}]}]}"#,
                UnseenInput::Document,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://x"}}]}]}"#,
                UnseenInput::Reference("document"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image","source":{"type":"file","file_id":"f"}}]}]}"#,
                UnseenInput::Reference("image"),
            ),
            (
                r#"{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}"#,
                UnseenInput::ServerState("item_reference"),
            ),
            (
                r#"{"model":"m","messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
                UnseenInput::ServerTool("web_search_20250305".into()),
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"file_search","vector_store_ids":["vs_1"]}]}"#,
                UnseenInput::ServerTool("file_search".into()),
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"mcp","server_url":"https://x"}]}"#,
                UnseenInput::ServerTool("mcp".into()),
            ),
            (
                r#"{"model":"m","messages":[],"web_search_options":{}}"#,
                UnseenInput::ServerTool("web_search".into()),
            ),
            (
                r#"{"model":"m","messages":[],"mcp_servers":[{"url":"https://x"}]}"#,
                UnseenInput::ServerTool("mcp".into()),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(shape(body).unseen, Some(expected), "{body}");
        }
        // Explicit nulls and empty strings are absent.
        let s = shape(
            r#"{"model":"m","input":"x","previous_response_id":null,"conversation":"","mcp_servers":[]}"#,
        );
        assert_eq!(s.unseen, None);
    }

    #[test]
    fn deep_nesting_ends_the_walk_without_panicking() {
        let deep = format!(
            r#"{{"model":"m","messages":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(shape(&deep), InputShape::default());
    }
}
