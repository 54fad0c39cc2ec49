//! The admin listener: health, readiness, Prometheus metrics and the live sessions, on an address
//! of its own (off by default; loopback unless `[admin]` sets a token).
//!
//! | request | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when every listener accepts and no drain has started; 503 from the moment a drain starts (SIGTERM; [`crate::server::Bridge::drain`]), before any session is closed and, with `drain_delay`, while the listeners still accept, so a balancer stops sending new sessions first |
//! | `GET /metrics` | the registry of [`crate::metrics`], with the `process_*` metrics: OpenMetrics text when `Accept` asks for it (Prometheus does), else the Prometheus text format |
//! | `GET /sessions` | JSON: id, client, route, target, age, bytes each way of every live session |
//! | `DELETE /sessions/ID` or `POST /sessions/ID/close` | ends that session with 1001 "closed by the operator" |
//! | `GET /agents` | JSON: name, client address, connected since, services, idle data links, and data links dialled and returned after a session of every connected agent (agent mode) |
//!
//! `/metrics`, `/sessions` and `/agents` need `Authorization: Bearer TOKEN` when a token is configured (401
//! otherwise); the health endpoints never do: balancers probe them and they tell nothing.
//!
//! With `[admin] tls` the listener is HTTPS only (a plain request gets a 400 saying so), with
//! client certificates when `client_ca` is set; its certificate reloads as a listener's does
//! (SIGHUP, and its files watched) and its expiry is exported beside theirs.
//!
//! HTTP is the bridge's own small path ([`crate::http::request`], httparse): one request per
//! connection, the same head cap (`MAX_HEAD`), `Connection: close`. A few fixed endpoints do not need a
//! second HTTP stack (hyper's server and hyper-util) beside the one the listeners already use.
//! Bounded like every listener: [`MAX_CONNECTIONS`] at once, and the request and the answer each
//! under [`DEADLINE`]. A connection that has not sent its request yet gives its place up to a
//! newer one when none is free (the oldest of the address holding the most such places):
//! connections that send nothing (a scanner, an attacker who can reach the port) cannot keep a
//! balancer's health probe out, which sends its request at once. Only when every place is
//! answering does a connection get a prompt 503.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::admin::AdminConfig;
use crate::http::request::read_request;
use crate::server::start::StartError;
use crate::server::Bridge;
use crate::slots::{Slot, Slots};
use crate::tls::TlsListener;

/// Admin connections served at once; an operator's scraper and a person with curl need few.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a client may take to send its request (with its TLS handshake), and we to write the
/// answer.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// The admin endpoints of one bridge.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The bridge served, which also holds the token asked for ([`Bridge::admin_token`]: a
    /// reload changes it).
    bridge: Bridge,
    slots: Slots,
    /// The connections still reading their request, oldest first.
    reading: Arc<Mutex<Reading>>,
    /// `[admin] tls`: HTTPS only.
    tls: Option<Arc<TlsListener>>,
}

/// The places of connections that have not sent their request yet: held here, not by their
/// tasks, so that a newer connection can take the oldest one's at once (the task, cancelled,
/// ends on its next poll).
#[derive(Debug, Default)]
struct Reading {
    next: u64,
    /// Id, place, the connection's address, and what cancels it.
    waiting: VecDeque<(u64, Slot, std::net::IpAddr, CancellationToken)>,
}

impl Reading {
    /// Which waiting connection gives its place up: the oldest of those of the addresses that
    /// hold the most places. Oldest among ties too: a scan that took the last of equal counts
    /// evicted the newest connection, which under a flood from 16 or more addresses is a
    /// balancer's probe accepted a moment ago (an admin review: a third of the probes failed).
    /// At most MAX_CONNECTIONS of them: a scan, no table.
    fn evictee(&self) -> Option<usize> {
        let count = |a| self.waiting.iter().filter(|(_, _, b, _)| *b == a).count();
        let most = self.waiting.iter().map(|(_, _, a, _)| count(*a)).max()?;
        self.waiting.iter().position(|(_, _, a, _)| count(*a) == most)
    }
}

