//! Bounds on every request head an HTTP/1 connection sends through the gateway listener's loop
//! (`super::listener`: the gateway port, plain requests on the proxy port, and requests inside
//! decrypted HTTP/1.1 tunnels): a size cap, enforced here on the bytes as they arrive, and a
//! whole-head deadline, which the loop puts around each head it waits for.
//!
//! pingora reads a head into a buffer that may grow to 1 MiB, with a timeout per read (60 s),
//! so a client trickling one byte a minute, or parking ~1 MiB of a head that never ends, could
//! hold a connection and its memory forever: on its first head, and on every later one on a
//! kept-alive connection. [`HeadGuardStream`] wraps each connection; while the loop waits for a
//! head ([`HeadWatch::expect_head`]) it counts what is read up to the head's blank line and
//! fails the read that would take the head past `server.max_request_head_bytes` (reads are cut
//! to the room left, so pingora's buffer never holds more). After the blank line, reads (the
//! body, anything else) pass through untouched.
//!
//! Not here: the deadline's clock and the answers (`super::listener`), body reads (their own
//! per-read timeout), the proxy's CONNECT head (`crate::proxy`, its own cap and timeout).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, ReadBuf};

/// What the listener loop and its connection's [`HeadGuardStream`] share: whether a head is
/// being read, and how far it has got.
#[derive(Debug, Default)]
pub struct HeadWatch {
    /// Between [`HeadWatch::expect_head`] and the head's blank line. Apart from the progress
    /// so that body reads, which only look at it, take no lock.
    reading: AtomicBool,
    progress: Mutex<HeadProgress>,
}

#[derive(Debug, Default)]
struct HeadProgress {
    /// Bytes of the current head so far.
    bytes: usize,
    /// The last bytes read, so a blank line split across reads is found.
    tail: [u8; 3],
    /// Whether anything but whitespace has arrived (blank lines before a request are not one).
    seen_text: bool,
    too_large: bool,
}

impl HeadWatch {
    /// The listener is about to read a head: count from zero.
    pub fn expect_head(&self) {
        *self.progress.lock() = HeadProgress::default();
        self.reading.store(true, Ordering::Release);
    }

    /// Bytes of the head being read (0: the client has sent nothing since the last one).
    pub fn bytes_read(&self) -> usize {
        self.progress.lock().bytes
    }

    /// Whether the head being read went past the cap.
    pub fn too_large(&self) -> bool {
        self.progress.lock().too_large
    }

    /// No head is being read any more (it is complete, or the connection is being closed):
    /// reads pass through.
    pub fn stop(&self) {
        self.reading.store(false, Ordering::Release);
    }

    fn reading(&self) -> bool {
        self.reading.load(Ordering::Acquire)
    }
}

impl HeadProgress {
    /// Takes `bytes` just read as part of the head; true when they include the blank line
    /// that ends it (what follows is not counted).
    fn take(&mut self, bytes: &[u8]) -> bool {
        for (i, &b) in bytes.iter().enumerate() {
            self.seen_text |= !b.is_ascii_whitespace();
            // A line feed ending an empty line: after a line feed, or after one and a carriage
            // return (httparse takes bare line feeds as well as CRLF, even mixed).
            let ends = b == b'\n' && (self.tail[2] == b'\n' || self.tail[1..] == *b"\n\r");
            self.tail = [self.tail[1], self.tail[2], b];
            if ends && self.seen_text {
                self.bytes += i + 1;
                return true;
            }
        }
        self.bytes += bytes.len();
        false
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct HeadGuardStream {
    inner: Stream,
    watch: Arc<HeadWatch>,
    max_bytes: usize,
}

impl HeadGuardStream {
    pub fn new(inner: Stream, watch: Arc<HeadWatch>, max_bytes: usize) -> HeadGuardStream {
        HeadGuardStream {
            inner,
            watch,
            max_bytes,
        }
    }
}

fn too_large(max: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("request head larger than {max} bytes (server.max_request_head_bytes)"),
    )
}

impl AsyncRead for HeadGuardStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.watch.reading() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let (bytes, over) = {
            let p = self.watch.progress.lock();
            (p.bytes, p.too_large)
        };
        if over || bytes >= self.max_bytes {
            return Poll::Ready(Err(too_large(self.max_bytes)));
        }
        let room = self.max_bytes - bytes;
        let before = buf.filled().len();
        let polled = if buf.remaining() > room {
            let mut limited = buf.take(room);
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            // SAFETY: the first `n` bytes of `buf`'s unfilled part were filled through
            // `limited`, which borrows exactly that part.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            polled
        } else {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        };
        if !matches!(polled, Poll::Ready(Ok(()))) {
            return polled;
        }
        let read = &buf.filled()[before..];
        let mut progress = self.watch.progress.lock();
        if progress.take(read) {
            drop(progress);
            self.watch.stop();
        } else if progress.bytes >= self.max_bytes {
            progress.too_large = true;
            return Poll::Ready(Err(too_large(self.max_bytes)));
        }
        Poll::Ready(Ok(()))
    }
}

delegate_stream_to_inner!(HeadGuardStream);

/// Peeking (pingora's h2c preface probe) reads nothing: no head is counted.
#[async_trait]
impl Peek for HeadGuardStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn guarded(max: usize) -> (tokio::io::DuplexStream, HeadGuardStream, Arc<HeadWatch>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let watch = Arc::new(HeadWatch::default());
        let stream = HeadGuardStream::new(Box::new(server), watch.clone(), max);
        (client, stream, watch)
    }

    #[tokio::test]
    async fn a_head_is_counted_to_its_blank_line_and_then_reads_pass_through() {
        let (mut client, mut s, watch) = guarded(64);
        watch.expect_head();
        client
            .write_all(b"\r\nGET / HTTP/1.1\r\nhost: x\r")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(watch.bytes_read(), n);
        let rest = b"\n\r\nbody that is longer than the cap allows for a head";
        client.write_all(rest).await.unwrap();
        let mut body = Vec::new();
        while body.len() < rest.len() {
            let n = s.read(&mut buf).await.unwrap();
            body.extend_from_slice(&buf[..n]);
        }
        assert!(!watch.too_large());
        assert_eq!(
            watch.bytes_read(),
            29,
            "split terminator found; the body is not counted"
        );

        // The next head on the connection is counted from zero again; bare and mixed line
        // endings end a head too.
        watch.expect_head();
        client
            .write_all(b"GET / HTTP/1.1\nhost: y\n\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!((n, watch.bytes_read()), (24, 24));
    }

    #[tokio::test]
    async fn a_head_past_the_cap_fails_the_read_that_reaches_it() {
        let (mut client, mut s, watch) = guarded(100);
        watch.expect_head();
        let mut head = b"GET / HTTP/1.1\r\nx-pad: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 1000));
        client.write_all(&head).await.unwrap();
        let mut buf = [0u8; 4096];
        let mut got = 0;
        let err = loop {
            match s.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(watch.too_large());
        assert!(got < 100, "no more than the cap was handed on ({got})");
        assert_eq!(watch.bytes_read(), 100);
    }

    #[tokio::test]
    async fn a_head_of_exactly_the_cap_passes() {
        let head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let (mut client, mut s, watch) = guarded(head.len());
        watch.expect_head();
        client.write_all(head).await.unwrap();
        let mut buf = [0u8; 256];
        let mut got = 0;
        while got < head.len() {
            got += s.read(&mut buf[got..]).await.unwrap();
        }
        assert!(!watch.too_large());
    }
}
