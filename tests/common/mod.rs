//! Shared helpers for the integration tests: a bridge bound to port 0, real TCP backends bound
//! before they are spawned, WebSocket clients (tungstenite's, and a raw one for frames a proper
//! client would never send), and raw HTTP. Every wait is bounded by [`WAIT`].
//!
//! A test that cannot run here (no IPv6 loopback, a built example missing, a low open-file limit)
//! says so and returns: it calls [`skip`], which prints one line `TEST skipped: REASON` on stderr
//! (past libtest's capture, so it shows in every run). That line is the convention
//! `scripts/test.sh` counts on: it reports such tests as skipped, not passed. tests/browser.rs
//! prints the same line itself for `WSBRIDGE_SKIP_BROWSER=1` (on stdout too).
#![allow(dead_code)]

pub mod binary;
pub mod connect_proxy;
pub mod haproxy;
pub mod lines;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod pki;
pub mod redis;
pub mod token_sources;
pub mod xvnc;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use wsbridge::config::{Config, ListenerConfig, Matcher, RouteConfig, Target};
use wsbridge::server::{Bridge, Drained, Listener};

/// `len` bytes of test data that do not repeat with a short period (so a dropped, duplicated or
/// reordered chunk shows in a comparison); `seed` makes streams differ.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// The bound on every wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Waits until the bridge counts `n` connections under `max_connections` (a connection is
/// counted from its accept).
pub async fn connections_become(bridge: &TestBridge, n: usize) {
    within(&format!("{n} connections"), async {
        while bridge.bridge.connections() != n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// A page uploading 64 KiB messages to `url` while the backend (the next connection `accepted`
/// gives) answers `hello\n` and hangs up with some of the upload unread, which resets its
/// connection: what reached the page before its close, and the close frame.
pub async fn answered_and_hung_up_on(url: &str, accepted: &mut mpsc::Receiver<TcpStream>) -> (Vec<u8>, Option<CloseFrame>) {
    let (ws, _) = ws_connect(url, None).await;
    let (mut tx, mut rx) = ws.split();
    let uploading = tokio::spawn(async move {
        let chunk = pattern(64 * 1024, 3);
        for _ in 0..256 {
            if tx.send(Message::binary(chunk.clone())).await.is_err() {
                return;
            }
        }
    });
    let mut s = within("the backend connection", accepted.recv()).await.unwrap();
    // Some of the upload has arrived, unread: closing now resets the connection.
    within("the upload's first bytes", async {
        let mut b = [0u8; 1];
        while s.peek(&mut b).await.unwrap() == 0 {}
    })
    .await;
    s.write_all(b"hello\n").await.unwrap();
    drop(s);
    let mut got = Vec::new();
    let close = within("the answer and the close", async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(Message::Close(c))) => return c,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{e} after {got:?}"),
                None => return None,
            }
        }
    })
    .await;
    uploading.abort();
    (got, close)
}

/// [`answered_and_hung_up_on`] `rounds` times: each time everything the backend wrote reaches
/// the page, then a 1011 whose reason has `reset` in it (the reset is said: a clean 1000 is what
/// a page does not reconnect on, whether the backend answered or crashed).
pub async fn answered_then_reset(url: &str, accepted: &mut mpsc::Receiver<TcpStream>, rounds: usize, reset: &str) {
    for round in 0..rounds {
        let (got, close) = answered_and_hung_up_on(url, accepted).await;
        assert_eq!(got, b"hello\n", "round {round}: everything the backend wrote, before the close");
        let close = close.expect("a close frame");
        let code = u16::from(close.code);
        assert!(
            code == 1011 && close.reason.contains(reset),
            "round {round}: {code} {}",
            close.reason
        );
    }
}

/// Marks a test that cannot run here as skipped, with `reason`: the caller returns right after.
///
/// libtest has no runtime skip, so the test still counts as passed; what makes the skip visible
/// is one line `TEST skipped: REASON` on stderr, written past libtest's output capture so it
/// shows in every run, and counted by `scripts/test.sh` into its final summary (see the module
/// comment). Keep the form exactly.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    // One write of the whole line, so lines of tests running in parallel do not interleave.
    let line = format!("{test} skipped: {reason}\n");
    std::io::stderr().write_all(line.as_bytes()).expect("stderr");
}

