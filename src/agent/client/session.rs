//! The agent's data links and the sessions they carry: dial a link, wait for the server's
//! `open`, connect the service (only one in the agent's own list, under its `max_sessions`),
//! relay both ways until both ends are done, and keep a link in chunks for the next session.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use super::{dial, AgentConfig};
use crate::agent::chunks::{self, Chunker, Dechunker, Framing};
use crate::agent::link::{self, ChunkReader, ChunkWriter, LinkStream};
use crate::backend::{Backend, ConnectError};
use crate::tls::BackendTls;

/// The sessions open on each service with a `max_sessions`, over all of the agent's
/// connections: the cap protects the app, whichever server a session comes through.
pub(super) struct Caps(std::collections::HashMap<String, (usize, Arc<std::sync::atomic::AtomicUsize>)>);

/// One session's place under its service's cap, given back when dropped.
struct CapHeld(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for CapHeld {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Caps {
    pub(super) fn new(max_sessions: &BTreeMap<String, usize>) -> Caps {
        Caps(max_sessions.iter().map(|(s, max)| (s.clone(), (*max, Arc::default()))).collect())
    }

    /// A place for one more session of `service` (`None`: not capped), or `Err` with its cap
    /// when every place is taken.
    fn take(&self, service: &str) -> Result<Option<CapHeld>, usize> {
        let Some((max, open)) = self.0.get(service) else {
            return Ok(None);
        };
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < *max).then_some(n + 1))
            .map_err(|_| *max)?;
        Ok(Some(CapHeld(open.clone())))
    }
}

/// The data links one control link may dial: a burst of [`DIAL_BURST`], then [`DIAL_REFILL`] a
/// second. A server's pool asks for links as sessions take them, and links in chunks carry one
/// session after another, so a server needs a dial only to grow its pool (and, before chunks,
/// one per session); a broken or hostile one that asks for links and leaves them unused (closes
/// them, asks them for nothing, or runs one session on each and closes it) cannot make the agent
/// dial (a TCP and TLS handshake, through a proxy a CONNECT, each) thousands of times a second
/// (a hostile-server review measured 3,700 dials a second, 1,000 CONNECTs through a proxy; two
/// reviews of budgets that gave places back for used links found ways to have them back).
#[derive(Debug)]
pub(super) struct DialBudget(std::sync::Mutex<(f64, Instant)>);

/// Links a control link may dial at once before it is slowed (beyond any pool's growth: a
/// server keeps at most 16 times its pool idle, and pools are a few links).
const DIAL_BURST: f64 = 1024.0;
/// Dials that come back each second: a server without chunks (one session per link) still gets
/// this many sessions a second past the burst.
const DIAL_REFILL: f64 = 64.0;

impl Default for DialBudget {
    fn default() -> DialBudget {
        DialBudget(std::sync::Mutex::new((DIAL_BURST, Instant::now())))
    }
}

impl DialBudget {
    /// A dial, if one is left.
    fn take(&self) -> bool {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        state.0 = (state.0 + now.duration_since(state.1).as_secs_f64() * DIAL_REFILL).min(DIAL_BURST);
        state.1 = now;
        if state.0 < 1.0 {
            return false;
        }
        state.0 -= 1.0;
        true
    }
}

