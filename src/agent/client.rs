//! `wsbridge agent`: the process on the user's computer. It dials out to the server's agent
//! endpoint (through an HTTP proxy with CONNECT when it must), keeps a control link up (pings
//! both ways, reconnect with capped exponential backoff and full jitter), dials the data links
//! the server asks for, and on `open <service>` connects to that service, and only to services
//! in its own list: the server names a service, never an address.
//!
//! Its configuration comes from flags or an `[agent]` table in a TOML file (errors name the file,
//! line and field, as the server's do). Given several servers (instances that do not share their
//! agents), it keeps a connection to each, every one on its own ([`spawn`]), and one per instance
//! (the id in the control link's `101`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use super::chunks::{self, Chunker, Dechunker};
use super::link::{self, ChunkReader, ChunkWriter, ControlMessage, LinkStream};
use super::system_proxy::{self, Rereads, Verdict, WindowsChoice};
use crate::backend::{Backend, ConnectError};
use crate::config::{parse_duration, ConfigError, Target};
use crate::tls::BackendTls;

/// `wsbridge agent`'s flags.
#[derive(Debug, Clone, clap::Args, Default)]
pub struct AgentArgs {
    /// Read the `[agent]` table of this TOML file (flags given too override it).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The server's agent endpoint, e.g. wss://bridge.example.com/agent. Repeat it for several
    /// instances: the agent keeps a connection to each, so a page's session can land on any.
    #[arg(long = "server", value_name = "URL")]
    pub servers: Vec<String>,
    /// This agent's name, as declared on the server (`[[agent]] name = …`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// File holding this agent's secret (its SHA-256 is in the server's configuration).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// A service the server may open: NAME=HOST:PORT or NAME=unix:/path (repeatable). Only
    /// these are ever connected to.
    #[arg(long = "service", value_name = "NAME=ADDR")]
    pub services: Vec<String>,
    /// At most N sessions of service NAME at once, from all servers together (repeatable); past
    /// it a page's session is refused with 1014 "NAME: busy, …" and the app is not connected
    /// to. For an app that serves one client at a time: NAME=1. Default: no cap.
    #[arg(long = "max-sessions", value_name = "NAME=N")]
    pub max_sessions: Vec<String>,
    /// Verify the server's certificate against this CA file instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// How often to look which instance the server's URL leads a new connection to, and move
    /// there when it is another (a balancer with a standby sends pages back to an instance that
    /// returned): a duration of 1s or more, or "off". Default: 30s with one --server, off with
    /// several (each URL reaches its own instance).
    #[arg(long, value_name = "DURATION")]
    pub balancer_check: Option<String>,
    /// HTTP proxy to reach the server through (CONNECT), e.g. http://user:pass@proxy:3128;
    /// "off" for none. Default: HTTPS_PROXY (wss) or HTTP_PROXY (ws), honouring NO_PROXY; then,
    /// on Windows, the system's settings (Internet Options: manual, PAC or WPAD; else the WinHTTP
    /// default), read at start and again before a retry after a failure (at most every 10 s), so
    /// that a change of network or of the PAC script is followed without a restart.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// Print a fresh secret and the `secret_sha256` line for the server's `[[agent]]`, then exit.
    #[arg(long)]
    pub new_secret: bool,
    /// Windows: install this agent as the service "wsbridge-agent" (started with Windows,
    /// restarted on failure), run with --config FILE (needed; give every setting there). Needs
    /// administrator rights.
    #[arg(long, conflicts_with_all = ["uninstall_service", "run_as_service", "new_secret"])]
    pub install_service: bool,
    /// Windows: stop and remove the service "wsbridge-agent".
    #[arg(long, conflicts_with_all = ["run_as_service", "new_secret"])]
    pub uninstall_service: bool,
    /// What the Service Control Manager starts (set by --install-service).
    #[arg(long = "service-mode", hide = true)]
    pub run_as_service: bool,
    /// Log to this file instead of stderr (a service has no stderr; its default is
    /// wsbridge-agent.log beside the --config file). At 10 MiB it is renamed to FILE.old,
    /// replacing the one before, and a new one is started.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// More logging: -v for debug, -vv for trace (wsbridge's own records; the libraries under
    /// it stay at info, as their records can hold secrets). RUST_LOG, when set, wins.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The agent's validated configuration.
#[derive(Clone)]
pub struct AgentConfig {
    /// The server's agent endpoint.
    pub server: ServerUrl,
    /// Further servers (instances) it keeps a connection to as well, each with the proxy it is
    /// reached through and where that came from; every connection is independent (its own
    /// backoff, links and sessions).
    pub more_servers: Vec<(ServerUrl, Option<Proxy>, ProxySource)>,
    /// This agent's name.
    pub name: String,
    /// Its secret (never printed: see the `Debug` impl).
    pub secret: String,
    /// The services the server may open, by name.
    pub services: BTreeMap<String, Target>,
    /// Sessions at once a service takes, where capped: counted over every server the agent
    /// connects to (the cap protects the app); past it the agent answers that it is busy.
    pub max_sessions: BTreeMap<String, usize>,
    /// CA file for the server's certificate; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate: for tests only, never from the command line.
    pub insecure_skip_verify: bool,
    /// HTTP proxy (CONNECT), if any.
    pub proxy: Option<Proxy>,
    /// Where `proxy` (or its absence) came from: the start-up log and `wsbridge check` say it.
    pub proxy_source: ProxySource,
    /// Dialling the server (TCP, proxy, TLS, upgrade) and connecting a service; also the bound
    /// on asking Windows for the proxy (a PAC script's download, WPAD), at start and again
    /// before a retry (at most 10 s).
    pub connect_timeout: Duration,
    /// Pings on the control link.
    pub ping_interval: Duration,
    /// A ping unanswered this long means the server is gone.
    pub pong_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// On SIGTERM, how long live sessions get to finish.
    pub shutdown_grace: Duration,
    /// How often a connected agent looks where its server's URL sends a new connection (the
    /// instance named in a `101`), and follows when that is another instance: a balancer that
    /// brought an instance back sends pages there. `None`: never. At most 5 s apart for 2
    /// minutes after a move the server asked for that landed on another instance.
    pub balancer_check: Option<Duration>,
    /// Those quicker looks' interval: 5 s. Not a setting (no flag, no key in a file): tests
    /// shorten it, as they cannot wait 5 s a look.
    pub fast_check: Duration,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("server", &self.server)
            .field("more_servers", &self.more_servers.iter().map(|(s, _, _)| s).collect::<Vec<_>>())
            .field("name", &self.name)
            .field("services", &self.services)
            .field("max_sessions", &self.max_sessions)
            .field("proxy", &self.proxy.as_ref().map(ToString::to_string))
            .field("proxy_source", &self.proxy_source)
            .finish_non_exhaustive()
    }
}

/// Reconnect delays: exponential from `initial`, full jitter, capped at `max` (at `auth_max`
/// after the server refused the secret or another agent took the name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay's cap.
    pub initial: Duration,
    /// The cap after network failures.
    pub max: Duration,
    /// The cap after a refused login.
    pub auth_max: Duration,
    /// The cap for a minute after the server drained (it is likely restarting): the agent is
    /// back within this of the instance taking connections again.
    pub after_drain: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            auth_max: Duration::from_secs(300),
            after_drain: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The delay before attempt `failures + 1`: uniform in [cap/4, cap] where cap grows from
    /// `initial` by doubling up to `max` (or `auth_max`); the floor keeps a run of small draws
    /// from turning into a spin.
    pub fn delay(&self, failures: u32, auth: bool) -> Duration {
        let limit = if auth { self.auth_max } else { self.max };
        let cap = self.initial.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(limit);
        cap.mul_f64(0.25 + 0.75 * random_fraction())
    }

    /// The delay after a drain: uniform in [after_drain/2, after_drain], so that an instance's
    /// agents do not all come back in step.
    fn after_drain_delay(&self) -> Duration {
        self.after_drain.mul_f64(0.5 + 0.5 * random_fraction())
    }
}

/// Uniform in [0, 1].
fn random_fraction() -> f64 {
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX)
}

/// The server's agent endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `wss://` (TLS) or `ws://`.
    pub tls: bool,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path (and query).
    pub path: String,
}

impl std::str::FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("wss" | "https") => true,
            Some("ws" | "http") => false,
            _ => return Err(format!("{s:?}: the server URL starts with wss:// (or ws://)")),
        };
        let host = uri.host().ok_or_else(|| format!("{s:?}: no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned());
        Ok(ServerUrl { tls, host, port, path })
    }
}

impl std::fmt::Display for ServerUrl {
    /// As a URL: `wss://host:port/path`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", if self.tls { "wss" } else { "ws" }, self.authority(), self.path)
    }
}

impl ServerUrl {
    /// `host:port` as a request target and Host header write it.
    pub fn authority(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
    }
}

/// An HTTP proxy reached with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `Proxy-Authorization` value (Basic, from the URL's userinfo).
    pub authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({self})")
    }
}

impl std::fmt::Display for Proxy {
    /// `host:port` (`[v6]:port`), never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "[{}]:{}", self.host, self.port),
            false => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl std::str::FromStr for Proxy {
    type Err = String;
    /// `http://[user:pass@]host:port` (or without the scheme).
    fn from_str(s: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let rest = s.trim().strip_prefix("http://").unwrap_or(s.trim());
        if rest.contains("://") {
            return Err(format!("proxy {s:?}: only http:// proxies (CONNECT) are supported"));
        }
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = match crate::config::split_host_port(hostport) {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("proxy {s:?}: bad port"))?),
            None => (hostport.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(hostport), 80),
        };
        if host.is_empty() {
            return Err(format!("proxy {s:?}: no host"));
        }
        if port == 0 {
            return Err(format!("proxy {s:?}: port 0"));
        }
        // A host name or an IP address, nothing else: said here, not at the first connect.
        if host.contains(':') && !hostport.starts_with('[') {
            return Err(format!(
                "proxy {s:?}: an IPv6 address goes in brackets (http://[::1]:3128), or its port is ambiguous"
            ));
        }
        let name = |h: &str| h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if host.parse::<std::net::IpAddr>().is_err() && !name(host) {
            return Err(format!("proxy {s:?}: {host:?} is not a host name or an IP address"));
        }
        let authorization = userinfo.map(|u| {
            let decoded = percent_encoding::percent_decode_str(u).decode_utf8_lossy();
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(decoded.as_bytes()))
        });
        Ok(Proxy {
            host: host.to_owned(),
            port,
            authorization,
        })
    }
}

/// Where the proxy to a server, or the choice of none, came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySource {
    /// `--proxy URL`.
    Flag,
    /// The `proxy` option: the file's `proxy = "URL"`, or [`AgentConfig::proxy`] as a program set it.
    Config,
    /// `--proxy off` or `proxy = "off"`.
    Off,
    /// This environment variable (HTTPS_PROXY, http_proxy, …).
    Env(&'static str),
    /// NO_PROXY names the server's host.
    NoProxy,
    /// The Windows settings, and which.
    Windows(super::system_proxy::WindowsChoice),
    /// Nothing says anything: direct.
    Unset,
}

impl std::fmt::Display for ProxySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxySource::Flag => f.write_str("--proxy"),
            ProxySource::Config => f.write_str("the proxy option"),
            ProxySource::Off => f.write_str("proxy off"),
            ProxySource::Env(var) => f.write_str(var),
            ProxySource::NoProxy => f.write_str("NO_PROXY"),
            ProxySource::Windows(choice) => choice.fmt(f),
            ProxySource::Unset => f.write_str("no proxy setting"),
        }
    }
}

/// The proxy from the environment for `server`: HTTPS_PROXY (wss) or HTTP_PROXY (ws), lower
/// case too, unless NO_PROXY names the host (exactly, as a domain suffix, or `*`).
///
/// # Errors
/// The variable's value is not an HTTP proxy's URL.
pub fn proxy_from_env(server: &ServerUrl) -> Result<Option<Proxy>, String> {
    Ok(env_proxy(server)?.and_then(|(p, _)| p))
}

