//! The backend side of a session: connecting to a [`Target`] under the connect deadline, and the
//! few operations the relay needs on the stream.
//!
//! The relay borrows the stream's two directions separately ([`Backend::halves`]) and drives
//! them with `poll_read` / `poll_write` from its own state machine.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::config::Target;
use crate::platform::UnixStream;
use crate::tls::BackendTls;
use rustls_pki_types::ServerName;

/// A TLS connection to a backend (boxed: a TLS session's state is large).
type TlsBackend = Box<tokio_rustls::client::TlsStream<TcpStream>>;

/// A connected backend stream.
#[derive(Debug)]
pub enum Backend {
    /// TCP.
    Tcp(TcpStream),
    /// A unix stream socket.
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(TlsBackend),
    /// An agent's data link whose `open` was answered `ok` (agent mode).
    Agent(Box<crate::agent::link::AgentLink>),
}

/// Why a backend could not be reached. The `Display` text is what the client reads in the close
/// frame (code 1014), so it stays short and says nothing about the target's address.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The host name did not resolve.
    #[error("backend unreachable: cannot resolve host")]
    Resolve(#[source] io::Error),
    /// Every address refused or failed.
    #[error("backend unreachable: {}", describe(.0))]
    Connect(#[source] io::Error),
    /// The connect deadline passed.
    #[error("backend unreachable: connect timed out after {0:?}")]
    Timeout(Duration),
    /// The connect deadline passed while the host name was being looked up (a name server that
    /// does not answer: not the backend's host, which was never reached).
    #[error("backend unreachable: the name lookup timed out after {0:?}")]
    ResolveTimeout(Duration),
    /// The TLS handshake with the backend failed (its certificate did not verify, for one). The
    /// client reads only a short summary; the details (names in the certificate) go to the log.
    #[error("backend TLS failed: {}", tls_summary(.0))]
    Tls(#[source] io::Error),
    /// Agent mode: the agent is offline, has no such service, is busy, or its app refused; the
    /// text is what the page reads.
    #[error("{1}")]
    Agent(AgentRefusal, String),
}

/// Why a session could not be opened through an agent (`agent_open_failures_total{reason}`):
/// the agent's trouble, its app's, or the way between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRefusal {
    /// Not connected here.
    Offline,
    /// The agent does not list the service (as the server knows from its login, or as it
    /// answered).
    NoService,
    /// The service is at the agent's `max_sessions`.
    Busy,
    /// The agent could not connect its app (refused, unreachable, timed out), or answered
    /// something else.
    App,
    /// No data link (or none alive) came from the agent within the connect deadline.
    NoLink,
    /// The agent took the link but did not answer within the connect deadline.
    Timeout,
}

impl AgentRefusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentRefusal::Offline => "offline",
            AgentRefusal::NoService => "no_service",
            AgentRefusal::Busy => "busy",
            AgentRefusal::App => "app",
            AgentRefusal::NoLink => "no_link",
            AgentRefusal::Timeout => "timeout",
        }
    }

    /// What an agent's `err` answer (the text after `err `) says: agents word them as
    /// `SERVICE: no such service on agent NAME`, `SERVICE: busy, at most N sessions at a time`,
    /// and `SERVICE: WHY` for an app they could not connect.
    pub fn of_answer(text: &str) -> AgentRefusal {
        let why = text.split_once(": ").map_or("", |(_, why)| why);
        if why.starts_with(crate::agent::link::NO_SUCH_SERVICE) {
            AgentRefusal::NoService
        } else if why.starts_with(crate::agent::link::BUSY) {
            AgentRefusal::Busy
        } else {
            AgentRefusal::App
        }
    }
}

impl ConnectError {
    /// Why, in one word, for the metrics (`backend_connect_failures_total{reason}`; an agent's
    /// own reason is [`ConnectError::agent_refusal`]'s): `refused`,
    /// `unreachable` (another network error), `unresolved`, `timeout`, `tls`, or `agent` (agent
    /// mode: offline, a service it does not list, or its app refused).
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Resolve(_) | ConnectError::ResolveTimeout(_) => "unresolved",
            ConnectError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
            ConnectError::Connect(_) => "unreachable",
            ConnectError::Timeout(_) => "timeout",
            ConnectError::Tls(_) => "tls",
            ConnectError::Agent(..) => "agent",
        }
    }

    /// Agent mode: why the agent refused, or could not be asked.
    pub fn agent_refusal(&self) -> Option<AgentRefusal> {
        match self {
            ConnectError::Agent(why, _) => Some(*why),
            _ => None,
        }
    }
}

