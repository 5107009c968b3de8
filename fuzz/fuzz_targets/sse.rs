//! The SSE parser never panics, and where the network cuts a stream never changes the events it
//! yields (also for events over the size limit, which must be dropped alike at any cut).
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use tollgate::sse::SseParser;

#[path = "split.rs"]
mod split;

type Event = (Option<String>, Vec<u8>);

fn events<'a>(max_event_bytes: usize, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Event> {
    let mut parser = SseParser::with_max_event_bytes(max_event_bytes);
    let mut out = Vec::new();
    for piece in pieces {
        parser.feed(piece, |e| {
            out.push((e.event.map(str::to_string), e.data.to_vec()))
        });
    }
    parser.finish(|e| out.push((e.event.map(str::to_string), e.data.to_vec())));
    out
}

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let Some((&[seed, limit], stream)) = input.split_first_chunk::<2>() else {
        return;
    };
    // A small limit makes the oversized-event path reachable with short inputs.
    let max_event_bytes = 16 + usize::from(limit) * 4;
    let whole = events(max_event_bytes, [stream]);
    for e in &whole {
        assert!(
            e.1.len() <= max_event_bytes,
            "an event over the limit was dispatched"
        );
    }
    let cut = events(max_event_bytes, split::chunks(stream, seed, 64));
    assert_eq!(whole, cut, "re-chunking changed the events");
    if stream.len() <= 4096 {
        let bytewise = events(max_event_bytes, stream.chunks(1));
        assert_eq!(whole, bytewise, "byte-by-byte feeding changed the events");
    }
    // The parser is reusable after finish(): the same stream gives the same events again.
    let mut parser = SseParser::with_max_event_bytes(max_event_bytes);
    let mut first = Vec::new();
    parser.feed(stream, |e| first.push(e.data.to_vec()));
    parser.finish(|_| {});
    let mut second = Vec::new();
    parser.feed(stream, |e| second.push(e.data.to_vec()));
    assert_eq!(first, second, "finish() did not reset the parser");
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