/// [`proxy_from_env`] with the variable it came from; `None` when the environment says nothing
/// for `server` (NO_PROXY naming its host says: direct).
fn env_proxy(server: &ServerUrl) -> Result<Option<(Option<Proxy>, ProxySource)>, String> {
    let var = |names: &[&'static str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
    };
    let no_proxy = var(&["NO_PROXY", "no_proxy"]).map(|(_, v)| v).unwrap_or_default();
    let host = server.host.to_ascii_lowercase();
    let exempt = no_proxy.split(',').map(|e| e.trim().to_ascii_lowercase()).any(|e| {
        let e = e.trim_start_matches('.');
        !e.is_empty() && (e == "*" || host == e || host.ends_with(&format!(".{e}")))
    });
    if exempt {
        return Ok(Some((None, ProxySource::NoProxy)));
    }
    let value = match server.tls {
        true => var(&["HTTPS_PROXY", "https_proxy"]),
        false => var(&["HTTP_PROXY", "http_proxy"]),
    };
    match value {
        Some((name, v)) => Ok(Some((Some(v.parse()?), ProxySource::Env(name)))),
        None => Ok(None),
    }
}

/// `[agent]` as the file writes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    agent: toml::Spanned<RawAgent>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    /// A URL, or a list of them (one per instance).
    server: toml::Spanned<ServerField>,
    name: toml::Spanned<String>,
    secret_file: toml::Spanned<PathBuf>,
    services: toml::Spanned<BTreeMap<String, toml::Spanned<toml::Value>>>,
    ca_file: Option<PathBuf>,
    proxy: Option<toml::Spanned<String>>,
    #[serde(default)]
    insecure_skip_verify: bool,
    connect_timeout: Option<toml::Spanned<toml::Value>>,
    ping_interval: Option<toml::Spanned<toml::Value>>,
    pong_timeout: Option<toml::Spanned<toml::Value>>,
    retry_max: Option<toml::Spanned<toml::Value>>,
    balancer_check: Option<toml::Spanned<toml::Value>>,
}

/// `server = "URL"` or `server = ["URL", …]`, each element with its place in the file (so an
/// error in a list spread over lines names the element's line).
enum ServerField {
    One(String),
    Many(Vec<toml::Spanned<toml::Value>>),
}

impl<'de> serde::Deserialize<'de> for ServerField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ServerField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URL such as \"wss://bridge.example.com/agent\", or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServerField, E> {
                Ok(ServerField::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ServerField, A::Error> {
                let mut all = Vec::new();
                while let Some(v) = seq.next_element()? {
                    all.push(v);
                }
                Ok(ServerField::Many(all))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Whether a TOML file is an agent's (it has an `[agent]` table, not `[[agent]]` declarations).
pub fn is_agent_file(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| matches!(t.get("agent"), Some(toml::Value::Table(_))))
}

struct FileCtx<'a> {
    file: String,
    text: &'a str,
}

impl FileCtx<'_> {
    fn invalid(&self, span: std::ops::Range<usize>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.text.get(..span.start).map(|t| t.matches('\n').count() + 1),
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl AgentConfig {
    /// Reads an `[agent]` table; relative paths resolve against the file's directory.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and field.
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_file_with(path, &Overrides::default())
    }

    /// [`AgentConfig::from_file`], with the servers and proxy given as flags in place of the
    /// file's (the proxy is resolved for each server once, whichever it comes from).
    fn from_file_with(path: &Path, flags: &Overrides) -> Result<AgentConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let raw: RawFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: file.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let ctx = FileCtx { file, text: &text };
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let a = raw.agent.into_inner();
        // The file's servers are checked even when flags replace them (`wsbridge check` would
        // refuse the file).
        let in_file = match a.server.get_ref() {
            ServerField::One(url) => server_list(&[(url.as_str(), None)]),
            ServerField::Many(list) => server_list(
                &list
                    .iter()
                    .map(|v| (v.get_ref().as_str().unwrap_or(""), Some((v.get_ref(), v.span()))))
                    .collect::<Vec<_>>(),
            ),
        }
        .map_err(|(field, at, e)| ctx.invalid(at.unwrap_or(a.server.span()), &field, e))?;
        let servers = flags.servers.clone().unwrap_or(in_file);
        let name = a.name.get_ref().clone();
        if !link::valid_name(&name) {
            return Err(ctx.invalid(a.name.span(), "agent.name", "use 1-64 of A-Z a-z 0-9 . _ -"));
        }
        // A secret file given as a flag is read instead of the file's (which may be one this
        // process cannot read: a service given its secret as a systemd credential).
        let secret = match &flags.secret_file {
            Some(file) => read_secret(file).map_err(|e| ConfigError::Invalid {
                file: "command line".into(),
                line: None,
                field: "--secret-file".into(),
                message: e,
            })?,
            None => {
                read_secret(&resolve(a.secret_file.get_ref())).map_err(|e| ctx.invalid(a.secret_file.span(), "agent.secret_file", e))?
            }
        };
        let mut services = BTreeMap::new();
        let mut max_sessions = BTreeMap::new();
        let span = a.services.span();
        for (k, v) in a.services.into_inner() {
            let field = format!("agent.services.{k}");
            if !link::valid_name(&k) {
                return Err(ctx.invalid(v.span(), &field, "a service name is 1-64 of A-Z a-z 0-9 . _ -"));
            }
            let (target, max) = service_entry(v.get_ref()).map_err(|(sub, e)| ctx.invalid(v.span(), &format!("{field}{sub}"), e))?;
            if let Some(max) = max {
                max_sessions.insert(k.clone(), max);
            }
            services.insert(k, target);
        }
        if services.is_empty() {
            return Err(ctx.invalid(span, "agent.services", "list at least one service (NAME = \"HOST:PORT\")"));
        }
        let dur = |d: &Option<toml::Spanned<toml::Value>>, field: &str, default: Duration| -> Result<Duration, ConfigError> {
            match d {
                None => Ok(default),
                Some(s) => match crate::config::duration_of(s.get_ref()) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    Ok(_) => Err(ctx.invalid(s.span(), field, "must be greater than zero")),
                    Err(e) => Err(ctx.invalid(s.span(), field, e)),
                },
            }
        };
        let defaults = AgentConfig::new(servers[0].clone(), String::new(), String::new());
        let connect_timeout = dur(&a.connect_timeout, "agent.connect_timeout", defaults.connect_timeout)?;
        let proxy = match (&flags.proxy, &a.proxy) {
            (Some(flag), _) => flag.clone(),
            (None, Some(p)) if p.get_ref() == "off" => ProxySetting::Off,
            (None, Some(p)) => ProxySetting::Use(
                p.get_ref().parse().map_err(|e: String| ctx.invalid(p.span(), "agent.proxy", e))?,
                ProxySource::Config,
            ),
            (None, None) => ProxySetting::FromSystem,
        };
        let mut servers = proxy.resolve(servers, connect_timeout).map_err(|e| ConfigError::Invalid {
            file: ctx.file.clone(),
            line: None,
            field: "HTTPS_PROXY".into(),
            message: e,
        })?;
        let (server, proxy, proxy_source) = servers.remove(0);
        let mut backoff = Backoff::default();
        backoff.max = dur(&a.retry_max, "agent.retry_max", backoff.max)?;
        let balancer_check = match &a.balancer_check {
            None => default_balancer_check(1 + servers.len()),
            Some(s) => match s.get_ref() {
                toml::Value::String(text) => parse_balancer_check(text),
                number => crate::config::duration_of(number)
                    .map_err(|e| format!("{e}; a duration of 1s or more, such as \"30s\", or \"off\""))
                    .and_then(|d| at_least_a_second(d, &number.to_string())),
            }
            .map_err(|e| ctx.invalid(s.span(), "agent.balancer_check", e))?,
        };
        Ok(AgentConfig {
            server,
            more_servers: servers,
            name,
            secret,
            services,
            max_sessions,
            ca_file: a.ca_file.map(|c| resolve(&c)),
            insecure_skip_verify: a.insecure_skip_verify,
            proxy,
            proxy_source,
            connect_timeout,
            ping_interval: dur(&a.ping_interval, "agent.ping_interval", defaults.ping_interval)?,
            pong_timeout: dur(&a.pong_timeout, "agent.pong_timeout", defaults.pong_timeout)?,
            backoff,
            shutdown_grace: defaults.shutdown_grace,
            balancer_check,
            fast_check: FAST_CHECK,
        })
    }

    /// A configuration with the defaults and no services yet (for flags, tests and embedders).
    pub fn new(server: ServerUrl, name: String, secret: String) -> AgentConfig {
        AgentConfig {
            server,
            more_servers: Vec::new(),
            name,
            secret,
            services: BTreeMap::new(),
            max_sessions: BTreeMap::new(),
            ca_file: None,
            insecure_skip_verify: false,
            proxy: None,
            proxy_source: ProxySource::Config,
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(20),
            backoff: Backoff::default(),
            shutdown_grace: Duration::from_secs(10),
            balancer_check: Some(Duration::from_secs(30)),
            fast_check: FAST_CHECK,
        }
    }

    /// The configuration `wsbridge agent` runs with: the file's, with flags over it.
    ///
    /// # Errors
    /// A missing or invalid value, named.
    pub fn from_args(args: &AgentArgs) -> Result<AgentConfig, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: "command line".into(),
            line: None,
            field: field.to_owned(),
            message,
        };
        let flags = Overrides {
            servers: match args.servers.is_empty() {
                true => None,
                false => Some(
                    server_list(&args.servers.iter().map(|s| (s.as_str(), None)).collect::<Vec<_>>())
                        .map_err(|(_, _, e)| invalid("--server", e))?,
                ),
            },
            proxy: match args.proxy.as_deref() {
                None => None,
                Some("off") => Some(ProxySetting::Off),
                Some(p) => Some(ProxySetting::Use(p.parse().map_err(|e| invalid("--proxy", e))?, ProxySource::Flag)),
            },
            secret_file: args.secret_file.clone(),
        };
        let mut config = match &args.config {
            Some(path) => AgentConfig::from_file_with(path, &flags)?,
            None => {
                let servers = flags
                    .servers
                    .clone()
                    .ok_or_else(|| invalid("--server", "is needed (or --config)".into()))?;
                let name = args
                    .name
                    .clone()
                    .ok_or_else(|| invalid("--name", "is needed (or --config)".into()))?;
                let file = args
                    .secret_file
                    .as_deref()
                    .ok_or_else(|| invalid("--secret-file", "is needed (or --config)".into()))?;
                let secret = read_secret(file).map_err(|e| invalid("--secret-file", e))?;
                let proxy = flags.proxy.clone().unwrap_or(ProxySetting::FromSystem);
                let wait = AgentConfig::new(servers[0].clone(), String::new(), String::new()).connect_timeout;
                let mut servers = proxy.resolve(servers, wait).map_err(|e| invalid("HTTPS_PROXY", e))?;
                let (server, proxy, proxy_source) = servers.remove(0);
                let mut c = AgentConfig::new(server, name, secret);
                c.proxy = proxy;
                c.proxy_source = proxy_source;
                c.balancer_check = default_balancer_check(1 + servers.len());
                c.more_servers = servers;
                c
            }
        };
        if let Some(name) = &args.name {
            config.name = name.clone();
        }
        if !link::valid_name(&config.name) {
            return Err(invalid("--name", "use 1-64 of A-Z a-z 0-9 . _ -".into()));
        }
        for s in &args.services {
            let (name, addr) = s
                .split_once('=')
                .ok_or_else(|| invalid("--service", format!("{s:?}: expected NAME=HOST:PORT or NAME=unix:/path")))?;
            if !link::valid_name(name) {
                return Err(invalid(
                    "--service",
                    format!("{name:?}: a service name is 1-64 of A-Z a-z 0-9 . _ -"),
                ));
            }
            let target: Target = addr.parse().map_err(|e| invalid("--service", e))?;
            config.services.insert(name.to_owned(), target);
        }
        if config.services.is_empty() {
            return Err(invalid("--service", "at least one is needed: NAME=HOST:PORT".into()));
        }
        for m in &args.max_sessions {
            let (name, max) = m
                .split_once('=')
                .ok_or_else(|| invalid("--max-sessions", format!("{m:?}: expected NAME=N")))?;
            if !config.services.contains_key(name) {
                return Err(invalid("--max-sessions", format!("{name:?}: no such service (see --service)")));
            }
            let max = parse_max_sessions(max).map_err(|e| invalid("--max-sessions", format!("{m:?}: {e}")))?;
            if args
                .max_sessions
                .iter()
                .filter(|o| o.split_once('=').is_some_and(|(n, _)| n == name))
                .count()
                > 1
            {
                return Err(invalid("--max-sessions", format!("{name:?} is given twice")));
            }
            config.max_sessions.insert(name.to_owned(), max);
        }
        if let Some(ca) = &args.ca_file {
            config.ca_file = Some(ca.clone());
        }
        if let Some(b) = &args.balancer_check {
            config.balancer_check = parse_balancer_check(b).map_err(|e| invalid("--balancer-check", e))?;
        }
        Ok(config)
    }

    /// Every server it connects to: `server`, then `more_servers`.
    pub fn servers(&self) -> impl Iterator<Item = &ServerUrl> {
        self.connections().map(|(s, _, _)| s)
    }

    /// Every server it connects to, with the proxy it is reached through and where that came
    /// from.
    pub fn connections(&self) -> impl Iterator<Item = (&ServerUrl, Option<&Proxy>, &ProxySource)> {
        std::iter::once((&self.server, self.proxy.as_ref(), &self.proxy_source))
            .chain(self.more_servers.iter().map(|(s, p, from)| (s, p.as_ref(), from)))
    }

    /// One configuration per server, each for a single connection.
    fn per_server(&self) -> Vec<AgentConfig> {
        let mut first = self.clone();
        first.more_servers.clear();
        let mut all = vec![first.clone()];
        for (server, proxy, source) in &self.more_servers {
            let mut c = first.clone();
            c.server = server.clone();
            c.proxy = proxy.clone();
            c.proxy_source = source.clone();
            all.push(c);
        }
        all
    }
}

