//! The bridge's counters and gauges (a [`prometheus_client`] registry, one per [`crate::server::Bridge`]),
//! with the process's own (`process_*`, read at scrape time: [`process`]), and the live-session
//! table that `/sessions` lists and an operator can end a session through.
//!
//! The data path pays per session, never per message. Per session: its route's handles (one read
//! lock on a small map), an entry in the live-session table (a lock to insert, one to remove, and
//! the entry's allocation), the connect counter and its route's histogram (the histogram's own short lock),
//! the open gauge up and down, and at the end its close code: an atomic add on a counter the
//! route keeps (taken from the family once). Per wake-up of the relay that moved bytes: a
//! relaxed store of its byte count into the session's entry and a relaxed add of what it moved
//! to the route's byte counter, for each direction that moved (no lock, no label lookup: the
//! session holds its route's handles), so `/sessions` and `session_bytes_total` show live
//! figures. Per message: nothing.
//!
//! Label sets are bounded by the configuration, never by peers: routes by their configured names,
//! close codes folded into the known ones and `other`, refusals into a fixed set of reasons. No
//! token and no client address is ever a label.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// A route's name as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

/// Bytes of a route in one direction (`up`: client → backend).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabel {
    route: String,
    direction: &'static str,
}

/// How a session ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabel {
    route: String,
    code: &'static str,
    ended_by: &'static str,
    cause: &'static str,
}

/// A refused handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    status: u16,
    reason: &'static str,
    /// The route that refused it; empty when none did (no route matched, or the refusal came
    /// before one was looked for).
    route: String,
}

/// A token lookup in a Redis or API source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabel {
    source: String,
    outcome: &'static str,
}

/// A token source (Redis, an API), by its name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

/// A backend connect.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectLabel {
    route: String,
    outcome: &'static str,
}

/// A backend connect that failed, and why ([`crate::backend::ConnectError::kind`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabel {
    route: String,
    reason: &'static str,
}

/// Why, from a fixed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// One label with a fixed value set (`outcome`, `kind`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The version of wsbridge running.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The configuration in force: its file (or "command line") and the SHA-256 of its text.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabel {
    file: String,
    sha256: String,
}

/// A kind of reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// A reload of one kind with its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabel {
    kind: &'static str,
    outcome: &'static str,
}

/// A certificate file of a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    cert: String,
}

/// Close codes that are labels as they are; every other code a client may send (4000-4999 are
/// free for applications) is counted as `other`, so a peer cannot grow the label set.
const KNOWN_CODES: [(u16, &str); 12] = [
    (1000, "1000"),
    (1001, "1001"),
    (1002, "1002"),
    (1003, "1003"),
    (1005, "1005"),
    (1006, "1006"),
    (1007, "1007"),
    (1008, "1008"),
    (1009, "1009"),
    (1010, "1010"),
    (1011, "1011"),
    (1014, "1014"),
];

/// A route's label: its name when it is configured as such (`path /vnc`, `any path`); a route
/// made from a token names its source instead (`tokens from /etc/wsbridge/tokens`, `JWT tokens`,
/// `inline tokens`): the tag of a token is per token (a JWT per user and hour) and per process.
fn route_label(name: &str) -> std::borrow::Cow<'_, str> {
    if let Some((_, source)) = name.split_once(" from ").filter(|_| name.starts_with("token #")) {
        format!("tokens from {source}").into()
    } else if name.starts_with("JWT token #") {
        "JWT tokens".into()
    } else if name.starts_with("token #") {
        "inline tokens".into()
    } else {
        name.into()
    }
}

fn code_label(code: u16) -> &'static str {
    KNOWN_CODES.iter().find(|(c, _)| *c == code).map_or("other", |(_, l)| l)
}

/// Why a handshake was refused: a fixed set, one per way the bridge refuses before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Past the connection cap (503 before reading anything).
    ConnectionLimit,
    /// Past `max_connections_per_ip` (429 before reading anything).
    AddressLimit,
    /// A plain connection on a TLS-only listener.
    TlsOnly,
    /// A PROXY protocol header from a sender not in `trusted_proxies`, malformed, or late:
    /// closed without an answer (a balancer cannot use one), counted with status 0.
    Proxy(ProxyRefusal),
    /// An HTTP answer with an error status, classified by the status.
    Http(u16),
    /// A token source that had to be asked could not answer (Redis down or slow): 503.
    TokenSource,
    /// The client sent no complete request (or TLS handshake) within the handshake deadline:
    /// dropped without an answer (a slow or silent client, or a balancer's check that connects
    /// and waits), counted with status 0.
    HandshakeTimeout,
}

/// Why a PROXY protocol header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyRefusal {
    /// The sender is not a trusted proxy.
    Untrusted,
    /// Not a valid PROXY v1/v2 header.
    Malformed,
    /// None within the handshake deadline.
    Timeout,
}

impl Refusal {
    fn label(self) -> (u16, &'static str) {
        match self {
            Refusal::ConnectionLimit => (503, "connection_limit"),
            Refusal::AddressLimit => (429, "address_limit"),
            Refusal::TlsOnly => (400, "tls_only"),
            Refusal::Proxy(ProxyRefusal::Untrusted) => (0, "proxy_untrusted"),
            Refusal::Proxy(ProxyRefusal::Malformed) => (0, "proxy_malformed"),
            Refusal::Proxy(ProxyRefusal::Timeout) => (0, "proxy_timeout"),
            Refusal::TokenSource => (503, "token_source_unavailable"),
            Refusal::HandshakeTimeout => (0, "handshake_timeout"),
            Refusal::Http(status) => (
                status,
                match status {
                    400 => "bad_request",
                    401 => "unauthenticated",
                    403 => "forbidden",
                    404 => "not_found",
                    405 => "method",
                    409 => "no_control_link",
                    421 => "misdirected",
                    426 => "not_websocket",
                    429 => "rate_limited",
                    431 => "head_too_large",
                    503 => "route_full",
                    _ => "other",
                },
            ),
        }
    }
}

