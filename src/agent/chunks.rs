//! The framing of a session's bytes on a data link that carries one session after another.
//!
//! After `ok`, each direction of a reusable link is a run of chunks: a 4-byte big-endian length
//! and that many bytes of the session's stream; a length of 0 is the end mark (the half-close
//! that a TCP FIN is on a link used once). Once both directions have carried their end mark the
//! link is clean, and the server puts it back in the agent's pool for the next session instead
//! of both ends closing it and the agent dialling (and, over `wss://`, handshaking) a new one.
//! The link still carries one session at a time: each session keeps the kernel's flow control
//! of its own, as before.
//!
//! Neither side adds a system call: the writer sends a chunk's header in the same vectored write
//! as its bytes ([`Chunker`]), and the reader strips headers in place from what it read
//! ([`Dechunker`]), so a message is one read and one write at each end as on a raw link. A link
//! that ends any other way (closed without the mark, a chunk cut short, an error) is closed.
//!
//! Where both ends agreed on it ([`RESETS`]), the agent may end its direction with the reset mark
//! instead ([`Chunker::poll_reset`]): its app's connection was reset after what it wrote (an app
//! that answers and closes while the page still sends, one that aborts), which the server reads as
//! a reset after those bytes and the page as the 1011 "connection reset" of a TCP backend.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The request and response header by which a data link's two ends agree on chunks: the agent
/// offers `chunks` when it dials, the server answers it in its `101`. A link without it on both
/// sides carries raw bytes and one session (what agents and servers before it do).
pub const FRAMING_HEADER: &str = "x-wsbridge-link-framing";
/// [`FRAMING_HEADER`]'s value.
pub const CHUNKS: &str = "chunks";
/// A second token of [`FRAMING_HEADER`] beside [`CHUNKS`] (`chunks, resets`), offered by the agent
/// and answered by the server: the agent's direction may end with the reset mark. (Agents and
/// servers before it offer and answer `chunks` alone, and an agent before it reads only that.)
pub const RESETS: &str = "resets";

/// What a data link's two ends agreed on in its `101` ([`FRAMING_HEADER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    /// Chunks: the link carries one session after another (else raw bytes, one session).
    pub chunks: bool,
    /// With chunks: the agent's direction may end with the reset mark.
    pub resets: bool,
}

impl Framing {
    /// Raw bytes, one session.
    pub const RAW: Framing = Framing {
        chunks: false,
        resets: false,
    };

    /// What the tokens of [`FRAMING_HEADER`] values (`chunks, resets`) name: the agent's offer,
    /// or the server's answer. `resets` counts only beside `chunks`.
    pub fn from_tokens<'v>(values: impl IntoIterator<Item = &'v str>) -> Framing {
        let (mut chunks, mut resets) = (false, false);
        for token in values.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
            chunks |= token.eq_ignore_ascii_case(CHUNKS);
            resets |= token.eq_ignore_ascii_case(RESETS);
        }
        Framing {
            chunks,
            resets: chunks && resets,
        }
    }

    /// The header line that offers or answers it (with its CRLF; empty for a raw link). An
    /// answer names only what was offered: an agent from before [`RESETS`] reads a value of
    /// `chunks` alone.
    pub fn header_line(&self) -> String {
        match (self.chunks, self.resets) {
            (false, _) => String::new(),
            (true, false) => format!("{FRAMING_HEADER}: {CHUNKS}\r\n"),
            (true, true) => format!("{FRAMING_HEADER}: {CHUNKS}, {RESETS}\r\n"),
        }
    }
}

/// The header of the reset mark: no chunk is this long ([`MAX_CHUNK`]).
const RESET_MARK: u32 = u32::MAX;

/// The longest chunk a writer sends (a write of more sends this much).
const MAX_CHUNK: usize = 16 << 20;
/// The most pieces of a vectored write put in one chunk (more are left for the next call).
const MAX_PIECES: usize = 32;

