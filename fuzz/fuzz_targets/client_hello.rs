//! The reader a tunnel's first bytes go through before the proxy decides to tunnel, intercept or
//! refuse: hostile bytes never panic; the answer does not depend on how the bytes are cut into
//! reads (and never changes once given); a reader still undecided has been given fewer than
//! `MAX_FLIGHT` bytes, so memory stays bounded; a host name comes back normalised; and a
//! ClientHello built around fuzzed host-name bytes reads back to exactly that name, or is refused
//! when the name is not plain ASCII, never misread.
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use tollgate::proxy::client_hello::{ClientHelloInfo, ClientHelloParser, FirstBytes, MAX_FLIGHT};

#[path = "split.rs"]
mod split;

fn check_answer(answer: &FirstBytes) {
    if let FirstBytes::ClientHello(ClientHelloInfo {
        server_name: Some(name),
        ..
    }) = answer
    {
        assert!(!name.is_empty() && !name.ends_with('.'), "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
            "{name:?}"
        );
    }
}

/// The answer and bytes kept are the same whether `raw` arrives whole or cut as `seed` says.
fn check_reads(raw: &[u8], seed: u8) {
    let mut whole = ClientHelloParser::new();
    let answer = whole.push(raw);
    assert_eq!(whole.bytes(), raw);
    match &answer {
        Some(a) => check_answer(a),
        None => assert!(
            raw.len() < MAX_FLIGHT,
            "undecided after {} bytes",
            raw.len()
        ),
    }
    let mut cut = ClientHelloParser::new();
    let mut first_answer = None;
    for piece in split::chunks(raw, seed, 64) {
        let now = cut.push(piece);
        match (&first_answer, now) {
            (None, Some(a)) => first_answer = Some(a),
            (Some(before), now) => assert_eq!(now.as_ref(), Some(before), "the answer changed"),
            (None, None) => assert!(cut.room() > 0, "undecided with no room left"),
        }
    }
    assert_eq!(
        first_answer, answer,
        "cut reads disagree with one whole read"
    );
    assert_eq!(cut.bytes(), raw);
}

/// A ClientHello in one record with `name` as its SNI host name (and an ECH extension).
fn hello_for(name: &[u8], ech: bool) -> Vec<u8> {
    let mut extensions = Vec::new();
    let list_len = name.len() + 3;
    extensions.extend_from_slice(&[0x00, 0x00]);
    extensions.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    extensions.extend_from_slice(&(list_len as u16).to_be_bytes());
    extensions.push(0x00);
    extensions.extend_from_slice(&(name.len() as u16).to_be_bytes());
    extensions.extend_from_slice(name);
    if ech {
        extensions.extend_from_slice(&[0xfe, 0x0d, 0x00, 0x01, 0x01]);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]);
    body.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
    record.push(0x01);
    record.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&body);
    record
}

fn check_round_trip(name: &[u8], ech: bool) {
    if name.len() > 1024 {
        return;
    }
    let answer = ClientHelloParser::new().push(&hello_for(name, ech));
    let printable = name.iter().all(u8::is_ascii_graphic);
    let normalised = String::from_utf8_lossy(name)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    match answer {
        Some(FirstBytes::ClientHello(info)) => {
            assert!(printable && !normalised.is_empty(), "{name:?} was accepted");
            assert_eq!(info.server_name.as_deref(), Some(normalised.as_str()));
            assert_eq!(info.encrypted_client_hello, ech);
        }
        Some(FirstBytes::Invalid(_)) => {
            assert!(!printable || normalised.is_empty(), "{name:?} was refused")
        }
        other => panic!("{name:?} gave {other:?}"),
    }
}

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let Some((&seed, raw)) = input.split_first() else {
        return;
    };
    check_reads(raw, seed);
    check_round_trip(raw, seed & 1 == 1);
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