/// What dialling a data link needs, shared by the control loop and the links (each replaces
/// itself when it is opened).
#[derive(Clone)]
pub(super) struct Links {
    pub(super) config: Arc<AgentConfig>,
    pub(super) tls: Option<BackendTls>,
    /// The connection's link key, which its data links carry (`None`: the random source
    /// failed; they log in by the secret alone).
    pub(super) link_key: Option<String>,
    /// Cancelled when the control link ends: idle links close, no new one is dialled.
    pub(super) idle: CancellationToken,
    pub(super) sessions: TaskTracker,
    /// The instance the control link is on (from its `101`), which every data link names, so
    /// one that a balancer sent to another instance is refused there.
    pub(super) instance: Option<String>,
    /// Whether a link's reaching another instance was logged (once per control link).
    pub(super) misrouted: Arc<std::sync::atomic::AtomicBool>,
    /// Whether a link refused at the server's caps was logged (once per control link).
    pub(super) capped: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the server answered a link without chunks (a server from before them: one
    /// session per link, so one dial per session).
    pub(super) raw: Arc<std::sync::atomic::AtomicBool>,
    /// The agent's capped services' open sessions.
    pub(super) caps: Arc<Caps>,
    /// The links this control link may still dial ([`DialBudget`]).
    pub(super) dials: Arc<DialBudget>,
}

/// Dials one more idle data link (bounded: at most 4096 links and sessions at once, and by
/// [`DialBudget`]).
pub(super) fn spawn_link(links: &Links) {
    if links.sessions.len() >= 4096 || links.idle.is_cancelled() {
        return;
    }
    if !links.dials.take() {
        match DIALS.take() {
            // A compat review: with a server from before chunks the first text blamed a server
            // that uses every link it asks for.
            Some(left_out) if links.raw.load(Ordering::Relaxed) => warn!(
                left_out,
                "agent: the server asks for data links faster than {DIAL_REFILL} a second: dialling slowed; it answers \
                 them without chunks, as a server from before links carry one session after another does, which takes a \
                 new link for each session (at most {DIAL_REFILL} sessions a second past a burst: upgrading it lifts \
                 that)"
            ),
            Some(left_out) => warn!(
                left_out,
                "agent: the server asks for data links faster than it uses them: dialling slowed to {DIAL_REFILL} a second"
            ),
            None => debug!("agent: data link not dialled: dialling is slowed"),
        }
        return;
    }
    // Boxed: a link spawns its own replacement, so its future's type cannot contain itself.
    // In the span of its server's connection, if the agent has several.
    let link: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(data_link(links.clone()).instrument(tracing::Span::current()));
    links.sessions.spawn(link);
}

pub(super) async fn data_link(links: Links) {
    let (config, tls, idle) = (&*links.config, links.tls.as_ref(), &links.idle);
    let opened = timeout(config.connect_timeout, async {
        let (mut io, acks) = dial(config, tls).await?;
        let s = &config.server;
        let instance = match &links.instance {
            Some(id) => format!("{}: {id}\r\n", link::INSTANCE_HEADER),
            None => String::new(),
        };
        let key = match &links.link_key {
            Some(key) => format!("{}: {key}\r\n", link::LINK_KEY_HEADER),
            None => String::new(),
        };
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {}\r\n{}: {}\r\n{}{instance}{key}Authorization: Bearer {}\r\n\r\n",
            s.path,
            s.authority(),
            link::LINK_TOKEN,
            link::NAME_HEADER,
            config.name,
            Framing {
                chunks: true,
                resets: true
            }
            .header_line(),
            config.secret
        );
        io.write_all(head.as_bytes()).await?;
        io.flush().await?;
        // Buffered: the head costs a read, not one per byte.
        let mut io = BufReader::with_capacity(1024, io);
        let (status, head) = link::read_response_head(&mut io).await?;
        match status {
            101 => Ok((io, answered_framing(&head), acks)),
            // While the control link is up (a dial that outlived it may reach a restarted
            // server, which is another instance by then).
            421 if !links.idle.is_cancelled() && !links.misrouted.swap(true, Ordering::Relaxed) => {
                // The control link's instance has not got this agent's links: the URL reaches
                // several instances (a balancer that spreads connections).
                warn!(
                    server = %config.server,
                    "agent: a data link reached another instance than the control link: the server URL must reach \
                     one instance (with several, list each instance's own URL)"
                );
                Err(std::io::Error::other(format!("the server answered {status}")))
            }
            // The server's caps (max_connections_per_ip, max_connections): sessions wait for
            // links meanwhile, and time out if none comes.
            429 | 503 if !links.idle.is_cancelled() && !links.capped.swap(true, Ordering::Relaxed) => {
                warn!(
                    server = %config.server,
                    status,
                    "agent: the server refuses this agent's data links at its connection caps (max_connections_per_ip \
                     counts a link until it has logged in; max_connections): sessions wait for links"
                );
                Err(std::io::Error::other(format!("the server answered {status}")))
            }
            _ => Err(std::io::Error::other(format!("the server answered {status}"))),
        }
    })
    .await;
    let (buffered, framing, acks) = match opened {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return debug!(error = %e, "agent: data link not opened"),
        Err(_) => return debug!("agent: data link not opened in time"),
    };
    if !framing.chunks {
        links.raw.store(true, Ordering::Relaxed);
    }
    // What came after the head: the beginning of the first `open`.
    let mut carry = buffered.buffer().to_vec();
    let mut io = buffered.into_inner();
    // A link in chunks serves one session after another; a raw one (a server that did not
    // answer the offer of chunks) serves one.
    loop {
        let line = tokio::select! {
            _ = idle.cancelled() => return,
            l = link::read_line_carried(&mut io, &mut carry) => l,
        };
        let (service, id) = match line {
            Ok(Some(l)) => match l.strip_prefix("open ") {
                // `open SERVICE`, or `open SERVICE session=N` from a server that tells its
                // session's id (what it logs as `session=N`); other words are ignored.
                Some(s) => {
                    let mut words = s.split(' ');
                    let service = words.next().unwrap_or_default().to_owned();
                    let id = words.find_map(|w| w.strip_prefix("session=")?.parse::<u64>().ok());
                    (service, id)
                }
                None => {
                    return match BAD_LINK.take() {
                        Some(left_out) => warn!(left_out, "agent: a data link started with something other than `open`; closed"),
                        None => debug!("agent: a data link started with something other than `open`; closed"),
                    }
                }
            },
            Ok(None) => return debug!("agent: idle data link closed by the server"),
            Err(e) => return debug!(error = %e, "agent: idle data link failed"),
        };
        if !carry.is_empty() {
            return warn!("agent: the server sent bytes after `open` before our answer; link closed");
        }

        // The server took a raw link from its pool: the pool gets a new one at once (protocol
        // version 2), once the session is let in, before its service is even connected. Not for
        // an `open` refused (a service not listed, or at its cap): a server that asks for such
        // on every link it is given would otherwise have the agent dial without end; its pool
        // asks with `want` when it runs dry.
        let replace = (!framing.chunks).then_some(&links);
        // The agent's lines of this session carry the server's id, to join the two logs; at
        // error level, so that it is there whatever level the log shows (a warning's most).
        let span = match id {
            Some(id) => tracing::error_span!("session", session = id),
            None => tracing::Span::none(),
        };
        let session = session(&mut io, acks, &service, framing, config, &links.caps, replace);
        match tracing::Instrument::instrument(session, span).await {
            Some(rest) if framing.chunks => carry = rest,
            _ => return,
        }
    }
}

