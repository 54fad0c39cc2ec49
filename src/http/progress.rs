//! The write deadline of an HTTP answer, pushed back by every write that moves bytes: a static
//! file may take as long as a slow client needs while it keeps reading, and an answer that moves
//! nothing for the window (a client that stopped reading, a file that never yields its bytes) is
//! given up. A deadline on the whole answer cut a 30 MB file to a client at 400 KB/s after
//! 30 s, mid-body behind a full `Content-Length` (a review behind nginx).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When an answer last moved bytes, and how long it may go without.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    window: Duration,
    /// Nanoseconds from `start` to the last write that moved bytes (0: none yet).
    last: AtomicU64,
}

impl Progress {
    /// A deadline `window` from now, until a write moves it.
    pub fn new(window: Duration) -> Progress {
        Progress {
            start: Instant::now(),
            window,
            last: AtomicU64::new(0),
        }
    }

    /// `io`, whose writes that move bytes push the deadline back.
    pub fn track<S>(&self, io: S) -> Tracked<'_, S> {
        Tracked { io, progress: self }
    }

    fn moved(&self) {
        let since = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    fn deadline(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed)) + self.window
    }

    /// Completes once nothing has moved for the window.
    pub async fn stalled(&self) {
        loop {
            let deadline = self.deadline();
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose writes are watched by a [`Progress`]; reads pass through.
#[derive(Debug)]
pub struct Tracked<'p, S> {
    io: S,
    progress: &'p Progress,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(1..))) {
            self.progress.moved();
        }
        written
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(1..))) {
            self.progress.moved();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
