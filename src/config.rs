//! The configuration model: what a TOML file (or the websockify-style command line, see
//! [`crate::cli`]) says, validated into ready-to-use values.
//!
//! Two levels, as in ripgrep: private `Raw*` structs mirror the file (`deny_unknown_fields`, so a
//! typo is an error, not a silently ignored key), and [`Config`] holds validated values. Values that
//! can be checked on their own (a target, a duration, a size) are checked while parsing, so the TOML
//! parser reports them with the file's line and a caret under the field; checks that need more than
//! one value (duplicate routes, a token file that cannot be read) carry the line through
//! [`toml::Spanned`].
//!
//! The TLS settings a listener or route states are configuration too: they live in [`tls`], and
//! [`crate::tls`] builds rustls configs from them (imports point one way, `tls` → `config`).

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

pub mod admin;
pub mod api;
mod parse_error;
pub(crate) use parse_error::parse_message;
pub mod policy;
pub mod redis;
pub mod tls;

use self::policy::{ListenerAccess, RawPolicy, RoutePolicy};
use self::tls::{BackendTlsSettings, CertFiles, ClientAuth, MinVersion, TlsSettings};
use crate::policy::{AddressLimits, OriginRule};

/// The whole, validated configuration of one wsbridge process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (a file path, or "command line"), for messages.
    pub origin: String,
    /// The SHA-256 of the file's text (64 hex digits), for `wsbridge_config_info`: which file an
    /// instance runs, to compare across a fleet and with `sha256sum`. `None` from the command line.
    pub text_sha256: Option<String>,
    /// Sockets to accept WebSocket (and static HTTP) connections on.
    pub listeners: Vec<ListenerConfig>,
    /// Routes matched by path or inline token.
    pub routes: Vec<RouteConfig>,
    /// websockify-style token files or directories.
    pub token_sources: Vec<TokenSourceConfig>,
    /// Every deadline a peer can make us wait on.
    pub timeouts: Timeouts,
    /// Caps on connections and message sizes.
    pub limits: Limits,
    /// Log output format.
    pub log_format: LogFormat,
    /// Log to this file (appended to; set aside at `log_max_size` where there is one: see
    /// [`crate::logging::LogFile`]) instead of stderr; `[log] file` or `--log-file`.
    pub log_file: Option<PathBuf>,
    /// The size at which the log file is set aside as `FILE.old` ([`crate::logging::LogFile`]);
    /// `None`: never (a rotator such as logrotate's job). By default none on Unix, where
    /// logrotate is at hand, and [`crate::logging::LogFile::LIMIT`] on Windows, where nothing
    /// else would bound it (`[log] max_size`).
    pub log_max_size: Option<u64>,
    /// `[log] token_key_file`: the key of the tags that stand for tokens in logs, shared by the
    /// instances that read the same file ([`redact`]); `None`: a key per process. Put in force
    /// by [`set_token_key`], which the binary calls before it builds any route (an embedder
    /// calls it too).
    pub log_token_key: Option<TokenKey>,
    /// Origins admitted on routes and listeners that set none: same-origin for a configuration
    /// file (and the demo); any origin on the websockify-style command line, as websockify does.
    pub default_origins: Vec<OriginRule>,
    /// Agent mode: declared agents and the endpoints they dial.
    pub agents: crate::agent::AgentsConfig,
    /// The admin listener (health, readiness, metrics, sessions); off when `None`.
    pub admin: Option<admin::AdminConfig>,
}

/// One listening socket.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where to accept connections: a TCP address, a unix socket path, or sockets passed by
    /// systemd socket activation.
    pub addr: ListenOn,
    /// Directory of static files served to plain (non-upgrade) GET requests.
    pub web: Option<PathBuf>,
    /// Whether a directory without `index.html` is listed (off: 404).
    pub web_listing: bool,
    /// Serve files that symlinks point to outside `web` (off: 404).
    pub web_follow_symlinks: bool,
    /// Serve and list hidden files such as `.git/` and `.env` (off: 404).
    pub web_dotfiles: bool,
    /// For an IPv6 address: `Some(true)` IPv6 clients only, `Some(false)` IPv4 clients too;
    /// `None`: IPv4 too for `[::]` unless another listener here takes the port's IPv4 side.
    pub ipv6_only: Option<bool>,
    /// Default origins, PROXY protocol, trusted proxies.
    pub access: ListenerAccess,
    /// TLS (`wss://`) on this listener.
    pub tls: Option<TlsSettings>,
}

/// How a route is selected for a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Matcher {
    /// The request path equals this (query string excluded).
    Path(String),
    /// Any path: the websockify single-target mode.
    AnyPath,
    /// The `token` query parameter equals this.
    Token(String),
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Path(p) => write!(f, "path {p}"),
            Matcher::AnyPath => f.write_str("any path"),
            // Tokens are credentials: never print them whole.
            Matcher::Token(t) => write!(f, "token {}", redact(t)),
        }
    }
}

/// A secret (a token) as logs and `wsbridge check` show it: `#` and 12 hex digits of an
/// HMAC-SHA256 of it under a key, so two tokens stay apart (`desk1` and `desk2` differ), one
/// token is recognisable across log lines, and nothing of the token shows: no prefix, no length,
/// and without the key not even a short token can be found by trying candidates against the tag.
/// The key is `[log] token_key_file`'s ([`set_token_key`]: the same tags on every instance that
/// shares the file, and across restarts), or else drawn at random once per process. ring is the
/// TLS provider's crate already.
pub fn redact(secret: &str) -> String {
    static KEY: std::sync::OnceLock<ring::hmac::Key> = std::sync::OnceLock::new();
    let key = SHARED_KEY.get().map(|(_, k)| k);
    redact_with(key.unwrap_or_else(|| KEY.get_or_init(redaction_key)), secret)
}

/// The key [`set_token_key`] set.
static SHARED_KEY: std::sync::OnceLock<(TokenKey, ring::hmac::Key)> = std::sync::OnceLock::new();

/// Tags tokens under `key` from now on, for the rest of the process (set once, at the start,
/// before any route is built). False when a key was set already.
pub fn set_token_key(key: &TokenKey) -> bool {
    SHARED_KEY
        .set((key.clone(), ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0)))
        .is_ok()
}

/// The key tokens are tagged under, when [`set_token_key`] set one.
pub fn token_key_in_force() -> Option<&'static TokenKey> {
    SHARED_KEY.get().map(|(k, _)| k)
}

/// `[log] token_key_file`'s content: the key of the tags that stand for tokens in logs. Never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey(Vec<u8>);

impl TokenKey {
    /// The shortest key taken: 128 bits written as hex, or as many characters of anything.
    pub const MIN: usize = 16;
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn redact_with(key: &ring::hmac::Key, secret: &str) -> String {
    let tag = ring::hmac::sign(key, secret.as_bytes());
    let mut out = String::from("#");
    for b in &tag.as_ref()[..6] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The process's redaction key: from the system's random source, or, should that fail, from the
/// random keys std draws for its hash maps (still unknown outside this process).
fn redaction_key() -> ring::hmac::Key {
    use std::hash::BuildHasher;
    ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new()).unwrap_or_else(|_| {
        let bytes: Vec<u8> = (0..4u8)
            .flat_map(|i| std::collections::hash_map::RandomState::new().hash_one(i).to_le_bytes())
            .collect();
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes)
    })
}

/// A route from the configuration: a matcher, a target and how to carry the bytes.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// How requests select this route.
    pub matcher: Matcher,
    /// Where the bytes go.
    pub target: Target,
    /// Framing, subprotocols, limits.
    pub options: RouteOptions,
}

/// Per-route behaviour of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOptions {
    /// How backend bytes become WebSocket messages.
    pub framing: Framing,
    /// Subprotocols this route accepts, in no particular order; the client's preference wins.
    pub subprotocols: Vec<String>,
    /// Largest client message accepted (close 1009 above it); `None`: no limit. The relay streams
    /// messages through without holding them, so a limit is a policy, not a memory bound. In
    /// `lines` framing it is also the longest backend line kept before it is sent in pieces
    /// ([`DEFAULT_MAX_LINE`] when `None`).
    pub max_message_size: Option<usize>,
    /// Most concurrent sessions on this route (503 above it); `None` is no cap of its own.
    pub max_sessions: Option<usize>,
    /// Only clients whose TLS certificate's subject CN is in this list (403 otherwise).
    pub client_cn: Option<Vec<String>>,
    /// Connect to the backend over TLS.
    pub backend_tls: Option<BackendTlsSettings>,
    /// Who may open a session: origins, networks, authentication, caps per client address.
    pub policy: RoutePolicy,
    /// Record sessions to files (websockify's `--record`); `None` (the default): not recorded.
    pub record: Option<crate::record::RecordConfig>,
}

/// How backend bytes are framed towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// Binary messages, as read (the default; what noVNC expects).
    #[default]
    Binary,
    /// Text messages of UTF-8; a code point is never split between two messages.
    Text,
    /// One text message per line (without its line ending); client messages get a `\n` appended.
    Lines,
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framing::Binary => "binary",
            Framing::Text => "text",
            Framing::Lines => "lines",
        })
    }
}

/// A backend address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A TCP `host:port`; the host is resolved at connect time and every address is tried.
    Tcp {
        /// Name or IP literal (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix stream socket.
    Unix(PathBuf),
    /// A service of a connected agent (agent mode, [`crate::agent`]).
    Agent {
        /// The agent's declared name.
        agent: String,
        /// The service name in the agent's own list.
        service: String,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
            Target::Agent { agent, service } => write!(f, "agent {agent} service {service}"),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    /// Parses `host:port`, `[v6]:port`, `unix:/path` or websockify's `unix_socket:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        for prefix in ["unix_socket:", "unix:"] {
            if let Some(path) = s.strip_prefix(prefix) {
                if path.is_empty() {
                    return Err(format!("invalid target {s:?}: empty unix socket path"));
                }
                if cfg!(windows) {
                    return Err(format!("invalid target {s:?}: {}", crate::platform::UNIX_SOCKETS_UNAVAILABLE));
                }
                return Ok(Target::Unix(PathBuf::from(path)));
            }
        }
        let (host, port) = split_target(s).ok_or_else(|| format!("invalid target {s:?}: expected HOST:PORT, [IPv6]:PORT or unix:/path"))?;
        if host.is_empty() {
            return Err(format!("invalid target {s:?}: empty host"));
        }
        if !is_host(host) {
            // Refused here, at start or when a token is read, not per session as a name that
            // does not resolve (a review: "a b:5900" was taken).
            let idn = match host.is_ascii() {
                true => "",
                false => "; write an international name in its ASCII form (xn--…)",
            };
            return Err(format!(
                "invalid target {s:?}: {host:?} is neither an IP address nor a host name (letters, digits, '-', '.', '_'){idn}"
            ));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid target {s:?}: port must be 1-65535"))?;
        Ok(Target::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

/// Whether `host` can name a host: an IP address (IPv6 with a `%zone` too) or a name of letters,
/// digits, `-`, `.` and `_` (found in internal names), no label empty.
fn is_host(host: &str) -> bool {
    if let Some((addr, zone)) = host.split_once('%') {
        return addr.parse::<std::net::Ipv6Addr>().is_ok()
            && !zone.is_empty()
            && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name
            .split('.')
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// A target's host and port: [`split_host_port`], or websockify's form of an IPv6 target, split
/// at its last colon (`::1:5900` is `[::1]:5900`): websockify's token files and Redis values take
/// the host as written before the last colon, so theirs have no brackets. Only when what comes
/// before the last colon is an IPv6 address (a host name has no colon).
pub fn split_target(s: &str) -> Option<(&str, &str)> {
    split_host_port(s).or_else(|| s.rsplit_once(':').filter(|(host, _)| host.parse::<std::net::Ipv6Addr>().is_ok()))
}

/// Splits `host:port` or `[v6]:port`; the host comes back without brackets.
pub fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        // An IPv6 literal without brackets is ambiguous.
        return None;
    }
    Some((host, port))
}

/// A websockify token file or directory of token files, JWTs, Redis, or an HTTP API.
#[derive(Debug, Clone)]
pub struct TokenSourceConfig {
    /// File, or directory whose every file is read; for a JWT source, its key file; for a Redis
    /// source, its name ([`self::redis::RedisTokenSource::name`]); for an API, its URL
    /// ([`self::api::ApiTokenSource::name`]).
    pub path: PathBuf,
    /// Tokens are JWTs naming their target (websockify's JWTTokenApi) rather than lines of files.
    pub jwt: Option<policy::JwtTokenSource>,
    /// Tokens are keys in Redis whose values name their target (websockify's TokenRedis).
    pub redis: Option<self::redis::RedisTokenSource>,
    /// Tokens are asked of an HTTP API whose answers name their target (websockify's
    /// JSONTokenApi and BaseTokenAPI).
    pub api: Option<self::api::ApiTokenSource>,
    /// Where the token is taken from in the request.
    pub lookup: TokenLookup,
    /// How a token file source names its tokens (unused by JWT, Redis and API sources).
    pub format: TokenFormat,
    /// Options for every route found in this source.
    pub options: RouteOptions,
}

/// How a file source holds its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TokenFormat {
    /// Lines `TOKEN: HOST:PORT` in a file or in every file of a directory (websockify's TokenFile).
    #[default]
    Lines,
    /// A directory in which each file's name is a token and its content the target (websockify's
    /// TokenFileName).
    FileNames,
    /// A directory of unix sockets, each named by its token: the target is the socket itself,
    /// looked up on every connection (websockify's UnixDomainSocketDirectory). Not on Windows.
    UnixSockets,
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenFormat::Lines => "lines",
            TokenFormat::FileNames => "file-names",
            TokenFormat::UnixSockets => "unix-sockets",
        })
    }
}

/// Where a request carries its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenLookup {
    /// The `token` query parameter (noVNC: `/websockify?token=…`).
    #[default]
    Query,
    /// The `Host` header without its port (websockify `--host-token`).
    Host,
}

impl fmt::Display for TokenLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenLookup::Query => "query",
            TokenLookup::Host => "host",
        })
    }
}

/// Every deadline. `None` means that wait is not bounded by a timer of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to the request read (TLS handshake included); token lookups and the backend
    /// connect have deadlines of their own.
    pub handshake: Duration,
    /// Backend connect, all resolved addresses together.
    pub connect: Duration,
    /// No bytes in either direction for this long ends a session (1001).
    pub idle: Option<Duration>,
    /// Longest life of a session, busy or not (1001).
    pub max_lifetime: Option<Duration>,
    /// Interval between pings to the client; `None`: no pings (no dead-peer detection above TCP).
    pub ping_interval: Option<Duration>,
    /// A ping unanswered for this long means the client is gone.
    pub pong_timeout: Duration,
    /// How long to wait for the client's close frame after sending ours.
    pub close: Duration,
    /// On SIGTERM/SIGINT, how long sessions get to finish.
    pub shutdown_grace: Duration,
    /// On SIGTERM/SIGINT, how long the bridge keeps accepting after `/readyz` turned 503, before
    /// it closes its listeners and its sessions: the time a load balancer needs to see the 503
    /// and send new sessions elsewhere. `None`: close at once (no balancer in front).
    pub drain_delay: Option<Duration>,
    /// Writing a static file or an error response: given up when nothing has been written for
    /// this long (a slow client that keeps reading a large file is not cut).
    pub http_write: Duration,
    /// Data sent to a TCP backend that its host acknowledges nothing of for this long (no ACK of
    /// the data, nor of probes of a shut window) ends the session: 1011 "backend timed out".
    /// A live backend that stops reading still answers and is never cut by it. Linux only
    /// (elsewhere the kernel's retransmissions give up after about 15 minutes); `None`: off.
    pub backend_ack_timeout: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            idle: None,
            max_lifetime: None,
            // On by default: a client that vanishes (laptop lid, lost network) would otherwise
            // hold its backend (often a one-viewer VNC server) for ever. 20 s keeps a ping inside
            // the 60 s idle cut of nginx and common load balancers, and 20 + 20 s finds a dead
            // client within 40 s.
            ping_interval: Some(Duration::from_secs(20)),
            pong_timeout: Duration::from_secs(20),
            close: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            // The 60 s that TCP keepalive gives a quiet backend, for one with data in flight,
            // which keepalive does not probe: a backend host gone dark while a page types into
            // it is otherwise held for the kernel's ~15 minutes of retransmissions.
            backend_ack_timeout: Some(Duration::from_secs(60)),
            // Off: without a balancer in front nobody reads /readyz, and a stop should be prompt.
            drain_delay: None,
            http_write: Duration::from_secs(30),
        }
    }
}

