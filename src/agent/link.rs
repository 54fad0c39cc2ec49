//! The link protocol both ends of agent mode share: the handshake headers, the secret's hash, and
//! the `open` / `ok` / `err` lines a data link starts with (read with a bound on their length;
//! what follows a line in the same read is kept for what comes next).
//!
//! A data link is one TCP (or TLS) connection the agent dialled to the server's agent endpoint
//! with `Upgrade: wsbridge-agent-link`; after `ok` it carries one session's bytes at a time (in
//! chunks, [`super::chunks`], or raw with an older peer), so the kernel's flow control gives each
//! session its own backpressure and the server's relay uses the link as the session's backend
//! stream ([`AgentLink`]): over plain TCP with the same lock-free halves and vectored writes as a
//! TCP backend ([`LinkStream`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::chunks::{Chunker, Dechunker};

/// The `Sec-WebSocket-Protocol` of the control link.
pub const CONTROL_PROTOCOL: &str = "wsbridge-agent.v1";
/// The `Upgrade` token of a data link (after the `101`: raw bytes, no WebSocket framing).
pub const LINK_TOKEN: &str = "wsbridge-agent-link";
/// The header of a data link that carries its connection's link key (see
/// [`ControlMessage::Hello`]'s `link_key`).
pub const LINK_KEY_HEADER: &str = "x-wsbridge-link-key";

/// Whether a link key is one an agent makes: 64 lower-case hex digits.
pub fn valid_link_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The header naming the agent on every link (the secret goes in `Authorization: Bearer`).
pub const NAME_HEADER: &str = "x-wsbridge-agent";
/// The header of the control link's `101` that names the server's instance (a random id per
/// process), so that an agent with several servers notices two URLs that reach the same one.
pub const INSTANCE_HEADER: &str = "x-wsbridge-instance";
/// The agent's answer to `open` on a link in chunks ([`super::chunks`]): the service is
/// connected and the session's bytes follow in chunks. (`ok` alone: raw bytes, one session.)
pub const OK_CHUNKS: &str = "ok chunks";
/// How an agent's `err` answer says it does not list a service (`err SERVICE: …NAME`), and one
/// at its `max_sessions` (`err SERVICE: …N sessions at a time`): the agent writes them, the server
/// reads them back into `agent_open_failures_total`'s reasons.
pub const NO_SUCH_SERVICE: &str = "no such service on agent ";
/// See [`NO_SUCH_SERVICE`].
pub const BUSY: &str = "busy, at most ";
/// The longest `open` / `ok` / `err` line.
pub const MAX_LINE: usize = 256;
/// The hello's version of an agent that replaces each link it is sent `open` on by itself: a
/// session costs no control message either way (the `want` of version 1 was a JSON message,
/// a write and a read on each side, per session).
pub const REPLACING: u32 = 2;
/// The hello's version of an agent that also understands `move`: told at the start of a drain,
/// it connects again (to another instance, through the balancer) before it lets this control
/// link go, so pages never find it offline in between.
pub const MOVING: u32 = 3;
/// The hello's version of an agent that also reads the server's session id in `open`
/// (`open SERVICE session=N`) and logs it with the session, so that its lines and the server's
/// (`session=N`) can be joined. Older agents are sent `open SERVICE` alone.
pub const SESSION_IDS: u32 = 4;

/// The text of a draining instance's 503 to a control link, which tells the agent that the
/// instance is going away (likely to restart).
pub const DRAINING: &str = "this instance is draining";

/// The largest control message: they are a few dozen bytes.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// The WebSocket settings of a control link, on both sides. Its messages are a few dozen bytes,
/// a few a minute: a 4 KiB read buffer (tungstenite's default, 128 KiB, was most of what a
/// connected agent cost the server), and each message written at once.
pub fn control_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_CONTROL_MESSAGE))
        .max_frame_size(Some(MAX_CONTROL_MESSAGE))
        .read_buffer_size(4096)
        .write_buffer_size(0)
        // Bounded: a peer that pings and never reads would otherwise have a pong stored for each
        // of its pings (tungstenite's default is no bound); past this the pong waiting is
        // replaced by the latest, as RFC 6455 allows. Room for a few whole control messages.
        .max_write_buffer_size(4 * MAX_CONTROL_MESSAGE)
}

