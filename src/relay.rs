//! The pump: one WebSocket session bound to one backend stream.
//!
//! Two direction futures run together in the session's task, each with one buffer in flight:
//! - client → backend ([`client_to_backend`]): read a message, await its write to the backend,
//!   read the next. A backend that stops reading stops us reading the client.
//! - backend → client ([`backend_to_client`]): wait until the backend is readable, take a buffer
//!   sized to recent reads (4 KiB to 256 KiB, so an idle session holds none), send it as a message,
//!   await the send, repeat. A client that stops reading stops us reading the backend. It also sends
//!   the keepalive pings.
//!
//! Around them, [`run`] races the idle deadline (no bytes either way), the session lifetime and
//! shutdown, and owns every ending: which close code the client gets, and that bytes are not lost:
//! on backend EOF everything read is sent before the close frame; on the client's close frame
//! everything it sent before is written before the backend gets its FIN.

use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendReader, BackendWriter};
use crate::config::{Framing, Timeouts};

/// Smallest and largest backend read.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Close reasons are limited to 123 bytes by RFC 6455.
const MAX_REASON: usize = 123;

/// What a session is allowed to do.
#[derive(Debug, Clone, Copy)]
pub struct SessionParams<'a> {
    /// Backend → client framing.
    pub framing: Framing,
    /// Largest line kept in `lines` framing before it is sent as it is.
    pub max_message_size: usize,
    /// Deadlines (borrowed from the configuration the connection started with: a copy would sit
    /// in every session's state).
    pub timeouts: &'a Timeouts,
}

/// How a session ended, for the session log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The close code the session ended with (sent by us, or by the client when it closed first);
    /// 1006 when no close frame was exchanged.
    pub code: u16,
    /// Why, in a few words.
    pub reason: String,
    /// Which side ended it: "client", "backend" or "bridge".
    pub ended_by: &'static str,
    /// Payload bytes client → backend.
    pub bytes_up: u64,
    /// Payload bytes backend → client.
    pub bytes_down: u64,
}

/// Why the pump stopped.
#[derive(Debug)]
enum End {
    /// The client sent a close frame (its code and reason).
    ClientClosed(Option<CloseFrame>),
    /// The client's connection ended without a close frame.
    ClientGone(String),
    /// The client broke the protocol, sent bad UTF-8 or too big a message.
    ClientError(WsError),
    /// The backend sent EOF; everything was delivered and the close frame sent.
    BackendEof,
    /// Reading from or writing to the backend failed.
    BackendError(&'static str, io::Error),
    /// No bytes either way for the idle timeout.
    Idle,
    /// The session lifetime ran out.
    Lifetime,
    /// The server is shutting down.
    Shutdown,
    /// A ping went unanswered.
    PongTimeout,
}

/// The last moment bytes moved, in milliseconds since the session began.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// When the last pong arrived (ms since start), for the keepalive.
    pong_ms: AtomicU64,
    /// Whether client → backend is waiting on a backend write: pongs then sit unread in the
    /// client socket, and a missing pong says nothing about the client.
    backend_blocked: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }
}