/// Lines a server can cause once per link it sends (a service not listed, one at its cap, a
/// link that does not start with `open`): each at most once per 10 s, the rest at debug with the
/// number left out, so a server cannot flood the agent's log (or set aside a kept log file's
/// history every few seconds).
static NO_SUCH_SERVICE: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));
static BUSY: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));
static BAD_LINK: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));
static DIALS: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));
/// Per service: one app down does not hide another that fails after it (a review: a second
/// service's timeouts 3 s after the first's refusals were at debug only). Services are the
/// agent's own list, so the keys are bounded.
static UNREACHABLE: crate::logging::QuietedBy = crate::logging::QuietedBy::new(Duration::from_secs(10));

/// A service name a server asked for, as the log and the `err` answer show it: escaped, not
/// filtered (`pos\u{0}` asked for is not `pos` missing), and cut at 64 characters.
fn shown_name(service: &str) -> String {
    service.escape_default().take(64).collect()
}

/// What a data link's `101` agreed on: chunks, and with them resets (a server from before
/// [`chunks::RESETS`] answers `chunks` alone, one from before chunks nothing).
fn answered_framing(head: &str) -> Framing {
    Framing::from_tokens(head.lines().filter_map(|l| {
        l.split_once(':')
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case(chunks::FRAMING_HEADER))
            .map(|(_, value)| value)
    }))
}

