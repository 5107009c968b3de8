//! The MITM path's cost, on loopback:
//!
//! - `mitm/mint_leaf`: minting one leaf certificate (ECDSA P-256 key + certificate signed by an
//!   ECDSA P-256 CA), in process.
//! - `mitm/connect/*`: time from nothing to a usable TLS connection to `https://HOST`, the way a
//!   client sees it:
//!   - `direct_tls`: TCP connect + TLS handshake to a local TLS server (the baseline);
//!   - `proxy_cached`: TCP connect to the proxy + `CONNECT` with credentials + `200` + the MITM
//!     handshake, the host's leaf already cached;
//!   - `proxy_first_connect_mint`: the same for a host whose leaf is not cached, so the proxy
//!     mints one during the handshake. The hosts cycle through more names than the leaf cache
//!     holds (first in, first out), so every iteration mints.
//!
//!   The proxy's added latency is `proxy_* − direct_tls`.
//!
//! The proxy is the real `tollgate` binary (the release build under `cargo bench`), started in a
//! temp directory with its own CA, user and key; the clients are tokio-rustls in this process.
//! Run with `cargo bench --bench mitm`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::tls::MitmCa;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
/// More than the proxy's leaf cache holds (1024), so cycling through them always mints.
const MINT_HOSTS: usize = 1100;

fn mint(c: &mut Criterion) {
    let generated = tollgate::tls::generate_ca().expect("generate CA");
    let ca = MitmCa::from_pem(&generated.cert_pem, &generated.key_pem).expect("load CA");
    c.bench_function("mitm/mint_leaf", |b| {
        b.iter(|| ca.mint("api.openai.com").expect("mint"))
    });
}

/// A running `tollgate serve` with the proxy on, killed on drop.
struct Proxy {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
    key: String,
    ca: Vec<CertificateDer<'static>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start() -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let run = |args: &[&str]| {
            let out = Command::new(BIN)
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run tollgate");
            assert!(out.status.success(), "tollgate {args:?}: {out:?}");
            String::from_utf8(out.stdout).expect("utf-8")
        };
        run(&["ca", "init"]);
        let hosts: Vec<String> = std::iter::once("api.openai.com".to_string())
            .chain((0..MINT_HOSTS).map(|i| format!("h{i}.mint.bench")))
            .collect();
        let config = format!(
            "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ngrace_period_seconds = 0\n\
             [database]\nurl = \"sqlite://{db}\"\n\
             [providers.openai]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9\"\nmitm_hosts = {hosts:?}\n\
             [proxy]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
            db = dir.path().join("t.db").display()
        );
        std::fs::write(dir.path().join("tollgate.toml"), config).expect("write config");
        run(&["users", "create", "bench", "--config", "tollgate.toml"]);
        let key = run(&[
            "keys",
            "create",
            "--user",
            "bench",
            "--config",
            "tollgate.toml",
        ])
        .trim()
        .to_string();
        let mut child = Command::new(BIN)
            .args(["serve", "--config", "tollgate.toml"])
            .current_dir(dir.path())
            .env_remove("TOLLGATE_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tollgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "listening" && v["listener"] == "proxy" {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the proxy listener did not start");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "proxy port never opened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ca_pem = std::fs::read_to_string(dir.path().join("certs/ca.pem")).expect("ca.pem");
        Proxy {
            child,
            ca: certs(&ca_pem),
            addr,
            key,
            _dir: dir,
        }
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

fn connector(roots: &[CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Every iteration is a new client: no session resumption.
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS server for `api.openai.com` (certificate from a throwaway CA) that accepts and holds
/// connections: the direct baseline. Returns its address and the CA to trust.
async fn direct_server() -> (String, Vec<CertificateDer<'static>>) {
    let generated = tollgate::tls::generate_ca().expect("generate CA");
    let ca = MitmCa::from_pem(&generated.cert_pem, &generated.key_pem).expect("load CA");
    let leaf = ca.mint("api.openai.com").expect("mint");
    let resolver = Arc::new(Fixed(Arc::new(leaf)));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut sink = [0u8; 64];
                    let _ = tls.read(&mut sink).await;
                }
            });
        }
    });
    (addr, certs(&generated.cert_pem))
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// CONNECT `host:443` through the proxy, then the MITM handshake for `host`.
async fn via_proxy(proxy: &Proxy, tls: &tokio_rustls::TlsConnector, host: &str, auth: &str) {
    let mut tcp = TcpStream::connect(&proxy.addr)
        .await
        .expect("connect proxy");
    let _ = tcp.set_nodelay(true);
    tcp.write_all(
        format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send CONNECT");
    // "HTTP/1.1 200 Connection Established\r\n\r\n" is 39 bytes.
    let mut head = [0u8; 39];
    tcp.read_exact(&mut head).await.expect("CONNECT answer");
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let name = ServerName::try_from(host.to_string()).expect("server name");
    let conn = tls.connect(name, tcp).await.expect("MITM handshake");
    drop(conn);
}

async fn direct(addr: &str, tls: &tokio_rustls::TlsConnector) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("api.openai.com").expect("server name");
    let conn = tls.connect(name, tcp).await.expect("handshake");
    drop(conn);
}

fn connect(c: &mut Criterion) {
    if !Path::new(BIN).exists() {
        println!("mitm: {BIN} is missing; skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let proxy = Proxy::start();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("bench:{}", proxy.key));
    let (direct_addr, direct_ca) = rt.block_on(direct_server());
    let direct_tls = connector(&direct_ca);
    let proxy_tls = connector(&proxy.ca);
    // Warm the key cache and the cached host's leaf.
    rt.block_on(via_proxy(&proxy, &proxy_tls, "api.openai.com", &auth));

    let mut group = c.benchmark_group("mitm/connect");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("direct_tls", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    direct(&direct_addr, &direct_tls).await;
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("proxy_cached", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    via_proxy(&proxy, &proxy_tls, "api.openai.com", &auth).await;
                }
                start.elapsed()
            })
        })
    });
    let next = AtomicUsize::new(0);
    group.bench_function("proxy_first_connect_mint", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let i = next.fetch_add(1, Ordering::Relaxed) % MINT_HOSTS;
                    via_proxy(&proxy, &proxy_tls, &format!("h{i}.mint.bench"), &auth).await;
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, mint, connect);
criterion_main!(benches);