/// Runs a session to its end and says how it ended. Never panics on peer input; every wait has a
/// deadline from `params.timeouts` or ends with the peer's socket.
pub async fn run<S>(ws: Box<WebSocketStream<S>>, mut backend: Backend, params: &SessionParams<'_>, shutdown: &CancellationToken) -> Summary
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The stream arrives boxed (a few hundred bytes not copied into every future on the way) and
    // moves into the split's shared half here.
    let (mut sink, mut stream) = (*ws).split();
    let (mut reader, mut writer) = backend.halves();
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        pong_ms: AtomicU64::new(0),
        backend_blocked: std::sync::atomic::AtomicBool::new(false),
    };
    let (mut up, mut down) = (0u64, 0u64);
    let t = params.timeouts;

    let end = {
        let mut c2b = pin!(client_to_backend(&mut stream, &mut writer, params.framing, &mut up, &activity));
        // Boxed so it can be dropped (freeing `sink`) while `c2b` goes on.
        let mut b2c = Box::pin(backend_to_client(&mut sink, &mut reader, params, &mut down, &activity));
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => End::Shutdown,
            end = &mut c2b => end,
            end = &mut b2c => end,
            end = deadlines(&activity, t.idle, t.max_lifetime) => end,
        };
        // Endings that did not come from `c2b` leave it running, possibly in the middle of a
        // write to the backend: it is never dropped there (that would cut a hole in the byte
        // stream). Our close frame goes out, then the same `c2b` carries the client's data in
        // flight to the backend until the client's close frame answers ours.
        let ours = match &first {
            End::BackendEof => None, // b2c sent 1000 itself
            End::Idle => Some("idle timeout"),
            End::Lifetime => Some("session lifetime exceeded"),
            End::Shutdown => Some("server shutting down"),
            _ => None,
        };
        match (first, ours) {
            (End::BackendEof, _) => {
                drop(b2c);
                match Box::pin(timeout(t.close, &mut c2b)).await {
                    Ok(End::ClientClosed(_)) | Err(_) => End::BackendEof,
                    Ok(other) => other,
                }
            }
            (end, Some(reason)) => {
                drop(b2c);
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: reason.into(),
                };
                if let Ok(Ok(())) = Box::pin(timeout(t.close, sink.send(Message::Close(Some(frame))))).await {
                    let _ = Box::pin(timeout(t.close, &mut c2b)).await;
                }
                end
            }
            (end, None) => end,
        }
    };

    let summary = |code: u16, reason: String, ended_by| Summary {
        code,
        reason,
        ended_by,
        bytes_up: up,
        bytes_down: down,
    };
    let result = match end {
        End::ClientClosed(frame) => {
            // tungstenite queued the echo of the client's close frame; flush it.
            let _ = Box::pin(timeout(t.close, sink.close())).await;
            let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
            summary(code, reason, "client")
        }
        End::ClientGone(why) => summary(1006, why, "client"),
        End::BackendEof => summary(1000, "backend closed".into(), "backend"),
        // Endings where we send the close frame, then wait for the client's answer. Whether the
        // client's data still in flight goes on to the backend depends on the backend being fine.
        End::ClientError(e) => {
            let (code, reason) = classify(&e);
            Box::pin(close_and_drain(&mut sink, &mut stream, code, &reason, t.close)).await;
            summary(u16::from(code), reason, "client")
        }
        End::BackendError(what, e) => {
            let reason = format!("backend {what} failed: {}", crate::backend::describe(&e));
            Box::pin(close_and_drain(&mut sink, &mut stream, CloseCode::Error, &reason, t.close)).await;
            summary(1011, reason, "backend")
        }
        End::Idle => summary(1001, "idle timeout".into(), "bridge"),
        End::Lifetime => summary(1001, "session lifetime exceeded".into(), "bridge"),
        End::Shutdown => summary(1001, "server shutting down".into(), "bridge"),
        End::PongTimeout => {
            // The peer is gone: one attempt to say so, briefly, and no waiting for an answer.
            let reason = "ping timeout".to_owned();
            let frame = CloseFrame {
                code: CloseCode::Away,
                reason: reason.clone().into(),
            };
            let _ = Box::pin(timeout(
                Duration::from_millis(100).min(t.close),
                sink.send(Message::Close(Some(frame))),
            ))
            .await;
            summary(1001, reason, "bridge")
        }
    };
    // Everything the client sent has been written: now the backend may see EOF.
    let _ = Box::pin(timeout(t.close, writer.shutdown())).await;
    // Boxed so the reunited stream is not part of every session's state.
    let _ = Box::pin(async move {
        if let Ok(mut ws) = sink.reunite(stream) {
            let _ = timeout(t.close, ws.get_mut().shutdown()).await;
        }
    })
    .await;
    result
}

/// Sends our close frame after an error, then waits (discarding what arrives) until the client's
/// close frame answers ours or `wait` runs out, so the close frame is not lost to a reset.
async fn close_and_drain<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    stream: &mut SplitStream<WebSocketStream<S>>,
    code: CloseCode,
    reason: &str,
    wait: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: truncate(reason).into(),
    };
    let deadline = Instant::now() + wait;
    if tokio::time::timeout_at(deadline, sink.send(Message::Close(Some(frame))))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout_at(deadline, async { while let Some(Ok(_)) = stream.next().await {} }).await;
}

/// The close code and reason for an error from the client side.
fn classify(e: &WsError) -> (CloseCode, String) {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            (CloseCode::Size, format!("message too big: {size} > {max_size} bytes"))
        }
        WsError::Capacity(c) => (CloseCode::Size, c.to_string()),
        WsError::Utf8(_) => (CloseCode::Invalid, "invalid UTF-8 in text message".into()),
        WsError::Protocol(ProtocolError::InvalidCloseSequence) => (CloseCode::Protocol, "invalid close sequence".into()),
        WsError::Protocol(p) => (CloseCode::Protocol, format!("protocol error: {p}")),
        other => (CloseCode::Protocol, other.to_string()),
    }
}

