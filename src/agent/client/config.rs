//! The agent's configuration: its flags, the `[agent]` table of a TOML file (errors name the
//! file, line and field, as the server's do), the server URLs, the proxy, the services and their
//! caps, the secret file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Backoff, FAST_CHECK};

/// [`AgentConfig::app_stall_floor`]'s value.
const APP_STALL_FLOOR: Duration = Duration::from_secs(40);
use crate::agent::link;
use crate::config::{parse_duration, ConfigError, Target};

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
    /// A service the server may open: NAME=HOST:PORT or NAME=unix:/path (not on Windows)
    /// (repeatable). Only these are ever connected to.
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
    /// Print a fresh secret and the `secret_sha256` line for the server's `[[agent]]`, then exit;
    /// with --secret-file FILE, write the secret to FILE instead (a new file, readable by its
    /// owner only) and print only the server's line.
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
    /// The least time an app may take none of a session's bytes before the agent ends the
    /// session ([`AgentConfig::app_stall`]): 40 s, what a server with default timeouts allows a
    /// page whose bytes cannot go on. Not a setting: tests lower it.
    pub app_stall_floor: Duration,
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
        // Read from the text: http's Uri says "no port" for one out of range, and a typo of 65536
        // (or 443000) then sent the agent's secret to 80 or 443 (a review).
        let authority = uri.authority().map_or("", |a| a.as_str());
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
        let after_host = match host_port.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
            None => host_port.find(':').map_or("", |i| &host_port[i..]),
        };
        if !after_host.is_empty() && !after_host.starts_with(':') {
            return Err(format!("{s:?}: expected :PORT after the host, not {after_host:?}"));
        }
        let port = match after_host.strip_prefix(':') {
            None | Some("") => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(text) => match text.parse::<u16>() {
                Ok(n @ 1..) => n,
                _ => return Err(format!("{s:?}: the port must be 1-65535, not {text}")),
            },
        };
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
    fn from_str(given: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let given = given.trim();
        // What errors show: the URL with its password left out (the user's proxy password; the
        // message goes to the console and the log).
        let s = &match given.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (scheme, userinfo) = userinfo.rsplit_once("://").map_or(("", userinfo), |(s, u)| (s, u));
                let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{scheme}{user}:…@{host}"),
                    None => given.to_owned(),
                }
            }
            None => given.to_owned(),
        };
        // A scheme in any case (HTTP://, as some tools write it).
        let rest = match given.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &given[7..],
            _ => given,
        };
        if rest.contains("://") {
            return Err(format!("proxy {s:?}: only http:// proxies (CONNECT) are supported"));
        }
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        // A proxy is a host and a port: a path or a query after them (copied from a web page)
        // read as a bad port (a review).
        if let Some(at) = hostport.find(['/', '?', '#']) {
            return Err(format!(
                "proxy {s:?}: a proxy is http://HOST:PORT, without the {:?} after it",
                hostport[at..].chars().take(40).collect::<String>()
            ));
        }
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
/// case too, unless NO_PROXY names the host ([`no_proxy_names`]).
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
    if no_proxy.split(',').any(|e| no_proxy_names(e, &server.host, server.port)) {
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

/// Whether one NO_PROXY entry names `host` (a name, or an IP literal without brackets) at `port`,
/// as curl (7.86 and later), Go and Python's requests read them: `*`; a domain, exactly or as a
/// suffix (`example.com` and `.example.com` name `a.example.com`), for host names only; an IP
/// address (`::1`, `[::1]`, in any spelling) for that address only; a CIDR range (`10.0.0.0/8`,
/// `fd00::/8`) for the addresses in it; any of these with `:PORT` for that port only. (A review:
/// ranges and brackets were read as domains and never matched, and `0.0.1` matched `10.0.0.1`.)
fn no_proxy_names(entry: &str, host: &str, port: u16) -> bool {
    let entry = entry.trim().to_ascii_lowercase();
    if entry == "*" {
        return true;
    }
    // `[v6]`, `[v6]:port`, `name:port`, `v4:port`; a bare IPv6 address or range has colons of its
    // own and no port.
    let (name, entry_port) = match entry.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            // `[fd00::]/8`: a range written with brackets.
            Some((inside, after)) if after.starts_with('/') => (format!("{inside}{after}"), None),
            Some((inside, after)) => (inside.to_owned(), after.strip_prefix(':').map(str::to_owned)),
            None => return false,
        },
        None => match entry.rsplit_once(':') {
            Some((n, p)) if !n.contains(':') && p.parse::<u16>().is_ok() => (n.to_owned(), Some(p.to_owned())),
            _ => (entry.clone(), None),
        },
    };
    if entry_port.is_some_and(|p| p.parse::<u16>().ok() != Some(port)) {
        return false;
    }
    let ip = host.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_canonical());
    if name.contains('/') {
        return match (crate::policy::parse_net(&name), ip) {
            (Ok(net), Some(ip)) => net.contains(&ip),
            _ => false,
        };
    }
    if let Ok(listed) = name.parse::<std::net::IpAddr>() {
        return ip == Some(listed.to_canonical());
    }
    // `*.example.com` as Go reads it: `.example.com`; a name's trailing dot is no part of it.
    let domain = name
        .strip_prefix('*')
        .unwrap_or(&name)
        .trim_start_matches('.')
        .trim_end_matches('.');
    let host = host.to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    ip.is_none() && !domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}")))
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
    ca_file: Option<toml::Spanned<PathBuf>>,
    proxy: Option<toml::Spanned<String>>,
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
    crate::platform::read_text(path).is_ok_and(|t| is_agent_text(&t))
}

