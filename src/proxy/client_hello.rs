//! The facts the proxy needs from a TLS ClientHello: the host name it asks for (SNI) and whether
//! it carries an Encrypted Client Hello extension, read from the first bytes a client sends into
//! a tunnel.
//!
//! [`ClientHelloParser`] is incremental (bytes may arrive one at a time, the ClientHello may be
//! split over several TLS records) and bounded: a ClientHello over [`MAX_HELLO_LEN`] bytes or
//! spread over more than [`MAX_RECORDS`] records is refused, so it always answers before it has
//! been given [`MAX_FLIGHT`] bytes, and [`read_first_bytes`] never reads more than that. It is
//! strict where a lenient reading could differ from the server's (two SNI extensions, two host
//! names, bytes left over): such a hello is a [`HelloError`], and the proxy refuses it rather
//! than guess. It keeps every byte it was given so the caller can replay them to whoever handles
//! the connection next.
//!
//! Not here: TLS itself (rustls, `mitm`), or what the proxy does with the answer (`governed`).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello handshake message (its body) read; real ones are a few KiB at most.
pub const MAX_HELLO_LEN: usize = 16 * 1024;
/// Most TLS records a ClientHello may be split over.
pub const MAX_RECORDS: usize = 32;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Most bytes the parser needs before it has an answer (see the module docs).
pub const MAX_FLIGHT: usize =
    HANDSHAKE_HEADER_LEN + MAX_HELLO_LEN + MAX_RECORDS * RECORD_HEADER_LEN;
/// Largest TLS plaintext record fragment (RFC 8446 §5.1).
const MAX_FRAGMENT_LEN: usize = 1 << 14;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
const EXTENSION_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0x00;

/// What a ClientHello says, as far as the proxy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The SNI host name, lowercase and without trailing dots (as CONNECT targets are), if any.
    pub server_name: Option<String>,
    /// An `encrypted_client_hello` extension is present (real ECH or GREASE: they cannot be told
    /// apart, and with real ECH the SNI above is only the CDN's public name).
    pub encrypted_client_hello: bool,
}

/// What a connection's first bytes turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstBytes {
    /// Not a TLS handshake record: some other protocol (plain HTTP, SSH, ...).
    NotTls,
    /// A complete, well-formed ClientHello.
    ClientHello(ClientHelloInfo),
    /// A TLS handshake that is not a well-formed ClientHello (or is too large to read).
    Invalid(HelloError),
}

/// Why TLS-looking bytes are not a ClientHello the proxy accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("a TLS record of content type {0} arrived before the ClientHello was complete")]
    UnexpectedRecord(u8),
    #[error("a TLS record with protocol version {0:#06x}")]
    RecordVersion(u16),
    #[error("a TLS record of {0} bytes (records hold 1 to 16384)")]
    RecordLength(usize),
    #[error("the first handshake message is of type {0}, not a ClientHello")]
    NotClientHello(u8),
    #[error("a ClientHello of {0} bytes (at most {MAX_HELLO_LEN} are read)")]
    TooLarge(usize),
    #[error("the ClientHello is split over more than {MAX_RECORDS} records")]
    TooManyRecords,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Reads a ClientHello as its bytes arrive; see the module docs.
#[derive(Debug, Default)]
pub struct ClientHelloParser {
    /// Every byte pushed, for replay.
    seen: Vec<u8>,
    /// Offset in `seen` of the first byte not yet parsed.
    cursor: usize,
    /// Fragment bytes of the current record not yet arrived.
    record_left: usize,
    records: usize,
    /// The handshake message reassembled from the records' fragments so far.
    message: Vec<u8>,
    /// The message's whole length (header included), once its header has arrived.
    message_len: Option<usize>,
    outcome: Option<FirstBytes>,
}

impl ClientHelloParser {
    pub fn new() -> ClientHelloParser {
        ClientHelloParser::default()
    }

    /// Adds the next bytes of the connection. `None` while more are needed; once an answer is
    /// given, later calls return it again and keep their bytes for replay without parsing them.
    pub fn push(&mut self, data: &[u8]) -> Option<FirstBytes> {
        self.seen.extend_from_slice(data);
        if self.outcome.is_none() {
            self.outcome = self.advance().err();
        }
        self.outcome.clone()
    }

