//! A deadline on a client's first request head, for the gateway listener.
//!
//! pingora reads a request head with a timeout per read (60 s), so a client trickling one byte
//! at a time can hold a connection and a task for as long as it likes. The gateway listener
//! (`super::listener`) wraps every accepted connection in a [`HeadDeadlineStream`] whose reads fail once
//! `server.client_header_timeout_ms` has passed without a complete head (an empty line after
//! the first bytes); the connection is then closed. Once a head is complete the deadline is
//! gone: bodies, long streams and the wait for the upstream are not limited here.
//!
//! Not here: body reads (`read_body`, per-read timeout), the proxy front door (its own
//! `proxy.handshake_timeout_ms`), or request handling (`super::listener`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;

use crate::telemetry::metric;

/// See the module docs.
#[derive(Debug)]
pub struct HeadDeadlineStream {
    inner: Stream,
    /// Armed until the first head is complete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The last bytes read, so a terminator split across reads is found.
    tail: [u8; 3],
    /// Whether anything but whitespace has arrived (blank lines before a request are not one).
    seen_text: bool,
}

impl HeadDeadlineStream {
    pub fn new(inner: Stream, timeout: Duration) -> HeadDeadlineStream {
        HeadDeadlineStream {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            tail: [0; 3],
            seen_text: false,
        }
    }

    /// Whether `bytes`, after what came before, complete a request head.
    fn completes_head(&mut self, bytes: &[u8]) -> bool {
        self.seen_text |= bytes.iter().any(|b| !b.is_ascii_whitespace());
        let mut window = Vec::with_capacity(3 + bytes.len());
        window.extend_from_slice(&self.tail);
        window.extend_from_slice(bytes);
        let done =
            window.windows(4).any(|w| w == b"\r\n\r\n") || window.windows(2).any(|w| w == b"\n\n");
        let keep = window.len() - 3;
        self.tail.copy_from_slice(&window[keep..]);
        done && self.seen_text
    }

    fn expired(&self) -> bool {
        // Not `is_elapsed`: that only turns true once the timer has been polled, and a client
        // that always has a byte ready never lets the read pend long enough to poll it.
        self.deadline
            .as_ref()
            .is_some_and(|d| d.deadline() <= tokio::time::Instant::now())
    }

    fn timed_out(&mut self) -> std::io::Error {
        self.deadline = None;
        metrics::counter!(metric::CLIENT_HEADER_TIMEOUTS_TOTAL).increment(1);
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not send a complete request head in time (server.client_header_timeout_ms)",
        )
    }
}

impl AsyncRead for HeadDeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.deadline.is_none() {
            return polled;
        }
        match polled {
            Poll::Ready(Ok(())) => {
                let read = buf.filled()[before..].to_vec();
                if self.completes_head(&read) {
                    self.deadline = None;
                } else if self.expired() {
                    // A client that always has one more byte ready never lets a read pend.
                    return Poll::Ready(Err(self.timed_out()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(self.timed_out()));
                }
                Poll::Pending
            }
        }
    }
}

delegate_stream_to_inner!(HeadDeadlineStream);

/// Peeking (pingora's h2c preface probe) happens before any head: no deadline needed for it.
#[async_trait]
impl Peek for HeadDeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_complete_head_disarms_the_deadline() {
        let (mut client, server) = tokio::io::duplex(256);
        let mut s = HeadDeadlineStream::new(Box::new(server), Duration::from_millis(50));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        client.write_all(b"\n\r\n").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 3);
        assert!(s.deadline.is_none(), "split terminator recognised");
        tokio::time::sleep(Duration::from_millis(80)).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(
            s.read(&mut buf).await.unwrap(),
            4,
            "no deadline after the head"
        );
    }

    #[tokio::test]
    async fn a_trickled_head_times_out() {
        let (mut client, server) = tokio::io::duplex(256);
        let mut s = HeadDeadlineStream::new(Box::new(server), Duration::from_millis(100));
        let mut buf = [0u8; 256];
        let started = tokio::time::Instant::now();
        let err = loop {
            client.write_all(b"x").await.unwrap();
            match tokio::time::timeout(Duration::from_millis(30), s.read(&mut buf)).await {
                Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(Err(e)) => break e,
                Err(_) => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "never timed out"
            );
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
