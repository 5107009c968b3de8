//! Opaque CONNECT tunnels to hosts Tollgate does not intercept: resolve, check every address
//! against the destination policy, connect to one that passed, then copy bytes both ways
//! unchanged until either side closes or the tunnel has been idle too long.
//!
//! Not here: the policy itself (`destination`), or answering the client (`proxy`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::destination::DestinationPolicy;
use super::head::Authority;

/// Why no upstream connection was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{target} resolves to {ip}, a private or reserved address; tunnels there are refused unless listed in proxy.allowed_private_cidrs")]
    Reserved {
        target: String,
        ip: std::net::IpAddr,
    },
    #[error("cannot resolve {target}: {detail}")]
    Resolve { target: String, detail: String },
    #[error("cannot connect to {target}: {detail}")]
    Connect { target: String, detail: String },
    #[error("timed out connecting to {target}")]
    TimedOut { target: String },
}

/// Resolves `target` (no DNS for IP literals), keeps the addresses the policy permits, and
/// connects to the first that answers, all within `timeout`.
pub async fn dial(
    target: &Authority,
    policy: &DestinationPolicy,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let name = target.to_string();
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || DialError::TimedOut {
        target: name.clone(),
    };
    let resolved: Vec<SocketAddr> = tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(|e| DialError::Resolve {
        target: name.clone(),
        detail: e.to_string(),
    })?
    .take(16)
    .collect();
    let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
        resolved.iter().partition(|a| policy.permits(a.ip()));
    if allowed.is_empty() {
        return Err(match refused.first() {
            Some(a) => DialError::Reserved {
                target: name,
                ip: a.ip(),
            },
            None => DialError::Resolve {
                target: name,
                detail: "no address".into(),
            },
        });
    }
    let mut last = None;
    for addr in allowed {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => last = Some(e),
        }
    }
    Err(DialError::Connect {
        target: name,
        detail: last.map(|e| e.to_string()).unwrap_or_default(),
    })
}

/// How a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// Both sides finished; bytes copied client→upstream and upstream→client.
    Closed {
        up: u64,
        down: u64,
    },
    /// No byte moved either way for the idle timeout.
    Idle,
    Failed(std::io::Error),
}

/// Copies both ways until both directions have ended, one fails, or nothing moved for `idle`.
pub async fn relay<A, B>(client: A, upstream: B, idle: Duration) -> TunnelEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Arc::new(ActivityClock::new());
    let mut client = Tracked {
        inner: client,
        clock: clock.clone(),
    };
    let mut upstream = Tracked {
        inner: upstream,
        clock: clock.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let quiet = clock.idle_for();
        if quiet >= idle {
            return TunnelEnd::Idle;
        }
        tokio::select! {
            done = &mut copy => {
                return match done {
                    Ok((up, down)) => TunnelEnd::Closed { up, down },
                    Err(e) => TunnelEnd::Failed(e),
                };
            }
            _ = tokio::time::sleep(idle - quiet) => {}
        }
    }
}

/// When bytes last moved on a tunnel (milliseconds since the tunnel opened).
struct ActivityClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl ActivityClock {
    fn new() -> ActivityClock {
        ActivityClock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A stream that records every successful read or write on the tunnel's clock.
struct Tracked<S> {
    inner: S,
    clock: Arc<ActivityClock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_both_ways_and_idle_tunnels_end() {
        let (mut client, proxy_side) = tokio::io::duplex(1024);
        let (upstream_side, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(proxy_side, upstream_side, Duration::from_millis(300)));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Nothing more: the tunnel ends on its own after the idle timeout.
        let end = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(end, TunnelEnd::Idle), "{end:?}");
    }

    #[tokio::test]
    async fn reserved_destinations_are_refused_before_connecting() {
        let target = Authority::parse("127.0.0.1:443").unwrap();
        let err = dial(
            &target,
            &DestinationPolicy::default(),
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DialError::Reserved { .. }), "{err}");
        assert!(err.to_string().contains("allowed_private_cidrs"));
    }
}