/// Caps.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Concurrent connections (sessions and HTTP requests together); above it: 503.
    pub max_connections: usize,
    /// Default largest client message, for routes that do not set their own; `None` (the
    /// default): no limit, as websockify has none and nothing buffers a message.
    pub max_message_size: Option<usize>,
    /// Sessions and new sessions per client address, over every route (429 above them).
    pub per_ip: AddressLimits,
    /// Connections at once from one client address (a PROXY header's, else the TCP peer's),
    /// counted from accept, so that one address cannot hold every connection slot with slow
    /// request heads; `None` (the default): no cap of its own.
    pub max_connections_per_ip: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_message_size: None,
            per_ip: AddressLimits::default(),
            max_connections_per_ip: None,
        }
    }
}

/// The longest unfinished backend line `lines` framing keeps (then sends it in pieces) on a route
/// with no `max_message_size`: there the bytes are really held, so this bound stays by default.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// A configuration with one listener and no routes, for the command line and tests to fill.
    pub fn new(origin: impl Into<String>) -> Self {
        Config {
            origin: origin.into(),
            text_sha256: None,
            listeners: Vec::new(),
            routes: Vec::new(),
            token_sources: Vec::new(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            log_format: LogFormat::Text,
            log_file: None,
            log_token_key: None,
            log_max_size: if cfg!(windows) {
                Some(crate::logging::LogFile::LIMIT)
            } else {
                None
            },
            default_origins: vec![OriginRule::SameOrigin],
            agents: crate::agent::AgentsConfig::default(),
            admin: None,
        }
    }

    /// Route options with this configuration's defaults.
    pub fn default_route_options(&self) -> RouteOptions {
        RouteOptions {
            framing: Framing::Binary,
            subprotocols: vec!["binary".to_owned()],
            max_message_size: self.limits.max_message_size,
            max_sessions: None,
            client_cn: None,
            backend_tls: None,
            policy: RoutePolicy::default(),
            record: None,
        }
    }

    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and where the problem is in it, the line and field.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::platform::read_text(path).map_err(|e| ConfigError::Io {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        Config::from_toml(&text, path)
    }

    /// Validates TOML text that came from `path` (relative paths inside resolve against its
    /// directory).
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and field.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let ctx = Ctx {
            file: &file,
            text,
            base: &base,
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            // One `[agent]` table is an agent's own file (a server declares `[[agent]]` tables).
            Err(_) if crate::agent::client::is_agent_text(text) => {
                return Err(ConfigError::Invalid {
                    file: file.clone(),
                    line: ctx.line_of("[agent]"),
                    field: "agent".into(),
                    message: "this is an agent's file (one [agent] table): run it with `wsbridge agent --config FILE`".into(),
                })
            }
            Err(e) => {
                return Err(ConfigError::Parse {
                    file: file.clone(),
                    message: parse_message(&e, text),
                })
            }
        };
        raw.validate(&ctx)
    }

    /// Checks what the command line or a file produced, beyond what parsing checks.
    ///
    /// # Errors
    /// A [`ConfigError::Invalid`] for the first problem found.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: self.origin.clone(),
            line: None,
            field: field.to_owned(),
            message,
        };
        if self.listeners.is_empty() {
            return Err(invalid("listen", "no listener: nothing to accept connections on".into()));
        }
        if self.routes.is_empty() && self.token_sources.is_empty() {
            return Err(invalid(
                "route",
                "no route and no token source: no connection could go anywhere".into(),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// What an operator should hear once at start-up (and from `wsbridge check`) about a
    /// configuration that works but may not do what they think: routes that any web page can
    /// use; an agent declared both in an `[[agent]]` table and in a fleet file, whose lines
    /// there are not used.
    pub fn warnings(&self) -> Vec<String> {
        let open_by_default = self.default_origins.contains(&OriginRule::Any)
            && self.listeners.iter().any(|l| l.access.origins.is_none())
            && self
                .routes
                .iter()
                .map(|r| &r.options)
                .chain(self.token_sources.iter().map(|s| &s.options))
                .any(|o| o.policy.origins.is_none());
        let mut out = Vec::new();
        if open_by_default {
            out.push(
                "any web page can open sessions through this bridge (a page on another site, in the browser of anyone who can \
                 reach it), as with websockify: restrict it with --origin https://your.site (repeatable), or use a \
                 configuration file, where routes admit their own origin only unless they list others"
                    .to_owned(),
            );
        }
        for source in &self.agents.sources {
            let Ok(names) = crate::agent::fleet::names(source) else { continue };
            for d in self.agents.declared.iter().filter(|d| names.contains(&d.name)) {
                out.push(format!(
                    "agent {} is declared in an [[agent]] table and in {}: the table's secret_sha256 is the one used, \
                     the file's lines for it are not (a rotation written there does nothing)",
                    d.name,
                    source.display()
                ));
            }
        }
        let client_cas: std::collections::BTreeSet<&Path> =
            self.listeners.iter().filter_map(|l| l.tls.as_ref()?.client_ca.as_deref()).collect();
        let by_cn = self
            .routes
            .iter()
            .map(|r| &r.options)
            .chain(self.token_sources.iter().map(|s| &s.options))
            .any(|o| o.client_cn.is_some());
        if by_cn && client_cas.len() > 1 {
            out.push(format!(
                "routes admit client certificates by client_cn, and the listeners trust {} client CAs ({}): a CN that \
                 any of them issues passes on every route that lists it (the common name is compared, not its CA)",
                client_cas.len(),
                client_cas.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        let t = &self.timeouts;
        if t.shutdown_grace < t.close {
            out.push(format!(
                "[timeouts] shutdown_grace ({:?}) is shorter than close ({:?}): at shutdown, sessions whose client does not \
                 answer the close frame are cut at the end of the grace period rather than the close deadline",
                t.shutdown_grace, t.close
            ));
        }
        if let Some(admin) = &self.admin {
            let short = admin.token.as_ref().is_some_and(|t| t.len() < ADMIN_TOKEN_MIN);
            if short && !admin.addr.ip().is_loopback() {
                out.push(format!(
                    "[admin] token is shorter than {ADMIN_TOKEN_MIN} characters on {}, off loopback, where it guards the session \
                     list and ending sessions: use a long random one (openssl rand -hex 32)",
                    admin.addr
                ));
            }
        }
        out
    }
}

/// Below this an admin token off loopback is warned about: a guessable token guards the
/// session list and ending sessions.
const ADMIN_TOKEN_MIN: usize = 16;

/// The effective listeners, timeouts and limits, for `wsbridge check`, in the configuration's own
/// words: each `key = value` as the TOML file would write it (`idle = "off"`, `connect = "5s"`,
/// `max_message_size = "1MiB"`), so a line can be read, and pasted back, without knowing Rust.
impl Config {
    /// One line per listener, then one for `[timeouts]` and one for `[limits]`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for l in &self.listeners {
            let _ = writeln!(out, "listen    {}", l.describe());
        }
        let _ = writeln!(out, "timeouts  {}", self.timeouts.describe());
        let _ = writeln!(out, "limits    {}", self.limits.describe());
        let origins: Vec<String> = self.default_origins.iter().map(|r| toml_str(&r.to_string())).collect();
        let _ = writeln!(
            out,
            "policy    origins = [{}] where neither a route nor its listener sets them",
            origins.join(", ")
        );
        if let Some(a) = &self.admin {
            let token = if a.token.is_some() { "set" } else { "none" };
            let tls = match &a.tls {
                Some(t) if a.requires_client_certificates() => format!(", TLS with {} and client certificates", t.default.cert.display()),
                Some(t) => format!(", TLS with {}", t.default.cert.display()),
                None => String::new(),
            };
            let _ = writeln!(out, "admin     addr = {} (token: {token}{tls})", toml_str(&a.addr.to_string()));
        }
        out
    }
}

impl ListenerConfig {
    /// A listener on `addr` with every other setting at its default (no static files, no TLS,
    /// no access settings), for code and tests that fill in what they need.
    pub fn new(addr: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            addr: ListenOn::Tcp(addr),
            web: None,
            web_listing: false,
            web_follow_symlinks: false,
            web_dotfiles: false,
            ipv6_only: None,
            access: ListenerAccess::default(),
            tls: None,
        }
    }
}

/// Whether one of `listeners` takes IPv4 clients on `port` (never port 0: each such listener
/// picks a port of its own).
fn ipv4_listener_on(listeners: &[ListenerConfig], port: u16) -> bool {
    port != 0
        && listeners
            .iter()
            .any(|l| matches!(l.addr, ListenOn::Tcp(a) if a.is_ipv4() && a.port() == port))
}

impl ListenerConfig {
    /// Whether this listener's socket takes IPv4 clients as well as IPv6 ones: as `ipv6_only`
    /// says, else `[::]` does unless a listener of `all` (the configuration's) takes the port's
    /// IPv4 side (as websockify's, systemd's and most servers' `[::]` do). An IPv4 or unix
    /// listener: no.
    pub fn dual_stack(&self, all: &[ListenerConfig]) -> bool {
        let ListenOn::Tcp(addr) = self.addr else { return false };
        if !addr.is_ipv6() {
            return false;
        }
        self.ipv6_only.map_or_else(
            || addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && !ipv4_listener_on(all, addr.port()),
            |only| !only,
        )
    }

    /// `addr = "…"`, then `web`, `web_listing` and `tls.*` where set.
    pub fn describe(&self) -> String {
        let mut out = format!("addr = {}", toml_str(&self.addr.to_string()));
        if let ListenOn::Unix { mode, .. } = &self.addr {
            let _ = write!(out, ", mode = \"{mode:04o}\"");
        }
        if let Some(only) = self.ipv6_only {
            let _ = write!(out, ", ipv6_only = {only}");
        }
        if let Some(web) = &self.web {
            let _ = write!(out, ", web = {}", toml_str(&web.display().to_string()));
            if self.web_listing {
                out.push_str(", web_listing = true");
            }
            if self.web_follow_symlinks {
                out.push_str(", web_follow_symlinks = true");
            }
            if self.web_dotfiles {
                out.push_str(", web_dotfiles = true");
            }
            if let Some(w) = &self.access.web_auth {
                let _ = write!(out, ", {}", w.describe());
            }
        }
        let a = &self.access;
        if let Some(o) = &a.origins {
            let list: Vec<String> = o.iter().map(|r| toml_str(&r.to_string())).collect();
            let _ = write!(out, ", origins = [{}]", list.join(", "));
        }
        if a.proxy_protocol {
            out.push_str(", proxy_protocol = true");
        }
        if !a.trusted_proxies.is_empty() {
            let list: Vec<String> = a.trusted_proxies.iter().map(|n| toml_str(&n.to_string())).collect();
            let _ = write!(out, ", trusted_proxies = [{}]", list.join(", "));
            if !a.proxy_protocol {
                let _ = write!(out, ", forwarded_header = \"{}\"", a.forwarded_header);
            }
        }
        if let Some(tls) = &self.tls {
            let _ = write!(
                out,
                ", tls.cert = {}, tls.only = {}, tls.min_version = \"{}\"",
                toml_str(&tls.default.cert.display().to_string()),
                tls.only,
                match tls.min_version {
                    MinVersion::Tls12 => "1.2",
                    MinVersion::Tls13 => "1.3",
                }
            );
            if let Some(ca) = &tls.client_ca {
                let auth = match tls.client_auth {
                    ClientAuth::Required => "required",
                    ClientAuth::Optional => "optional",
                };
                let _ = write!(
                    out,
                    ", tls.client_ca = {}, tls.client_auth = \"{auth}\"",
                    toml_str(&ca.display().to_string())
                );
                if let Some(crl) = &tls.client_crl {
                    let _ = write!(out, ", tls.client_crl = {}", toml_str(&crl.display().to_string()));
                }
            }
        }
        out
    }
}

impl Timeouts {
    /// Every deadline, `"off"` where there is none.
    pub fn describe(&self) -> String {
        let t = self;
        [
            ("handshake", Some(t.handshake)),
            ("connect", Some(t.connect)),
            ("idle", t.idle),
            ("max_lifetime", t.max_lifetime),
            ("ping_interval", t.ping_interval),
            ("pong_timeout", Some(t.pong_timeout)),
            ("close", Some(t.close)),
            ("shutdown_grace", Some(t.shutdown_grace)),
            ("drain_delay", t.drain_delay),
            ("http_write", Some(t.http_write)),
            ("backend_ack_timeout", t.backend_ack_timeout),
        ]
        .iter()
        .map(|(key, d)| format!("{key} = \"{}\"", d.map_or("off".to_owned(), format_duration)))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

impl Limits {
    /// `max_connections` and the default `max_message_size`.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "max_connections = {}, max_message_size = \"{}\"",
            self.max_connections,
            format_limit(self.max_message_size)
        );
        if let Some(n) = self.max_connections_per_ip {
            let _ = write!(out, ", max_connections_per_ip = {n}");
        }
        for part in policy::describe_per_ip(&self.per_ip) {
            let _ = write!(out, ", {part}");
        }
        out
    }
}

impl RouteOptions {
    /// `framing`, `subprotocols`, `max_message_size`, and `max_sessions`, `client_cn`,
    /// `backend_tls`, `record` and the policy where set.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "framing = \"{}\", subprotocols = {}, max_message_size = \"{}\"",
            self.framing,
            toml_strs(&self.subprotocols),
            format_limit(self.max_message_size)
        );
        if let Some(n) = self.max_sessions {
            let _ = write!(out, ", max_sessions = {n}");
        }
        if let Some(names) = &self.client_cn {
            let _ = write!(out, ", client_cn = {}", toml_strs(names));
        }
        if let Some(b) = &self.backend_tls {
            let _ = write!(out, ", backend_tls = {}", b.describe());
        }
        if let Some(r) = &self.record {
            let prefix = r.prefix.display().to_string();
            let max = r.max_size.and_then(|n| usize::try_from(n).ok());
            let _ = write!(out, ", record = {}, record_max_size = \"{}\"", toml_str(&prefix), format_limit(max));
        }
        let policy = self.policy.describe();
        if !policy.is_empty() {
            let _ = write!(out, ", {policy}");
        }
        out
    }
}

/// A TOML string literal (quoted, escaped as TOML escapes).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A TOML array of strings.
fn toml_strs(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", items.join(", "))
}

/// `1 token`, `2 tokens`: a count for a person to read.
pub fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// A duration as the configuration writes it, in the largest unit that keeps it whole (`"1h"`,
/// `"5m"`, `"30s"`, `"500ms"`); [`parse_duration`] reads it back to the same value.
pub fn format_duration(d: Duration) -> String {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}s", d.as_secs_f64());
    }
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    match d.as_secs() {
        0 => "0s".to_owned(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A size limit as the file writes it: `"off"` for none, else as [`format_size`].
pub fn format_limit(n: Option<usize>) -> String {
    n.map_or_else(|| "off".to_owned(), format_size)
}

/// A size as the configuration writes it, in the largest binary unit that keeps it whole
/// (`"1MiB"`, `"64KiB"`, `"1000"`); [`parse_size`] reads it back to the same value.
pub fn format_size(n: usize) -> String {
    for (unit, scale) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n != 0 && n.is_multiple_of(scale) {
            return format!("{}{unit}", n / scale);
        }
    }
    n.to_string()
}

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {message}")]
    Io {
        /// The file.
        file: String,
        /// What the OS said.
        message: String,
    },
    /// TOML syntax, an unknown key, or a value of the wrong form (the message shows the line).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// The parser's message, with line, column and a caret under the field.
        message: String,
    },
    /// A value that parsed but cannot be used.
    #[error("{file}{}: {field}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The file (or "command line").
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The field, as a dotted path (`route[2].path`).
        field: String,
        /// What is wrong.
        message: String,
    },
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    base: &'a Path,
}