impl Admin {
    /// Endpoints for `bridge`, asking for `config`'s token.
    pub fn new(bridge: &Bridge, config: &AdminConfig) -> Admin {
        bridge.set_admin(config);
        Admin {
            bridge: bridge.clone(),
            slots: Slots::default(),
            reading: Arc::default(),
            tls: None,
        }
    }

    /// Serves HTTPS only, with `tls` (loaded from `[admin] tls`), which the bridge reloads with
    /// its listeners' certificates.
    pub fn with_tls(mut self, tls: Arc<TlsListener>) -> Admin {
        self.bridge.watch_tls(&tls);
        self.tls = Some(tls);
        self
    }

    /// Reads `config`'s certificate files, binds `config.addr` and serves there until `stop` is
    /// cancelled (a task on the current runtime); returns the bound address.
    ///
    /// # Errors
    /// A certificate, key or CA file that cannot be used ([`StartError::Admin`]), or the address
    /// cannot be bound.
    pub async fn spawn(bridge: &Bridge, config: &AdminConfig, stop: CancellationToken) -> Result<SocketAddr, StartError> {
        let tls = match config.tls.clone().map(TlsListener::load).transpose() {
            Ok(tls) => tls,
            Err(source) => return Err(StartError::Admin { addr: config.addr, source }),
        };
        let bind = |source| StartError::Bind {
            addr: config.addr.into(),
            source,
        };
        let listener = TcpListener::bind(config.addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let mut admin = Admin::new(bridge, config);
        if let Some(tls) = tls {
            admin = admin.with_tls(Arc::new(tls));
        }
        let client_certificates = config.requires_client_certificates();
        info!(%addr, token = config.token.is_some(), tls = config.tls.is_some(), client_certificates, "admin endpoints serving");
        tokio::spawn(admin.serve(listener, stop));
        Ok(addr)
    }

    /// Serves `listener` until `stop` is cancelled. The bridge's own shutdown does not stop it:
    /// `/readyz` must answer 503 through the drain.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                a = listener.accept() => match a {
                    // Dual-stack for `[::]` (tokio binds with the system's default): an IPv4
                    // operator as itself.
                    Ok((stream, peer)) => (stream, crate::server::canonical(peer)),
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        }
                    }
                },
            };
            // Taken before the task exists: a flood costs no task and no wait, only a closed socket.
            let Some((id, evicted)) = self.admit(peer.ip()) else {
                let _ = stream.try_write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                debug!(client = %peer, "admin connection refused: every place is answering a request");
                continue;
            };
            let this = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = evicted.cancelled() => debug!(client = %peer, "admin connection closed before its request: its place went to a newer one"),
                    _ = this.connection(stream, peer, id) => {}
                }
                this.read(id);
            });
        }
    }

    /// A place for a connection from `ip`, among those reading their request: a free one, or
    /// the oldest reader's (cancelled) of the address holding the most of them, so that one
    /// address's flood evicts its own connections and not a balancer's probe in between. `None`
    /// when every place is answering a request.
    fn admit(&self, ip: std::net::IpAddr) -> Option<(u64, CancellationToken)> {
        let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match self.slots.try_take(MAX_CONNECTIONS) {
            Some(slot) => slot,
            None => {
                let at = reading.evictee()?;
                let (_, slot, _, evicted) = reading.waiting.remove(at)?;
                evicted.cancel();
                slot
            }
        };
        let id = reading.next;
        reading.next += 1;
        let token = CancellationToken::new();
        reading.waiting.push_back((id, slot, ip, token.clone()));
        Some((id, token))
    }

    /// Connection `id` read its request (or ended): its place, unless a newer connection took it.
    fn read(&self, id: u64) -> Option<Slot> {
        let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        let at = reading.waiting.iter().position(|(i, ..)| *i == id)?;
        reading.waiting.remove(at).map(|(_, slot, _, _)| slot)
    }

    /// One connection: its TLS handshake (with `[admin] tls`), its request and the answer.
    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr, id: u64) {
        let deadline = Instant::now() + DEADLINE;
        let Some(tls) = &self.tls else {
            return self.exchange(stream, peer, id, deadline).await;
        };
        let mut first = [0u8; 1];
        match timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            Ok(_) => return debug!(client = %peer, "admin connection closed before sending anything"),
            Err(_) => return debug!(client = %peer, "admin request not sent within the deadline"),
        }
        // 0x16: a TLS handshake record. A plain request is told what to use, not left to time out.
        if first[0] != 0x16 {
            // Read first: closing a socket with its request unread would reset the connection,
            // and the reset can destroy the answer before the client reads it.
            let _ = timeout_at(deadline, read_request(&mut stream)).await;
            let _place = self.read(id);
            let reason = "this admin listener takes HTTPS only\n";
            let _ = timeout(DEADLINE, respond(&mut stream, StatusCode::BAD_REQUEST, TEXT, reason, true)).await;
            let _ = timeout(DEADLINE, stream.shutdown()).await;
            return debug!(client = %peer, "plain request on the HTTPS admin listener refused");
        }
        match timeout_at(deadline, tls.acceptor().accept(stream)).await {
            Ok(Ok(stream)) => self.exchange(stream, peer, id, deadline).await,
            Ok(Err(e)) => debug!(client = %peer, error = %e, "admin TLS handshake failed"),
            Err(_) => debug!(client = %peer, "admin TLS handshake not done within the deadline"),
        }
    }

    /// Reads the request (before `deadline`) and writes the answer.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S, peer: SocketAddr, id: u64, deadline: Instant) {
        let head = match timeout_at(deadline, read_request(&mut stream)).await {
            Ok(Ok((head, _))) => head,
            Ok(Err(e)) => {
                let _ = timeout(
                    DEADLINE,
                    respond(&mut stream, StatusCode::BAD_REQUEST, TEXT, &format!("{e}\n"), true),
                )
                .await;
                return debug!(client = %peer, error = %e, "admin request unreadable");
            }
            Err(_) => return debug!(client = %peer, "admin request not sent within the deadline"),
        };
        // Answering now: the place is this task's, out of reach of newer connections.
        let Some(_slot) = self.read(id) else { return };
        let (status, content_type, body) = self.answer(&head, peer).await;
        if status == StatusCode::UNAUTHORIZED {
            // Someone guessing the token is worth a line (at most one a 10 s): it was not seen.
            match UNAUTHORIZED.take() {
                Some(left_out) => info!(client = %peer, path = %head.uri().path(), left_out, "admin request without the right token: 401"),
                None => debug!(client = %peer, path = %head.uri().path(), "admin request without the right token: 401"),
            }
        }
        // HEAD: the GET's head, its Content-Length included (RFC 9110 §9.3.2), without the body.
        let with_body = head.method() != Method::HEAD;
        if let Err(e) = timeout(DEADLINE, respond(&mut stream, status, content_type, &body, with_body))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write deadline")))
        {
            debug!(client = %peer, error = %e, "admin answer not written");
        }
        let _ = timeout(DEADLINE, stream.shutdown()).await;
    }

    /// The answer to one request: status, content type and body.
    async fn answer(&self, request: &http::Request<()>, peer: SocketAddr) -> (StatusCode, &'static str, String) {
        let path = request.uri().path();
        let method = request.method();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let get = method == Method::GET || method == Method::HEAD;
        let web_page = match segments.as_slice() {
            ["healthz"] | ["readyz"] => None,
            _ => from_a_web_page(request, self.bridge.admin_token().is_none() && !self.client_certificates()),
        };
        match segments.as_slice() {
            ["healthz"] if get => (StatusCode::OK, TEXT, "ok\n".into()),
            ["readyz"] if get => {
                if self.bridge.is_ready() {
                    (StatusCode::OK, TEXT, "ready\n".into())
                } else if self.bridge.is_draining() {
                    (StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, TEXT, "listeners not up yet\n".into())
                }
            }
            ["healthz"] | ["readyz"] => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n".into()),
            _ if web_page.is_some() => {
                let why = web_page.unwrap_or_default();
                debug!(client = %peer, path, why, "admin request from a web page refused");
                (
                    StatusCode::FORBIDDEN,
                    TEXT,
                    format!("the admin endpoints are not for web pages ({why})\n"),
                )
            }
            _ if !self.authorized(request) => (
                StatusCode::UNAUTHORIZED,
                TEXT,
                "this endpoint needs Authorization: Bearer <the [admin] token>\n".into(),
            ),
            ["metrics"] if get => {
                self.refresh_certificates().await;
                self.bridge.refresh_files().await;
                let registry = self.bridge.agents();
                let agents = registry.list();
                let idle = agents.iter().map(|a| a.idle_links).sum();
                self.bridge.metrics().agents(agents.len(), idle, registry.link_totals());
                let bridge = &self.bridge;
                bridge.metrics().connections(bridge.connections(), bridge.max_connections());
                bridge.metrics().draining(bridge.is_draining());
                bridge.metrics().log_lines_dropped(crate::logging::lines_dropped());
                // On a blocking thread, not on one that relays sessions: the process metrics
                // read /proc, and counting 20,000 descriptors there takes milliseconds.
                let metrics = self.bridge.metrics().clone();
                let openmetrics = asks_for_openmetrics(request);
                let encode = move || match openmetrics {
                    true => metrics.encode(),
                    false => crate::metrics::text_004(&metrics.encode()),
                };
                match tokio::task::spawn_blocking(encode).await {
                    Ok(body) if openmetrics => (StatusCode::OK, OPENMETRICS, body),
                    Ok(body) => (StatusCode::OK, PROMETHEUS_TEXT, body),
                    Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, "the metrics failed\n".into()),
                }
            }
            ["sessions"] if get => {
                // Its size grows with the sessions (some 140 bytes each): written on a blocking
                // thread, not on the runtime thread that relays sessions.
                let metrics = self.bridge.metrics().clone();
                let body = tokio::task::spawn_blocking(move || sessions_json(&metrics)).await;
                match body {
                    Ok(body) => (StatusCode::OK, JSON, body),
                    Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, "the session list failed\n".into()),
                }
            }
            ["agents"] if get => (StatusCode::OK, JSON, self.agents_json()),
            ["agents", "move"] if method == Method::POST => self.move_agents(None, peer),
            ["agents", name, "move"] if method == Method::POST => self.move_agents(Some(name), peer),
            ["sessions", id] if method == Method::DELETE => self.end_session(id, peer),
            ["sessions", id, "close"] if method == Method::POST => self.end_session(id, peer),
            ["metrics"] | ["agents"] | ["sessions", ..] => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n".into()),
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }

    /// Whether only clients with a certificate from the admin's `client_ca` get this far.
    fn client_certificates(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.settings.requires_client_certificates())
    }

    fn authorized(&self, request: &http::Request<()>) -> bool {
        let Some(token) = self.bridge.admin_token() else { return true };
        // The scheme's name in any case (RFC 9110 §11.1: `bearer` is `Bearer`).
        let given = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        given.is_some_and(|g| tokens_match(g, &token))
    }

    fn agents_json(&self) -> String {
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let agents: Vec<_> = self
            .bridge
            .agents()
            .list()
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name,
                    "client": a.addr.to_string(),
                    "connected_since": unix(a.since),
                    "connected_seconds": a.since.elapsed().map_or(0.0, |d| d.as_secs_f64()),
                    "services": a.services,
                    "idle_links": a.idle_links,
                    "links_dialled": a.links_dialled,
                    "links_returned": a.links_returned,
                    "instance": self.bridge.agents().instance(),
                })
            })
            .collect();
        let mut body = serde_json::Value::Array(agents).to_string();
        body.push('\n');
        body
    }

    /// `POST /agents/move`, `POST /agents/NAME/move`: the agents connect again through the
    /// balancer (to the instance it sends them to now) and then let this instance go, their
    /// sessions here going on: after a failover, the way back to the instance that returned.
    fn move_agents(&self, name: Option<&str>, peer: SocketAddr) -> (StatusCode, &'static str, String) {
        let asked = self.bridge.agents().move_agents(name);
        if asked == 0 {
            if let Some(name) = name {
                return (StatusCode::NOT_FOUND, TEXT, format!("agent {name:?} is not connected here\n"));
            }
        }
        info!(asked, agent = name.unwrap_or("(all)"), operator = %peer, "agents asked to move by the operator");
        (StatusCode::OK, JSON, format!("{}\n", serde_json::json!({ "asked": asked })))
    }

    fn end_session(&self, id: &str, peer: SocketAddr) -> (StatusCode, &'static str, String) {
        let Some(session) = id.parse::<u64>().ok().and_then(|id| self.bridge.metrics().sessions.get(id)) else {
            return (StatusCode::NOT_FOUND, TEXT, format!("no live session {id:?}\n"));
        };
        info!(
            session = session.id,
            route = session.route.as_str(),
            client = %crate::logging::Client(session.client),
            operator = %peer,
            "session ended by the operator"
        );
        session.end_by_operator();
        (
            StatusCode::OK,
            JSON,
            format!("{}\n", serde_json::json!({"id": session.id, "closing": true})),
        )
    }

    /// Sets the seconds left on each listener's certificate in service (not the file on disk: a
    /// renewal whose reload failed leaves the old certificate in service, and an alert on the
    /// file's dates would go quiet just when the one clients see runs out).
    async fn refresh_certificates(&self) {
        let metrics = self.bridge.metrics();
        for l in self.bridge.tls_listeners() {
            for (file, left) in l.expiry() {
                metrics.certificate_expiry(&file.display().to_string(), left as f64);
            }
        }
    }
}

