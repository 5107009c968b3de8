//! The upstream side: configured providers, address resolution, peers and the request head
//! that goes to the provider.
//!
//! Addresses are resolved asynchronously and cached briefly (pingora's `HttpPeer::new` on a
//! host name would resolve with blocking DNS on a proxy thread). Peers carry the provider host as
//! SNI, system trust roots, a connect timeout and a long read timeout for streams.
//!
//! A provider route also owns its central key pool ([`keypool`]) and circuit breakers
//! ([`breaker`]): what is known about the upstream between requests.
//!
//! Not here: which credential to use (the gateway decides) or what the body means (providers).

pub(crate) mod breaker;
pub(crate) mod keypool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use parking_lot::RwLock;
use pingora::http::RequestHeader;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{ProviderConfig, UpstreamUrl};
use crate::providers::{CredentialHeader, Provider, ProviderKind};
use crate::store::contains_tollgate_key;
use crate::telemetry::{self, ProviderSeries};
use breaker::Breakers;
use keypool::KeyPool;

/// How long the upstream may take to accept each write of a request (the peer's write timeout).
pub(crate) const UPSTREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// One configured provider, ready for the hot path.
pub struct ProviderRoute {
    /// The route name (`[providers.NAME]`).
    pub name: String,
    pub kind: ProviderKind,
    pub adapter: &'static dyn Provider,
    pub upstream: UpstreamUrl,
    /// The central keys, read from the environment when the config is loaded. Never logged.
    pub keys: KeyPool,
    pub breakers: Arc<Breakers>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// This route's metric handles, taken on first use.
    series: OnceLock<Arc<ProviderSeries>>,
}

impl std::fmt::Debug for ProviderRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderRoute")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("upstream", &self.upstream)
            .field("keys", &self.keys)
            .finish()
    }
}

impl ProviderRoute {
    pub fn from_config(
        name: &str,
        cfg: &ProviderConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> ProviderRoute {
        // Labels are positions in the configured list, so a missing variable does not shift
        // the names of the keys after it.
        let keys = cfg
            .central_key_envs()
            .enumerate()
            .filter_map(|(i, var)| {
                env(var)
                    .filter(|k| !k.trim().is_empty())
                    .map(|k| (i.to_string(), k.trim().to_string()))
            })
            .collect();
        ProviderRoute {
            name: name.to_string(),
            kind: cfg.kind,
            adapter: cfg.kind.adapter(),
            upstream: cfg.base_url.clone(),
            keys: KeyPool::new(name, keys, cfg.key_cooldown),
            breakers: Breakers::new(name, cfg.breaker),
            connect_timeout: cfg.connect_timeout,
            first_byte_timeout: cfg.first_byte_timeout,
            idle_timeout: cfg.idle_timeout,
            series: OnceLock::new(),
        }
    }

    /// The metric series labelled with this route's name.
    pub fn series(&self) -> &ProviderSeries {
        self.series
            .get_or_init(|| telemetry::provider_series(&self.name))
    }

    /// The upstream path: `base_url`'s path, then the path after the provider prefix (with query).
    pub fn upstream_path(&self, rest: &str) -> String {
        let mut p = String::with_capacity(self.upstream.path.len() + rest.len());
        p.push_str(&self.upstream.path);
        p.push_str(rest);
        p
    }

    /// A peer for `addr` with this provider's TLS name and timeouts.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, self.upstream.tls, self.upstream.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout * 2);
        // A backstop only: the gateway times the first byte and each body read itself, so it
        // can say which one fired.
        peer.options.read_timeout =
            Some(self.first_byte_timeout.max(self.idle_timeout) + Duration::from_secs(1));
        peer.options.write_timeout = Some(UPSTREAM_WRITE_TIMEOUT);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.alpn = if self.upstream.tls {
            ALPN::H2H1
        } else {
            ALPN::H1
        };
        peer
    }
}

/// Request headers that never go upstream: hop-by-hop headers, Tollgate's own, and the ones the
/// gateway sets itself.
const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    // Usage is parsed from the bytes on the way through, so the upstream must answer uncompressed.
    "accept-encoding",
    "authorization",
    "x-api-key",
    "x-tollgate-key",
    "x-coder-ai-governance-token",
    "x-tollgate-session",
];