/// A control link message (JSON text), either way.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ControlMessage {
    /// Agent → server, first: who it is and what it serves.
    Hello {
        /// The agent's name (the same as in its `X-Wsbridge-Agent` header).
        name: String,
        /// Its service names (the addresses stay on the agent).
        services: Vec<String>,
        /// Protocol version: 1, or [`REPLACING`] (2) for an agent that dials a new idle link
        /// for each link it is sent `open` on, so that the server asks with `want` only when
        /// its pool ran dry or a link was found dead.
        version: u32,
        /// A key the agent chose for this connection (64 hex digits from its random source),
        /// which its data links carry in [`LINK_KEY_HEADER`]: the server takes a link with the
        /// key of the agent's connection without a look at the failed-login brake, which
        /// someone behind the same address could otherwise keep spent with wrong secrets for
        /// the agent's name, starving its pool. Unknown to older servers (ignored there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        link_key: Option<String>,
    },
    /// Server → agent: dial this many more idle data links.
    Want {
        /// How many.
        links: usize,
    },
    /// Server → agent: reconnect (elsewhere) and open no new link here.
    Drain {
        /// Why, for the agent's log.
        reason: String,
    },
    /// Server → agent of version [`MOVING`], at the start of a drain: connect again (another
    /// instance takes the agent; this one answers control links 503 meanwhile), then close this
    /// control link; until then it serves as before, and its sessions go on after.
    Move {
        /// Why, for the agent's log.
        reason: String,
    },
}

/// A link's WebSocket error for a log line or a close reason: an I/O error as
/// [`crate::backend::describe`] says it (a TLS connection cut reads as such, not as rustls's
/// text with its manual's link), the rest as tungstenite says it.
pub fn describe_ws(e: &tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => crate::backend::describe(e),
        e => e.to_string(),
    }
}

/// Any stream a link runs over: TCP or TLS, on either side.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> LinkIo for T {}

/// A link's stream: plain TCP keeps its type, so that a session splits it into halves borrowed
/// without a lock and writes gathered pieces in one `writev`, as it does a TCP backend; anything
/// else (TLS) is boxed.
pub enum LinkStream {
    /// Plain TCP (`ws://`, or TLS ended in front of the server).
    Tcp(TcpStream),
    /// TLS, or any other stream.
    Other(Box<dyn LinkIo>),
}

impl std::fmt::Debug for LinkStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkStream::Tcp(_) => "LinkStream::Tcp",
            LinkStream::Other(_) => "LinkStream::Other",
        })
    }
}

/// A stream the agent endpoint can keep as a data link (see [`LinkStream`]).
pub trait IntoLink: LinkIo + 'static {
    /// The stream as a link.
    fn into_link(self) -> LinkStream;
}

impl IntoLink for TcpStream {
    fn into_link(self) -> LinkStream {
        LinkStream::Tcp(self)
    }
}

/// An agent behind a reverse proxy on the same machine (a unix listener): boxed, as TLS is.
#[cfg(unix)]
impl IntoLink for tokio::net::UnixStream {
    fn into_link(self) -> LinkStream {
        LinkStream::Other(Box::new(self))
    }
}

impl<T: LinkIo + 'static> IntoLink for Box<T> {
    fn into_link(self) -> LinkStream {
        LinkStream::Other(self)
    }
}

impl LinkStream {
    /// The two directions, borrowed separately (for TCP without a lock).
    pub fn split(&mut self) -> (LinkReader<'_>, LinkWriter<'_>) {
        match self {
            LinkStream::Tcp(s) => {
                let (r, w) = s.split();
                (LinkReader::Tcp(r), LinkWriter::Tcp(w))
            }
            LinkStream::Other(s) => {
                let (r, w) = tokio::io::split(s);
                (LinkReader::Other(r), LinkWriter::Other(w))
            }
        }
    }
}

