//! Accepting connections and running each one to its end.
//!
//! The caller binds (tests bind `127.0.0.1:0` and pass the listener in, so the bridge is ready by
//! construction) and hands the listeners to [`Bridge::serve`]. Each accepted connection gets its
//! own task and tracing span; nothing a connection does can end the accept loop. The connection's
//! life, each phase under its own deadline:
//!
//! 1. handshake (`timeouts.handshake`): read the request head, answer HTTP, or write `101`;
//! 2. backend connect (`timeouts.connect`): failure closes the WebSocket with 1014 and a reason;
//! 3. relay ([`crate::relay`]): idle, lifetime, keepalive and shutdown deadlines;
//! 4. close (`timeouts.close`): waiting for the client's close frame.
//!
//! Shutdown: cancelling the token stops the accept loops; sessions close with 1001 after flushing;
//! [`Bridge::serve`] returns when every task is done or `timeouts.shutdown_grace` has passed.
//! Behind a load balancer, [`Bridge::drain`] comes first: readiness turns false at once while the
//! listeners keep accepting for `timeouts.drain_delay`, so the balancer sees the 503 on `/readyz`
//! and moves new sessions elsewhere before this bridge stops taking them.
//!
//! [`start`] starts a server as the binary does: open-file limit, runtime threads, binding.

pub mod start;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Config, ListenerConfig, Timeouts};
use crate::http::request::{answer, answer_text, linger};
use crate::http::{Context, Outcome, Upgrade, Web, WebGuard, WebRoot};
use crate::metrics::{ProxyRefusal, Refusal};
use crate::policy::{AddressLimits, OriginRule, PerAddress, Staged};
use crate::relay::{self, SessionParams};
use crate::routes::{Route, RouteTable};
use crate::slots::{Held, Place, Slots};
use crate::tls::{TlsError, TlsListener};

/// Why the bridge could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A token source could not be read.
    #[error("{0}")]
    Tokens(String),
}

/// What can change on reload: everything but the listeners. Caps count across reloads: the
/// counts live in [`Inner::connections`] and in the routes' [`Slots`], carried from table to table.
#[derive(Debug)]
struct Live {
    routes: RouteTable,
    timeouts: Timeouts,
    max_connections: usize,
    /// Sessions and new sessions per client address over every route, when capped.
    per_ip: Option<Arc<PerAddress>>,
    /// Connections per client address, counted from accept, when capped.
    connections_per_ip: Option<Arc<PerAddress>>,
    /// Connections past their address's cap let in to log in an agent ([`place`]),
    /// when that cap is on and an agent endpoint is configured.
    agent_logins: Option<Arc<PerAddress>>,
    /// Origins admitted where neither a route nor its listener says.
    default_origins: Vec<OriginRule>,
    /// Some route sends its backend a PROXY header, which names the address the client reached.
    proxy_headers: bool,
    /// Agent mode: connected agents; the same registry from table to table.
    agents: Arc<crate::agent::Registry>,
    /// What a listener's static files ask of a request (`web_auth`), by the listener's address;
    /// `None` for a listener that asks nothing. A listener a reloaded file no longer lists keeps
    /// serving (listeners change with a restart), with the guard it had.
    web_guards: HashMap<String, Option<Arc<WebGuard>>>,
    /// New limits for the tables above kept from the configuration before a reload: in force
    /// once all of this one was built ([`Live::commit`]).
    staged: Vec<Staged>,
}

/// The bridge: configuration in force, shutdown signal and the set of running connections.
#[derive(Debug, Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
    /// The shutdown signal as the connections of one [`Bridge::serve`] call (one runtime thread)
    /// watch it: a child of [`Inner::shutdown`]. A session polls it at every wake-up, and a
    /// token's state sits behind a mutex: one per thread keeps the threads off each other's lock.
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    /// Swapped whole on reload; a connection keeps the snapshot it started with.
    live: RwLock<Arc<Live>>,
    /// Open connections, counted against `max_connections` of the configuration in force.
    connections: Slots,
    /// Refusals past the cap that are lingering now, up to [`LINGERING_REFUSALS`].
    refusals: Slots,
    /// Cancelled on shutdown; every task watches it.
    shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// The listeners as they were started: a reload cannot change them, and says which of its
    /// changes to them wait for a restart ([`Bridge::waiting_for_restart`]).
    listeners: Vec<ListenerConfig>,
    /// The admin listener's address, the token it asks for and its TLS settings, once it runs
    /// ([`Bridge::set_admin`]); a reload changes the token.
    admin: RwLock<Option<crate::config::admin::AdminConfig>>,
    /// The admin listener's address came from the command line (`--admin`), which a reload does
    /// not read ([`Bridge::admin_address_from_flag`]).
    admin_from_flag: std::sync::atomic::AtomicBool,
    /// Cancelled when the shutdown grace period is over: the sessions still open end at once,
    /// each with its log line, before the runtime drops what is left.
    abort: CancellationToken,
    /// The TLS listeners being served, for SIGHUP.
    tls: Mutex<Vec<Arc<TlsListener>>>,
    /// Failed authentications per client address, across reloads: the brake on guessing.
    failures: Arc<PerAddress>,
    /// Token lookups in flight per client address, holding tries of `failures`.
    lookups: crate::policy::Lookups,
    /// Counters, gauges and the live-session table (the admin listener reads them).
    metrics: Arc<crate::metrics::Metrics>,
    /// Every listener's accept loop runs: half of readiness (the other half: not draining).
    serving: std::sync::atomic::AtomicBool,
    /// A drain has started ([`Bridge::drain`]): not ready, though still accepting until the
    /// shutdown token is cancelled.
    draining: std::sync::atomic::AtomicBool,
}

/// Failed authentications an address may make at once, and how fast they are forgiven: ten,
/// then one every six seconds (slow enough that guessing a token or password is hopeless, fast
/// enough that a person who mistyped is not locked out for long).
const AUTH_FAILURES: AddressLimits = AddressLimits {
    max_sessions: None,
    rate: Some(1.0 / 6.0),
    burst: 10,
    connections: false,
};

/// Failed attempts from one IPv6 /48 across its /64s (each of which has [`AUTH_FAILURES`] of its
/// own): ten addresses' worth at once, forgiven ten times as fast as one address's, so that an
/// office or a provider's customers in one /48 are not slowed by one another's typos, while a
/// client that takes a new /64 for each guess gets no more than that.
const NETWORK_FAILURES: AddressLimits = AddressLimits {
    max_sessions: None,
    rate: Some(10.0 / 6.0),
    burst: 100,
    connections: false,
};

/// Who a connection comes from: the client's address (from a PROXY header on a listener that
/// takes one, else the TCP peer's; `X-Forwarded-For` refines it later on a listener that trusts
/// proxies) and, when a route sends its backend a PROXY header, the address it reached.
#[derive(Debug, Clone, Copy)]
struct Peer {
    client: SocketAddr,
    local: Option<SocketAddr>,
    /// The connection is TLS (a same-origin check's default port is then 443).
    secure: bool,
    /// Its socket's send queue, which the session's relay asks when the client seems to have
    /// stopped reading.
    queue: crate::platform::SendQueue,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Every connection finished within the grace period.
    pub clean: bool,
    /// Connections still running when the grace period ended.
    pub remaining: usize,
}

impl Bridge {
    /// A bridge for `config`, with its token sources read.
    ///
    /// # Errors
    /// An invalid configuration or an unreadable token source.
    pub fn new(config: &Config) -> Result<Bridge, BridgeError> {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let mut live = Live::from_config(config, None, &metrics)?;
        live.commit();
        live.routes.export_configured();
        let connections = Slots::default();
        live.agents.count_connections(&connections, live.max_connections);
        let shutdown = CancellationToken::new();
        metrics.config_in_force(config);
        Ok(Bridge {
            inner: Arc::new(Inner {
                live: RwLock::new(Arc::new(live)),
                connections,
                refusals: Slots::default(),
                shutdown: shutdown.clone(),
                tracker: TaskTracker::new(),
                abort: CancellationToken::new(),
                listeners: config.listeners.clone(),
                admin: RwLock::default(),
                admin_from_flag: std::sync::atomic::AtomicBool::new(false),
                tls: Mutex::default(),
                failures: PerAddress::with_networks(AUTH_FAILURES, 4096, NETWORK_FAILURES),
                lookups: crate::policy::Lookups::default(),
                metrics,
                serving: Default::default(),
                draining: Default::default(),
            }),
            shutdown,
        })
    }

    /// Replaces routes, tokens, timeouts and caps for new connections; live sessions keep theirs
    /// and still count against the new caps (a route keeps its count if its path, token or token
    /// file is still configured).
    ///
    /// # Errors
    /// The new configuration is unusable; the old one stays in force.
    pub fn reload(&self, config: &Config) -> Result<(), BridgeError> {
        // Built while the old table serves; swapped whole. Sessions that start between the build
        // and the swap count on the shared slots either way. The tables per client address it
        // shares with the old one take their new limits only now that all of it was built (a
        // failed build leaves them as they were); not under the lock, since a table may be
        // resized, and every new connection reads the configuration in force.
        let mut live = Live::from_config(config, Some(&self.live()), &self.inner.metrics)?;
        live.agents.count_connections(&self.inner.connections, live.max_connections);
        live.commit();
        live.routes.export_configured();
        *self.inner.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        crate::metrics::file_sources_reloaded();
        self.inner.metrics.config_in_force(config);
        if let Some(new) = &config.admin {
            let mut admin = self.inner.admin.write().unwrap_or_else(|p| p.into_inner());
            if let Some(running) = admin.as_mut() {
                match &new.token {
                    Some(t) => running.token = Some(t.clone()),
                    // Beside `--admin` off loopback the file's token was the only guard: kept.
                    None if running.token.is_some() && !running.addr.ip().is_loopback() => warn!(
                        admin = %running.addr,
                        "the reloaded [admin] has no token: the admin listener, off loopback, keeps the one it had"
                    ),
                    None => running.token = None,
                }
            }
        }
        Ok(())
    }