/// A close reason cut to fit a close frame (123 bytes), at a character boundary.
pub(crate) fn truncate(reason: &str) -> String {
    if reason.len() <= MAX_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Resolves with [`End::Idle`] when nothing has moved for `idle`, or [`End::Lifetime`] when the
/// session has lived `lifetime`; never when neither is set. One timer serves both, and it is
/// allocated only when one is set, so a session without them carries none.
async fn deadlines(activity: &Activity, idle: Option<Duration>, lifetime: Option<Duration>) -> End {
    if idle.is_none() && lifetime.is_none() {
        return std::future::pending().await;
    }
    let end_of_life = lifetime.map(|l| activity.start + l);
    let mut timer = Box::pin(tokio::time::sleep_until(activity.start));
    loop {
        let now = Instant::now();
        if end_of_life.is_some_and(|at| now >= at) {
            return End::Lifetime;
        }
        let idle_at = idle.map(|i| activity.at(activity.last_ms.load(Ordering::Relaxed)) + i);
        if idle_at.is_some_and(|at| now >= at) {
            return End::Idle;
        }
        let next = match (idle_at, end_of_life) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(now),
        };
        timer.as_mut().reset(next);
        timer.as_mut().await;
    }
}

/// Client → backend: every data message's payload, in order, written fully before the next read.
async fn client_to_backend<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    backend: &mut BackendWriter<'_>,
    framing: Framing,
    bytes: &mut u64,
    activity: &Activity,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let msg = match stream.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(WsError::Io(e))) => return End::ClientGone(format!("client connection failed: {}", crate::backend::describe(&e))),
            Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                return End::ClientGone("client closed the connection without a close frame".into())
            }
            Some(Err(e)) => return End::ClientError(e),
            None => return End::ClientGone("client closed the connection without a close frame".into()),
        };
        let data: &[u8] = match &msg {
            Message::Binary(b) => b,
            Message::Text(t) => t.as_bytes(),
            Message::Pong(_) => {
                activity.pong_ms.store(activity.now_ms(), Ordering::Relaxed);
                continue;
            }
            // tungstenite answers pings itself; neither reaches the backend.
            Message::Ping(_) | Message::Frame(_) => continue,
            Message::Close(frame) => return End::ClientClosed(frame.clone()),
        };
        let newline = framing == Framing::Lines && !data.ends_with(b"\n");
        activity.backend_blocked.store(true, Ordering::Relaxed);
        let written = if newline {
            backend.write_all_parts(data, b"\n").await
        } else {
            backend.write_all(data).await
        };
        activity.backend_blocked.store(false, Ordering::Relaxed);
        if let Err(e) = written {
            return End::BackendError("write", e);
        }
        *bytes += data.len() as u64;
        activity.touch();
    }
}

