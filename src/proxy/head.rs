//! The first request head on a proxy connection: read (bounded), parsed with httparse, and, for
//! CONNECT, its target and proxy credentials.
//!
//! Not here: what to do with the request (`proxy`), or any HTTP after the head (pingora).

use std::net::IpAddr;

use base64::Engine;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Headers counted per request head at most; more is refused like an oversized head.
const MAX_HEADERS: usize = 64;

/// Why no usable request head arrived.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the client closed the connection before a complete request head")]
    Closed,
    #[error("the request head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("not an HTTP request: {0}")]
    Malformed(httparse::Error),
    #[error("reading the request head failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A complete request head, as far as the proxy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// The raw `Proxy-Authorization` value, if any.
    pub proxy_authorization: Option<String>,
    /// Bytes of the head, including its final blank line.
    pub len: usize,
}

/// Reads from `stream` into `buf` until a whole request head parses, at most `cap` bytes.
/// Whatever the client sent after the head stays in `buf` after `len`.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cap: usize,
) -> Result<RequestHead, HeadError> {
    loop {
        if let Some(head) = parse_head(buf)? {
            return Ok(head);
        }
        if buf.len() >= cap {
            return Err(HeadError::TooLarge(cap));
        }
        let room = (cap - buf.len()).min(4096);
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Ok(None)` while the head is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let proxy_authorization = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| v.trim().to_string());
            Ok(Some(RequestHead {
                method: req.method.unwrap_or_default().to_string(),
                target: req.path.unwrap_or_default().to_string(),
                proxy_authorization,
                len,
            }))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge(MAX_HEADERS)),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// A CONNECT target: lowercase host (IPv6 without brackets, no trailing dot) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub port: u16,
}

impl Authority {
    /// `host:port` / `[v6]:port`, the request target of a CONNECT (RFC 9110 §9.3.6).
    pub fn parse(target: &str) -> Result<Authority, String> {
        let (host, port) = if let Some(rest) = target.strip_prefix('[') {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{target:?} is not [ipv6]:port"))?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{target:?} has an invalid IPv6 address"))?;
            (v6, port)
        } else {
            target
                .rsplit_once(':')
                .ok_or_else(|| format!("CONNECT needs host:port, got {target:?} (no port)"))?
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{target:?} has an invalid port"))?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
        if !valid {
            return Err(format!("{target:?} does not name a host"));
        }
        Ok(Authority { host, port })
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The password of `Proxy-Authorization: Basic base64(user:password)` (the user name is
/// ignored): the caller's Tollgate key. `None` for any other scheme or a malformed value.
pub fn proxy_key(header: &str) -> Option<String> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    let password = password.trim();
    (!password.is_empty()).then(|| password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_head_parses_with_its_credentials() {
        let raw = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\nProxy-Authorization: Basic dG9sbGdhdGU6dGdfc2VjcmV0\r\n\r\n\x16\x03\x01";
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.method, "CONNECT");
        assert_eq!(head.target, "api.openai.com:443");
        assert_eq!(
            head.len,
            raw.len() - 3,
            "the ClientHello bytes stay after the head"
        );
        assert_eq!(
            proxy_key(head.proxy_authorization.as_deref().unwrap()).as_deref(),
            Some("tg_secret")
        );
    }

    #[test]
    fn incomplete_garbage_and_huge_heads() {
        assert!(parse_head(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost:")
            .unwrap()
            .is_none());
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_head(b"hello there\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
        let raw = format!("CONNECT a:443 HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_head(raw.as_bytes()),
            Err(HeadError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn reading_stops_at_the_cap() {
        let mut big = b"CONNECT a:443 HTTP/1.1\r\nx: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 100_000));
        let mut buf = BytesMut::new();
        let err = read_head(&mut &big[..], &mut buf, 16 * 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, HeadError::TooLarge(16384)));
        assert_eq!(buf.len(), 16 * 1024);
        let mut buf = BytesMut::new();
        let err = read_head(&mut &b"CONNECT a:443 HTTP/1.1\r\n"[..], &mut buf, 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, HeadError::Closed));
    }

    #[test]
    fn authorities() {
        let a = Authority::parse("API.OpenAI.com.:443").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("api.openai.com", 443));
        let a = Authority::parse("[::1]:443").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 443));
        assert_eq!(a.to_string(), "[::1]:443");
        assert_eq!(Authority::parse("10.0.0.1:80").unwrap().port, 80);
        for bad in [
            "api.openai.com",
            "api.openai.com:",
            "api.openai.com:0",
            "api.openai.com:99999",
            ":443",
            "[::1]",
            "[nothost]:443",
            "a b:443",
            "evil/path:443",
            "user@host:443",
        ] {
            assert!(Authority::parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_the_parsers_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_head(&bytes);
            let text = String::from_utf8_lossy(&bytes);
            let _ = Authority::parse(&text);
            let _ = proxy_key(&text);
            let mut connect = b"CONNECT ".to_vec();
            connect.extend_from_slice(&bytes);
            let _ = parse_head(&connect);
        }

        #[test]
        fn any_valid_authority_round_trips(host in "[a-z0-9][a-z0-9.-]{0,40}", port in 1u16..) {
            let a = Authority::parse(&format!("{host}:{port}")).unwrap();
            proptest::prop_assert_eq!(a.port, port);
            proptest::prop_assert_eq!(Authority::parse(&a.to_string()).unwrap(), a);
        }
    }

    #[test]
    fn proxy_keys() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            proxy_key(&format!("Basic {}", b64("anyone:tg_k"))).as_deref(),
            Some("tg_k")
        );
        assert_eq!(
            proxy_key(&format!("basic {}", b64(":tg_k"))).as_deref(),
            Some("tg_k")
        );
        assert_eq!(proxy_key(&format!("Basic {}", b64("user:"))), None);
        assert_eq!(proxy_key(&format!("Basic {}", b64("nocolon"))), None);
        assert_eq!(proxy_key("Bearer tg_k"), None);
        assert_eq!(proxy_key("Basic !!!"), None);
        assert_eq!(proxy_key("Basic"), None);
    }
}