    /// The admin listener runs as `config` says (a reload with an `[admin]` table changes its
    /// token; its TLS settings wait for a restart).
    pub fn set_admin(&self, config: &crate::config::admin::AdminConfig) {
        *self.inner.admin.write().unwrap_or_else(|p| p.into_inner()) = Some(config.clone());
    }

    /// The admin listener's address was given on the command line (`--admin`, which wins over
    /// the file's): a reloaded file without `[admin]`, or with another address, changes nothing
    /// that waits for a restart.
    pub fn admin_address_from_flag(&self) {
        self.inner.admin_from_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Re-reads the token files and credentials files (routes' and static files' `auth`) that
    /// changed since they were last read (a metrics scrape asks, so that a broken file is seen
    /// without waiting for a client's lookup).
    pub async fn refresh_files(&self) {
        let live = self.live();
        live.routes.refresh_files().await;
        for guard in live.web_guards.values().flatten() {
            if let Some(auth) = &guard.auth {
                auth.refresh().await;
            }
        }
    }

    /// The token the admin endpoints ask for now.
    pub fn admin_token(&self) -> Option<String> {
        self.inner
            .admin
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|a| a.token.clone())
    }

    /// What `config`, just reloaded, changes that only a restart puts in force: its listeners
    /// (added, removed, or any setting but `web_auth`, which a reload applies), each named with
    /// the settings that changed. The listeners as started go on serving as they were.
    pub fn waiting_for_restart(&self, config: &Config) -> Vec<String> {
        let running = &self.inner.listeners;
        let mut waiting = Vec::new();
        for new in &config.listeners {
            match running.iter().find(|l| l.addr.to_string() == new.addr.to_string()) {
                None => waiting.push(format!("listener {}: added to the file; it is served after a restart", new.addr)),
                Some(old) => {
                    let changed = listener_changes((old, running), (new, &config.listeners));
                    if !changed.is_empty() {
                        waiting.push(format!(
                            "listener {}: {} changed in the file; in force after a restart (until then it serves as it was started)",
                            new.addr,
                            changed.join(", ")
                        ));
                    }
                }
            }
        }
        let admin = self.inner.admin.read().unwrap_or_else(|p| p.into_inner());
        let flag = self.inner.admin_from_flag.load(std::sync::atomic::Ordering::Relaxed);
        match (admin.as_ref(), config.admin.as_ref()) {
            _ if flag => {}
            (Some(running), None) => waiting.push(format!(
                "admin listener: [admin] removed from the file; it serves on at {} until a restart",
                running.addr
            )),
            (None, Some(new)) => waiting.push(format!(
                "admin listener: [admin] added to the file; it listens at {} after a restart",
                new.addr
            )),
            (Some(running), Some(new)) if running.addr != new.addr => waiting.push(format!(
                "admin listener: addr changed in the file to {}; it serves on at {} until a restart",
                new.addr, running.addr
            )),
            _ => {}
        }
        if let Some(running) = admin.as_ref() {
            if config.admin.as_ref().and_then(|a| a.tls.as_ref()) != running.tls.as_ref() {
                waiting.push(
                    "admin listener: tls changed in the file; in force after a restart (until then it serves as it was \
                     started; its certificate files themselves reload)"
                        .to_owned(),
                );
            }
        }
        for old in running {
            if !config.listeners.iter().any(|l| l.addr.to_string() == old.addr.to_string()) {
                waiting.push(format!(
                    "listener {}: no longer in the file; it serves on until a restart",
                    old.addr
                ));
            }
        }
        waiting
    }

    /// Agent mode: the connected agents (kept across reloads).
    pub fn agents(&self) -> Arc<crate::agent::Registry> {
        self.live().agents.clone()
    }

    /// The bridge's metrics and live sessions.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    /// Ready for new sessions: listeners accepting and no drain started. Turns false the moment
    /// a drain starts ([`Bridge::drain`]) or the shutdown token is cancelled, before any session
    /// is closed.
    pub fn is_ready(&self) -> bool {
        self.inner.serving.load(std::sync::atomic::Ordering::Acquire) && !self.is_draining()
    }

