//! Keeping blind tunnels away from the providers Tollgate governs.
//!
//! A CONNECT is intercepted when its *name* is a MITM host. A tunnel to any other name could
//! still reach the same provider: by its IP address, by another DNS name for it, or by naming
//! the MITM host in the TLS ClientHello's SNI, which is what the server routes on. So once a
//! tunnel's first bytes are read (`client_hello`), [`judge`] decides:
//!
//! 1. The bytes are a TLS handshake the parser cannot read: refused, wherever it goes (a server
//!    might read in it a name the proxy did not see).
//! 2. The SNI names a MITM host: [`Verdict::Intercept`], exactly as a CONNECT to that host
//!    (the proxy then requires the Tollgate key and refuses without it).
//! 3. The destination address is one a MITM host resolves to ([`GovernedAddresses`]): tunnelled
//!    only for a ClientHello that names another host in clear (SNI present, no ECH), since CDN
//!    addresses serve other sites too; no SNI, an Encrypted Client Hello, or not TLS at all is
//!    refused.
//! 4. Anything else is tunnelled, the bytes read replayed first.
//!
//! What this cannot see: a governed host behind an address the proxy has not resolved it to
//! (another CDN edge, domain fronting: an innocent SNI with the governed host in the encrypted
//! HTTP `Host`), ECH to such an address, or a relay the client controls. `proxy.tunnel = "deny"`
//! closes all of those.
//!
//! Not here: reading the bytes (`client_hello`), answering the client (`proxy`), or which
//! addresses a tunnel may reach at all (`destination`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::client_hello::{FirstBytes, HelloError};
use super::destination::embedded_v4;

/// How long the MITM hosts' addresses count as current before they are resolved again.
const REFRESH_AFTER: Duration = Duration::from_secs(30);
/// How long an address still counts after its host last resolved to it: DNS answers rotate
/// through a pool, and a client may have been given another part of it than the proxy.
const RETAIN: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most (the oldest go first).
const MAX_ADDRESSES: usize = 4096;
/// One host's resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses the MITM hosts resolve to, with the resolver tunnels use (the system's),
/// refreshed in the background when older than [`REFRESH_AFTER`].
pub struct GovernedAddresses {
    shared: Arc<Shared>,
}

struct Shared {
    hosts: Vec<String>,
    known: Mutex<Known>,
    /// A refresh task is running.
    refreshing: AtomicBool,
    /// Bumped at the end of every refresh, for the callers waiting on one.
    refreshed: watch::Sender<u64>,
}

/// A destination address that belongs to a MITM host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GovernedAddress {
    pub ip: IpAddr,
    /// The MITM host it was resolved from.
    pub host: Arc<str>,
}

impl GovernedAddresses {
    pub fn new(hosts: impl IntoIterator<Item = String>) -> GovernedAddresses {
        GovernedAddresses {
            shared: Arc::new(Shared {
                hosts: hosts.into_iter().collect(),
                known: Mutex::new(Known::default()),
                refreshing: AtomicBool::new(false),
                refreshed: watch::channel(0).0,
            }),
        }
    }

    /// `ip` as a [`GovernedAddress`] if a MITM host resolves to it (IPv4-mapped, NAT64 and 6to4
    /// spellings count as the IPv4 address they carry). When the addresses are stale they are
    /// resolved again first, but never waited for longer than `wait`: a slow resolver leaves the
    /// answer to the addresses known so far.
    pub async fn lookup(&self, ip: IpAddr, wait: Duration) -> Option<GovernedAddress> {
        let shared = &self.shared;
        if shared.hosts.is_empty() {
            return None;
        }
        if shared.is_stale() {
            // Subscribe before checking again, so a refresh ending in between is not missed.
            let mut refreshed = shared.refreshed.subscribe();
            if shared.is_stale() {
                if !shared.refreshing.swap(true, Ordering::AcqRel) {
                    tokio::spawn(shared.clone().refresh());
                }
                let _ = tokio::time::timeout(wait, refreshed.changed()).await;
            }
        }
        let host = shared.known.lock().host_of(canonical(ip))?;
        Some(GovernedAddress { ip, host })
    }
}

