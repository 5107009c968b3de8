//! The HTTPS_PROXY front door: a pingora `ServerApp` that answers CONNECT.
//!
//! For each connection on the proxy listener (after the listener's own TLS, when the proxy URL
//! is `https://`):
//! 0. The connection needs a place from the proxy listener's [`ConnectionLimiter`] (in all and
//!    per client address); without one it is turned away.
//! 1. [`head::read_head`] reads the first request head (at most `server.max_request_head_bytes`,
//!    431 above; within the handshake timeout).
//! 2. Not a CONNECT: the connection, with the bytes already read put back in front
//!    ([`stream::PrefixedStream`]), goes to the gateway listener's loop ([`GatewayListener`]),
//!    so the proxy port also serves the provider routes, with every later head bounded too.
//! 3. CONNECT to a port not in `proxy.allowed_ports` (80 and 443 by default): 403.
//! 4. CONNECT to a host in some provider's `mitm_hosts`: the `Proxy-Authorization: Basic` password
//!    must be a valid Tollgate key (else 407). Then `200`, a TLS handshake with a leaf minted for
//!    that host ([`mitm`]), and the decrypted connection is served around
//!    [`Gateway::for_tunnel`]: every request inside goes to that provider, as the key's owner,
//!    through the same pipeline as the gateway routes. HTTP/1.1 goes through the gateway
//!    listener's loop (every head bounded in time and size), HTTP/2 through a pingora
//!    `HttpProxy` (its header lists capped at `server.max_request_head_bytes`).
//! 5. Any other CONNECT: refused when `proxy.tunnel = "deny"`; else resolved, checked against
//!    the destination policy ([`destination`]) and connected, then `200`. The client's first
//!    bytes are read ([`client_hello`], within the handshake timeout) and judged ([`governed`]):
//!    a ClientHello naming a MITM host is intercepted as in step 4 (key required), a tunnel to
//!    a MITM host's address must name another host in clear, anything else is tunnelled
//!    unchanged with those bytes replayed ([`tunnel`]).
//!
//! Every refusal before `200` is a [`ConnectRefusal`], rendered in one place ([`respond`]) as a
//! small plain-text HTTP/1.1 response followed by a close; a tunnel refused after `200` is a
//! [`TunnelRefusal`], answered with a TLS alert or a bare close ([`ForwardProxy::refuse_tunnel`]).
//! Nothing a client sends can panic this path: every parse returns an error, every wait has a
//! timeout, every buffer a bound.
//!
//! Not here: request handling inside the tunnel (`gateway`), certificates (`tls`).

pub mod client_hello;
pub mod destination;
mod governed;
mod head;
mod mitm;
mod stream;
mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::{Ssl, Stream, ALPN};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::AppState;
use crate::auth::failures::Throttled;
use crate::auth::KeyCheckError;
use crate::config::{ProxyConfig, TunnelPolicy};
use crate::front_door::connections::turn_away;
use crate::front_door::{linger_close, ClientKey, ConnectionLimiter, HeadLimits, LINGER};
use crate::gateway::{Gateway, GatewayListener};
use crate::telemetry::metric;
use crate::tls::{LeafCertCache, MitmCa, TlsError};

use client_hello::ReadHelloError;
use destination::DestinationPolicy;
use governed::{GovernedAddresses, TunnelRefusal, Verdict};
pub use head::{parse_head, proxy_key, Authority, HeadError, RequestHead};
use mitm::{MitmHost, MitmHosts};
use stream::PrefixedStream;
use tunnel::{DialError, TunnelEnd};

/// Hosts whose leaf certificates are kept (far more than any configured `mitm_hosts`).
const LEAF_CACHE_CAPACITY: usize = 1024;
/// Resolving and connecting to a tunnel destination.
const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the MITM hosts' addresses to be resolved again (it runs while the client
/// sends its ClientHello); past it, the addresses known so far decide.
const GOVERNED_LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyStartError {
    #[error("proxy.enabled is true but the CA {missing} does not exist; create one with `tollgate ca init --out {dir}` (or point proxy.ca_cert / proxy.ca_key at your corporate CA)")]
    CaMissing { missing: String, dir: String },
    #[error("proxy.ca_cert / proxy.ca_key: {0}")]
    Ca(TlsError),
    #[error("proxy.tls_cert / proxy.tls_key: {0}")]
    ListenerTls(TlsError),
}