/// How much earlier than a deadline the tests accept its effect: the test's clock starts before
/// the bridge's (a connect, a request), or after the bridge's event is on its way to the test
/// (a frame in flight, a task not yet scheduled on a loaded machine). A deadline honoured by the
/// bridge never shows up earlier than that.
pub const EARLY: Duration = Duration::from_millis(50);

/// How much later than a deadline the tests accept its effect: generous, since the machines the
/// tests run on are shared and noisy. A deadline ignored, or taken for another (the close
/// deadline for the shutdown grace, say), is far outside it.
pub const LATE: Duration = Duration::from_secs(2);

/// Asserts that `what` happened `elapsed` after the test started to watch, inside the window of
/// `deadline`: not before `deadline - EARLY` (it must not cut short), before `deadline + LATE` (it
/// must not be ignored).
#[track_caller]
pub fn assert_window(what: &str, elapsed: Duration, deadline: Duration) {
    assert!(
        elapsed + EARLY >= deadline,
        "{what} after {elapsed:?}: before the {deadline:?} deadline"
    );
    assert!(
        elapsed < deadline + LATE,
        "{what} after {elapsed:?}: long after the {deadline:?} deadline"
    );
}

/// Waits for the peer to close `s` (EOF or a reset; what it sends before is dropped) and returns
/// when that happened. Fails the test on any other read error, or after [`WAIT`].
pub async fn closed_by_peer<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::time::Instant {
    within("the peer to close the connection", async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return std::time::Instant::now(),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return std::time::Instant::now(),
                Err(e) => panic!("reading until the peer closes: {e}"),
            }
        }
    })
    .await
}

/// When a writer last made progress: shared by a task that writes (it calls [`Progress::mark`]
/// after every write that took bytes) and the test, which waits for the writer to be held up.
#[derive(Clone)]
pub struct Progress(std::sync::Arc<std::sync::Mutex<std::time::Instant>>);

impl Default for Progress {
    fn default() -> Self {
        Progress(std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
    }
}

impl Progress {
    /// The writer made progress now.
    pub fn mark(&self) {
        *self.0.lock().unwrap() = std::time::Instant::now();
    }

    /// When the writer last made progress.
    pub fn last(&self) -> std::time::Instant {
        *self.0.lock().unwrap()
    }

    /// Waits until the writer (`task`) has made no progress for `stall`: what it writes to is held
    /// up. Fails the test if the task ends first (nothing held it up, or its writes failed), or
    /// after [`WAIT`].
    pub async fn held_up_for<T: std::fmt::Debug>(&self, stall: Duration, task: &mut JoinHandle<T>) {
        within(&format!("the writer to be held up for {stall:?}"), async {
            loop {
                let since = self.0.lock().unwrap().elapsed();
                if since >= stall {
                    return;
                }
                if let Ok(done) = tokio::time::timeout(stall - since, &mut *task).await {
                    panic!("the writer ended before it was held up for {stall:?}: {done:?}");
                }
            }
        })
        .await
    }
}

/// A bridge serving on 127.0.0.1 with an ephemeral port.
pub struct TestBridge {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    /// Ends with the drain report.
    pub handle: JoinHandle<Drained>,
    /// For reload tests.
    pub bridge: Bridge,
    /// The configuration it started with (listener address filled in), to edit and reload.
    pub config: Config,
}

impl TestBridge {
    /// Starts `config`, replacing its first listener's address with 127.0.0.1:0 (adding one if
    /// there is none).
    pub async fn start(config: Config) -> TestBridge {
        TestBridge::start_on(config, TcpListener::bind("127.0.0.1:0").await.expect("bind")).await
    }

    /// [`TestBridge::start`] on a listener of the caller's (IPv6, say).
    pub async fn start_on(mut config: Config, listener: TcpListener) -> TestBridge {
        let addr = listener.local_addr().unwrap();
        if config.listeners.is_empty() {
            config.listeners.push(ListenerConfig::new(addr));
        }
        config.listeners[0].addr = addr.into();
        let prepared = Listener::prepare(&config.listeners[0])
            .expect("listener files")
            .with_socket(listener);
        let bridge = Bridge::new(&config).expect("config");
        let shutdown = bridge.shutdown_token();
        let b = bridge.clone();
        let handle = tokio::spawn(async move { b.serve(vec![prepared]).await });
        TestBridge {
            addr,
            shutdown,
            handle,
            bridge,
            config,
        }
    }

