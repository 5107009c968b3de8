//! Recognising which coding tool sent a request, and which of its sessions it belongs to, from
//! request headers (and, for Claude Code, `metadata.user_id`).
//!
//! Recognition is best effort and only labels traffic for reports: nothing is allowed or refused
//! because of it, since every header here is trivially forged.
//!
//! Not for: authenticating anyone, or reading request bodies (the provider adapters hand over
//! `metadata.user_id`).

use std::fmt;

use http::HeaderMap;
use serde_json::Value;

/// Longest session id kept; longer values are cut, so a client cannot bloat every stored row.
const MAX_SESSION_ID_CHARS: usize = 256;

/// A coding tool Tollgate recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    ClaudeCode,
    Codex,
    CopilotVsCode,
    CopilotCli,
    Cursor,
    OpenCode,
    Zed,
    RooCode,
    KiloCode,
    Unknown,
}

impl Client {
    pub fn as_str(&self) -> &'static str {
        match self {
            Client::ClaudeCode => "Claude Code",
            Client::Codex => "Codex",
            Client::CopilotVsCode => "GitHub Copilot (VS Code)",
            Client::CopilotCli => "GitHub Copilot CLI",
            Client::Cursor => "Cursor",
            Client::OpenCode => "OpenCode",
            Client::Zed => "Zed",
            Client::RooCode => "Roo Code",
            Client::KiloCode => "Kilo Code",
            Client::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client and, when it says, its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client: Client,
    pub session_id: Option<String>,
}

/// Recognises the client and its session id.
///
/// Session ids come from, in order: `X-Tollgate-Session` (any client, for tools Tollgate does not
/// know), `X-Claude-Code-Session-Id`, then the recognised client's own source: Claude Code's
/// `metadata.user_id`, Codex's `session-id`/`session_id`, Copilot's `x-interaction-id` then
/// `X-Client-Session-Id`, OpenCode's `X-OpenCode-Session`. Client-specific sources are only read
/// for that client, so a generic header from an unrelated tool is not mistaken for a session.
/// Values that are empty or not printable ASCII are skipped; long ones are cut to 256 characters.
pub fn identify(headers: &HeaderMap, metadata_user_id: Option<&str>) -> ClientInfo {
    let client = recognise_client(headers);
    let session_id = session_id(headers, client, metadata_user_id);
    ClientInfo { client, session_id }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn header_contains(headers: &HeaderMap, name: &str, lowercase_needle: &str) -> bool {
    header(headers, name).is_some_and(|value| value.to_ascii_lowercase().contains(lowercase_needle))
}

fn header_is(headers: &HeaderMap, name: &str, expected: &str) -> bool {
    header(headers, name).is_some_and(|value| value.trim().eq_ignore_ascii_case(expected))
}

/// The User-Agent is the most specific signal and is checked first: some tools borrow another
/// tool's headers (OpenCode sends Claude Code's `anthropic-beta` when signed in with a Claude
/// subscription) but keep their own User-Agent.
fn recognise_client(headers: &HeaderMap) -> Client {
    user_agent_client(header(headers, "user-agent").unwrap_or_default())
        .unwrap_or_else(|| header_client(headers))
}

fn user_agent_client(user_agent: &str) -> Option<Client> {
    let ua = user_agent.to_ascii_lowercase();
    let client = if ua.contains("claude-cli/") {
        Client::ClaudeCode
    } else if ua.starts_with("codex") || ua.contains("codex_cli_rs") {
        // codex_cli_rs, codex_vscode, codex_exec: all Codex.
        Client::Codex
    } else if ua.contains("kilo-code") || ua.contains("kilocode") {
        // Kilo Code is a fork of Roo Code: checked first in case it keeps Roo's marks.
        Client::KiloCode
    } else if ua.contains("roocode") || ua.contains("roo-code") {
        Client::RooCode
    } else if ua.contains("githubcopilotchat/") {
        Client::CopilotVsCode
    } else if ua.contains("copilot-cli") || ua.starts_with("copilot/") {
        Client::CopilotCli
    } else if ua.contains("cursor") {
        Client::Cursor
    } else if ua.contains("opencode") {
        Client::OpenCode
    } else if user_agent.starts_with("Zed/") || user_agent.contains(" Zed/") {
        // Case-sensitive: "zed/" in lower case ends many unrelated words.
        Client::Zed
    } else {
        return None;
    };
    Some(client)
}

fn header_client(headers: &HeaderMap) -> Client {
    if headers.contains_key("x-claude-code-session-id")
        || header_is(headers, "x-app", "cli")
        || header_contains(headers, "anthropic-beta", "claude-code")
    {
        Client::ClaudeCode
    } else if header(headers, "originator")
        .is_some_and(|o| o.trim().to_ascii_lowercase().starts_with("codex"))
    {
        Client::Codex
    } else if header_is(headers, "x-title", "Kilo Code")
        || header_contains(headers, "http-referer", "kilocode")
    {
        Client::KiloCode
    } else if header_is(headers, "x-title", "Roo Code")
        || header_contains(headers, "http-referer", "roocode")
        || header_contains(headers, "http-referer", "roo-cline")
    {
        Client::RooCode
    } else if header_is(headers, "copilot-integration-id", "copilot-developer-cli") {
        Client::CopilotCli
    } else if header(headers, "editor-version")
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("vscode/"))
    {
        Client::CopilotVsCode
    } else if headers.contains_key("x-opencode-session") {
        Client::OpenCode
    } else {
        Client::Unknown
    }
}

fn session_id(
    headers: &HeaderMap,
    client: Client,
    metadata_user_id: Option<&str>,
) -> Option<String> {
    let from_header = |name: &str| header(headers, name).and_then(accepted_session_id);
    let generic =
        from_header("x-tollgate-session").or_else(|| from_header("x-claude-code-session-id"));
    generic.or_else(|| match client {
        Client::ClaudeCode => metadata_user_id
            .and_then(claude_code_session)
            .and_then(|s| accepted_session_id(&s)),
        Client::Codex => from_header("session-id").or_else(|| from_header("session_id")),
        Client::CopilotVsCode | Client::CopilotCli => {
            from_header("x-interaction-id").or_else(|| from_header("x-client-session-id"))
        }
        Client::OpenCode => from_header("x-opencode-session"),
        _ => None,
    })
}

/// The session part of Claude Code's `metadata.user_id`: either
/// `user_<hash>_account_<uuid>_session_<uuid>`, or (newer versions) a JSON object in a string
/// with a `session_id` field.
fn claude_code_session(user_id: &str) -> Option<String> {
    let trimmed = user_id.trim();
    if trimmed.starts_with('{') {
        let object: Value = serde_json::from_str(trimmed).ok()?;
        return object
            .get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    trimmed
        .rsplit_once("_session_")
        .map(|(_, session)| session.to_owned())
}

/// Trims, refuses empty or non-printable-ASCII values (control characters would corrupt logs),
/// and cuts to [`MAX_SESSION_ID_CHARS`].
fn accepted_session_id(raw: &str) -> Option<String> {
    let value = raw.trim();
    if value.is_empty() || !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return None;
    }
    // Printable ASCII: one byte per character, so a byte cut is a character cut.
    Some(
        value
            .get(..MAX_SESSION_ID_CHARS)
            .unwrap_or(value)
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn client_of(pairs: &[(&'static str, &str)]) -> Client {
        identify(&headers(pairs), None).client
    }

    #[test]
    fn names() {
        let all = [
            (Client::ClaudeCode, "Claude Code"),
            (Client::Codex, "Codex"),
            (Client::CopilotVsCode, "GitHub Copilot (VS Code)"),
            (Client::CopilotCli, "GitHub Copilot CLI"),
            (Client::Cursor, "Cursor"),
            (Client::OpenCode, "OpenCode"),
            (Client::Zed, "Zed"),
            (Client::RooCode, "Roo Code"),
            (Client::KiloCode, "Kilo Code"),
            (Client::Unknown, "Unknown"),
        ];
        for (client, name) in all {
            assert_eq!(client.as_str(), name);
            assert_eq!(client.to_string(), name);
        }
    }

    #[test]
    fn claude_code() {
        assert_eq!(
            client_of(&[("user-agent", "claude-cli/2.0.14 (external, cli)")]),
            Client::ClaudeCode
        );
        assert_eq!(client_of(&[("x-app", "cli")]), Client::ClaudeCode);
        assert_eq!(
            client_of(&[(
                "anthropic-beta",
                "fine-grained-tool-streaming-2025-05-14,claude-code-20250219"
            )]),
            Client::ClaudeCode
        );
        assert_eq!(
            client_of(&[("x-claude-code-session-id", "abc")]),
            Client::ClaudeCode
        );
    }

    #[test]
    fn codex() {
        let ua = "codex_cli_rs/0.46.0 (Mac OS 15.6.1; arm64) iTerm.app/3.5.14";
        assert_eq!(client_of(&[("user-agent", ua)]), Client::Codex);
        assert_eq!(
            client_of(&[("user-agent", "codex_vscode/0.46.0")]),
            Client::Codex
        );
        assert_eq!(client_of(&[("originator", "codex_cli_rs")]), Client::Codex);
    }

    #[test]
    fn copilot_vs_code() {
        assert_eq!(
            client_of(&[("user-agent", "GitHubCopilotChat/0.31.2")]),
            Client::CopilotVsCode
        );
        assert_eq!(
            client_of(&[("editor-version", "vscode/1.104.1")]),
            Client::CopilotVsCode
        );
    }

    #[test]
    fn copilot_cli() {
        assert_eq!(
            client_of(&[("user-agent", "copilot/0.0.339 (linux v22.19.0) term/xterm")]),
            Client::CopilotCli
        );
        assert_eq!(
            client_of(&[("user-agent", "github-copilot-cli/1.0")]),
            Client::CopilotCli
        );
        assert_eq!(
            client_of(&[("copilot-integration-id", "copilot-developer-cli")]),
            Client::CopilotCli
        );
        // The CLI's integration id wins over an editor-version it may also send.
        assert_eq!(
            client_of(&[
                ("copilot-integration-id", "copilot-developer-cli"),
                ("editor-version", "vscode/1")
            ]),
            Client::CopilotCli
        );
    }

    #[test]
    fn cursor_opencode_zed() {
        assert_eq!(
            client_of(&[("user-agent", "Mozilla/5.0 Cursor/1.7.28 Chrome/132")]),
            Client::Cursor
        );
        assert_eq!(
            client_of(&[("user-agent", "opencode/0.15.3")]),
            Client::OpenCode
        );
        assert_eq!(
            client_of(&[("x-opencode-session", "ses_1")]),
            Client::OpenCode
        );
        assert_eq!(
            client_of(&[("user-agent", "Zed/0.207.3 (macos; aarch64)")]),
            Client::Zed
        );
        assert_eq!(
            client_of(&[("user-agent", "authorized/1.0")]),
            Client::Unknown
        );
    }

    #[test]
    fn roo_and_kilo() {
        assert_eq!(
            client_of(&[("user-agent", "RooCode/3.28.0")]),
            Client::RooCode
        );
        assert_eq!(
            client_of(&[("user-agent", "Roo-Code/3.28.0")]),
            Client::RooCode
        );
        assert_eq!(client_of(&[("x-title", "Roo Code")]), Client::RooCode);
        assert_eq!(
            client_of(&[("http-referer", "https://github.com/RooVetGit/Roo-Cline")]),
            Client::RooCode
        );
        assert_eq!(
            client_of(&[("http-referer", "https://roocode.com")]),
            Client::RooCode
        );
        assert_eq!(
            client_of(&[("user-agent", "Kilo-Code/4.9.0")]),
            Client::KiloCode
        );
        assert_eq!(
            client_of(&[("user-agent", "KiloCode/4.9.0")]),
            Client::KiloCode
        );
        assert_eq!(
            client_of(&[
                ("x-title", "Kilo Code"),
                ("http-referer", "https://kilocode.ai")
            ]),
            Client::KiloCode
        );
    }

    #[test]
    fn user_agent_beats_borrowed_headers() {
        let opencode_with_claude_max = [
            ("user-agent", "opencode/0.15.3"),
            ("anthropic-beta", "oauth-2025-04-20,claude-code-20250219"),
        ];
        assert_eq!(client_of(&opencode_with_claude_max), Client::OpenCode);
    }

    #[test]
    fn unknown() {
        assert_eq!(
            identify(&HeaderMap::new(), None),
            ClientInfo {
                client: Client::Unknown,
                session_id: None
            }
        );
        assert_eq!(client_of(&[("user-agent", "curl/8.5.0")]), Client::Unknown);
        assert_eq!(
            client_of(&[("user-agent", "OpenAI/Python 1.109.1")]),
            Client::Unknown
        );
    }

    #[test]
    fn tollgate_session_header_works_for_any_client_and_wins() {
        let info = identify(
            &headers(&[
                ("x-tollgate-session", "mine"),
                ("x-claude-code-session-id", "cc"),
            ]),
            None,
        );
        assert_eq!(info.session_id.as_deref(), Some("mine"));
        let info = identify(
            &headers(&[("user-agent", "curl/8"), ("x-tollgate-session", "s-1")]),
            None,
        );
        assert_eq!(
            info,
            ClientInfo {
                client: Client::Unknown,
                session_id: Some("s-1".into())
            }
        );
    }

    #[test]
    fn claude_code_session_header_beats_metadata() {
        let map = headers(&[
            ("user-agent", "claude-cli/2.0.14"),
            ("x-claude-code-session-id", "hdr"),
        ]);
        let info = identify(&map, Some("user_aa_account_bb_session_meta"));
        assert_eq!(info.session_id.as_deref(), Some("hdr"));
    }

    #[test]
    fn claude_code_session_from_metadata_user_id() {
        let map = headers(&[("user-agent", "claude-cli/1.0.83 (external, cli)")]);
        let user_id = "user_3f2a9c_account_0c8f2b4e-1111-2222-3333-444455556666_session_9d1e7a2b-aaaa-bbbb-cccc-ddddeeeeffff";
        let info = identify(&map, Some(user_id));
        assert_eq!(
            info.session_id.as_deref(),
            Some("9d1e7a2b-aaaa-bbbb-cccc-ddddeeeeffff")
        );

        let json = r#"{"device_id":"d1","account_uuid":"a1","session_id":"5e55-10n"}"#;
        assert_eq!(
            identify(&map, Some(json)).session_id.as_deref(),
            Some("5e55-10n")
        );

        assert_eq!(identify(&map, Some("user_abc")).session_id, None);
        assert_eq!(identify(&map, Some("{not json")).session_id, None);
        assert_eq!(identify(&map, Some(r#"{"session_id":7}"#)).session_id, None);
        // Only Claude Code's metadata is read that way.
        let other = headers(&[("user-agent", "curl/8")]);
        assert_eq!(identify(&other, Some(user_id)).session_id, None);
    }

    #[test]
    fn codex_session_headers() {
        let info = identify(
            &headers(&[("originator", "codex_cli_rs"), ("session-id", "s-dash")]),
            None,
        );
        assert_eq!(info.session_id.as_deref(), Some("s-dash"));
        let info = identify(
            &headers(&[("originator", "codex_cli_rs"), ("session_id", "s-under")]),
            None,
        );
        assert_eq!(info.session_id.as_deref(), Some("s-under"));
        // Not read for other clients.
        let info = identify(
            &headers(&[("user-agent", "Zed/0.1"), ("session_id", "x")]),
            None,
        );
        assert_eq!(info.session_id, None);
    }

    #[test]
    fn copilot_session_headers() {
        let both = headers(&[
            ("user-agent", "GitHubCopilotChat/0.31.2"),
            ("x-interaction-id", "interaction"),
            ("x-client-session-id", "client-session"),
        ]);
        assert_eq!(
            identify(&both, None).session_id.as_deref(),
            Some("interaction")
        );
        let only_client = headers(&[
            ("user-agent", "copilot/0.0.339"),
            ("x-client-session-id", "client-session"),
        ]);
        assert_eq!(
            identify(&only_client, None).session_id.as_deref(),
            Some("client-session")
        );
    }

    #[test]
    fn opencode_session_header() {
        let info = identify(
            &headers(&[
                ("user-agent", "opencode/0.15"),
                ("x-opencode-session", "ses_42"),
            ]),
            None,
        );
        assert_eq!(
            info,
            ClientInfo {
                client: Client::OpenCode,
                session_id: Some("ses_42".into())
            }
        );
    }

    #[test]
    fn session_ids_are_printable_ascii_and_capped() {
        let long = "a".repeat(300);
        let info = identify(&headers(&[("x-tollgate-session", &long)]), None);
        assert_eq!(info.session_id.map(|s| s.len()), Some(256));

        let mut map = HeaderMap::new();
        map.insert(
            "x-tollgate-session",
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        map.insert(
            "x-claude-code-session-id",
            HeaderValue::from_static("fallback"),
        );
        assert_eq!(identify(&map, None).session_id.as_deref(), Some("fallback"));

        let map = headers(&[("x-tollgate-session", "  padded  "), ("x-app", "cli")]);
        assert_eq!(identify(&map, None).session_id.as_deref(), Some("padded"));
        let map = headers(&[("x-tollgate-session", "   ")]);
        assert_eq!(identify(&map, None).session_id, None);

        let map = headers(&[("x-app", "cli")]);
        assert_eq!(
            identify(&map, Some("user_a_account_b_session_tab\there")).session_id,
            None
        );
        assert_eq!(
            identify(&map, Some("{\"session_id\":\"\u{e9}\"}")).session_id,
            None
        );
    }
}