/// Forwards the `AsyncWrite` methods, vectored writes included (the defaults would write only
/// the first piece), to the stream in each variant.
macro_rules! forward_write {
    ($t:ty, $($variant:ident),+) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $(Self::$variant(s) => s.is_write_vectored(),)+
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

/// Forwards `AsyncRead` to the stream in each variant.
macro_rules! forward_read {
    ($t:ty, $($variant:ident),+) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

forward_read!(LinkStream, Tcp, Other);
forward_write!(LinkStream, Tcp, Other);

/// The read half of a [`LinkStream`].
pub enum LinkReader<'a> {
    /// TCP.
    Tcp(tokio::net::tcp::ReadHalf<'a>),
    /// Any other stream.
    Other(tokio::io::ReadHalf<&'a mut Box<dyn LinkIo>>),
}

/// The write half of a [`LinkStream`].
pub enum LinkWriter<'a> {
    /// TCP.
    Tcp(tokio::net::tcp::WriteHalf<'a>),
    /// Any other stream.
    Other(tokio::io::WriteHalf<&'a mut Box<dyn LinkIo>>),
}

forward_read!(LinkReader<'_>, Tcp, Other);

impl std::fmt::Debug for LinkReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkReader")
    }
}

impl std::fmt::Debug for LinkWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkWriter")
    }
}
forward_write!(LinkWriter<'_>, Tcp, Other);

impl LinkWriter<'_> {
    /// Whether written bytes may wait in the stream until it is flushed (TLS records).
    pub fn buffers(&self) -> bool {
        matches!(self, LinkWriter::Other(_))
    }
}

/// The SHA-256 of a secret, as the server's configuration stores it (64 lower-case hex digits).
pub fn secret_sha256(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

/// The SHA-256 of `bytes` as 64 lower-case hex digits (as `sha256sum` prints it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A fresh secret: 32 bytes from the system's random source, as 64 hex digits.
///
/// # Errors
/// The system's random source failed.
pub fn new_secret() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| io::Error::other("the system's random source failed"))?;
    Ok(hex(&bytes))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses 64 hex digits into a SHA-256 digest.
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Whether `secret` hashes to `digest`, in time that does not depend on where they differ.
pub fn secret_matches(secret: &str, digest: &[u8; 32]) -> bool {
    let got = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    got.as_ref().iter().zip(digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A service name as both sides accept it: 1-64 of `[A-Za-z0-9._-]` (it travels in a line).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes in whole reads, starting with
/// the bytes already read in `carry`; what follows the line stays in `carry`. The server's side
/// of `open`: the agent's app may speak first, so its bytes can arrive with `ok` in one read (they
/// are the session's first); the agent's side between the sessions of a reused link: the next
/// `open` may arrive with the previous session's end mark. `Ok(None)` on EOF before any byte.
///
/// # Errors
/// The stream failed, ended mid-line, or the line is too long or not UTF-8.
pub async fn read_line_carried<S: AsyncRead + Unpin>(io: &mut S, carry: &mut Vec<u8>) -> io::Result<Option<String>> {
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = carry.iter().position(|b| *b == b'\n') {
            let rest = carry.split_off(end + 1);
            let mut line = std::mem::replace(carry, rest);
            line.truncate(end);
            let text = String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))?;
            return Ok(Some(text.trim_end_matches('\r').to_owned()));
        }
        if carry.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        match io.read(&mut chunk).await? {
            0 if carry.is_empty() => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => carry.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads an HTTP response head (to the blank line, at most 8 KiB, nothing past it) and returns
/// its status code and text.
///
/// # Errors
/// The stream failed or ended, or the head is malformed or too long.
pub async fn read_response_head<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(u16, String)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8192 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "response head too long"));
        }
        head.push(io.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed response status line"))?;
    Ok((status, text))
}

/// A reason an agent sent in `err …`, made safe to show: printable ASCII, at most 120 bytes.
pub fn clean_reason(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(120).collect()
}

/// The most bytes read and dropped after a session for its link's reuse: what was in flight
/// when the browser left. Past it a new link costs less than reading on.
pub const MAX_DRAIN: usize = 64 * 1024;