/// `balancer_check` when not set: on with one server URL (one URL through a balancer, which may
/// send new connections elsewhere), off with several (each reaches an instance of its own, so a
/// look could only find the same one).
fn default_balancer_check(servers: usize) -> Option<Duration> {
    (servers == 1).then_some(Duration::from_secs(30))
}

/// `balancer_check` as written: a duration of 1 s or more, or `off`.
fn parse_balancer_check(s: &str) -> Result<Option<Duration>, String> {
    if s == "off" {
        return Ok(None);
    }
    match parse_duration(s) {
        Ok(d) => at_least_a_second(d, &format!("{s:?}")),
        Err(e) => Err(format!("{s:?}: {e}; a duration of 1s or more, such as \"30s\", or \"off\"")),
    }
}

/// `balancer_check`'s least: `written` is the value as the file or flag wrote it.
fn at_least_a_second(d: Duration, written: &str) -> Result<Option<Duration>, String> {
    match d >= Duration::from_secs(1) {
        true => Ok(Some(d)),
        false => Err(format!("{written} is under the least, 1s (or \"off\")")),
    }
}

/// Settings given as flags, which take the place of the file's.
#[derive(Default)]
struct Overrides {
    servers: Option<Vec<ServerUrl>>,
    proxy: Option<ProxySetting>,
    secret_file: Option<PathBuf>,
}

/// Where the proxy to a server comes from.
#[derive(Clone)]
enum ProxySetting {
    /// For each server by its scheme and host: HTTPS_PROXY / HTTP_PROXY / NO_PROXY; where they
    /// say nothing, on Windows, the system's settings ([`super::system_proxy`]).
    FromSystem,
    /// None (`off`).
    Off,
    /// This one, for every server (given where the source says).
    Use(Proxy, ProxySource),
}

impl ProxySetting {
    /// Each server with the proxy it is reached through and where that came from. Asking
    /// Windows (once for all the servers the environment says nothing about) waits at most
    /// `wait`.
    fn resolve(&self, servers: Vec<ServerUrl>, wait: Duration) -> Result<Vec<(ServerUrl, Option<Proxy>, ProxySource)>, String> {
        let mut resolved = Vec::with_capacity(servers.len());
        for s in servers {
            let (proxy, source) = match self {
                ProxySetting::FromSystem => env_proxy(&s)?.unwrap_or((None, ProxySource::Unset)),
                ProxySetting::Off => (None, ProxySource::Off),
                ProxySetting::Use(p, source) => (Some(p.clone()), source.clone()),
            };
            resolved.push((s, proxy, source));
        }
        #[cfg(windows)]
        {
            let unset: Vec<usize> = (0..resolved.len()).filter(|&i| resolved[i].2 == ProxySource::Unset).collect();
            if !unset.is_empty() {
                let asked: Vec<ServerUrl> = unset.iter().map(|&i| resolved[i].0.clone()).collect();
                for (i, (proxy, choice)) in unset.into_iter().zip(super::system_proxy::windows(&asked, wait)) {
                    resolved[i].1 = proxy;
                    resolved[i].2 = ProxySource::Windows(choice);
                }
            }
        }
        #[cfg(not(windows))]
        let _ = wait;
        Ok(resolved)
    }
}

/// Where a list element is in its file: the value (to tell a string from anything else) and its
/// byte range.
type Placed<'a> = Option<(&'a toml::Value, std::ops::Range<usize>)>;

/// What is wrong with a server list: the field, the element's place if known, the message.
type ListError = (String, Option<std::ops::Range<usize>>, String);

/// The servers of `server = "URL"` (one entry, no place) or `server = ["URL", …]` (one per
/// instance; also `--server` given more than once): at least one, each parsed, none twice. An
/// error names the field (`agent.server[1]` for a list's second) and the element's place.
fn server_list(urls: &[(&str, Placed<'_>)]) -> Result<Vec<ServerUrl>, ListError> {
    if urls.is_empty() {
        return Err(("agent.server".into(), None, "list at least one server URL".into()));
    }
    let list = urls.len() > 1 || urls[0].1.is_some();
    let mut servers: Vec<ServerUrl> = Vec::new();
    for (i, (url, placed)) in urls.iter().enumerate() {
        let field = if list {
            format!("agent.server[{i}]")
        } else {
            "agent.server".into()
        };
        let at = placed.as_ref().map(|(_, span)| span.clone());
        if placed.as_ref().is_some_and(|(v, _)| !v.is_str()) {
            return Err((field, at, "a URL such as \"wss://bridge.example.com/agent\"".into()));
        }
        let server: ServerUrl = url.parse().map_err(|e| (field.clone(), at.clone(), e))?;
        if servers.contains(&server) {
            return Err((field, at, format!("{server} is listed twice")));
        }
        servers.push(server);
    }
    Ok(servers)
}

/// One `[agent.services]` entry: `"HOST:PORT"` or `"unix:/path"`, or
/// `{ target = "…", max_sessions = N }`. An error names the key it is about (`""` for the value
/// itself).
fn service_entry(v: &toml::Value) -> Result<(Target, Option<usize>), (&'static str, String)> {
    // A string is never an agent target (that is a table): HOST:PORT or unix:/path.
    let address = |s: &str| s.parse::<Target>();
    match v {
        toml::Value::String(s) => Ok((address(s).map_err(|e| ("", e))?, None)),
        toml::Value::Table(t) => {
            if let Some(key) = t.keys().find(|k| !matches!(k.as_str(), "target" | "max_sessions")) {
                let e = match key.as_str() {
                    "agent" | "service" => "a service is HOST:PORT or unix:/path, not another agent's".to_owned(),
                    _ => format!("unknown key {key:?}: expected target and max_sessions"),
                };
                return Err(("", e));
            }
            let target = match t.get("target") {
                Some(toml::Value::String(s)) => address(s).map_err(|e| (".target", e))?,
                Some(_) => return Err((".target", "a string, \"HOST:PORT\" or \"unix:/path\"".into())),
                None => return Err(("", "needs target = \"HOST:PORT\" (or \"unix:/path\")".into())),
            };
            let max = match t.get("max_sessions") {
                None => None,
                Some(toml::Value::Integer(n)) => Some(parse_max_sessions(&n.to_string()).map_err(|e| (".max_sessions", e))?),
                Some(_) => return Err((".max_sessions", "a whole number of sessions, at least 1".into())),
            };
            Ok((target, max))
        }
        _ => Err(("", "\"HOST:PORT\", \"unix:/path\" or { target = \"…\", max_sessions = N }".into())),
    }
}

/// A service's `max_sessions`: 1 or more.
fn parse_max_sessions(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "a whole number of sessions, at least 1".to_owned())
}

/// Reads a secret file: its first line, trimmed; refuses an empty one.
fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(format!("{}: the secret file is empty", path.display()));
    }
    Ok(secret)
}

/// What the agent is doing, for its log and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Dialling the server.
    Connecting,
    /// The server accepted it and asked for links.
    Connected,
    /// Connected, and connecting again (the server is draining or asked, or its URL leads to
    /// another instance now); the old connection serves until the new one is up.
    Moving {
        /// The last attempt's outcome, or that it is under way.
        reason: String,
    },
    /// Waiting to dial again.
    Retrying {
        /// Why the last attempt or connection ended.
        reason: String,
        /// After how long.
        after: Duration,
    },
    /// Shut down.
    Stopped,
}

/// One line on how an agent's connections are doing (systemd's `STATUS=`): `servers` and
/// `states` in the same order, as [`AgentConfig::servers`] and [`AgentHandle::states`].
pub fn status_line(name: &str, servers: &[String], states: &[watch::Receiver<State>]) -> String {
    let now: Vec<State> = states.iter().map(|s| s.borrow().clone()).collect();
    let up = now.iter().filter(|s| matches!(s, State::Connected | State::Moving { .. })).count();
    let down: Vec<String> = servers
        .iter()
        .zip(&now)
        .filter_map(|(server, state)| match state {
            State::Connected | State::Stopped => None,
            State::Moving { reason } => Some(format!("{server}: moving, connecting again ({reason})")),
            State::Connecting => Some(format!("{server}: connecting")),
            State::Retrying { reason, after } => Some(format!("{server}: retrying in {:.1}s ({reason})", after.as_secs_f64())),
        })
        .collect();
    let head = match servers.len() {
        1 if up == 1 && down.is_empty() => return format!("agent {name}: connected to {}", servers[0]),
        1 if up == 1 => format!("agent {name}: connected"),
        1 => format!("agent {name}: not connected"),
        n => format!("agent {name}: connected to {up} of {n} servers"),
    };
    match down.is_empty() {
        true => head,
        false => format!("{head}; {}", down.join("; ")),
    }
}

/// A running agent, as [`spawn`] returns it.
#[derive(Debug)]
pub struct AgentHandle {
    /// Its state (its connection to the first server's), updated at each change.
    pub state: watch::Receiver<State>,
    /// The state of its connection to each server, in the order of [`AgentConfig::servers`].
    pub states: Vec<watch::Receiver<State>>,
    /// Attempts to connect so far.
    pub attempts: Arc<AtomicU64>,
    /// Looks where a server's URL leads a new connection so far ([`AgentConfig::balancer_check`]).
    pub looks: Arc<AtomicU64>,
    /// Cancel to stop it (as SIGTERM does).
    pub shutdown: CancellationToken,
    /// Ends when it has stopped and its sessions have finished (or the grace ran out); an error
    /// if a connection's task failed (then the others were stopped too: a service manager
    /// restarts the whole agent).
    pub task: tokio::task::JoinHandle<Result<(), String>>,
}

impl AgentHandle {
    /// Waits until the state is `want`.
    pub async fn wait_for(&mut self, want: impl Fn(&State) -> bool) {
        let _ = self.state.wait_for(|s| want(s)).await;
    }
}

/// Starts an agent on the current runtime: a connection to each of its servers, each on its own
/// (its backoff, links and sessions), so that one server's loss, drain or refusal leaves the
/// others serving.
///
/// # Errors
/// The CA file cannot be used.
pub fn spawn(config: AgentConfig) -> Result<AgentHandle, crate::tls::TlsError> {
    let attempts = Arc::new(AtomicU64::new(0));
    let looks = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let several = !config.more_servers.is_empty();
    let instances = Instances::default();
    let caps = Arc::new(Caps::new(&config.max_sessions));
    let mut states = Vec::new();
    let mut loops = Vec::new();
    for (index, one) in config.per_server().into_iter().enumerate() {
        let tls = tls_for(&one)?;
        log_route(&one);
        let (tx, rx) = watch::channel(State::Connecting);
        states.push(rx);
        let span = match several {
            // Each line says which connection it is about (one server: as before, no prefix).
            // At error level, so the prefix is there whatever level the log shows.
            true => tracing::error_span!("server", url = %one.server),
            false => tracing::Span::none(),
        };
        let mine = Mine {
            instances: instances.clone(),
            index,
            caps: caps.clone(),
            looks: looks.clone(),
        };
        loops.push(run(Arc::new(one), tls, shutdown.clone(), tx, attempts.clone(), mine).instrument(span));
    }
    // A task per connection, so that one failing (a bug: a panic) cannot take the others'
    // state with it unnoticed: it is logged, the others are stopped cleanly, and the agent
    // ends with an error.
    let mut tasks: futures_util::stream::FuturesUnordered<_> = loops.into_iter().map(tokio::spawn).collect();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let mut failed = None;
        // In the order they end: the first to fail stops the others at once.
        while let Some(ended) = tasks.next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "agent: a connection's task failed; stopping");
                stop.cancel();
                failed.get_or_insert(format!("a connection's task failed: {e}"));
            }
        }
        failed.map_or(Ok(()), Err)
    });
    Ok(AgentHandle {
        state: states[0].clone(),
        states,
        attempts,
        looks,
        shutdown,
        task,
    })
}