    /// A drain has started: [`Bridge::drain`] was called or the shutdown token is cancelled.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(std::sync::atomic::Ordering::Acquire) || self.inner.shutdown.is_cancelled()
    }

    /// Shuts down the way a load balancer needs: readiness turns false at once (`/readyz`
    /// answers 503), the listeners keep accepting and sessions keep running for
    /// `timeouts.drain_delay` (sessions the balancer still sends before its health check sees the
    /// 503 are served, not refused), then the shutdown token is cancelled: listeners close and
    /// sessions end with 1001 after what is in flight. `hurry` cuts the delay short (a second
    /// SIGTERM). Without a delay the token is cancelled at once. Returns when it is cancelled;
    /// [`Bridge::serve`] then drains under `timeouts.shutdown_grace`.
    pub async fn drain(&self, hurry: impl std::future::Future<Output = ()>) {
        self.inner.draining.store(true, std::sync::atomic::Ordering::Release);
        if let Some(delay) = self.live().timeouts.drain_delay {
            // Agents move now, while this instance still serves, not when its sessions end
            // (without a delay they are told `drain` at once).
            self.live().agents.leave();
            info!(
                ?delay,
                "draining: /readyz answers 503; still accepting for the drain delay, then closing sessions"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = hurry => info!("drain delay cut short"),
                _ = self.inner.shutdown.cancelled() => {}
            }
        }
        // How many are closed with 1001 from here: the metrics of the drain's end are seldom
        // scraped, as the admin listener goes with the last session (a fleet review).
        info!(
            sessions = self.inner.metrics.sessions.count(),
            "shutting down: no new connections; closing sessions"
        );
        self.inner.shutdown.cancel();
    }

    /// Connections open now (sessions and handshakes), counted against `max_connections`.
    pub fn connections(&self) -> usize {
        self.inner.connections.taken()
    }

    /// The cap on [`Bridge::connections`] in force (`max_connections`, after the open-file fit).
    pub fn max_connections(&self) -> usize {
        self.live().max_connections
    }

    /// The TLS listeners being served (for certificate expiry).
    pub fn tls_listeners(&self) -> Vec<Arc<TlsListener>> {
        self.inner.tls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The token that stops the bridge when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    fn live(&self) -> Arc<Live> {
        self.inner.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts `tls` among the listeners' certificates: watched for changes (until the shutdown
    /// starts), reloaded by [`Bridge::reload_tls`], their expiry exported. Once per listener,
    /// though several runtime threads serve siblings of one.
    pub fn watch_tls(&self, tls: &Arc<TlsListener>) {
        let mut known = self.inner.tls.lock().unwrap_or_else(|p| p.into_inner());
        if !known.iter().any(|k| Arc::ptr_eq(k, tls)) {
            tls.spawn_watcher(self.inner.shutdown.clone());
            known.push(tls.clone());
        }
    }

    /// Re-reads every listener's certificate files (SIGHUP); each listener that fails keeps its
    /// old certificate. Returns the failures.
    pub fn reload_tls(&self) -> Vec<crate::tls::TlsError> {
        let listeners = self.inner.tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut failed = Vec::new();
        for t in &listeners {
            let result = t.reload();
            let files = &t.settings.default;
            if result.is_ok() {
                tracing::info!(cert = %files.cert.display(), "certificate re-read; in service for new connections");
            }
            crate::metrics::certificate_reloaded(&files.cert, files.key.as_deref(), result.is_ok(), false);
            failed.extend(result.err());
        }
        if !listeners.is_empty() {
            self.inner.metrics.certificates_reloaded(failed.is_empty());
        }
        failed
    }

    /// Serves `listeners` until the shutdown token is cancelled, then drains.
    pub async fn serve(&self, listeners: Vec<Listener>) -> Drained {
        let this = Bridge {
            inner: self.inner.clone(),
            shutdown: self.inner.shutdown.child_token(),
        };
        for listener in listeners {
            if let Some(tls) = &listener.tls {
                self.watch_tls(tls);
            }
            let bridge = this.clone();
            self.inner.tracker.spawn(async move { bridge.accept_loop(listener).await });
        }
        self.inner.serving.store(true, std::sync::atomic::Ordering::Release);
        self.inner.shutdown.cancelled().await;
        self.inner.tracker.close();
        let grace = self.live().timeouts.shutdown_grace;
        let clean = timeout(grace, self.inner.tracker.wait()).await.is_ok();
        let remaining = self.inner.tracker.len();
        if !clean {
            warn!(remaining, ?grace, "shutdown grace period over; ending the remaining connections");
            // Sessions end at once and say so; what does not end by itself in a moment (a
            // handshake, an agent's link) is dropped with the runtime.
            self.inner.abort.cancel();
            let _ = timeout(ABORT_WAIT, self.inner.tracker.wait()).await;
        }
        Drained { clean, remaining }
    }

    async fn accept_loop(self, mut listener: Listener) {
        let Some(socket) = listener.socket.take() else {
            return warn!(addr = %listener.config.addr, "listener was never bound");
        };
        let listener = Arc::new(listener);
        match socket {
            Socket::Tcp(socket) => {
                let local = socket.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
                let s = &socket;
                self.accept_each(
                    || s.accept(),
                    |(stream, peer)| self.spawn_tcp(stream, canonical(peer), &listener, &local),
                )
                .await;
            }
            #[cfg(unix)]
            Socket::Unix(socket) => {
                let local = listener.config.addr.to_string();
                let s = &socket;
                self.accept_each(|| s.accept(), |(stream, _)| self.spawn_unix(stream, &listener, &local))
                    .await;
            }
        }
    }

    /// Accepts with `accept` and hands each connection to `each` until shutdown. Accept errors
    /// (EMFILE and friends) back off instead of spinning.
    async fn accept_each<T, A, F>(&self, mut accept: A, mut each: impl FnMut(T))
    where
        A: FnMut() -> F,
        F: std::future::Future<Output = std::io::Result<T>>,
    {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                a = accept() => a,
            };
            match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(5);
                    each(a);
                }
                Err(e) => {
                    // EMFILE and friends: wait for connections to end instead of spinning.
                    warn!(error = %e, ?backoff, "accept failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Runs one accepted TCP connection in its own task and span.
    fn spawn_tcp(&self, stream: TcpStream, peer: SocketAddr, listener: &Arc<Listener>, local: &str) {
        // Behind a load balancer the TCP peer is the balancer: `client` is recorded once the
        // PROXY header or a trusted X-Forwarded-For names the real one, and `via` keeps the
        // peer. (Two spans of the same fields: a field recorded later is printed last.)
        let access = &listener.config.access;
        let span = match access.proxy_protocol || !access.trusted_proxies.is_empty() {
            true => conn_span(None, Some(&peer), local),
            false => conn_span(Some(&peer), None, local),
        };
        let bridge = self.clone();
        let listener = listener.clone();
        let connection = async move { bridge.connection(stream, peer, &listener).await };
        self.inner.tracker.spawn(connection.instrument(span));
    }

    /// Runs one connection accepted on a unix socket in its own task and span: `client=unix`
    /// until a PROXY header or a trusted X-Forwarded-For names the client.
    #[cfg(unix)]
    fn spawn_unix(&self, stream: tokio::net::UnixStream, listener: &Arc<Listener>, local: &str) {
        let span = conn_span(Some(&"unix"), None, local);
        let bridge = self.clone();
        let listener = listener.clone();
        let connection = async move { bridge.unix_connection(stream, &listener).await };
        self.inner.tracker.spawn(connection.instrument(span));
    }

    /// One connection accepted on a unix socket: the connection cap, the PROXY header if the
    /// listener takes one, the per-address cap, then HTTP (a unix listener has no TLS: the proxy
    /// in front terminates it). The client counts as [`UNIX_CLIENT`] until a PROXY header or a
    /// trusted X-Forwarded-For names it.
    #[cfg(unix)]
    async fn unix_connection(self, mut stream: tokio::net::UnixStream, listener: &Listener) {
        let live = self.live();
        let deadline = Instant::now() + live.timeouts.handshake;
        let Some(slot) = self.inner.connections.try_take(live.max_connections) else {
            // A local peer: no flood from afar to guard against, so every refusal is answered.
            let retry = [(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"))];
            let (status, reason) = (http::StatusCode::SERVICE_UNAVAILABLE, "too many connections");
            let _ = timeout(Duration::from_secs(1), answer(&mut stream, status, reason, &retry)).await;
            self.inner.metrics.refused(crate::metrics::Refusal::ConnectionLimit);
            return self.at_cap(live.max_connections);
        };
        let mut peer = Peer {
            client: UNIX_CLIENT,
            local: live.proxy_headers.then_some(UNIX_CLIENT),
            secure: false,
            queue: crate::platform::SendQueue::of(&stream),
        };
        if listener.config.access.proxy_protocol && !self.read_proxy_header(&mut stream, &mut peer, listener, &live, deadline).await {
            return;
        }
        let held = match forwards_clients(&listener.config.access, peer.client.ip()) {
            true => Held::new(slot, Place::Uncounted),
            false => match place(&live, peer.client.ip()) {
                Ok(place) => Held::new(slot, place),
                Err(r) => return self.answer_per_ip(&mut stream, &r).await,
            },
        };
        Box::pin(self.http(stream, held, peer, listener, &live, deadline, None)).await;
    }

    /// Reads the PROXY header a listener with `proxy_protocol` requires and puts the client (and
    /// the address it reached) in `peer`. False when the connection is refused (logged).
    async fn read_proxy_header<S>(&self, stream: &mut S, peer: &mut Peer, listener: &Listener, live: &Live, deadline: Instant) -> bool
    where
        S: AsyncRead + Unpin,
    {
        let trusted = &listener.config.access.trusted_proxies;
        if !trusted.is_empty() && !trusted.iter().any(|n| n.contains(&peer.client.ip().to_canonical())) {
            // Only the load balancers may say who the client is.
            self.inner.metrics.refused(Refusal::Proxy(ProxyRefusal::Untrusted));
            match PROXY_REFUSED.take() {
                Some(left_out) => warn!(
                    left_out,
                    "connection refused: PROXY protocol header from a peer not in trusted_proxies"
                ),
                None => debug!("connection refused: PROXY protocol header from a peer not in trusted_proxies"),
            }
            return false;
        }
        match tokio::time::timeout_at(deadline, crate::proxy::read_addresses(stream)).await {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(a))) => {
                peer.client = canonical(a.client);
                // What the client reached is the balancer's address, not ours.
                if peer.local.is_some() {
                    peer.local = Some(canonical(a.destination));
                }
            }
            Ok(Err(e)) => {
                self.inner.metrics.refused(Refusal::Proxy(ProxyRefusal::Malformed));
                match PROXY_REFUSED.take() {
                    Some(left_out) => warn!(error = %e, left_out, "connection refused: bad PROXY protocol header"),
                    None => debug!(error = %e, "connection refused: bad PROXY protocol header"),
                }
                return false;
            }
            Err(_) => {
                self.inner.metrics.refused(Refusal::Proxy(ProxyRefusal::Timeout));
                let timeout = live.timeouts.handshake;
                match PROXY_REFUSED.take() {
                    Some(left_out) => warn!(
                        ?timeout,
                        left_out, "connection refused: no PROXY protocol header within the handshake deadline"
                    ),
                    None => debug!(
                        ?timeout,
                        "connection refused: no PROXY protocol header within the handshake deadline"
                    ),
                }
                return false;
            }
        }
        tracing::Span::current().record("client", tracing::field::display(peer.client));
        true
    }

    /// One accepted connection: the connection cap, then TLS when the first byte says so.
    async fn connection(self, mut stream: TcpStream, peer: SocketAddr, listener: &Listener) {
        let live = self.live();
        let Some(slot) = self.inner.connections.try_take(live.max_connections) else {
            // Boxed: this rare path's state would otherwise widen every connection's task.
            return Box::pin(self.refuse_over_cap(stream)).await;
        };
        // Small messages (keystrokes, VNC input) must not wait for Nagle, and a vanished client
        // must not hold its backend (`client_options`). On Linux an accepted socket inherits
        // these from the listening socket: no system call per connection.
        if !cfg!(target_os = "linux") {
            let _ = client_options(socket2::SockRef::from(&stream));
        }
        #[cfg(target_os = "linux")]
        if let Some(ping) = live.timeouts.ping_interval {
            // Pings slower than the default: the user timeout must not cut before their deadline.
            let dead = ping.saturating_add(live.timeouts.pong_timeout);
            if dead > CLIENT_USER_TIMEOUT {
                let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(dead));
            }
        }
        // One deadline covers the PROXY header, TLS and the upgrade: a silent client cannot hold
        // a slot.
        let deadline = Instant::now() + live.timeouts.handshake;
        let mut peer = Peer {
            client: peer,
            local: if live.proxy_headers {
                stream.local_addr().ok().map(canonical)
            } else {
                None
            },
            secure: false,
            queue: crate::platform::SendQueue::of(&stream),
        };
        if listener.config.access.proxy_protocol && !self.read_proxy_header(&mut stream, &mut peer, listener, &live, deadline).await {
            return;
        }
        // One address may not hold every connection slot (slow heads, reconnecting at each
        // deadline): counted from here, once the PROXY header has named it; past it, a few
        // places to log in agents ([`place`]). Not a proxy whose X-Forwarded-For is believed:
        // its connections are its clients', which the caps per address on sessions count.
        let held = match forwards_clients(&listener.config.access, peer.client.ip()) {
            true => Held::new(slot, Place::Uncounted),
            false => match place(&live, peer.client.ip()) {
                Ok(place) => Held::new(slot, place),
                Err(r) => return Box::pin(self.refuse_per_ip(stream, r)).await,
            },
        };
        let Some(tls) = &listener.tls else {
            return Box::pin(self.http(stream, held, peer, listener, &live, deadline, None)).await;
        };
        // The TLS path lives in its own boxed future: its states (a whole TLS connection among
        // them) would otherwise widen every plain session's task.
        Box::pin(self.maybe_tls(stream, held, peer, tls, listener, &live, deadline)).await;
    }

    /// Answers a connection past the cap with 503. While few refusals are in flight each one
    /// lingers (see [`linger`]); past [`LINGERING_REFUSALS`], a flood must not hold a descriptor
    /// per refused client for a second, so the answer goes out at once ([`refuse_at_once`]).
    async fn refuse_over_cap(&self, mut stream: TcpStream) {
        let retry = [(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"))];
        let (status, reason) = (http::StatusCode::SERVICE_UNAVAILABLE, "too many connections");
        match self.inner.refusals.try_take(LINGERING_REFUSALS) {
            Some(_lingering) => {
                let _ = timeout(Duration::from_secs(1), answer(&mut stream, status, reason, &retry)).await;
                linger(&mut stream, Duration::from_millis(250)).await;
            }
            None => refuse_at_once(&stream, answer_text(status, reason, &retry, true).as_bytes()),
        }
        self.inner.metrics.refused(Refusal::ConnectionLimit);
        self.at_cap(self.live().max_connections);
    }

    /// Logs a refusal past the connection cap: a warning once a minute (with the number left
    /// out since), the rest at debug.
    fn at_cap(&self, max_connections: usize) {
        match AT_CAP.take() {
            Some(left_out) => warn!(
                status = 503,
                max_connections,
                left_out,
                "refused: connection limit reached (max_connections; see connections_open and handshakes_refused_total)"
            ),
            None => debug!(status = 503, "refused: connection limit reached"),
        }
    }

    /// Answers a connection over `max_connections_per_ip` with 429 at once (as a refusal past
    /// the cap is, in a flood), so that the refusal holds no descriptor.
    async fn refuse_per_ip(&self, stream: TcpStream, r: crate::policy::Refusal) {
        let retry = [(http::header::RETRY_AFTER, http::HeaderValue::from(r.retry_after.unwrap_or(5)))];
        refuse_at_once(&stream, answer_text(r.status, r.public, &retry, true).as_bytes());
        self.inner.metrics.refused(Refusal::AddressLimit);
        debug!(
            status = r.status.as_u16(),
            reason = r.detail.as_str(),
            "refused: connections per address"
        );
    }

    /// Answers a connection over `max_connections_per_ip` with 429 (within a second), where
    /// the answer need not go out at once: a unix socket's local peer, or a request already read.
    async fn answer_per_ip<S: AsyncWrite + Unpin>(&self, stream: &mut S, r: &crate::policy::Refusal) {
        let retry = [(http::header::RETRY_AFTER, http::HeaderValue::from(r.retry_after.unwrap_or(5)))];
        let _ = timeout(Duration::from_secs(1), answer(stream, r.status, r.public, &retry)).await;
        self.inner.metrics.refused(Refusal::AddressLimit);
        debug!(
            status = r.status.as_u16(),
            reason = r.detail.as_str(),
            "refused: connections per address"
        );
    }

    /// Sniffs the first byte: a TLS ClientHello gets the TLS handshake, anything else plain HTTP
    /// (or a prompt refusal on a TLS-only listener).
    #[allow(clippy::too_many_arguments)]
    async fn maybe_tls(
        &self,
        mut stream: TcpStream,
        held: Held,
        peer: Peer,
        tls: &TlsListener,
        listener: &Listener,
        live: &Live,
        deadline: Instant,
    ) {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            Ok(_) => return debug!("closed before sending anything"),
            Err(_) => {
                self.inner.metrics.refused(Refusal::HandshakeTimeout);
                return debug!(timeout = ?live.timeouts.handshake, "handshake deadline passed; dropped");
            }
        }
        // 0x16: a TLS handshake record (the ClientHello).
        if first[0] != 0x16 {
            // A listener that requires client certificates must not let plain clients around them.
            if tls.settings.only || tls.settings.requires_client_certificates() {
                let reason = "this port takes TLS only: use wss:// (https)";
                let _ = tokio::time::timeout_at(deadline, answer(&mut stream, http::StatusCode::BAD_REQUEST, reason, &[])).await;
                linger(&mut stream, live.timeouts.close).await;
                self.inner.metrics.refused(Refusal::TlsOnly);
                return info!(status = 400, "plain connection on a TLS-only listener refused");
            }
            return Box::pin(self.http(stream, held, peer, listener, live, deadline, None)).await;
        }
        let accepted = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            r = tokio::time::timeout_at(deadline, Box::pin(tls.acceptor().accept(stream))) => r,
        };
        // Boxed: a TLS connection's state is large, and every later future would carry it inline.
        self.inner.metrics.tls_handshake(matches!(accepted, Ok(Ok(_))));
        let stream = match accepted {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                return match TLS_FAILED.take() {
                    Some(left_out) => info!(error = crate::tls::handshake_failure(&e), left_out, "TLS handshake failed"),
                    None => debug!(error = crate::tls::handshake_failure(&e), "TLS handshake failed"),
                };
            }
            Err(_) => {
                self.inner.metrics.refused(Refusal::HandshakeTimeout);
                return debug!(timeout = ?live.timeouts.handshake, "handshake deadline passed during TLS");
            }
        };
        let client_cn = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::common_name);
        let span = tracing::Span::current();
        span.record("tls", true);
        if let Some(cn) = &client_cn {
            span.record("client_cn", cn.as_str());
        }
        let peer = Peer { secure: true, ..peer };
        Box::pin(self.http(stream, held, peer, listener, live, deadline, client_cn.as_deref())).await;
    }

    /// The HTTP requests and, when one upgrades, the session; over plain TCP or TLS alike. `held`
    /// is given back when the connection ends, or handed on with an agent's link. A connection
    /// whose static file was answered with keep-alive carries the next request (at most
    /// [`REQUESTS_PER_CONNECTION`], each within the handshake deadline of the answer before).
    #[allow(clippy::too_many_arguments)]
    async fn http<S>(
        &self,
        mut stream: S,
        held: Held,
        mut peer: Peer,
        listener: &Listener,
        live: &Live,
        mut deadline: Instant,
        client_cn: Option<&str>,
    ) where
        S: crate::agent::link::IntoLink,
    {
        let shutdown = &self.shutdown;
        let connected_from = peer.client;
        // What came after the previous request (keep-alive): the next one's beginning.
        let mut carried = Vec::new();
        let mut requests = 0usize;
        // For the log lines of the waits for a request (`deadline` was set from it).
        let handshake = live.timeouts.handshake;
        loop {
            requests += 1;
            // Each request names its own client behind a trusted proxy (one that keeps its
            // connections open carries several clients' requests).
            peer.client = connected_from;
            // Reading the request is under the handshake deadline; answering it (an error, a static
            // file, or the 101) under the write deadline, so a large file on a slow link is not cut.
            let head = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout_at(deadline, crate::http::read_request_after(&mut stream, std::mem::take(&mut carried))) => match r {
                    Ok(head) => head,
                    // A kept-alive connection that the client no longer uses is no failure.
                    Err(_) if requests > 1 => return debug!(timeout = ?handshake, "kept-alive connection idle: closed"),
                    Err(_) => {
                        self.inner.metrics.refused(Refusal::HandshakeTimeout);
                        return debug!(timeout = ?handshake, "handshake deadline passed; dropped");
                    }
                },
            };
            if requests > 1 && matches!(&head, Err(crate::http::Rejection::BadRequest(_) | crate::http::Rejection::Io(_))) {
                // The client closed its kept-alive connection, as it may at any time.
                return debug!("kept-alive connection closed by the client");
            }
            // Each request is served under the configuration in force when it came, not the one
            // its connection was accepted under: a reload while the request was on its way (up to
            // the handshake deadline) may have removed its route, its token or its origin.
            let current = self.live();
            let live: &Live = &current;
            let t = &live.timeouts;
            let access = &listener.config.access;
            if !access.trusted_proxies.is_empty() && !access.proxy_protocol {
                if let Ok((request, _)) = &head {
                    let ip = crate::policy::client_address(
                        peer.client.ip(),
                        request.headers(),
                        &access.trusted_proxies,
                        access.forwarded_header,
                    );
                    if ip != peer.client.ip() {
                        // The port the client used is the proxy's to know.
                        peer.client = SocketAddr::new(ip, 0);
                    }
                }
                tracing::Span::current().record("client", tracing::field::display(crate::logging::Client(peer.client)));
            }
            // Past its address's cap, a connection is let in to log in an agent, and for nothing
            // else: not even another request on the agent endpoint's path.
            let endpoint = head.as_ref().ok().and_then(|(r, _)| {
                let login = held.refusal().is_none() || crate::agent::endpoint::is_login(r.headers());
                login.then(|| live.agents.endpoint(r.uri().path())).flatten()
            });
            if let Some(endpoint) = endpoint {
                let Ok((request, leftover)) = head else { return };
                let serve = crate::agent::endpoint::serve(
                    stream,
                    held,
                    peer.client,
                    request,
                    leftover,
                    &live.agents,
                    &endpoint,
                    t,
                    shutdown,
                    &self.inner.metrics,
                );
                return Box::pin(serve).await;
            }
            if let Some(r) = held.refusal() {
                return self.answer_per_ip(&mut stream, r).await;
            }
            let ctx = Context {
                client: peer.client.ip(),
                client_cn,
                secure: peer.secure,
                origins: access.origins.as_deref().unwrap_or(&live.default_origins),
                per_ip: live.per_ip.as_ref(),
                failures: &self.inner.failures,
                lookups: &self.inner.lookups,
                keep_alive: requests < REQUESTS_PER_CONNECTION && !self.is_draining() && self.room_to_idle(live, connected_from.ip()),
            };
            // The answer has `http_write` at first, and again after each write that moves bytes.
            let progress = crate::http::Progress::new(t.http_write);
            let web = listener.web.as_deref().map(|root| Web {
                root,
                guard: live.web_guard(&listener.config),
            });
            // For the answer's log line (a cheap clone: the URI's bytes are shared).
            let uri = head.as_ref().ok().map(|(r, _)| r.uri().clone());
            let mut tracked = progress.track(&mut stream);
            let responded = Box::pin(crate::http::respond(&mut tracked, head, &live.routes, web, &ctx));
            let responded = tokio::select! {
                r = responded => Some(r),
                () = progress.stalled() => None,
            };
            let upgrade = match responded {
                None => return debug!(timeout = ?t.http_write, "answer stalled: nothing written within the write deadline; dropped"),
                Some(Err(e)) => return debug!(error = %e, "handshake failed"),
                Some(Ok(Outcome::Answered {
                    status,
                    reason,
                    refusal,
                    next,
                    route,
                })) => {
                    if let Some(route) = &route {
                        tracing::Span::current().record("route", route.as_str());
                    }
                    if status.as_u16() >= 400 {
                        self.inner.metrics.refused_by(refusal, route.as_deref());
                    }
                    // A refusal is worth a line, on a connection kept open too (a page's missing
                    // file); a static file served is not (a noVNC page load is some 40 of them):
                    // debug. The path, escaped and cut, says which.
                    // On a connection kept open, at most one line per 10 s at info (the rest at
                    // debug, counted in the next): a client's requests on such connections cost
                    // it no new connection each (a review: 1,000 lines in 0.16 s from one).
                    let path: String = uri.as_ref().map_or("", |u| u.path()).chars().take(200).collect();
                    let path = path.as_str();
                    let status = status.as_u16();
                    let said = match (status >= 400, next.is_some()) {
                        (false, _) => None,
                        (true, false) => Some(0),
                        (true, true) => KEPT_ALIVE_REFUSALS.take(),
                    };
                    match said {
                        Some(0) => info!(status, reason = reason.as_str(), path = %path, "http request answered"),
                        Some(left_out) => info!(status, reason = reason.as_str(), path = %path, left_out, "http request answered"),
                        None => debug!(status, reason = reason.as_str(), path = %path, "http request answered"),
                    }
                    match next {
                        // The answer said keep-alive (which it does only as `ctx.keep_alive` allows).
                        Some(rest) => {
                            carried = rest;
                            deadline = Instant::now() + t.handshake;
                            continue;
                        }
                        None => return linger(&mut stream, t.close).await,
                    }
                }
                Some(Ok(Outcome::Upgrade(u))) => u,
            };
            let span = tracing::Span::current();
            span.record("route", upgrade.route.name.as_str());
            span.record("target", upgrade.route.target.to_string().as_str());
            match tokio::time::timeout(t.http_write, crate::http::write_switching(&mut stream, &upgrade)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return debug!(error = %e, "writing 101 failed"),
                Err(_) => return debug!("write deadline passed writing 101"),
            }
            // Keep what the session needs; the request head is freed here, not at the session's end.
            let Upgrade {
                route,
                leftover,
                slot: _slot,
                per_ip: _per_ip,
                authenticated,
                ..
            } = *upgrade;
            if let Some(who) = authenticated.and_then(|a| a.subject) {
                span.record("user", who.as_str());
            }
            let params = SessionParams {
                framing: route.options.framing,
                max_message_size: route.options.max_message_size,
                timeouts: t,
                record: route.options.record.as_ref(),
                client_queue: peer.queue,
            };
            let proxy_header = match (route.options.policy.proxy_protocol, peer.local) {
                (Some(version), Some(local)) => Some(crate::proxy::header(version, peer.client, local)),
                _ => None,
            };
            let live_config = live;
            let target = route.target.to_string();
            let metrics = &self.inner.metrics;
            let route_metrics = metrics.route(&route.name);
            let session = metrics
                .sessions
                .add(peer.client, (&route.name, route_metrics), target, shutdown.child_token());
            let live = (&*self.inner.metrics, &*session.session, &self.inner.abort);
            // Boxed: a session's state (the relay's, its backend connect) is not carried in every
            // connection's future while it reads requests and serves files.
            Box::pin(run_session(
                stream,
                leftover,
                &route,
                &params,
                proxy_header.as_deref(),
                live,
                &live_config.agents,
            ))
            .await;
            return;
        }
    }
}

