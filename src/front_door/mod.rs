//! What every listener (gateway, proxy, admin) does about clients before they have proved who
//! they are, so that no stranger can exhaust what the others need: how long and how large a
//! request head may be ([`HeadLimits`]), how many connections a listener and one client address
//! may hold ([`connections`]), and how many file descriptors the process may use and how they
//! are shared between the listeners ([`descriptors`]). Clients are told apart by [`ClientKey`].
//!
//! Not here: the listeners themselves (`gateway`, `proxy`, `api::listener`), which apply these
//! limits; failed authentication (`auth::failures`).

pub mod connections;
pub mod descriptors;

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use connections::{ConnectionLimiter, ConnectionPermit, ConnectionRefused};

/// `server.client_header_timeout_ms` and `server.max_request_head_bytes`: the bounds on every
/// request head on every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// How long a whole head may take, from when the listener starts waiting for it.
    pub timeout: Duration,
    /// The most bytes a head may have, its blank line included.
    pub max_bytes: usize,
}

impl HeadLimits {
    pub fn from_config(server: &crate::config::ServerConfig) -> HeadLimits {
        HeadLimits {
            timeout: server.client_header_timeout,
            max_bytes: server.max_request_head_bytes,
        }
    }
}

/// How long a refused client may go on sending after its answer before the connection is
/// closed under it, and how much of it is read (and dropped) meanwhile.
pub const LINGER: Duration = Duration::from_secs(1);
pub const LINGER_BYTES: usize = 64 * 1024;

/// Closes a connection whose answer (a refusal) has been written: the write side first, then
/// whatever the client still sends is read and dropped, for at most [`LINGER`] and
/// [`LINGER_BYTES`]. Closing with unread bytes would make the kernel reset the connection, and
/// a reset can discard the answer before the client reads it.
pub async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    if !matches!(
        tokio::time::timeout(LINGER, stream.shutdown()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = vec![0u8; 16 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Who a client is for per-address limits: its IPv4 address, or the /64 its IPv6 address is in
/// (one host usually has a whole /64, so counting single IPv6 addresses would count nothing).
/// IPv4-mapped IPv6 addresses count as the IPv4 address. `Unknown` is a connection whose peer
/// address pingora could not tell (a Unix socket); all of those share one count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
    Unknown,
}

impl ClientKey {
    pub fn of(ip: Option<IpAddr>) -> ClientKey {
        match ip {
            Some(IpAddr::V4(v4)) => ClientKey::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    ClientKey::V6Prefix(prefix)
                }
            },
            None => ClientKey::Unknown,
        }
    }

    /// The address a pingora stream is connected from.
    pub fn of_stream(stream: &pingora::protocols::Stream) -> ClientKey {
        ClientKey::of(peer_ip(stream))
    }
}

/// The peer IP address of a pingora stream, if it has one.
pub fn peer_ip(stream: &pingora::protocols::Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    digest.peer_addr()?.as_inet().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_ipv4_addresses_or_ipv6_slash_64s() {
        let key = |s: &str| ClientKey::of(Some(s.parse().unwrap()));
        assert_eq!(key("10.1.2.3"), ClientKey::V4([10, 1, 2, 3]));
        assert_eq!(key("::ffff:10.1.2.3"), key("10.1.2.3"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("127.0.0.1"), key("127.0.0.2"));
        assert_eq!(ClientKey::of(None), ClientKey::Unknown);
    }
}