/// An agent connection's end, as its sessions' links see it (shared by the registry and every
/// link taken from that connection).
#[derive(Debug, Clone, Default)]
pub struct Loss(std::sync::Arc<LossState>);

/// What a [`Loss`] shares.
#[derive(Debug, Default)]
pub struct LossState {
    /// Cancelled when the connection is lost: a session ends once its link has nothing to
    /// carry (a link that still moves bytes is not lost, only the control link was).
    token: CancellationToken,
    /// Set (before `token` is cancelled) when the agent is no longer allowed (its declaration
    /// or secret changed): every session through it ends at once, busy, idle or stalled (see
    /// [`AgentLink::revoked`]).
    revoked: std::sync::atomic::AtomicBool,
    /// Cancelled when the agent is no longer allowed, even after it was lost (the relays of a
    /// lost connection's sessions wait on this one, `token` having fired already).
    revoked_token: CancellationToken,
}

impl Loss {
    /// Cancelled when the connection is lost or revoked.
    pub fn token(&self) -> &CancellationToken {
        &self.0.token
    }

    /// The connection is lost: its sessions end when their links have nothing to carry.
    pub fn lose(&self) {
        self.0.token.cancel();
    }

    /// The agent is no longer allowed: its sessions end at once.
    pub fn revoke(&self) {
        self.0.revoked.store(true, std::sync::atomic::Ordering::Relaxed);
        self.0.revoked_token.cancel();
        self.0.token.cancel();
    }

    /// Whether [`Loss::revoke`] was called.
    pub fn is_revoked(&self) -> bool {
        self.0.revoked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A handle that does not keep the sessions' state alive: it upgrades while a link of the
    /// connection is still in a session.
    pub fn downgrade(&self) -> std::sync::Weak<LossState> {
        std::sync::Arc::downgrade(&self.0)
    }

    /// The loss behind a [`Loss::downgrade`] handle, while some link still holds it.
    pub fn upgrade(weak: &std::sync::Weak<LossState>) -> Option<Loss> {
        weak.upgrade().map(Loss)
    }
}

/// A data link taken for a session, as the server's relay uses it ([`AgentLink::halves`]): the
/// link's bytes, ended with an error naming the agent once the agent is lost (its control link
/// missed its pong deadline), so the session closes with 1011 instead of waiting on a link whose
/// other end is gone. A link in chunks ([`super::chunks`]) goes back to its agent's pool once
/// both directions carried their end mark ([`AgentLink::release`]).
pub struct AgentLink {
    io: LinkStream,
    /// Raw link: the app's first bytes, read with the agent's `ok`, handed out first.
    early: Vec<u8>,
    /// A link in chunks: both directions' framing, and the pool it returns to.
    chunks: Option<Chunks>,
    /// The agent connection's loss or revocation.
    lost: Loss,
    /// The agent's name, for the error.
    name: String,
}

/// A reusable link's framing state, and where the link goes back to.
struct Chunks {
    read: Dechunker,
    write: Chunker,
    home: std::sync::Arc<super::registry::Pool>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("agent", &self.name)
            .field("chunks", &self.chunks.is_some())
            .finish_non_exhaustive()
    }
}

impl AgentLink {
    /// Wraps a raw link whose `open` was answered `ok` (`early`: bytes read after it); `lost` is
    /// the agent connection's token.
    pub fn new(io: LinkStream, early: Vec<u8>, lost: Loss, name: String) -> AgentLink {
        AgentLink {
            io,
            early,
            chunks: None,
            lost,
            name,
        }
    }

    /// Wraps a link in chunks whose `open` was answered `ok`; it goes back to `home` when the
    /// session leaves it clean. `resets`: the two ends agreed on the reset mark.
    pub fn chunked(
        io: LinkStream,
        early: Vec<u8>,
        lost: Loss,
        name: String,
        home: std::sync::Arc<super::registry::Pool>,
        resets: bool,
    ) -> AgentLink {
        AgentLink {
            io,
            early: Vec::new(),
            chunks: Some(Chunks {
                read: match resets {
                    true => Dechunker::with_resets(early),
                    false => Dechunker::new(early),
                },
                write: Chunker::new(),
                home,
            }),
            lost,
            name,
        }
    }