/// The reading side of a reusable link: where the stream is between chunks, and bytes read past
/// the end mark (the link's next use, which starts with the next `open` or `ok` line).
#[derive(Debug, Default)]
pub struct Dechunker {
    /// Bytes of the current chunk still to come.
    left: u32,
    /// A header read in part.
    head: [u8; 4],
    head_len: usize,
    /// The end mark was read: this direction of the session is over.
    ended: bool,
    /// The reset mark is understood ([`RESETS`]) ...
    resets: bool,
    /// ... and was read: the direction is over, ended by a reset.
    reset: bool,
    /// Bytes read from the link and not yet decoded: before the end mark, what came with `ok`;
    /// after it, the beginning of the link's next use.
    pending: Vec<u8>,
}

impl Dechunker {
    /// A reader for a session whose first link bytes (read with its `ok` line) are `early`.
    pub fn new(early: Vec<u8>) -> Dechunker {
        Dechunker {
            pending: early,
            ..Dechunker::default()
        }
    }

    /// A reader that also takes the reset mark ([`RESETS`]) as the end of the session, with
    /// an error (`ConnectionReset`) after the session's bytes.
    pub fn with_resets(early: Vec<u8>) -> Dechunker {
        Dechunker {
            resets: true,
            ..Dechunker::new(early)
        }
    }

    /// Whether the end mark was read: the session is over on this side (nothing is left in
    /// part then, as the mark is a whole header at a chunk boundary) and the reader is ready for
    /// the link's next use.
    pub fn clean(&self) -> bool {
        self.ended && !self.reset
    }

    /// Whether the reset mark is understood.
    pub fn resets(&self) -> bool {
        self.resets
    }

    /// For the link's next use: the bytes read past the end mark.
    pub fn into_pending(self) -> Vec<u8> {
        self.pending
    }

    /// Decodes `buf` in place, up to and including an end mark: the session's bytes are moved to
    /// its start. Returns how many there are and how many bytes of `buf` were used (the rest
    /// follows the end mark).
    fn strip(&mut self, buf: &mut [u8]) -> (usize, usize) {
        let (mut r, mut w) = (0, 0);
        while r < buf.len() && !self.ended {
            if self.left > 0 {
                let n = (self.left as usize).min(buf.len() - r);
                if w != r {
                    buf.copy_within(r..r + n, w);
                }
                r += n;
                w += n;
                self.left -= n as u32;
            } else {
                self.head[self.head_len] = buf[r];
                self.head_len += 1;
                r += 1;
                if self.head_len == 4 {
                    self.head_len = 0;
                    match u32::from_be_bytes(self.head) {
                        0 => self.ended = true,
                        RESET_MARK if self.resets => (self.ended, self.reset) = (true, true),
                        n => self.left = n,
                    }
                }
            }
        }
        (w, r)
    }

    /// Reads the session's bytes from `io` into `buf`: as [`AsyncRead::poll_read`], EOF at the
    /// end mark.
    ///
    /// # Errors
    /// `io` failed, or closed before the end mark (the other end gave the link up mid-session),
    /// or the reset mark was read (`ConnectionReset`, once the bytes before it are read).
    pub fn poll_read<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        mut io: Pin<&mut R>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.reset {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "the app reset its connection")));
            }
            if self.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            if self.pending.is_empty() {
                ready!(io.as_mut().poll_read(cx, buf))?;
                if buf.filled().len() == start {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the link closed in the middle of the session",
                    )));
                }
            } else {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.drain(..n);
            }
            let data = &mut buf.filled_mut()[start..];
            let (payload, used) = self.strip(data);
            if used < data.len() {
                // Past the end mark: the link's next use, ahead of anything still pending.
                let after = data[used..].to_vec();
                self.pending.splice(0..0, after);
            }
            buf.set_filled(start + payload);
            if payload > 0 || (self.ended && !self.reset) {
                return Poll::Ready(Ok(()));
            }
            // Only headers so far: read on (the next read may wait, with the waker registered).
        }
    }
}