impl Ctx<'_> {
    /// The error for `field` at `span`. A span that is a whole table's (it starts at a header
    /// such as `[[route]]`: the checks that need several of its values have no one value's span)
    /// points at the line where the table writes the field ([`field_line`]), where it writes it.
    fn invalid<T>(&self, span: std::ops::Range<usize>, field: String, message: impl Into<String>) -> Result<T, ConfigError> {
        let line = self.text.get(..span.start).map(|t| t.matches('\n').count() + 1);
        let line = line.map(|l| field_line(self.text, l, &field).unwrap_or(l));
        Err(ConfigError::Invalid {
            file: self.file.to_owned(),
            line,
            field,
            message: message.into(),
        })
    }

    /// The 1-based line where a table header such as `[limits]` stands, for errors about checks
    /// across its fields.
    fn line_of(&self, header: &str) -> Option<usize> {
        self.text.lines().position(|l| l.trim() == header).map(|i| i + 1)
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// Where the configuration file `config` names `file` (a certificate, a key: a problem only
/// found as the file is loaded, such as a key that does not belong to its certificate): the
/// 1-based line and the key that names it (`key`, `cert`, `client_ca`), the first whose quoted
/// value, resolved as the file's paths are (against its directory), is `file`. `None` when the
/// file cannot be read or does not name it (a path given on the command line).
pub fn where_named(config: &Path, file: &Path) -> Option<(usize, String)> {
    let text = crate::platform::read_text(config).ok()?;
    let base = config.parent().unwrap_or(Path::new("."));
    text.lines().enumerate().find_map(|(i, line)| {
        let line = line.split('#').next().unwrap_or("");
        let mut rest = line;
        // Each `key = "value"` of the line (one, or several in an inline table).
        while let Some(eq) = rest.find('=') {
            let key = rest[..eq].rsplit(['{', ',', ' ']).find(|k| !k.is_empty()).unwrap_or("").trim();
            let after = rest[eq + 1..].trim_start();
            let Some(value) = after.strip_prefix('"').and_then(|v| v.split_once('"')) else {
                rest = &rest[eq + 1..];
                continue;
            };
            let named = Path::new(value.0);
            let resolved = if named.is_absolute() {
                named.to_path_buf()
            } else {
                base.join(named)
            };
            if resolved == file {
                return Some((i + 1, key.to_owned()));
            }
            rest = value.1;
        }
        None
    })
}

/// The 1-based line where the table whose header stands on line `header` writes `field` (a
/// dotted path from the top, `route[0].auth.bearer_file`, `listen[1].tls.sni[0].cert`): each
/// part after the table's own is looked for from where the one before it was found, as a key
/// (`bearer_file = …`, also inside an inline table) or a sub-table's header
/// (`[[listen.tls.sni]]`, the `[j]`th of them). `None` when `header` is not a header, or the
/// table does not write the field's first part (a field that is missing, or the table itself).
fn field_line(text: &str, header: usize, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let h = header.checked_sub(1)?;
    let table = header_name(lines.get(h)?)?;
    // The table runs to the next header that is not one of its sub-tables.
    let end = (h + 1..lines.len())
        .find(|&i| header_name(lines[i]).is_some_and(|n| !n.starts_with(&format!("{table}."))))
        .unwrap_or(lines.len());
    let parts: Vec<&str> = field.split('.').skip(table.split('.').count()).collect();
    let mut found = None;
    let mut from = h + 1;
    for part in parts {
        let (key, index) = match part.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let headers: Vec<usize> = (from..end)
            .filter(|&i| header_name(lines[i]).is_some_and(|n| n.rsplit('.').next() == Some(key)))
            .collect();
        let at = match index.and_then(|j| headers.get(j)) {
            Some(&i) => i,
            None => match (from..end).find(|&i| names_key(lines[i], key) || headers.contains(&i)) {
                Some(i) => i,
                None => break,
            },
        };
        found = Some(at + 1);
        from = at;
    }
    found
}

/// The name in a table header line (`route` in `[[route]]`, `listen.tls` in `[listen.tls]`).
fn header_name(line: &str) -> Option<&str> {
    let line = line.trim();
    let inner = line.strip_prefix("[[").or_else(|| line.strip_prefix('['))?;
    let name = inner[..inner.find(']')?].trim();
    let bare = |c: char| c.is_ascii_alphanumeric() || "_-. ".contains(c);
    (!name.is_empty() && name.chars().all(bare)).then_some(name)
}

/// Whether a line assigns `key` (`key = …`, also after `{` or `,` in an inline table), outside
/// a comment.
fn names_key(line: &str, key: &str) -> bool {
    let line = line.split('#').next().unwrap_or("");
    line.match_indices(key).any(|(at, _)| {
        let before = line[..at].trim_end().chars().next_back();
        let after = line[at + key.len()..].trim_start();
        matches!(before, None | Some('{' | ',')) && after.starts_with('=') && !after.starts_with("==")
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, deserialize_with = "shape::listen")]
    listen: Vec<Spanned<RawListener>>,
    #[serde(default, deserialize_with = "shape::route")]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default, deserialize_with = "shape::tokens")]
    tokens: Vec<Spanned<RawTokens>>,
    #[serde(default, deserialize_with = "shape::timeouts")]
    timeouts: RawTimeouts,
    #[serde(default, deserialize_with = "shape::limits")]
    limits: RawLimits,
    #[serde(default, deserialize_with = "shape::log")]
    log: RawLog,
    #[serde(default, deserialize_with = "shape::agent")]
    agent: Vec<Spanned<crate::agent::RawAgentDecl>>,
    #[serde(default, deserialize_with = "shape::agent_endpoint")]
    agent_endpoint: Vec<Spanned<crate::agent::RawEndpoint>>,
    #[serde(default, deserialize_with = "shape::agents")]
    agents: Vec<Spanned<crate::agent::RawFleet>>,
    #[serde(default, deserialize_with = "shape::admin")]
    admin: Option<admin::RawAdmin>,
}

/// A list field (`origins`, `subprotocols`): a single string there is answered with how to write
/// it as a list (serde's words were "invalid type: string, expected a sequence").
fn listed<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of strings")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(t) = seq.next_element()? {
                out.push(t);
            }
            Ok(out)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            Err(E::custom(format!("a list, even of one: write [{v:?}]")))
        }
    }
    d.deserialize_any(V(std::marker::PhantomData)).map(Some)
}

/// The file's tables in the shape each takes: `[[route]]` (a list, one table for each) or
/// `[timeouts]` (one table). Written the other way, serde's message would be "invalid type: map,
/// expected a sequence"; these say which brackets to write.
mod shape {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    /// `[[NAME]]` tables.
    fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D, name: &'static str) -> Result<Vec<T>, D::Error> {
        struct V<T>(&'static str, PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "[[{}]] tables", self.0)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(t) = seq.next_element()? {
                    out.push(t);
                }
                Ok(out)
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Vec<T>, A::Error> {
                Err(de::Error::custom(format!(
                    "write [[{0}]], with two brackets: there may be several, one [[{0}]] table for each",
                    self.0
                )))
            }
        }
        d.deserialize_seq(V(name, PhantomData))
    }

    /// One `[NAME]` table.
    fn one<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D, name: &'static str) -> Result<T, D::Error> {
        struct V<T>(&'static str, PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a [{}] table", self.0)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
                Err(de::Error::custom(format!(
                    "write [{0}], with one bracket: there is one [{0}] table",
                    self.0
                )))
            }
        }
        d.deserialize_map(V(name, PhantomData))
    }

    macro_rules! shapes {
        ($($f:ident: $how:ident),* $(,)?) => {$(
            pub(super) fn $f<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<shapes!(@ty $how T), D::Error> {
                shapes!(@call $how d stringify!($f))
            }
        )*};
        (@ty list $t:ident) => { Vec<$t> };
        (@ty one $t:ident) => { $t };
        (@ty maybe $t:ident) => { Option<$t> };
        (@call list $d:ident $name:expr) => { list($d, $name) };
        (@call one $d:ident $name:expr) => { one($d, $name) };
        (@call maybe $d:ident $name:expr) => { one($d, $name).map(Some) };
    }

    shapes! {
        listen: list, route: list, tokens: list, agent: list, agent_endpoint: list, agents: list,
        timeouts: one, limits: one, log: one, admin: maybe,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Spanned<ListenOn>,
    mode: Option<Spanned<String>>,
    web: Option<PathBuf>,
    #[serde(default)]
    web_listing: bool,
    #[serde(default)]
    web_follow_symlinks: bool,
    #[serde(default)]
    web_dotfiles: bool,
    ipv6_only: Option<Spanned<bool>>,
    web_auth: Option<policy::RawAuth>,
    web_client_cn: Option<Vec<String>>,
    tls: Option<RawTls>,
    #[serde(default, deserialize_with = "listed")]
    origins: Option<Vec<policy::RuleDe>>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    trusted_proxies: Vec<policy::NetDe>,
    #[serde(default)]
    forwarded_header: crate::policy::ForwardedHeader,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: Option<PathBuf>,
    only: Option<bool>,
    #[serde(default)]
    min_version: MinVersion,
    client_ca: Option<PathBuf>,
    client_auth: Option<ClientAuth>,
    client_crl: Option<PathBuf>,
    watch: Option<OptDur>,
    #[serde(default)]
    sni: Vec<RawSni>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSni {
    names: Vec<String>,
    cert: PathBuf,
    key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTls {
    server_name: Option<String>,
    ca: Option<PathBuf>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

/// The per-route options, shared by `[[route]]` and `[[tokens]]` (serde's `flatten` cannot be
/// combined with `deny_unknown_fields`, so both tables list the fields and build this).
struct RawRouteOptions {
    framing: Option<Framing>,
    subprotocols: Option<Vec<String>>,
    max_message_size: Option<Size>,
    max_sessions: Option<usize>,
    client_cn: Option<Vec<String>>,
    backend_tls: Option<BackendTlsSettings>,
    policy: RoutePolicy,
    record: Option<crate::record::RecordConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    target: Target,
    framing: Option<Framing>,
    #[serde(default, deserialize_with = "listed")]
    subprotocols: Option<Vec<String>>,
    max_message_size: Option<Size>,
    max_sessions: Option<Count<usize>>,
    client_cn: Option<Vec<String>>,
    backend_tls: Option<RawBackendTls>,
    #[serde(default, deserialize_with = "listed")]
    origins: Option<Vec<policy::RuleDe>>,
    require_origin: Option<bool>,
    allow: Option<Vec<policy::NetDe>>,
    deny: Option<Vec<policy::NetDe>>,
    max_sessions_per_ip: Option<Count<u32>>,
    new_sessions_per_ip: Option<policy::RateDe>,
    new_sessions_burst: Option<Count<u32>>,
    auth: Option<policy::RawAuth>,
    proxy_protocol: Option<crate::proxy::Version>,
    record: Option<PathBuf>,
    record_max_size: Option<Size>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    source: Option<PathBuf>,
    jwt: Option<policy::RawJwt>,
    redis: Option<self::redis::RawRedis>,
    api: Option<self::api::RawApi>,
    allow_targets: Option<Vec<policy::TargetRuleDe>>,
    #[serde(default)]
    allow_any_target: bool,
    #[serde(default)]
    lookup: TokenLookup,
    format: Option<Spanned<TokenFormat>>,
    framing: Option<Framing>,
    #[serde(default, deserialize_with = "listed")]
    subprotocols: Option<Vec<String>>,
    max_message_size: Option<Size>,
    max_sessions: Option<Count<usize>>,
    client_cn: Option<Vec<String>>,
    backend_tls: Option<RawBackendTls>,
    #[serde(default, deserialize_with = "listed")]
    origins: Option<Vec<policy::RuleDe>>,
    require_origin: Option<bool>,
    allow: Option<Vec<policy::NetDe>>,
    deny: Option<Vec<policy::NetDe>>,
    max_sessions_per_ip: Option<Count<u32>>,
    new_sessions_per_ip: Option<policy::RateDe>,
    new_sessions_burst: Option<Count<u32>>,
    auth: Option<policy::RawAuth>,
    proxy_protocol: Option<crate::proxy::Version>,
    record: Option<PathBuf>,
    record_max_size: Option<Size>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    handshake: Option<Dur>,
    connect: Option<Dur>,
    idle: Option<OptDur>,
    max_lifetime: Option<OptDur>,
    ping_interval: Option<OptDur>,
    pong_timeout: Option<Dur>,
    close: Option<Dur>,
    shutdown_grace: Option<Dur>,
    drain_delay: Option<OptDur>,
    http_write: Option<Dur>,
    backend_ack_timeout: Option<OptDur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<AtLeastOne>,
    max_connections_per_ip: Option<AtLeastOne>,
    max_message_size: Option<Size>,
    max_sessions_per_ip: Option<Count<u32>>,
    new_sessions_per_ip: Option<policy::RateDe>,
    new_sessions_burst: Option<Count<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
    file: Option<Spanned<PathBuf>>,
    max_size: Option<LogSize>,
    token_key_file: Option<Spanned<PathBuf>>,
}

/// `[log] max_size`: a size of at least [`LogSize::MIN`], or `"off"`.
#[derive(Debug, Clone, Copy)]
struct LogSize(Option<usize>);

impl LogSize {
    /// Below this a log file would be set aside every few lines.
    const MIN: usize = 64 << 10;
}

impl<'de> Deserialize<'de> for LogSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = match NumOrString::deserialize(d)? {
            NumOrString::S(s) if s.trim() == "off" => return Ok(LogSize(None)),
            written => written.size().map_err(de::Error::custom)?,
        };
        if n < LogSize::MIN {
            return Err(de::Error::custom(format!(
                "a log file's max_size must be at least 64KiB (or \"off\"), not {n} bytes"
            )));
        }
        Ok(LogSize(Some(n)))
    }
}

impl RawConfig {
    fn validate(self, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
        let mut config = Config::new(ctx.file);
        config.text_sha256 = Some(crate::agent::link::sha256_hex(ctx.text.as_bytes()));
        config.timeouts = self.timeouts.resolve();
        self.limits.apply(&mut config.limits, ctx)?;
        config.log_format = self.log.format;
        if let Some(file) = self.log.file {
            let path = ctx.resolve(file.get_ref());
            // The file is opened at start (it may not exist yet), in a directory that must.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return ctx.invalid(file.span(), "log.file".into(), format!("{}: no such directory", dir.display()));
            }
            config.log_file = Some(path);
        }
        if let Some(max) = self.log.max_size {
            config.log_max_size = max.0.map(|n| n as u64);
        }
        if let Some(file) = self.log.token_key_file {
            let span = file.span();
            let path = ctx.resolve(file.get_ref());
            let key = match crate::platform::read_text(&path) {
                Ok(k) => k.trim().as_bytes().to_vec(),
                Err(e) => return ctx.invalid(span, "log.token_key_file".into(), format!("{}: {e}", path.display())),
            };
            if key.len() < TokenKey::MIN {
                let why = format!(
                    "{}: {} characters; a key needs at least {} (make one: openssl rand -hex 32)",
                    path.display(),
                    key.len(),
                    TokenKey::MIN
                );
                return ctx.invalid(span, "log.token_key_file".into(), why);
            }
            config.log_token_key = Some(TokenKey(key));
        }
        config.listeners = listeners(self.listen, ctx)?;
        config.agents = match crate::agent::validate(self.agent, self.agent_endpoint, self.agents, &|p| ctx.resolve(p)) {
            Ok(a) => a,
            Err((span, field, message)) => return ctx.invalid(span, field, message),
        };
        let agent_routes = self.route.iter().map(|r| {
            let path = r.get_ref().path.as_ref().map(|p| (p.span(), p.get_ref().as_str()));
            (r.span(), path, &r.get_ref().target, r.get_ref().backend_tls.is_some())
        });
        if let Err((span, field, message)) = crate::agent::check_routes(&config.agents, agent_routes) {
            return ctx.invalid(span, field, message);
        }
        let defaults = config.default_route_options();
        config.routes = routes(self.route, &defaults, ctx)?;
        config.token_sources = token_sources(self.tokens, &defaults, ctx)?;
        config.admin = self.admin.map(|a| a.resolve(ctx)).transpose()?;
        if config.listeners.is_empty() {
            // An empty file is most often one caught being written (a truncate, then the write).
            let empty = ctx.text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
            return Err(ConfigError::Invalid {
                file: ctx.file.to_owned(),
                line: None,
                field: "listen".into(),
                message: match empty {
                    true => "the file is empty (being written?): at least one [[listen]] table with an `addr` is needed".into(),
                    false => "at least one [[listen]] table with an `addr` is needed".into(),
                },
            });
        }
        config.check()?;
        Ok(config)
    }
}