    /// The two directions, for the relay (each watches for the agent's loss on its own).
    pub fn halves(&mut self) -> (AgentReader<'_>, AgentWriter<'_>) {
        let (r, w) = self.io.split();
        let (read, write) = match &mut self.chunks {
            Some(c) => (Some(&mut c.read), Some(&mut c.write)),
            None => (None, None),
        };
        let reader = AgentReader {
            io: r,
            early: &mut self.early,
            chunks: read,
            lost: Lost::new(&self.lost, &self.name),
        };
        let writer = AgentWriter {
            io: w,
            chunks: write,
            lost: Lost::new(&self.lost, &self.name),
        };
        (reader, writer)
    }

    /// Ready with the session's error once the agent is no longer allowed (never when it is only
    /// lost): the relay ends the session then, even one that is not reading or writing the link
    /// (its page reads nothing, so the relay waits on the page), which the links' own check would not.
    pub fn revoked(&self) -> impl std::future::Future<Output = io::Error> + Send + 'static {
        let (loss, name) = (self.lost.clone(), self.name.clone());
        async move {
            // Lost and not revoked: its sessions end when their links have nothing to carry.
            loss.0.revoked_token.cancelled().await;
            revoked_error(&name)
        }
    }

    /// After the session: a link in chunks whose end mark the relay wrote is read on (what the
    /// app still sends is dropped: the browser is gone) until the agent's end mark, within
    /// `within` and [`MAX_DRAIN`] bytes, and then goes back to its agent's pool; any other link
    /// is closed (an app that goes on sending is then cut off by the agent, as on a raw link).
    pub fn release(self, within: std::time::Duration) {
        let AgentLink { mut io, chunks, lost, .. } = self;
        let Some(Chunks { mut read, write, home }) = chunks else { return };
        let framing = super::chunks::Framing {
            chunks: true,
            resets: read.resets(),
        };
        if !write.ended() || lost.token().is_cancelled() {
            return;
        }
        if read.clean() {
            // The agent's end mark came first (its app ended the session): the agent may still
            // be writing the browser's last bytes to its app, so the link is taken last.
            if read.into_pending().is_empty() {
                home.give_back(io, framing, true);
            }
            return;
        }
        tokio::spawn(async move {
            let drained = tokio::time::timeout(within, async {
                let mut sink = [0u8; 4096];
                let mut dropped = 0;
                loop {
                    let mut buf = ReadBuf::new(&mut sink);
                    std::future::poll_fn(|cx| read.poll_read(Pin::new(&mut io), cx, &mut buf)).await?;
                    if buf.filled().is_empty() {
                        return Ok::<_, io::Error>(());
                    }
                    dropped += buf.filled().len();
                    if dropped > MAX_DRAIN {
                        return Err(io::Error::other("the app goes on sending"));
                    }
                }
            })
            .await;
            // Nothing may follow the agent's end mark before the next `open` is sent.
            // The agent ended its side after ours: it is done with the session.
            if matches!(drained, Ok(Ok(()))) && read.clean() && read.into_pending().is_empty() && !lost.token().is_cancelled() {
                home.give_back(io, framing, false);
            }
        });
    }
}

/// The agent's loss, as one half of a session's link sees it. It is looked at only when the
/// link has nothing to give or take (`Pending`): a link that moves is not lost, and the check
/// (registering with the token) stays off the data path. A revocation is looked at on every
/// read and write (one relaxed load): it ends busy sessions too.
struct Lost<'a> {
    loss: &'a Loss,
    /// Made at the first wait: the token's future, registered with the task's waker.
    wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    name: &'a str,
}

impl std::fmt::Debug for Lost<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lost").field("agent", &self.name).finish_non_exhaustive()
    }
}

