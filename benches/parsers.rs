//! Hot-path micro-benchmarks: the SSE parser, usage extraction per fixture (as bytes/s), the
//! usage-chunk stripper, and cost computation.
//!
//! Run with `cargo bench --bench parsers`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::governance::pricing::{self, PriceBook};
use tollgate::providers::{Endpoint, ProviderKind, TokenUsage, UsageChunkStripper};
use tollgate::sse::SseParser;

const FIXTURES: &[(&str, ProviderKind, Endpoint, bool)] = &[
    (
        "openai-chat.json",
        ProviderKind::OpenAi,
        Endpoint::ChatCompletions,
        false,
    ),
    (
        "openai-chat-stream.sse",
        ProviderKind::OpenAi,
        Endpoint::ChatCompletions,
        true,
    ),
    (
        "openai-chat-tools-stream.sse",
        ProviderKind::OpenAi,
        Endpoint::ChatCompletions,
        true,
    ),
    (
        "openai-responses.json",
        ProviderKind::OpenAi,
        Endpoint::Responses,
        false,
    ),
    (
        "openai-responses-stream.sse",
        ProviderKind::OpenAi,
        Endpoint::Responses,
        true,
    ),
    (
        "anthropic-messages.json",
        ProviderKind::Anthropic,
        Endpoint::Messages,
        false,
    ),
    (
        "anthropic-messages-stream.sse",
        ProviderKind::Anthropic,
        Endpoint::Messages,
        true,
    ),
];

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

/// Feeds a body in 512-byte chunks, as a network read would deliver it.
const CHUNK: usize = 512;

fn sse_parser(c: &mut Criterion) {
    let mut group = c.benchmark_group("sse_parser");
    for (name, ..) in FIXTURES.iter().filter(|f| f.3) {
        let body = fixture(name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                let mut parser = SseParser::new();
                let mut events = 0usize;
                for chunk in body.chunks(CHUNK) {
                    parser.feed(black_box(chunk), |e| events += e.data.len());
                }
                black_box(events)
            })
        });
    }
    group.finish();
}

fn usage_extraction(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_extraction");
    for (name, kind, endpoint, streaming) in FIXTURES {
        let body = fixture(name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                let mut parser = kind.adapter().response_parser(*endpoint, *streaming);
                for chunk in body.chunks(CHUNK) {
                    parser.feed(black_box(chunk));
                }
                black_box(parser.finish())
            })
        });
    }
    group.finish();
}

fn usage_chunk_stripper(c: &mut Criterion) {
    let body = fixture("openai-chat-stream.sse");
    let mut group = c.benchmark_group("usage_chunk_stripper");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("openai-chat-stream.sse", |b| {
        b.iter(|| {
            let mut s = UsageChunkStripper::new();
            let mut n = 0;
            for chunk in body.chunks(CHUNK) {
                n += s.push(black_box(chunk)).len();
            }
            black_box(n + s.finish().len())
        })
    });
    group.finish();
}

fn cost(c: &mut Criterion) {
    let book = PriceBook::builtin();
    let usage = TokenUsage {
        input: 420,
        output: 233,
        cache_read: 9000,
        cache_write: 1800,
        reasoning: 0,
    };
    c.bench_function("price_lookup_and_cost", |b| {
        b.iter(|| {
            let price = book
                .lookup(black_box("claude-sonnet-4-5-20250929"))
                .expect("priced");
            black_box(pricing::cost(&usage, price))
        })
    });
}

criterion_group!(
    benches,
    sse_parser,
    usage_extraction,
    usage_chunk_stripper,
    cost
);
criterion_main!(benches);
