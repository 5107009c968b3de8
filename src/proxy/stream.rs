//! A pingora stream with bytes already read from it put back in front.
//!
//! The proxy reads a connection's first request head itself. When that head turns out not to be
//! a CONNECT (the gateway serves it), or a client sent its TLS ClientHello right behind the
//! CONNECT, those bytes must be read again by whoever handles the connection next.
//! [`PrefixedStream`] replays them and then reads from the connection; writes and pingora's
//! connection facts (ids, digests, TLS details) go to the connection unchanged.
//!
//! Not here: parsing (`head`), TLS (`mitm`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, ReadBuf};

/// See the module docs.
#[derive(Debug)]
pub struct PrefixedStream {
    prefix: Bytes,
    inner: Stream,
}

impl PrefixedStream {
    pub fn new(prefix: Bytes, inner: Stream) -> PrefixedStream {
        PrefixedStream { prefix, inner }
    }
}

impl AsyncRead for PrefixedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

delegate_stream_to_inner!(PrefixedStream);

/// Peeking would have to see the prefix too; nothing in the proxy path needs it.
impl Peek for PrefixedStream {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_read_first_then_the_connection() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = PrefixedStream::new(Bytes::from_static(b"GET / "), Box::new(server));
        let mut client = client;
        client.write_all(b"HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let mut all = String::new();
        s.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\n");
    }
}