/// The start-up line on how a connection's server is reached, and why: through which proxy or
/// directly, and the setting that decided (a warning when a Windows setting names a proxy the
/// agent cannot use, such as a SOCKS proxy).
fn log_route(config: &AgentConfig) {
    let server = &config.server;
    let from = &config.proxy_source;
    let warning = matches!(from, ProxySource::Windows(choice) if choice.warning);
    match (&config.proxy, warning) {
        (Some(proxy), false) => info!(%server, %proxy, %from, "agent: reaching the server through a proxy"),
        (Some(proxy), true) => warn!(%server, %proxy, %from, "agent: reaching the server through a proxy"),
        (None, false) => info!(%server, %from, "agent: reaching the server directly"),
        (None, true) => warn!(%server, %from, "agent: reaching the server directly"),
    }
}

/// A route for the log: `through proxy:port (from …)` or `directly (from …)`.
fn route_text(proxy: Option<&Proxy>, from: &ProxySource) -> String {
    match proxy {
        Some(p) => format!("through {p} (from {from})"),
        None => format!("directly (from {from})"),
    }
}

/// What the Windows settings read again (`read`; `None`: no answer at all) say for a
/// connection that reaches its server as `config` says: the configuration for its next attempt
/// when that is another route or another source, `None` to go on as it is. A change of route is
/// logged once (at info, at warn when a setting names a proxy the agent cannot use); the rest at
/// debug.
fn follow_windows(config: &AgentConfig, read: Option<(Option<Proxy>, WindowsChoice)>, rereads: &mut Rereads) -> Option<AgentConfig> {
    let server = &config.server;
    let was = route_text(config.proxy.as_ref(), &config.proxy_source);
    let Some((proxy, choice)) = read else {
        debug!(%server, route = %was, "agent: the Windows proxy settings could not be read again (no thread); keeping the route");
        return None;
    };
    match rereads.judge(config.proxy.as_ref(), proxy.as_ref(), &choice) {
        Verdict::Late => {
            debug!(%server, from = %choice, route = %was, "agent: the Windows proxy settings were not read again in time; keeping the route");
            return None;
        }
        Verdict::Same => debug!(%server, from = %choice, "agent: the Windows proxy settings read again: the same route"),
        Verdict::Changed => {
            let from = &choice;
            match (&proxy, choice.warning) {
                (Some(proxy), false) => info!(
                    %server, %proxy, %from, %was,
                    "agent: the Windows proxy settings changed: reaching the server through a proxy now"
                ),
                (Some(proxy), true) => warn!(
                    %server, %proxy, %from, %was,
                    "agent: the Windows proxy settings changed: reaching the server through a proxy now"
                ),
                (None, false) => info!(%server, %from, %was, "agent: the Windows proxy settings changed: reaching the server directly now"),
                (None, true) => warn!(%server, %from, %was, "agent: the Windows proxy settings changed: reaching the server directly now"),
            }
        }
    }
    let source = ProxySource::Windows(choice);
    if config.proxy == proxy && config.proxy_source == source {
        return None;
    }
    let mut next = config.clone();
    next.proxy = proxy;
    next.proxy_source = source;
    Some(next)
}

/// The TLS connector for a `wss://` server: the CA file's roots or the system's.
fn tls_for(config: &AgentConfig) -> Result<Option<BackendTls>, crate::tls::TlsError> {
    if !config.server.tls {
        return Ok(None);
    }
    BackendTls::new(&crate::config::tls::BackendTlsSettings {
        server_name: None,
        ca: config.ca_file.clone(),
        insecure_skip_verify: config.insecure_skip_verify,
    })
    .map(Some)
}

/// For this long after a server drained, the agent tries it again at most
/// [`Backoff::after_drain`] apart (not with the growing backoff), so it is back within that of a
/// restarted instance taking connections: before a balancer's health checks send it pages.
const AFTER_DRAIN_WINDOW: Duration = Duration::from_secs(60);

/// Why a connection attempt or a connected control link ended.
enum Ended {
    Shutdown,
    /// The server is draining. `stable`: the link had lasted its ping interval (a server that
    /// drains every connection as soon as it is made is backed off from, as one that drops it).
    Drain {
        stable: bool,
    },
    /// The agent connects again (the server asked, or its URL leads elsewhere now): the link goes
    /// on serving until the agent has.
    Moving(Move, Box<ControlLink>),
    /// The server refused the login (401) or another agent took the name: long backoff.
    Refused(String),
    /// Anything else: network, server restart, ping timeout.
    Failed {
        reason: String,
        was_connected: bool,
        /// Connected for at least the ping interval: the backoff starts again from its first
        /// step. A connection lost sooner (a server that crashes once it has let agents in, a
        /// middlebox that cuts upgraded connections) counts as one more failure, so such a loop
        /// backs off as any other does.
        stable: bool,
        /// The server's `Retry-After` (429, 503): the next attempt waits at least this long.
        retry_after: Option<Duration>,
        /// The server answered (an HTTP status): the route to it works, whatever failed.
        answered: bool,
    },
}

/// Why a connected control link moves: the agent connects again, the link serving its instance
/// until then (make-before-break).
enum Move {
    /// The server asked (`move`): it is draining, or its operator said so. Its reason, and
    /// whether the link had lasted its ping interval (see [`Ended::Drain`]).
    Asked(String, bool),
    /// The server's URL leads a new connection to another instance now: a balancer that sends
    /// pages there too, an instance back after a failover. That connection (upgraded, before
    /// its hello) becomes the agent's: a second dial could land elsewhere again.
    Followed {
        /// The instance it reached.
        instance: String,
        /// The instance the link that moves is on.
        from: String,
        /// The connection that found it.
        ws: Box<ControlWs>,
    },
}

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Move::Asked(reason, _) => f.write_str(reason),
            Move::Followed { .. } => f.write_str("new connections reach another instance"),
        }
    }
}

/// After a connection left an instance (moved, drained, lost), the next one, if it is on
/// another instance, looks where its URL leads at most this far apart ([`FAST_CHECKS`];
/// [`AgentConfig::fast_check`])...
const FAST_CHECK: Duration = Duration::from_secs(5);
/// ...for this long, then further apart, to [`AgentConfig::balancer_check`] at this many times
/// the time since it left: the instance left is likely restarting (a deploy, a reboot), and the
/// balancer sends new connections and pages back to it once its health checks pass.
const FAST_CHECKS: (Duration, u32) = (Duration::from_secs(120), 24);

/// What a connection loop knows of its last connection, for the next.
#[derive(Default)]
struct Last {
    /// The instance its last connected link reached.
    instance: Option<String>,
    /// When that link stopped being the loop's (it moved, was drained or lost).
    left: Option<Instant>,
    /// Since when that link's looks were quick ([`Checks::fast_since`]): a link back on the same
    /// instance (a blip, an operator's move before the balancer had the other one up) goes on
    /// from there, the instance left before still being on its way back.
    fast_since: Option<Instant>,
    /// A connection made already (a look that found where to move), with its instance: the
    /// next attempt's.
    dialled: Option<(ControlWs, Option<String>)>,
    /// That link left because the server asked (a move, a drain).
    asked: bool,
    /// When the last moves its looks found were: more than [`MOVES_DAMPED`] of them within
    /// [`FAST_CHECKS`]' window, and looks are no longer quick (a balancer that sends each new
    /// connection elsewhere while no data link has met the wrong instance yet).
    follows: std::collections::VecDeque<Instant>,
}

/// See [`Last::follows`].
const MOVES_DAMPED: usize = 3;