/// Builds the head sent upstream: the client's headers minus the dropped ones and any that
/// carries something shaped like a Tollgate key (under whatever name: a Tollgate key is never
/// a provider's credential), then `Host`, the credential and the body length.
pub fn upstream_request(
    method: &http::Method,
    path: &str,
    client_headers: &HeaderMap,
    route: &ProviderRoute,
    credential: Option<&str>,
    body_len: usize,
) -> pingora::Result<RequestHeader> {
    let mut req = RequestHeader::build(
        method.clone(),
        path.as_bytes(),
        Some(client_headers.len() + 3),
    )?;
    for (name, value) in client_headers {
        if DROPPED_REQUEST_HEADERS.contains(&name.as_str())
            || contains_tollgate_key(&String::from_utf8_lossy(value.as_bytes()))
        {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    req.insert_header(http::header::HOST, route.upstream.host_header())?;
    match (route.adapter.credential_header(), credential) {
        (CredentialHeader::Bearer | CredentialHeader::ClientAuthorization, Some(key)) => {
            req.insert_header(http::header::AUTHORIZATION, format!("Bearer {key}"))?;
        }
        (CredentialHeader::XApiKey, Some(key)) => {
            req.insert_header("x-api-key", key)?;
        }
        (_, None) => {}
    }
    if body_len > 0 || method == http::Method::POST || method == http::Method::PUT {
        req.insert_header(http::header::CONTENT_LENGTH, body_len.to_string())?;
    }
    Ok(req)
}

/// Response headers from the upstream that must not be copied to the client.
pub fn is_hop_by_hop_response_header(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "trailer"
    )
}

struct DnsEntry {
    addrs: Vec<SocketAddr>,
    resolved: Instant,
}

/// Asynchronous resolution with a short cache, so no proxy thread ever waits on blocking DNS
/// and a resolver outage costs one failure per TTL rather than one per request.
pub struct DnsCache {
    entries: RwLock<HashMap<String, DnsEntry>>,
    ttl: Duration,
}

impl DnsCache {
    pub fn new(ttl: Duration) -> Arc<DnsCache> {
        Arc::new(DnsCache {
            entries: RwLock::new(HashMap::new()),
            ttl,
        })
    }

    /// The first address of `host:port`, from cache or a fresh async lookup.
    pub async fn resolve(&self, upstream: &UpstreamUrl) -> std::io::Result<SocketAddr> {
        if let Ok(ip) = upstream.host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, upstream.port));
        }
        let key = upstream.authority();
        if let Some(e) = self.entries.read().get(&key) {
            if e.resolved.elapsed() < self.ttl {
                if let Some(a) = e.addrs.first() {
                    return Ok(*a);
                }
            }
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(key.as_str()).await?.collect();
        let first = *addrs.first().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{key} has no addresses"),
            )
        })?;
        self.entries.write().insert(
            key,
            DnsEntry {
                addrs,
                resolved: Instant::now(),
            },
        );
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderConfig;

    fn route(kind: ProviderKind, url: &str) -> ProviderRoute {
        let cfg = ProviderConfig {
            kind,
            base_url: UpstreamUrl::parse(url).unwrap(),
            api_key_env: Some("K".into()),
            api_key_envs: vec![],
            key_cooldown: Duration::from_secs(60),
            mitm_hosts: vec![],
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            breaker: Default::default(),
        };
        ProviderRoute::from_config("p", &cfg, |_| Some("sk-central".into()))
    }

    #[test]
    fn upstream_head_drops_client_credentials() {
        let r = route(ProviderKind::Anthropic, "http://127.0.0.1:9000/base");
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer tg_secret".parse().unwrap());
        h.insert("x-tollgate-key", "tg_secret".parse().unwrap());
        h.insert("accept-encoding", "gzip".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        h.insert("connection", "keep-alive".parse().unwrap());
        // A Tollgate key under a header name the gateway does not know is not forwarded either.
        let tollgate_key = format!("tg_{}", "ab".repeat(24));
        h.insert("api-key", tollgate_key.parse().unwrap());
        h.insert(
            "x-goog-api-key",
            format!("Bearer {tollgate_key}").parse().unwrap(),
        );
        let req = upstream_request(
            &http::Method::POST,
            &r.upstream_path("/v1/messages"),
            &h,
            &r,
            Some("sk-central"),
            10,
        )
        .unwrap();
        assert_eq!(req.uri.path(), "/base/v1/messages");
        assert_eq!(req.headers.get("x-api-key").unwrap(), "sk-central");
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("x-tollgate-key").is_none());
        assert!(req.headers.get("accept-encoding").is_none());
        assert!(req.headers.get("connection").is_none());
        assert!(req.headers.get("api-key").is_none());
        assert!(req.headers.get("x-goog-api-key").is_none());
        assert_eq!(req.headers.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(req.headers.get("host").unwrap(), "127.0.0.1:9000");
        assert_eq!(req.headers.get("content-length").unwrap(), "10");
    }

    #[tokio::test]
    async fn ip_literals_need_no_dns() {
        let dns = DnsCache::new(Duration::from_secs(1));
        let a = dns
            .resolve(&UpstreamUrl::parse("http://127.0.0.1:9").unwrap())
            .await
            .unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:9");
    }
}