impl RawTimeouts {
    /// The `[timeouts]` table over the defaults.
    fn resolve(self) -> Timeouts {
        let d = Timeouts::default();
        let t = self;
        Timeouts {
            handshake: t.handshake.map_or(d.handshake, |v| v.0),
            connect: t.connect.map_or(d.connect, |v| v.0),
            idle: t.idle.map_or(d.idle, |v| v.0),
            max_lifetime: t.max_lifetime.map_or(d.max_lifetime, |v| v.0),
            ping_interval: t.ping_interval.map_or(d.ping_interval, |v| v.0),
            pong_timeout: t.pong_timeout.map_or(d.pong_timeout, |v| v.0),
            close: t.close.map_or(d.close, |v| v.0),
            shutdown_grace: t.shutdown_grace.map_or(d.shutdown_grace, |v| v.0),
            drain_delay: t.drain_delay.map_or(d.drain_delay, |v| v.0),
            http_write: t.http_write.map_or(d.http_write, |v| v.0),
            backend_ack_timeout: t.backend_ack_timeout.map_or(d.backend_ack_timeout, |v| v.0),
        }
    }
}

impl RawLimits {
    /// The `[limits]` table over the defaults in `limits`.
    fn apply(self, limits: &mut Limits, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        if let Some(n) = self.max_connections {
            limits.max_connections = n.0;
        }
        limits.max_connections_per_ip = self.max_connections_per_ip.map(|n| n.0);
        if let Some(s) = self.max_message_size {
            limits.max_message_size = s.0;
        }
        limits.per_ip = policy::per_ip(
            self.max_sessions_per_ip.map(|n| n.0),
            self.new_sessions_per_ip,
            self.new_sessions_burst.map(|n| n.0),
        )
        .map_err(|(field, message)| {
            let field = format!("limits.{field}");
            ConfigError::Invalid {
                file: ctx.file.to_owned(),
                line: ctx.line_of("[limits]").map(|l| field_line(ctx.text, l, &field).unwrap_or(l)),
                field,
                message,
            }
        })?;
        Ok(())
    }
}

/// The `[[listen]]` tables: each address once, `web` a directory, TLS paths resolved.
fn listeners(listen: Vec<Spanned<RawListener>>, ctx: &Ctx<'_>) -> Result<Vec<ListenerConfig>, ConfigError> {
    let mut listeners = Vec::new();
    let mut seen_addrs = HashSet::new();
    let mut tcp_addrs: Vec<(usize, SocketAddr)> = Vec::new();
    // Where `ipv6_only = false` was written: on `[::]:P`, not beside a listener of `0.0.0.0:P`.
    let mut asked_dual = Vec::new();
    for (i, l) in listen.into_iter().enumerate() {
        let span = l.span();
        let l = l.into_inner();
        let addr_span = l.addr.span();
        let mut addr = l.addr.into_inner();
        if let ListenOn::Unix { path, .. } = &mut addr {
            *path = ctx.resolve(path);
        }
        if let Some(mode) = l.mode {
            let (mode_span, text) = (mode.span(), mode.into_inner());
            let ListenOn::Unix { mode, .. } = &mut addr else {
                return ctx.invalid(
                    mode_span,
                    format!("listen[{i}].mode"),
                    "a file mode is for a unix socket listener (addr = \"unix:/path\")",
                );
            };
            *mode = match parse_unix_mode(&text) {
                Ok(m) => m,
                Err(m) => return ctx.invalid(mode_span, format!("listen[{i}].mode"), m),
            };
        }
        if !seen_addrs.insert(addr.to_string()) {
            return ctx.invalid(addr_span, format!("listen[{i}].addr"), format!("{addr} is listed twice"));
        }
        // An any-address listener takes its family's every address on its port: another of the
        // same family and port here could never bind (a review: check said OK, and the start
        // failed with a bare "Address already in use"). [::] beside 0.0.0.0 is the dual-stack
        // question, settled below.
        if let ListenOn::Tcp(a) = addr {
            let overlapping = tcp_addrs.iter().find(|(_, b): &&(usize, SocketAddr)| {
                a.port() != 0 && a.port() == b.port() && a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() != b.ip().is_unspecified())
            });
            if let Some((j, b)) = overlapping {
                let any = if a.ip().is_unspecified() { a } else { *b };
                return ctx.invalid(
                    addr_span,
                    format!("listen[{i}].addr"),
                    format!(
                        "{a} overlaps listen[{j}]'s {b}: {any} takes every address of its kind on port {}; keep one of them",
                        a.port()
                    ),
                );
            }
            tcp_addrs.push((i, a));
        }
        if matches!(addr, ListenOn::Unix { .. }) && l.tls.is_some() {
            // The TLS path sniffs the first byte of a TCP stream; a unix socket sits behind a
            // local proxy, which terminates TLS.
            return ctx.invalid(
                span,
                format!("listen[{i}].tls"),
                "TLS is for TCP listeners: on a unix socket, let the proxy in front terminate TLS",
            );
        }
        if let Some(only) = &l.ipv6_only {
            if !matches!(addr, ListenOn::Tcp(a) if a.is_ipv6()) {
                return ctx.invalid(
                    only.span(),
                    format!("listen[{i}].ipv6_only"),
                    "ipv6_only is for an IPv6 address (such as [::]:6080)",
                );
            }
        }
        if let Some(only) = l.ipv6_only.as_ref().filter(|o| !*o.get_ref()) {
            // Only the any-address socket can take IPv4 clients (a review: [::1] with
            // ipv6_only = false logged ipv4=true and refused 127.0.0.1).
            if matches!(addr, ListenOn::Tcp(a) if !a.ip().is_unspecified()) {
                return ctx.invalid(
                    only.span(),
                    format!("listen[{i}].ipv6_only"),
                    "ipv6_only = false takes IPv4 clients only on [::] (any address); a specific IPv6 address takes IPv6 alone: add a listener for the IPv4 address",
                );
            }
            asked_dual.push((i, only.span()));
        }
        let web = l.web.map(|w| ctx.resolve(&w));
        if let Some(w) = &web {
            if !w.is_dir() {
                return ctx.invalid(span, format!("listen[{i}].web"), format!("{} is not a directory", w.display()));
            }
        }
        let tls = l.tls.map(|t| t.resolve(ctx));
        if let Some(Err((field, message))) = tls.as_ref().map(TlsSettings::check_files) {
            return ctx.invalid(span, format!("listen[{i}].tls.{field}"), message);
        }
        let web_auth = web_auth(i, span.clone(), l.web_auth, l.web_client_cn, web.is_some(), tls.as_ref(), ctx)?;
        listeners.push(ListenerConfig {
            addr,
            web,
            web_listing: l.web_listing,
            web_follow_symlinks: l.web_follow_symlinks,
            web_dotfiles: l.web_dotfiles,
            ipv6_only: l.ipv6_only.map(Spanned::into_inner),
            tls,
            access: ListenerAccess {
                origins: l.origins.map(|o| o.into_iter().map(|r| r.0).collect()),
                proxy_protocol: l.proxy_protocol,
                trusted_proxies: l.trusted_proxies.into_iter().map(|n| n.0).collect(),
                forwarded_header: l.forwarded_header,
                web_auth,
            },
        });
    }
    for (i, span) in asked_dual {
        if let ListenOn::Tcp(a) = listeners[i].addr {
            if a.ip() == std::net::Ipv6Addr::UNSPECIFIED && ipv4_listener_on(&listeners, a.port()) {
                return ctx.invalid(
                    span,
                    format!("listen[{i}].ipv6_only"),
                    format!(
                        "ipv6_only = false takes IPv4 on port {} too, which another listener here takes",
                        a.port()
                    ),
                );
            }
        }
    }
    Ok(listeners)
}

/// `listen[i].web_auth` and `listen[i].web_client_cn`: what a request for one of the listener's
/// static files must pass. Only with `web` (they protect nothing else: a route's upgrade has its
/// own `auth`), and `web_client_cn` only where the listener asks for client certificates.
fn web_auth(
    i: usize,
    span: std::ops::Range<usize>,
    auth: Option<policy::RawAuth>,
    client_cn: Option<Vec<String>>,
    has_web: bool,
    tls: Option<&TlsSettings>,
    ctx: &Ctx<'_>,
) -> Result<Option<policy::WebAuth>, ConfigError> {
    if auth.is_none() && client_cn.is_none() {
        return Ok(None);
    }
    let field = if auth.is_some() { "web_auth" } else { "web_client_cn" };
    if !has_web {
        return ctx.invalid(
            span,
            format!("listen[{i}].{field}"),
            "protects the listener's static files, and it has none: add `web = \"DIR\"` (a route's upgrade has its own `auth`)",
        );
    }
    let auth = match auth {
        None => None,
        Some(a) => Some(a.resolve(&|p| ctx.resolve(p)).or_else(|(field, message)| {
            let field = field.strip_prefix("auth").unwrap_or(&field);
            ctx.invalid(span.clone(), format!("listen[{i}].web_auth{field}"), message)
        })?),
    };
    if let Some(names) = &client_cn {
        if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
            return ctx.invalid(span, format!("listen[{i}].web_client_cn"), "needs one or more names, none empty");
        }
        if tls.and_then(|t| t.client_ca.as_ref()).is_none() {
            return ctx.invalid(
                span,
                format!("listen[{i}].web_client_cn"),
                "needs client certificates: set tls.client_ca on this listener",
            );
        }
    }
    Ok(Some(policy::WebAuth { auth, client_cn }))
}

/// The route options of a `[[route]]` or `[[tokens]]` table `$t` (number `$i` at `$span`), over
/// `$defaults`: both tables list the same fields (serde's `flatten` cannot be combined with
/// `deny_unknown_fields`), so this one macro moves them into [`RawRouteOptions`]. A policy
/// error returns from the calling function, naming `$table[$i].field`.
macro_rules! route_options {
    ($t:ident, $table:literal, $i:expr, $span:expr, $ctx:expr, $defaults:expr) => {{
        let policy = RawPolicy {
            origins: $t.origins,
            require_origin: $t.require_origin,
            allow: $t.allow,
            deny: $t.deny,
            max_sessions_per_ip: $t.max_sessions_per_ip.map(|n| n.0),
            new_sessions_per_ip: $t.new_sessions_per_ip,
            new_sessions_burst: $t.new_sessions_burst.map(|n| n.0),
            auth: $t.auth,
            proxy_protocol: $t.proxy_protocol,
        }
        .resolve(&|p| $ctx.resolve(p))
        .or_else(|(field, message)| $ctx.invalid($span.clone(), format!(concat!($table, "[{}].{}"), $i, field), message))?;
        let backend_tls = $t.backend_tls.map(|b| b.resolve($ctx));
        let record = record_config($t.record, $t.record_max_size, $ctx)
            .or_else(|(field, message)| $ctx.invalid($span.clone(), format!(concat!($table, "[{}].{}"), $i, field), message))?;
        RawRouteOptions {
            framing: $t.framing,
            subprotocols: $t.subprotocols,
            max_message_size: $t.max_message_size,
            max_sessions: $t.max_sessions.map(|n| n.0),
            client_cn: $t.client_cn,
            backend_tls,
            policy,
            record,
        }
        .apply($defaults)
    }};
}

/// The `[[route]]` tables: one matcher each, no path or token twice, TLS only to TCP targets.
fn routes(route: Vec<Spanned<RawRoute>>, defaults: &RouteOptions, ctx: &Ctx<'_>) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes = Vec::new();
    let mut paths = HashSet::new();
    let mut tokens = HashSet::new();
    for (i, r) in route.into_iter().enumerate() {
        let span = r.span();
        let r = r.into_inner();
        let matcher = match (r.path, r.token) {
            (Some(p), None) => path_matcher(i, p, &mut paths, ctx)?,
            (None, Some(t)) => token_matcher(i, t, &mut tokens, ctx)?,
            _ => return ctx.invalid(span, format!("route[{i}]"), "needs exactly one of `path` or `token`"),
        };
        let options = route_options!(r, "route", i, span, ctx, defaults);
        if options.policy.proxy_protocol.is_some() && matches!(r.target, Target::Unix(_)) {
            return ctx.invalid(
                span,
                format!("route[{i}].proxy_protocol"),
                "a PROXY header is for TCP targets, not unix sockets",
            );
        }
        if options.backend_tls.is_some() && matches!(r.target, Target::Unix(_)) {
            return ctx.invalid(span, format!("route[{i}].backend_tls"), "TLS is for TCP targets, not unix sockets");
        }
        if let Some(Err((field, message))) = options.backend_tls.as_ref().map(BackendTlsSettings::check_files) {
            return ctx.invalid(span, format!("route[{i}].backend_tls.{field}"), message);
        }
        // A unix socket's path is relative to the file, as the file's other paths are (a review:
        // it was the working directory's, `/` under systemd).
        let target = match r.target {
            Target::Unix(path) => Target::Unix(ctx.resolve(&path)),
            t => t,
        };
        routes.push(RouteConfig { matcher, target, options });
    }
    Ok(routes)
}

/// What keeps a configured path from ever being a request's: requests are matched as they
/// arrive, percent-encoded, and no request's path holds a space, a control character, a `#`
/// (a fragment stays in the browser) or a character outside ASCII (browsers send `%C3%A9` for
/// `é`). Such a route or endpoint was accepted and never reached (a review).
pub(crate) fn unreachable_path(p: &str) -> Option<String> {
    let c = p
        .chars()
        .find(|&c| c.is_whitespace() || c.is_control() || c == '#' || !c.is_ascii())?;
    Some(format!(
        "{p:?} holds {c:?}, which no request's path does: write the path percent-encoded, as a browser sends it \
         (a space as %20, é as %C3%A9)"
    ))
}

/// `route[i].path`: `"*"` (any path) or an absolute path without a query, not taken already.
fn path_matcher(i: usize, p: Spanned<String>, paths: &mut HashSet<Matcher>, ctx: &Ctx<'_>) -> Result<Matcher, ConfigError> {
    let (pspan, p) = (p.span(), p.into_inner());
    let m = if p == "*" {
        Matcher::AnyPath
    } else if p.starts_with('/') && !p.contains('?') {
        if let Some(why) = unreachable_path(&p) {
            return ctx.invalid(pspan, format!("route[{i}].path"), why);
        }
        Matcher::Path(p)
    } else {
        return ctx.invalid(
            pspan,
            format!("route[{i}].path"),
            format!("{p:?} must start with '/' and have no query (or be \"*\" for any path)"),
        );
    };
    if !paths.insert(m.clone()) {
        return ctx.invalid(pspan, format!("route[{i}].path"), format!("{m} has another route already"));
    }
    Ok(m)
}