async fn run(
    mut config: Arc<AgentConfig>,
    tls: Option<BackendTls>,
    shutdown: CancellationToken,
    state: watch::Sender<State>,
    attempts: Arc<AtomicU64>,
    mine: Mine,
) {
    let sessions = TaskTracker::new();
    let mut failures = 0u32;
    // Connections in a row that were lost before they were stable ([`Ended::Failed`]'s
    // `stable`): where the backoff starts again after the next.
    let mut short = 0u32;
    let set = |s: State| {
        state.send_if_modified(|old| {
            let changed = *old != s;
            *old = s;
            changed
        });
    };
    // The reason of the last failure: a retry that fails the same way is logged at debug only,
    // so an outage of hours is a few lines, not one per attempt.
    let mut last_failure: Option<String> = None;
    let mut retry_after: Option<Duration> = None;
    // When the server last drained: it is likely back soon (a restart), and pages reaching it
    // then find this agent only once it is back too.
    let mut drained: Option<Instant> = None;
    // A link that was asked to move, serving its instance until this loop is connected again.
    let mut previous: Option<Previous> = None;
    let mut last = Last::default();
    // A route from the Windows settings is read again before a retry after a failure (the
    // network may have changed under it), at most every REREAD_EVERY; the start's read counts.
    let mut rereads = Rereads::new(std::time::Instant::now());
    loop {
        attempts.fetch_add(1, Ordering::Relaxed);
        // While the link that moves serves, the agent is still connected.
        let moving = previous.as_ref().is_some_and(Previous::serves);
        if !moving {
            set(State::Connecting);
        }
        match last_failure {
            None => info!(server = %config.server, agent = %config.name, "agent: connecting"),
            Some(_) => debug!(server = %config.server, "agent: connecting again"),
        }
        let ended = control(&config, tls.as_ref(), &shutdown, &set, &sessions, &mine, &mut previous, &mut last).await;
        if matches!(
            ended,
            Ended::Moving(..) | Ended::Drain { .. } | Ended::Failed { was_connected: true, .. }
        ) {
            last.left = Some(Instant::now());
            // The server asked (a drain, an operator): quick looks even back on the same instance.
            last.asked = matches!(ended, Ended::Moving(Move::Asked(..), _) | Ended::Drain { .. });
            // The route worked: timeouts reading the Windows settings count again from none.
            rereads.connected();
        }
        // The server said to reconnect (a drain): logged as what it is, not as a failure.
        let mut told = false;
        // The attempt failed or the connection was lost: the route may be what failed.
        let mut failed = false;
        // A drain on a link that had not lasted, after another such (see `Ended::Drain`).
        let mut quick_again = false;
        let (reason, auth) = match ended {
            Ended::Shutdown => break,
            Ended::Moving(why, link) => {
                let reason = why.to_string();
                // Asked on a link that had not lasted, after another such: a server that moves
                // every connection as soon as it is made is backed off from, not followed at
                // once for ever (one move soon after a move is a rolling deploy: followed).
                let quick = matches!(why, Move::Asked(_, false));
                let again = quick && short > 0;
                let asked = match why {
                    Move::Asked(reason, _) => {
                        info!(
                            %reason,
                            "agent: the server asked this agent to move: connecting again; this connection serves until then"
                        );
                        true
                    }
                    Move::Followed { instance, from, ws } => {
                        info!(
                            %instance,
                            %from,
                            "agent: the server's URL leads new connections to another instance now: connecting there; this \
                             connection serves until then"
                        );
                        last.dialled = Some((*ws, Some(instance)));
                        last.follows.push_back(Instant::now());
                        false
                    }
                };
                let moved = Previous::default();
                sessions.spawn(
                    link.finish(shutdown.clone(), moved.let_go.clone(), moved.ended.clone())
                        .in_current_span(),
                );
                if let Some(older) = previous.replace(moved) {
                    older.let_go.cancel();
                }
                set(State::Moving { reason });
                short = if quick { short.saturating_add(1) } else { 0 };
                failures = if again { short - 1 } else { 0 };
                last_failure = None;
                if !asked {
                    // At once: its check found where to go.
                    continue;
                }
                // Soon: a balancer whose health checks saw the drain sends it elsewhere, and the
                // draining server answers 503 with a Retry-After until then. Within a second,
                // not at once: every agent of the instance was told in the same instant.
                let mut wait = config.backoff.after_drain.mul_f64(0.5 * random_fraction());
                match again {
                    true => wait = wait.max(config.backoff.delay(failures, false)),
                    false => drained = Some(Instant::now()),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            Ended::Drain { stable } => {
                // As a move (above): a drain on a link that had not lasted, after another such,
                // is backed off from as a short loss, without the short wait after a drain.
                let again = !stable && short > 0;
                short = if stable { 0 } else { short.saturating_add(1) };
                failures = if again { short - 1 } else { 0 };
                if !again {
                    drained = Some(Instant::now());
                }
                quick_again = again;
                last_failure = None;
                told = true;
                ("the server is draining: reconnecting".to_owned(), false)
            }
            Ended::Refused(r) => (r, true),
            Ended::Failed {
                reason,
                was_connected,
                stable,
                retry_after: server_says,
                answered,
            } => {
                if was_connected {
                    // The backoff starts again after a connection, from as many steps as there
                    // were short ones in a row before it (none, after one that lasted).
                    failures = if stable { 0 } else { short };
                    short = if stable { 0 } else { short.saturating_add(1) };
                    last_failure = None;
                }
                if reason.contains(link::DRAINING) {
                    // Still draining: the restart (if it is one) is still to come.
                    drained = Some(Instant::now());
                }
                retry_after = server_says;
                // A server that answered was reached: the route is not what failed.
                failed = !answered;
                (reason, false)
            }
        };
        failures = failures.saturating_add(1);
        // What the server asked for counts, up to the longest backoff this agent would use.
        let floor = retry_after.take().unwrap_or_default().min(config.backoff.auth_max);
        let mut after = config.backoff.delay(failures, auth);
        if drained.is_some_and(|t| t.elapsed() < AFTER_DRAIN_WINDOW) && !auth && !quick_again {
            after = after.min(config.backoff.after_drain_delay());
        }
        // No sooner than the server asked, and spread by up to a second past that: a server's
        // Retry-After is the same for every agent it answers (a drain, the login brake).
        let after = match floor > after {
            true => floor + config.backoff.after_drain.mul_f64(0.5 * random_fraction()),
            false => after,
        };
        let moving = previous.as_ref().is_some_and(Previous::serves);
        // For the log, to the millisecond.
        let retry_in = Duration::from_millis(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        if last_failure.as_deref() == Some(reason.as_str()) {
            debug!(%reason, ?retry_in, "agent: still not connected; retrying");
        } else if moving {
            info!(%reason, ?retry_in, "agent: not connected again yet; the connection that moves still serves");
        } else if told {
            // What the server said it would do: not a failure.
            info!(%reason, ?retry_in, "agent: reconnecting");
        } else {
            match &config.proxy_source {
                // The route may be what failed (the computer moved to another network): the line
                // says where it came from, and that it is read again.
                ProxySource::Windows(_) => warn!(
                    %reason,
                    ?retry_in,
                    route = %config.proxy_source,
                    "agent: not connected; retrying (with the Windows proxy settings read again first, at most every 10 s)"
                ),
                _ => warn!(%reason, ?retry_in, "agent: not connected; retrying"),
            }
        }
        last_failure = Some(reason.clone());
        match moving {
            true => set(State::Moving { reason }),
            false => set(State::Retrying { reason, after }),
        }
        // Its deadline is set now: a read of the Windows settings runs within the backoff's
        // wait, and the next attempt starts when both are over.
        let wait = tokio::time::sleep(after);
        tokio::pin!(wait);
        let reading = match (&config.proxy_source, failed) {
            (ProxySource::Windows(_), true) if rereads.start(std::time::Instant::now()) => {
                system_proxy::windows_again(&config.server, config.connect_timeout, rereads.busy())
            }
            _ => None,
        };
        if let Some(reading) = reading {
            // Not waited for at shutdown: its threads end by themselves (the answer within its
            // deadline; WinHTTP's maybe later, holding `rereads.busy()` until then).
            let read = tokio::select! {
                _ = shutdown.cancelled() => break,
                read = reading => read.ok(),
            };
            if let Some(next) = follow_windows(&config, read, &mut rereads) {
                if next.proxy != config.proxy {
                    // A new route is tried soon (the backoff grew on the old one's failures), but
                    // no sooner than the server asked; the failures count on (a setting that
                    // flips between two answers must not undo the backoff).
                    let soon = config.backoff.delay(1, false).max(floor);
                    if Instant::now() + soon < wait.deadline() {
                        wait.as_mut().reset(Instant::now() + soon);
                        if !moving {
                            set(State::Retrying {
                                reason: last_failure.clone().unwrap_or_default(),
                                after: soon,
                            });
                        }
                    }
                }
                // For the next attempt's dials and its links'; links and sessions open now keep
                // theirs.
                config = Arc::new(next);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wait => {}
        }
    }
    sessions.close();
    if timeout(config.shutdown_grace, sessions.wait()).await.is_err() {
        warn!(
            remaining = sessions.len(),
            "agent: shutdown grace over; ending the remaining sessions"
        );
    }
    info!("agent: stopped");
    set(State::Stopped);
}

/// A control link that was asked to move, serving its instance on its own task
/// ([`ControlLink::finish`]) until the agent is connected again.
#[derive(Default)]
struct Previous {
    /// Cancelled once the agent is connected again: the link closes.
    let_go: CancellationToken,
    /// Cancelled when the link has ended, for whatever reason.
    ended: CancellationToken,
}

impl Previous {
    /// Whether the link still serves.
    fn serves(&self) -> bool {
        !self.ended.is_cancelled()
    }
}

/// One control connection, from dialling (or `last.dialled`) to its end. Once it is connected,
/// `previous` (a link that moves, serving its instance meanwhile) is let go, and `last` says
/// which instance it is on.
#[allow(clippy::too_many_arguments)]
async fn control(
    config: &Arc<AgentConfig>,
    tls: Option<&BackendTls>,
    shutdown: &CancellationToken,
    set: &impl Fn(State),
    sessions: &TaskTracker,
    mine: &Mine,
    previous: &mut Option<Previous>,
    last: &mut Last,
) -> Ended {
    let failed = |reason: String| Ended::Failed {
        reason,
        was_connected: false,
        stable: false,
        retry_after: None,
        answered: false,
    };
    let dialled = match last.dialled.take() {
        Some(made) => Ok(Ok(made)),
        None => tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            r = timeout(config.connect_timeout, open_control(config, tls)) => r,
        },
    };
    let (mut ws, instance) = match dialled {
        Err(_) => return failed(format!("no answer within {:?}", config.connect_timeout)),
        Ok(Err(Ended::Refused(r))) => return Ended::Refused(r),
        Ok(Err(e)) => return e,
        Ok(Ok(dialled)) => dialled,
    };
    // Before the hello, which would replace this agent's connection already on that instance.
    let url = config.server.to_string();
    let claim = match instance.clone().map(|id| mine.instances.claim(id, mine.index, &url)) {
        Some(Err(other)) => {
            leave_before_hello(&mut ws, "this agent is connected to this instance already").await;
            return failed(format!(
                "{url} reaches the same instance as {other}, which this agent is connected to already"
            ));
        }
        Some(Ok(claim)) => Some(claim),
        None => None,
    };
    // Quick looks on another instance than the last link's, which it left a moment ago; on the
    // same one, as that link's.
    let (window, _) = FAST_CHECKS;
    last.follows.retain(|t| t.elapsed() < window);
    let fast_since = match last.left {
        // Hopping between instances: the ordinary looks, no quicker.
        Some(_) if last.follows.len() > MOVES_DAMPED => None,
        Some(left) if last.instance != instance || last.asked => Some(left),
        _ => last.fast_since,
    };
    // A server that names no instance cannot say where its URL leads.
    let checks = config.balancer_check.filter(|_| instance.is_some()).map(|every| Checks {
        every,
        fast: config.fast_check,
        fast_since,
    });
    let hello = ControlMessage::Hello {
        name: config.name.clone(),
        services: config.services.keys().cloned().collect(),
        version: link::MOVING,
    };
    let Ok(text) = serde_json::to_string(&hello) else {
        return failed("hello not encoded".into());
    };
    if let Err(e) = timeout(config.pong_timeout, ws.send(Message::text(text)))
        .await
        .unwrap_or(Err(tungstenite::Error::ConnectionClosed))
    {
        return failed(format!("hello not sent: {e}"));
    }
    // Idle links wait for `open` until the control link ends; sessions already open go on.
    let idle = shutdown.child_token();
    let links = Links {
        config: config.clone(),
        tls: tls.cloned(),
        idle: idle.clone(),
        sessions: sessions.clone(),
        instance,
        misrouted: Arc::default(),
        capped: Arc::default(),
        caps: mine.caps.clone(),
    };
    let mut link = ControlLink {
        ws,
        _idle: idle.drop_guard(),
        links,
        claim,
        checks,
        looks: mine.looks.clone(),
        tick: tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval),
        pong_due: None,
        connected: false,
        since: None,
    };
    // Servers from before instance ids name none.
    let link_instance = link.links.instance.clone();
    let instance = link.links.instance.clone().unwrap_or_else(|| "-".into());
    let mut on_connected = || {
        info!(agent = %config.name, services = config.services.len(), %instance, "agent: connected");
        last.instance = link_instance.clone();
        last.left = None;
        last.fast_since = fast_since;
        set(State::Connected);
        if let Some(old) = previous.take() {
            old.let_go.cancel();
        }
    };
    match link.serve(shutdown, None, &mut on_connected).await {
        Served::Ended(ended) => ended,
        Served::Moving(why) => {
            // Its data links may reach the instance it moves to by now (421): expected, not a
            // balancer that spreads connections.
            link.links.misrouted.store(true, Ordering::Relaxed);
            Ended::Moving(why, Box::new(link))
        }
    }
}

/// A connected control link, owned: asked to move (`move`, the server is draining), it goes on
/// serving its instance on a task of its own ([`ControlLink::finish`]) while the agent connects
/// again, until that connection is up (make-before-break).
struct ControlLink {
    ws: ControlWs,
    /// Cancels `links.idle` when the link is dropped: its idle data links close.
    _idle: tokio_util::sync::DropGuard,
    links: Links,
    claim: Option<Claim>,
    /// When it looks where its URL leads a new connection (`None`: never).
    checks: Option<Checks>,
    /// Looks so far, over all of the agent's connections ([`AgentHandle::looks`]).
    looks: Arc<AtomicU64>,
    tick: tokio::time::Interval,
    pong_due: Option<Instant>,
    /// Its first `want` came: the server took it.
    connected: bool,
    /// When that was.
    since: Option<Instant>,
}

/// How [`ControlLink::serve`] stopped.
enum Served {
    Ended(Ended),
    /// The agent is to connect again; the link is still up.
    Moving(Move),
}

/// When a control link looks where its server's URL leads a new connection.
struct Checks {
    every: Duration,
    /// [`AgentConfig::fast_check`]: [`FAST_CHECK`] but in tests.
    fast: Duration,
    /// When the loop's previous link left another instance: looks are closer together for a
    /// while after ([`FAST_CHECKS`]).
    fast_since: Option<Instant>,
}

impl Checks {
    fn next(&self) -> Instant {
        let now = Instant::now();
        now + self.interval(now).mul_f64(0.75 + 0.5 * random_fraction())
    }

    /// The interval at `now` before its spread (agents that moved in one instant do not look in
    /// step): `fast` ([`FAST_CHECK`]) for [`FAST_CHECKS`]' time after `fast_since`, then growing
    /// with the time since, up to `every`. Never under 100 ms, whatever it is given.
    fn interval(&self, now: Instant) -> Duration {
        let every = match self.fast_since {
            Some(t) => {
                let (window, slope) = FAST_CHECKS;
                let since = now.saturating_duration_since(t);
                let grown = if since < window {
                    self.fast
                } else {
                    (since / slope).max(self.fast)
                };
                self.every.min(grown)
            }
            None => self.every,
        };
        every.max(Duration::from_millis(100))
    }
}

/// What the check of [`ControlLink::serve`] came to.
enum Checked {
    /// Time to look.
    Due,
    /// What the look found ([`where_new_connections_go`]).
    Found(Looked),
}

/// A new connection (upgraded, before its hello) and the instance it reached, if a look could
/// tell.
type Looked = Option<(Box<ControlWs>, String)>;

/// A look under way.
type Looking = std::pin::Pin<Box<dyn std::future::Future<Output = Looked> + Send>>;

impl ControlLink {
    /// Serves the link: pings, `want`, `drain`, `move`, until it ends, or until the server asks
    /// it to move (unless `let_go` is given: the link moves already, and ends when it fires).
    async fn serve(&mut self, shutdown: &CancellationToken, let_go: Option<&CancellationToken>, on_connected: &mut impl FnMut()) -> Served {
        let config = self.links.config.clone();
        // From its first `want` (the server took it); a link that moves already looks no more.
        let looks = let_go.is_none();
        let mut check_at = self.checks.as_ref().filter(|_| looks && self.connected).map(Checks::next);
        let mut checking: Option<Looking> = None;
        loop {
            let pong_due = self.pong_due;
            let pong_wait = async {
                match pong_due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let moved = async {
                match let_go {
                    Some(t) => t.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let check = async {
                match (checking.as_mut(), check_at) {
                    (Some(looking), _) => Checked::Found(looking.await),
                    (None, Some(t)) => {
                        tokio::time::sleep_until(t).await;
                        Checked::Due
                    }
                    (None, None) => std::future::pending().await,
                }
            };
            let connected = self.connected;
            let stable = self.since.is_some_and(|t| t.elapsed() >= config.ping_interval);
            let lost = |reason: String| {
                Served::Ended(Ended::Failed {
                    reason,
                    was_connected: connected,
                    stable,
                    retry_after: None,
                    answered: false,
                })
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.close("agent shutting down").await;
                    return Served::Ended(Ended::Shutdown);
                }
                _ = moved => {
                    self.close("connected elsewhere").await;
                    info!("agent: the connection that moved is closed");
                    return Served::Ended(Ended::Shutdown);
                }
                _ = pong_wait => return lost(format!("no pong within {:?}", config.pong_timeout)),
                _ = self.tick.tick() => {
                    self.pong_due.get_or_insert(Instant::now() + config.pong_timeout);
                    match timeout(config.pong_timeout, self.ws.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return lost(e.to_string()),
                        Err(_) => return lost("ping not written in time".into()),
                    }
                }
                m = self.ws.next() => {
                    self.pong_due = None;
                    match m {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ControlMessage>(&text) {
                            Ok(ControlMessage::Want { links }) => {
                                if !self.connected {
                                    self.connected = true;
                                    self.since = Some(Instant::now());
                                    on_connected();
                                    check_at = self.checks.as_ref().filter(|_| looks).map(Checks::next);
                                }
                                // Bounded: the server asks for its pool's worth; a confused one
                                // cannot make the agent dial without end.
                                for _ in 0..links.min(64) {
                                    if self.links.sessions.len() >= 4096 {
                                        break;
                                    }
                                    spawn_link(&self.links);
                                }
                            }
                            Ok(ControlMessage::Drain { reason }) => {
                                let reason = link::clean_reason(&reason);
                                info!(%reason, "agent: the server is draining");
                                let _ = timeout(Duration::from_secs(2), self.ws.close(None)).await;
                                return Served::Ended(Ended::Drain { stable });
                            }
                            Ok(ControlMessage::Move { reason }) if let_go.is_none() => {
                                return Served::Moving(Move::Asked(link::clean_reason(&reason), stable));
                            }
                            _ => debug!("agent: unexpected control message ignored"),
                        },
                        Some(Ok(Message::Close(frame))) => {
                            let reason = frame.map(|f| link::clean_reason(&f.reason)).unwrap_or_default();
                            if reason.contains("replaced") {
                                return Served::Ended(Ended::Refused(format!(
                                    "another agent connected with the name {}",
                                    config.name
                                )));
                            }
                            return lost(format!("the server closed the control link: {reason}"));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return lost(e.to_string()),
                        None => return lost("the server closed the connection".into()),
                    }
                }
                checked = check => match checked {
                    Checked::Due => {
                        self.looks.fetch_add(1, Ordering::Relaxed);
                        let (config, tls) = (config.clone(), self.links.tls.clone());
                        checking = Some(Box::pin(async move { where_new_connections_go(&config, tls.as_ref()).await }));
                    }
                    Checked::Found(found) => {
                        checking = None;
                        check_at = self.checks.as_ref().map(Checks::next);
                        let Some((mut ws, instance)) = found else { continue };
                        if self.links.instance.as_deref() == Some(instance.as_str()) {
                            let next = check_at.map(|t| t.saturating_duration_since(Instant::now()));
                            debug!(%instance, next_in = ?next, "agent: looked where the server's URL leads: this instance");
                        }
                        if self.follows(&instance) {
                            let from = self.links.instance.clone().unwrap_or_default();
                            return Served::Moving(Move::Followed { instance, from, ws });
                        }
                        // Not waited for here: the link goes on serving meanwhile.
                        self.links.sessions.spawn(async move { leave_before_hello(&mut ws, "looking where new connections go").await });
                    }
                },
            }
        }
    }

    /// Whether a new connection's reaching `instance` means this link is to move there.
    fn follows(&self, instance: &str) -> bool {
        if self.links.instance.as_deref() == Some(instance) {
            return false;
        }
        // Its data links reach other instances too: a balancer that spreads connections, where
        // following would only hop (the 421's warning says so).
        if self.links.misrouted.load(Ordering::Relaxed) {
            debug!(%instance, "agent: new connections reach another instance, but so do data links; staying");
            return false;
        }
        if let Some(other) = self.claim.as_ref().and_then(|c| c.held_elsewhere(instance)) {
            debug!(%instance, %other, "agent: new connections reach an instance another of its connections is on; staying");
            return false;
        }
        true
    }

    /// The rest of a link asked to move: it serves its instance (pages the balancer still sends
    /// there find the agent) until `let_go` (the agent connected again), the server's drain, the
    /// agent's shutdown or its loss.
    async fn finish(mut self, shutdown: CancellationToken, let_go: CancellationToken, ended: CancellationToken) {
        let _ended = ended.drop_guard();
        if let Served::Ended(Ended::Failed { reason, .. }) = self.serve(&shutdown, Some(&let_go), &mut || {}).await {
            debug!(%reason, "agent: the connection that was moving ended");
        }
    }

    /// Closes the link with `reason` and waits (at most 2 s) for the server's answer, reading
    /// and dropping what comes before it: a socket closed with bytes unread is reset, and the
    /// server could take the reset for a lost agent and end the sessions through it.
    async fn close(&mut self, reason: &'static str) {
        let frame = tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: reason.into(),
        };
        let _ = timeout(Duration::from_secs(2), async {
            if self.ws.close(Some(frame)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = self.ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
    }
}

type ControlWs = tokio_tungstenite::WebSocketStream<LinkStream>;

/// The instances an agent's connections are on (by the id in each control link's `101`), with
/// the connection (its index among the servers, and its URL) on each: one connection per
/// instance, since two would replace each other there.
#[derive(Clone, Default)]
struct Instances(Arc<std::sync::Mutex<std::collections::HashMap<String, Holding>>>);

/// Which connection holds an instance: its index and URL, and how many of its connections do
/// (two while a connection that moves lands on the instance it left, until the old one goes).
struct Holding {
    index: usize,
    url: String,
    claims: usize,
}

/// One connection's view of what the agent's connections share: the [`Instances`] they are on,
/// and the capped services' sessions.
struct Mine {
    instances: Instances,
    /// Which of the agent's servers this connection is to.
    index: usize,
    /// The capped services' open sessions, over all of the agent's connections.
    caps: Arc<Caps>,
    /// Looks where a URL leads so far ([`AgentHandle::looks`]).
    looks: Arc<AtomicU64>,
}

/// The sessions open on each service with a `max_sessions`, over all of the agent's
/// connections: the cap protects the app, whichever server a session comes through.
struct Caps(std::collections::HashMap<String, (usize, Arc<std::sync::atomic::AtomicUsize>)>);

/// One session's place under its service's cap, given back when dropped.
struct CapHeld(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for CapHeld {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Caps {
    fn new(max_sessions: &BTreeMap<String, usize>) -> Caps {
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

/// An instance held by one connection, until it is dropped.
struct Claim {
    instances: Instances,
    id: String,
    index: usize,
}

impl Instances {
    /// Claims instance `id` for connection `index` (to `url`); if another connection has it,
    /// that one's URL.
    fn claim(&self, id: String, index: usize, url: &str) -> Result<Claim, String> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match held.get_mut(&id) {
            Some(h) if h.index != index => return Err(h.url.clone()),
            Some(h) => h.claims += 1,
            None => {
                held.insert(
                    id.clone(),
                    Holding {
                        index,
                        url: url.to_owned(),
                        claims: 1,
                    },
                );
            }
        }
        Ok(Claim {
            instances: self.clone(),
            id,
            index,
        })
    }
}

impl Claim {
    /// The URL of another of the agent's connections that is on `instance`, if one is.
    fn held_elsewhere(&self, instance: &str) -> Option<String> {
        let held = self.instances.0.lock().unwrap_or_else(|p| p.into_inner());
        held.get(instance).filter(|h| h.index != self.index).map(|h| h.url.clone())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.instances.0.lock().unwrap_or_else(|p| p.into_inner());
        // Only its own: another connection may hold the id by now.
        if let Some(h) = held.get_mut(&self.id).filter(|h| h.index == self.index) {
            h.claims -= 1;
            if h.claims == 0 {
                held.remove(&self.id);
            }
        }
    }
}

/// Closes a control link before its hello (which would replace the agent's connection on that
/// instance), saying why.
async fn leave_before_hello(ws: &mut ControlWs, reason: &'static str) {
    let frame = tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: reason.into(),
    };
    let _ = timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
}

/// Where the server's URL leads a new connection now: a control link, upgraded, before its
/// hello, and the instance its `101` names. `None` when it cannot tell (no answer in time, a
/// refusal, a server that names no instance): the link stays where it is.
async fn where_new_connections_go(config: &AgentConfig, tls: Option<&BackendTls>) -> Looked {
    let (mut ws, instance) = match timeout(config.connect_timeout, open_control(config, tls)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(Ended::Failed { reason, .. } | Ended::Refused(reason))) => {
            debug!(%reason, "agent: could not look where the server's URL leads now");
            return None;
        }
        Ok(Err(_)) => return None,
        Err(_) => {
            debug!(within = ?config.connect_timeout, "agent: could not look where the server's URL leads now: no answer");
            return None;
        }
    };
    match instance {
        Some(instance) => Some((Box::new(ws), instance)),
        None => {
            leave_before_hello(&mut ws, "looking where new connections go").await;
            None
        }
    }
}

/// Dials and upgrades the control link; with the instance id the server's `101` gave (servers
/// from before it give none).
async fn open_control(config: &AgentConfig, tls: Option<&BackendTls>) -> Result<(ControlWs, Option<String>), Ended> {
    let failed = |reason: String| Ended::Failed {
        reason,
        was_connected: false,
        stable: false,
        retry_after: None,
        answered: false,
    };
    let io = dial(config, tls)
        .await
        .map_err(|e| failed(format!("cannot reach the server: {e}")))?;
    let s = &config.server;
    let url = s.to_string();
    let mut request = url.into_client_request().map_err(|e| failed(e.to_string()))?;
    let headers = request.headers_mut();
    let value = |v: &str| http::HeaderValue::from_str(v).map_err(|_| failed("a header value is not valid".into()));
    headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value(link::CONTROL_PROTOCOL)?);
    headers.insert(http::header::AUTHORIZATION, value(&format!("Bearer {}", config.secret))?);
    headers.insert(link::NAME_HEADER, value(&config.name)?);
    match tokio_tungstenite::client_async_with_config(request, io, Some(link::control_ws_config())).await {
        Ok((ws, response)) => {
            let instance = response
                .headers()
                .get(link::INSTANCE_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 64)
                .map(str::to_owned);
            Ok((ws, instance))
        }
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status();
            // Delay-seconds only (what wsbridge and most servers send); an HTTP date is ignored.
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let failed = |reason: String| Ended::Failed {
                reason,
                was_connected: false,
                stable: false,
                retry_after,
                answered: true,
            };
            // The answer's text, without the status line wsbridge's answers begin with.
            let text = response
                .body()
                .as_deref()
                .map(|b| link::clean_reason(String::from_utf8_lossy(b).trim()))
                .map(|t| match t.strip_prefix(status.to_string().as_str()) {
                    Some(rest) => rest.trim_start_matches(':').trim().to_owned(),
                    None => t,
                })
                .filter(|t| !t.is_empty());
            match status.as_u16() {
                401 => Err(Ended::Refused(format!("the server refused this agent's name or secret ({status})"))),
                // Not the secret: a wsbridge server refuses a request with an `Origin` (a
                // browser's) this way, which an agent's has only if something between added it;
                // otherwise a policy (the server's networks, a proxy's). The long backoff all
                // the same: retrying soon will not change it.
                403 => Err(Ended::Refused(match text {
                    Some(t) if t.contains(super::endpoint::NOT_FOR_BROWSERS) => format!(
                        "the server took this agent's request for a browser's ({status}: {t}): something between the \
                         agent and the server adds an Origin header"
                    ),
                    Some(t) => format!("the server refused this agent ({status}: {t})"),
                    None => format!("the server refused this agent ({status})"),
                })),
                // Not necessarily this agent's doing (another agent behind the same address,
                // a proxy's): the network backoff, not the refused secret's, but no sooner than
                // the server's Retry-After.
                429 if text.as_deref().is_none_or(|t| t.contains("failed attempts")) => {
                    Err(failed(format!("the server is slowing down this address's logins ({status})")))
                }
                // Its text says why (a draining instance, the connection caps), for the log.
                _ => match text {
                    Some(text) => Err(failed(format!("the server answered {status}: {text}"))),
                    None => Err(failed(format!("the server answered {status}"))),
                },
            }
        }
        // The connection ended before any answer: what a balancer with no server up does.
        Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete)) => Err(failed(
            "the connection closed before the server answered (a balancer with no server up?)".into(),
        )),
        Err(e) => Err(failed(format!("handshake failed: {e}"))),
    }
}

/// TCP to the server (or to the proxy, then CONNECT), then TLS for `wss://`.
async fn dial(config: &AgentConfig, tls: Option<&BackendTls>) -> std::io::Result<LinkStream> {
    let s = &config.server;
    let tcp = match &config.proxy {
        // Names resolved once at a time for the control link and the pool's dials together.
        None => TcpStream::connect(&crate::dns::resolve(&s.host, s.port).await?[..]).await?,
        Some(p) => {
            let mut tcp = TcpStream::connect(&crate::dns::resolve(&p.host, p.port).await?[..]).await?;
            let target = s.authority();
            let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(auth) = &p.authorization {
                head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
            }
            head.push_str("\r\n");
            tcp.write_all(head.as_bytes()).await?;
            let (status, _) = link::read_response_head(&mut tcp).await?;
            if !(200..300).contains(&status) {
                return Err(std::io::Error::other(format!("the proxy answered {status} to CONNECT")));
            }
            tcp
        }
    };
    tcp.set_nodelay(true)?;
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&crate::backend::tcp_keepalive())?;
    match tls {
        None => Ok(LinkStream::Tcp(tcp)),
        Some(tls) => {
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => rustls_pki_types::ServerName::try_from(s.host.clone()).map_err(std::io::Error::other)?,
            };
            Ok(LinkStream::Other(Box::new(tls.connector.connect(name, tcp).await?)))
        }
    }
}

/// One data link: dial, upgrade, wait for `open`, connect the service, relay until both ends
/// are done.
/// What dialling a data link needs, shared by the control loop and the links (each replaces
/// itself when it is opened).
#[derive(Clone)]
struct Links {
    config: Arc<AgentConfig>,
    tls: Option<BackendTls>,
    /// Cancelled when the control link ends: idle links close, no new one is dialled.
    idle: CancellationToken,
    sessions: TaskTracker,
    /// The instance the control link is on (from its `101`), which every data link names, so
    /// one that a balancer sent to another instance is refused there.
    instance: Option<String>,
    /// Whether a link's reaching another instance was logged (once per control link).
    misrouted: Arc<std::sync::atomic::AtomicBool>,
    /// Whether a link refused at the server's caps was logged (once per control link).
    capped: Arc<std::sync::atomic::AtomicBool>,
    /// The agent's capped services' open sessions.
    caps: Arc<Caps>,
}

/// Dials one more idle data link (bounded: at most 4096 links and sessions at once).
fn spawn_link(links: &Links) {
    if links.sessions.len() >= 4096 || links.idle.is_cancelled() {
        return;
    }
    // Boxed: a link spawns its own replacement, so its future's type cannot contain itself.
    // In the span of its server's connection, if the agent has several.
    let link: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(data_link(links.clone()).instrument(tracing::Span::current()));
    links.sessions.spawn(link);
}

async fn data_link(links: Links) {
    let (config, tls, idle) = (&*links.config, links.tls.as_ref(), &links.idle);
    let opened = timeout(config.connect_timeout, async {
        let mut io = dial(config, tls).await?;
        let s = &config.server;
        let instance = match &links.instance {
            Some(id) => format!("{}: {id}\r\n", link::INSTANCE_HEADER),
            None => String::new(),
        };
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {}\r\n{}: {}\r\n{}: {}\r\n{instance}Authorization: Bearer {}\r\n\r\n",
            s.path,
            s.authority(),
            link::LINK_TOKEN,
            link::NAME_HEADER,
            config.name,
            chunks::FRAMING_HEADER,
            chunks::CHUNKS,
            config.secret
        );
        io.write_all(head.as_bytes()).await?;
        io.flush().await?;
        // Buffered: the head costs a read, not one per byte.
        let mut io = BufReader::with_capacity(1024, io);
        let (status, head) = link::read_response_head(&mut io).await?;
        match status {
            101 => Ok((io, answers_chunks(&head))),
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
    let (buffered, reusable) = match opened {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return debug!(error = %e, "agent: data link not opened"),
        Err(_) => return debug!("agent: data link not opened in time"),
    };
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
        let service = match line {
            Ok(Some(l)) => match l.strip_prefix("open ") {
                Some(s) => s.to_owned(),
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
        let replace = (!reusable).then_some(&links);
        match session(&mut io, &service, reusable, config, &links.caps, replace).await {
            Some(rest) if reusable => carry = rest,
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

/// Whether a data link's `101` agreed on chunks.
fn answers_chunks(head: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case(chunks::FRAMING_HEADER) && value.trim().eq_ignore_ascii_case(chunks::CHUNKS)
        })
    })
}

/// One session on a data link whose `open` named `service`: connect it, answer, relay until both
/// ends are done. For a link in chunks, `Some` with the bytes read past the server's end mark
/// when the link is clean for the next session (an `err` answer leaves it clean too).
/// `replace`: the links to add a new idle one to once the session is let in (a raw link's).
async fn session(
    io: &mut LinkStream,
    service: &str,
    chunked: bool,
    config: &AgentConfig,
    caps: &Caps,
    replace: Option<&Links>,
) -> Option<Vec<u8>> {
    // The allow-list: only a service in this agent's own list, whatever the server asks.
    let Some(target) = config.services.get(service).filter(|_| link::valid_name(service)) else {
        let shown: String = service.chars().filter(char::is_ascii_graphic).take(64).collect();
        match NO_SUCH_SERVICE.take() {
            Some(left_out) => warn!(service = %shown, left_out, "agent: the server asked for a service this agent does not have"),
            None => debug!(service = %shown, "agent: the server asked for a service this agent does not have"),
        }
        return answer(io, &format!("err {shown}: no such service on agent {}\n", config.name), config)
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
            return answer(io, &format!("err {service}: busy, at most {max} {sessions} at a time\n"), config)
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
                ConnectError::Resolve(_) => "cannot resolve host".into(),
                other => other.to_string(),
            };
            warn!(%service, error = %why, "agent: service not reachable");
            return answer(io, &format!("err {service}: {why}\n"), config).await.then(Vec::new);
        }
    };
    let ok = if chunked {
        format!("{}\n", link::OK_CHUNKS)
    } else {
        "ok\n".to_owned()
    };
    if !answer(io, &ok, config).await {
        return None;
    }
    debug!(%service, "agent: session open");
    let started = Instant::now();
    let (app_read, app_write) = app.halves();
    let app_write = AppWriter::new(app_write, config.ping_interval + config.pong_timeout);
    let (link_read, link_write) = io.split();
    let (mut from_server, mut to_server) = (Dechunker::default(), Chunker::new());
    let ended = if chunked {
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
    let duration_ms = started.elapsed().as_millis() as u64;
    match ended {
        Ok((up, down)) => info!(%service, bytes_up = up, bytes_down = down, duration_ms, "agent: session closed"),
        Err(e) => info!(%service, error = %e, duration_ms, "agent: session ended"),
    }
    (from_server.clean() && to_server.ended()).then(|| from_server.into_pending())
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
/// app read again or closed. `stall` is the control link's ping interval plus its pong deadline:
/// a server with the same (default) settings has itself ended such a session by then, since it
/// reads nothing more from a page whose bytes the agent does not take, its pongs included.
struct AppWriter<W> {
    io: W,
    stall: Duration,
    /// Armed when a write finds the app not reading; disarmed by any write it takes.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<W> AppWriter<W> {
    fn new(io: W, stall: Duration) -> Self {
        AppWriter {
            io,
            stall,
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
            return polled;
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

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AppWriter<W> {
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

/// `wsbridge agent --new-secret`: a fresh secret and the server's line for it.
///
/// # Errors
/// The system's random source failed.
pub fn new_secret_text() -> std::io::Result<String> {
    let secret = link::new_secret()?;
    Ok(format!(
        "{secret}\n# save the line above as the agent's secret file; on the server, in its [[agent]]:\nsecret_sha256 = \"{}\"\n",
        link::secret_sha256(&secret)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    #[test]
    fn urls_and_proxies_parse() {
        let u: ServerUrl = "wss://bridge.example.com/agent".parse().unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "bridge.example.com", 443, "/agent")
        );
        let u: ServerUrl = "ws://[::1]:6080/agent".parse().unwrap();
        assert_eq!(u.authority(), "[::1]:6080");
        assert!("ftp://x/agent".parse::<ServerUrl>().is_err());
        let p: Proxy = "http://user:p%40ss@proxy:3128".parse().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy", 3128));
        assert_eq!(p.authorization.as_deref(), Some("Basic dXNlcjpwQHNz"));
        assert!("socks5://proxy:1080".parse::<Proxy>().is_err());
        // Shown without its credentials.
        assert_eq!(p.to_string(), "proxy:3128");
        assert_eq!("http://[::1]:3128".parse::<Proxy>().unwrap().to_string(), "[::1]:3128");
        assert_eq!("http://[::1]".parse::<Proxy>().unwrap().to_string(), "[::1]:80");
        assert_eq!("proxy.corp_1".parse::<Proxy>().unwrap().to_string(), "proxy.corp_1:80");
        for bad in ["pr%xy:80", "http://a b:3128", "http://fe80::1:3128/", "http://proxy:80/path"] {
            assert!(bad.parse::<Proxy>().is_err(), "{bad}");
        }
        let e = "http://fe80::1:3128".parse::<Proxy>().unwrap_err();
        assert!(e.contains("brackets"), "{e}");
    }

    /// `max_sessions` in the file (a service as a table) and as a flag, which wins; every mistake
    /// named by its line and key.
    /// Looks after leaving another instance: 5 s apart for 2 minutes, then growing with the time
    /// since (a 24th of it) up to `balancer_check`; without one, `balancer_check`; never under
    /// 100 ms.
    #[test]
    fn looks_come_closer_after_leaving_an_instance_and_space_out_again() {
        let now = Instant::now();
        let every = Duration::from_secs(30);
        let checks = |fast_since: Option<Instant>, every: Duration| Checks {
            every,
            fast: FAST_CHECK,
            fast_since,
        };
        assert_eq!(checks(None, every).interval(now), every);
        let left = checks(Some(now), every);
        let at = |secs: u64| left.interval(now + Duration::from_secs(secs));
        assert_eq!(at(0), FAST_CHECK);
        assert_eq!(at(119), FAST_CHECK);
        assert_eq!(at(240), Duration::from_secs(10));
        assert_eq!(at(600), Duration::from_secs(25));
        assert_eq!(at(3600), every);
        assert_eq!(checks(Some(now), Duration::from_secs(2)).interval(now), Duration::from_secs(2));
        assert_eq!(checks(None, Duration::ZERO).interval(now), Duration::from_millis(100));
        let next = checks(None, every).next();
        assert!(next >= Instant::now() + every * 3 / 4 - Duration::from_millis(50) && next <= Instant::now() + every * 5 / 4);
    }

    #[test]
    fn the_balancer_check_is_a_duration_or_off() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "secret\n").unwrap();
        let file = dir.path().join("agent.toml");
        let with = |line: &str| {
            let text = format!(
                "[agent]\nserver = \"ws://127.0.0.1:6080/agent\"\nname = \"n\"\nsecret_file = \"s\"\n{line}\n[agent.services]\npos = \"127.0.0.1:9100\"\n"
            );
            std::fs::write(&file, text).unwrap();
            AgentConfig::from_file(&file)
        };
        assert_eq!(with("").unwrap().balancer_check, Some(Duration::from_secs(30)));
        // Several URLs, each to an instance of its own: nothing to look for, unless asked.
        std::fs::write(
            &file,
            std::fs::read_to_string(&file).unwrap().replace(
                "server = \"ws://127.0.0.1:6080/agent\"",
                "server = [\"ws://127.0.0.1:6080/agent\", \"ws://127.0.0.1:6081/agent\"]",
            ),
        )
        .unwrap();
        assert_eq!(AgentConfig::from_file(&file).unwrap().balancer_check, None);
        let flags = |check: Option<&str>, servers: &[&str]| AgentArgs {
            config: Some(file.clone()),
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            balancer_check: check.map(str::to_owned),
            ..AgentArgs::default()
        };
        assert_eq!(
            AgentConfig::from_args(&flags(Some("1m"), &[])).unwrap().balancer_check,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            AgentConfig::from_args(&flags(None, &["ws://127.0.0.1:7000/agent"]))
                .unwrap()
                .balancer_check,
            Some(Duration::from_secs(30)),
            "one URL given as a flag"
        );
        let e = AgentConfig::from_args(&flags(Some("0s"), &[])).unwrap_err().to_string();
        assert!(e.contains("--balancer-check") && e.contains("\"off\""), "{e}");
        assert_eq!(
            with("balancer_check = \"2m\"").unwrap().balancer_check,
            Some(Duration::from_secs(120))
        );
        assert_eq!(with("balancer_check = \"off\"").unwrap().balancer_check, None);
        // A number is seconds, as in the server's file.
        assert_eq!(with("balancer_check = 45").unwrap().balancer_check, Some(Duration::from_secs(45)));
        for wrong in ["\"0s\"", "\"500ms\"", "\"often\"", "0.5", "-3", "true"] {
            let e = with(&format!("balancer_check = {wrong}")).unwrap_err().to_string();
            assert!(
                e.contains("agent.toml:5: agent.balancer_check: ") && e.contains("\"off\""),
                "{wrong}: {e}"
            );
        }
    }

    #[test]
    fn a_service_takes_a_session_cap_in_the_file_or_as_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "secret\n").unwrap();
        let file = dir.path().join("agent.toml");
        let write = |services: &str| {
            let head = "[agent]\nserver = \"ws://127.0.0.1:6080/agent\"\nname = \"n\"\nsecret_file = \"s\"\n[agent.services]\n";
            std::fs::write(&file, format!("{head}{services}")).unwrap();
        };
        write("pos = { target = \"127.0.0.1:9100\", max_sessions = 1 }\nlabel = \"127.0.0.1:9101\"\n");
        let c = AgentConfig::from_file(&file).unwrap();
        assert_eq!(c.services["pos"], "127.0.0.1:9100".parse().unwrap());
        assert_eq!(c.services["label"], "127.0.0.1:9101".parse().unwrap());
        assert_eq!(c.max_sessions, BTreeMap::from([("pos".to_owned(), 1)]));
        let args = |max: &[&str]| AgentArgs {
            config: Some(file.clone()),
            max_sessions: max.iter().map(|s| (*s).to_owned()).collect(),
            ..AgentArgs::default()
        };
        let flags = AgentConfig::from_args(&args(&["pos=3", "label=2"])).unwrap();
        assert_eq!(flags.max_sessions, BTreeMap::from([("pos".to_owned(), 3), ("label".to_owned(), 2)]));
        for (flag, says) in [
            ("pos=0", "at least 1"),
            ("pos=many", "at least 1"),
            ("pos", "expected NAME=N"),
            ("printer=1", "no such service"),
            ("pos=1 pos=2", "given twice"),
        ] {
            let flags: Vec<&str> = flag.split(' ').collect();
            let e = AgentConfig::from_args(&args(&flags)).unwrap_err().to_string();
            assert!(e.contains("--max-sessions") && e.contains(says), "{flag}: {e}");
        }
        for (entry, field, says) in [
            (
                "pos = { target = \"127.0.0.1:9100\", max_sessions = 0 }",
                "agent.services.pos.max_sessions",
                "at least 1",
            ),
            (
                "pos = { target = \"127.0.0.1:9100\", max_sessions = \"1\" }",
                "agent.services.pos.max_sessions",
                "whole number",
            ),
            (
                "pos = { target = \"127.0.0.1\" }",
                "agent.services.pos.target",
                "expected HOST:PORT",
            ),
            ("pos = { max_sessions = 1 }", "agent.services.pos", "needs target"),
            (
                "pos = { target = \"127.0.0.1:9100\", max = 1 }",
                "agent.services.pos",
                "unknown key \"max\"",
            ),
            (
                "pos = { agent = \"a\", service = \"b\" }",
                "agent.services.pos",
                "HOST:PORT or unix:/path",
            ),
            ("pos = 9100", "agent.services.pos", "\"HOST:PORT\""),
        ] {
            write(&format!("label = \"127.0.0.1:9101\"\n{entry}\n"));
            let e = AgentConfig::from_file(&file).unwrap_err().to_string();
            assert!(e.contains(&format!("agent.toml:7: {field}: ")) && e.contains(says), "{entry}: {e}");
        }
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

    /// A proxy given as a flag beats the file's for every server, `off` removes it, and a file's
    /// proxy applies to the servers given as flags too. (HTTPS_PROXY / NO_PROXY per server:
    /// the integration test that runs `wsbridge check` with them set.)
    #[test]
    fn a_proxy_flag_wins_over_the_file_for_every_server() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "secret\n").unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "[agent]\nserver = [\"wss://a.example.com/agent\", \"wss://b.example.com/agent\"]\nname = \"n\"\n\
             secret_file = \"s\"\nproxy = \"http://file-proxy:3128\"\n[agent.services]\npos = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let proxies = |c: &AgentConfig| -> Vec<Option<String>> { c.connections().map(|(_, p, _)| p.map(ToString::to_string)).collect() };
        let sources = |c: &AgentConfig| -> Vec<ProxySource> { c.connections().map(|(_, _, s)| s.clone()).collect() };
        let args = |proxy: Option<&str>, servers: &[&str]| AgentArgs {
            config: Some(file.clone()),
            proxy: proxy.map(str::to_owned),
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            ..AgentArgs::default()
        };
        let file_only = AgentConfig::from_args(&args(None, &[])).unwrap();
        assert_eq!(
            proxies(&file_only),
            [Some("file-proxy:3128".into()), Some("file-proxy:3128".into())]
        );
        assert_eq!(sources(&file_only), [ProxySource::Config, ProxySource::Config]);
        let flag = AgentConfig::from_args(&args(Some("http://flag-proxy:8080"), &[])).unwrap();
        assert_eq!(proxies(&flag), [Some("flag-proxy:8080".into()), Some("flag-proxy:8080".into())]);
        assert_eq!(sources(&flag), [ProxySource::Flag, ProxySource::Flag]);
        let off = AgentConfig::from_args(&args(Some("off"), &[])).unwrap();
        assert_eq!(proxies(&off), [None, None]);
        assert_eq!(sources(&off), [ProxySource::Off, ProxySource::Off]);
        let servers = AgentConfig::from_args(&args(None, &["wss://c.example.com/agent"])).unwrap();
        assert_eq!(
            servers.servers().map(ToString::to_string).collect::<Vec<_>>(),
            ["wss://c.example.com:443/agent"]
        );
        assert_eq!(proxies(&servers), [Some("file-proxy:3128".into())]);
    }

    /// A route from the Windows settings read again: the next attempt's configuration changes
    /// with what they say now (the proxy and where it came from), not with a late reading, and
    /// not at all when nothing differs; the log's words for a route.
    #[test]
    fn a_connection_follows_the_windows_settings_read_again() {
        use super::system_proxy::WindowsSetting;
        let windows = |setting: Option<WindowsSetting>, late: bool| WindowsChoice {
            setting,
            late,
            ..WindowsChoice::default()
        };
        let office: Proxy = "proxy.corp:8080".parse().unwrap();
        let mut config = AgentConfig::new("wss://bridge.example.com/agent".parse().unwrap(), "n".into(), "s".into());
        config.proxy = Some(office.clone());
        config.proxy_source = ProxySource::Windows(windows(Some(WindowsSetting::InternetOptions), false));
        assert_eq!(
            route_text(config.proxy.as_ref(), &config.proxy_source),
            "through proxy.corp:8080 (from Windows settings (Internet Options))"
        );
        let mut rereads = Rereads::new(std::time::Instant::now());
        // Nothing differs: nothing to replace.
        let same = (Some(office.clone()), windows(Some(WindowsSetting::InternetOptions), false));
        assert!(follow_windows(&config, Some(same), &mut rereads).is_none());
        // No answer at all (no thread): the route stays.
        assert!(follow_windows(&config, None, &mut rereads).is_none());
        // Late: the route stays.
        let home = (None, windows(None, true));
        assert!(follow_windows(&config, Some(home.clone()), &mut rereads).is_none());
        // Home, in time: direct now, and why.
        let home = (None, windows(None, false));
        let next = follow_windows(&config, Some(home), &mut rereads).expect("a new route");
        assert_eq!(next.proxy, None);
        assert_eq!(next.proxy_source, ProxySource::Windows(windows(None, false)));
        assert_eq!(
            route_text(next.proxy.as_ref(), &next.proxy_source),
            "directly (from Windows settings (none))"
        );
        assert_eq!((next.server.clone(), next.secret.as_str()), (config.server.clone(), "s"));
        // The same proxy from another setting: the route stays, its source is brought up to date.
        let pac = WindowsSetting::Pac("http://pac.corp/p.pac".into());
        let next = follow_windows(
            &config,
            Some((Some(office.clone()), windows(Some(pac.clone()), false))),
            &mut rereads,
        )
        .unwrap();
        assert_eq!(next.proxy.as_ref(), Some(&office));
        assert_eq!(next.proxy_source, ProxySource::Windows(windows(Some(pac), false)));
        // Off Windows there is nothing to read again.
        #[cfg(not(windows))]
        assert!(system_proxy::windows_again(&config.server, Duration::from_secs(1), Arc::default()).is_none());
    }

    #[test]
    fn the_status_line_says_which_connection_is_down_and_why() {
        let state = |s: State| watch::channel(s).1;
        let one = ["wss://a:443/agent".to_owned()];
        assert_eq!(
            status_line("shop-17", &one, &[state(State::Connected)]),
            "agent shop-17: connected to wss://a:443/agent"
        );
        let retrying = State::Retrying {
            reason: "cannot reach the server: refused".into(),
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            status_line("shop-17", &one, &[state(retrying.clone())]),
            "agent shop-17: not connected; wss://a:443/agent: retrying in 1.5s (cannot reach the server: refused)"
        );
        let two = ["wss://a:443/agent".to_owned(), "wss://b:443/agent".to_owned()];
        assert_eq!(
            status_line("shop-17", &two, &[state(State::Connected), state(retrying)]),
            "agent shop-17: connected to 1 of 2 servers; wss://b:443/agent: retrying in 1.5s (cannot reach the server: refused)"
        );
        assert_eq!(
            status_line("shop-17", &two, &[state(State::Connecting), state(State::Stopped)]),
            "agent shop-17: connected to 0 of 2 servers; wss://a:443/agent: connecting"
        );
        let moving = State::Moving {
            reason: "the server answered 503 Service Unavailable: this instance is draining".into(),
        };
        assert_eq!(
            status_line("shop-17", &one, &[state(moving)]),
            "agent shop-17: connected; wss://a:443/agent: moving, connecting again (the server answered 503 Service \
             Unavailable: this instance is draining)",
            "still connected: the old connection serves"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_never_reaches_zero() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            auth_max: Duration::from_secs(10),
            ..Backoff::default()
        };
        for _ in 0..50 {
            let first = b.delay(1, false);
            assert!(
                first >= Duration::from_millis(25) && first <= Duration::from_millis(100),
                "{first:?}"
            );
            assert!(b.delay(30, false) <= Duration::from_secs(1));
            assert!(b.delay(30, false) >= Duration::from_millis(250));
            assert!(b.delay(30, true) >= Duration::from_millis(2500));
        }
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