/// Whether the token a request gave is the admin token. Their SHA-256 digests are compared, in
/// constant time: `ct_eq` on the tokens themselves answers at once when their lengths differ,
/// which would tell a prober the token's length.
fn tokens_match(given: &str, token: &str) -> bool {
    let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
    bool::from(digest(given).as_ref().ct_eq(digest(token).as_ref()))
}

/// `GET /sessions`: every live session, oldest first, as a JSON array (serialized straight from
/// the table, without a `serde_json::Value` tree: 5,000 sessions take a few milliseconds).
fn sessions_json(metrics: &crate::metrics::Metrics) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        id: u64,
        client: String,
        route: &'a str,
        target: &'a str,
        age_seconds: f64,
        bytes_up: u64,
        bytes_down: u64,
    }
    let sessions = metrics.sessions.list();
    let entries: Vec<Entry<'_>> = sessions
        .iter()
        .map(|s| Entry {
            id: s.id,
            client: crate::logging::Client(s.client).to_string(),
            route: &s.route,
            target: &s.target,
            age_seconds: s.started.elapsed().as_secs_f64(),
            bytes_up: s.bytes_up.load(Relaxed),
            bytes_down: s.bytes_down.load(Relaxed),
        })
        .collect();
    // A list of plain fields always serializes.
    let mut body = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".to_owned());
    body.push('\n');
    body
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// What prometheus-client writes (OpenMetrics text), to a scraper that asks for it (Prometheus
/// does, first).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, to every other client ([`crate::metrics::text_004`]).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether `request`'s Accept prefers OpenMetrics text: named with a quality above 0 and not
/// below the Prometheus text format's (`text/plain`), as Prometheus's scrapes ask by default
/// (a `scrape_protocols` that puts the text format first ranks it higher, and gets it); curl's
/// `*/*` and `promtool`'s readers get the Prometheus text format, as the Prometheus client
/// libraries answer them.
fn asks_for_openmetrics(request: &http::Request<()>) -> bool {
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    let accepted = request
        .headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    for range in accepted.flat_map(|accept| accept.split(',')) {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or("");
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        if kind.eq_ignore_ascii_case("application/openmetrics-text") {
            openmetrics = openmetrics.max(q);
        } else if kind.eq_ignore_ascii_case("text/plain") {
            text = text.max(q);
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// Why `request` looks sent by a web page a browser loaded, which the endpoints past the health
/// checks never answer: a page elsewhere could otherwise end sessions or move agents (a POST
/// with no body needs no CORS preflight), and a page whose name it re-binds to 127.0.0.1 could
/// read `/sessions` as its own origin. Scrapers and curl send none of these; an address typed
/// into the browser (`Sec-Fetch-Site: none`) is no page's request. `unguarded` (no token, no
/// client certificates: a loopback admin), also a Host that is not an IP address or
/// `localhost`: the name of a re-bound page, from a browser too old to send `Sec-Fetch-Site`.
fn from_a_web_page(request: &http::Request<()>, unguarded: bool) -> Option<&'static str> {
    let headers = request.headers();
    if headers.contains_key(http::header::ORIGIN) {
        return Some("an Origin header");
    }
    if headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes() != b"none") {
        return Some("Sec-Fetch-Site");
    }
    if unguarded {
        let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(name, _)| name),
        };
        if !host.is_empty() && name.parse::<std::net::IpAddr>().is_err() && !is_loopback_name(name) {
            return Some("a Host name other than localhost, with no token asked for");
        }
    }
    None
}