/// `route[i].token`: not empty, not taken already.
fn token_matcher(i: usize, t: Spanned<String>, tokens: &mut HashSet<String>, ctx: &Ctx<'_>) -> Result<Matcher, ConfigError> {
    let (tspan, t) = (t.span(), t.into_inner());
    if t.is_empty() {
        return ctx.invalid(tspan, format!("route[{i}].token"), "must not be empty");
    }
    if !tokens.insert(t.clone()) {
        return ctx.invalid(tspan, format!("route[{i}].token"), "this token has another route already");
    }
    Ok(Matcher::Token(t))
}

/// The `[[tokens]]` tables: each source readable, and not listed twice with the same lookup.
fn token_sources(raw: Vec<Spanned<RawTokens>>, defaults: &RouteOptions, ctx: &Ctx<'_>) -> Result<Vec<TokenSourceConfig>, ConfigError> {
    let mut sources: Vec<TokenSourceConfig> = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let span = t.span();
        let t = t.into_inner();
        if t.allow_any_target && t.redis.is_none() && t.api.is_none() {
            return ctx.invalid(
                span,
                format!("tokens[{i}].allow_any_target"),
                "is for Redis and API sources only (a JWT source always needs allow_targets)",
            );
        }
        // The allow-list of a source whose answers name targets (Redis, an API): required,
        // unless allow_any_target says in so many words that any will do.
        let answers_allowed = |allow: Option<Vec<policy::TargetRuleDe>>, what: &str, who: &str| match (allow, t.allow_any_target) {
            (Some(list), false) if !list.is_empty() => Ok(Some(list.into_iter().map(|r| r.0).collect())),
            (None, true) => Ok(None),
            (Some(_), true) => ctx.invalid(
                span.clone(),
                format!("tokens[{i}].allow_any_target"),
                "give allow_targets or allow_any_target = true, not both",
            ),
            _ => ctx.invalid(
                span.clone(),
                format!("tokens[{i}].allow_targets"),
                format!(
                    "{what} needs allow_targets: the addresses and ports its tokens may name, so that whoever {who} cannot \
                     reach anything else (allow_any_target = true trusts them with every address, as websockify does)"
                ),
            ),
        };
        let (path, jwt, redis, api) = match (t.source, t.jwt, t.redis, t.api, t.allow_targets) {
            (Some(source), None, None, None, None) => (ctx.resolve(&source), None, None, None),
            (None, Some(jwt), None, None, Some(allow)) if !allow.is_empty() => {
                let jwt = jwt
                    .resolve(&|p| ctx.resolve(p))
                    .or_else(|(field, message)| ctx.invalid(span.clone(), format!("tokens[{i}].{field}"), message))?;
                if t.lookup != TokenLookup::Query {
                    return ctx.invalid(span, format!("tokens[{i}].lookup"), "JWT tokens come from the query (?token=)");
                }
                let key = match &jwt.keys {
                    crate::policy::jwt::KeySource::Pem(p)
                    | crate::policy::jwt::KeySource::Jwks(p)
                    | crate::policy::jwt::KeySource::Secret(p) => p.clone(),
                };
                let allow_targets = allow.into_iter().map(|r| r.0).collect();
                (key, Some(policy::JwtTokenSource { jwt, allow_targets }), None, None)
            }
            (None, Some(_), None, None, _) => {
                return ctx.invalid(
                    span,
                    format!("tokens[{i}].allow_targets"),
                    "a JWT token source needs allow_targets: the addresses and ports its tokens may name",
                )
            }
            (None, None, Some(redis), None, allow) => {
                let allow = answers_allowed(allow, "a Redis token source", "can write to Redis")?;
                let redis = redis.resolve(allow, &|p| ctx.resolve(p)).or_else(|(field, message, at)| {
                    ctx.invalid(at.unwrap_or_else(|| span.clone()), format!("tokens[{i}].redis.{field}"), message)
                })?;
                (PathBuf::from(redis.name()), None, Some(redis), None)
            }
            (None, None, None, Some(api), allow) => {
                let allow = answers_allowed(allow, "an API token source", "controls the API's answers")?;
                let api = api
                    .resolve(allow, &|p| ctx.resolve(p))
                    .or_else(|(field, message)| ctx.invalid(span.clone(), format!("tokens[{i}].api.{field}"), message))?;
                (PathBuf::from(api.name()), None, None, Some(api))
            }
            (None, None, None, None, _) => {
                return ctx.invalid(
                    span,
                    format!("tokens[{i}]"),
                    "needs `source` (token files), `jwt` (JWT tokens), `redis` (tokens in Redis) or `api` (an HTTP API)",
                )
            }
            _ => {
                return ctx.invalid(
                    span,
                    format!("tokens[{i}]"),
                    "`source` (token files), `jwt`, `redis` and `api` do not go together, nor `source` and `allow_targets`",
                )
            }
        };
        if redis.is_none() && api.is_none() {
            if let Err(e) = std::fs::metadata(&path) {
                let field = if jwt.is_some() { "jwt" } else { "source" };
                return ctx.invalid(span, format!("tokens[{i}].{field}"), format!("{}: {e}", path.display()));
            }
        }
        let format = match t.format {
            None => TokenFormat::Lines,
            Some(f) if jwt.is_some() || redis.is_some() || api.is_some() => {
                return ctx.invalid(f.span(), format!("tokens[{i}].format"), "is for `source` token files only")
            }
            Some(f) => {
                let (at, format) = (f.span(), f.into_inner());
                let plugin = match format {
                    TokenFormat::Lines => None,
                    TokenFormat::FileNames => Some("TokenFileName"),
                    TokenFormat::UnixSockets => Some("UnixDomainSocketDirectory"),
                };
                if format == TokenFormat::UnixSockets && cfg!(windows) {
                    return ctx.invalid(
                        at,
                        format!("tokens[{i}].format"),
                        format!("\"unix-sockets\": {}", crate::platform::UNIX_SOCKETS_UNAVAILABLE),
                    );
                }
                if let Some(plugin) = plugin.filter(|_| !path.is_dir()) {
                    return ctx.invalid(
                        at,
                        format!("tokens[{i}].format"),
                        format!(
                            "\"{format}\" (websockify's {plugin}) needs a directory as `source`: {} is not one",
                            path.display()
                        ),
                    );
                }
                format
            }
        };
        // An API source is the same source when its URL as written is (its name leaves query
        // values out: two that differ only there are two sources, a review found).
        let same = |s: &TokenSourceConfig| match (&s.api, &api) {
            (Some(a), Some(b)) => a.url.template == b.url.template,
            _ => s.path == path,
        };
        if sources.iter().any(|s| same(s) && s.lookup == t.lookup) {
            let field = match (&redis, &api) {
                (Some(_), _) => "redis",
                (_, Some(_)) => "api",
                _ => "source",
            };
            return ctx.invalid(
                span,
                format!("tokens[{i}].{field}"),
                format!(
                    "{} is already a token source with lookup = \"{}\"",
                    path.display(),
                    format!("{:?}", t.lookup).to_lowercase()
                ),
            );
        }
        // Two API sources whose names (their query values left out) read alike are told apart
        // by their place, in route labels, /sessions and logs.
        let path = match api.is_some() && sources.iter().any(|s| s.path == path) {
            true => PathBuf::from(format!("{} (tokens[{i}])", path.display())),
            false => path,
        };
        let options = route_options!(t, "tokens", i, span, ctx, defaults);
        if let Some(Err((field, message))) = options.backend_tls.as_ref().map(BackendTlsSettings::check_files) {
            return ctx.invalid(span, format!("tokens[{i}].backend_tls.{field}"), message);
        }
        sources.push(TokenSourceConfig {
            path,
            jwt,
            redis,
            api,
            lookup: t.lookup,
            format,
            options,
        });
    }
    Ok(sources)
}

impl RawTls {
    fn resolve(self, ctx: &Ctx<'_>) -> TlsSettings {
        let files = |cert: PathBuf, key: Option<PathBuf>| CertFiles {
            cert: ctx.resolve(&cert),
            key: key.map(|k| ctx.resolve(&k)),
        };
        TlsSettings {
            default: files(self.cert, self.key),
            sni: self.sni.into_iter().map(|s| (s.names, files(s.cert, s.key))).collect(),
            only: self.only.unwrap_or(false),
            min_version: self.min_version,
            client_ca: self.client_ca.map(|c| ctx.resolve(&c)),
            client_auth: self.client_auth.unwrap_or_default(),
            client_crl: self.client_crl.map(|c| ctx.resolve(&c)),
            watch: self.watch.map_or(Some(DEFAULT_TLS_WATCH), |w| w.0),
        }
    }
}

impl RawBackendTls {
    fn resolve(self, ctx: &Ctx<'_>) -> BackendTlsSettings {
        BackendTlsSettings {
            server_name: self.server_name,
            ca: self.ca.map(|c| ctx.resolve(&c)),
            insecure_skip_verify: self.insecure_skip_verify,
        }
    }
}

/// Checks that a file the configuration names can be read now, so that a missing one is
/// reported at the line that names it (what is in it is for its reader to check).
///
/// # Errors
/// The file and what the system says.
fn readable(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_dir() => Err(format!("{} is a directory, not a file", path.display())),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// How often certificate files are checked for changes unless a listener says otherwise.
pub const DEFAULT_TLS_WATCH: Duration = Duration::from_secs(10);

impl RawRouteOptions {
    fn apply(self, defaults: &RouteOptions) -> RouteOptions {
        RouteOptions {
            framing: self.framing.unwrap_or(defaults.framing),
            subprotocols: self.subprotocols.unwrap_or_else(|| defaults.subprotocols.clone()),
            max_message_size: self.max_message_size.map_or(defaults.max_message_size, |s| s.0),
            max_sessions: self.max_sessions.or(defaults.max_sessions),
            client_cn: self.client_cn.or_else(|| defaults.client_cn.clone()),
            backend_tls: self.backend_tls.or_else(|| defaults.backend_tls.clone()),
            policy: self.policy,
            record: self.record.or_else(|| defaults.record.clone()),
        }
    }
}

/// A route's `record` and `record_max_size`: the prefix resolved against the file's directory,
/// in a directory that exists (a typo is found now, not as a warning per session).
fn record_config(
    prefix: Option<PathBuf>,
    max_size: Option<Size>,
    ctx: &Ctx<'_>,
) -> Result<Option<crate::record::RecordConfig>, (&'static str, String)> {
    let Some(prefix) = prefix else {
        return match max_size {
            Some(_) => Err(("record_max_size", "needs `record` (the file name prefix)".into())),
            None => Ok(None),
        };
    };
    record_settings(ctx.resolve(&prefix), max_size.map(|s| s.0)).map(Some)
}

/// Checks a recording's file name prefix and size cap (`None`: the default cap, `Some(None)`:
/// none): files go to `PREFIX.N` in a directory that exists.
///
/// # Errors
/// The field (`record`) and what is wrong with it.
pub fn record_settings(prefix: PathBuf, max_size: Option<Option<usize>>) -> Result<crate::record::RecordConfig, (&'static str, String)> {
    if prefix.file_name().is_none() {
        return Err((
            "record",
            format!("{} is not a file name prefix (files are PREFIX.N)", prefix.display()),
        ));
    }
    let dir = prefix.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(("record", format!("{} is not a directory", dir.display())));
    }
    // Said now, not in a warning per session: the directory must take this process's files
    // (under systemd's DynamicUser only a StateDirectory= or LogsDirectory= one does).
    let probe = dir.join(format!(".wsbridge-record-check.{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(("record", format!("{}: recordings cannot be written there: {e}", dir.display()))),
    }
    let max_size = match max_size {
        None => Some(crate::record::DEFAULT_MAX_SIZE),
        Some(n) => n.map(|n| n as u64),
    };
    Ok(crate::record::RecordConfig { prefix, max_size })
}

impl<'de> Deserialize<'de> for Target {
    /// A string (`"host:port"`, `"unix:/path"`) or, in agent mode, `{ agent = "…", service = "…" }`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => s.parse().map_err(de::Error::custom),
            toml::Value::Table(t) => crate::agent::target_from_table(t).map_err(de::Error::custom),
            _ => Err(de::Error::custom(
                "expected \"HOST:PORT\", \"unix:/path\" or { agent = \"NAME\", service = \"NAME\" }",
            )),
        }
    }
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// A TCP address (`PORT`, `IP:PORT`, `[IPv6]:PORT`).
    Tcp(SocketAddr),
    /// A unix stream socket at `path` (`unix:/path`), created with file mode `mode` (default
    /// 0600, as websockify's `--unix-listen-mode`). Not on Windows.
    Unix {
        /// The socket file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The sockets systemd passed (socket activation) whose `FileDescriptorName=` is this
    /// (`systemd:NAME`; a socket unit's default name is the unit's, e.g. `wsbridge.socket`).
    /// Linux only.
    Systemd(String),
}

/// A unix socket listener's file mode when none is given: only wsbridge's user may connect.
pub const DEFAULT_UNIX_MODE: u32 = 0o600;

impl ListenOn {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            ListenOn::Tcp(a) => Some(*a),
            _ => None,
        }
    }
}

impl From<SocketAddr> for ListenOn {
    fn from(a: SocketAddr) -> ListenOn {
        ListenOn::Tcp(a)
    }
}

impl fmt::Display for ListenOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenOn::Tcp(a) => a.fmt(f),
            ListenOn::Unix { path, .. } => write!(f, "unix:{}", path.display()),
            ListenOn::Systemd(name) => write!(f, "systemd:{name}"),
        }
    }
}

impl FromStr for ListenOn {
    type Err = String;

    /// `PORT`, `IP:PORT`, `[IPv6]:PORT`, `unix:/path` or `systemd:NAME`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("invalid listen address {s:?}: empty unix socket path"));
            }
            if cfg!(windows) {
                return Err(format!("{s}: unix socket listeners are not available on Windows"));
            }
            return Ok(ListenOn::Unix {
                path: PathBuf::from(path),
                mode: DEFAULT_UNIX_MODE,
            });
        }
        if let Some(name) = s.strip_prefix("systemd:") {
            check_fd_name(name).map_err(|m| format!("invalid listen address {s:?}: {m}"))?;
            if !cfg!(target_os = "linux") {
                return Err(format!("{s}: socket activation is systemd's, on Linux only"));
            }
            return Ok(ListenOn::Systemd(name.to_owned()));
        }
        s.parse::<ListenAddr>()
            .map(|a| ListenOn::Tcp(a.0))
            .map_err(|e| format!("{e}, unix:/path or systemd:NAME"))
    }
}

impl<'de> Deserialize<'de> for ListenOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        port_or_text(d, |p| ListenOn::Tcp(SocketAddr::from(([0, 0, 0, 0], p))))
    }
}

/// A listen address in TOML: a bare port number (every IPv4 address), or text for `T`'s parser.
fn port_or_text<'de, D, T>(d: D, port: impl FnOnce(u16) -> T) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    match NumOrString::deserialize(d)? {
        NumOrString::Int(n) => u16::try_from(n)
            .map(port)
            .map_err(|_| de::Error::custom(format!("{n} is not a port (0-65535): write PORT, \"IP:PORT\" or \"[IPv6]:PORT\""))),
        NumOrString::Float(f) => Err(de::Error::custom(format!(
            "{f} is not a port: write PORT, \"IP:PORT\" or \"[IPv6]:PORT\""
        ))),
        NumOrString::S(s) => s.parse().map_err(de::Error::custom),
    }
}

/// A name systemd can give a passed socket (`FileDescriptorName=`): 1 to 255 printable ASCII
/// characters, no `:` (it separates the names in `LISTEN_FDNAMES`).
fn check_fd_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("a socket name has 1 to 255 characters".into());
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err("a socket name is printable ASCII without spaces or ':'".into());
    }
    Ok(())
}

/// Parses a unix socket's file mode in octal, as websockify's `--unix-listen-mode` (`600`,
/// `0660`, `0o660`): permission bits only.
pub fn parse_unix_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "invalid file mode {s:?}: expected octal permission bits such as \"0600\" or \"0660\""
        )),
    }
}