    /// How many bytes the parser may still need (read no more than this while it says `None`).
    pub fn room(&self) -> usize {
        MAX_FLIGHT.saturating_sub(self.seen.len())
    }

    /// Every byte pushed so far, in order.
    pub fn bytes(&self) -> &[u8] {
        &self.seen
    }

    pub fn into_bytes(self) -> Bytes {
        Bytes::from(self.seen)
    }

    /// Parses as far as the bytes allow: `Ok(())` means "need more", `Err` carries the answer
    /// (so `?` ends the walk wherever it is decided).
    fn advance(&mut self) -> Result<(), FirstBytes> {
        let invalid = FirstBytes::Invalid;
        loop {
            if self.record_left == 0 {
                let Some(header) = self.seen.get(self.cursor..self.cursor + RECORD_HEADER_LEN)
                else {
                    // Not a whole record header yet, but its first bytes may already decide.
                    let first = self.records == 0;
                    return match &self.seen[self.cursor..] {
                        [kind, ..] if first && *kind != CONTENT_TYPE_HANDSHAKE => {
                            Err(FirstBytes::NotTls)
                        }
                        [_, major, ..] if first && *major != 3 => Err(FirstBytes::NotTls),
                        [kind, ..] if *kind != CONTENT_TYPE_HANDSHAKE => {
                            Err(invalid(HelloError::UnexpectedRecord(*kind)))
                        }
                        _ => Ok(()),
                    };
                };
                let (kind, major, minor) = (header[0], header[1], header[2]);
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                if self.records == 0 && (kind != CONTENT_TYPE_HANDSHAKE || major != 3) {
                    // A TLS server rejects any other first record outright, so the bytes are
                    // some other protocol as far as any server is concerned.
                    return Err(FirstBytes::NotTls);
                }
                if kind != CONTENT_TYPE_HANDSHAKE {
                    return Err(invalid(HelloError::UnexpectedRecord(kind)));
                }
                if major != 3 {
                    return Err(invalid(HelloError::RecordVersion(u16::from_be_bytes([
                        major, minor,
                    ]))));
                }
                if len == 0 || len > MAX_FRAGMENT_LEN {
                    return Err(invalid(HelloError::RecordLength(len)));
                }
                self.records += 1;
                if self.records > MAX_RECORDS {
                    return Err(invalid(HelloError::TooManyRecords));
                }
                self.cursor += RECORD_HEADER_LEN;
                self.record_left = len;
                self.check_no_overrun()?;
            }
            let available = self.seen.len() - self.cursor;
            if available == 0 {
                return Ok(());
            }
            let take = available.min(self.record_left);
            self.message
                .extend_from_slice(&self.seen[self.cursor..self.cursor + take]);
            self.cursor += take;
            self.record_left -= take;
            if self.message_len.is_none() && self.message.len() >= HANDSHAKE_HEADER_LEN {
                if self.message[0] != HANDSHAKE_CLIENT_HELLO {
                    return Err(invalid(HelloError::NotClientHello(self.message[0])));
                }
                let body_len = usize::from(self.message[1]) << 16
                    | usize::from(self.message[2]) << 8
                    | usize::from(self.message[3]);
                if body_len > MAX_HELLO_LEN {
                    return Err(invalid(HelloError::TooLarge(body_len)));
                }
                self.message_len = Some(HANDSHAKE_HEADER_LEN + body_len);
            }
            self.check_no_overrun()?;
            if self.message_len == Some(self.message.len()) {
                return Err(
                    match parse_client_hello(&self.message[HANDSHAKE_HEADER_LEN..]) {
                        Ok(info) => FirstBytes::ClientHello(info),
                        Err(e) => invalid(e),
                    },
                );
            }
        }
    }

    /// The ClientHello's records must end with it: a client sends nothing else in a handshake
    /// record before the server answers, and a server would reject what follows.
    fn check_no_overrun(&self) -> Result<(), FirstBytes> {
        match self.message_len {
            Some(len) if self.message.len() + self.record_left > len => Err(FirstBytes::Invalid(
                HelloError::Malformed("the handshake records hold more than the ClientHello"),
            )),
            _ => Ok(()),
        }
    }
}

