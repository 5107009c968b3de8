//! Raw CONNECT tunnels through the proxy front door, for tests that must control exactly which
//! connection a request rides (an HTTP client's pool may race a fresh CONNECT against a pooled
//! one) or send what an HTTP client will not.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a CONNECT tunnel through the proxy and returns the socket once the response head has
/// been read, with that head.
pub async fn connect_tunnel(addr: &str, target: &str, key: Option<&str>) -> (TcpStream, String) {
    connect_tunnel_within(addr, target, key, Duration::from_secs(10)).await
}

/// [`connect_tunnel`], waiting up to `wait` for each byte of the response head.
pub async fn connect_tunnel_within(
    addr: &str,
    target: &str,
    key: Option<&str>,
    wait: Duration,
) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = key
        .map(|k| {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("tollgate:{k}"));
            format!("Proxy-Authorization: Basic {b64}\r\n")
        })
        .unwrap_or_default();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    // Read the response head byte by byte so no tunnel byte is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(wait, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Reads one HTTP/1.1 response with a Content-Length body: (status, body).
pub async fn read_h1_response<S: AsyncRead + Unpin>(s: &mut S) -> (u16, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "connection closed mid-head"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (status, body)
}

/// A TLS client trusting only `roots` (the Tollgate CA), offering no ALPN.
pub fn tls_client(roots: &[CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    tls_client_alpn(roots, &[])
}

/// A TLS client trusting only `roots`, offering `alpn`.
pub fn tls_client_alpn(
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The certificates in a PEM bundle.
pub fn der_of(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A TCP connection to `addr` made from the loopback address `source` (e.g. `127.0.0.2`: a
/// second client address on the same machine, for per-address limits).
pub async fn connect_from(source: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// Sends raw bytes to `addr` and returns everything answered until close (or `wait`).
pub async fn raw_exchange(addr: &str, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