/// Reloads, their times and whether the last one of each kind worked, per process: token files
/// are re-read by their sources in the background, and those know no bridge (a process runs one
/// bridge; tests share these).
struct ReloadFamilies {
    count: Family<ReloadLabel, Counter>,
    time: Family<ReloadLabel, Gauge<f64, AtomicU64>>,
    last_ok: Family<KindLabel, Gauge>,
}

static RELOADS: LazyLock<ReloadFamilies> = LazyLock::new(|| {
    let families = ReloadFamilies {
        count: Family::default(),
        time: Family::default(),
        last_ok: Family::default(),
    };
    for kind in RELOAD_KINDS {
        for outcome in ["ok", "failed"] {
            let _ = families.count.get_or_create(&ReloadLabel { kind, outcome });
        }
        families.last_ok.get_or_create(&KindLabel { kind }).set(1);
    }
    families
});

/// The kinds of reload, each exported from the start (0 reloads, the last one successful: the
/// files read at start-up are in force), so that the first failure is an increase an alert sees.
const RELOAD_KINDS: [&str; 4] = ["config", "certificates", "tokens", "credentials"];

/// A token source's re-read after its file changed ended (`ok`) or failed (the old tokens stay).
pub fn tokens_reloaded(source: &std::path::Path, ok: bool) {
    counted("tokens", ok);
    in_force("tokens", &source.display().to_string(), ok);
}

/// A credentials file's re-read after it changed (bearer tokens, htpasswd, JWT keys) ended
/// (`ok`; a file removed counts, nothing is in force then) or failed (what it held stays).
pub fn credentials_reloaded(file: &std::path::Path, ok: bool) {
    counted("credentials", ok);
    in_force("credentials", &file.display().to_string(), ok);
}

/// A listener's certificate files, `cert` the configured one, were put in force (`ok`) or could
/// not be (the previous certificate stays) by a reload or by the watcher (`watch`); the watcher
/// counts its reload too (`counted`), a SIGHUP counts once for all listeners.
pub fn certificate_reloaded(cert: &std::path::Path, key: Option<&std::path::Path>, ok: bool, counted_here: bool) {
    if counted_here {
        counted("certificates", ok);
    }
    // By certificate and key: two listeners may share a certificate with keys of their own.
    let key = key.map(|k| k.display().to_string()).unwrap_or_default();
    in_force("certificates", &format!("{} {key}", cert.display()), ok);
}

/// What a reload of a kind ended as: counted, with its time.
fn counted(kind: &'static str, ok: bool) {
    let label = ReloadLabel {
        kind,
        outcome: if ok { "ok" } else { "failed" },
    };
    RELOADS.count.get_or_create(&label).inc();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    RELOADS.time.get_or_create(&label).set(now);
}

/// The files of a kind whose last reload failed (their previous contents still in force), by
/// name (a token source, a listener's certificate): `last_reload_successful{kind}` is 1 only
/// while none is, so that one source's success does not hide another's failure.
static FAILING: LazyLock<Mutex<std::collections::BTreeSet<(&'static str, String)>>> = LazyLock::new(Mutex::default);

fn in_force(kind: &'static str, what: &str, ok: bool) {
    let mut failing = FAILING.lock().unwrap_or_else(|p| p.into_inner());
    match ok {
        true => failing.remove(&(kind, what.to_owned())),
        false => failing.insert((kind, what.to_owned())),
    };
    let none = !failing.iter().any(|(k, _)| *k == kind);
    RELOADS.last_ok.get_or_create(&KindLabel { kind }).set(i64::from(none));
}

/// A reloaded configuration is in force: every token source and credentials file it has was
/// read anew, whole, by the reload (one that could not be read fails the reload), so none is
/// failing now; one it dropped fails no more either (else its old failure would hold the alert
/// for good).
pub fn file_sources_reloaded() {
    let mut failing = FAILING.lock().unwrap_or_else(|p| p.into_inner());
    for kind in ["tokens", "credentials"] {
        failing.retain(|(k, _)| *k != kind);
        RELOADS.last_ok.get_or_create(&KindLabel { kind }).set(1);
    }
}

/// The counters of one route, taken once per session.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    route: String,
    open: Gauge,
    bytes_up: Counter,
    bytes_down: Counter,
    /// `backend_connects_total` by outcome, in [`CONNECT_OUTCOMES`]' order.
    connects: [Counter; 3],
    /// `backend_connect_seconds` of the route.
    connect_seconds: Histogram,
    /// `sessions_ended_total` by code (in [`KNOWN_CODES`]' order, then `other`) and by cause (its discriminant),
    /// taken from the family on first use: after that an end is an atomic add, no lock.
    ended: Arc<[OnceLock<Counter>]>,
}

/// A route's `backend_connect_seconds`: 1 ms to 10 s (a loopback connect is well under a
/// millisecond, a dead host takes the connect deadline, 5 s by default, observed as the deadline
/// itself so that it falls in its bucket; 2.5 s between 1 and 5 s, where an agent's answer or
/// a second SYN lands).
fn connect_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