impl Bridge {
    /// Whether a connection from `ip` may stay open, idle, for another request after a static
    /// file: only while its address holds under half its `max_connections_per_ip` and the bridge
    /// under half its `max_connections`, so that idle connections never take the places a
    /// page's WebSocket (which browsers open on a connection of its own) needs.
    fn room_to_idle(&self, live: &Live, ip: std::net::IpAddr) -> bool {
        let per_address = live.connections_per_ip.as_ref().is_none_or(|table| {
            table
                .limits()
                .max_sessions
                .is_none_or(|cap| table.sessions_of(ip).saturating_mul(2) < cap)
        });
        per_address && self.connections().saturating_mul(2) < live.max_connections
    }
}

/// The settings of a listener that differ between `old` and `new`, as the file names them,
/// but `web_auth` and `web_client_cn` (a reload applies those). Compared by their debug text:
/// not every setting's type can be compared otherwise (TLS settings hold file paths and parsed
/// policies), and a reload is rare.
/// The settings of a listener that differ between the one started (`old`, among the listeners
/// started) and the one in a reloaded file (`new`, among the file's). `ipv6_only` by its effect:
/// a file that writes out the default it had does not change it.
fn listener_changes(
    (old, started): (&ListenerConfig, &[ListenerConfig]),
    (new, file): (&ListenerConfig, &[ListenerConfig]),
) -> Vec<&'static str> {
    fn differ<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let (a, b) = (&old.access, &new.access);
    [
        // Listeners are matched by address; a unix socket's file mode is beside its path.
        ("mode", differ(&old.addr, &new.addr)),
        ("web", differ(&old.web, &new.web)),
        ("web_listing", old.web_listing != new.web_listing),
        ("web_follow_symlinks", old.web_follow_symlinks != new.web_follow_symlinks),
        ("web_dotfiles", old.web_dotfiles != new.web_dotfiles),
        ("ipv6_only", old.dual_stack(started) != new.dual_stack(file)),
        ("origins", differ(&a.origins, &b.origins)),
        ("proxy_protocol", a.proxy_protocol != b.proxy_protocol),
        ("trusted_proxies", a.trusted_proxies != b.trusted_proxies),
        ("forwarded_header", differ(&a.forwarded_header, &b.forwarded_header)),
        ("tls", differ(&old.tls, &new.tls)),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

use crate::logging::Quieted;

static TLS_FAILED: Quieted = Quieted::new(Duration::from_secs(10));
static PROXY_REFUSED: Quieted = Quieted::new(Duration::from_secs(10));
/// The bridge at its connection cap: worth a warning (nginx's "worker_connections are not
/// enough" is an alert), once a minute.
static AT_CAP: Quieted = Quieted::new(Duration::from_secs(60));

/// How long sessions still open when the shutdown grace period is over have to log their end.
const ABORT_WAIT: Duration = Duration::from_millis(500);

/// The most requests one connection carries (keep-alive after static files), as nginx's
/// `keepalive_requests`: a client that keeps one open for ever is made to connect again now and
/// then, and lands on whichever instance a balancer picks then.
pub const REQUESTS_PER_CONNECTION: usize = 1000;

/// TCP_USER_TIMEOUT on client sockets (Linux): how long data we sent may go unacknowledged
/// before the kernel drops the connection. The backstop for what pings cannot see: a client
/// whose upload waits behind a slow backend is not read, so its pong cannot be read either and
/// the relay counts that as backpressure; if that client vanishes, our ping to it is never
/// acknowledged, and without this the kernel would retransmit for about 15 minutes
/// (`tcp_retries2`). At least the default ping interval plus pong timeout (40 s), so it never
/// cuts a healthy session before the pong deadline would; a configuration with longer ones
/// raises it per connection (see `Bridge::connection`). A live client acknowledges within a
/// round trip, and one with a full receive window answers the kernel's window probes.
pub const CLIENT_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Refusals answered on connections kept open: at most one at info per 10 s.
static KEPT_ALIVE_REFUSALS: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));