impl<'a> Lost<'a> {
    fn new(loss: &'a Loss, name: &'a str) -> Lost<'a> {
        Lost { loss, wait: None, name }
    }

    /// What the link gave, unless the agent is lost (when it gave nothing) or revoked: then the
    /// error that ends the session.
    fn check<T>(&mut self, polled: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.loss.is_revoked() {
            return Poll::Ready(Err(self.error()));
        }
        match polled {
            Poll::Pending => {
                let wait = self
                    .wait
                    .get_or_insert_with(|| Box::pin(self.loss.token().clone().cancelled_owned()));
                match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(self.error())),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => ready,
        }
    }

    /// `Other`: the relay's close reason shows the message ("backend read failed: agent
    /// shop-17 lost"), where a kind of its own would show only the kind.
    fn error(&self) -> io::Error {
        match self.loss.is_revoked() {
            true => revoked_error(self.name),
            false => io::Error::other(format!("agent {} lost", self.name)),
        }
    }
}

/// A revoked agent's sessions' error (the relay's close reason shows it).
fn revoked_error(name: &str) -> io::Error {
    io::Error::other(format!("agent {name} is no longer allowed"))
}

/// The read half of an [`AgentLink`].
#[derive(Debug)]
pub struct AgentReader<'a> {
    io: LinkReader<'a>,
    early: &'a mut Vec<u8>,
    chunks: Option<&'a mut Dechunker>,
    lost: Lost<'a>,
}

/// The write half of an [`AgentLink`].
#[derive(Debug)]
pub struct AgentWriter<'a> {
    io: LinkWriter<'a>,
    chunks: Option<&'a mut Chunker>,
    lost: Lost<'a>,
}

impl AgentWriter<'_> {
    /// Whether written bytes may wait in the stream until it is flushed (TLS records).
    pub fn buffers(&self) -> bool {
        self.io.buffers()
    }
}

use std::future::Future as _;

impl AsyncRead for AgentReader<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.chunks {
            // A link in chunks that ends without the end mark: the agent gave the session up
            // (it stopped, or its app reset the connection and one side predates the reset
            // mark), which the page reads in the 1011's reason.
            Some(chunks) => match chunks.poll_read(Pin::new(&mut this.io), cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Err(io::Error::other(format!(
                    "agent {} dropped the session's link",
                    this.lost.name
                )))),
                polled => polled,
            },
            None => {
                if !this.early.is_empty() {
                    let n = this.early.len().min(buf.remaining());
                    buf.put_slice(&this.early[..n]);
                    this.early.drain(..n);
                    return Poll::Ready(Ok(()));
                }
                Pin::new(&mut this.io).poll_read(cx, buf)
            }
        };
        this.lost.check(polled, cx)
    }
}

impl AsyncWrite for AgentWriter<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.chunks {
            Some(chunks) => chunks.poll_write(Pin::new(&mut this.io), cx, bufs),
            None => Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
        };
        this.lost.check(polled, cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.chunks.is_some() || self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.lost.check(polled, cx)
    }
    /// A link in chunks gets the end mark (and stays open for the next session); a raw one its FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.chunks {
            Some(chunks) => {
                let polled = chunks.poll_end(Pin::new(&mut this.io), cx);
                this.lost.check(polled, cx)
            }
            None => Pin::new(&mut this.io).poll_shutdown(cx),
        }
    }
}

/// One direction of a link in chunks, as the agent's copy loop reads it: [`Dechunker`] over a
/// stream, EOF at the end mark.
#[derive(Debug)]
pub struct ChunkReader<'a, R> {
    /// The link's read half.
    pub io: R,
    /// Its framing state.
    pub chunks: &'a mut Dechunker,
}

impl<R: AsyncRead + Unpin> AsyncRead for ChunkReader<'_, R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.chunks.poll_read(Pin::new(&mut this.io), cx, buf)
    }
}

