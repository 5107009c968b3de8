//! Request bodies for every provider shape: parsing hostile JSON never panics, and a body the
//! gateway rewrites (chat streams get `stream_options.include_usage`) still parses to the same
//! request, so the rewrite can never turn an accepted request into one the upstream reads
//! differently.
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use tollgate::providers::{Endpoint, ProviderKind};

const SHAPES: &[(ProviderKind, Endpoint)] = &[
    (ProviderKind::OpenAi, Endpoint::ChatCompletions),
    (ProviderKind::OpenAi, Endpoint::Responses),
    (ProviderKind::OpenAiCompatible, Endpoint::ChatCompletions),
    (ProviderKind::Anthropic, Endpoint::Messages),
    (ProviderKind::Copilot, Endpoint::ChatCompletions),
    (ProviderKind::Copilot, Endpoint::Responses),
];

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let (kind, endpoint) = SHAPES[usize::from(selector) % SHAPES.len()];
    let adapter = kind.adapter();
    let Ok(parsed) = adapter.parse_request(endpoint, body) else {
        return;
    };
    if let Some(rewritten) = adapter.rewrite_request(endpoint, body, &parsed) {
        let again = adapter
            .parse_request(endpoint, &rewritten)
            .expect("the rewritten body no longer parses");
        assert_eq!(again.model, parsed.model);
        assert_eq!(again.stream, parsed.stream);
        assert_eq!(again.max_output_tokens, parsed.max_output_tokens);
        assert_eq!(again.last_user_prompt, parsed.last_user_prompt);
        assert_eq!(again.tool_result_ids, parsed.tool_result_ids);
        // Rewriting is idempotent: a second pass has nothing left to add.
        assert!(
            adapter
                .rewrite_request(endpoint, &rewritten, &again)
                .is_none(),
            "rewriting the rewritten body changed it again"
        );
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