/// Why the first bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadHelloError {
    #[error("the client closed the connection before its first message was complete")]
    Closed,
    #[error("the client sent no complete first message within {0:?}")]
    TimedOut(Duration),
    #[error("reading the client's first message failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads from `stream` (after the `early` bytes already read) until the first bytes say what
/// they are, within `timeout`. Returns that answer and every byte read, for replay.
pub async fn read_first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    early: &[u8],
    timeout: Duration,
) -> Result<(FirstBytes, Bytes), ReadHelloError> {
    let mut parser = ClientHelloParser::new();
    let mut answer = if early.is_empty() {
        None
    } else {
        parser.push(early)
    };
    let read = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 4096];
        while answer.is_none() {
            let room = parser.room().clamp(1, chunk.len());
            let n = stream.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(ReadHelloError::Closed);
            }
            answer = parser.push(&chunk[..n]);
        }
        Ok(())
    })
    .await;
    match read {
        Err(_) => Err(ReadHelloError::TimedOut(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => match answer {
            Some(answer) => Ok((answer, parser.into_bytes())),
            None => Err(ReadHelloError::Closed),
        },
    }
}

/// A bounds-checked reader over a ClientHello body.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.rest.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// The body of a ClientHello handshake message (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2).
fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, HelloError> {
    let mut r = Reader { rest: body };
    r.take(2 + 32, "truncated before the session id")?; // legacy_version, random
    if r.vec8("truncated session id")?.len() > 32 {
        return Err(HelloError::Malformed("a session id over 32 bytes"));
    }
    let suites = r.vec16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed(
            "an empty or odd-length cipher suite list",
        ));
    }
    if r.vec8("truncated compression methods")?.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut info = ClientHelloInfo {
        server_name: None,
        encrypted_client_hello: false,
    };
    if r.is_empty() {
        // A hello without extensions (before TLS 1.2 they were optional) names no host.
        return Ok(info);
    }
    let mut extensions = Reader {
        rest: r.vec16("truncated extensions")?,
    };
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut seen_sni = false;
    while !extensions.is_empty() {
        let kind = extensions.u16("truncated extension")?;
        let data = extensions.vec16("truncated extension")?;
        match kind {
            EXTENSION_SERVER_NAME => {
                if seen_sni {
                    return Err(HelloError::Malformed("two server_name extensions"));
                }
                seen_sni = true;
                info.server_name = Some(parse_server_name(data)?);
            }
            EXTENSION_ENCRYPTED_CLIENT_HELLO => {
                if info.encrypted_client_hello {
                    return Err(HelloError::Malformed(
                        "two encrypted_client_hello extensions",
                    ));
                }
                info.encrypted_client_hello = true;
            }
            _ => {}
        }
    }
    Ok(info)
}

