//! The proxy's first request head, its CONNECT authority, `Proxy-Authorization` and the tunnel
//! destination rule: hostile bytes never panic; a head that parses whole also parses from every
//! prefix-then-rest read (what `read_head` does as bytes trickle in); an authority prints back
//! to itself; and an IPv4 address is judged the same as its IPv4-mapped IPv6 form, so a client
//! cannot reach a private range by spelling it differently.
// The fuzz target's body is `check`, also run over the seed corpus by an ordinary test
// (tests/it/fuzz_seeds.rs includes this file as a module, where `test` is set).
#![cfg_attr(not(test), no_main)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tollgate::proxy::destination::{is_reserved, Cidr, DestinationPolicy};
use tollgate::proxy::{parse_head, proxy_key, Authority};

#[path = "split.rs"]
mod split;

fn check_authority(target: &str) {
    let Ok(authority) = Authority::parse(target) else {
        return;
    };
    assert!(authority.port > 0);
    assert!(!authority.host.is_empty());
    let printed = authority.to_string();
    assert_eq!(
        Authority::parse(&printed).as_ref(),
        Ok(&authority),
        "{target:?} printed as {printed:?} does not parse back"
    );
    if let Ok(ip) = authority.host.parse::<IpAddr>() {
        // What the tunnel dials for an IP literal is exactly that address.
        let _ = DestinationPolicy::default().permits(ip);
    }
}

fn check_addresses(bytes: &[u8]) {
    if let Some(v4) = bytes.first_chunk::<4>() {
        let v4 = Ipv4Addr::from(*v4);
        assert_eq!(
            is_reserved(IpAddr::V4(v4)),
            is_reserved(IpAddr::V6(v4.to_ipv6_mapped())),
            "{v4} and its mapped form are judged differently"
        );
        let policy = DestinationPolicy::new(vec![Cidr::v4(10, 0, 0, 0, 8)]);
        assert_eq!(
            policy.permits(IpAddr::V4(v4)),
            policy.permits(IpAddr::V6(v4.to_ipv6_mapped())),
        );
    }
    if let Some(v6) = bytes.first_chunk::<16>() {
        let _ = is_reserved(IpAddr::V6(Ipv6Addr::from(*v6)));
    }
}

fn check_cidr(text: &str) {
    let Ok(cidr) = text.parse::<Cidr>() else {
        return;
    };
    let printed = cidr.to_string();
    assert_eq!(
        printed.parse::<Cidr>(),
        Ok(cidr),
        "{text:?} printed as {printed:?}"
    );
}

/// One fuzz input: panics on any property broken.
pub fn check(input: &[u8]) {
    let Some((&seed, raw)) = input.split_first() else {
        return;
    };
    check_addresses(raw);
    if let Ok(text) = std::str::from_utf8(raw) {
        check_authority(text);
        check_cidr(text);
        let _ = proxy_key(text);
    }
    let Ok(Some(head)) = parse_head(raw) else {
        return;
    };
    assert!(head.len <= raw.len());
    // The head does not depend on what follows it, and any cut before its end is "not yet".
    let exact = parse_head(&raw[..head.len]).expect("the head alone is an error");
    assert_eq!(exact.as_ref(), Some(&head));
    let mut seen = 0;
    for piece in split::chunks(&raw[..head.len], seed, 32) {
        seen += piece.len();
        if seen < head.len {
            match parse_head(&raw[..seen]) {
                Ok(None) => {}
                other => panic!("prefix of {seen}/{} bytes gave {other:?}", head.len),
            }
        }
    }
    if head.method.eq_ignore_ascii_case("CONNECT") {
        check_authority(&head.target);
    }
    if let Some(value) = &head.proxy_authorization {
        if let Some(key) = proxy_key(value) {
            assert!(!key.is_empty() && key.trim() == key);
        }
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|input: &[u8]| check(input));
