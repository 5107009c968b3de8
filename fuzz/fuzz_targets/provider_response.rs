//! Usage extraction for every provider shape (OpenAI chat, Responses and compatible servers,
//! Anthropic Messages, Copilot), blocking JSON bodies and SSE streams: hostile bytes never panic,
//! and the summary never depends on where the network cut the body. The chat stream's usage-chunk
//! stripper is held to the same rule for the bytes it forwards.
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use tollgate::providers::{Endpoint, ProviderKind, ResponseSummary, UsageChunkStripper};

#[path = "split.rs"]
mod split;

/// Every (kind, endpoint) pair a route of that kind can intercept.
const SHAPES: &[(ProviderKind, Endpoint)] = &[
    (ProviderKind::OpenAi, Endpoint::ChatCompletions),
    (ProviderKind::OpenAi, Endpoint::Responses),
    (ProviderKind::OpenAiCompatible, Endpoint::ChatCompletions),
    (ProviderKind::Anthropic, Endpoint::Messages),
    (ProviderKind::Copilot, Endpoint::ChatCompletions),
    (ProviderKind::Copilot, Endpoint::Responses),
];

fn summarise<'a>(
    kind: ProviderKind,
    endpoint: Endpoint,
    streaming: bool,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> ResponseSummary {
    let mut parser = kind.adapter().response_parser(endpoint, streaming);
    for piece in pieces {
        parser.feed(piece);
    }
    parser.finish()
}

fn stripped<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut stripper = UsageChunkStripper::new();
    let mut out = Vec::new();
    for piece in pieces {
        out.extend_from_slice(&stripper.push(piece));
    }
    out.extend_from_slice(&stripper.finish());
    out
}

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let Some((&[selector, seed], body)) = input.split_first_chunk::<2>() else {
        return;
    };
    let (kind, endpoint) = SHAPES[usize::from(selector) % SHAPES.len()];
    let streaming = selector & 0x80 != 0;
    let whole = summarise(kind, endpoint, streaming, [body]);
    let cut = summarise(kind, endpoint, streaming, split::chunks(body, seed, 48));
    assert_eq!(
        whole, cut,
        "{kind:?} {endpoint:?} streaming={streaming}: re-chunking changed the summary"
    );
    // Ids and names are decoded JSON strings, never longer than the bytes they came from; an
    // extractor that glued pieces together twice would break this.
    for call in &whole.tool_calls {
        assert!(
            call.id.len() + call.name.len() <= body.len(),
            "a tool call id/name longer than the body it came from"
        );
    }
    if streaming && endpoint == Endpoint::ChatCompletions {
        let forwarded = stripped([body]);
        assert_eq!(
            forwarded,
            stripped(split::chunks(body, seed, 48)),
            "re-chunking changed what the usage-chunk stripper forwards"
        );
        assert!(forwarded.len() <= body.len(), "the stripper added bytes");
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