/// An IPv4 address a dual-stack socket gives as `::ffff:a.b.c.d`, as itself (`a.b.c.d`): in logs,
/// to every policy, and in the PROXY header a backend gets.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The options every accepted client socket gets: TCP_NODELAY, keepalive
/// ([`crate::backend::tcp_keepalive`]) and, on Linux, [`CLIENT_USER_TIMEOUT`]. Set on a
/// listening socket, Linux hands them to every socket it accepts (a failure to set one is an
/// error there: connections rely on it); elsewhere each connection sets its own and a refusal is
/// ignored.
fn client_options(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    let set = (|| {
        socket.set_tcp_nodelay(true)?;
        socket.set_tcp_keepalive(&crate::backend::tcp_keepalive())?;
        #[cfg(target_os = "linux")]
        socket.set_tcp_user_timeout(Some(CLIENT_USER_TIMEOUT))?;
        Ok(())
    })();
    if cfg!(target_os = "linux") {
        set
    } else {
        Ok(())
    }
}

/// Where the unix-socket clients come from, as far as policy is concerned: a unix socket is
/// reachable only from this machine (and only by users its file mode lets in), as loopback is,
/// so its clients count as `127.0.0.1`: a route's `allow` networks, per-address caps and
/// `trusted_proxies` treat them as loopback clients, all of them one address. A PROXY header or
/// a trusted X-Forwarded-For names the real client, as on TCP.
pub const UNIX_CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A bound listening socket.
#[derive(Debug)]
enum Socket {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener),
}