/// A CONNECT (or a request head) the proxy refuses; see [`respond`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("the request head is larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("CONNECT is allowed to ports {allowed} only, not {port} (proxy.allowed_ports)")]
    PortNotAllowed { port: u16, allowed: String },
    #[error(
        "tunnels to hosts Tollgate does not intercept are disabled (proxy.tunnel = \"deny\"): {0}"
    )]
    TunnelDenied(String),
    #[error("{0}")]
    ReservedDestination(String),
    #[error("{0}: send your Tollgate key as the proxy password (HTTPS_PROXY=http://tollgate:KEY@host:port)")]
    ProxyAuthRequired(&'static str),
    #[error("Tollgate cannot check keys right now (database unavailable)")]
    KeyCheckUnavailable,
    #[error("{0}: the proxy password was not checked")]
    AuthThrottled(Throttled),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0} is intercepted by Tollgate: the client must start TLS inside the tunnel")]
    NotTls(String),
}

impl ConnectRefusal {
    fn status(&self) -> (u16, &'static str) {
        match self {
            ConnectRefusal::BadRequest(_) | ConnectRefusal::NotTls(_) => (400, "Bad Request"),
            ConnectRefusal::HeadTooLarge(_) => (431, "Request Header Fields Too Large"),
            ConnectRefusal::PortNotAllowed { .. }
            | ConnectRefusal::TunnelDenied(_)
            | ConnectRefusal::ReservedDestination(_) => (403, "Forbidden"),
            ConnectRefusal::ProxyAuthRequired(_) => (407, "Proxy Authentication Required"),
            ConnectRefusal::KeyCheckUnavailable => (503, "Service Unavailable"),
            ConnectRefusal::AuthThrottled(_) => (429, "Too Many Requests"),
            ConnectRefusal::Unreachable(_) => (502, "Bad Gateway"),
            ConnectRefusal::UpstreamTimeout(_) => (504, "Gateway Timeout"),
        }
    }

    /// The label in logs.
    fn reason(&self) -> &'static str {
        match self {
            ConnectRefusal::BadRequest(_) => "bad_request",
            ConnectRefusal::HeadTooLarge(_) => "head_too_large",
            ConnectRefusal::PortNotAllowed { .. } => "port_not_allowed",
            ConnectRefusal::TunnelDenied(_) => "tunnel_denied",
            ConnectRefusal::ReservedDestination(_) => "reserved_destination",
            ConnectRefusal::ProxyAuthRequired(_) => "proxy_auth_required",
            ConnectRefusal::KeyCheckUnavailable => "key_check_unavailable",
            ConnectRefusal::AuthThrottled(_) => "auth_throttled",
            ConnectRefusal::Unreachable(_) => "unreachable",
            ConnectRefusal::UpstreamTimeout(_) => "timeout",
            ConnectRefusal::NotTls(_) => "not_tls",
        }
    }
}

impl From<DialError> for ConnectRefusal {
    fn from(e: DialError) -> ConnectRefusal {
        match e {
            DialError::Reserved { .. } => ConnectRefusal::ReservedDestination(e.to_string()),
            DialError::TimedOut { .. } => ConnectRefusal::UpstreamTimeout(e.to_string()),
            DialError::Resolve { .. } | DialError::Connect { .. } => {
                ConnectRefusal::Unreachable(e.to_string())
            }
        }
    }
}

/// Timeouts and policies, from `[proxy]`.
#[derive(Debug, Clone)]
struct ProxySettings {
    handshake_timeout: Duration,
    idle_timeout: Duration,
    tunnel: TunnelPolicy,
    destinations: DestinationPolicy,
    allowed_ports: Vec<u16>,
}