/// A listen address: `PORT`, `HOST:PORT` or `[V6]:PORT` with an IP literal host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(port) = s.parse::<u16>() {
            return Ok(ListenAddr(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr(addr));
        }
        match split_host_port(s) {
            Some(("localhost", port)) => port
                .parse::<u16>()
                .map(|p| ListenAddr(SocketAddr::from(([127, 0, 0, 1], p))))
                .map_err(|_| format!("invalid listen address {s:?}: bad port")),
            Some(("", port)) => port
                .parse::<u16>()
                .map(|p| ListenAddr(SocketAddr::from(([0, 0, 0, 0], p))))
                .map_err(|_| format!("invalid listen address {s:?}: bad port")),
            _ => Err(format!("invalid listen address {s:?}: expected PORT, IP:PORT or [IPv6]:PORT")),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        port_or_text(d, |p| ListenAddr(SocketAddr::from(([0, 0, 0, 0], p))))
    }
}

/// A duration written `"10s"`, `"500ms"`, `"5m"`, `"1h"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dur(Duration);

/// A [`Dur`] that may also be `"off"` (or 0): no deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OptDur(Option<Duration>);

/// Parses `"10s"`, `"500ms"`, `"5m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. \"10s\", \"500ms\", \"5m\""))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(n * scale)
        .map_err(|_| format!("invalid duration {s:?}: out of range"))
        .and_then(at_most_a_year)
}

/// A duration as a TOML value, for files read as [`toml::Value`]s (the agent's): a number of
/// seconds, or a string as [`parse_duration`] reads it (`"off"`, where it is allowed, is the
/// caller's to take first).
///
/// # Errors
/// Not a duration, negative, or more than a year.
pub fn duration_of(v: &toml::Value) -> Result<Duration, String> {
    match v {
        toml::Value::Integer(n) => u64::try_from(*n)
            .map_err(|_| format!("{n} is negative"))
            .map(Duration::from_secs)
            .and_then(at_most_a_year),
        toml::Value::Float(f) => Duration::try_from_secs_f64(*f)
            .map_err(|_| format!("{f} is not a number of seconds"))
            .and_then(at_most_a_year),
        toml::Value::String(s) => parse_duration(s),
        other => Err(format!(
            "expected a duration such as \"10s\", \"500ms\", \"5m\" or a number of seconds, found {}",
            other.type_str()
        )),
    }
}

/// The longest duration accepted: deadlines are added to the clock, and nothing a session does
/// needs more (a deadline that may be off takes "off").
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Checks a duration against [`MAX_DURATION`].
///
/// # Errors
/// The duration is longer, said in seconds.
pub fn at_most_a_year(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(format!(
            "{} s is more than a year, the longest duration accepted (\"off\" where a deadline may be off)",
            d.as_secs()
        ));
    }
    Ok(d)
}

/// A number or a string, as the file writes a duration or a size (`30`, `"30s"`, `"64KiB"`).
enum NumOrString {
    Int(i64),
    Float(f64),
    S(String),
}