impl Backend {
    /// After the session: an agent's link in chunks goes back to its agent's pool once the agent
    /// has ended its side too (waiting at most `within`, off the session's task); anything else
    /// is closed.
    pub fn release(self, within: Duration) {
        if let Backend::Agent(link) = self {
            (*link).release(within);
        }
    }

    /// Where the kernel's acknowledgements can be asked ([`crate::platform::Acks`]): TCP
    /// backends, plain or TLS. A unix socket has no network to lose; an agent's link is watched by
    /// its control link's pings.
    pub fn acks(&self) -> crate::platform::Acks {
        match self {
            Backend::Tcp(s) => crate::platform::Acks::of(s),
            Backend::Tls(s) => crate::platform::Acks::of(s.get_ref().0),
            Backend::Unix(_) | Backend::Agent(_) => crate::platform::Acks::NONE,
        }
    }

    /// The address a TCP backend (plain or TLS) was reached at: which of a name's addresses
    /// answered. Unix sockets and agents' links: none (their target says it all).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Backend::Tcp(s) => s.peer_addr().ok(),
            Backend::Tls(s) => s.get_ref().0.peer_addr().ok(),
            Backend::Unix(_) | Backend::Agent(_) => None,
        }
    }

    /// An agent's link: ready with the session's error once the agent is no longer allowed, busy
    /// or stalled (see [`crate::agent::link::AgentLink::revoked`]). Other backends: none.
    pub fn revoked(&self) -> Option<Pin<Box<dyn Future<Output = io::Error> + Send>>> {
        match self {
            Backend::Agent(link) => Some(Box::pin(link.revoked())),
            _ => None,
        }
    }

    /// Connects to `target`, trying every resolved address in order, then the TLS handshake when
    /// `tls` is given, all within `deadline`.
    ///
    /// # Errors
    /// [`ConnectError`] with the last failure.
    pub async fn connect(
        target: &Target,
        deadline: Duration,
        tls: Option<&BackendTls>,
        proxy_header: Option<&[u8]>,
    ) -> Result<Backend, ConnectError> {
        let end = Instant::now() + deadline;
        // Whether the deadline finds the name looked up: a timeout before is the name server's.
        let resolved = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            match target {
                // A TLS route whose token source names a unix socket: refuse rather than send
                // in plaintext what the route says must be encrypted.
                Target::Unix(_) if tls.is_some() => Err(ConnectError::Tls(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "TLS is for TCP targets, not unix sockets",
                ))),
                Target::Agent { agent, .. } => Err(ConnectError::Agent(
                    AgentRefusal::Offline,
                    format!("agent {agent}: not reachable from here"),
                )),
                Target::Unix(path) => UnixStream::connect(path).await.map(Backend::Unix).map_err(ConnectError::Connect),
                Target::Tcp { host, port } => {
                    let addrs = crate::dns::resolve(host, *port).await.map_err(ConnectError::Resolve)?;
                    resolved.store(true, std::sync::atomic::Ordering::Relaxed);
                    let mut s = connect_any(&addrs, end).await?;
                    // Small messages (keystrokes, VNC input) must not wait for Nagle.
                    s.set_nodelay(true).map_err(ConnectError::Connect)?;
                    keepalive_unless_loopback(&s, &addrs).map_err(ConnectError::Connect)?;
                    if let Some(header) = proxy_header {
                        // Before anything else, TLS included: the backend reads who the client is
                        // from the connection's first bytes (PROXY protocol).
                        tokio::io::AsyncWriteExt::write_all(&mut s, header)
                            .await
                            .map_err(ConnectError::Connect)?;
                    }
                    match tls {
                        None => Ok(Backend::Tcp(s)),
                        Some(tls) => wrap_tls(s, host, tls).await,
                    }
                }
            }
        };
        match timeout(deadline, attempt).await {
            Ok(outcome) => outcome,
            Err(_) if matches!(target, Target::Tcp { .. }) && !resolved.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(ConnectError::ResolveTimeout(deadline))
            }
            Err(_) => Err(ConnectError::Timeout(deadline)),
        }
    }
}

/// Quiet time before the first keepalive probe, on client and backend sockets.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 3;

/// TCP keepalive for both sockets of a session: a peer that is gone while nothing is in flight
/// (powered off, cut off by a firewall, no FIN or reset ever comes) is found within
/// `KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL` = 60 s, and the probes every 30 s keep
/// NAT and firewall mappings of quiet sessions alive (cloud NATs and load balancers drop idle
/// flows after 350 s, 4 min or less). On a client answering the default pings (every 20 s) the
/// connection is never quiet for 30 s, so no probe goes out: they cost nothing there and
/// never end a session before the pong deadline would.
pub fn tcp_keepalive() -> socket2::TcpKeepalive {
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    // Windows: no probe count (TCP_KEEPCNT needs Windows 10 1703 and Wine 8 lacks it: setting it
    // failed every backend connect there); Windows sends its fixed 10 probes.
    #[cfg(windows)]
    let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL);
    keepalive
}