/// A client's `server_name` extension: exactly one host name (RFC 6066 §3), normalised like a
/// CONNECT target. Other name types are undefined, so they are refused rather than skipped.
fn parse_server_name(data: &[u8]) -> Result<String, HelloError> {
    let mut r = Reader { rest: data };
    let mut list = Reader {
        rest: r.vec16("truncated server name list")?,
    };
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        if list.u8("truncated server name")? != NAME_TYPE_HOST_NAME {
            return Err(HelloError::Malformed(
                "a server name that is not a host name",
            ));
        }
        let name = list.vec16("truncated host name")?;
        if host.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        if !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(HelloError::Malformed(
                "a host name with non-ASCII or control bytes",
            ));
        }
        let name = String::from_utf8_lossy(name);
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Err(HelloError::Malformed("an empty host name"));
        }
        host = Some(name);
    }
    host.ok_or(HelloError::Malformed("an empty server name list"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A ClientHello as rustls's client writes it (TLS 1.3 and 1.2 offered, X25519 and the other
    /// default groups), for `name` (a DNS name gets SNI; an IP address does not).
    fn rustls_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A ClientHello written by Python's ssl module (OpenSSL 3.0) for `api.openai.com`: another
    /// implementation's layout (GREASE-free, session ticket, PSK modes, 517 bytes with padding).
    const OPENSSL_HELLO_HEX: &str = concat!(
        "1603010200010001fc030328a6464a909597f140a32b7a90f2ea3f5c0a62a94b56284005149eb3e27536a120",
        "d5743ba1166b2ebfd3d0fd5b5e25c6be9565ff85a68d0e73f29be3e1701d82520024130213031301c02cc030",
        "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f00000013001100000e6170692e6f",
        "70656e61692e636f6d000b000403000102000a00160014001d0017001e001900180100010101020103010400",
        "2300000016000000170000000d002a0028040305030603080708080809080a080b0804080508060401050106",
        "01030303010302040205020602002b00050403040303002d00020101003300260024001d00200607668f0003",
        "f271a7d426d8ca4dc956c40821afb75a10ba16587275e0e73a68001500df0000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000",
    );

    fn openssl_hello() -> Vec<u8> {
        hex::decode(OPENSSL_HELLO_HEX).unwrap()
    }

    fn parse_all(bytes: &[u8]) -> Option<FirstBytes> {
        ClientHelloParser::new().push(bytes)
    }

    fn hello(name: Option<&str>, ech: bool) -> FirstBytes {
        FirstBytes::ClientHello(ClientHelloInfo {
            server_name: name.map(String::from),
            encrypted_client_hello: ech,
        })
    }

    /// Re-frames a single-record ClientHello's message into records of `size` bytes each.
    fn reframe(single: &[u8], size: usize) -> Vec<u8> {
        let message = &single[RECORD_HEADER_LEN..];
        let mut out = Vec::new();
        for piece in message.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    /// Builds a ClientHello from its extensions (type, data), in one record.
    fn synthetic(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        framed(&body)
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(message.len() as u16).to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    fn sni_data(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    #[test]
    fn real_client_hellos_give_their_server_name() {
        assert_eq!(
            parse_all(&rustls_hello("api.openai.com")),
            Some(hello(Some("api.openai.com"), false))
        );
        assert_eq!(
            parse_all(&rustls_hello("API.OpenAI.com.")),
            Some(hello(Some("api.openai.com"), false)),
            "lowercase, no trailing dot, as CONNECT targets"
        );
        // An IP address is never sent as SNI.
        assert_eq!(
            parse_all(&rustls_hello("127.0.0.1")),
            Some(hello(None, false))
        );
        assert_eq!(
            parse_all(&openssl_hello()),
            Some(hello(Some("api.openai.com"), false))
        );
    }

    #[test]
    fn every_split_point_and_every_record_framing_give_the_same_answer() {
        for whole in [
            rustls_hello("api.openai.com"),
            rustls_hello("10.1.2.3"),
            openssl_hello(),
        ] {
            let expected = parse_all(&whole).unwrap();
            for cut in 0..=whole.len() {
                let mut parser = ClientHelloParser::new();
                let first = parser.push(&whole[..cut]);
                if cut < whole.len() {
                    assert_eq!(first, None, "decided after {cut} of {} bytes", whole.len());
                }
                assert_eq!(
                    parser.push(&whole[cut..]),
                    Some(expected.clone()),
                    "cut {cut}"
                );
                assert_eq!(parser.bytes(), &whole[..]);
            }
            // Byte by byte.
            let mut parser = ClientHelloParser::new();
            let answers: Vec<_> = whole.iter().map(|b| parser.push(&[*b])).collect();
            assert!(answers[..whole.len() - 1].iter().all(Option::is_none));
            assert_eq!(answers.last().unwrap(), &Some(expected.clone()));
            // The same message in records of 1, 2, 3, ... bytes (up to the record limit).
            let message_len = whole.len() - RECORD_HEADER_LEN;
            for size in (1..=message_len).filter(|s| message_len.div_ceil(*s) <= MAX_RECORDS) {
                let records = reframe(&whole, size);
                assert_eq!(
                    parse_all(&records),
                    Some(expected.clone()),
                    "records of {size}"
                );
                let mut parser = ClientHelloParser::new();
                for chunk in records.chunks(7) {
                    let _ = parser.push(chunk);
                }
                assert_eq!(parser.push(&[]), Some(expected.clone()));
            }
            let too_many = reframe(&whole, 1);
            assert_eq!(
                parse_all(&too_many),
                Some(FirstBytes::Invalid(HelloError::TooManyRecords))
            );
        }
    }

    #[test]
    fn bytes_after_the_hello_are_kept_for_replay_but_not_parsed() {
        let mut flight = rustls_hello("example.com");
        let hello_len = flight.len();
        // TLS 1.3 middlebox-compatibility CCS and early data follow in their own records.
        flight.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0x17, 0x03, 0x03]);
        let mut parser = ClientHelloParser::new();
        assert_eq!(
            parser.push(&flight),
            Some(hello(Some("example.com"), false))
        );
        assert_eq!(
            parser.push(b"more"),
            Some(hello(Some("example.com"), false))
        );
        assert_eq!(parser.bytes().len(), hello_len + 9 + 4);
        assert!(parser.into_bytes().ends_with(b"\x17\x03\x03more"));
    }

    #[test]
    fn ech_is_noticed_and_synthetic_hellos_parse() {
        let sni = sni_data(&[(0, b"public.example")]);
        assert_eq!(
            parse_all(&synthetic(&[(0, sni.clone()), (0xfe0d, vec![0; 40])])),
            Some(hello(Some("public.example"), true))
        );
        assert_eq!(
            parse_all(&synthetic(&[(0xfe0d, vec![])])),
            Some(hello(None, true))
        );
        assert_eq!(
            parse_all(&synthetic(&[(0x000a, vec![0, 2, 0, 0x1d]), (0, sni)])),
            Some(hello(Some("public.example"), false))
        );
        // No extensions at all (a TLS 1.0-style hello).
        let mut body = vec![0x03, 0x01];
        body.extend_from_slice(&[1u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0, 0x2f, 1, 0]);
        assert_eq!(parse_all(&framed(&body)), Some(hello(None, false)));
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for first in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x80\x2e\x01\x03\x01", // SSLv2-compatible hello: no TLS server reads it today
            b"\x16\x04\x01\x00\x05",
            b"\x16\x02",
            b"G",
        ] {
            assert_eq!(parse_all(first), Some(FirstBytes::NotTls), "{first:?}");
        }
        assert_eq!(parse_all(b""), None);
        assert_eq!(parse_all(b"\x16"), None);
        assert_eq!(parse_all(b"\x16\x03\x01\x00"), None);
    }

    #[test]
    fn hostile_hellos_are_refused_not_guessed() {
        let invalid = |bytes: &[u8]| match parse_all(bytes) {
            Some(FirstBytes::Invalid(e)) => e,
            other => panic!("{other:?} for {bytes:02x?}"),
        };
        let name = |n: &[u8]| sni_data(&[(0, n)]);
        let a = name(b"a.example");
        assert!(matches!(
            invalid(&synthetic(&[(0, a.clone()), (0, a.clone())])),
            HelloError::Malformed("two server_name extensions")
        ));
        assert!(matches!(
            invalid(&synthetic(&[(
                0,
                sni_data(&[(0, b"a.example"), (0, b"api.openai.com")])
            )])),
            HelloError::Malformed("two host names")
        ));
        for bad in [
            sni_data(&[(1, b"x")]),
            sni_data(&[]),
            name(b""),
            name(b"."),
            name(b"api.openai.com\0.evil"),
            name("ápi.openai.com".as_bytes()),
            vec![],
            vec![0, 3, 0, 0],
            [a.clone(), vec![0]].concat(),
        ] {
            invalid(&synthetic(&[(0, bad)]));
        }
        assert!(matches!(
            invalid(&synthetic(&[(0xfe0d, vec![]), (0xfe0d, vec![])])),
            HelloError::Malformed(_)
        ));
        // Record and message framing.
        let good = synthetic(&[(0, a.clone())]);
        let mut hs_type = good.clone();
        hs_type[5] = 2;
        assert_eq!(invalid(&hs_type), HelloError::NotClientHello(2));
        let mut huge = good.clone();
        huge[6..9].copy_from_slice(&[0x01, 0x00, 0x00]);
        assert_eq!(invalid(&huge), HelloError::TooLarge(65536));
        assert_eq!(
            invalid(b"\x16\x03\x01\x00\x00"),
            HelloError::RecordLength(0)
        );
        assert_eq!(
            invalid(b"\x16\x03\x01\x40\x01"),
            HelloError::RecordLength(16385)
        );
        // The record claims more than the message: trailing handshake bytes.
        let mut long_record = good.clone();
        let len = u16::from_be_bytes([good[3], good[4]]) + 1;
        long_record[3..5].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(invalid(&long_record), HelloError::Malformed(_)));
        // A second record that is not a handshake record, mid-hello.
        let split = reframe(&good, 10);
        let mut alert = split[..15].to_vec();
        alert.extend_from_slice(b"\x15\x03\x03\x00\x02\x02\x28");
        assert_eq!(invalid(&alert), HelloError::UnexpectedRecord(0x15));
        let mut version = split[..15].to_vec();
        version.extend_from_slice(b"\x16\x02\x00\x00\x01\x00");
        assert_eq!(invalid(&version), HelloError::RecordVersion(0x0200));
        // Every truncation of the body inside a complete message is malformed, never a panic.
        let body = &good[RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN..];
        for cut in 0..body.len() {
            match parse_all(&framed(&body[..cut])) {
                Some(FirstBytes::Invalid(_)) => {}
                // Cut right after the compression methods: a hello without extensions.
                Some(FirstBytes::ClientHello(h)) => assert_eq!(h.server_name, None),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn memory_stays_bounded_while_incomplete() {
        // A ClientHello announcing the largest allowed body, fed in the smallest records.
        let mut parser = ClientHelloParser::new();
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(MAX_HELLO_LEN as u32).to_be_bytes()[1..]);
        message.resize(HANDSHAKE_HEADER_LEN + MAX_HELLO_LEN, 0);
        let mut fed = 0;
        let mut answer = None;
        for piece in message.chunks(message.len().div_ceil(MAX_RECORDS)) {
            let mut record = vec![0x16, 0x03, 0x01];
            record.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            record.extend_from_slice(piece);
            assert!(record.len() <= parser.room(), "room said too little");
            fed += record.len();
            answer = parser.push(&record);
        }
        assert!(fed <= MAX_FLIGHT);
        assert!(matches!(answer, Some(FirstBytes::Invalid(_))), "{answer:?}");
        // Whatever arrives, an undecided parser has room left.
        let mut parser = ClientHelloParser::new();
        while parser.push(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x01]).is_none() {
            assert!(parser.room() > 0);
        }
    }

    #[tokio::test]
    async fn reading_stops_at_the_answer_within_the_timeout() {
        let whole = rustls_hello("api.anthropic.com");
        let (mut client, mut server) = tokio::io::duplex(64);
        let early = whole[..3].to_vec();
        let rest = whole[3..].to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in rest.chunks(50) {
                client.write_all(piece).await.unwrap();
            }
            client.write_all(b"after").await.unwrap();
            client
        });
        let (answer, bytes) = read_first_bytes(&mut server, &early, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(answer, hello(Some("api.anthropic.com"), false));
        assert!(bytes.starts_with(&whole));
        let _client = writer.await.unwrap();

        // Silence: the timeout, not a hang.
        let (_client, mut server) = tokio::io::duplex(64);
        let err = read_first_bytes(&mut server, &whole[..10], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadHelloError::TimedOut(_)), "{err}");
        // A close mid-hello.
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let err = read_first_bytes(&mut server, &whole[..10], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadHelloError::Closed), "{err}");
        // Not TLS: decided by the first byte, with nothing more read.
        let (_client, mut server) = tokio::io::duplex(64);
        let (answer, bytes) = read_first_bytes(&mut server, b"GET /", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((answer, &bytes[..]), (FirstBytes::NotTls, &b"GET /"[..]));
    }
}