impl Shared {
    fn is_stale(&self) -> bool {
        self.known
            .lock()
            .resolved_at
            .is_none_or(|at| at.elapsed() >= REFRESH_AFTER)
    }

    /// Resolves every MITM host (concurrently, each within [`RESOLVE_TIMEOUT`]) and records what
    /// came back. A host that fails to resolve keeps its earlier addresses until they age out.
    async fn refresh(self: Arc<Self>) {
        let mut lookups = tokio::task::JoinSet::new();
        for host in &self.hosts {
            let host = host.clone();
            lookups.spawn(async move {
                let found = tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((host.as_str(), 443)),
                )
                .await
                .map(|r| r.map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<IpAddr>>()));
                (host, found)
            });
        }
        let mut resolved = Vec::new();
        while let Some(joined) = lookups.join_next().await {
            let Ok((host, found)) = joined else { continue };
            match found {
                Ok(Ok(ips)) => resolved.push((host, ips)),
                // Common and harmless where the AI hosts are not resolvable from Tollgate's
                // network; the SNI check still applies there.
                Ok(Err(e)) => {
                    tracing::debug!(host = %host, error = %e, "cannot resolve a MITM host")
                }
                Err(_) => tracing::warn!(host = %host, "resolving a MITM host timed out"),
            }
        }
        self.known.lock().record(resolved, Instant::now());
        self.refreshing.store(false, Ordering::Release);
        self.refreshed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Which MITM host each known address belongs to, and when it was last seen.
#[derive(Debug, Default)]
struct Known {
    by_addr: HashMap<IpAddr, Sighting>,
    resolved_at: Option<Instant>,
}

#[derive(Debug)]
struct Sighting {
    host: Arc<str>,
    seen: Instant,
}

impl Known {
    fn record(&mut self, resolved: Vec<(String, Vec<IpAddr>)>, now: Instant) {
        for (host, ips) in resolved {
            let host: Arc<str> = host.into();
            for ip in ips {
                let sighting = Sighting {
                    host: host.clone(),
                    seen: now,
                };
                self.by_addr.insert(canonical(ip), sighting);
            }
        }
        self.by_addr
            .retain(|_, s| now.saturating_duration_since(s.seen) < RETAIN);
        if self.by_addr.len() > MAX_ADDRESSES {
            let mut newest_first: Vec<(IpAddr, Instant)> =
                self.by_addr.iter().map(|(ip, s)| (*ip, s.seen)).collect();
            newest_first.sort_unstable_by_key(|(_, seen)| std::cmp::Reverse(*seen));
            for (ip, _) in &newest_first[MAX_ADDRESSES..] {
                self.by_addr.remove(ip);
            }
        }
        self.resolved_at = Some(now);
    }

    fn host_of(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.by_addr.get(&ip).map(|s| s.host.clone())
    }
}

/// The one spelling of an address that reaches the same host: an IPv6 address that carries an
/// IPv4 address (mapped, NAT64, 6to4) stands for that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// What happens to a tunnel once its first bytes are read.
#[derive(Debug)]
pub enum Verdict<H> {
    /// Open it unchanged, replaying the bytes read.
    Tunnel,
    /// The ClientHello names a MITM host: handle it as a CONNECT to that host would be.
    Intercept {
        host: H,
        server_name: String,
    },
    Refuse(TunnelRefusal),
}

/// Decides a tunnel's fate from its first bytes, the MITM host a name is (`mitm_host`, the
/// lookup a CONNECT target gets) and whether the destination address is governed; see the
/// module docs for the rules, in this order.
pub fn judge<H>(
    first: &FirstBytes,
    mitm_host: impl FnOnce(&str) -> Option<H>,
    governed: Option<GovernedAddress>,
) -> Verdict<H> {
    let hello = match first {
        FirstBytes::Invalid(e) => {
            return Verdict::Refuse(TunnelRefusal::UnreadableHello(e.clone()))
        }
        FirstBytes::NotTls => None,
        FirstBytes::ClientHello(hello) => Some(hello),
    };
    if let Some(name) = hello.and_then(|h| h.server_name.as_deref()) {
        if let Some(host) = mitm_host(name) {
            return Verdict::Intercept {
                host,
                server_name: name.to_string(),
            };
        }
    }
    let Some(GovernedAddress { ip, host }) = governed else {
        return Verdict::Tunnel;
    };
    let blind = match hello {
        None => BlindStart::NotTls,
        Some(h) if h.server_name.is_none() => BlindStart::NoServerName,
        Some(h) if h.encrypted_client_hello => BlindStart::EncryptedClientHello,
        Some(_) => return Verdict::Tunnel,
    };
    Verdict::Refuse(TunnelRefusal::GovernedAddress { ip, host, blind })
}