/// One session on a data link whose `open` named `service`: connect it, answer, relay until both
/// ends are done. For a link in chunks, `Some` with the bytes read past the server's end mark
/// when the link is clean for the next session (an `err` answer leaves it clean too).
/// `replace`: the links to add a new idle one to once the session is let in (a raw link's).
async fn session(
    io: &mut LinkStream,
    acks: crate::platform::Acks,
    service: &str,
    framing: Framing,
    config: &AgentConfig,
    caps: &Caps,
    replace: Option<&Links>,
) -> Option<Vec<u8>> {
    // The allow-list: only a service in this agent's own list, whatever the server asks.
    let Some(target) = config.services.get(service).filter(|_| link::valid_name(service)) else {
        let shown = shown_name(service);
        match NO_SUCH_SERVICE.take() {
            Some(left_out) => warn!(service = %shown, left_out, "agent: the server asked for a service this agent does not have"),
            None => debug!(service = %shown, "agent: the server asked for a service this agent does not have"),
        }
        return answer(io, &format!("err {shown}: {}{}\n", link::NO_SUCH_SERVICE, config.name), config)
            .await
            .then(Vec::new);
    };
    // Held until the session ends; a service at its cap is not connected to at all.
    let _place = match caps.take(service) {
        Ok(place) => place,
        Err(max) => {
            match BUSY.take() {
                Some(left_out) => info!(%service, max_sessions = max, left_out, "agent: service busy, session refused"),
                None => debug!(%service, max_sessions = max, "agent: service busy, session refused"),
            }
            let sessions = if max == 1 { "session" } else { "sessions" };
            return answer(io, &format!("err {service}: {}{max} {sessions} at a time\n", link::BUSY), config)
                .await
                .then(Vec::new);
        }
    };
    if let Some(links) = replace {
        spawn_link(links);
    }
    let mut app = match Backend::connect(target, config.connect_timeout, None, None).await {
        Ok(app) => app,
        Err(e) => {
            let why = match &e {
                ConnectError::Connect(e) => crate::backend::describe(e),
                ConnectError::Timeout(_) => "timed out".into(),
                ConnectError::ResolveTimeout(_) => "the name lookup timed out".into(),
                ConnectError::Resolve(_) => "cannot resolve host".into(),
                other => other.to_string(),
            };
            match UNREACHABLE.take(service) {
                Some(left_out) => warn!(%service, error = %why, left_out, "agent: service not reachable"),
                None => debug!(%service, error = %why, "agent: service not reachable"),
            }
            return answer(io, &format!("err {service}: {why}\n"), config).await.then(Vec::new);
        }
    };
    let ok = if framing.chunks {
        format!("{}\n", link::OK_CHUNKS)
    } else {
        "ok\n".to_owned()
    };
    if !answer(io, &ok, config).await {
        return None;
    }
    // Which of the service's addresses answered (a name can have several), as the server's
    // lines say `backend=`.
    let app_addr = app.peer_addr().map_or_else(|| target.to_string(), |a| a.to_string());
    debug!(%service, app = %app_addr, "agent: session open");
    let started = Instant::now();
    let (app_read, app_write) = app.halves();
    let stall = config.app_stall();
    // The server's host gone dark while the app's bytes wait for it: the session ends (and the
    // app's connection with it) once the link's socket has had no acknowledgement for the
    // agent's keepalive deadline, not after the kernel's ~15 minutes of retransmissions (the
    // server ends its side at its own pong deadline).
    let deadline = config.ping_interval + config.pong_timeout;
    let (ended, reusable) = tokio::select! {
        carried = carry(io, app_read, app_write, framing, stall, config.pong_timeout) => carried,
        e = unanswered(acks, deadline) => (Err(e), None),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    match ended {
        Ok((up, down)) => info!(%service, app = %app_addr, bytes_up = up, bytes_down = down, duration_ms, "agent: session closed"),
        Err(e) => info!(%service, app = %app_addr, error = %crate::backend::describe(&e), duration_ms, "agent: session ended"),
    }
    reusable
}

/// Ready with an error once the link's host is gone by the rule the server's relay applies to a
/// backend ([`crate::relay::in_flight_unanswered`]: nothing acknowledged for `limit` while the
/// agent's bytes were in flight, seen so for half of it, at most 10 s). Looks every half limit
/// while nothing is in flight; never ready when the socket's acknowledgements are not known.
async fn unanswered(acks: crate::platform::Acks, limit: Duration) -> std::io::Error {
    let grace = crate::relay::ack_grace(limit);
    let mut seen = None;
    let mut next = Instant::now() + grace;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(silence) = acks.silence() else {
            return std::future::pending().await;
        };
        let now = Instant::now();
        if !silence.waiting {
            seen = None;
            next = now + grace;
            continue;
        }
        match crate::relay::in_flight_unanswered(silence, now, None, &mut seen, limit) {
            Err(e) => return e,
            Ok(wait) => next = now + wait,
        }
    }
}

/// A connected session's bytes, both ways between the link and the app, until both ends are
/// done (`stall`: the app's write deadline, see [`AppWriter`]); then, for a link in chunks whose
/// session left it clean, `Some` with the bytes read past the server's end mark. An app whose
/// connection failed (it reset it) has the session's side to the server end with the reset mark
/// where both ends agreed on it (written within `mark_within`), not with the end mark of an app
/// that closed.
async fn carry<R, W>(
    io: &mut LinkStream,
    app_read: R,
    app_write: W,
    framing: Framing,
    stall: Duration,
    mark_within: Duration,
) -> (std::io::Result<(u64, u64)>, Option<Vec<u8>>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let app_failed = AtomicBool::new(false);
    let app_read = AppReader {
        io: app_read,
        failed: &app_failed,
        resets: framing.resets,
    };
    let app_write = AppWriter::new(app_write, stall, &app_failed);
    let (link_read, link_write) = io.split();
    let (mut from_server, mut to_server) = (Dechunker::default(), Chunker::new());
    let ended = if framing.chunks {
        let link_read = ChunkReader {
            io: link_read,
            chunks: &mut from_server,
        };
        let link_write = ChunkWriter {
            io: link_write,
            chunks: &mut to_server,
        };
        relay(Pipe::new(link_read, app_write), Pipe::new(app_read, link_write)).await
    } else {
        relay(Pipe::new(link_read, app_write), Pipe::new(app_read, link_write)).await
    };
    if framing.resets && app_failed.load(Ordering::Relaxed) && !to_server.ending() {
        // The page reads a 1011 "connection reset" after the app's bytes, as from a TCP
        // backend. (A chunk cut short, past the wait for the app: the link is closed unmarked.)
        let marked = timeout(
            mark_within,
            std::future::poll_fn(|cx| to_server.poll_reset(std::pin::Pin::new(&mut *io), cx)),
        )
        .await;
        if !matches!(marked, Ok(Ok(()))) {
            debug!("agent: the app's reset not passed on; link closed");
        }
        return (ended, None);
    }
    let reusable = (from_server.clean() && to_server.ended()).then(|| from_server.into_pending());
    (ended, reusable)
}