/// Backend → client: read what is waiting, frame it, send it; keepalive pings in between.
async fn backend_to_client<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    backend: &mut BackendReader<'_>,
    params: &SessionParams<'_>,
    bytes: &mut u64,
    activity: &Activity,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framer = Framer::new(params.framing, params.max_message_size);
    let mut read_size = 16 * 1024;
    let ping = params.timeouts.ping_interval;
    let pong_timeout = params.timeouts.pong_timeout;
    // Keepalive state: when the next ping is due, and when the outstanding one was sent.
    let mut next_ping = ping.map(|p| Instant::now() + p);
    let mut ping_sent_ms: Option<u64> = None;
    // Allocated only when keepalive is on.
    let mut keepalive: Option<Pin<Box<tokio::time::Sleep>>> = next_ping.map(|at| Box::pin(sleep_until(at)));
    loop {
        if let Some(timer) = &mut keepalive {
            let at = match (ping_sent_ms, next_ping) {
                (Some(sent), _) => activity.at(sent) + pong_timeout,
                (None, at) => at.unwrap_or_else(Instant::now),
            };
            timer.as_mut().reset(at);
        }
        tokio::select! {
            ready = backend.readable() => {
                if let Err(e) = ready {
                    return End::BackendError("read", e);
                }
                // Readable now: the buffer exists only from here until the message is sent.
                let mut buf = BytesMut::with_capacity(read_size);
                let n = match backend.read_buf(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => return End::BackendError("read", e),
                };
                // Size the next read by this one: grow while reads fill the buffer, shrink when
                // they use little of it.
                if n == read_size {
                    read_size = (read_size * 2).min(MAX_READ);
                } else if n < read_size / 4 {
                    read_size = (read_size / 2).max(MIN_READ);
                }
                let eof = n == 0;
                let messages = if eof { framer.finish() } else { framer.push(buf.split().freeze()) };
                if let Err(e) = send_all(sink, messages).await {
                    return e;
                }
                *bytes += n as u64;
                if eof {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "backend closed".into() };
                    return match sink.send(Message::Close(Some(frame))).await {
                        Ok(()) => End::BackendEof,
                        Err(e) => sink_error(e),
                    };
                }
                activity.touch();
            }
            _ = tick(&mut keepalive), if keepalive.is_some() => {
                if let Some(sent) = ping_sent_ms {
                    // While we are not reading the client (its messages wait for a slow backend),
                    // its pong cannot be seen: that is backpressure, not a dead client.
                    if activity.backend_blocked.load(Ordering::Relaxed) {
                        ping_sent_ms = Some(activity.now_ms());
                        continue;
                    }
                    if activity.pong_ms.load(Ordering::Relaxed) < sent {
                        return End::PongTimeout;
                    }
                    ping_sent_ms = None;
                    continue;
                }
                let sent = activity.now_ms();
                if let Err(e) = sink.send(Message::Ping(Bytes::new())).await {
                    return sink_error(e);
                }
                ping_sent_ms = Some(sent);
                next_ping = ping.map(|p| Instant::now() + p);
            }
        }
        // A pong that arrived since the ping was sent settles it.
        if let Some(sent) = ping_sent_ms {
            if activity.pong_ms.load(Ordering::Relaxed) >= sent {
                ping_sent_ms = None;
            }
        }
    }
}

/// Waits for an optional timer; never resolves without one.
async fn tick(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn send_all<S>(sink: &mut SplitSink<WebSocketStream<S>, Message>, messages: Vec<Message>) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match messages.len() {
        0 => Ok(()),
        1 => sink
            .send(messages.into_iter().next().expect("one message"))
            .await
            .map_err(sink_error),
        _ => {
            for m in messages {
                sink.feed(m).await.map_err(sink_error)?;
            }
            sink.flush().await.map_err(sink_error)
        }
    }
}

fn sink_error(e: WsError) -> End {
    match e {
        WsError::Io(e) => End::ClientGone(format!("client connection failed: {}", crate::backend::describe(&e))),
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::ClientGone("client connection closed".into()),
        other => End::ClientError(other),
    }
}

/// Turns backend bytes into messages for one framing mode.
struct Framer {
    framing: Framing,
    max_line: usize,
    /// `text`: an incomplete UTF-8 sequence at the end of the last read. `lines`: the unfinished line.
    pending: Vec<u8>,
}

impl Framer {
    fn new(framing: Framing, max_line: usize) -> Framer {
        Framer {
            framing,
            max_line,
            pending: Vec::new(),
        }
    }

    /// Messages for one read.
    fn push(&mut self, data: Bytes) -> Vec<Message> {
        match self.framing {
            Framing::Binary => vec![Message::Binary(data)],
            Framing::Text => {
                let mut all = std::mem::take(&mut self.pending);
                all.extend_from_slice(&data);
                let cut = complete_utf8_len(&all);
                self.pending = all.split_off(cut);
                if all.is_empty() {
                    return Vec::new();
                }
                vec![Message::Text(lossy(all).into())]
            }
            Framing::Lines => {
                let mut out = Vec::new();
                let mut rest: &[u8] = &data;
                while let Some(i) = rest.iter().position(|&b| b == b'\n') {
                    self.pending.extend_from_slice(&rest[..i]);
                    rest = &rest[i + 1..];
                    let mut line = std::mem::take(&mut self.pending);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push(Message::Text(lossy(line).into()));
                }
                self.pending.extend_from_slice(rest);
                // A line longer than the limit goes out in pieces rather than growing without bound.
                while self.pending.len() > self.max_line {
                    let tail = self.pending.split_off(complete_utf8_len(&self.pending[..self.max_line]).max(1));
                    let piece = std::mem::replace(&mut self.pending, tail);
                    out.push(Message::Text(lossy(piece).into()));
                }
                out
            }
        }
    }

