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

/// A site on 127.0.0.1 reached through tunnels: TLS with its own self-signed certificate for
/// `names` (DNS names or IP addresses), recording the SNI of every ClientHello it receives
/// (`None` for a hello without one) and echoing what it is sent.
pub struct TlsEchoSite {
    pub port: u16,
    /// Its certificate, for clients to trust.
    pub cert: Vec<CertificateDer<'static>>,
    hellos: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl TlsEchoSite {
    pub async fn start(names: &[&str]) -> TlsEchoSite {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let der = vec![cert.der().clone()];
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            der.clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hellos = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = hellos.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (config, seen) = (config.clone(), seen.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Ok(start) = acceptor.await else { return };
                    let sni = start.client_hello().server_name().map(String::from);
                    seen.lock().unwrap().push(sni);
                    let Ok(mut tls) = start.into_stream(config).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsEchoSite {
            port,
            cert: der,
            hellos,
        }
    }

    /// The SNI of every ClientHello received so far, in order.
    pub fn hellos(&self) -> Vec<Option<String>> {
        self.hellos.lock().unwrap().clone()
    }
}