/// A listening socket with what it serves: static files, TLS.
#[derive(Debug)]
pub struct Listener {
    /// Its settings.
    pub config: ListenerConfig,
    socket: Option<Socket>,
    web: Option<Arc<WebRoot>>,
    tls: Option<Arc<TlsListener>>,
}

impl Listener {
    /// Reads what the listener needs (certificates) without binding, so a bad file is reported
    /// before any port is taken.
    ///
    /// # Errors
    /// A certificate, key or CA file that cannot be used, named with its problem.
    pub fn prepare(config: &ListenerConfig) -> Result<Listener, TlsError> {
        if config.access.proxy_protocol && config.access.trusted_proxies.is_empty() {
            tracing::warn!(
                listener = %config.addr,
                "proxy_protocol without trusted_proxies: any peer that reaches this listener may name any client address \
                 (network rules, per-address caps and login brakes count what it says); list the balancers in trusted_proxies"
            );
        }
        let tls = config.tls.clone().map(TlsListener::load).transpose()?.map(Arc::new);
        let web = config.web.as_ref().map(|dir| {
            Arc::new(WebRoot::new(
                dir,
                config.web_listing,
                config.web_follow_symlinks,
                config.web_dotfiles,
            ))
        });
        Ok(Listener {
            config: config.clone(),
            socket: None,
            web,
            tls,
        })
    }

    /// Binds the configured address.
    ///
    /// # Errors
    /// The address cannot be bound (in use, not local, no permission).
    pub async fn bind(mut self) -> std::io::Result<Listener> {
        let Some(addr) = self.config.addr.tcp() else {
            return Err(std::io::Error::other(format!(
                "{}: not a TCP address (see server::start::bind)",
                self.config.addr
            )));
        };
        let socket = TcpListener::bind(addr).await?;
        client_options(socket2::SockRef::from(&socket))?;
        self.socket = Some(Socket::Tcp(socket));
        Ok(self)
    }

    /// A listener serving the same things, not bound yet (for another runtime thread).
    pub fn sibling(&self) -> Listener {
        Listener {
            config: self.config.clone(),
            socket: None,
            web: self.web.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Binds `addr` as a non-blocking std socket, with `SO_REUSEPORT` when several runtime threads
    /// each accept on their own socket of the same port (the kernel spreads connections among
    /// them). `dual_stack`: an IPv6 socket takes IPv4 connections too (as `::ffff:a.b.c.d`;
    /// accepted peers are shown and checked as IPv4), else it is IPv6 only.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn bind_std(addr: std::net::SocketAddr, reuse_port: bool, dual_stack: bool) -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        crate::platform::prepare_listening_socket(&socket, reuse_port)?;
        if addr.is_ipv6() {
            // Set either way: the system's default (Linux's net.ipv6.bindv6only, Windows') differs.
            socket.set_only_v6(!dual_stack)?;
        }
        // Accepted connections inherit them on Linux (see `Bridge::connection`).
        client_options(socket2::SockRef::from(&socket))?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }

    /// Uses a socket the caller bound (tests bind port 0).
    pub fn with_socket(mut self, socket: TcpListener) -> Listener {
        let _ = client_options(socket2::SockRef::from(&socket));
        self.socket = Some(Socket::Tcp(socket));
        self
    }

    /// Uses a unix socket the caller bound (see [`start::bind_unix`]).
    #[cfg(unix)]
    pub fn with_unix_socket(mut self, socket: tokio::net::UnixListener) -> Listener {
        self.socket = Some(Socket::Unix(socket));
        self
    }

    /// The bound TCP address.
    ///
    /// # Errors
    /// Not bound yet, a unix socket, or the OS cannot tell.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self.socket.as_ref() {
            Some(Socket::Tcp(s)) => s.local_addr(),
            #[cfg(unix)]
            Some(Socket::Unix(_)) => Err(std::io::Error::other("a unix socket")),
            None => Err(std::io::Error::other("not bound")),
        }
    }
}

/// Places past `max_connections_per_ip` that an address gets for agents' logins, beyond its
/// connected agents' pools (see `place`): enough for the control links of a few agents behind
/// one NAT starting together (a shop's terminals after a power cut), each place held only while
/// its login is under way (a round trip once connected; a silent one until the handshake
/// deadline). Not a fraction of the cap: what these places serve grows with the agents behind an
/// address, not with its pages.
pub const AGENT_LOGINS_PAST_CAP: usize = 4;

/// A new connection's place under `max_connections_per_ip`, or the refusal (429) it gets at
/// once.
///
/// Past the cap, an address still gets [`AGENT_LOGINS_PAST_CAP`] places more, plus the pools of
/// the agents connected from it (the links they dial to refill them log in at once), whose
/// request head is read under the handshake deadline and which may only log in an agent
/// ([`Place::AgentLogin`]; anything else gets this same refusal once read): the pages of a shop
/// behind one NAT may fill its allowance, and its agent must still connect, first login
/// included. A place is given back when its connection ends or logs in (then it counts as an
/// agent's, not against its address). Beyond those places, and while the address's logins are
/// slowed by the failure brake (so they cannot be used to hammer logins), refused at once as
/// before; the refusal's detail (the log's, never the answer's) says which.
///
/// O(1) however many agents are connected (the pools per address are kept as they come and
/// go): an address over its cap may ask at every accept.
fn place(live: &Live, ip: std::net::IpAddr) -> Result<Place, crate::policy::Refusal> {
    let Some(table) = &live.connections_per_ip else {
        return Ok(Place::Uncounted);
    };
    let mut refusal = match table.enter(ip) {
        Ok(counted) => return Ok(Place::Counted(counted)),
        Err(r) => r,
    };
    let Some(logins) = &live.agent_logins else {
        return Err(refusal);
    };
    if live.agents.braked(ip) {
        refusal
            .detail
            .push_str("; no place past it to log in agents: the brake on its failed agent logins is on");
        return Err(refusal);
    }
    let allowance = AGENT_LOGINS_PAST_CAP.saturating_add(live.agents.pools_at(ip));
    match logins.enter_within(ip, u32::try_from(allowance).unwrap_or(u32::MAX)) {
        Some(extra) => Ok(Place::AgentLogin(extra, refusal)),
        None => {
            refusal.detail = format!("{}; its {allowance} places past it to log in agents are taken", refusal.detail);
            Err(refusal)
        }
    }
}

/// Whether `ip` is a proxy whose X-Forwarded-For (or Forwarded) header this listener believes:
/// a connection from it carries a client's requests (several clients' over time), so
/// `max_connections_per_ip` does not count it (all of them would share one allowance, and one
/// client's slow requests through the proxy would lock every other out), while the caps per
/// address on sessions count the address each request names.
fn forwards_clients(access: &crate::config::policy::ListenerAccess, ip: std::net::IpAddr) -> bool {
    !access.proxy_protocol && access.trusted_proxies.iter().any(|n| n.contains(&ip.to_canonical()))
}

/// Refusals past the connection cap that may linger at once; the rest are answered without
/// waiting. The open-file budget keeps a descriptor aside for each.
pub const LINGERING_REFUSALS: usize = 64;

/// Answers without waiting on the client: what it has already sent is read first (closing a
/// socket with unread bytes resets the connection, and a reset can destroy the answer before the
/// client reads it), the answer is written if the socket takes it now, then FIN; the caller
/// closes the socket.
fn refuse_at_once(stream: &TcpStream, answer: &[u8]) {
    use std::io::{Read, Write};
    // Straight to the (non-blocking) socket: tokio's try_read/try_write would answer WouldBlock
    // without asking the kernel while it has seen no readiness event for the socket yet.
    let socket = socket2::SockRef::from(stream);
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        if !matches!((&*socket).read(&mut buf), Ok(1..)) {
            break;
        }
    }
    let _ = (&*socket).write(answer);
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