/// `token_lookup_seconds`: 0.5 ms to 5 s (Redis on the next host answers in well under a
/// millisecond; the lookup deadline is 1 s by default).
fn lookup_histogram() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

/// The `sessions_ended_total` series of a route that dashboards and alerts read (normal ends,
/// and trouble: a client gone, a backend failed, timed out or unreachable, a drain, clients
/// gone quiet), exported at 0 from the route's configuration on: `rate()` and `increase()` see
/// nothing of a series until it has a sample before the rise, so a route's first 1014 made
/// its series and showed no increase.
const EXPECTED_ENDS: [(u16, crate::relay::Cause); 8] = {
    use crate::relay::Cause;
    [
        (1000, Cause::Close),
        (1000, Cause::Closed),
        (1006, Cause::Gone),
        (1011, Cause::Failed),
        (1011, Cause::TimedOut),
        (1014, Cause::Unreachable),
        (1001, Cause::Shutdown),
        (1001, Cause::PingTimeout),
    ]
};

/// Why an agent's control link ends (`agent_disconnects_total{reason}`), all exported at 0 where
/// agents may connect.
pub const AGENT_DISCONNECTS: [&str; 5] = ["closed", "lost", "replaced", "revoked", "drained"];

/// The outcomes of a backend connect.
const CONNECT_OUTCOMES: [&str; 3] = ["ok", "failed", "shutdown"];