    /// `ws://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Shuts down and waits for the drain.
    pub async fn stop(self) -> Drained {
        self.shutdown.cancel();
        within("bridge drain", self.handle).await.unwrap()
    }
}

/// A configuration with one route from `matcher` to `target` (default options).
pub fn config_with(matcher: Matcher, target: Target) -> Config {
    let mut config = Config::new("test");
    let options = config.default_route_options();
    config.routes.push(RouteConfig { matcher, target, options });
    config
}

/// Adds a websockify token file (or directory) at `path` to `config`, its tokens taken by
/// `lookup`, with the configuration's default route options.
pub fn add_token_source(config: &mut Config, path: std::path::PathBuf, lookup: wsbridge::config::TokenLookup) {
    let options = config.default_route_options();
    config.token_sources.push(wsbridge::config::TokenSourceConfig {
        path,
        jwt: None,
        redis: None,
        api: None,
        lookup,
        format: wsbridge::config::TokenFormat::Lines,
        options,
    });
}

/// A configuration bridging any path to `backend`.
pub fn any_path_to(backend: SocketAddr) -> Config {
    config_with(Matcher::AnyPath, tcp(backend))
}

/// The target for a local TCP address.
pub fn tcp(addr: SocketAddr) -> Target {
    Target::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// A TCP echo backend. Returns its address and a counter of accepted connections.
pub async fn echo_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// A backend that reads everything of one connection and reports it when it sees EOF.
pub async fn sink_backend() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                let _ = tx.send(all).await;
            });
        }
    });
    (addr, rx)
}

/// A backend that writes `data` to each connection, then closes it (EOF).
pub async fn source_backend(data: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
                // Keep reading so the close is a clean FIN, not a reset.
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

/// A backend that hands each accepted stream to the test.
pub async fn manual_backend() -> (SocketAddr, mpsc::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// A listener on `addr` that answers no new connection: its accept queue is full and never
/// accepted, so further SYNs go unanswered, as with a black-holed address. Keep what it returns
/// (the listener and the connections that filled it) for as long as the hole is needed.
///
/// # Errors
/// `addr` cannot be bound.
pub async fn unanswering(addr: SocketAddr) -> std::io::Result<(TcpListener, Vec<TcpStream>)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .unwrap();
    socket.bind(addr)?;
    let listener = socket.listen(0)?;
    let addr = listener.local_addr()?;
    let mut fillers = Vec::new();
    // Fill the queue: connections complete until it is full, then one hangs.
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
        assert!(fillers.len() < 64, "accept queue never filled");
    }
    Ok((listener, fillers))
}

/// A name server that takes every query and answers none, on an address of its own on loopback
/// (so that tests running at once do not share it), and a resolv.conf naming it for a process that
/// sees it in place of the machine's ([`binary::command_seeing`]). Counts the queries.
pub struct SilentNameServer {
    /// The resolv.conf (in a directory the value keeps).
    pub resolv: std::path::PathBuf,
    /// Queries received so far.
    pub queries: tokio::sync::watch::Receiver<usize>,
    _dir: tempfile::TempDir,
}

impl SilentNameServer {
    /// Started on `127.<second>.x.y:53`, or `None` after saying `test` is skipped (port 53 taken,
    /// or not allowed).
    pub async fn start(test: &str, second: u8) -> Option<SilentNameServer> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let ip = std::net::Ipv4Addr::new(127, second, (nanos >> 8) as u8, (nanos as u8).max(1));
        let dns = match tokio::net::UdpSocket::bind((ip, 53)).await {
            Ok(s) => s,
            Err(e) => {
                skip(test, &format!("cannot hold {ip}:53 ({e})"));
                return None;
            }
        };
        let (queries_tx, queries) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while dns.recv_from(&mut buf).await.is_ok() {
                queries_tx.send_modify(|n| *n += 1);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {ip}\noptions timeout:10 attempts:1\n")).unwrap();
        Some(SilentNameServer {
            resolv,
            queries,
            _dir: dir,
        })
    }
}