/// Why a tunnel is closed after `200 Connection Established` (the client then gets a TLS alert
/// or a closed connection, never an HTTP answer).
#[derive(Debug, thiserror::Error)]
pub enum TunnelRefusal {
    #[error("the ClientHello names {server_name}, a host Tollgate intercepts; {cause}")]
    GovernedHostBySni { server_name: String, cause: String },
    #[error("{ip} is an address of {host}, a host Tollgate intercepts, and the client {blind}")]
    GovernedAddress {
        ip: IpAddr,
        host: Arc<str>,
        blind: BlindStart,
    },
    #[error("the client's TLS ClientHello cannot be read ({0}), so it is not tunnelled unread")]
    UnreadableHello(HelloError),
    #[error("the client sent no first message within {0:?}; tunnels are not opened unread")]
    NoFirstMessage(Duration),
}

impl TunnelRefusal {
    /// The label in logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelRefusal::GovernedHostBySni { .. } => "governed_host_by_sni",
            TunnelRefusal::GovernedAddress { .. } => "governed_address",
            TunnelRefusal::UnreadableHello(_) => "unreadable_client_hello",
            TunnelRefusal::NoFirstMessage(_) => "no_client_hello",
        }
    }

    /// The client started TLS, so a TLS alert tells it why the connection ends.
    pub fn client_speaks_tls(&self) -> bool {
        match self {
            TunnelRefusal::GovernedHostBySni { .. } | TunnelRefusal::UnreadableHello(_) => true,
            TunnelRefusal::GovernedAddress { blind, .. } => *blind != BlindStart::NotTls,
            TunnelRefusal::NoFirstMessage(_) => false,
        }
    }
}

/// How a tunnel to a governed address would have started without saying where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlindStart {
    NoServerName,
    EncryptedClientHello,
    NotTls,
}