/// Both directions of a session: each copies to EOF, then passes the EOF on (half-close); an
/// error ends both. The bytes each way.
async fn relay<A, B, C, D>(mut up: Pipe<A, B>, mut down: Pipe<C, D>) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + Unpin,
    B: tokio::io::AsyncWrite + Unpin,
    C: tokio::io::AsyncRead + Unpin,
    D: tokio::io::AsyncWrite + Unpin,
{
    // `None` for the app's side: it was still going when the browser's had ended long enough
    // ago; its count is read from its pipe once the copies are dropped.
    let ended: std::io::Result<(u64, Option<u64>)> = {
        let mut up = std::pin::pin!(up.run());
        let mut down = std::pin::pin!(down.run());
        tokio::select! {
            // The link's EOF: the browser's session is over and the server reads nothing more
            // after it, so an app that neither answers nor closes is not waited on beyond the
            // close time.
            r = &mut up => match r {
                Ok(n) => match timeout(AFTER_BROWSER_CLOSE, &mut down).await {
                    Ok(d) => d.map(|d| (n, Some(d))),
                    Err(_) => Ok((n, None)),
                },
                // The app reset its connection while the browser's bytes went to it: what it
                // wrote before is still read (the kernel keeps it past the reset) and goes on
                // to the browser, then its EOF, as the server's relay does for a backend.
                Err(e) if app_write_failed(&e) => match timeout(AFTER_BROWSER_CLOSE, &mut down).await {
                    Ok(Ok(_)) => Err(e),
                    Ok(Err(read)) => Err(read),
                    Err(_) => Err(e),
                },
                Err(e) => Err(e),
            },
            // The app's EOF: what it wrote is on its way; the browser may still send until it
            // closes.
            r = &mut down => match r {
                Ok(d) => match timeout(AFTER_APP_CLOSE, &mut up).await {
                    Ok(n) => n.map(|n| (n, Some(d))),
                    Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the app took no more of the browser's bytes")),
                },
                Err(e) => Err(e),
            },
        }
    };
    ended.map(|(n, d)| (n, d.unwrap_or(down.total)))
}

/// One direction of an agent's session, as the server's relay moves bytes: each read goes into
/// the thread's scratch buffer (up to 256 KiB, shared by every session on the thread) and is
/// written out from there at once; only what the writer does not take is copied into a buffer
/// of the session's own, and nothing more is read until that is written. An idle session holds
/// no buffer, a slow one at most one read. The reader's EOF is passed on (half-close) at the end.
struct Pipe<R, W> {
    reader: R,
    writer: W,
    /// What the writer has not taken yet, and how much of it it took since.
    held: Vec<u8>,
    at: usize,
    /// Written to a stream that may hold bytes until flushed (TLS).
    unflushed: bool,
    eof: bool,
    total: u64,
    /// Bytes per turn ([`crate::relay::TURN_BYTES`]).
    turn: u64,
}