/// Connects the backend and relays; logs the session's open and close lines. `early` holds
/// client bytes that arrived with the request head; `abort` ends the session at once when the
/// shutdown grace period is over.
async fn run_session<S>(
    client: S,
    early: Vec<u8>,
    route: &Route,
    params: &SessionParams<'_>,
    proxy_header: Option<&[u8]>,
    (metrics, session, abort): (&crate::metrics::Metrics, &crate::metrics::Session, &CancellationToken),
    agents: &crate::agent::Registry,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shutdown = &session.close;
    tracing::Span::current().record("session", session.id);
    let route_metrics = &session.metrics;
    let started = Instant::now();
    let backend = tokio::select! {
        _ = shutdown.cancelled() => Err(None),
        // Boxed: the connect phase's state is freed before the relay starts.
        b = Box::pin(crate::agent::connect(&route.target, params.timeouts.connect, route.backend_tls.as_ref(), proxy_header, (agents, session.id))) => b.map_err(Some),
    };
    let outcome = match &backend {
        Ok(_) => "ok",
        Err(Some(_)) => "failed",
        Err(None) => "shutdown",
    };
    // A timeout is observed at the deadline, in the bucket it names, not in the next one up for
    // the moments the timer took to fire.
    metrics.backend_connect(route_metrics, outcome, started.elapsed().min(params.timeouts.connect));
    if let Err(Some(e)) = &backend {
        metrics.backend_failure(route_metrics, e);
    }
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            let (code, reason) = match &e {
                Some(e) => (1014, e.to_string()),
                None => (1001, "server shutting down".to_owned()),
            };
            Box::pin(relay::refuse(client, early, code, &reason, params.timeouts.close)).await;
            let cause = if e.is_some() {
                relay::Cause::Unreachable
            } else {
                relay::Cause::Shutdown
            };
            metrics.session_ended(route_metrics, code, cause);
            let source = e.as_ref().and_then(|e| std::error::Error::source(e)).map(ToString::to_string);
            let duration_ms = started.elapsed().as_millis() as u64;
            match source {
                Some(error) => warn!(
                    code,
                    reason = reason.as_str(),
                    error = error.as_str(),
                    duration_ms,
                    "session failed: backend not connected"
                ),
                None => warn!(code, reason = reason.as_str(), duration_ms, "session failed: backend not connected"),
            }
            return;
        }
    };
    if let Some(addr) = backend.peer_addr() {
        // Which of the target's addresses answered (a name can have several), in every line the
        // session logs from here on.
        tracing::Span::current().record("backend", tracing::field::display(addr));
    }
    // One record per session, when it ends (it says everything); the opening only at debug level.
    debug!(framing = %params.framing, "session open");
    let open = route_metrics.open();
    let s = tokio::select! {
        biased;
        s = relay::run_live(client, early, backend, params, shutdown, Some(session)) => s,
        // The shutdown grace period is over while the session was still closing (a client that
        // does not answer its close frame, a backend whose data it does not take): it ends now,
        // with the bytes it moved so far (all of them counted already: the relay counts what it
        // publishes).
        () = abort.cancelled() => relay::Summary {
            code: 1001,
            reason: "server shutting down; shutdown grace period over".into(),
            cause: relay::Cause::GraceOver,
            bytes_up: session.bytes_up.load(std::sync::atomic::Ordering::Relaxed),
            bytes_down: session.bytes_down.load(std::sync::atomic::Ordering::Relaxed),
        },
    };
    drop(open);
    metrics.session_ended(route_metrics, s.code, s.cause);
    info!(
        framing = %params.framing,
        code = s.code,
        reason = s.reason.as_str(),
        ended_by = s.ended_by(),
        bytes_up = s.bytes_up,
        bytes_down = s.bytes_down,
        duration_ms = started.elapsed().as_millis() as u64,
        "session closed"
    );
}

impl Live {
    /// The configuration in force after `config` is loaded; on a reload, `previous` is the one
    /// in service, whose counts go on. The tables per client address it shares with `previous`
    /// keep their limits until [`Live::commit`].
    fn from_config(config: &Config, previous: Option<&Live>, metrics: &Arc<crate::metrics::Metrics>) -> Result<Live, BridgeError> {
        config.check()?;
        let mut routes = RouteTable::from_config(config, previous.map(|p| &p.routes)).map_err(BridgeError::Tokens)?;
        routes.observed_by(metrics.clone());
        let mut staged = Vec::new();
        let capacity = config.limits.max_connections.saturating_mul(4);
        let proxy_headers = config
            .routes
            .iter()
            .map(|r| &r.options)
            .chain(config.token_sources.iter().map(|s| &s.options))
            .any(|o| o.policy.proxy_protocol.is_some());
        let agents = match previous {
            Some(p) => {
                p.agents.set_config(&config.agents);
                p.agents.clone()
            }
            None => Arc::new(crate::agent::Registry::new(&config.agents)),
        };
        let connections_per_ip = crate::routes::per_ip_table(
            AddressLimits {
                max_sessions: config.limits.max_connections_per_ip.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
                connections: true,
                ..AddressLimits::default()
            },
            previous.and_then(|p| p.connections_per_ip.as_ref()),
            capacity,
            &mut staged,
        );
        // An address with a place past its cap holds at least cap + 1 connections, so at most
        // max_connections / (cap + 1) addresses have one at once: the table is sized for four
        // times that, as the other tables are for their addresses. Kept across reloads with its
        // counts, resized when max_connections or the cap changed that sizing.
        let agent_logins = match (config.limits.max_connections_per_ip, config.agents.endpoints.is_empty()) {
            (Some(cap), false) => {
                let sizing = capacity / cap.saturating_add(1);
                Some(match previous.and_then(|p| p.agent_logins.clone()) {
                    Some(table) => {
                        staged.push(table.stage(AddressLimits::default(), sizing));
                        table
                    }
                    None => PerAddress::new(AddressLimits::default(), sizing),
                })
            }
            _ => None,
        };
        let mut web_guards = HashMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let guard = match &l.access.web_auth {
                None => None,
                Some(w) => Some(Arc::new(WebGuard::new(w).map_err(|message| {
                    crate::config::ConfigError::Invalid {
                        file: config.origin.clone(),
                        line: None,
                        field: format!("listen[{i}].web_auth"),
                        message,
                    }
                })?)),
            };
            web_guards.insert(l.addr.to_string(), guard);
        }
        for (addr, guard) in previous.map(|p| &p.web_guards).into_iter().flatten() {
            web_guards.entry(addr.clone()).or_insert_with(|| guard.clone());
        }
        Ok(Live {
            routes,
            timeouts: config.timeouts.clone(),
            max_connections: config.limits.max_connections,
            per_ip: crate::routes::per_ip_table(
                config.limits.per_ip,
                previous.and_then(|p| p.per_ip.as_ref()),
                capacity,
                &mut staged,
            ),
            connections_per_ip,
            agent_logins,
            default_origins: config.default_origins.clone(),
            proxy_headers,
            agents,
            web_guards,
            staged,
        })
    }

    /// What `listener`'s static files ask of a request. A listener this configuration never
    /// knew (a bridge handed listeners of another configuration) is refused everything if its
    /// own settings protect its files.
    fn web_guard(&self, listener: &ListenerConfig) -> Option<&WebGuard> {
        match self.web_guards.get(&listener.addr.to_string()) {
            Some(guard) => guard.as_deref(),
            None if listener.access.web_auth.is_some() => Some(&crate::http::web::DENY_ALL),
            None => None,
        }
    }

    /// Puts into force the new limits and sizes of the tables per client address this
    /// configuration kept from the one before it, its routes' included: once all of it was
    /// built, as it goes into service.
    fn commit(&mut self) {
        self.routes.commit();
        for s in self.staged.drain(..) {
            s.commit();
        }
    }
}