/// A port on 127.0.0.1 that refuses connections (ECONNREFUSED) for as long as the test binary
/// runs. A port bound and then closed could be taken by another process meanwhile; this one stays
/// bound by a socket that never listens (Linux answers a SYN to it with a reset) and is kept in a
/// process-wide list, so no one else can take it. Checked here: a connect to it is refused.
pub async fn closed_port() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    HELD.lock().unwrap().push(socket);
    let refused = within("a connect to the closed port", TcpStream::connect(addr)).await;
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a bound socket that does not listen should refuse connections: {refused:?}"
    );
    addr
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket client, optionally offering subprotocols; returns the client and the
/// subprotocol the server chose.
pub async fn ws_connect(url: &str, protocols: Option<&str>) -> (Ws, Option<String>) {
    let mut req = url.into_client_request().unwrap();
    if let Some(p) = protocols {
        req.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, resp) = within("websocket connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade");
    let chosen = resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

/// Reads messages until a close frame; returns the data messages and the close frame.
pub async fn read_until_close(ws: &mut Ws) -> (Vec<Message>, Option<CloseFrame>) {
    within("close frame", async {
        let mut msgs = Vec::new();
        while let Some(m) = ws.next().await {
            match m.expect("read") {
                Message::Close(f) => return (msgs, f),
                m @ (Message::Binary(_) | Message::Text(_)) => msgs.push(m),
                _ => {}
            }
        }
        panic!("connection ended without a close frame");
    })
    .await
}

/// Sends a binary message, on any WebSocket client (ws://, wss://, a split sink).
pub async fn send_bin<W>(ws: &mut W, data: &[u8])
where
    W: futures_util::Sink<Message> + Unpin,
    W::Error: std::fmt::Debug,
{
    within("send", ws.send(Message::binary(data.to_vec()))).await.expect("send");
}

/// Reads one data message's bytes (skipping control frames), from any WebSocket client.
pub async fn recv_data<R>(ws: &mut R) -> Vec<u8>
where
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    within("message", async {
        loop {
            match ws.next().await.expect("stream ended").expect("read") {
                Message::Binary(b) => return b.to_vec(),
                Message::Text(t) => return t.as_bytes().to_vec(),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    })
    .await
}

/// Sends a raw HTTP request and returns the whole response (the bridge closes after answering).
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    within("http response", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while !response_complete(request, &out) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

/// Whether `out` holds the whole answer to `request`: its head and as many bytes as its
/// `Content-Length` says (none for HEAD, 1xx, 204, 304); an answer without a length ends with the
/// connection. The bridge keeps a connection open after a static file (keep-alive), so the end
/// of the answer is not the end of the connection.
pub fn response_complete(request: &[u8], out: &[u8]) -> bool {
    response_len(request, out).is_some()
}

/// The length of the first whole answer to `request` in `out` (see [`response_complete`]).
pub fn response_len(request: &[u8], out: &[u8]) -> Option<usize> {
    let end = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    let status = status_of(&head);
    if request.starts_with(b"HEAD ") || (100..200).contains(&status) || status == 204 || status == 304 {
        return Some(end);
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())?;
    (out.len() >= end + length).then_some(end + length)
}

/// A GET upgrade request for `path` with the usual headers plus `extra` lines.
pub fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// The status code of a raw response.
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// A raw WebSocket client: a TCP stream after a successful upgrade, for sending frames a real
/// client would not.
pub async fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    raw_ws_request(addr, &upgrade_request(path, "")).await
}

/// [`raw_ws`] with a request of the caller's (another Host, say).
pub async fn raw_ws_request(addr: SocketAddr, request: &[u8]) -> TcpStream {
    raw_upgrade(addr, request).await.0
}

/// [`raw_ws_request`] that also returns the 101 answer's head, for checks on its headers.
pub async fn raw_upgrade(addr: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let s = within("connect", TcpStream::connect(addr)).await.unwrap();
    raw_upgrade_on(s, request).await
}

/// An HTTP head from `s`: its bytes up to and with the blank line that ends it (fewer if the
/// peer closes first), read a byte at a time so that nothing after it is taken, within the test
/// bound.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    within("an HTTP head", async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    })
    .await
}

/// [`raw_upgrade`] over a connection the caller made (with socket options of its own, say).
pub async fn raw_upgrade_on(mut s: TcpStream, request: &[u8]) -> (TcpStream, String) {
    within("raw upgrade", s.write_all(request)).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// One frame as a client sends it: masked unless `masked` is false; `first` is FIN/RSV/opcode.
pub fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads until the close frame (data messages are dropped): its code and reason. Fails the test
/// when the connection ends without one, or with an empty one.
pub async fn read_close(ws: &mut Ws) -> (u16, String) {
    let (_, close) = read_until_close(ws).await;
    let close = close.expect("a close frame with a code");
    (u16::from(close.code), close.reason.to_string())
}

/// Reads one server frame from a raw client: its opcode and payload (server frames are unmasked).
pub async fn raw_read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    within("raw frame", async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.expect("frame header");
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        (h[0] & 0x0f, payload)
    })
    .await
}