    /// Messages for what is left at EOF.
    fn finish(&mut self) -> Vec<Message> {
        if self.framing == Framing::Binary || self.pending.is_empty() {
            return Vec::new();
        }
        vec![Message::Text(lossy(std::mem::take(&mut self.pending)).into())]
    }
}

/// Text from bytes; invalid sequences become U+FFFD (telnet-style backends send bytes like 0xFF
/// that are not UTF-8, and a text route should still carry the rest).
fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The length of `b` without a trailing incomplete UTF-8 sequence (which may still be completed by
/// the next read).
fn complete_utf8_len(b: &[u8]) -> usize {
    // Look at most 3 bytes back for the lead byte of the last sequence.
    for back in 1..=b.len().min(3) {
        let byte = b[b.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // continuation byte
        }
        let needed = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needed > back { b.len() - back } else { b.len() };
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(ms: Vec<Message>) -> Vec<String> {
        ms.into_iter().map(|m| m.into_text().unwrap().to_string()).collect()
    }

    #[test]
    fn text_never_splits_code_points() {
        let mut f = Framer::new(Framing::Text, 1024);
        let s = "héllo €";
        let b = s.as_bytes();
        let cut = b.len() - 2; // inside '€'
        let mut out = texts(f.push(Bytes::copy_from_slice(&b[..cut])));
        out.extend(texts(f.push(Bytes::copy_from_slice(&b[cut..]))));
        assert_eq!(out.concat(), s);
        assert_eq!(out[0], "héllo ");
        assert!(f.finish().is_empty());
    }

    #[test]
    fn text_replaces_invalid_bytes() {
        let mut f = Framer::new(Framing::Text, 1024);
        assert_eq!(texts(f.push(Bytes::from_static(b"a\xffb"))), vec!["a\u{fffd}b"]);
        // An incomplete sequence left at EOF is replaced, not dropped.
        assert!(f.push(Bytes::from_static(b"\xe2\x82")).is_empty());
        assert_eq!(texts(f.finish()), vec!["\u{fffd}"]);
    }

    #[test]
    fn lines_split_and_bound() {
        let mut f = Framer::new(Framing::Lines, 8);
        assert_eq!(texts(f.push(Bytes::from_static(b"one\r\ntwo\nthr"))), vec!["one", "two"]);
        assert_eq!(texts(f.push(Bytes::from_static(b"ee\n"))), vec!["three"]);
        assert_eq!(texts(f.push(Bytes::from_static(b"0123456789ab"))), vec!["01234567"]);
        assert_eq!(texts(f.finish()), vec!["89ab"]);
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let t = truncate(&long);
        assert!(t.len() <= MAX_REASON && long.starts_with(&t));
    }
}

/// Reads at most this much from the client per system call, into a per-thread scratch buffer.
const READ_AHEAD: usize = 256 * 1024;
/// Reads into a caller's buffer at least this large go straight to the socket.
const DIRECT_READ: usize = 16 * 1024;

std::thread_local! {
    /// One scratch buffer per runtime thread, shared by every session on it: sessions hold read
    /// memory only while data is actually waiting for them.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_AHEAD].into_boxed_slice());
}

/// The client stream, read in large gulps.
///
/// tungstenite reads through a small buffer of its own (allocated for every session, so it stays
/// a few KiB). Without this adapter each of its reads would be a system call; with it, one call
/// takes up to [`READ_AHEAD`] bytes into a per-thread scratch buffer and what tungstenite did not
/// take yet waits in `ahead`, which is freed as soon as it is drained. Writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read but not yet handed on; empty (no allocation) when the session is idle.
    ahead: BytesMut,
}

impl<S> ReadAhead<S> {
    /// Wraps a client stream.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            ahead: BytesMut::new(),
        }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead.split_to(n));
            if this.ahead.is_empty() {
                this.ahead = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= DIRECT_READ {
            return std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            // Not re-entrant in practice (the inner stream never calls back into us); if it ever
            // were, reading directly is still correct.
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            let mut big = tokio::io::ReadBuf::new(&mut scratch[..]);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut big) {
                Poll::Ready(Ok(())) => {
                    let got = big.filled();
                    let n = got.len().min(buf.remaining());
                    buf.put_slice(&got[..n]);
                    if got.len() > n {
                        this.ahead = BytesMut::from(&got[n..]);
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