impl fmt::Display for BlindStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlindStart::NoServerName => "sent a ClientHello without a server name (SNI)",
            BlindStart::EncryptedClientHello => {
                "sent an Encrypted Client Hello, which hides the server name"
            }
            BlindStart::NotTls => "did not start TLS",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::client_hello::ClientHelloInfo;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn addresses_of_mitm_hosts_are_known_in_every_spelling() {
        // IP literals resolve to themselves, so no DNS is involved.
        let governed = GovernedAddresses::new(["192.0.2.7".to_string(), "2001:db8::5".into()]);
        let wait = Duration::from_secs(5);
        for spelling in [
            "192.0.2.7",
            "::ffff:192.0.2.7",
            "64:ff9b::c000:207",
            "2001:db8::5",
        ] {
            let found = governed.lookup(ip(spelling), wait).await;
            assert_eq!(
                found.map(|g| (g.ip, g.host.to_string())),
                Some((
                    ip(spelling),
                    if spelling.starts_with("2001") {
                        "2001:db8::5"
                    } else {
                        "192.0.2.7"
                    }
                    .into()
                )),
                "{spelling}"
            );
        }
        assert_eq!(governed.lookup(ip("192.0.2.8"), wait).await, None);
        assert_eq!(governed.lookup(ip("2001:db8::6"), wait).await, None);
        // Nothing to resolve: nothing is governed, at once.
        let none = GovernedAddresses::new(Vec::new());
        assert_eq!(none.lookup(ip("192.0.2.7"), Duration::ZERO).await, None);
    }

    #[tokio::test]
    async fn a_host_that_does_not_resolve_leaves_the_others() {
        let governed =
            GovernedAddresses::new(["does-not-exist.invalid".to_string(), "192.0.2.9".into()]);
        let found = governed
            .lookup(ip("192.0.2.9"), Duration::from_secs(5))
            .await;
        assert_eq!(found.unwrap().host.as_ref(), "192.0.2.9");
    }

    #[test]
    fn addresses_age_out_and_stay_bounded() {
        let start = Instant::now();
        let mut known = Known::default();
        known.record(vec![("a.example".into(), vec![ip("192.0.2.1")])], start);
        // The next answer rotates to another address: the first still counts for a while.
        known.record(
            vec![("a.example".into(), vec![ip("192.0.2.2")])],
            start + REFRESH_AFTER,
        );
        assert_eq!(known.host_of(ip("192.0.2.1")).as_deref(), Some("a.example"));
        known.record(Vec::new(), start + RETAIN + Duration::from_secs(1));
        assert_eq!(known.host_of(ip("192.0.2.1")), None);
        assert_eq!(known.host_of(ip("192.0.2.2")).as_deref(), Some("a.example"));
        // Many addresses: the newest are kept, up to the bound.
        let mut known = Known::default();
        for round in 0..3u32 {
            let ips = (0..3000u32)
                .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(round << 16 | i)))
                .collect();
            known.record(
                vec![("cdn.example".into(), ips)],
                start + Duration::from_secs(u64::from(round)),
            );
            assert!(known.by_addr.len() <= MAX_ADDRESSES);
        }
        assert!(known.host_of(IpAddr::V4((2u32 << 16 | 5).into())).is_some());
        assert!(known.host_of(IpAddr::V4(5u32.into())).is_none());
    }

    fn hello(name: Option<&str>, ech: bool) -> FirstBytes {
        FirstBytes::ClientHello(ClientHelloInfo {
            server_name: name.map(String::from),
            encrypted_client_hello: ech,
        })
    }

    #[test]
    fn the_rules_apply_in_order() {
        let mitm = |name: &str| (name == "api.openai.com").then_some("openai");
        let gov = || {
            Some(GovernedAddress {
                ip: ip("192.0.2.1"),
                host: "api.openai.com".into(),
            })
        };
        let refused = |v: Verdict<&str>| match v {
            Verdict::Refuse(r) => r.reason(),
            other => panic!("{other:?}"),
        };
        // The SNI of a MITM host is intercepted wherever the tunnel goes.
        for governed in [None, gov()] {
            for ech in [false, true] {
                match judge(&hello(Some("api.openai.com"), ech), mitm, governed.clone()) {
                    Verdict::Intercept { host, server_name } => {
                        assert_eq!((host, server_name.as_str()), ("openai", "api.openai.com"))
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // A governed address: only a clear, other SNI passes.
        assert!(matches!(
            judge(&hello(Some("other.example"), false), mitm, gov()),
            Verdict::Tunnel
        ));
        for blind in [
            hello(None, false),
            hello(Some("cloudflare-ech.com"), true),
            FirstBytes::NotTls,
        ] {
            assert_eq!(refused(judge(&blind, mitm, gov())), "governed_address");
        }
        // Elsewhere, everything readable passes.
        for first in [
            hello(None, false),
            hello(Some("cloudflare-ech.com"), true),
            FirstBytes::NotTls,
        ] {
            assert!(matches!(judge(&first, mitm, None), Verdict::Tunnel));
        }
        // An unreadable hello passes nowhere.
        let bad = FirstBytes::Invalid(HelloError::TooManyRecords);
        for governed in [None, gov()] {
            assert_eq!(
                refused(judge(&bad, mitm, governed)),
                "unreadable_client_hello"
            );
        }
    }

    #[test]
    fn refusals_say_how_the_client_is_told() {
        let by_address = |blind| TunnelRefusal::GovernedAddress {
            ip: ip("192.0.2.1"),
            host: "api.openai.com".into(),
            blind,
        };
        assert!(by_address(BlindStart::NoServerName).client_speaks_tls());
        assert!(by_address(BlindStart::EncryptedClientHello).client_speaks_tls());
        assert!(!by_address(BlindStart::NotTls).client_speaks_tls());
        assert!(!TunnelRefusal::NoFirstMessage(Duration::from_secs(1)).client_speaks_tls());
        let text = by_address(BlindStart::NoServerName).to_string();
        assert!(
            text.contains("192.0.2.1 is an address of api.openai.com"),
            "{text}"
        );
    }
}