/// Every metric of one bridge.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    routes: RwLock<HashMap<String, Arc<RouteMetrics>>>,
    open: Family<RouteLabel, Gauge>,
    bytes: Family<BytesLabel, Counter>,
    ended: Family<EndLabel, Counter>,
    refused: Family<RefusedLabel, Counter>,
    connects: Family<ConnectLabel, Counter>,
    connect_failures: Family<FailureLabel, Counter>,
    agent_open_failures: Family<FailureLabel, Counter>,
    agent_connections: Counter,
    log_lines_dropped: Counter,
    agent_disconnects: Family<ReasonLabel, Counter>,
    token_lookups: Family<LookupLabel, Counter>,
    token_lookup_seconds: Family<SourceLabel, Histogram, fn() -> Histogram>,
    connect_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    tls: Family<OutcomeLabel, Counter>,
    cert_expiry: Family<CertLabel, Gauge<f64, AtomicU64>>,
    connections: Gauge,
    connections_max: Gauge,
    draining: Gauge,
    agents: Gauge,
    agent_idle_links: Gauge,
    agent_links_dialled: Counter,
    agent_links_returned: Counter,
    config_info: Family<ConfigLabel, Gauge>,
    /// The live sessions, for `/sessions`.
    pub sessions: Sessions,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with every metric described.
    pub fn new() -> Metrics {
        // The process metrics at the root, unprefixed as every client exports them; the
        // bridge's in a sub-registry that prefixes them.
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        process::started();
        let registry = root.sub_registry_with_prefix("wsbridge");
        let open = Family::<RouteLabel, Gauge>::default();
        registry.register("sessions_open", "Sessions open now, per route", open.clone());
        let bytes = Family::<BytesLabel, Counter>::default();
        registry.register(
            "session_bytes",
            "Payload bytes relayed per route and direction (up: client to backend), counted as they move",
            bytes.clone(),
        );
        let ended = Family::<EndLabel, Counter>::default();
        registry.register(
            "sessions_ended",
            "Sessions ended, by route, close code and who ended them (client, backend, bridge, operator)",
            ended.clone(),
        );
        let refused = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "handshakes_refused",
            "Connections refused before the upgrade, by HTTP status (0: closed without an answer) and reason",
            refused.clone(),
        );
        // At 0 from the start, as a route's series are: an alert on it sees the first rise.
        let (status, reason) = Refusal::ConnectionLimit.label();
        let _ = refused.get_or_create_owned(&RefusedLabel {
            status,
            reason,
            route: String::new(),
        });
        let connects = Family::<ConnectLabel, Counter>::default();
        registry.register(
            "backend_connects",
            "Backend connects by route and outcome (ok, failed, shutdown)",
            connects.clone(),
        );
        let connect_failures = Family::<FailureLabel, Counter>::default();
        registry.register(
            "backend_connect_failures",
            "Failed backend connects by route and reason (refused, unreachable, unresolved, timeout, tls, agent)",
            connect_failures.clone(),
        );
        let agent_open_failures = Family::<FailureLabel, Counter>::default();
        registry.register(
            "agent_open_failures",
            "Agent mode: sessions an agent could not open, by route and why (offline, no_service, busy, app, no_link, timeout); each is also a backend_connect_failures of reason agent",
            agent_open_failures.clone(),
        );
        let agent_connections = Counter::default();
        registry.register(
            "agent_connections",
            "Agent mode: agents' control links that logged in and were taken (a rise with agents_connected flat is an agent that keeps reconnecting)",
            agent_connections.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr did not take them (a Windows console with text selected, a paused terminal, a pipe nobody reads) while 10,000 were held already; read at scrape time",
            log_lines_dropped.clone(),
        );
        let agent_disconnects = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "agent_disconnects",
            "Agent mode: agents' control links that ended, by why (closed: by the agent; lost: no pong, or the connection broke; replaced: by a newer connection of the same agent; revoked: its secret removed or changed; drained: this server shutting down)",
            agent_disconnects.clone(),
        );
        let token_lookups = Family::<LookupLabel, Counter>::default();
        registry.register(
            "token_lookups",
            "Tokens asked of a Redis or API token source, by source and outcome (found, unknown, denied: a target off its allow-list, unavailable: no answer in time or a broken one; cached: answered by a Redis source's cache without asking)",
            token_lookups.clone(),
        );
        let token_lookup_seconds = Family::<SourceLabel, Histogram, fn() -> Histogram>::new_with_constructor(lookup_histogram);
        registry.register(
            "token_lookup_seconds",
            "Time a Redis or API token source took to answer a lookup (or to fail), per source; answers from a Redis source's cache are not in it",
            token_lookup_seconds.clone(),
        );
        let connect_seconds = Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(connect_histogram);
        registry.register(
            "backend_connect_seconds",
            "Time to connect a backend, per route (connects that ended in a shutdown are not observed)",
            connect_seconds.clone(),
        );
        let tls = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the listeners, by outcome (ok, failed)",
            tls.clone(),
        );
        let cert_expiry = Family::<CertLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until each listener certificate's notAfter (negative: expired), read at scrape time",
            cert_expiry.clone(),
        );
        // The process's (see `RELOADS`), registered in every bridge's registry.
        registry.register(
            "reloads",
            "Reloads by kind (config, certificates, tokens, credentials) and outcome (ok, failed)",
            RELOADS.count.clone(),
        );
        registry.register(
            "reload_last_timestamp_seconds",
            "Unix time of the last reload of each kind and outcome",
            RELOADS.time.clone(),
        );
        registry.register(
            "last_reload_successful",
            "1 while what the last reload of each kind read is in force (or nothing was reloaded since start-up), 0 after a failed one (the previous files stay in force)",
            RELOADS.last_ok.clone(),
        );
        // Which wsbridge answers (the Prometheus convention: a gauge at 1 whose labels say it),
        // for dashboards that compare instances during a rolling upgrade.
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Always 1; its version label is this wsbridge's", build_info);
        let connections = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open now (sessions, HTTP requests, handshakes, agents' control links and idle data links), counted against max_connections; read at scrape time",
            connections.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 from the moment a drain (SIGTERM) starts, as /readyz turns 503; else 0; read at scrape time",
            draining.clone(),
        );
        let connections_max = Gauge::default();
        registry.register(
            "connections_max",
            "max_connections in force (after the open-file fit), read at scrape time",
            connections_max.clone(),
        );
        let agents = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents connected now (agent mode), read at scrape time",
            agents.clone(),
        );
        let agent_idle_links = Gauge::default();
        registry.register(
            "agent_idle_links",
            "Idle data links of all connected agents at the server, read at scrape time",
            agent_idle_links.clone(),
        );
        let agent_links_dialled = Counter::default();
        registry.register(
            "agent_links_dialled",
            "Data links agents dialled that the server took into their pools, read at scrape time",
            agent_links_dialled.clone(),
        );
        let agent_links_returned = Counter::default();
        registry.register(
            "agent_links_returned",
            "Times a data link went back to its agent's pool after a session, to carry the next; read at scrape time",
            agent_links_returned.clone(),
        );
        // Which configuration each instance runs (an instance that missed a SIGHUP in a fleet
        // shows another hash), as build_info says which wsbridge.
        let config_info = Family::<ConfigLabel, Gauge>::default();
        registry.register(
            "config_info",
            "Always 1; its labels are the configuration file in force and the SHA-256 of its text (sha256sum's), set at start and by each reload that succeeded",
            config_info.clone(),
        );
        Metrics {
            registry: root,
            routes: RwLock::default(),
            open,
            bytes,
            ended,
            refused,
            connects,
            connect_failures,
            agent_open_failures,
            agent_connections,
            log_lines_dropped,
            agent_disconnects,
            token_lookups,
            token_lookup_seconds,
            connect_seconds,
            tls,
            cert_expiry,
            connections,
            connections_max,
            draining,
            agents,
            agent_idle_links,
            agent_links_dialled,
            agent_links_returned,
            config_info,
            sessions: Sessions::default(),
        }
    }

    /// The configuration now in force ([`crate::config::Config::text_sha256`]).
    pub fn config_in_force(&self, config: &crate::config::Config) {
        self.config_info.clear();
        let label = ConfigLabel {
            file: config.origin.clone(),
            sha256: config.text_sha256.clone().unwrap_or_default(),
        };
        self.config_info.get_or_create(&label).set(1);
        if !config.agents.endpoints.is_empty() {
            for reason in AGENT_DISCONNECTS {
                let _ = self.agent_disconnects.get_or_create_owned(&ReasonLabel { reason });
            }
        }
    }

    /// Sets whether a drain has started.
    pub fn draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }

    /// Sets the connections open now and the cap in force.
    pub fn connections(&self, open: usize, max: usize) {
        self.connections.set(i64::try_from(open).unwrap_or(i64::MAX));
        self.connections_max.set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Sets the agent metrics: agents connected and their idle data links in all (gauges), and
    /// the registry's running totals of links dialled and returned (counters: the registry
    /// counts and lives as long as the bridge; `fetch_max`, so that of two scrapes at once the
    /// one that read the totals first cannot set them back).
    pub fn agents(&self, connected: usize, idle_links: usize, (dialled, returned): (u64, u64)) {
        self.agents.set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.agent_idle_links.set(i64::try_from(idle_links).unwrap_or(i64::MAX));
        self.agent_links_dialled.inner().fetch_max(dialled, Ordering::Relaxed);
        self.agent_links_returned.inner().fetch_max(returned, Ordering::Relaxed);
    }

    /// Sets `log_lines_dropped_total` from the log's running count (`fetch_max`, as
    /// [`Metrics::agents`] does for its totals).
    pub fn log_lines_dropped(&self, dropped: u64) {
        self.log_lines_dropped.inner().fetch_max(dropped, Ordering::Relaxed);
    }

    /// The handles of the route named `name` (created when the route is configured, or on its
    /// first session: a route made from a token source's token).
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let route = route_label(name);
        let route = route.as_ref();
        if let Some(r) = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(route) {
            return r.clone();
        }
        // One statement each: a family's guard lives to the end of its statement, and a second
        // `get_or_create` of the same family inside it would wait for that guard forever.
        let open = self.open.get_or_create(&RouteLabel { route: route.to_owned() }).clone();
        let up = BytesLabel {
            route: route.to_owned(),
            direction: "up",
        };
        let bytes_up = self.bytes.get_or_create(&up).clone();
        let down = BytesLabel {
            route: route.to_owned(),
            direction: "down",
        };
        let bytes_down = self.bytes.get_or_create(&down).clone();
        let connects = CONNECT_OUTCOMES.map(|outcome| {
            let label = ConnectLabel {
                route: route.to_owned(),
                outcome,
            };
            self.connects.get_or_create(&label).clone()
        });
        let connect_seconds = self.connect_seconds.get_or_create_owned(&RouteLabel { route: route.to_owned() });
        let r = Arc::new(RouteMetrics {
            route: route.to_owned(),
            open,
            bytes_up,
            bytes_down,
            connects,
            connect_seconds,
            ended: (0..(KNOWN_CODES.len() + 1) * crate::relay::Cause::ALL.len())
                .map(|_| OnceLock::new())
                .collect(),
        });
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.to_owned())
            .or_insert(r)
            .clone()
    }

    /// A session of `route` ended with `code`, for `cause` (which says the side too; its bytes
    /// were counted as they moved: [`Session::moved`]).
    pub fn session_ended(&self, route: &RouteMetrics, code: u16, cause: crate::relay::Cause) {
        self.ended(route, code, cause).inc();
    }

    /// The `sessions_ended_total` counter of `route`, `code` and `cause`.
    fn ended<'r>(&self, route: &'r RouteMetrics, code: u16, cause: crate::relay::Cause) -> &'r Counter {
        let code_index = KNOWN_CODES.iter().position(|(c, _)| *c == code).unwrap_or(KNOWN_CODES.len());
        let label = || EndLabel {
            route: route.route.clone(),
            code: code_label(code),
            ended_by: cause.ended_by(),
            cause: cause.as_str(),
        };
        route.ended[code_index * crate::relay::Cause::ALL.len() + cause as usize].get_or_init(|| self.ended.get_or_create(&label()).clone())
    }

    /// A route of the configuration in force (named `name`; `capped`: it has `max_sessions`):
    /// its series are exported from now on, at 0, with the ends in [`EXPECTED_ENDS`] and, when
    /// capped, its `route_full` refusals, so that their first rise shows (a series made by its
    /// first event has no increase to a rate or an alert).
    pub fn route_configured(&self, name: &str, capped: bool) {
        let route = self.route(name);
        for (code, cause) in EXPECTED_ENDS {
            self.ended(&route, code, cause);
        }
        if capped {
            let (status, reason) = Refusal::Http(503).label();
            let label = RefusedLabel {
                status,
                reason,
                route: route.route.clone(),
            };
            let _ = self.refused.get_or_create_owned(&label);
        }
    }

    /// A connection was refused before the upgrade, before a route was found.
    pub fn refused(&self, why: Refusal) {
        self.refused_by(why, None);
    }

    /// A connection was refused before the upgrade, by `route` when one refused it.
    pub fn refused_by(&self, why: Refusal, route: Option<&str>) {
        let (status, reason) = why.label();
        // A token's route by its source, as the session metrics label it: per-token names would
        // make a series per token.
        let route = route.map(route_label).unwrap_or_default().into_owned();
        self.refused.get_or_create(&RefusedLabel { status, reason, route }).inc();
    }

    /// A backend connect of `route` ended after `took`: `ok`, `failed` or `shutdown`.
    pub fn backend_connect(&self, route: &RouteMetrics, outcome: &'static str, took: std::time::Duration) {
        match CONNECT_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => route.connects[i].inc(),
            None => self
                .connects
                .get_or_create(&ConnectLabel {
                    route: route.route.clone(),
                    outcome,
                })
                .inc(),
        };
        if outcome != "shutdown" {
            // The one lock per session on the way: the route's histogram's (a few ns; contended
            // only by connects of the same route ending at the same instant).
            route.connect_seconds.observe(took.as_secs_f64());
        }
    }

    /// A backend connect of `route` failed: counted by [`crate::backend::ConnectError::kind`],
    /// and an agent's by its own reason too.
    pub fn backend_failure(&self, route: &RouteMetrics, e: &crate::backend::ConnectError) {
        let label = FailureLabel {
            route: route.route.clone(),
            reason: e.kind(),
        };
        self.connect_failures.get_or_create(&label).inc();
        if let Some(why) = e.agent_refusal() {
            let label = FailureLabel {
                route: route.route.clone(),
                reason: why.as_str(),
            };
            self.agent_open_failures.get_or_create(&label).inc();
        }
    }

    /// An agent's control link logged in and was taken.
    pub fn agent_connected(&self) {
        self.agent_connections.inc();
    }

    /// An agent's control link ended: `closed`, `lost`, `replaced`, `revoked` or `drained`.
    pub fn agent_disconnected(&self, reason: &'static str) {
        self.agent_disconnects.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A lookup in the Redis or API token source named `source` ended with `outcome` (`found`,
    /// `unknown`, `denied`, `unavailable`; `cached`: a Redis source's cache answered, not timed)
    /// after `took`.
    pub fn token_lookup(&self, source: &str, outcome: &'static str, took: Option<std::time::Duration>) {
        let label = LookupLabel {
            source: source.to_owned(),
            outcome,
        };
        self.token_lookups.get_or_create(&label).inc();
        if let Some(took) = took {
            let label = SourceLabel { source: label.source };
            self.token_lookup_seconds.get_or_create(&label).observe(took.as_secs_f64());
        }
    }

    /// A TLS handshake on a listener succeeded or failed.
    pub fn tls_handshake(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.tls.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A reload of the configuration ended.
    pub fn config_reloaded(&self, ok: bool) {
        counted("config", ok);
        in_force("config", "", ok);
    }

    /// A SIGHUP's reload of every listener's certificates ended (each listener's outcome is
    /// [`certificate_reloaded`]).
    pub fn certificates_reloaded(&self, ok: bool) {
        counted("certificates", ok);
    }

    /// Sets the seconds left on a listener certificate (`cert` is its configured file).
    pub fn certificate_expiry(&self, cert: &str, seconds: f64) {
        self.cert_expiry.get_or_create(&CertLabel { cert: cert.to_owned() }).set(seconds);
    }

    /// The registry in the OpenMetrics text format (what Prometheus asks for).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `/metrics` in the Prometheus text format 0.0.4 for a client that does not ask for OpenMetrics
/// (curl, `promtool check metrics`, older scrapers), made from [`Metrics::encode`]'s OpenMetrics:
/// the same samples, with the metadata named as that format names it. OpenMetrics names a
/// counter's family without `_total` and an info metric's without `_info`, beside samples that
/// have them; a 0.0.4 reader took every counter for an untyped metric without help. `# UNIT`
/// and `# EOF` have no 0.0.4 form and are left out; `info` is a gauge there, `unknown` untyped.
pub fn text_004(openmetrics: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(openmetrics.len());
    // A family's metadata, held until its TYPE says how to name it.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        let Some(comment) = line.strip_prefix("# ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let mut words = comment.splitn(3, ' ');
        let (kind, name, rest) = (words.next(), words.next().unwrap_or(""), words.next().unwrap_or(""));
        match kind {
            Some("HELP") => help = Some((name, rest)),
            Some("TYPE") => {
                let (renamed, kind) = match rest {
                    "counter" => (format!("{name}_total"), "counter"),
                    "info" => (format!("{name}_info"), "gauge"),
                    "unknown" => (name.to_owned(), "untyped"),
                    other => (name.to_owned(), other),
                };
                if let Some((_, text)) = help.take().filter(|(family, _)| *family == name) {
                    let _ = writeln!(out, "# HELP {renamed} {text}");
                }
                let _ = writeln!(out, "# TYPE {renamed} {kind}");
            }
            _ => {}
        }
    }
    out
}

impl RouteMetrics {
    /// A session of this route opened; the gauge goes down when the guard drops.
    pub fn open(self: &Arc<Self>) -> OpenGuard {
        self.open.inc();
        OpenGuard(self.clone())
    }
}

/// Holds a route's open-sessions gauge up while a session lives.
#[derive(Debug)]
pub struct OpenGuard(Arc<RouteMetrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

/// One live session, as `/sessions` shows it.
#[derive(Debug)]
pub struct Session {
    /// Its number, unique in this process's bridge.
    pub id: u64,
    /// The client's address (a PROXY header's or a trusted proxy's when there is one).
    pub client: SocketAddr,
    /// The route's name.
    pub route: String,
    /// The route's handles: its byte counters grow as the session moves bytes.
    pub metrics: Arc<RouteMetrics>,
    /// The backend it is connected to.
    pub target: String,
    /// When it opened.
    pub started: Instant,
    /// Payload bytes client → backend so far (the relay stores them as it goes).
    pub bytes_up: AtomicU64,
    /// Payload bytes backend → client so far.
    pub bytes_down: AtomicU64,
    /// Set before `close` is cancelled when an operator ends the session, so it closes with
    /// "closed by the operator" rather than as a shutdown.
    pub by_operator: AtomicBool,
    /// Cancelled to end the session (a child of the bridge's shutdown token).
    pub close: CancellationToken,
}

impl Session {
    /// The relay has moved `up` and `down` payload bytes in all so far, of which `published`
    /// were published before (and is brought up to date): stored for `/sessions` and the
    /// difference added to the route's byte counters, so both always agree with what the
    /// session's log line will say, whenever the session ends. Per direction that moved: a
    /// relaxed store and a relaxed add; nothing when nothing moved.
    pub fn moved(&self, up: u64, down: u64, published: &mut (u64, u64)) {
        if up != published.0 {
            self.bytes_up.store(up, Ordering::Relaxed);
            self.metrics.bytes_up.inc_by(up.saturating_sub(published.0));
            published.0 = up;
        }
        if down != published.1 {
            self.bytes_down.store(down, Ordering::Relaxed);
            self.metrics.bytes_down.inc_by(down.saturating_sub(published.1));
            published.1 = down;
        }
    }

    /// Ends the session as the operator's request: 1001 "closed by the operator".
    pub fn end_by_operator(&self) {
        self.by_operator.store(true, Ordering::Release);
        self.close.cancel();
    }
}

/// The live sessions by id.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Session>>>,
}

impl Sessions {
    /// Registers a session of the route named `route`, whose handles are `metrics`; it leaves
    /// the table when the returned guard drops.
    pub fn add(
        &self,
        client: SocketAddr,
        (route, metrics): (&str, Arc<RouteMetrics>),
        target: String,
        close: CancellationToken,
    ) -> SessionGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id,
            client,
            route: route.to_owned(),
            metrics,
            target,
            started: Instant::now(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            by_operator: AtomicBool::new(false),
            close,
        });
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, session.clone());
        SessionGuard { table: self, session }
    }

    /// The session with this id, if it is live.
    pub fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// How many sessions are live now.
    pub fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<_> = self.live.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        all.sort_by_key(|s| s.id);
        all
    }
}

