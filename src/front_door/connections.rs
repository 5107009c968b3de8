//! How many connections a listener holds at once, in all and per client address.
//!
//! Each listener (gateway, proxy, admin) has its own [`ConnectionLimiter`]: its own capacity,
//! so traffic on one can never take the connections another is promised (the admin listener's
//! health checks keep working while the gateway is flooded), and a share per client address,
//! so one address cannot take a listener's whole capacity. A connection over either limit gets
//! a `503` with `Retry-After` (where that can be written without waiting) and is closed at once:
//! it never holds a task or a buffer. A [`ConnectionPermit`] is held for the connection's life
//! and gives its place back when dropped.
//!
//! Not here: how large the capacities are (`front_door::descriptors` lowers them to what the
//! open-file limit holds), accepting connections (each listener).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::ClientKey;
use crate::telemetry::metric;

/// What a refused client is told, when it can be written without waiting: come back shortly.
pub const REFUSAL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRefused {
    #[error("the {listener} listener already holds its {max} connections")]
    ListenerFull { listener: &'static str, max: usize },
    #[error("this client address already holds its {max} connections on the {listener} listener")]
    ClientFull { listener: &'static str, max: usize },
}

impl ConnectionRefused {
    /// The `reason` label of `tollgate_connections_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectionRefused::ListenerFull { .. } => "listener_full",
            ConnectionRefused::ClientFull { .. } => "client_full",
        }
    }
}

/// One listener's connection counts. See the module docs.
#[derive(Debug)]
pub struct ConnectionLimiter {
    listener: &'static str,
    max_total: usize,
    /// 0: no per-address limit.
    max_per_client: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only addresses holding at least one connection.
    per_client: HashMap<ClientKey, usize>,
}

/// A connection's place on its listener, given back when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    client: ClientKey,
}

impl ConnectionLimiter {
    /// `listener` names it in metrics and messages.
    pub fn new(
        listener: &'static str,
        max_total: usize,
        max_per_client: usize,
    ) -> Arc<ConnectionLimiter> {
        metrics::gauge!(metric::CONNECTIONS_OPEN, "listener" => listener).set(0.0);
        for reason in ["listener_full", "client_full"] {
            metrics::counter!(metric::CONNECTIONS_REFUSED_TOTAL, "listener" => listener, "reason" => reason)
                .absolute(0);
        }
        Arc::new(ConnectionLimiter {
            listener,
            max_total,
            max_per_client,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a place for a new connection from `client`, or says why there is none (counted
    /// in `tollgate_connections_refused_total`).
    pub fn admit(
        self: &Arc<Self>,
        client: ClientKey,
    ) -> Result<ConnectionPermit, ConnectionRefused> {
        let refused = {
            let mut counts = self.counts.lock();
            let held = counts.per_client.get(&client).copied().unwrap_or(0);
            if counts.total >= self.max_total {
                Some(ConnectionRefused::ListenerFull {
                    listener: self.listener,
                    max: self.max_total,
                })
            } else if self.max_per_client > 0 && held >= self.max_per_client {
                Some(ConnectionRefused::ClientFull {
                    listener: self.listener,
                    max: self.max_per_client,
                })
            } else {
                counts.total += 1;
                *counts.per_client.entry(client).or_insert(0) += 1;
                metrics::gauge!(metric::CONNECTIONS_OPEN, "listener" => self.listener)
                    .set(counts.total as f64);
                None
            }
        };
        match refused {
            Some(refused) => {
                metrics::counter!(metric::CONNECTIONS_REFUSED_TOTAL, "listener" => self.listener, "reason" => refused.reason())
                    .increment(1);
                Err(refused)
            }
            None => Ok(ConnectionPermit {
                limiter: self.clone(),
                client,
            }),
        }
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.counts.lock().total
    }

    /// The listener's capacity.
    pub fn max_total(&self) -> usize {
        self.max_total
    }
}

/// How long a refused connection may take to accept [`REFUSAL_RESPONSE`] before it is closed
/// anyway (a fresh socket takes it at once; a client not reading gets nothing).
const TURN_AWAY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Tells a refused client to come back shortly, if that can be done at once, and closes.
pub async fn turn_away<S: AsyncWrite + Unpin>(stream: &mut S, refused: &ConnectionRefused) {
    tracing::debug!(reason = refused.reason(), detail = %refused, "connection refused");
    let _ = tokio::time::timeout(TURN_AWAY_WAIT, async {
        stream.write_all(REFUSAL_RESPONSE).await?;
        stream.shutdown().await
    })
    .await;
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let limiter = &self.limiter;
        let mut counts = limiter.counts.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.per_client.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                counts.per_client.remove(&self.client);
            }
        }
        metrics::gauge!(metric::CONNECTIONS_OPEN, "listener" => limiter.listener)
            .set(counts.total as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::V4([192, 0, 2, last])
    }

    #[test]
    fn a_client_gets_its_share_and_the_listener_its_total() {
        let limiter = ConnectionLimiter::new("test", 5, 2);
        let a1 = limiter.admit(client(1)).unwrap();
        let _a2 = limiter.admit(client(1)).unwrap();
        assert_eq!(
            limiter.admit(client(1)).unwrap_err(),
            ConnectionRefused::ClientFull {
                listener: "test",
                max: 2
            }
        );
        let _b = [
            limiter.admit(client(2)).unwrap(),
            limiter.admit(client(2)).unwrap(),
            limiter.admit(client(3)).unwrap(),
        ];
        assert_eq!(limiter.open(), 5);
        assert_eq!(
            limiter.admit(client(4)).unwrap_err().reason(),
            "listener_full"
        );
        drop(a1);
        assert_eq!(limiter.open(), 4);
        limiter
            .admit(client(1))
            .expect("a place given back is taken again");
    }

    #[test]
    fn no_per_client_limit_when_it_is_zero() {
        let limiter = ConnectionLimiter::new("test", 3, 0);
        let _all: Vec<_> = (0..3).map(|_| limiter.admit(client(1)).unwrap()).collect();
        assert_eq!(
            limiter.admit(client(1)).unwrap_err().reason(),
            "listener_full"
        );
        assert!(limiter.counts.lock().per_client.len() == 1);
    }
}
