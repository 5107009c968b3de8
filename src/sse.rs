//! Incremental server-sent-events parsing, as the WHATWG HTML spec ("Interpreting an event
//! stream") defines it, over raw bytes that arrive in arbitrary pieces.
//!
//! The gateway watches provider streams as they pass through; chunks are cut wherever the network
//! cut them, so a line ending, a field name or a multi-byte UTF-8 character may be split across
//! two chunks. The parser works on bytes and only ever hands out whole events.
//!
//! Not for: producing SSE, reconnection (`id` and `retry` are read and ignored), or understanding
//! what an event's data means; provider adapters do that.

/// A single event bigger than this is dropped: an upstream (or something in between) that never
/// sends a blank line must not make the gateway buffer without limit.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// After one unusually large event the buffers are shrunk back to this, so a single big event does
/// not pin megabytes for the rest of a long stream.
const RETAINED_CAPACITY: usize = 64 << 10;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event. `data` is the event's `data` lines joined with `\n`, as bytes (the
/// parser does not validate UTF-8; JSON parsers downstream do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field, `None` when absent or empty (the spec's default type `message`).
    pub event: Option<&'a str>,
    pub data: &'a [u8],
}

/// Incremental SSE parser. Feed it chunks in order; it calls back once per complete event.
///
/// Buffers are reused from one event to the next, so a steady stream allocates nothing once the
/// buffers have grown to the size of its largest event.
#[derive(Debug)]
pub struct SseParser {
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// `data` values of the current event, each followed by `\n`.
    data: Vec<u8>,
    /// Distinguishes "no data line yet" (nothing to dispatch) from an empty `data:` line.
    has_data: bool,
    event_name: String,
    /// The previous chunk ended in `\r`: a `\n` starting the next chunk belongs to that line end.
    pending_cr: bool,
    /// A leading byte-order mark is only stripped from the very first line of the stream.
    at_stream_start: bool,
    /// The current event outgrew the limit; everything up to the next blank line is skipped.
    discarding: bool,
    /// While discarding: the current line has bytes, so its end is not a blank line.
    discarded_line_has_bytes: bool,
    max_event_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self::with_max_event_bytes(MAX_EVENT_BYTES)
    }

    /// A parser with a different event size limit (tests and fuzz targets use a small one).
    #[doc(hidden)]
    pub fn with_max_event_bytes(max_event_bytes: usize) -> Self {
        SseParser {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            event_name: String::new(),
            pending_cr: false,
            at_stream_start: true,
            discarding: false,
            discarded_line_has_bytes: false,
            max_event_bytes,
        }
    }

    /// Feeds the next chunk of the stream; `on_event` is called for each event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let mut rest = chunk;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if let Some(after_lf) = rest.strip_prefix(b"\n") {
                rest = after_lf;
            }
        }
        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.buffer_partial_line(rest);
                return;
            };
            let (line, terminator_and_after) = rest.split_at(end);
            let terminator_len = match terminator_and_after {
                [b'\r', b'\n', ..] => 2,
                [b'\r'] => {
                    self.pending_cr = true;
                    1
                }
                _ => 1,
            };
            self.complete_line(line, &mut on_event);
            rest = terminator_and_after
                .get(terminator_len..)
                .unwrap_or_default();
        }
    }

    /// Ends the stream. Per the spec an event not terminated by a blank line is incomplete and is
    /// discarded, so `on_event` is never called; the parameter keeps the call sites uniform should
    /// a lenient mode ever be needed. The parser is reset and can read a new stream.
    pub fn finish(&mut self, _on_event: impl FnMut(SseEvent<'_>)) {
        self.line.clear();
        self.reset_event();
        self.pending_cr = false;
        self.at_stream_start = true;
        self.discarding = false;
        self.discarded_line_has_bytes = false;
    }

    fn buffer_partial_line(&mut self, piece: &[u8]) {
        if self.discarding {
            self.discarded_line_has_bytes |= !piece.is_empty();
            return;
        }
        if self.would_exceed_limit(piece.len()) {
            self.start_discarding();
            self.discarded_line_has_bytes = true;
            return;
        }
        self.line.extend_from_slice(piece);
    }

    fn complete_line(&mut self, piece: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.discarding {
            let blank = piece.is_empty() && !self.discarded_line_has_bytes;
            self.discarded_line_has_bytes = false;
            if blank {
                // Resynchronised: the oversized event ends here and is never dispatched.
                self.discarding = false;
                self.reset_event();
            }
            return;
        }
        // Checked for whole lines too, so that where the network cut the stream never changes
        // which events are dropped.
        if self.would_exceed_limit(piece.len()) {
            self.start_discarding();
            return;
        }
        if self.line.is_empty() {
            self.process_line(piece, on_event);
            return;
        }
        self.line.extend_from_slice(piece);
        let line = std::mem::take(&mut self.line);
        self.process_line(&line, on_event);
        self.line = line;
        self.line.clear();
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let line = if self.at_stream_start {
            self.at_stream_start = false;
            line.strip_prefix(UTF8_BOM).unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line.starts_with(b":") {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (field, colon_and_value) = line.split_at(colon);
                let value = colon_and_value.get(1..).unwrap_or_default();
                (field, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max_event_bytes {
                    self.start_discarding();
                    return;
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event_name.clear();
                self.event_name.push_str(&String::from_utf8_lossy(value));
            }
            // `id` and `retry` only matter to a reconnecting client; other fields are ignored
            // by the spec.
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.has_data {
            // The spec joins data lines with "\n": drop the one after the last line.
            let data = self
                .data
                .split_last()
                .map(|(_, joined)| joined)
                .unwrap_or_default();
            let event = Some(self.event_name.as_str()).filter(|name| !name.is_empty());
            on_event(SseEvent { event, data });
        }
        self.reset_event();
    }

    fn would_exceed_limit(&self, more: usize) -> bool {
        self.line.len() + self.data.len() + more > self.max_event_bytes
    }

    fn start_discarding(&mut self) {
        self.discarding = true;
        self.discarded_line_has_bytes = false;
        self.at_stream_start = false;
        self.line.clear();
        self.line.shrink_to(RETAINED_CAPACITY);
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.data.clear();
        if self.data.capacity() > RETAINED_CAPACITY * 16 {
            self.data.shrink_to(RETAINED_CAPACITY);
        }
        self.has_data = false;
        self.event_name.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Owned = (Option<String>, Vec<u8>);

    const FIXTURES: [&[u8]; 4] = [
        include_bytes!("../tests/fixtures/openai-chat-stream.sse"),
        include_bytes!("../tests/fixtures/openai-chat-tools-stream.sse"),
        include_bytes!("../tests/fixtures/openai-responses-stream.sse"),
        include_bytes!("../tests/fixtures/anthropic-messages-stream.sse"),
    ];

    fn parse_chunks<'a>(
        parser: &mut SseParser,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Owned> {
        let mut events = Vec::new();
        let mut collect = |event: SseEvent<'_>| {
            events.push((event.event.map(str::to_owned), event.data.to_vec()))
        };
        for chunk in chunks {
            parser.feed(chunk, &mut collect);
        }
        parser.finish(&mut collect);
        events
    }

    fn parse_whole(stream: &[u8]) -> Vec<Owned> {
        parse_chunks(&mut SseParser::new(), [stream])
    }

    fn event(name: Option<&str>, data: &str) -> Owned {
        (name.map(str::to_owned), data.as_bytes().to_vec())
    }

    #[test]
    fn fixtures_parse_into_their_events() {
        let chat = parse_whole(FIXTURES[0]);
        assert_eq!(chat.len(), 10);
        assert!(chat.iter().all(|(name, _)| name.is_none()));
        assert_eq!(chat[9].1, b"[DONE]");

        let anthropic = parse_whole(FIXTURES[3]);
        assert_eq!(anthropic[0].0.as_deref(), Some("message_start"));
        assert_eq!(
            anthropic.last().map(|e| e.0.as_deref()),
            Some(Some("message_stop"))
        );
        for (name, data) in &anthropic {
            let json: serde_json::Value = serde_json::from_slice(data).unwrap();
            assert_eq!(json["type"].as_str(), name.as_deref());
        }
    }

    #[test]
    fn fixtures_split_at_every_offset_match_whole() {
        for stream in FIXTURES {
            let whole = parse_whole(stream);
            // One parser for all splits: finish() must leave it ready for a new stream.
            let mut parser = SseParser::new();
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                assert_eq!(parse_chunks(&mut parser, [a, b]), whole, "split at {split}");
            }
        }
    }

    #[test]
    fn fixtures_one_byte_at_a_time_match_whole() {
        for stream in FIXTURES {
            let bytes = parse_chunks(&mut SseParser::new(), stream.chunks(1));
            assert_eq!(bytes, parse_whole(stream));
        }
    }

    fn with_line_endings(stream: &[u8], ending: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in stream {
            if b == b'\n' {
                out.extend_from_slice(ending);
            } else {
                out.push(b);
            }
        }
        out
    }

    #[test]
    fn crlf_and_cr_line_endings_parse_like_lf() {
        for stream in FIXTURES {
            let whole = parse_whole(stream);
            for ending in [&b"\r\n"[..], b"\r"] {
                let converted = with_line_endings(stream, ending);
                assert_eq!(parse_whole(&converted), whole);
                for split in 0..=converted.len() {
                    let (a, b) = converted.split_at(split);
                    assert_eq!(
                        parse_chunks(&mut SseParser::new(), [a, b]),
                        whole,
                        "split at {split}"
                    );
                }
            }
        }
    }

    #[test]
    fn crlf_split_between_chunks_is_one_line_end() {
        let events = parse_chunks(
            &mut SseParser::new(),
            [&b"data: a\r"[..], b"\n\r", b"\ndata: b\r\n\r\n"],
        );
        assert_eq!(events, vec![event(None, "a"), event(None, "b")]);
    }

    #[test]
    fn lone_cr_before_lf_chunk_is_not_doubled() {
        // "\r" then "\n" in the next chunk is one line end, so "data: a" is not followed by a
        // blank line until the explicit one.
        let events = parse_chunks(&mut SseParser::new(), [&b"data: a\r"[..], b"\ndata: b\n\n"]);
        assert_eq!(events, vec![event(None, "a\nb")]);
    }

    #[test]
    fn comments_are_ignored() {
        let stream = b": keep-alive\n\n:\ndata: x\n: between\ndata: y\n\n: bye\n\n";
        assert_eq!(parse_whole(stream), vec![event(None, "x\ny")]);
    }

    #[test]
    fn data_with_and_without_space_and_empty_data() {
        let stream = b"data:x\n\ndata: y\n\ndata:  two\n\ndata:\n\ndata\n\ndata:\ndata:\n\n";
        assert_eq!(
            parse_whole(stream),
            vec![
                event(None, "x"),
                event(None, "y"),
                event(None, " two"),
                event(None, ""),
                event(None, ""),
                event(None, "\n"),
            ]
        );
    }

    #[test]
    fn unknown_fields_id_retry_and_dataless_events() {
        let stream = b"id: 7\nretry: 100\nfoo: bar\nevent: ping\n\nevent: real\nid: 8\ndata: d\n\ndata: plain\n\n";
        // The dataless "ping" is not dispatched and its name does not leak into the next event.
        assert_eq!(
            parse_whole(stream),
            vec![event(Some("real"), "d"), event(None, "plain")]
        );
    }

    #[test]
    fn unterminated_event_at_end_of_stream_is_discarded() {
        assert_eq!(parse_whole(b"data: a\n\ndata: cut"), vec![event(None, "a")]);
        assert_eq!(
            parse_whole(b"data: a\n\ndata: cut\n"),
            vec![event(None, "a")]
        );
    }

    #[test]
    fn multibyte_utf8_split_across_chunks() {
        let stream = "event: é\ndata: 日本語 ✓\n\n".as_bytes();
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(
                parse_chunks(&mut SseParser::new(), [a, b]),
                vec![event(Some("é"), "日本語 ✓")]
            );
        }
    }

    #[test]
    fn leading_bom_is_stripped_once() {
        let stream = b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n";
        assert_eq!(parse_whole(stream), vec![event(None, "a")]);
        let split = parse_chunks(&mut SseParser::new(), [&stream[..1], &stream[1..]]);
        assert_eq!(split, vec![event(None, "a")]);
    }

    #[test]
    fn oversized_event_is_dropped_and_parser_resynchronises() {
        let mut parser = SseParser::with_max_event_bytes(32);
        let long_line = format!("data: {}\n", "x".repeat(40));
        let many_lines = "data: 0123456789\n".repeat(4);
        let stream = format!("data: ok\n\n{long_line}data: more\n\n{many_lines}\ndata: after\n\n");
        let expected = vec![event(None, "ok"), event(None, "after")];
        assert_eq!(parse_chunks(&mut parser, [stream.as_bytes()]), expected);
        assert_eq!(
            parse_chunks(&mut parser, stream.as_bytes().chunks(1)),
            expected
        );
    }

    #[test]
    fn invalid_utf8_event_name_does_not_panic() {
        let events = parse_whole(b"event: \xFF\xFE\ndata: \xC3\n\n");
        assert_eq!(
            events,
            vec![(Some("\u{FFFD}\u{FFFD}".to_owned()), b"\xC3".to_vec())]
        );
    }

    fn split_at_points(stream: &[u8], mut points: Vec<usize>) -> Vec<&[u8]> {
        points.iter_mut().for_each(|p| *p %= stream.len() + 1);
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for point in points {
            chunks.push(&stream[start..point]);
            start = point;
        }
        chunks.push(&stream[start..]);
        chunks
    }

    proptest! {
        #[test]
        fn fixtures_rechunked_anywhere_match_whole(
            which in 0..FIXTURES.len(),
            ending in 0..3usize,
            points in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let stream = with_line_endings(FIXTURES[which], [&b"\n"[..], b"\r\n", b"\r"][ending]);
            let chunks = split_at_points(&stream, points);
            prop_assert_eq!(parse_chunks(&mut SseParser::new(), chunks), parse_whole(FIXTURES[which]));
        }

        #[test]
        fn arbitrary_bytes_rechunked_match_whole(
            stream in proptest::collection::vec(
                prop_oneof![
                    Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '),
                    Just(b'd'), Just(b'a'), Just(b't'), Just(b'e'), any::<u8>()
                ],
                0..300,
            ),
            points in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut small_limit = SseParser::with_max_event_bytes(64);
            let whole = parse_chunks(&mut small_limit, [&stream[..]]);
            let chunks = split_at_points(&stream, points);
            prop_assert_eq!(parse_chunks(&mut SseParser::with_max_event_bytes(64), chunks), whole);
        }
    }
}