/// A connection's span: `client` and `via` when known at accept (`None`: recorded later, when a
/// PROXY header or a trusted X-Forwarded-For names the client), and the fields the upgrade and
/// the session fill in. A field recorded later is printed last. At error level, so that its
/// fields are on every line whatever level the log shows (`RUST_LOG=warn` left a session's
/// failure without its client, route or id).
fn conn_span(client: Option<&dyn std::fmt::Display>, via: Option<&dyn std::fmt::Display>, listener: &str) -> tracing::Span {
    tracing::error_span!(
        "conn",
        client = client.map(tracing::field::display),
        via = via.map(tracing::field::display),
        listener = %listener,
        tls = tracing::field::Empty,
        client_cn = tracing::field::Empty,
        route = tracing::field::Empty,
        user = tracing::field::Empty,
        target = tracing::field::Empty,
        session = tracing::field::Empty,
        backend = tracing::field::Empty
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_each_listener_setting_it_leaves_for_a_restart() {
        // Each listener alone in its file.
        let changes = |old: &ListenerConfig, new: &ListenerConfig| {
            listener_changes((old, std::slice::from_ref(old)), (new, std::slice::from_ref(new)))
        };
        let tcp = ListenerConfig::new("127.0.0.1:6080".parse().unwrap());
        assert!(changes(&tcp, &tcp.clone()).is_empty());
        let mut proxied = tcp.clone();
        proxied.access.proxy_protocol = true;
        proxied.web_listing = true;
        assert_eq!(changes(&tcp, &proxied), ["web_listing", "proxy_protocol"]);
        let unix = |mode| {
            let mut l = tcp.clone();
            l.addr = crate::config::ListenOn::Unix {
                path: "/run/ws.sock".into(),
                mode,
            };
            l
        };
        assert_eq!(changes(&unix(0o600), &unix(0o660)), ["mode"]);
        // web_auth is applied by the reload itself: not named.
        let mut guarded = tcp.clone();
        guarded.access.web_auth = Some(crate::config::policy::WebAuth::default());
        assert!(changes(&tcp, &guarded).is_empty());
    }

    /// `ipv6_only` by what the socket does: a file that writes out the default `[::]` had
    /// changes nothing; one that flips it, or an IPv4 listener of the port added beside it
    /// (which makes `[::]` take IPv6 only), does.
    #[test]
    fn ipv6_only_is_compared_by_its_effect() {
        let any6 = ListenerConfig::new("[::]:6080".parse().unwrap());
        let with = |only| {
            let mut l = any6.clone();
            l.ipv6_only = only;
            l
        };
        let alone = |l: &ListenerConfig| vec![l.clone()];
        let changes =
            |old: &ListenerConfig, new: &ListenerConfig, file: &[ListenerConfig]| listener_changes((old, &alone(old)), (new, file));
        assert!(changes(&any6, &with(Some(false)), &alone(&with(Some(false)))).is_empty());
        assert_eq!(changes(&any6, &with(Some(true)), &alone(&with(Some(true)))), ["ipv6_only"]);
        let v4 = ListenerConfig::new("0.0.0.0:6080".parse().unwrap());
        assert_eq!(changes(&any6, &any6, &[v4, any6.clone()]), ["ipv6_only"]);
        // An address other than [::] is IPv6 only unless it says otherwise.
        let lo6 = ListenerConfig::new("[::1]:6080".parse().unwrap());
        let mut lo6_said = lo6.clone();
        lo6_said.ipv6_only = Some(true);
        assert!(changes(&lo6, &lo6_said, &alone(&lo6_said)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quieted_line_comes_once_per_interval_with_the_number_left_out() {
        let q = Quieted::new(Duration::from_secs(10));
        assert_eq!(q.take(), Some(0));
        assert_eq!((q.take(), q.take()), (None, None));
        tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
        assert_eq!(q.take(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(q.take(), Some(3));
        assert_eq!(q.take(), None);
    }

    #[tokio::test]
    async fn a_refusal_at_once_delivers_its_answer_without_a_reset() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        // On loopback the request is in the server's socket once the client's write returns.
        let (server, _) = listener.accept().await.unwrap();
        refuse_at_once(&server, b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        drop(server);
        // Read to a clean EOF: unread request bytes at close would have been a reset.
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert!(client.take_error().unwrap().is_none(), "the connection was reset");
    }

    /// Every way a listener is bound hands its accepted connections TCP_NODELAY, keepalive and
    /// TCP_USER_TIMEOUT (on Linux by inheritance, which is what lets `connection` skip the
    /// system calls).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let std = Listener::bind_std("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        let config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
        let listeners = [
            Listener::prepare(&config).unwrap().with_socket(TcpListener::from_std(std).unwrap()),
            Listener::prepare(&config).unwrap().bind().await.unwrap(),
            Listener::prepare(&config)
                .unwrap()
                .with_socket(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        ];
        for listener in listeners {
            let Some(Socket::Tcp(socket)) = listener.socket.as_ref() else {
                panic!("bound")
            };
            let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
            let (accepted, _) = socket.accept().await.unwrap();
            let at = listener.local_addr();
            assert!(accepted.nodelay().unwrap(), "{at:?}");
            let accepted = socket2::SockRef::from(&accepted);
            assert!(accepted.keepalive().unwrap(), "keepalive {at:?}");
            assert_eq!(accepted.tcp_keepalive_time().unwrap(), crate::backend::KEEPALIVE_IDLE, "{at:?}");
            assert_eq!(
                accepted.tcp_keepalive_interval().unwrap(),
                crate::backend::KEEPALIVE_INTERVAL,
                "{at:?}"
            );
            assert_eq!(
                accepted.tcp_keepalive_retries().unwrap(),
                crate::backend::KEEPALIVE_PROBES,
                "{at:?}"
            );
            assert_eq!(accepted.tcp_user_timeout().unwrap(), Some(CLIENT_USER_TIMEOUT), "{at:?}");
        }
    }

    /// A configuration with an agent endpoint and these caps.
    fn capped(max_connections: usize, cap: usize) -> Config {
        let mut c = Config::new("test");
        c.listeners.push(ListenerConfig::new("127.0.0.1:0".parse().unwrap()));
        let options = c.default_route_options();
        c.routes.push(crate::config::RouteConfig {
            matcher: crate::config::Matcher::Path("/pos".into()),
            target: "127.0.0.1:1".parse().unwrap(),
            options,
        });
        c.limits.max_connections = max_connections;
        c.limits.max_connections_per_ip = Some(cap);
        c.agents.endpoints.push(crate::agent::EndpointConfig {
            path: "/agent".into(),
            pool: 4,
        });
        c
    }

    /// Past its cap, an address refused at accept is refused for one of two reasons, and the
    /// log line (the refusal's detail) says which: the brake on its failed agent logins, or its
    /// places to log in agents all taken.
    #[test]
    fn a_refusal_past_the_cap_says_why_it_got_no_place_to_log_in_agents() {
        let live = Live::from_config(&capped(100, 1), None, &Arc::new(crate::metrics::Metrics::new())).unwrap();
        let (braked, full): (std::net::IpAddr, std::net::IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let _pages = [place(&live, braked).unwrap(), place(&live, full).unwrap()];
        assert!(matches!(place(&live, braked), Ok(Place::AgentLogin(..))));
        for i in 0..crate::agent::registry::ADDRESS_BRAKE_BURST {
            live.agents.charge(braked, &format!("name-{i}")).unwrap();
        }
        let r = place(&live, braked).unwrap_err();
        assert_eq!(r.public, "too many connections from your address");
        assert!(
            r.detail
                .ends_with("no place past it to log in agents: the brake on its failed agent logins is on"),
            "{}",
            r.detail
        );
        let _places: Vec<Place> = (0..AGENT_LOGINS_PAST_CAP).map(|_| place(&live, full).unwrap()).collect();
        let r = place(&live, full).unwrap_err();
        assert!(
            r.detail.ends_with("its 4 places past it to log in agents are taken"),
            "{}",
            r.detail
        );
    }

    /// The table of places past `max_connections_per_ip` for agents' logins is kept across
    /// reloads with its counts, resized by one that changes its sizing (`max_connections` or the
    /// cap); a place taken before is given back to it.
    #[test]
    fn the_places_for_agents_logins_are_resized_by_a_reload_that_changes_their_sizing() {
        let slots = |live: &Live| live.agent_logins.as_ref().unwrap().clone();
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        // 10,000 × 4 / (3 + 1): a table of 16,384 slots, as for 10,001.
        let first = Live::from_config(&capped(10_000, 3), None, &Arc::new(crate::metrics::Metrics::new())).unwrap();
        let held = slots(&first).enter_within(ip, 4).unwrap();
        let mut same = Live::from_config(&capped(10_001, 3), Some(&first), &Arc::new(crate::metrics::Metrics::new())).unwrap();
        same.commit();
        assert_eq!(slots(&same).len(), 16_384);
        assert_eq!(slots(&same).sessions_of(ip), 1, "with its counts");
        for (changed, len, why) in [
            (capped(20_000, 3), 32_768, "max_connections"),
            (capped(10_000, 1), 32_768, "the cap"),
        ] {
            let mut other = Live::from_config(&changed, Some(&same), &Arc::new(crate::metrics::Metrics::new())).unwrap();
            other.commit();
            assert!(Arc::ptr_eq(&slots(&same), &slots(&other)), "{why}: the same table");
            assert_eq!(slots(&other).len(), len, "{why} changed its size");
            assert_eq!(slots(&other).sessions_of(ip), 1, "{why}: the counts go on");
        }
        drop(held);
        assert_eq!(slots(&first).sessions_of(ip), 0, "given back");
    }

    /// A connection's task is allocated for every connection and lives as long as the session:
    /// its size is the per-session memory floor. A buffer or a big state inlined by accident (a
    /// 4 KiB array in a helper did it once) shows here long before a benchmark runs.
    #[tokio::test]
    async fn connection_futures_stay_small() {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut config = Config::new("test");
        config.listeners.push(ListenerConfig::new(addr));
        let options = config.default_route_options();
        config.routes.push(crate::config::RouteConfig {
            matcher: crate::config::Matcher::AnyPath,
            target: "127.0.0.1:1".parse().unwrap(),
            options,
        });
        let bridge = Bridge::new(&config).unwrap();
        let listener = Listener::prepare(&config.listeners[0]).unwrap();
        let connection = bridge.clone().connection(TcpStream::connect(addr).await.unwrap(), addr, &listener);
        assert!(
            std::mem::size_of_val(&connection) <= 1024,
            "connection future: {} bytes",
            std::mem::size_of_val(&connection)
        );
        drop(connection);
        let live = bridge.live();
        let peer = Peer {
            client: addr,
            local: None,
            secure: false,
            queue: crate::platform::SendQueue::NONE,
        };
        let http = bridge.http(
            TcpStream::connect(addr).await.unwrap(),
            Held::new(crate::slots::Slot::alone(), Place::Uncounted),
            peer,
            &listener,
            &live,
            Instant::now(),
            None,
        );
        assert!(
            std::mem::size_of_val(&http) <= 3 * 1024,
            "http future: {} bytes",
            std::mem::size_of_val(&http)
        );
    }
}