/// The writing side of a reusable link: the chunk being written.
#[derive(Debug, Default)]
pub struct Chunker {
    /// The current chunk's header, and how much of it is written (4: all of it).
    head: [u8; 4],
    head_at: usize,
    /// Bytes of the current chunk still to write.
    left: usize,
    /// The end mark is queued (in `head`) or written.
    ending: bool,
    /// ... and flushed (a TLS stream holds bytes until then).
    flushed: bool,
}

impl Chunker {
    /// A writer at a chunk boundary.
    pub fn new() -> Chunker {
        Chunker {
            head_at: 4,
            ..Chunker::default()
        }
    }

    /// Whether the end mark (not the reset mark) is written and flushed.
    pub fn ended(&self) -> bool {
        self.flushed && self.head == [0; 4]
    }

    /// Writes `bufs` as (part of) a chunk: as [`AsyncWrite::poll_write_vectored`], counting only
    /// the session's bytes. A chunk's header goes in the same write as its first bytes; a chunk
    /// the stream took only in part is finished by the next calls, with whatever bytes they are
    /// given (the session's stream goes on where it stopped).
    ///
    /// # Errors
    /// `io` failed, or the end mark was already written.
    pub fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        mut io: Pin<&mut W>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.ending {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "written after the end mark")));
        }
        loop {
            if self.head_at < 4 {
                let n = ready!(io.as_mut().poll_write(cx, &self.head[self.head_at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.head_at += n;
                continue;
            }
            let mut pieces = [IoSlice::new(&[]); MAX_PIECES + 1];
            if self.left > 0 {
                let count = take(bufs, self.left, &mut pieces);
                if count == 0 {
                    return Poll::Ready(Ok(0));
                }
                let n = ready!(io.as_mut().poll_write_vectored(cx, &pieces[..count]))?;
                self.left -= n;
                return Poll::Ready(Ok(n));
            }
            let total = bufs.iter().take(MAX_PIECES).map(|b| b.len()).sum::<usize>().min(MAX_CHUNK);
            if total == 0 {
                return Poll::Ready(Ok(0));
            }
            let head = (total as u32).to_be_bytes();
            pieces[0] = IoSlice::new(&head);
            let count = 1 + take(bufs, total, &mut pieces[1..]);
            let n = ready!(io.as_mut().poll_write_vectored(cx, &pieces[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.left = total - n.saturating_sub(4);
            if n < 4 {
                // The stream took part of the header: it is finished before anything else.
                self.head = head;
                self.head_at = n;
                continue;
            }
            if n > 4 {
                return Poll::Ready(Ok(n - 4));
            }
            // Only the header went: write on (the next write may wait, with the waker registered).
        }
    }

    /// Writes the end mark (once) and flushes: this direction of the session is over, the link
    /// stays open.
    ///
    /// # Errors
    /// `io` failed, or a chunk was cut short (the link cannot carry another session).
    pub fn poll_end<W: AsyncWrite + Unpin + ?Sized>(&mut self, io: Pin<&mut W>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_mark(io, cx, 0)
    }

    /// Writes the reset mark (once) instead of the end mark, and flushes: this direction of the
    /// session ended in a reset after what was written. Only to a peer that agreed on
    /// [`RESETS`]; the link carries no other session.
    ///
    /// # Errors
    /// As [`Chunker::poll_end`].
    pub fn poll_reset<W: AsyncWrite + Unpin + ?Sized>(&mut self, io: Pin<&mut W>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_mark(io, cx, RESET_MARK)
    }

    /// Whether the end or reset mark is written or on its way: nothing more goes in this
    /// direction.
    pub fn ending(&self) -> bool {
        self.ending
    }

    fn poll_mark<W: AsyncWrite + Unpin + ?Sized>(&mut self, mut io: Pin<&mut W>, cx: &mut Context<'_>, mark: u32) -> Poll<io::Result<()>> {
        if !self.ending {
            if self.left > 0 || self.head_at < 4 {
                return Poll::Ready(Err(io::Error::other(
                    "a chunk was cut short; the link cannot carry another session",
                )));
            }
            self.ending = true;
            self.head = mark.to_be_bytes();
            self.head_at = 0;
        }
        while self.head_at < 4 {
            let n = ready!(io.as_mut().poll_write(cx, &self.head[self.head_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.head_at += n;
        }
        ready!(io.poll_flush(cx))?;
        self.flushed = true;
        Poll::Ready(Ok(()))
    }
}

/// Puts the first `limit` bytes of `bufs` (at most as many pieces as `out` holds) in `out`;
/// returns how many pieces.
fn take<'b>(bufs: &'b [IoSlice<'_>], mut limit: usize, out: &mut [IoSlice<'b>]) -> usize {
    let mut count = 0;
    for b in bufs {
        if limit == 0 || count == out.len() {
            break;
        }
        if b.is_empty() {
            continue;
        }
        let n = b.len().min(limit);
        out[count] = IoSlice::new(&b[..n]);
        count += 1;
        limit -= n;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream that takes at most `step` bytes per write and gives at most `step` per read,
    /// from a script of what was written: every split a socket may make.
    /// With `stall`, every other call returns `Pending` first (and wakes the task, as a socket
    /// that becomes ready does).
    #[derive(Default)]
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        stall: bool,
        stalled: bool,
    }

    impl Trickle {
        fn new(data: Vec<u8>, step: usize, stall: bool) -> Trickle {
            Trickle {
                data,
                step,
                stall,
                ..Trickle::default()
            }
        }

        fn stall(&mut self, cx: &mut Context<'_>) -> bool {
            if self.stall && !self.stalled {
                self.stalled = true;
                cx.waker().wake_by_ref();
                return true;
            }
            self.stalled = false;
            false
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.stall(cx) {
                return Poll::Pending;
            }
            let n = buf.len().min(this.step);
            this.data.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.stall(cx) {
                return Poll::Pending;
            }
            let n = (this.data.len() - this.at).min(this.step).min(buf.remaining());
            buf.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    async fn write_session(step: usize, stall: bool, writes: &[&[u8]]) -> Vec<u8> {
        let mut io = Trickle::new(Vec::new(), step, stall);
        let mut chunker = Chunker::new();
        for w in writes {
            let mut at = 0;
            while at < w.len() {
                // Two pieces per call, as the relay gathers them.
                let (a, b) = w[at..].split_at((w.len() - at) / 2);
                let bufs = [IoSlice::new(a), IoSlice::new(b)];
                at += std::future::poll_fn(|cx| chunker.poll_write(Pin::new(&mut io), cx, &bufs))
                    .await
                    .unwrap();
            }
        }
        std::future::poll_fn(|cx| chunker.poll_end(Pin::new(&mut io), cx)).await.unwrap();
        assert!(chunker.ended());
        let e = std::future::poll_fn(|cx| chunker.poll_write(Pin::new(&mut io), cx, &[IoSlice::new(b"late")])).await;
        assert!(e.is_err(), "nothing is written after the end mark");
        io.data
    }

    async fn read_session(wire: Vec<u8>, step: usize, stall: bool, read_size: usize) -> (Vec<u8>, Vec<u8>) {
        let mut io = Trickle::new(wire, step, stall);
        let mut dechunker = Dechunker::default();
        let mut got = Vec::new();
        loop {
            let mut space = vec![0u8; read_size];
            let mut buf = ReadBuf::new(&mut space);
            std::future::poll_fn(|cx| dechunker.poll_read(Pin::new(&mut io), cx, &mut buf))
                .await
                .unwrap();
            if buf.filled().is_empty() {
                break;
            }
            got.extend_from_slice(buf.filled());
        }
        assert!(dechunker.clean());
        let mut after = dechunker.into_pending();
        after.extend_from_slice(&io.data[io.at..]);
        (got, after)
    }

    #[tokio::test]
    async fn a_session_crosses_any_split_of_writes_and_reads_exactly() {
        let big: Vec<u8> = (0..5_000u32).map(|i| (i % 251) as u8).collect();
        let writes: [&[u8]; 5] = [b"a", b"hello", &big, b"", b"tail!"];
        let sent: Vec<u8> = writes.concat();
        for stall in [false, true] {
            for step in [1, 2, 3, 5, 4096, 1 << 20] {
                let mut wire = write_session(step, stall, &writes).await;
                // The link's next use follows the end mark at once.
                wire.extend_from_slice(b"open pos\n");
                for read_size in [1, 7, 4096, 1 << 20] {
                    for read_step in [1, 3, 64 * 1024, 1 << 20] {
                        let (got, after) = read_session(wire.clone(), read_step, stall, read_size).await;
                        let case = format!("write step {step}, read size {read_size}, read step {read_step}, stall {stall}");
                        assert_eq!(got, sent, "{case}");
                        assert_eq!(after, b"open pos\n", "{case}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn the_first_bytes_read_with_ok_are_decoded_first() {
        let wire = write_session(1 << 20, false, &[b"WELCOME and more"]).await;
        let (early, rest) = wire.split_at(6);
        let mut io = Trickle::new(rest.to_vec(), 1 << 20, false);
        let mut dechunker = Dechunker::new(early.to_vec());
        let mut got = Vec::new();
        let mut reader = crate::agent::link::ChunkReader {
            io: &mut io,
            chunks: &mut dechunker,
        };
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"WELCOME and more");
    }

    /// The reset mark ends the session's bytes with `ConnectionReset`, after every byte before
    /// it, at any split of reads; the link is not clean for another session.
    #[tokio::test]
    async fn the_reset_mark_is_an_error_after_the_bytes_before_it() {
        let mut io = Trickle::new(Vec::new(), 1 << 20, false);
        let mut chunker = Chunker::new();
        let bufs = [IoSlice::new(b"hello\n")];
        std::future::poll_fn(|cx| chunker.poll_write(Pin::new(&mut io), cx, &bufs))
            .await
            .unwrap();
        std::future::poll_fn(|cx| chunker.poll_reset(Pin::new(&mut io), cx)).await.unwrap();
        assert!(chunker.ending() && !chunker.ended(), "a reset is not the end mark");
        for step in [1, 3, 1 << 20] {
            let mut link = Trickle::new(io.data.clone(), step, true);
            let mut dechunker = Dechunker::with_resets(Vec::new());
            let mut reader = crate::agent::link::ChunkReader {
                io: &mut link,
                chunks: &mut dechunker,
            };
            let mut got = Vec::new();
            let e = reader.read_to_end(&mut got).await.unwrap_err();
            assert_eq!(
                (got.as_slice(), e.kind()),
                (&b"hello\n"[..], io::ErrorKind::ConnectionReset),
                "step {step}"
            );
            assert!(!dechunker.clean());
        }
    }

    #[tokio::test]
    async fn a_link_closed_before_the_end_mark_is_an_error() {
        let mut wire = write_session(1 << 20, false, &[b"0123456789"]).await;
        wire.truncate(8);
        let mut io = Trickle::new(wire, 64, false);
        let mut dechunker = Dechunker::default();
        let mut reader = crate::agent::link::ChunkReader {
            io: &mut io,
            chunks: &mut dechunker,
        };
        let e = reader.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!dechunker.clean());
    }

    #[tokio::test]
    async fn a_chunk_cut_short_leaves_the_link_unfit_for_another_session() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut chunker = Chunker::new();
        let mut writer = crate::agent::link::ChunkWriter {
            io: a,
            chunks: &mut chunker,
        };
        // The duplex takes 16 bytes: the header and 12 of the 100.
        let n = writer.write(&[7u8; 100]).await.unwrap();
        assert_eq!(n, 12);
        let e = writer.shutdown().await.unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
        assert!(!chunker.ended());
        let mut head = [0u8; 4];
        b.read_exact(&mut head).await.unwrap();
        assert_eq!(u32::from_be_bytes(head), 100);
    }
}