/// The proxy listener's application. See the module docs.
pub struct ForwardProxy {
    state: Arc<AppState>,
    settings: ProxySettings,
    mitm: MitmHosts,
    /// The MITM hosts' addresses, so a tunnel cannot reach them blind.
    governed: GovernedAddresses,
    /// The listener's own TLS (an `https://` proxy URL).
    listener_tls: Option<Acceptor>,
    /// The gateway for requests that are not CONNECT.
    gateway: GatewayListener,
    /// Bounds on every request head (the CONNECT's, and every head inside an HTTP/1.1 tunnel).
    heads: HeadLimits,
    /// The proxy listener's connection limits.
    connections: Arc<ConnectionLimiter>,
    /// pingora configuration for the per-tunnel `HttpProxy`s (see [`tunnel_server_conf`]).
    tunnel_conf: Arc<ServerConf>,
    tunnel_options: HttpServerOptions,
}

impl ForwardProxy {
    /// Loads and checks the CA (and the listener certificate, if any) and prepares a TLS
    /// configuration per MITM host. Fails with a message that names the config key.
    pub fn new(
        state: Arc<AppState>,
        config: &ProxyConfig,
        heads: HeadLimits,
        connections: Arc<ConnectionLimiter>,
    ) -> Result<ForwardProxy, ProxyStartError> {
        for path in [&config.ca_cert, &config.ca_key] {
            if !path.exists() {
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| ".".into());
                return Err(ProxyStartError::CaMissing {
                    missing: path.display().to_string(),
                    dir,
                });
            }
        }
        let ca = MitmCa::load(&config.ca_cert, &config.ca_key).map_err(ProxyStartError::Ca)?;
        let (subject, intermediates) = (ca.subject().to_string(), ca.intermediates().len());
        let leaves = Arc::new(LeafCertCache::new(ca, LEAF_CACHE_CAPACITY));
        let mitm = MitmHosts::new(&state, &leaves).map_err(ProxyStartError::Ca)?;
        let governed = GovernedAddresses::new(mitm.names().map(String::from));
        tracing::info!(ca = %subject, intermediates, mitm_hosts = mitm.len(), "proxy CA loaded");
        let listener_tls = match &config.tls {
            Some(files) => {
                let cert = crate::tls::load_server_cert(&files.cert, &files.key)
                    .map_err(ProxyStartError::ListenerTls)?;
                Some(mitm::listener_acceptor(cert).map_err(ProxyStartError::ListenerTls)?)
            }
            None => None,
        };
        let tunnel_conf = tunnel_server_conf(state.config().server.threads);
        let mut tunnel_options = HttpServerOptions::default();
        tunnel_options.h2_idle_timeout = Some(config.idle_timeout);
        let gateway = GatewayListener::new(Gateway::new(state.clone()), heads, None);
        Ok(ForwardProxy {
            settings: ProxySettings {
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
                tunnel: config.tunnel,
                destinations: DestinationPolicy::new(config.allowed_private_cidrs.clone()),
                allowed_ports: config.allowed_ports.clone(),
            },
            mitm,
            governed,
            listener_tls,
            gateway,
            heads,
            connections,
            tunnel_conf,
            tunnel_options,
            state,
        })
    }

    /// `https` when the listener itself speaks TLS.
    pub fn scheme(&self) -> &'static str {
        if self.listener_tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// One connection, from its first byte to its end.
    async fn serve(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let peer = peer_of(&stream);
        let client = ClientKey::of_stream(&stream);
        let mut stream: Stream = match &self.listener_tls {
            None => stream,
            Some(tls) => {
                let io = PrefixedStream::new(Bytes::new(), stream);
                match tokio::time::timeout(self.settings.handshake_timeout, tls.tls_handshake(io))
                    .await
                {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "proxy listener TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, "proxy listener TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        let mut buf = BytesMut::with_capacity(1024);
        let read = tokio::time::timeout(
            self.settings.handshake_timeout,
            head::read_head(&mut stream, &mut buf, self.heads.max_bytes),
        )
        .await;
        let head = match read {
            Ok(Ok(head)) => head,
            Ok(Err(HeadError::TooLarge(_))) => {
                metrics::counter!(metric::REQUEST_HEADS_TOO_LARGE_TOTAL).increment(1);
                let refusal = ConnectRefusal::HeadTooLarge(self.heads.max_bytes);
                log_refusal(&peer, None, &refusal);
                respond(stream, &refusal).await;
                return;
            }
            Ok(Err(HeadError::Malformed(e))) => {
                let refusal = ConnectRefusal::BadRequest(format!(
                    "not an HTTP request ({e}); this is Tollgate's proxy port: send CONNECT host:443"
                ));
                log_refusal(&peer, None, &refusal);
                respond(stream, &refusal).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "proxy connection ended before a request head");
                return;
            }
            Err(_) => {
                if !buf.is_empty() {
                    metrics::counter!(metric::CLIENT_HEADER_TIMEOUTS_TOTAL).increment(1);
                }
                tracing::debug!(peer = %peer, "no request head within the handshake timeout; closing");
                return;
            }
        };
        if !head.method.eq_ignore_ascii_case("CONNECT") {
            // The gateway reads the head again from the replayed bytes.
            let replay = PrefixedStream::new(buf.freeze(), stream);
            self.gateway
                .serve_connection(Box::new(replay), shutdown)
                .await;
            return;
        }
        let early = buf.split_off(head.len).freeze();
        let target = match Authority::parse(&head.target) {
            Ok(t) => t,
            Err(msg) => {
                return self
                    .deny(stream, &peer, None, ConnectRefusal::BadRequest(msg))
                    .await
            }
        };
        if !self.settings.allowed_ports.contains(&target.port) {
            let allowed = self.settings.allowed_ports.iter().map(u16::to_string);
            let refusal = ConnectRefusal::PortNotAllowed {
                port: target.port,
                allowed: allowed.collect::<Vec<_>>().join(", "),
            };
            return self.deny(stream, &peer, Some(&target), refusal).await;
        }
        match self.mitm.get(&target.host) {
            Some(host) => {
                let key = match self.check_key(&head, client).await {
                    Ok(key) => key,
                    Err(refusal) => return self.deny(stream, &peer, Some(&target), refusal).await,
                };
                self.intercept(stream, &peer, &target, host, key, early, shutdown)
                    .await
            }
            None => {
                self.tunnel(stream, &peer, &target, &head, early, shutdown)
                    .await
            }
        }
    }

    /// The proxy password must be a valid Tollgate key before anything is decrypted.
    async fn check_key(
        &self,
        head: &RequestHead,
        client: ClientKey,
    ) -> Result<String, ConnectRefusal> {
        let Some(key) = head.proxy_authorization.as_deref().and_then(proxy_key) else {
            return Err(ConnectRefusal::ProxyAuthRequired(
                "missing proxy credentials",
            ));
        };
        match self
            .state
            .keys
            .resolve(&key, client, &self.state.store, &self.state.db)
            .await
        {
            Ok(Some(_)) => Ok(key),
            Ok(None) => Err(ConnectRefusal::ProxyAuthRequired(
                "invalid or revoked Tollgate key",
            )),
            Err(KeyCheckError::Throttled(throttled)) => {
                Err(ConnectRefusal::AuthThrottled(throttled))
            }
            Err(KeyCheckError::Store(e)) => {
                tracing::error!(error = %e, "key lookup for a CONNECT failed");
                Err(ConnectRefusal::KeyCheckUnavailable)
            }
        }
    }

    /// `200`, then TLS with a minted leaf, then the gateway for this host's provider.
    #[allow(clippy::too_many_arguments)]
    async fn intercept(
        &self,
        mut stream: Stream,
        peer: &str,
        target: &Authority,
        host: &MitmHost,
        key: String,
        early: Bytes,
        shutdown: &ShutdownWatch,
    ) {
        metrics::counter!(metric::PROXY_CONNECTS_TOTAL, "mode" => "mitm").increment(1);
        tracing::info!(peer = %peer, target = %target, provider = %host.provider.name, mode = "mitm", "proxy connect");
        if write_established(&mut stream).await.is_err() {
            return;
        }
        let session = MitmSession {
            peer,
            target,
            host,
            key,
        };
        self.decrypt(stream, session, early, shutdown).await
    }

    /// After `200`: the client's TLS handshake with a leaf for the session's host (the bytes in
    /// `early` first), then the gateway for that host's provider, as the key's owner.
    async fn decrypt(
        &self,
        mut stream: Stream,
        session: MitmSession<'_>,
        early: Bytes,
        shutdown: &ShutdownWatch,
    ) {
        let MitmSession {
            peer,
            target,
            host,
            key,
        } = session;
        let deadline = tokio::time::Instant::now() + self.settings.handshake_timeout;
        // The first byte says whether a TLS handshake follows; plain HTTP gets a readable answer.
        let early = if early.is_empty() {
            let mut first = vec![0u8; 4096];
            match tokio::time::timeout_at(deadline, stream.read(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {
                    first.truncate(n);
                    Bytes::from(first)
                }
                Ok(_) => return,
                Err(_) => {
                    tracing::info!(peer = %peer, target = %target, "MITM handshake timed out");
                    return;
                }
            }
        } else {
            early
        };
        const TLS_HANDSHAKE_RECORD: u8 = 0x16;
        if early.first() != Some(&TLS_HANDSHAKE_RECORD) {
            let refusal = ConnectRefusal::NotTls(target.host.clone());
            log_refusal(peer, Some(target), &refusal);
            respond(stream, &refusal).await;
            return;
        }
        let io = PrefixedStream::new(early, stream);
        let tls = match tokio::time::timeout_at(deadline, host.acceptor.tls_handshake(io)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(peer = %peer, target = %target, error = %e, "MITM handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(peer = %peer, target = %target, "MITM handshake timed out");
                return;
            }
        };
        let gateway = Gateway::for_tunnel(self.state.clone(), host.provider.clone(), key);
        if tls.selected_alpn_proto() != Some(ALPN::H2) {
            // HTTP/1.1: the gateway listener's loop bounds every head in the tunnel.
            GatewayListener::new(gateway, self.heads, None)
                .serve_connection(Box::new(tls), shutdown)
                .await;
            return;
        }
        // An HTTP/2 client sends its preface right after the handshake; pingora would wait for
        // it without a limit, so it must arrive within the handshake timeout.
        let mut preface = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + self.settings.handshake_timeout;
        let mut tls = tls;
        let decrypted: Stream = match tokio::time::timeout_at(deadline, tls.read(&mut preface))
            .await
        {
            Ok(Ok(n)) if n > 0 => {
                preface.truncate(n);
                Box::new(PrefixedStream::new(Bytes::from(preface), Box::new(tls)))
            }
            _ => {
                tracing::info!(peer = %peer, target = %target, "no HTTP/2 preface after the MITM handshake; closing");
                return;
            }
        };
        // One HttpProxy per tunnel: it carries the provider and the caller for every stream.
        let mut proxy = pingora::proxy::http_proxy(&self.tunnel_conf, gateway);
        proxy.server_options = Some(self.tunnel_options.clone());
        let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
        h2.max_header_list_size(u32::try_from(self.heads.max_bytes).unwrap_or(u32::MAX));
        proxy.h2_options = Some(h2);
        Arc::new(proxy).process_new(decrypted, shutdown).await;
    }

    /// A CONNECT to a host Tollgate does not intercept: connected, then judged on the client's
    /// first bytes (see the module docs): tunnelled unchanged, intercepted, or refused.
    #[allow(clippy::too_many_arguments)]
    async fn tunnel(
        &self,
        mut stream: Stream,
        peer: &str,
        target: &Authority,
        head: &RequestHead,
        early: Bytes,
        shutdown: &ShutdownWatch,
    ) {
        if self.settings.tunnel == TunnelPolicy::Deny {
            let refusal = ConnectRefusal::TunnelDenied(target.to_string());
            return self.deny(stream, peer, Some(target), refusal).await;
        }
        let (mut upstream, addr) =
            match tunnel::dial(target, &self.settings.destinations, TUNNEL_CONNECT_TIMEOUT).await {
                Ok(c) => c,
                Err(e) => return self.deny(stream, peer, Some(target), e.into()).await,
            };
        if write_established(&mut stream).await.is_err() {
            return;
        }
        // Waiting for a ClientHello that never comes must not open the tunnel, or a client
        // would simply wait to get past the checks.
        let timeout = self.settings.handshake_timeout;
        let (first, governed) = tokio::join!(
            client_hello::read_first_bytes(&mut stream, &early, timeout),
            self.governed
                .lookup(addr.ip(), GOVERNED_LOOKUP_WAIT.min(timeout)),
        );
        let (first, replay) = match first {
            Ok(read) => read,
            Err(ReadHelloError::TimedOut(after)) => {
                let refusal = TunnelRefusal::NoFirstMessage(after);
                return self.refuse_tunnel(stream, peer, target, refusal).await;
            }
            Err(e) => {
                tracing::debug!(peer = %peer, target = %target, error = %e, "tunnel ended before its first message");
                return;
            }
        };
        let server_name = match &first {
            client_hello::FirstBytes::ClientHello(hello) => hello.server_name.clone(),
            _ => None,
        };
        match governed::judge(&first, |name| self.mitm.get(name), governed) {
            Verdict::Tunnel => {}
            Verdict::Refuse(refusal) => {
                return self.refuse_tunnel(stream, peer, target, refusal).await
            }
            Verdict::Intercept { host, server_name } => {
                drop(upstream);
                let key = match self.check_key(head, ClientKey::of_stream(&stream)).await {
                    Ok(key) => key,
                    Err(refusal) => {
                        let refusal = TunnelRefusal::GovernedHostBySni {
                            server_name,
                            cause: refusal.to_string(),
                        };
                        return self.refuse_tunnel(stream, peer, target, refusal).await;
                    }
                };
                metrics::counter!(metric::PROXY_CONNECTS_TOTAL, "mode" => "mitm").increment(1);
                tracing::info!(peer = %peer, target = %target, sni = %server_name, provider = %host.provider.name, mode = "mitm", "proxy connect");
                let session = MitmSession {
                    peer,
                    target,
                    host,
                    key,
                };
                return self.decrypt(stream, session, replay, shutdown).await;
            }
        }
        metrics::counter!(metric::PROXY_CONNECTS_TOTAL, "mode" => "tunnel").increment(1);
        let sni = server_name.unwrap_or_default();
        tracing::info!(peer = %peer, target = %target, addr = %addr, sni = %sni, mode = "tunnel", "proxy connect");
        if upstream.write_all(&replay).await.is_err() {
            return;
        }
        match tunnel::relay(stream, upstream, self.settings.idle_timeout).await {
            TunnelEnd::Closed { up, down } => {
                tracing::debug!(target = %target, bytes_up = up, bytes_down = down, "tunnel closed")
            }
            TunnelEnd::Idle => {
                tracing::debug!(target = %target, "tunnel closed after the idle timeout")
            }
            TunnelEnd::Failed(e) => tracing::debug!(target = %target, error = %e, "tunnel broke"),
        }
    }

    /// The one place a tunnel refused after `200` is answered: the `200` cannot be taken back,
    /// so a client that started TLS gets a fatal `access_denied` alert (its TLS library reports
    /// that), any other just a closed connection.
    async fn refuse_tunnel(
        &self,
        stream: Stream,
        peer: &str,
        target: &Authority,
        refusal: TunnelRefusal,
    ) {
        metrics::counter!(metric::PROXY_CONNECTS_TOTAL, "mode" => "denied").increment(1);
        tracing::info!(
            peer = %peer,
            target = %target,
            reason = refusal.reason(),
            detail = %refusal,
            "proxy connect refused"
        );
        // A TLS record: alert (21), TLS 1.2 record version, 2 bytes: fatal (2), access_denied (49).
        const ACCESS_DENIED_ALERT: &[u8] = &[21, 3, 3, 0, 2, 2, 49];
        let answer = if refusal.client_speaks_tls() {
            ACCESS_DENIED_ALERT
        } else {
            &[]
        };
        close_after(stream, answer).await;
    }

    async fn deny(
        &self,
        stream: Stream,
        peer: &str,
        target: Option<&Authority>,
        refusal: ConnectRefusal,
    ) {
        metrics::counter!(metric::PROXY_CONNECTS_TOTAL, "mode" => "denied").increment(1);
        log_refusal(peer, target, &refusal);
        respond(stream, &refusal).await;
    }
}

#[async_trait]
impl ServerApp for ForwardProxy {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _place = match self.connections.admit(ClientKey::of_stream(&stream)) {
            Ok(place) => place,
            Err(refused) => {
                // A TLS client could not read a plain-text answer: it is only closed.
                if self.listener_tls.is_none() {
                    turn_away(&mut stream, &refused).await;
                }
                return None;
            }
        };
        self.serve(stream, shutdown).await;
        None
    }
}

/// A tunnel Tollgate decrypts: who opened it, its CONNECT target, the MITM host whose leaf and
/// provider serve it, and the caller's Tollgate key.
struct MitmSession<'a> {
    peer: &'a str,
    target: &'a Authority,
    host: &'a MitmHost,
    key: String,
}