/// The bridge sends a backend nothing of its own: without keepalive a backend host that powers
/// off during a quiet spell would hold the session for ever. Not when every address of the
/// backend is loopback, where there is no network to lose a FIN or a reset in: the kernel ends
/// the connection as soon as the backend's process goes, and a hung one answers probes all the
/// same (four system calls per session saved, for `wsbridge 6080 localhost:5900` and an agent's
/// local app alike).
///
/// No `TCP_USER_TIMEOUT` (tried, and taken back): since Linux 5.11 it also ends a connection
/// whose peer keeps its window shut that long, answering every probe, which cut a live backend
/// that paused its reading (a printer out of paper) after a minute. A host that goes dark while
/// data is in flight (which keepalive does not probe) is found by the relay instead, from the
/// last acknowledgement's age ([`crate::platform::Acks`], `timeouts.backend_ack_timeout`).
fn keepalive_unless_loopback(s: &TcpStream, addrs: &[SocketAddr]) -> io::Result<()> {
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    socket2::SockRef::from(s).set_tcp_keepalive(&tcp_keepalive())
}

/// Connects to the first of `addrs` that accepts, in order, by `end` (the connect deadline,
/// which name resolution has already used part of). Each address but the last gets an equal
/// share of the time left, so one that never answers (a blackholed IPv6 route, say) cannot starve
/// the others; the last one runs until the caller's own deadline on the whole connect ends it (no
/// timer of its own: one fewer timer per session on the common one-address path).
async fn connect_any(addrs: &[SocketAddr], end: Instant) -> Result<TcpStream, ConnectError> {
    connect_in_turn(addrs, end).await.map_err(ConnectError::Connect)
}

/// A link-local IPv6 address without its interface cannot be connected ("Invalid argument", which
/// says nothing to a user; a review): said so.
fn link_local_said(addr: &SocketAddr, e: io::Error) -> io::Error {
    match addr {
        SocketAddr::V6(a) if a.scope_id() == 0 && (a.ip().segments()[0] & 0xffc0) == 0xfe80 && e.kind() == io::ErrorKind::InvalidInput => {
            io::Error::new(
                e.kind(),
                format!("{} is link-local: name its interface, as [{}%eth0]", a.ip(), a.ip()),
            )
        }
        _ => e,
    }
}

/// [`connect_any`] for the crate's other clients (an agent dialling its server or proxy, the
/// token API): a name whose first address never answers (a black-holed IPv6 route beside a
/// working IPv4 one, on the networks agents live on) does not spend the whole deadline, `end`,
/// on it. The caller's own deadline ends the last attempt.
///
/// # Errors
/// The last address's error (the last failure of any kind when the last one was not reached).
pub(crate) async fn connect_in_turn(addrs: &[SocketAddr], end: Instant) -> io::Result<TcpStream> {
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        if i + 1 == addrs.len() {
            return TcpStream::connect(addr).await.map_err(|e| link_local_said(addr, e));
        }
        let share = end.saturating_duration_since(Instant::now()) / (addrs.len() - i) as u32;
        let failed = match timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => link_local_said(addr, e),
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        };
        tracing::debug!(address = %addr, error = %failed, "connect: this address failed; trying the next");
        last = Some(failed);
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "host resolved to no address")))
}

async fn wrap_tls(tcp: TcpStream, host: &str, tls: &BackendTls) -> Result<Backend, ConnectError> {
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => ServerName::try_from(host.to_owned()).map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
    };
    let stream = tls.connector.connect(name, tcp).await.map_err(ConnectError::Tls)?;
    Ok(Backend::Tls(Box::new(stream)))
}