/// Whether a TOML text is an agent's file: an `[agent]` table without the key only a server's
/// declaration has (`secret_sha256`), so that a server's file whose `[[agent]]` declaration was
/// written `[agent]` by mistake is read as the server's, and told to write two brackets, while
/// an agent's file with its keys misspelt is still read as an agent's (and told which key).
pub fn is_agent_text(text: &str) -> bool {
    text.parse::<toml::Table>()
        .is_ok_and(|t| matches!(t.get("agent"), Some(toml::Value::Table(a)) if !a.contains_key("secret_sha256")))
}

/// The error for a server's file given to the agent: it has server tables (`[[listen]]`,
/// `[[route]]`, `[[agent]]` declarations …) and no `[agent]` table.
fn server_file(file: &str, text: &str) -> Option<ConfigError> {
    let table = text.parse::<toml::Table>().ok()?;
    if table.get("agent").is_some_and(toml::Value::is_table) {
        return None;
    }
    let server = ["listen", "route", "tokens", "agent", "agent_endpoint", "agents"];
    let key = server.into_iter().find(|k| table.contains_key(*k))?;
    let line = text
        .lines()
        .position(|l| l.trim_start().starts_with(&format!("[[{key}]]")))
        .map(|i| i + 1);
    Some(ConfigError::Invalid {
        file: file.to_owned(),
        line,
        field: key.to_owned(),
        message: "this is a server's file: run it with `wsbridge --config FILE` (an agent's file has one [agent] table)".into(),
    })
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
        let text = crate::platform::read_text(path).map_err(|e| ConfigError::Io {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let raw: RawFile = match toml::from_str(&text) {
            Ok(raw) => raw,
            Err(e) => {
                return Err(server_file(&file, &text).unwrap_or(ConfigError::Parse {
                    file,
                    message: crate::config::parse_message(&e, &text),
                }))
            }
        };
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
        // Checked now (`wsbridge check`, a service's install), not at the first dial: the file's
        // line says which (a review: check said OK, and the service failed at every start).
        let ca_file = match &a.ca_file {
            Some(ca) => {
                let path = resolve(ca.get_ref());
                if servers.iter().any(|s| s.tls) && flags.ca_file.is_none() {
                    crate::config::tls::check_certs(&path).map_err(|m| ctx.invalid(ca.span(), "agent.ca_file", m))?;
                }
                Some(path)
            }
            None => None,
        };
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
            // Relative to the file, as its other paths are (not to where the agent was started:
            // a service's working directory is not the configuration's).
            let target = match target {
                Target::Unix(path) => Target::Unix(resolve(&path)),
                t => t,
            };
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
            ca_file,
            // Never from a file: an agent that does not check its server sends its secret to
            // whoever is in between (a review found the key read, and listed among the file's).
            insecure_skip_verify: false,
            proxy,
            proxy_source,
            connect_timeout,
            ping_interval: dur(&a.ping_interval, "agent.ping_interval", defaults.ping_interval)?,
            pong_timeout: dur(&a.pong_timeout, "agent.pong_timeout", defaults.pong_timeout)?,
            backoff,
            shutdown_grace: defaults.shutdown_grace,
            balancer_check,
            fast_check: FAST_CHECK,
            app_stall_floor: APP_STALL_FLOOR,
        })
    }

    /// How long an app may take none of a session's bytes before the agent ends the session
    /// (its place under `max_sessions` comes back): the control link's `ping_interval` plus
    /// `pong_timeout`, and at least [`AgentConfig::app_stall_floor`]. The floor keeps pings
    /// lowered for a NAT's sake from cutting off a slow app (a printer that pauses): an
    /// upgrade-compatibility review saw a session cut after 4 s with ping 2 s, pong 2 s.
    pub fn app_stall(&self) -> Duration {
        (self.ping_interval + self.pong_timeout).max(self.app_stall_floor)
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
            app_stall_floor: APP_STALL_FLOOR,
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
            ca_file: args.ca_file.clone(),
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
            if config.servers().any(|s| s.tls) {
                crate::config::tls::check_certs(ca).map_err(|m| invalid("--ca-file", m))?;
            }
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
    pub(super) fn per_server(&self) -> Vec<AgentConfig> {
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
    /// `--ca-file`: the file's is not used (nor checked).
    ca_file: Option<PathBuf>,
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
    let text = crate::platform::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(format!("{}: the secret file is empty", path.display()));
    }
    Ok(secret)
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

/// `--new-secret --secret-file FILE`: a fresh secret written to FILE, a new file (an existing
/// one is not replaced: it may be a running agent's), readable by its owner only on Unix (on
/// Windows it takes its directory's permissions); the text to print: where it went and the
/// `secret_sha256` line for the server. Nothing of the secret is printed.
///
/// # Errors
/// The file exists already, or cannot be written (named in the message).
pub fn write_new_secret(path: &Path) -> std::io::Result<String> {
    use std::io::Write as _;
    let secret = link::new_secret()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let said = |e: std::io::Error| {
        let why = match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                "exists already: a new secret goes in a new file (remove this one first to replace it)".to_owned()
            }
            std::io::ErrorKind::NotFound => format!("{e} (its directory does not exist: create it first)"),
            _ => e.to_string(),
        };
        std::io::Error::new(e.kind(), format!("--secret-file {}: {why}", path.display()))
    };
    let mut file = options.open(path).map_err(said)?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(said)?;
    Ok(format!(
        "# the agent's secret is in {}; on the server, in its [[agent]]:\nsecret_sha256 = \"{}\"\n",
        path.display(),
        link::secret_sha256(&secret)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret file as Windows saves it (PowerShell 5.1's `--new-secret > agent.secret` writes
    /// UTF-16 with a byte-order mark; Notepad and `Out-File -Encoding utf8`, UTF-8 with one) holds
    /// the secret it shows: the mark read as part of it made every login fail as a wrong secret.
    #[test]
    fn a_secret_file_saved_by_windows_tools_holds_its_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "0123456789abcdef0123456789abcdef-shop-17";
        let text = format!("{secret}\r\n# save the line above as the agent's secret file\r\n");
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let bom = [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat();
        for (name, bytes) in [("utf16.secret", utf16), ("bom.secret", bom)] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(read_secret(&path).unwrap(), secret, "{name}");
        }
        let path = dir.path().join("latin1.secret");
        std::fs::write(&path, b"caf\xe9\n").unwrap();
        let e = read_secret(&path).unwrap_err();
        assert!(
            e.ends_with("latin1.secret: not UTF-8 text (byte 3 is not): save it as UTF-8 (or ASCII)"),
            "{e}"
        );
    }

    #[test]
    fn a_servers_file_given_to_the_agent_says_how_to_run_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "# the bridge\n[[listen]]\naddr = 6080\n[[route]]\npath = \"/\"\ntarget = \"h:1\"\n",
        )
        .unwrap();
        let e = AgentConfig::from_file(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:2: listen: this is a server's file: run it with `wsbridge --config FILE` (an agent's file has one [agent] table)",
                file.display()
            )
        );
        // An agent's file with a mistake keeps the parser's message, and is an agent's file to
        // `wsbridge check` even with its server and services keys misspelt.
        std::fs::write(&file, "[agent]\nserver = \"ws://h/agent\"\nnaem = \"x\"\n").unwrap();
        let e = AgentConfig::from_file(&file).unwrap_err().to_string();
        assert!(e.contains("unknown field `naem`"), "{e}");
        // Not checking the server's certificate is no setting of the file's (the secret would go
        // to whoever is in between), nor one the error offers.
        std::fs::write(&file, "[agent]\nserver = \"wss://h/agent\"\ninsecure_skip_verify = true\n").unwrap();
        let e = AgentConfig::from_file(&file).unwrap_err().to_string();
        assert!(e.contains("unknown field `insecure_skip_verify`"), "{e}");
        assert!(
            !e.contains("expected one of `name`, `secret_file`, `services`, `ca_file`, `proxy`, `insecure"),
            "{e}"
        );
        assert!(is_agent_text("[agent]\nsevers = \"ws://h/agent\"\nname = \"x\"\nservice = {}\n"));
        assert!(!is_agent_text("[agent]\nname = \"shop-17\"\nsecret_sha256 = \"00\"\n"));
    }

    #[test]
    fn no_proxy_entries_read_as_curl_and_go_read_them() {
        let names = |entry: &str, host: &str, port: u16| no_proxy_names(entry, host, port);
        for (entry, host) in [
            ("*", "bridge.example.com"),
            ("example.com", "bridge.example.com"),
            (".example.com", "bridge.example.com"),
            ("bridge.example.com", "bridge.example.com"),
            ("Bridge.Example.COM", "bridge.example.com"),
            ("bridge.example.com:443", "bridge.example.com"),
            ("10.0.0.1", "10.0.0.1"),
            ("10.0.0.0/8", "10.0.0.1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[::1]:443", "::1"),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("::1/128", "::1"),
            ("fd00::/8", "fd12::1"),
            ("127.0.0.0/8", "127.0.0.1"),
            ("127.0.0.1:443", "127.0.0.1"),
            ("*.example.com", "bridge.example.com"),
            ("[fd00::]/8", "fd12::1"),
            ("example.com", "bridge.example.com."),
            ("example.com.", "bridge.example.com"),
        ] {
            assert!(names(entry, host, 443), "{entry} names {host}");
        }
        for (entry, host) in [
            ("", "bridge.example.com"),
            ("ample.com", "bridge.example.com"),
            ("bridge.example.com:80", "bridge.example.com"),
            ("0.0.1", "10.0.0.1"),
            ("10.0.0.0/8", "bridge.example.com"),
            ("10.0.0.2", "10.0.0.1"),
            ("[::1]:80", "::1"),
            ("fd00::/8", "fe80::1"),
            ("example.com", "10.0.0.1"),
        ] {
            assert!(!names(entry, host, 443), "{entry} does not name {host}");
        }
    }

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
        // A review: an out-of-range port read as none, and the agent sent its secret to 80/443.
        for bad in [
            "ws://[::1]:65536/agent",
            "wss://bridge.example.com:0/agent",
            "wss://h:99999999/agent",
        ] {
            let e = bad.parse::<ServerUrl>().unwrap_err();
            assert!(e.contains("the port must be 1-65535"), "{bad}: {e}");
        }
        assert!("ws://[::1]x:90/agent".parse::<ServerUrl>().is_err(), "text between ] and the port");
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
        // A path after the port is said as such (it read "bad port"), a password with a '/' is
        // no path, and neither shows the password.
        let e = "http://user:pw@proxy:3128/path?x".parse::<Proxy>().unwrap_err();
        assert!(e.contains("without the \"/path?x\" after it") && !e.contains("pw@"), "{e}");
        let p: Proxy = "http://user:p/w@proxy:3128".parse().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy", 3128));
        // An error leaves the password out (a hostile-server review found it in the message).
        for (bad, shown) in [
            ("http://puser:CANARYPW@proxy.corp:99999", "http://puser:…@proxy.corp:99999"),
            ("socks5://puser:CANARYPW@proxy:1080", "socks5://puser:…@proxy:1080"),
            ("puser:CANARYPW@proxy.corp:0", "puser:…@proxy.corp:0"),
        ] {
            let e = bad.parse::<Proxy>().unwrap_err();
            assert!(!e.contains("CANARYPW") && e.contains(shown), "{e}");
        }
    }

    /// A CA file that cannot serve a `wss://` server is an error where it is named (the file's
    /// line, or the flag), at load: `wsbridge check` and a service's install see it, not only
    /// the first dial (a Windows review: check said OK, and the service failed at every start).
    #[test]
    fn a_ca_file_is_checked_where_it_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "secret\n").unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let file = dir.path().join("agent.toml");
        let with = |scheme: &str, ca: &str| {
            let text = format!(
                "[agent]\nserver = \"{scheme}://127.0.0.1:6080/agent\"\nname = \"n\"\nsecret_file = \"s\"\nca_file = \"{ca}\"\n[agent.services]\npos = \"127.0.0.1:9100\"\n"
            );
            std::fs::write(&file, text).unwrap();
            AgentConfig::from_file(&file)
        };
        let e = with("wss", "certs/nope.pem").unwrap_err().to_string();
        assert!(e.contains("agent.toml:5: agent.ca_file: ") && e.contains("nope.pem"), "{e}");
        let e = with("wss", "key.pem").unwrap_err().to_string();
        assert!(
            e.contains("agent.toml:5: agent.ca_file: ") && e.contains("no certificate in it"),
            "{e}"
        );
        // Not used by a plain ws:// server: not read.
        assert!(with("ws", "certs/nope.pem").is_ok());
        // The flag's replaces the file's, and is checked in its place.
        with("wss", "certs/nope.pem").unwrap_err();
        let flag = |ca: &str| AgentArgs {
            config: Some(file.clone()),
            ca_file: Some(dir.path().join(ca)),
            ..AgentArgs::default()
        };
        let e = AgentConfig::from_args(&flag("missing.pem")).unwrap_err().to_string();
        assert!(e.contains("--ca-file") && e.contains("missing.pem"), "{e}");
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
        // A unix socket's path is the file's, as its other paths are (not the working directory's).
        write("label = \"unix:label.sock\"\nabs = \"unix:/run/abs.sock\"\n");
        let c = AgentConfig::from_file(&file).unwrap();
        assert_eq!(c.services["label"], Target::Unix(dir.path().join("label.sock")));
        assert_eq!(c.services["abs"], Target::Unix("/run/abs.sock".into()));
        write("pos = { target = \"127.0.0.1:9100\", max_sessions = 1 }\nlabel = \"127.0.0.1:9101\"\n");
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
}