impl<'de> Deserialize<'de> for NumOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = NumOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string such as \"10s\" or \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<NumOrString, E> {
                Ok(NumOrString::Int(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<NumOrString, E> {
                i64::try_from(n)
                    .map(NumOrString::Int)
                    .map_err(|_| E::custom(format!("{n} is too large")))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<NumOrString, E> {
                Ok(NumOrString::Float(f))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<NumOrString, E> {
                Ok(NumOrString::S(s.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl NumOrString {
    /// The duration written: seconds as a number, or a string as [`parse_duration`] reads it;
    /// at most [`MAX_DURATION`].
    fn duration(self) -> Result<Duration, String> {
        let what = "a duration is e.g. \"10s\", \"500ms\", \"5m\" or a number of seconds";
        match self {
            NumOrString::Int(n) => match u64::try_from(n) {
                Ok(n) => at_most_a_year(Duration::from_secs(n)),
                Err(_) => Err(format!("{n} is negative: {what}")),
            },
            NumOrString::Float(f) if f.is_nan() || f < 0.0 => Err(format!("{f} is not a number of seconds: {what}")),
            NumOrString::Float(f) => Duration::try_from_secs_f64(f)
                .map_err(|_| format!("{f} s is more than a year, the longest duration accepted"))
                .and_then(at_most_a_year),
            NumOrString::S(s) => parse_duration(&s),
        }
    }

    /// The size written: bytes as a whole number, or a string as [`parse_size`] reads it
    /// (`"off"` is the caller's to take first).
    fn size(self) -> Result<usize, String> {
        let what = "a size is a whole number of bytes, or e.g. \"64KiB\", \"1MiB\"";
        match self {
            NumOrString::Int(n) => usize::try_from(n).map_err(|_| format!("{n} is negative: {what}")),
            NumOrString::Float(f) => Err(format!("{f} is not a whole number: {what}")),
            NumOrString::S(s) => parse_size(&s),
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let dur = NumOrString::deserialize(d)?.duration().map_err(de::Error::custom)?;
        if dur.is_zero() {
            return Err(de::Error::custom("must be greater than zero"));
        }
        Ok(Dur(dur))
    }
}

impl<'de> Deserialize<'de> for OptDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let dur = match NumOrString::deserialize(d)? {
            NumOrString::S(s) if s.trim() == "off" => return Ok(OptDur(None)),
            written => written.duration().map_err(de::Error::custom)?,
        };
        Ok(OptDur((!dur.is_zero()).then_some(dur)))
    }
}

/// A count that zero would turn into "refuse everything" (`max_connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AtLeastOne(usize);

impl<'de> Deserialize<'de> for AtLeastOne {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Count::<usize>::deserialize(d)?.0 {
            0 => Err(de::Error::custom("must be at least 1 (0 would refuse every connection)")),
            n => Ok(AtLeastOne(n)),
        }
    }
}

/// A whole number of something (sessions, connections), 0 or more: serde's own messages for a
/// `usize` or a `u32` (`expected usize`) name a Rust type rather than what to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count<T>(pub T);

impl<'de, T: TryFrom<u64>> Deserialize<'de> for Count<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let not = |written: &dyn fmt::Display| de::Error::custom(format!("must be a whole number ≥ 0, not {written}"));
        let n = match NumOrString::deserialize(d)? {
            NumOrString::Int(n) => u64::try_from(n).map_err(|_| not(&n))?,
            NumOrString::Float(f) => return Err(not(&f)),
            NumOrString::S(s) if s.trim().parse::<u64>().is_ok() => {
                return Err(de::Error::custom(format!("{s:?} is a string: write the number without quotes")))
            }
            NumOrString::S(s) => return Err(not(&format!("{s:?}"))),
        };
        T::try_from(n)
            .map(Count)
            .map_err(|_| de::Error::custom(format!("{n} is too large")))
    }
}

/// A message size limit written as a number or `"64KiB"`, `"1MiB"`, or `"off"` (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size(Option<usize>);

/// Checks a message size limit: smaller than a control frame's payload, nothing sensible fits.
///
/// # Errors
/// The limit is below [`crate::frame::MAX_CONTROL`] bytes.
pub fn check_message_size(n: usize) -> Result<usize, String> {
    if n < crate::frame::MAX_CONTROL {
        return Err(format!("must be at least {} bytes", crate::frame::MAX_CONTROL));
    }
    Ok(n)
}

/// Parses `"65536"`, `"64KiB"`, `"1MiB"` (also `KB`/`MB`, taken as binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 65536, \"64KiB\", \"1MiB\""))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses a message size limit as [`parse_size`] does, or `"off"`: no limit (`None`).
///
/// # Errors
/// Not a size, or below [`check_message_size`]'s floor.
pub fn parse_message_size(s: &str) -> Result<Option<usize>, String> {
    if s.trim() == "off" {
        return Ok(None);
    }
    parse_size(s).and_then(check_message_size).map(Some)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = match NumOrString::deserialize(d)? {
            NumOrString::S(s) => return parse_message_size(&s).map(Size).map_err(de::Error::custom),
            written => written.size().map_err(de::Error::custom)?,
        };
        check_message_size(n).map(|n| Size(Some(n))).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    /// A route's unix socket is relative to the configuration file, as its other paths are (a
    /// review: it was the working directory's, which under systemd is `/`).
    #[test]
    fn a_routes_unix_socket_is_relative_to_the_file() {
        let c = Config::from_toml(
            "[[listen]]\naddr = 0\n[[route]]\npath = \"/a\"\ntarget = \"unix:app.sock\"\n[[route]]\npath = \"/b\"\ntarget = \"unix:/run/b.sock\"\n",
            Path::new("/etc/wsbridge/wsbridge.toml"),
        )
        .unwrap();
        assert_eq!(c.routes[0].target, Target::Unix("/etc/wsbridge/app.sock".into()));
        assert_eq!(c.routes[1].target, Target::Unix("/run/b.sock".into()));
    }

    /// A file that does not parse on a line that writes a credential: the error quotes the line
    /// up to the key's `=`, whether the value is what broke (a token without quotes, a string
    /// left open) or something after it; other lines are quoted whole.
    #[test]
    fn a_parse_error_leaves_out_credentials_on_the_lines_it_quotes() {
        for (text, kept) in [
            ("[admin]\naddr = \"127.0.0.1:9090\"\ntoken = s3cretXYZ\n", "token ="),
            ("[admin]\naddr = \"127.0.0.1:9090\"\ntoken = \"s3cretXYZ\n", "token ="),
            (
                "[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nauth = { bearer = [\"s3cretXYZ\"], nope = 1 }\n",
                "auth = { bearer =",
            ),
            (
                "[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nauth = { \"bearer\" = [\"s3cretXYZ\" }\n",
                "auth = { \"bearer\" =",
            ),
            ("[admin]\naddr = \"127.0.0.1:9090\"\nadmin_token = 7 s3cretXYZ\n", "admin_token ="),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(!e.contains("s3cretXYZ"), "{e}");
            assert!(e.contains(&format!("{kept} …")), "{kept} in {e}");
        }
        // Where the parser stops inside a secret's value lines below its key, or quotes the
        // value in its own words, none of it is shown (a review found these).
        for text in [
            "[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nauth = { bearer = \"s3cretXYZ\" }\n",
            "[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nauth.bearer = [\n  \"s3cretXYZ\" x,\n]\n",
            "[admin]\naddr = \"127.0.0.1:9090\"\ntoken = \"\"\"\nabc\\qs3cretXYZ\"\"\"\n",
            "[admin]\naddr = \"127.0.0.1:9090\"\ntoken = \'\'\'\ns3cretXYZ\n",
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(!e.contains("s3cretXYZ"), "{e}");
        }
        // An `=` inside an earlier element or a comment is not a key's (base64 tokens' padding),
        // and the parser's own words stay readable.
        let text = "[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nauth = { bearer = [\n  \"c2VjcmV0QQ==\", # a = b\n  \"c2VjcmV0Qg==\"\n  \"c2VjcmV0Qw==\",\n] }\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(!e.contains("c2VjcmV0"), "{e}");
        assert!(e.contains("missing comma between array elements, expected `,`"), "{e}");
        // An error beside a secret on its line, not in it, still says what is wrong.
        let e = parse("[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nauth = { bearer = [\"s3cretXYZ\"], basic = \"x\" }\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cretXYZ") && e.contains("unknown field `basic`"), "{e}");
        // A URL's password (an agent's proxy, say) is left out of the line quoted.
        let e = parse("[[route]]\npath = \"/a\" x\ntarget = \"http://u:s3cretXYZ@p:3128/\"\n").unwrap_err();
        assert!(!e.to_string().contains("s3cretXYZ"), "{e}");
        // A header after a secret's line is still quoted.
        let e = parse("[admin]\ntoken = \"abc\"\n[[rout\n").unwrap_err().to_string();
        assert!(e.contains("[[rout"), "{e}");
        // A Windows path in double quotes is told how to write it.
        let e = parse("[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\nrecord = \"C:\\ProgramData\\rec\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("write a Windows path in single quotes, 'C:\\ProgramData\\wsbridge\\agent.secret'"),
            "{e}"
        );
        // Other lines are quoted as written; so is a key that names a file.
        let e = parse("[[route]]\npath = \"/a\ntarget = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(e.contains("path = \"/a"), "{e}");
        let e = parse("[admin]\ntoken_file = admin.token\n").unwrap_err().to_string();
        assert!(e.contains("token_file = admin.token"), "{e}");
    }

    /// An empty file (one caught between a truncate and its write) says so, beside what is needed.
    #[test]
    fn an_empty_file_says_it_is_empty() {
        for text in ["", "\n  \n", "# only a comment\n"] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("the file is empty") && e.contains("[[listen]]"), "{e}");
        }
        let e = parse("[limits]\nmax_connections = 5\n").unwrap_err().to_string();
        assert!(!e.contains("empty") && e.contains("at least one [[listen]]"), "{e}");
    }

    #[test]
    fn the_log_files_size_is_off_by_default_on_unix_and_set_by_max_size() {
        let base = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n";
        let default = if cfg!(windows) {
            Some(crate::logging::LogFile::LIMIT)
        } else {
            None
        };
        assert_eq!(parse(base).unwrap().log_max_size, default);
        let set = |v: &str| parse(&format!("{base}[log]\nfile = \"w.log\"\nmax_size = {v}\n")).map(|c| c.log_max_size);
        assert_eq!(set("\"100MiB\"").unwrap(), Some(100 << 20));
        assert_eq!(set("\"off\"").unwrap(), None);
        let e = set("\"lots\"").unwrap_err().to_string();
        assert!(e.contains("max_size") || e.contains("line 6"), "{e}");
        let e = set("\"1KiB\"").unwrap_err().to_string();
        assert!(e.contains("at least 64KiB"), "{e}");
    }

    #[test]
    fn a_grace_shorter_than_the_close_and_a_short_admin_token_off_loopback_are_warned_about() {
        let base = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:9\"\n";
        assert!(parse(base).unwrap().warnings().is_empty());
        let grace = parse(&format!("{base}[timeouts]\nclose = \"5s\"\nshutdown_grace = \"2s\"\n")).unwrap();
        let w = grace.warnings();
        assert!(
            w.len() == 1 && w[0].contains("shutdown_grace (2s) is shorter than close (5s)"),
            "{w:?}"
        );
        let admin = |addr: &str, token: &str| {
            parse(&format!("{base}[admin]\naddr = \"{addr}\"\ntoken = \"{token}\"\n"))
                .unwrap()
                .warnings()
        };
        let w = admin("0.0.0.0:9100", "hunter2");
        assert!(
            w.len() == 1 && w[0].contains("[admin] token is shorter than 16 characters"),
            "{w:?}"
        );
        assert!(admin("127.0.0.1:9100", "hunter2").is_empty(), "on loopback");
        assert!(admin("0.0.0.0:9100", "a-long-enough-random-token").is_empty());
    }

    #[test]
    fn targets() {
        assert_eq!(
            "localhost:5900".parse(),
            Ok(Target::Tcp {
                host: "localhost".into(),
                port: 5900
            })
        );
        assert_eq!(
            "[::1]:5900".parse(),
            Ok(Target::Tcp {
                host: "::1".into(),
                port: 5900
            })
        );
        assert_eq!("unix_socket:/tmp/s".parse(), Ok(Target::Unix("/tmp/s".into())));
        // websockify's IPv6 targets, without brackets: the last colon splits.
        assert_eq!(
            "::1:5900".parse(),
            Ok(Target::Tcp {
                host: "::1".into(),
                port: 5900
            })
        );
        assert_eq!("fd00::7:5901".parse::<Target>().unwrap().to_string(), "[fd00::7]:5901");
        assert!("a:b:5900".parse::<Target>().is_err(), "not an IPv6 address before the last colon");
        assert!("host:0".parse::<Target>().is_err());
        assert!("host".parse::<Target>().is_err());
        // A host that can name nothing is refused when read, not found unresolvable per session.
        assert!("bücher.example:1".parse::<Target>().unwrap_err().contains("xn--"));
        for bad in [
            "a b:5900",
            "127.0.0.1 :5900",
            "h\t:1",
            "a..b:1",
            "h/x:1",
            "[::1%]:1",
            "1.2.3.4%eth0:1",
        ] {
            let e = bad.parse::<Target>().unwrap_err();
            assert!(
                e.contains("neither an IP address nor a host name") || e.contains("expected HOST:PORT"),
                "{bad}: {e}"
            );
        }
        for good in [
            "vnc_1.internal:5900",
            "host.example.:5900",
            "[fe80::1%eth0]:5900",
            "10.0.0.1:1",
            "xn--bcher-kva.example:1",
        ] {
            assert!(good.parse::<Target>().is_ok(), "{good}");
        }
        assert_eq!(
            Target::Tcp {
                host: "::1".into(),
                port: 1
            }
            .to_string(),
            "[::1]:1"
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert!(parse_size("1x").is_err());
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let err =
            parse("[[listen]]\naddr = \"127.0.0.1:1\"\n\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\nframming = \"text\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("test.toml: "), "{msg}");
        assert!(msg.contains("line 7"), "{msg}");
        assert!(msg.contains("framming"), "{msg}");
    }

    #[test]
    fn bad_value_names_line() {
        let msg = parse("[[listen]]\naddr = 6080\n[[route]]\npath = \"/a\"\ntarget = \"nohost\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("line 5") && msg.contains("target") && msg.contains("HOST:PORT"),
            "{msg}"
        );
        let msg = parse("[[listen]]\naddr = 6080\n[timeouts]\nidle = \"5 fortnights\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 4") && msg.contains("idle"), "{msg}");
        // Deadlines are added to the clock: an absurd one is refused here, not an overflow later.
        for value in ["1e19", "\"200000h\"", "99999999999"] {
            let msg = parse(&format!("[[listen]]\naddr = 6080\n[timeouts]\npong_timeout = {value}\n"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("line 4") && msg.contains("more than a year"), "{value}: {msg}");
        }
        let year = "[[listen]]\naddr = 6080\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\n[timeouts]\nmax_lifetime = \"8760h\"\n";
        assert_eq!(parse(year).unwrap().timeouts.max_lifetime, Some(Duration::from_secs(8760 * 3600)));
    }

    /// A path no request can hold (a space, `#`, non-ASCII: requests are matched percent-encoded)
    /// is refused with its field and what to write, for a route and an agent endpoint alike.
    #[test]
    fn a_path_no_request_can_hold_is_refused() {
        for (text, field) in [
            ("[[route]]\npath = \"/café\"\ntarget = \"h:1\"\n", "route[0].path"),
            ("[[route]]\npath = \"/a b\"\ntarget = \"h:1\"\n", "route[0].path"),
            ("[[route]]\npath = \"/a#b\"\ntarget = \"h:1\"\n", "route[0].path"),
            ("[[agent_endpoint]]\npath = \"/agent é\"\n", "agent_endpoint[0].path"),
        ] {
            let msg = parse(&format!("[[listen]]\naddr = 6080\n{text}")).unwrap_err().to_string();
            assert!(
                msg.contains(field) && msg.contains("write the path percent-encoded"),
                "{text}: {msg}"
            );
        }
        let ok = "[[listen]]\naddr = 6080\n[[route]]\npath = \"/caf%C3%A9\"\ntarget = \"h:1\"\n";
        assert!(parse(ok).is_ok());
    }

    #[test]
    fn zero_max_connections_is_refused_with_its_line() {
        let msg = parse("[[listen]]\naddr = 6080\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\n[limits]\nmax_connections = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("line 7") && msg.contains("max_connections") && msg.contains("at least 1"),
            "{msg}"
        );
    }

    #[test]
    fn redaction_tells_tokens_apart_and_shows_nothing_of_them() {
        let (a, b) = (redact("desk1"), redact("desk2"));
        assert_ne!(a, b);
        assert_eq!(a, redact("desk1"), "one token, one tag, within a process");
        // Nothing but the tag: no first characters, no length.
        for tag in [&a, &b] {
            assert!(tag.len() == 13 && tag.starts_with('#'), "{tag}");
            assert!(tag[1..].chars().all(|c| c.is_ascii_hexdigit()), "{tag}");
        }
        assert_eq!(Matcher::Token("desk1".into()).to_string(), format!("token {a}"));
        // Keyed: the tag depends on the key, so it cannot be computed (or brute-forced) without it.
        let key = |k: &[u8]| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
        assert_ne!(redact_with(&key(b"one"), "desk1"), redact_with(&key(b"two"), "desk1"));
    }

    #[test]
    fn durations_and_sizes_print_as_the_file_writes_them() {
        for (d, text) in [
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(100), "0.0001s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text} reads back");
        }
        for (n, text) in [
            (1 << 20, "1MiB"),
            (64 << 10, "64KiB"),
            (1 << 30, "1GiB"),
            (1000, "1000"),
            (1536 << 10, "1536KiB"),
        ] {
            assert_eq!(format_size(n), text);
            assert_eq!(parse_size(text), Ok(n), "{text} reads back");
        }
    }

    #[test]
    fn describe_uses_the_configurations_words() {
        let c = parse(
            "[[listen]]\naddr = \"127.0.0.1:1\"\n[timeouts]\nping_interval = 20\nidle = \"off\"\nconnect = \"500ms\"\ndrain_delay = \"10s\"\n[limits]\nmax_message_size = \"64KiB\"\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\nframing = \"lines\"\nclient_cn = [\"alice\"]\n",
        )
        .unwrap();
        let text = c.describe();
        for words in [
            "listen    addr = \"127.0.0.1:1\"\n",
            "ping_interval = \"20s\"",
            "idle = \"off\"",
            "connect = \"500ms\"",
            "drain_delay = \"10s\"",
            "max_message_size = \"64KiB\"",
        ] {
            assert!(text.contains(words), "{words:?} not in {text}");
        }
        assert!(!text.contains("Some(") && !text.contains("None") && !text.contains("{ "), "{text}");
        assert_eq!(
            c.routes[0].options.describe(),
            "framing = \"lines\", subprotocols = [\"binary\"], max_message_size = \"64KiB\", client_cn = [\"alice\"]"
        );
    }

    #[test]
    fn a_file_names_source_needs_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("desk1");
        std::fs::write(&file, "127.0.0.1:1\n").unwrap();
        let text = |source: &Path, format: &str| {
            format!(
                "[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nsource = {:?}\nlookup = \"host\"\n{format}\n",
                source.display().to_string()
            )
        };
        let c = parse(&text(dir.path(), "format = \"file-names\"")).unwrap();
        let s = &c.token_sources[0];
        assert_eq!((s.format, s.lookup), (TokenFormat::FileNames, TokenLookup::Host));
        assert_eq!(parse(&text(dir.path(), "")).unwrap().token_sources[0].format, TokenFormat::Lines);
        assert_eq!(
            parse(&text(&file, "format = \"lines\"")).unwrap().token_sources[0].format,
            TokenFormat::Lines
        );
        let msg = parse(&text(&file, "format = \"file-names\"")).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "test.toml:6: tokens[0].format: \"file-names\" (websockify's TokenFileName) needs a directory as `source`: {} is not one",
                file.display()
            )
        );
        let msg = parse(&text(dir.path(), "format = \"names\"")).unwrap_err().to_string();
        assert!(msg.contains("line 6") && msg.contains("file-names"), "{msg}");
        let redis = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nallow_any_target = true\nformat = \"file-names\"\n[tokens.redis]\nurl = \"redis://127.0.0.1:1\"\n";
        let msg = parse(redis).unwrap_err().to_string();
        assert_eq!(msg, "test.toml:5: tokens[0].format: is for `source` token files only");
    }

    #[test]
    #[cfg(unix)]
    fn a_unix_sockets_source_needs_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("desk1");
        std::fs::write(&file, "").unwrap();
        let text = |source: &Path| {
            format!(
                "[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nsource = {:?}\nformat = \"unix-sockets\"\n",
                source.display().to_string()
            )
        };
        let c = parse(&text(dir.path())).unwrap();
        assert_eq!(c.token_sources[0].format, TokenFormat::UnixSockets);
        let msg = parse(&text(&file)).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "test.toml:5: tokens[0].format: \"unix-sockets\" (websockify's UnixDomainSocketDirectory) needs a directory as `source`: {} is not one",
                file.display()
            )
        );
    }

    /// Two API sources whose URLs differ only in query values (two tenants, two keys) are two
    /// sources, told apart in their names, which leave those values out (a review: the second
    /// was refused as "already a token source" once names left them out); the same URL twice
    /// is refused as before.
    #[test]
    fn api_sources_differing_in_their_query_values_are_two_sources() {
        let text = |second: &str| {
            format!(
                "[[listen]]\naddr = \"127.0.0.1:0\"\n\
                 [[tokens]]\nallow_targets = [\"127.0.0.1/32:1\"]\napi = {{ url = \"http://127.0.0.1:1/lookup?tenant=alpha&token=%s\" }}\n\
                 [[tokens]]\nallow_targets = [\"127.0.0.1/32:1\"]\napi = {{ url = \"http://127.0.0.1:1/lookup?tenant={second}&token=%s\" }}\n"
            )
        };
        let both = parse(&text("beta")).unwrap();
        let names: Vec<String> = both.token_sources.iter().map(|s| s.path.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "http://127.0.0.1:1/lookup?tenant=…&token=%s",
                "http://127.0.0.1:1/lookup?tenant=…&token=%s (tokens[1])"
            ]
        );
        let msg = parse(&text("alpha")).unwrap_err().to_string();
        assert!(
            msg.contains("tokens[1].api: ") && msg.contains("is already a token source"),
            "{msg}"
        );
        assert!(!msg.contains("alpha"), "{msg}");
        // A URL that does not parse is said without its query values, and without the TOML
        // parser's quote of its line (a review found the key in a failed reload's log so).
        let bad = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nallow_targets = [\"127.0.0.1/32:1\"]\n\
                   api = { url = \"http://127.0.0.1:99999/lookup?apikey=S3CRET&token=%s\" }\n";
        let msg = parse(bad).unwrap_err().to_string();
        assert!(msg.contains("tokens[0].api.url: ") && msg.contains("apikey=…"), "{msg}");
        assert!(!msg.contains("S3CRET"), "{msg}");
    }

    #[test]
    fn one_token_file_twice_needs_two_lookups() {
        let dir = std::env::temp_dir();
        let file = dir.join(format!("wsbridge-tokens-{}", std::process::id()));
        std::fs::write(&file, "a: 127.0.0.1:1\n").unwrap();
        let text = |second: &str| {
            format!(
                "[[listen]]\naddr = \"127.0.0.1:0\"\n[[tokens]]\nsource = {f:?}\n[[tokens]]\nsource = {f:?}\nlookup = \"{second}\"\n",
                f = file.display().to_string()
            )
        };
        let both = parse(&text("host")).unwrap();
        assert_eq!(both.token_sources.len(), 2);
        let msg = parse(&text("query")).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "test.toml:6: tokens[1].source: {} is already a token source with lookup = \"query\"",
                file.display()
            )
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn a_policy_mistake_names_its_line_and_field() {
        let msg = parse("[[listen]]\naddr = 1\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\nnew_sessions_burst = 3\n")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "test.toml:6: route[0].new_sessions_burst: goes with new_sessions_per_ip");
        let file = std::env::temp_dir().join(format!("wsbridge-policy-tokens-{}", std::process::id()));
        std::fs::write(&file, "a: 127.0.0.1:1\n").unwrap();
        let text = format!(
            "[[listen]]\naddr = 1\n[[tokens]]\nsource = {:?}\nauth = {{ bearer = [] }}\n",
            file.display().to_string()
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert_eq!(msg, "test.toml:5: tokens[0].auth.bearer: needs one or more tokens, none empty");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn duplicate_path_names_line() {
        let msg = parse("[[listen]]\naddr = 1\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\n[[route]]\npath = \"/a\"\ntarget = \"h:2\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "test.toml:7: route[1].path: path /a has another route already");
    }

    #[test]
    fn backend_tls_needs_a_tcp_target() {
        let msg = parse("[[listen]]\naddr = 1\n[[route]]\npath = \"/\"\ntarget = \"unix:/s\"\nbackend_tls = { ca = \"ca.pem\" }\n")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "test.toml:6: route[0].backend_tls: TLS is for TCP targets, not unix sockets");
    }

    #[test]
    fn route_needs_one_matcher() {
        let msg = parse("[[listen]]\naddr = 1\n[[route]]\ntarget = \"h:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("route[0]") && msg.contains("exactly one of"), "{msg}");
    }

    /// A directory with files that look like PEM certificates (`certs`) and keys (`keys`; a
    /// name in both holds both): enough for the configuration's checks, which read labels only.
    pub(crate) fn pem_files(certs: &[&str], keys: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in certs.iter().chain(keys) {
            let mut text = String::new();
            if certs.contains(name) {
                text.push_str("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n");
            }
            if keys.contains(name) {
                text.push_str("-----BEGIN PRIVATE KEY-----\nMA==\n-----END PRIVATE KEY-----\n");
            }
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn tls_tables() {
        let dir = pem_files(
            &["live/fullchain.pem", "ca.pem", "a.pem", "backend-ca.pem"],
            &["privkey.pem", "a.pem"],
        );
        let key = dir.path().join("privkey.pem");
        let c = Config::from_toml(
            &format!("[[listen]]\naddr = 443\n[listen.tls]\ncert = \"live/fullchain.pem\"\nkey = {:?}\nonly = true\nmin_version = \"1.3\"\nclient_ca = \"ca.pem\"\nclient_auth = \"optional\"\nwatch = \"off\"\n[[listen.tls.sni]]\nnames = [\"a.example\"]\ncert = \"a.pem\"\n[[route]]\npath = \"/\"\ntarget = \"vnc:5900\"\nclient_cn = [\"alice\"]\nbackend_tls = {{ server_name = \"vnc.internal\", ca = \"backend-ca.pem\" }}\n", key.display().to_string()),
            &dir.path().join("w.toml"),
        )
        .unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.default.cert, dir.path().join("live/fullchain.pem"));
        assert_eq!(tls.default.key.as_deref(), Some(key.as_path()));
        assert!(tls.only);
        assert_eq!(tls.min_version, MinVersion::Tls13);
        assert_eq!(tls.client_auth, ClientAuth::Optional);
        assert_eq!(tls.watch, None);
        assert_eq!(tls.sni[0].0, vec!["a.example".to_string()]);
        let b = c.routes[0].options.backend_tls.as_ref().unwrap();
        assert_eq!(b.ca, Some(dir.path().join("backend-ca.pem")));
        assert!(!b.insecure_skip_verify, "verification stays on unless said otherwise");
        assert_eq!(c.routes[0].options.client_cn, Some(vec!["alice".to_string()]));
        let msg = parse("[[listen]]\naddr = 1\n[listen.tls]\ncert = \"c\"\nmin_version = \"1.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 5") && msg.contains("min_version"), "{msg}");
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(
            "[[listen]]\naddr = \"[::1]:0\"\n[timeouts]\nidle = \"off\"\nping_interval = 20\n[[route]]\npath = \"/chat\"\ntarget = \"127.0.0.1:7\"\nframing = \"lines\"\nmax_message_size = \"4KiB\"\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0].addr, "[::1]:0".parse().unwrap());
        assert_eq!(c.timeouts.idle, None);
        assert_eq!(c.timeouts.ping_interval, Some(Duration::from_secs(20)));
        assert_eq!(c.routes[0].options.framing, Framing::Lines);
        assert_eq!(c.routes[0].options.max_message_size, Some(4096));
        assert_eq!(c.routes[0].options.subprotocols, vec!["binary".to_string()]);
    }

    #[test]
    fn unix_and_systemd_listeners() {
        let c = parse(
            "[[listen]]\naddr = \"unix:run/ws.sock\"\nmode = \"0660\"\n[[listen]]\naddr = \"systemd:web\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:7\"\n",
        )
        .unwrap();
        // Relative to the file's directory, as every path in it.
        assert_eq!(
            c.listeners[0].addr,
            ListenOn::Unix {
                path: PathBuf::from("run/ws.sock"),
                mode: 0o660
            }
        );
        assert_eq!(c.listeners[0].describe(), "addr = \"unix:run/ws.sock\", mode = \"0660\"");
        assert_eq!(c.listeners[1].addr, ListenOn::Systemd("web".into()));
        assert_eq!("unix:/s".parse::<ListenOn>().unwrap().to_string(), "unix:/s");
        assert_eq!(
            "unix:/s".parse::<ListenOn>().unwrap(),
            ListenOn::Unix {
                path: "/s".into(),
                mode: DEFAULT_UNIX_MODE
            }
        );
        let err = |text: &str| parse(text).unwrap_err().to_string();
        let route = "[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:7\"\n";
        let msg = err(&format!("[[listen]]\naddr = 80\nmode = \"0660\"\n{route}"));
        assert!(
            msg.starts_with("test.toml:3: ") && msg.contains("listen[0].mode") && msg.contains("unix socket"),
            "{msg}"
        );
        let msg = err(&format!("[[listen]]\naddr = \"unix:/s\"\nmode = \"rw\"\n{route}"));
        assert!(msg.contains("listen[0].mode") && msg.contains("octal"), "{msg}");
        let msg = err(&format!("[[listen]]\naddr = \"unix:/s\"\n[listen.tls]\ncert = \"c.pem\"\n{route}"));
        assert!(msg.contains("listen[0].tls") && msg.contains("TCP listeners"), "{msg}");
        let msg = err(&format!("[[listen]]\naddr = \"systemd:a:b\"\n{route}"));
        assert!(msg.contains("line 2") && msg.contains("':'"), "{msg}");
        let msg = err(&format!(
            "[[listen]]\naddr = \"systemd:web\"\n[[listen]]\naddr = \"systemd:web\"\n{route}"
        ));
        assert!(
            msg.contains("listen[1].addr") && msg.contains("systemd:web is listed twice"),
            "{msg}"
        );
        // An any-address listener and a specific one of its family on one port could not both bind.
        for (a, b) in [("127.0.0.1:6080", "0.0.0.0:6080"), ("[::]:6080", "[::1]:6080")] {
            let msg = err(&format!("[[listen]]\naddr = \"{a}\"\n[[listen]]\naddr = \"{b}\"\n{route}"));
            assert!(msg.contains("listen[1].addr") && msg.contains("overlaps listen[0]"), "{msg}");
        }
        for (a, b) in [
            ("127.0.0.1:6080", "0.0.0.0:6081"),
            ("0.0.0.0:6080", "[::1]:6080"),
            ("127.0.0.1:0", "0.0.0.0:0"),
        ] {
            assert!(
                parse(&format!("[[listen]]\naddr = \"{a}\"\n[[listen]]\naddr = \"{b}\"\n{route}")).is_ok(),
                "{a} {b}"
            );
        }
        assert_eq!(parse_unix_mode("600"), Ok(0o600));
        assert_eq!(parse_unix_mode("0o640"), Ok(0o640));
        assert!(parse_unix_mode("1777").is_err() && parse_unix_mode("").is_err() && parse_unix_mode("8").is_err());
    }

    /// Mistakes found after parsing (a directory or file that is not there, a check across a
    /// table's fields) point at the line of the field, not at its table's header.
    #[test]
    fn a_mistake_found_after_parsing_names_the_fields_own_line() {
        let dir = pem_files(&["c.pem", "ca.pem"], &["k.pem"]);
        let err = |text: &str| Config::from_toml(text, &dir.path().join("w.toml")).unwrap_err().to_string();
        let route = "[[route]]\npath = \"/a\"\ntarget = \"h:1\"\n";
        let listen = "[[listen]]\naddr = 1\n";
        for (text, want) in [
            (format!("[[listen]]\naddr = 1\n\nweb = \"nope\"\n{route}"), "w.toml:4: listen[0].web: "),
            (format!("{listen}{route}# a comment\nrecord = \"nope/x\"\n"), "w.toml:7: route[0].record: "),
            (format!("{listen}{route}auth = {{ bearer_file = \"nope.txt\" }}\n"), "w.toml:6: route[0].auth.bearer_file: "),
            (format!("{listen}{route}auth = {{ htpasswd = \"nope\" }}\n"), "w.toml:6: route[0].auth.htpasswd: "),
            (
                format!("{listen}{route}auth = {{ jwt = {{ public_key = \"nope.pem\" }} }}\n"),
                "w.toml:6: route[0].auth.jwt.public_key: ",
            ),
            (format!("{listen}{route}backend_tls = {{ ca = \"nope.pem\" }}\n"), "w.toml:6: route[0].backend_tls.ca: "),
            (
                format!("{listen}[listen.tls]\ncert = \"nope.pem\"\nkey = \"k.pem\"\n{route}"),
                "w.toml:4: listen[0].tls.cert: ",
            ),
            (
                format!("{listen}[listen.tls]\ncert = \"c.pem\"\nkey = \"nope.pem\"\n{route}"),
                "w.toml:5: listen[0].tls.key: ",
            ),
            (
                format!("{listen}[listen.tls]\ncert = \"c.pem\"\n{route}"),
                "w.toml:4: listen[0].tls.cert: ",
            ),
            (
                format!("{listen}[listen.tls]\ncert = \"c.pem\"\nkey = \"c.pem\"\n{route}"),
                "w.toml:5: listen[0].tls.key: ",
            ),
            (
                format!("{listen}[listen.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"k.pem\"\n{route}"),
                "w.toml:6: listen[0].tls.client_ca: ",
            ),
            (
                format!(
                    "{listen}[listen.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[listen.tls.sni]]\nnames = [\"a\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                     [[listen.tls.sni]]\nnames = [\"b\"]\ncert = \"c.pem\"\nkey = \"nope.pem\"\n{route}"
                ),
                "w.toml:13: listen[0].tls.sni[1].key: ",
            ),
            (
                format!("{listen}[[agent_endpoint]]\npath = \"/agent\"\n[[route]]\npath = \"/a\"\n\ntarget = {{ agent = \"x\", service = \"s\" }}\n"),
                "w.toml:8: route[0].target: agent \"x\" is not declared",
            ),
            (
                format!("{listen}[[agent]]\nname = \"x\"\n\nsecret_sha256 = \"abc\"\n{route}"),
                "w.toml:6: agent[0].secret_sha256: ",
            ),
            (
                format!("{listen}{route}[limits]\nmax_message_size = \"1MiB\"\nnew_sessions_burst = 3\n"),
                "w.toml:8: limits.new_sessions_burst: goes with new_sessions_per_ip",
            ),
        ] {
            let e = err(&text);
            assert!(e.starts_with(&format!("{}/{want}", dir.path().display())), "{text}\n{e}");
        }
        // What is wrong, in words: no file; no key where one is needed; a field the table
        // itself is about still points at its header.
        let e = err(&format!("{listen}{route}auth = {{ bearer_file = \"nope.txt\" }}\n"));
        assert!(e.ends_with("nope.txt: No such file or directory (os error 2)"), "{e}");
        let e = err(&format!("{listen}[listen.tls]\ncert = \"c.pem\"\n{route}"));
        assert!(
            e.ends_with("no private key in it: name the key's file with `key = \"…\"`, or append the key to this file"),
            "{e}"
        );
        let e = err(&format!("{listen}[[route]]\ntarget = \"h:1\"\n"));
        assert!(e.contains("w.toml:3: route[0]: needs exactly one of"), "{e}");
    }

    #[test]
    fn field_lines_are_found_in_their_own_table() {
        let text = "[[route]]\npath = \"/a\"\n[[route]]\n# record = \"x\"\nauth = { htpasswd = \"h\" }\n\nrecord = \"y\"\n[[route]]\nrecord = \"z\"\n";
        assert_eq!(
            field_line(text, 3, "route[1].record"),
            Some(7),
            "not the comment's, nor the next table's"
        );
        assert_eq!(field_line(text, 3, "route[1].auth.htpasswd"), Some(5));
        assert_eq!(field_line(text, 1, "route[0].record"), None, "not in the table");
        assert_eq!(field_line(text, 2, "route[0].record"), None, "not a header");
        assert_eq!(field_line(text, 3, "route[1]"), None);
    }

    #[test]
    fn tables_written_with_the_wrong_brackets_say_which_to_write() {
        for (text, want) in [
            ("[listen]\naddr = 1\n", "write [[listen]], with two brackets"),
            (
                "[[listen]]\naddr = 1\n[route]\npath = \"/\"\ntarget = \"h:1\"\n",
                "write [[route]], with two brackets",
            ),
            (
                "[[listen]]\naddr = 1\n[tokens]\nsource = \"t\"\n",
                "write [[tokens]], with two brackets",
            ),
            (
                "[[listen]]\naddr = 1\n[[timeouts]]\nidle = \"5m\"\n",
                "write [timeouts], with one bracket",
            ),
            (
                "[[listen]]\naddr = 1\n[[limits]]\nmax_connections = 5\n",
                "write [limits], with one bracket",
            ),
            ("[[listen]]\naddr = 1\n[[admin]]\naddr = 9100\n", "write [admin], with one bracket"),
            // A server's agent declaration written [agent]: not taken for an agent's own file.
            (
                "[[listen]]\naddr = 1\n[agent]\nname = \"shop-17\"\nsecret_sha256 = \"00\"\n",
                "write [[agent]], with two brackets",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(want) && (e.contains("line 3") || text.starts_with("[listen]")),
                "{text}\n{e}"
            );
            assert!(!e.contains("expected a sequence") && !e.contains("untagged"), "{e}");
        }
        // The tables still read as before when written right, unknown keys and all.
        let e = parse("[[listen]]\naddr = 1\n[timeouts]\nping = \"30s\"\n").unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("unknown field `ping`"), "{e}");
    }

    /// A list field written as one string says how to write it as a list (not serde's
    /// "expected a sequence").
    #[test]
    fn lists_written_as_one_string_say_how_to_write_them() {
        let base = "[[listen]]\naddr = 1\n[[route]]\npath = \"/\"\ntarget = \"h:1\"\n";
        for (extra, want) in [
            ("origins = \"https://a.example\"\n", "write [\"https://a.example\"]"),
            ("subprotocols = \"binary\"\n", "write [\"binary\"]"),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("line 6") && !e.contains("sequence"), "{extra}\n{e}");
        }
        let ok = parse(&format!("{base}origins = [\"https://a.example\"]\nsubprotocols = [\"binary\"]\n")).unwrap();
        assert_eq!(ok.routes[0].options.subprotocols, ["binary"]);
    }

    /// Counts, durations, sizes and ports say what to write, never a Rust type (`expected
    /// usize`) or serde's machinery (`untagged enum`, `float seconds to Duration`).
    #[test]
    fn numbers_say_what_to_write() {
        let base = "[[listen]]\naddr = 1\n[[route]]\npath = \"/\"\ntarget = \"h:1\"\n";
        for (extra, want) in [
            ("max_sessions = -5\n", "must be a whole number ≥ 0, not -5"),
            ("max_sessions = 2.5\n", "must be a whole number ≥ 0, not 2.5"),
            (
                "max_sessions_per_ip = \"3\"\n",
                "\"3\" is a string: write the number without quotes",
            ),
            ("new_sessions_burst = 5000000000\n", "5000000000 is too large"),
            (
                "new_sessions_per_ip = \"5\"\n",
                "\"5\" is a string: write the number without quotes",
            ),
            ("max_message_size = -1\n", "-1 is negative: a size is a whole number of bytes"),
            (
                "[limits]\nmax_connections = \"1000\"\n",
                "\"1000\" is a string: write the number without quotes",
            ),
            ("[timeouts]\nhandshake = -1\n", "-1 is negative: a duration is e.g. \"10s\""),
            ("[timeouts]\nidle = -0.5\n", "-0.5 is not a number of seconds"),
            ("[timeouts]\nidle = true\n", "expected a number or a string such as \"10s\""),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
            for rust in ["usize", "u32", "u64", "untagged", "Duration", "NumOrString"] {
                assert!(!e.contains(rust), "{extra}: {e}");
            }
        }
        let e = parse("[[listen]]\naddr = 99999\n").unwrap_err().to_string();
        assert!(e.contains("99999 is not a port (0-65535)") && !e.contains("untagged"), "{e}");
        let c = parse(&format!("{base}max_sessions = 0\n[limits]\nmax_connections_per_ip = 3\n")).unwrap();
        assert_eq!(
            (c.routes[0].options.max_sessions, c.limits.max_connections_per_ip),
            (Some(0), Some(3))
        );
    }

    #[test]
    fn an_agents_file_given_to_the_server_says_how_to_run_it() {
        let text = "# the agent\n[agent]\nserver = \"wss://bridge.example/agent\"\nname = \"shop-17\"\nsecret_file = \"s\"\n[agent.services]\npos = \"127.0.0.1:9100\"\n";
        let e = parse(text).unwrap_err().to_string();
        assert_eq!(
            e,
            "test.toml:2: agent: this is an agent's file (one [agent] table): run it with `wsbridge agent --config FILE`"
        );
    }

    #[test]
    fn describe_shows_backend_tls_and_an_unverified_backend_in_plain_sight() {
        let dir = pem_files(&["ca.pem"], &[]);
        let c = Config::from_toml(
            "[[listen]]\naddr = 1\n[[route]]\npath = \"/a\"\ntarget = \"h:1\"\nbackend_tls = { server_name = \"vnc.internal\", ca = \"ca.pem\" }\n\
             [[route]]\npath = \"/b\"\ntarget = \"h:2\"\nbackend_tls = { insecure_skip_verify = true }\n[[route]]\npath = \"/c\"\ntarget = \"h:3\"\nbackend_tls = {}\n",
            &dir.path().join("w.toml"),
        )
        .unwrap();
        let ca = toml_str(&dir.path().join("ca.pem").display().to_string());
        assert!(
            c.routes[0]
                .options
                .describe()
                .ends_with(&format!(", backend_tls = {{ server_name = \"vnc.internal\", ca = {ca} }}")),
            "{}",
            c.routes[0].options.describe()
        );
        assert!(c.routes[1]
            .options
            .describe()
            .ends_with(", backend_tls = { insecure_skip_verify = true }"));
        assert!(c.routes[2].options.describe().ends_with(", backend_tls = {}"));
    }

    /// Issue 11: with nothing said, a session is pinged every 20 s with a 20 s pong deadline and
    /// has no message size limit; `"off"` switches each off explicitly.
    #[test]
    fn default_keepalive_and_no_message_limit() {
        let c = parse("[[listen]]\naddr = 0\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:7\"\n").unwrap();
        assert_eq!(c.timeouts.ping_interval, Some(Duration::from_secs(20)));
        assert_eq!(c.timeouts.pong_timeout, Duration::from_secs(20));
        assert_eq!(c.timeouts.backend_ack_timeout, Some(Duration::from_secs(60)));
        assert_eq!((c.limits.max_message_size, c.routes[0].options.max_message_size), (None, None));
        for (value, expected) in [("\"off\"", None), ("\"5s\"", Some(Duration::from_secs(5)))] {
            let c = parse(&format!(
                "[[listen]]\naddr = 0\n[timeouts]\nbackend_ack_timeout = {value}\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:7\"\n"
            ))
            .unwrap();
            assert_eq!(c.timeouts.backend_ack_timeout, expected, "{value}");
        }
        let c = parse(
            "[[listen]]\naddr = 0\n[timeouts]\nping_interval = \"off\"\n[limits]\nmax_message_size = \"1MiB\"\n[[route]]\npath = \"/\"\ntarget = \"127.0.0.1:7\"\nmax_message_size = \"off\"\n",
        )
        .unwrap();
        assert_eq!(c.timeouts.ping_interval, None);
        assert_eq!(
            (c.limits.max_message_size, c.routes[0].options.max_message_size),
            (Some(1 << 20), None)
        );
        assert_eq!(parse_message_size("64KiB"), Ok(Some(64 << 10)));
        assert!(parse_message_size("12").is_err());
    }
}