/// Reads server frames from a raw client until a close frame; returns its code and reason.
/// Pings are not answered (that is what some tests want).
pub async fn raw_read_close(s: &mut TcpStream) -> (u16, String) {
    loop {
        let (opcode, payload) = raw_read_frame(s).await;
        if opcode == 8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

/// Waits for a one-shot value with the test bound.
pub async fn recv_once<T>(rx: oneshot::Receiver<T>, what: &str) -> T {
    within(what, rx).await.expect("sender dropped")
}

/// Sends a raw request and returns only the response head (for requests that may be upgraded and
/// then stay open).
pub async fn http_head(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    within("the request", s.write_all(request)).await.unwrap();
    read_head(&mut s).await
}

/// The body of a raw response, checked against its Content-Length.
pub fn body_of(response: &str) -> &str {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head end in {response:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    assert_eq!(body.len(), length, "Content-Length does not match the body: {response:?}");
    body
}

/// The path of an executable on PATH (or the usual sbin directories, which a non-root PATH
/// lacks); `None` when it is not installed.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Whether a child process can be given a mount namespace of its own (`unshare --mount`, as
/// root): how a test shows one process its own /etc/hosts or /etc/resolv.conf (`mount --bind`)
/// without touching the machine's. Callers skip without it.
pub fn can_unshare_mounts() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
    root && std::process::Command::new("unshare").arg("--version").output().is_ok()
}

/// `METHOD path` on an admin listener, with a bearer token if given: status and body.
pub async fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n");
    let response = http_raw(addr, request.as_bytes()).await;
    (status_of(&response), body_of(&response).to_owned())
}

/// The admin endpoints of `bridge` on 127.0.0.1:0; they stop when the returned token drops.
pub async fn start_admin(bridge: &TestBridge, token: Option<&str>) -> (SocketAddr, tokio_util::sync::DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = wsbridge::config::admin::AdminConfig {
        addr,
        token: token.map(str::to_owned),
        tls: None,
    };
    let stop = CancellationToken::new();
    tokio::spawn(wsbridge::admin::Admin::new(&bridge.bridge, &config).serve(listener, stop.clone()));
    (addr, stop.drop_guard())
}

/// The live sessions as an admin listener's `/sessions` lists them.
pub async fn sessions(addr: SocketAddr, token: Option<&str>) -> Vec<serde_json::Value> {
    let (status, body) = admin(addr, "GET", "/sessions", token).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Waits (up to `wait`) until the file at `path` has a line containing `what`, and returns it:
/// for a log file, a process's only output (a service's, or `--log-file`'s). Read again at each
/// short interval (nothing tells when a file grows), bounded by `wait`.
pub async fn file_line(path: &std::path::Path, what: &str, wait: Duration) -> String {
    let found = tokio::time::timeout(wait, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Some(line) = text.lines().find(|l| l.contains(what)) {
                    return line.to_owned();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "no line with {what:?} in {} within {wait:?}:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        )
    })
}