/// The read side of a backend, for the backend → client direction.
#[derive(Debug)]
pub enum BackendReader<'a> {
    /// TCP.
    Tcp(tokio::net::tcp::ReadHalf<'a>),
    /// Unix socket.
    Unix(crate::platform::UnixReadHalf<'a>),
    /// TLS (both halves are polled by the one session task, so the split's lock is uncontended).
    Tls(tokio::io::ReadHalf<&'a mut tokio_rustls::client::TlsStream<TcpStream>>),
    /// An agent's data link.
    Agent(crate::agent::link::AgentReader<'a>),
}

/// The write side of a backend, for the client → backend direction.
#[derive(Debug)]
pub enum BackendWriter<'a> {
    /// TCP.
    Tcp(tokio::net::tcp::WriteHalf<'a>),
    /// Unix socket.
    Unix(crate::platform::UnixWriteHalf<'a>),
    /// TLS.
    Tls(tokio::io::WriteHalf<&'a mut tokio_rustls::client::TlsStream<TcpStream>>),
    /// An agent's data link.
    Agent(crate::agent::link::AgentWriter<'a>),
}

impl Backend {
    /// Borrows the two directions separately (no lock: each half is used by one direction).
    pub fn halves(&mut self) -> (BackendReader<'_>, BackendWriter<'_>) {
        match self {
            Backend::Tcp(s) => {
                let (r, w) = s.split();
                (BackendReader::Tcp(r), BackendWriter::Tcp(w))
            }
            Backend::Unix(s) => {
                let (r, w) = s.split();
                (BackendReader::Unix(r), BackendWriter::Unix(w))
            }
            Backend::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (BackendReader::Tls(r), BackendWriter::Tls(w))
            }
            Backend::Agent(s) => {
                let (r, w) = s.halves();
                (BackendReader::Agent(r), BackendWriter::Agent(w))
            }
        }
    }
}

/// Reads go through tokio's `poll_read`, which knows that a read shorter than the buffer drained
/// the socket: no extra `EAGAIN` read per message.
impl tokio::io::AsyncRead for BackendReader<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            BackendReader::Tcp(r) => std::pin::Pin::new(r).poll_read(cx, buf),
            BackendReader::Unix(r) => std::pin::Pin::new(r).poll_read(cx, buf),
            // A backend that closes without TLS close_notify (common, and every byte it sent was
            // delivered) ends like a TCP backend's EOF; a reset or a broken record stays an error.
            BackendReader::Tls(r) => match std::pin::Pin::new(r).poll_read(cx, buf) {
                std::task::Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => std::task::Poll::Ready(Ok(())),
                other => other,
            },
            BackendReader::Agent(r) => std::pin::Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl BackendWriter<'_> {
    /// Whether written bytes may wait in the stream until it is flushed (TLS records when the
    /// socket was full); TCP and unix sockets hand everything to the kernel at once, an agent's
    /// data link as the stream under it does.
    pub fn buffers(&self) -> bool {
        match self {
            BackendWriter::Tls(_) => true,
            BackendWriter::Agent(w) => w.buffers(),
            BackendWriter::Tcp(_) | BackendWriter::Unix(_) => false,
        }
    }
}

impl tokio::io::AsyncWrite for BackendWriter<'_> {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendWriter::Tcp(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            BackendWriter::Unix(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            BackendWriter::Tls(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            BackendWriter::Agent(w) => std::pin::Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendWriter::Tcp(w) => std::pin::Pin::new(w).poll_write_vectored(cx, bufs),
            BackendWriter::Unix(w) => std::pin::Pin::new(w).poll_write_vectored(cx, bufs),
            BackendWriter::Tls(w) => std::pin::Pin::new(w).poll_write_vectored(cx, bufs),
            BackendWriter::Agent(w) => std::pin::Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            BackendWriter::Tcp(w) => std::pin::Pin::new(w).poll_flush(cx),
            BackendWriter::Unix(w) => std::pin::Pin::new(w).poll_flush(cx),
            BackendWriter::Tls(w) => std::pin::Pin::new(w).poll_flush(cx),
            BackendWriter::Agent(w) => std::pin::Pin::new(w).poll_flush(cx),
        }
    }
    /// Sends EOF (FIN) to the backend; it may still send to us.
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            BackendWriter::Tcp(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            BackendWriter::Unix(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            BackendWriter::Tls(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            BackendWriter::Agent(w) => std::pin::Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// A short, name-free summary of a backend TLS failure for the close reason.
fn tls_summary(e: &io::Error) -> &'static str {
    // tokio-rustls carries rustls' own error inside the io::Error.
    let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => "certificate not accepted",
        _ if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => "connection closed during the handshake",
        _ => "handshake failed",
    }
}

/// A short lower-case description of an I/O error for close reasons and logs
/// ("connection refused" rather than "Connection refused (os error 111)").
pub fn describe(e: &io::Error) -> String {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "connection reset".into(),
        K::ConnectionAborted => "connection aborted".into(),
        K::BrokenPipe => "broken pipe".into(),
        K::TimedOut => "timed out".into(),
        K::NotFound => "no such socket".into(),
        K::PermissionDenied => "permission denied".into(),
        K::HostUnreachable => "host unreachable".into(),
        K::NetworkUnreachable => "network unreachable".into(),
        K::AddrNotAvailable => "address not available".into(),
        // rustls's text for it ends in a link to its manual, which a log reader cannot act on:
        // the TCP connection ended with the TLS session still open (a network cut, a proxy or
        // a peer that stopped).
        K::UnexpectedEof if e.to_string().contains("close_notify") => "connection cut (TLS ended without close_notify)".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link-local target without its interface is said so, not "Invalid argument" (a review).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_link_local_target_without_its_interface_is_said_so() {
        let addr: SocketAddr = "[fe80::1]:5900".parse().unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        // Linux refuses a link-local destination without a scope (EINVAL), whatever the interfaces.
        let e = connect_in_turn(&[addr], end).await.unwrap_err();
        assert_eq!(describe(&e), "fe80::1 is link-local: name its interface, as [fe80::1%eth0]");
    }

    /// An agent's `err` answers, as agents word them, are told apart; anything else is the app's.
    #[test]
    fn an_agents_answer_says_why_it_refused() {
        for (answer, why) in [
            ("pos: no such service on agent shop-17", AgentRefusal::NoService),
            ("till: busy, at most 1 session at a time", AgentRefusal::Busy),
            ("pos: connection refused", AgentRefusal::App),
            ("pos: timed out", AgentRefusal::App),
            ("a reason without a service", AgentRefusal::App),
            ("busy: connection refused", AgentRefusal::App),
        ] {
            assert_eq!(AgentRefusal::of_answer(answer), why, "{answer}");
        }
    }

    /// A backend connection has keepalive with our settings (Issue 11: a backend host that
    /// vanishes during a quiet spell must not hold the session for ever), unless the backend is
    /// on loopback. (Tests connect only to loopback: the settings are checked by giving the
    /// decision a remote address for a loopback socket.)
    #[tokio::test]
    async fn backend_connections_have_keepalive_except_on_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Target::Tcp {
            host: "127.0.0.1".into(),
            port: addr.port(),
        };
        let Backend::Tcp(s) = Backend::connect(&target, Duration::from_secs(5), None, None).await.unwrap() else {
            panic!("a TCP target gives a TCP backend");
        };
        assert!(
            !socket2::SockRef::from(&s).keepalive().unwrap(),
            "no keepalive to a loopback backend"
        );
        keepalive_unless_loopback(&s, &["192.0.2.1:5900".parse().unwrap(), addr]).unwrap();
        let s = socket2::SockRef::from(&s);
        assert!(s.keepalive().unwrap());
        #[cfg(unix)]
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        #[cfg(target_os = "linux")]
        assert_eq!(
            (s.tcp_keepalive_interval().unwrap(), s.tcp_keepalive_retries().unwrap()),
            (KEEPALIVE_INTERVAL, KEEPALIVE_PROBES)
        );
    }

    /// A listener whose accept queue is full: a further connect hangs (its SYN is dropped).
    async fn blackhole() -> (tokio::net::TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        while let Ok(Ok(s)) = timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            fillers.push(s);
            assert!(fillers.len() < 64, "accept queue never filled");
        }
        (listener, fillers)
    }

    #[tokio::test]
    async fn an_address_that_never_answers_leaves_time_for_the_next() {
        let (hole, _fillers) = blackhole().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = [hole.local_addr().unwrap(), good.local_addr().unwrap()];
        // Half of the time left goes to the blackhole, the rest to the listener that answers.
        let in_600ms = || Instant::now() + Duration::from_millis(600);
        let start = Instant::now();
        let s = connect_any(&addrs, in_600ms()).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), addrs[1]);
        // Its share is the blackhole's wait: not less (a share cut short), and well before the
        // deadline (the second address answers at once).
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(600),
            "{waited:?} outside the blackhole's share of 300 ms .. the 600 ms deadline"
        );
        // The last address (here the only one) waits for the caller's deadline.
        assert!(timeout(Duration::from_millis(600), connect_any(&addrs[..1], in_600ms()))
            .await
            .is_err());
        // Time already spent (resolving the name, say) is not given out again: with 400 ms left,
        // the blackhole's share is 200 ms and the second address is still reached, before the
        // deadline (200 ms of margin: the machines are shared and noisy).
        let start = Instant::now();
        let s = connect_any(&addrs, start + Duration::from_millis(400)).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), addrs[1]);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(400),
            "{waited:?} outside the blackhole's share of 200 ms .. the 400 ms deadline"
        );
    }
}
