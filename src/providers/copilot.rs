//! GitHub Copilot's API (api.githubcopilot.com, api.individual.githubcopilot.com, …): OpenAI's
//! Chat Completions and Responses JSON, served without the `/v1` prefix.
//!
//! Only the routes and the credential differ from OpenAI; request and response parsing is
//! OpenAI's. The client's own `Authorization` (its GitHub Copilot token) goes upstream unchanged.
//!
//! Not for: the Copilot token exchange or editor-specific headers; clients are recognised in
//! `crate::clients`.

use http::Method;

use super::openai;
use super::{
    CredentialHeader, Endpoint, ParsedRequest, Provider, RequestError, ResponseParser, RouteMatch,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copilot;

impl Provider for Copilot {
    fn route(&self, method: &Method, path: &str) -> RouteMatch {
        if *method == Method::POST {
            match path {
                "/chat/completions" => RouteMatch::Intercept(Endpoint::ChatCompletions),
                "/responses" => RouteMatch::Intercept(Endpoint::Responses),
                _ => RouteMatch::NotFound,
            }
        } else if *method == Method::GET && path == "/models" {
            RouteMatch::Passthrough
        } else {
            RouteMatch::NotFound
        }
    }

    fn parse_request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
    ) -> Result<ParsedRequest, RequestError> {
        match endpoint {
            Endpoint::Responses => openai::parse_responses_request(body),
            Endpoint::ChatCompletions | Endpoint::Messages => openai::parse_chat_request(body),
        }
    }

    fn rewrite_request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        parsed: &ParsedRequest,
    ) -> Option<Vec<u8>> {
        openai::rewrite_request(endpoint, body, parsed)
    }

    fn response_parser(&self, endpoint: Endpoint, streaming: bool) -> Box<dyn ResponseParser> {
        openai::response_parser(endpoint, streaming)
    }

    fn credential_header(&self) -> CredentialHeader {
        CredentialHeader::ClientAuthorization
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::tests::{assert_matches_manifest, content, summarise_chunks};
    use crate::providers::OpenAi;

    const CHAT_TOOLS_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/openai-chat-tools-stream.sse");
    const RESPONSES_STREAM: &[u8] =
        include_bytes!("../../tests/fixtures/openai-responses-stream.sse");
    const RESPONSES: &[u8] = include_bytes!("../../tests/fixtures/openai-responses.json");

    #[test]
    fn routes_have_no_v1_prefix() {
        let cases = [
            (
                Method::POST,
                "/chat/completions",
                RouteMatch::Intercept(Endpoint::ChatCompletions),
            ),
            (
                Method::POST,
                "/responses",
                RouteMatch::Intercept(Endpoint::Responses),
            ),
            (Method::GET, "/models", RouteMatch::Passthrough),
            (Method::POST, "/v1/chat/completions", RouteMatch::NotFound),
            (Method::GET, "/models/gpt-4o", RouteMatch::NotFound),
            (Method::GET, "/chat/completions", RouteMatch::NotFound),
            (Method::POST, "/embeddings", RouteMatch::NotFound),
        ];
        for (method, path, expected) in cases {
            assert_eq!(Copilot.route(&method, path), expected, "{method} {path}");
        }
        assert_eq!(
            Copilot.credential_header(),
            CredentialHeader::ClientAuthorization
        );
    }

    #[test]
    fn requests_parse_and_rewrite_like_openai() {
        let chat =
            br#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let parsed = Copilot
            .parse_request(Endpoint::ChatCompletions, chat)
            .unwrap();
        assert_eq!(
            parsed,
            OpenAi::FULL
                .parse_request(Endpoint::ChatCompletions, chat)
                .unwrap()
        );
        let rewritten = Copilot
            .rewrite_request(Endpoint::ChatCompletions, chat, &parsed)
            .unwrap();
        assert!(
            Copilot
                .parse_request(Endpoint::ChatCompletions, &rewritten)
                .unwrap()
                .client_requested_usage
        );

        let responses = br#"{"model":"gpt-5","stream":true,"input":"go"}"#;
        let parsed = Copilot
            .parse_request(Endpoint::Responses, responses)
            .unwrap();
        assert_eq!(parsed.last_user_prompt.as_deref(), Some("go"));
        assert_eq!(
            Copilot.rewrite_request(Endpoint::Responses, responses, &parsed),
            None
        );
    }

    #[test]
    fn responses_parse_like_openai() {
        let tools = summarise_chunks(
            &Copilot,
            Endpoint::ChatCompletions,
            true,
            [CHAT_TOOLS_STREAM],
        );
        assert_matches_manifest(&tools, "openai-chat-tools-stream.sse");
        let stream = summarise_chunks(&Copilot, Endpoint::Responses, true, [RESPONSES_STREAM]);
        assert_matches_manifest(&stream, "openai-responses-stream.sse");
        assert_eq!(
            content(stream),
            content(summarise_chunks(
                &Copilot,
                Endpoint::Responses,
                false,
                [RESPONSES]
            ))
        );
    }
}