/// Where a [`Pipe`] stopped without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The reader's EOF is passed on: the bytes copied.
    Done(u64),
    /// A turn's worth copied, more to come.
    Yield,
}

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Pipe<R, W> {
    fn new(reader: R, writer: W) -> Self {
        Pipe {
            reader,
            writer,
            held: Vec::new(),
            at: 0,
            unflushed: false,
            eof: false,
            total: 0,
            turn: crate::relay::TURN_BYTES,
        }
    }

    /// Copies until the reader's EOF has been passed on, a turn at a time; the bytes copied.
    async fn run(&mut self) -> std::io::Result<u64> {
        loop {
            match std::future::poll_fn(|cx| self.poll(cx)).await? {
                Step::Done(n) => return Ok(n),
                // A deferred wake-up: the sessions the runtime's I/O events woke go first.
                Step::Yield => tokio::task::yield_now().await,
            }
        }
    }

    /// Copies until the reader's EOF has been passed on (the bytes copied), or until it has
    /// copied a turn's worth ([`crate::relay::TURN_BYTES`], as the server's relay): then the
    /// thread's other sessions run first.
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<Step>> {
        use std::pin::Pin;
        use std::task::{ready, Poll};
        let start = self.total;
        loop {
            if self.total - start >= self.turn {
                return Poll::Ready(Ok(Step::Yield));
            }
            while self.at < self.held.len() {
                let n = ready!(Pin::new(&mut self.writer).poll_write(cx, &self.held[self.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.at += n;
                self.unflushed = true;
            }
            if !self.held.is_empty() {
                self.held = Vec::new();
                self.at = 0;
            }
            if self.eof {
                ready!(Pin::new(&mut self.writer).poll_shutdown(cx))?;
                return Poll::Ready(Ok(Step::Done(self.total)));
            }
            let Pipe {
                reader,
                writer,
                held,
                unflushed,
                eof,
                total,
                ..
            } = self;
            let read = crate::relay::with_scratch(|scratch| {
                let mut buf = tokio::io::ReadBuf::new(scratch);
                match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let data = buf.filled();
                if data.is_empty() {
                    *eof = true;
                    return Poll::Ready(Ok(()));
                }
                *total += data.len() as u64;
                let taken = match Pin::new(&mut *writer).poll_write(cx, data) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => 0,
                };
                *unflushed |= taken > 0;
                if taken < data.len() {
                    // The scratch buffer is the thread's: the rest moves to the session.
                    *held = data[taken..].to_vec();
                }
                Poll::Ready(Ok(()))
            });
            match read {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing more to read for now: what a TLS stream holds goes out before we wait.
                    if self.unflushed {
                        ready!(Pin::new(&mut self.writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The app's side of a session, as the agent writes the browser's bytes to it: a write that the
/// app has taken nothing of for `stall` fails ("the app took none of the browser's bytes for
/// 40s"), and the session ends. Without it, a session whose app stopped reading would never end
/// on the agent: the link is then not read (its bytes wait for the app), so the agent would not
/// see the server give the session up when the page leaves, and the session's task, the app's
/// connection, the link and its place under the service's `max_sessions` would be held until the
/// app read again or closed. `stall` is [`AgentConfig::app_stall`] (the control link's ping
/// interval plus its pong deadline, at least 40 s): a server with default settings has itself
/// ended such a session by then, since it reads nothing more from a page whose bytes the agent
/// does not take, its pongs included.
struct AppWriter<'a, W> {
    io: W,
    stall: Duration,
    /// Set when a write fails.
    failed: &'a AtomicBool,
    /// Armed when a write finds the app not reading; disarmed by any write it takes.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<'a, W> AppWriter<'a, W> {
    fn new(io: W, stall: Duration, failed: &'a AtomicBool) -> Self {
        AppWriter {
            io,
            stall,
            failed,
            deadline: None,
            armed: false,
        }
    }

    /// A write's outcome, with the stall deadline kept: `Pending` arms it (once), past it the
    /// write fails; anything else disarms it.
    fn watch<T>(
        &mut self,
        polled: std::task::Poll<std::io::Result<T>>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        if !polled.is_pending() {
            self.armed = false;
            // Marked as the app's: the relay then still reads what the app wrote before.
            return polled.map_err(|e| {
                self.failed.store(true, Ordering::Relaxed);
                std::io::Error::new(e.kind(), AppWriteFailed(e))
            });
        }
        let at = tokio::time::Instant::now() + self.stall;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.armed {
            deadline.as_mut().reset(at);
            self.armed = true;
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the app took none of the browser's bytes for {:?}", self.stall),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AppWriter<'_, W> {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(polled, cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_flush(cx);
        this.watch(polled, cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The app's side of a session, as the agent reads what the app writes: a read that fails sets
/// `failed`; with `resets`, so does the end of what the app wrote after a write to it failed
/// (the error its reset gave went to that write), which then reads as the reset it was instead of
/// the app's close.
struct AppReader<'a, R> {
    io: R,
    failed: &'a AtomicBool,
    resets: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for AppReader<'_, R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{ready, Poll};
        let this = self.get_mut();
        let before = buf.filled().len();
        match ready!(std::pin::Pin::new(&mut this.io).poll_read(cx, buf)) {
            Err(e) => {
                this.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Err(e))
            }
            Ok(()) if this.resets && buf.filled().len() == before && buf.remaining() > 0 && this.failed.load(Ordering::Relaxed) => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "the app reset its connection",
                )))
            }
            Ok(()) => Poll::Ready(Ok(())),
        }
    }
}

/// A write to the app failed: it reset its connection, as an app does that closes (an answer
/// written, say) with some of the browser's bytes unread.
#[derive(Debug)]
struct AppWriteFailed(std::io::Error);

impl std::fmt::Display for AppWriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing to the app failed: {}", self.0)
    }
}

impl std::error::Error for AppWriteFailed {}

/// Whether `e` is an [`AppWriteFailed`].
fn app_write_failed(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<AppWriteFailed>())
}

/// How long an app may go on after the browser's side of a session ended (the server's close
/// deadline, by default).
const AFTER_BROWSER_CLOSE: Duration = Duration::from_secs(5);
/// How long the browser's side may go on after the app's EOF: the server ends the session within
/// its close deadline (5 s by default) of passing that EOF on; twice that, so that an app that
/// half-closes and then stops reading does not hold the session's task, its connection and the
/// link for ever.
const AFTER_APP_CLOSE: Duration = Duration::from_secs(10);

/// Writes a data link's answer line (`ok`, `err …`); whether it was written.
async fn answer(io: &mut LinkStream, text: &str, config: &AgentConfig) -> bool {
    let written = timeout(config.pong_timeout, async {
        io.write_all(text.as_bytes()).await?;
        io.flush().await
    })
    .await;
    matches!(written, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile-server review: `open pos\0` was answered `err pos: no such service`, which
    /// reads as if the listed `pos` were missing.
    #[test]
    fn a_service_name_asked_for_is_shown_escaped_and_cut() {
        assert_eq!(shown_name("pos\0"), "pos\\u{0}");
        assert_eq!(shown_name(" pos\n"), " pos\\n");
        assert_eq!(shown_name(&"x".repeat(300)).len(), 64);
    }
    use std::task::Poll;

    /// An app that reset its connection after writing `hello\n`, as the agent sees it when its
    /// write met the reset first (it took the error): the write fails, the read gives what the
    /// app wrote and then EOF, once the write has failed.
    #[derive(Clone, Default)]
    struct ResetApp(Arc<std::sync::Mutex<ResetState>>);

    #[derive(Default)]
    struct ResetState {
        read: bool,
        write_failed: bool,
        waiting: Option<std::task::Waker>,
    }

    impl tokio::io::AsyncRead for ResetApp {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let mut state = self.0.lock().unwrap();
            if !state.read {
                state.read = true;
                buf.put_slice(b"hello\n");
                return Poll::Ready(Ok(()));
            }
            if !state.write_failed {
                state.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
    }

    impl tokio::io::AsyncWrite for ResetApp {
        fn poll_write(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
            let mut state = self.0.lock().unwrap();
            state.write_failed = true;
            if let Some(w) = state.waiting.take() {
                w.wake();
            }
            Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What the server reads of a session whose app reset its connection while the page's
    /// bytes went to it, the error having gone to the agent's write: `Ok` with the bytes when
    /// the session's side ended with the end mark (an app's close), `Err` when with a reset.
    async fn server_reads_of_a_reset_app(framing: Framing) -> Result<Vec<u8>, (Vec<u8>, std::io::Error)> {
        use tokio::io::AsyncWriteExt;
        let (agent_end, mut server) = tokio::io::duplex(64 * 1024);
        let mut link = LinkStream::Other(Box::new(agent_end));
        // The page's bytes, in a chunk: the app's write takes the reset.
        server.write_all(&[0, 0, 0, 6]).await.unwrap();
        server.write_all(b"upload").await.unwrap();
        let app = ResetApp::default();
        let (ended, reusable) = carry(
            &mut link,
            app.clone(),
            app,
            framing,
            Duration::from_secs(40),
            Duration::from_secs(5),
        )
        .await;
        assert!(reusable.is_none(), "a reset app's link carries no other session");
        let _ = ended;
        drop(link);
        let mut reader = match framing.resets {
            true => Dechunker::with_resets(Vec::new()),
            false => Dechunker::new(Vec::new()),
        };
        let mut got = Vec::new();
        loop {
            let mut space = [0u8; 64];
            let mut buf = tokio::io::ReadBuf::new(&mut space);
            match std::future::poll_fn(|cx| reader.poll_read(std::pin::Pin::new(&mut server), cx, &mut buf)).await {
                Ok(()) if buf.filled().is_empty() => return Ok(got),
                Ok(()) => got.extend_from_slice(buf.filled()),
                Err(e) => return Err((got, e)),
            }
        }
    }

    /// The server learns of the app's reset after its bytes (the page reads 1011 "connection
    /// reset", as from a TCP backend), not of a clean close (1000, which a page does not
    /// reconnect on): whichever of the agent's write or read met the reset. A server from
    /// before resets gets the end mark, as before.
    #[tokio::test]
    async fn an_app_reset_met_by_a_write_is_passed_on_as_a_reset_after_its_bytes() {
        let framing = Framing {
            chunks: true,
            resets: true,
        };
        let (got, e) = server_reads_of_a_reset_app(framing).await.unwrap_err();
        assert_eq!(got, b"hello\n");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        let older = Framing {
            chunks: true,
            resets: false,
        };
        assert_eq!(server_reads_of_a_reset_app(older).await.unwrap(), b"hello\n");
    }

    /// The framing header: a server answers what the agent offered of it, so an agent from
    /// before resets (which reads a value of `chunks` alone) still gets chunks; an agent reads
    /// resets only beside chunks.
    #[test]
    fn the_framing_answered_is_what_was_offered() {
        let offer = Framing::from_tokens(["chunks, resets"]);
        assert_eq!(
            offer,
            Framing {
                chunks: true,
                resets: true
            }
        );
        assert_eq!(offer.header_line(), "x-wsbridge-link-framing: chunks, resets\r\n");
        let older = Framing::from_tokens(["chunks"]);
        assert_eq!(older.header_line(), "x-wsbridge-link-framing: chunks\r\n");
        assert_eq!(Framing::from_tokens(["resets"]), Framing::RAW);
        assert_eq!(Framing::RAW.header_line(), "");
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: wsbridge-agent-link\r\nX-Wsbridge-Link-Framing: CHUNKS\r\n\r\n";
        assert_eq!(
            answered_framing(head),
            Framing {
                chunks: true,
                resets: false
            }
        );
        let head = "HTTP/1.1 101 Switching Protocols\r\nx-wsbridge-link-framing: chunks, resets\r\n\r\n";
        assert_eq!(
            answered_framing(head),
            Framing {
                chunks: true,
                resets: true
            }
        );
        assert_eq!(answered_framing("HTTP/1.1 101 Switching Protocols\r\n\r\n"), Framing::RAW);
    }

    /// A cap counts the sessions open now: a place comes back when its session ends.
    #[test]
    fn a_capped_service_gives_a_place_back_when_a_session_ends() {
        let caps = Caps::new(&BTreeMap::from([("pos".to_owned(), 2)]));
        assert!(caps.take("label").unwrap().is_none(), "not capped");
        let one = caps.take("pos").unwrap().unwrap();
        let _two = caps.take("pos").unwrap().unwrap();
        assert_eq!(caps.take("pos").err(), Some(2));
        drop(one);
        assert!(caps.take("pos").unwrap().is_some());
    }

    /// An app that always has more for a browser that takes it all never makes a session wait:
    /// the pipe gives the thread back after each turn's worth, so the agent's other sessions
    /// are not held up until the cooperative budget runs out (16 MiB of 256 KiB reads), and it
    /// still copies every byte and passes the EOF on.
    #[tokio::test]
    async fn a_pipe_that_never_waits_gives_the_thread_back_after_each_turn() {
        use tokio::io::AsyncReadExt;
        const TOTAL: u64 = 3 << 20;
        let mut pipe = Pipe::new(tokio::io::repeat(b'a').take(TOTAL), tokio::io::sink());
        let mut passes = Vec::new();
        let copied = loop {
            let before = pipe.total;
            let step = std::future::poll_fn(|cx| Poll::Ready(pipe.poll(cx))).await;
            passes.push(pipe.total - before);
            match step {
                Poll::Ready(Ok(Step::Yield)) => {
                    let n = pipe.total - before;
                    let most = pipe.turn + crate::relay::SCRATCH as u64;
                    assert!((pipe.turn..most).contains(&n), "{passes:?}");
                }
                Poll::Ready(Ok(Step::Done(n))) => break n,
                // tokio's budget, before a turn's worth: not with 256 KiB reads.
                Poll::Pending => panic!("waited with more to copy: {passes:?}"),
                Poll::Ready(Err(e)) => panic!("{e}"),
            }
        };
        assert_eq!(copied, TOTAL);
        assert!(passes.len() >= 5, "{passes:?}");
    }

    /// An app that answers and then ignores the end of its input: the session ends
    /// AFTER_BROWSER_CLOSE after the browser's side, not before, and the bytes the app sent are
    /// counted (they were logged as 0).
    #[tokio::test(start_paused = true)]
    async fn an_app_that_ignores_the_end_of_its_input_is_let_go_with_its_bytes_counted() {
        use tokio::io::AsyncWriteExt;
        let (mut browser, link) = tokio::io::duplex(1024);
        let (agent_end, mut app) = tokio::io::duplex(1024);
        let (link_read, link_write) = tokio::io::split(link);
        let (app_read, app_write) = tokio::io::split(agent_end);
        browser.write_all(b"hi").await.unwrap();
        browser.shutdown().await.unwrap();
        app.write_all(b"hello back").await.unwrap();
        // The app keeps its end open and never reads.
        let started = tokio::time::Instant::now();
        let (up, down) = relay(Pipe::new(link_read, app_write), Pipe::new(app_read, link_write))
            .await
            .unwrap();
        assert_eq!((up, down), (2, 10));
        assert_eq!(started.elapsed(), AFTER_BROWSER_CLOSE);
        drop(app);
    }
}