/// Whether `name` is one of the loopback names a machine's own clients use: `localhost` and its
/// subdomains (RFC 6761), with or without the final dot, and the aliases Debian's and Red Hat's
/// /etc/hosts give ::1 and 127.0.0.1.
fn is_loopback_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || [
            "localhost.localdomain",
            "localhost4",
            "localhost4.localdomain4",
            "localhost6",
            "localhost6.localdomain6",
            "ip6-localhost",
            "ip6-loopback",
        ]
        .contains(&name.as_str())
}

/// Admin requests refused for their token: said at info at most once per 10 s.
static UNAUTHORIZED: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));

async fn respond<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    io.write_all(head.as_bytes()).await?;
    if with_body {
        io.write_all(body.as_bytes()).await?;
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::{from_a_web_page, tokens_match};

    /// The place given up is the oldest of the busiest addresses', and with one place each the
    /// oldest of all: never the connection accepted last (a balancer's probe, whose request is
    /// on its way).
    #[test]
    fn the_oldest_waiting_connection_of_the_busiest_address_gives_its_place_up() {
        use super::Reading;
        let ip = |n: u8| std::net::IpAddr::from([127, 0, 0, n]);
        let mut reading = Reading::default();
        for n in 2..18 {
            reading
                .waiting
                .push_back((u64::from(n), crate::slots::Slot::alone(), ip(n), Default::default()));
        }
        assert_eq!(reading.evictee(), Some(0), "one each: the oldest of all");
        reading
            .waiting
            .push_back((30, crate::slots::Slot::alone(), ip(9), Default::default()));
        assert_eq!(reading.evictee(), Some(7), "127.0.0.9 holds two: its oldest");
    }

    #[test]
    fn a_loopback_admin_answers_the_machines_own_names_and_refuses_others() {
        let ask = |host: Option<&str>| {
            let mut request = http::Request::builder().uri("/sessions");
            if let Some(host) = host {
                request = request.header(http::header::HOST, host);
            }
            from_a_web_page(&request.body(()).unwrap(), true)
        };
        for local in [
            None,
            Some("127.0.0.1:9100"),
            Some("[::1]:9100"),
            Some("localhost"),
            Some("LocalHost:9100"),
            Some("localhost.:9100"),
            Some("grafana.localhost:9100"),
            Some("localhost.localdomain"),
            Some("ip6-localhost:9100"),
            Some("localhost6.localdomain6"),
            Some("10.0.0.11:9100"),
        ] {
            assert_eq!(ask(local), None, "{local:?}");
        }
        for page in [
            "rebound.example:9100",
            "localhost.example.com",
            "notlocalhost",
            "ip6-localhost.evil",
            "localhost6.evil.example",
        ] {
            assert!(ask(Some(page)).is_some(), "{page}");
        }
        // With a token or client certificates, any name (the token is the guard).
        let named = http::Request::builder()
            .uri("/metrics")
            .header(http::header::HOST, "wsbridge-1.internal:9100")
            .body(())
            .unwrap();
        assert_eq!(from_a_web_page(&named, false), None);
    }

    #[test]
    fn tokens_compare_by_digest() {
        let token = "s3cret-admin-token";
        assert!(tokens_match(token, token));
        assert!(!tokens_match("s3cret-admin-tokeN", token), "same length, one byte differs");
        assert!(!tokens_match("s3cret", token), "a prefix");
        assert!(!tokens_match("s3cret-admin-token-and-more", token), "longer");
        assert!(!tokens_match("", token));
        assert!(tokens_match("", ""));
    }
}