/// pingora configuration for an `HttpProxy` that only ever hosts a [`Gateway`]. The gateway
/// makes every upstream call with its own shared connector, so the `HttpProxy`'s connector is
/// never used; building it with the system trust store would cost milliseconds per tunnel, so
/// it gets an empty one (`/dev/null` holds no certificate) and a one-slot pool.
fn tunnel_server_conf(threads: usize) -> Arc<ServerConf> {
    let mut conf = ServerConf {
        threads,
        upstream_keepalive_pool_size: 1,
        ..ServerConf::default()
    };
    conf.ca_file = Some("/dev/null".into());
    Arc::new(conf)
}

async fn write_established(stream: &mut Stream) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    stream.flush().await
}

/// The one place a refusal before `200` becomes bytes: a plain-text HTTP/1.1 response, then a
/// lingering close ([`close_after`]).
pub async fn respond(stream: Stream, refusal: &ConnectRefusal) {
    let (status, phrase) = refusal.status();
    let body = format!("{refusal}\n");
    let mut head = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 407 {
        head.push_str("Proxy-Authenticate: Basic realm=\"tollgate\"\r\n");
    }
    if let ConnectRefusal::AuthThrottled(throttled) = refusal {
        let secs = throttled.retry_after.as_secs().max(1);
        head.push_str(&format!("Retry-After: {secs}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(&body);
    close_after(stream, head.as_bytes()).await;
}

/// Writes `answer` and closes with a linger ([`linger_close`]: whatever the client is still
/// sending is read and dropped for a moment, so the kernel does not reset the connection
/// before the client has read the answer).
async fn close_after(mut stream: Stream, answer: &[u8]) {
    let written = tokio::time::timeout(LINGER, async {
        stream.write_all(answer).await?;
        stream.flush().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        linger_close(&mut stream).await;
    }
}

fn log_refusal(peer: &str, target: Option<&Authority>, refusal: &ConnectRefusal) {
    let target = target.map(ToString::to_string).unwrap_or_default();
    tracing::info!(
        peer = %peer,
        target = %target,
        status = refusal.status().0,
        reason = refusal.reason(),
        detail = %refusal,
        "proxy connect refused"
    );
}

fn peer_of(stream: &Stream) -> String {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().map(ToString::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rendered(refusal: ConnectRefusal) -> String {
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move { respond(Box::new(server), &refusal).await });
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        drop(client);
        task.await.unwrap();
        out
    }

    #[tokio::test]
    async fn refusals_are_plain_http_with_the_right_status() {
        let out = rendered(ConnectRefusal::ProxyAuthRequired(
            "missing proxy credentials",
        ))
        .await;
        assert!(
            out.starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"),
            "{out}"
        );
        assert!(out.contains("Proxy-Authenticate: Basic realm=\"tollgate\"\r\n"));
        assert!(out.contains("Connection: close\r\n"));
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        assert!(out.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(body.contains("missing proxy credentials"));

        let out = rendered(ConnectRefusal::PortNotAllowed {
            port: 22,
            allowed: "80, 443".into(),
        })
        .await;
        assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
        assert!(!out.contains("Proxy-Authenticate"));
        let out = rendered(ConnectRefusal::HeadTooLarge(64 * 1024)).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }
}