/// One direction of a link in chunks, as the agent's copy loop writes it: [`Chunker`] over a
/// stream, the end mark at shutdown.
#[derive(Debug)]
pub struct ChunkWriter<'a, W> {
    /// The link's write half.
    pub io: W,
    /// Its framing state.
    pub chunks: &'a mut Chunker,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ChunkWriter<'_, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.chunks.poll_write(Pin::new(&mut this.io), cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.chunks.poll_end(Pin::new(&mut this.io), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn secrets_hash_and_compare() {
        let secret = new_secret().unwrap();
        assert_eq!(secret.len(), 64);
        let digest = parse_sha256(&secret_sha256(&secret)).unwrap();
        assert!(secret_matches(&secret, &digest));
        assert!(!secret_matches("other", &digest));
        assert!(parse_sha256("xyz").is_none());
        assert_eq!(
            secret_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn a_line_leaves_the_bytes_after_it_for_what_comes_next() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"ok\nAPP BYTES").await.unwrap();
        drop(a);
        let mut carry = Vec::new();
        assert_eq!(read_line_carried(&mut b, &mut carry).await.unwrap().as_deref(), Some("ok"));
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        carry.extend_from_slice(&rest);
        assert_eq!(carry, b"APP BYTES");
        // Two lines in one read: the second is read from what the first left.
        let mut carry = b"open pos\r\nopen x\n".to_vec();
        let (_a, mut b) = tokio::io::duplex(1024);
        assert_eq!(read_line_carried(&mut b, &mut carry).await.unwrap().as_deref(), Some("open pos"));
        assert_eq!(read_line_carried(&mut b, &mut carry).await.unwrap().as_deref(), Some("open x"));
        assert!(carry.is_empty());
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[b'x'; MAX_LINE + 1]).await.unwrap();
        assert!(read_line_carried(&mut b, &mut Vec::new()).await.is_err());
        drop(a);
    }

    #[tokio::test]
    async fn the_apps_first_bytes_read_with_ok_are_handed_out_first() {
        let (mut agent, server) = tokio::io::duplex(4096);
        agent.write_all(b"ok\nWELCOME").await.unwrap();
        let mut server = Box::new(server).into_link();
        let mut rest = Vec::new();
        let line = read_line_carried(&mut server, &mut rest).await.unwrap().unwrap();
        assert_eq!(line, "ok");
        let mut link = AgentLink::new(server, rest, Loss::default(), "a".into());
        agent.write_all(b" AND MORE").await.unwrap();
        drop(agent);
        let mut all = Vec::new();
        link.halves().0.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"WELCOME AND MORE");
    }

    /// A connection lost first and revoked afterwards (its sessions still ran on their links):
    /// the revocation still reaches them.
    #[tokio::test]
    async fn a_revocation_after_a_loss_still_ends_the_sessions() {
        let loss = Loss::default();
        let (a, _b) = tokio::io::duplex(64);
        let link = AgentLink::new(LinkStream::Other(Box::new(a)), Vec::new(), loss.clone(), "shop-17".into());
        let mut revoked = Box::pin(link.revoked());
        loss.lose();
        let looked = futures_util::FutureExt::now_or_never(revoked.as_mut());
        assert!(looked.is_none(), "lost, not revoked: the sessions go on");
        loss.revoke();
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), revoked).await.unwrap();
        assert_eq!(e.to_string(), "agent shop-17 is no longer allowed");
    }

    /// A lost agent's link ends only when it has nothing to give; a revoked one's at once,
    /// bytes waiting or not, both ways.
    #[tokio::test]
    async fn a_revoked_agents_link_fails_at_once_and_a_lost_ones_when_idle() {
        let (mut agent, server) = tokio::io::duplex(4096);
        let loss = Loss::default();
        let mut link = AgentLink::new(Box::new(server).into_link(), Vec::new(), loss.clone(), "shop-17".into());
        agent.write_all(b"waiting").await.unwrap();
        loss.lose();
        let mut buf = [0u8; 64];
        let (mut read, _) = link.halves();
        assert_eq!(read.read(&mut buf).await.unwrap(), 7, "lost, but the bytes there are read");
        let e = read.read(&mut buf).await.unwrap_err();
        assert_eq!(e.to_string(), "agent shop-17 lost");
        agent.write_all(b"waiting").await.unwrap();
        loss.revoke();
        let (mut read, mut write) = link.halves();
        assert_eq!(
            read.read(&mut buf).await.unwrap_err().to_string(),
            "agent shop-17 is no longer allowed"
        );
        assert_eq!(
            write.write(b"x").await.unwrap_err().to_string(),
            "agent shop-17 is no longer allowed"
        );
    }
}