/// Keeps a session in the table while it lives.
#[derive(Debug)]
pub struct SessionGuard<'a> {
    table: &'a Sessions,
    /// The entry.
    pub session: Arc<Session>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.table.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.session.id);
    }
}

/// The process metrics every Prometheus client exports, without the `wsbridge_` prefix
/// (<https://prometheus.io/docs/instrumenting/writing_clientlibs/#process-metrics>), read at
/// scrape time. What cannot be read on this platform, or now, is left out, never guessed.
pub mod process {
    use std::sync::LazyLock;
    use std::time::{SystemTime, UNIX_EPOCH};

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    /// When this process started, as far as it can tell without the system's word: `main`'s first
    /// step ([`started`]), or, in a program that embeds the library, its first bridge.
    static STARTED: LazyLock<f64> = LazyLock::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));

    /// Notes the time now as the process's start, where the system cannot say it (every platform
    /// but Linux): call it first thing in `main`.
    pub fn started() {
        LazyLock::force(&STARTED);
    }

    /// The figures of one scrape; `None`: not known here.
    #[derive(Debug, Default, Clone, PartialEq)]
    pub struct Figures {
        /// Unix time the process started.
        pub start_time_seconds: Option<f64>,
        /// User and system CPU time spent.
        pub cpu_seconds: Option<f64>,
        /// Descriptors open.
        pub open_fds: Option<u64>,
        /// The soft limit on descriptors.
        pub max_fds: Option<u64>,
        /// Resident memory.
        pub resident_memory_bytes: Option<u64>,
        /// Virtual memory.
        pub virtual_memory_bytes: Option<u64>,
    }

    /// Reads this process's figures now.
    pub fn read() -> Figures {
        let figures = Figures {
            start_time_seconds: Some(*STARTED),
            max_fds: crate::platform::open_file_limit(),
            ..Figures::default()
        };
        #[cfg(target_os = "linux")]
        let figures = linux::read(figures);
        figures
    }

    #[cfg(target_os = "linux")]
    mod linux {
        use super::Figures;

        /// From /proc/self/stat (CPU time, start, memory: the file `ps` reads), /proc/stat (boot
        /// time) and /proc/self/fd (one entry per descriptor).
        pub(super) fn read(mut figures: Figures) -> Figures {
            let ticks = rustix::param::clock_ticks_per_second() as f64;
            let page = rustix::param::page_size() as u64;
            let stat = std::fs::read_to_string("/proc/self/stat").ok();
            if let Some(stat) = stat.as_deref().and_then(parse_stat) {
                if ticks > 0.0 {
                    figures.cpu_seconds = Some(stat.utime.saturating_add(stat.stime) as f64 / ticks);
                    // Read once: it does not change (/proc/stat is a few kilobytes per scrape else).
                    static START: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
                    let start = START.get_or_init(|| {
                        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s))?;
                        Some(boot as f64 + stat.starttime as f64 / ticks)
                    });
                    if let Some(start) = start {
                        figures.start_time_seconds = Some(*start);
                    }
                }
                figures.virtual_memory_bytes = Some(stat.vsize);
                figures.resident_memory_bytes = Some(stat.rss.saturating_mul(page));
            }
            // The directory's own descriptor is among them, as every client counts it.
            figures.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
            figures
        }

        /// The fields of /proc/self/stat used here (see proc_pid_stat(5)).
        #[derive(Debug, PartialEq)]
        pub(super) struct Stat {
            pub utime: u64,
            pub stime: u64,
            pub starttime: u64,
            pub vsize: u64,
            pub rss: u64,
        }

        /// Fields 14, 15, 22, 23 and 24; after the command, which is in parentheses and may hold
        /// spaces and parentheses itself, so the fields are counted from the last `)`.
        pub(super) fn parse_stat(stat: &str) -> Option<Stat> {
            let rest = &stat[stat.rfind(')')? + 1..];
            // Field 3 (the state) is the first after the command.
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
            Some(Stat {
                utime: field(14)?,
                stime: field(15)?,
                starttime: field(22)?,
                vsize: field(23)?,
                rss: field(24)?,
            })
        }

        /// `btime` of /proc/stat: the Unix time the system booted.
        pub(super) fn boot_time(stat: &str) -> Option<u64> {
            stat.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        }
    }

    /// Exports [`read`]'s figures on each scrape.
    #[derive(Debug)]
    pub(super) struct ProcessCollector;

    /// One gauge, if its value is known.
    fn gauge<N: EncodeGaugeValue>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: Option<N>) -> std::fmt::Result {
        let Some(value) = value else { return Ok(()) };
        let gauge = ConstGauge::new(value);
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
    }

    impl Collector for ProcessCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let f = read();
            let e = &mut encoder;
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                f.start_time_seconds,
            )?;
            gauge(e, "process_open_fds", "Number of open file descriptors", f.open_fds)?;
            gauge(e, "process_max_fds", "Maximum number of open file descriptors", f.max_fds)?;
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                f.resident_memory_bytes,
            )?;
            gauge(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                f.virtual_memory_bytes,
            )?;
            if let Some(cpu) = f.cpu_seconds {
                // A counter: the encoder adds `_total`.
                let counter = ConstCounter::new(cpu);
                counter.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds",
                    None,
                    counter.metric_type(),
                )?)?;
            }
            Ok(())
        }
    }

    #[cfg(all(test, target_os = "linux"))]
    mod tests {
        use super::linux::*;

        #[test]
        fn stat_fields_are_counted_from_the_last_parenthesis() {
            // A command with a space and a parenthesis of its own.
            let line = "4242 (ws bridge) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 120 0 0 20 0 3 0 123456 104857600 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
            let stat = parse_stat(line).expect("parses");
            assert_eq!(
                stat,
                Stat {
                    utime: 250,
                    stime: 120,
                    starttime: 123456,
                    vsize: 104857600,
                    rss: 2048,
                }
            );
            assert_eq!(parse_stat("4242 (cut short) S 1"), None);
            assert_eq!(parse_stat("no parenthesis"), None);
        }

        #[test]
        fn boot_time_is_btime() {
            assert_eq!(
                boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n"),
                Some(1_700_000_000)
            );
            assert_eq!(boot_time("cpu  1 2 3\n"), None);
        }

        #[test]
        fn this_process_reads_sanely() {
            let f = super::read();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let start = f.start_time_seconds.expect("start time");
            assert!(start <= now + 1.0 && start > now - 86400.0 * 365.0, "{start} vs {now}");
            let open = f.open_fds.expect("open fds");
            assert!(open >= 3 && f.max_fds.is_none_or(|m| open <= m), "{f:?}");
            assert!(f.resident_memory_bytes.expect("rss") > 0 && f.virtual_memory_bytes.expect("vsize") > 0);
            assert!(f.cpu_seconds.expect("cpu") >= 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_from_peers_do_not_grow_the_label_set() {
        assert_eq!(code_label(1001), "1001");
        assert_eq!(code_label(4321), "other");
        assert_eq!(code_label(0), "other");
    }

    #[test]
    fn routes_from_tokens_are_labelled_by_their_source() {
        assert_eq!(route_label("path /vnc"), "path /vnc");
        assert_eq!(route_label("token #0123456789ab from /etc/t"), "tokens from /etc/t");
        assert_eq!(route_label("JWT token #0123456789ab"), "JWT tokens");
        assert_eq!(route_label("token #0123456789ab"), "inline tokens");
    }

    /// The Prometheus text format names each family's metadata as its samples are named: every
    /// sample belongs to the family a TYPE line before it names (a histogram's by its
    /// `_bucket`, `_sum` and `_count`), every TYPE has its HELP, and nothing OpenMetrics-only is
    /// left; the samples are OpenMetrics' own, line for line.
    #[test]
    fn the_prometheus_text_format_names_families_as_their_samples() {
        let metrics = Metrics::new();
        metrics.route_configured("path /vnc", true);
        let route = metrics.route("path /vnc");
        metrics.session_ended(&route, 1000, crate::relay::Cause::Close);
        metrics.backend_connect(&route, "ok", std::time::Duration::from_millis(3));
        metrics.agent_disconnected("lost");
        let openmetrics = metrics.encode();
        let text = text_004(&openmetrics);
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(samples(&text), samples(&openmetrics));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        let (mut family, mut kind, mut helped) = (String::new(), String::new(), None::<String>);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped = rest.split(' ').next().map(str::to_owned);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                (family, kind) = rest.split_once(' ').map(|(f, k)| (f.to_owned(), k.to_owned())).unwrap();
                assert_eq!(helped.take().as_deref(), Some(family.as_str()), "no HELP before {line}");
                assert!(["counter", "gauge", "histogram", "untyped"].contains(&kind.as_str()), "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let belongs = match kind.as_str() {
                    "histogram" => ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{family}{s}")),
                    _ => name == family,
                };
                assert!(belongs, "{line} under # TYPE {family} {kind}");
            }
        }
        for series in [
            "# TYPE wsbridge_sessions_ended_total counter",
            r#"wsbridge_sessions_ended_total{route="path /vnc",code="1014",ended_by="bridge",cause="unreachable"} 0"#,
            r#"wsbridge_sessions_ended_total{route="path /vnc",code="1000",ended_by="client",cause="close"} 1"#,
            r#"wsbridge_handshakes_refused_total{status="503",reason="route_full",route="path /vnc"} 0"#,
            r#"wsbridge_agent_disconnects_total{reason="lost"} 1"#,
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE wsbridge_build_info gauge",
        ] {
            assert!(text.lines().any(|l| l == series), "no {series} in:\n{text}");
        }
    }
}
