//! Agent mode: both ends of the reverse direction, for a socket app on a computer the server
//! cannot connect to (behind NAT or a firewall).
//!
//! ```text
//! browser --ws/wss--> wsbridge server --(links the agent dialled)--> wsbridge agent --tcp/unix--> app
//! ```
//!
//! The agent dials out to the server's agent endpoint (its own route kind, `[[agent_endpoint]]`):
//! one control link (a WebSocket, JSON messages, pings both ways) and, ahead of need, a warm pool
//! of data links (`Upgrade: wsbridge-agent-link`). A browser session on a route whose target is
//! `{ agent = "…", service = "…" }` takes an idle link, writes `open <service>`, and on `ok` the
//! link is the session's backend stream: the forward relay runs unchanged, with the kernel's flow
//! control per session. The session's bytes go in chunks ([`chunks`]), each direction ended by a
//! mark instead of a FIN, so a link the session left clean goes back to the pool for the next one;
//! the server asks with `want` when its idle links run low. (A link to or from a version without
//! chunks is raw and carries one session; such an agent dials a new idle link for each one it is
//! sent `open` on.) A server that starts to drain sends `move`: the agent connects again,
//! elsewhere through the balancer, and lets the old control link go once connected.
//!
//! | file | owns |
//! |---|---|
//! | [`link`] | what both sides share: headers, secret hashes, the `open`/`ok`/`err` lines, [`link::AgentLink`] |
//! | [`chunks`] | the framing of a reusable link: a length before each write, the end mark (or the reset mark of an app that reset its connection) |
//! | [`registry`] | server side: connected agents, their idle links, `want`/`drain`/`move`, per-agent loss |
//! | [`fleet`] | server side: agents and secret hashes from files (`[[agents]] source`), re-read on change |
//! | [`endpoint`] | server side: the agent endpoint's handshake (auth, failure brake) and control loop |
//! | [`client`] | `wsbridge agent`: configuration, dialling, proxy, TLS, reconnect, serving services |
//! | [`system_proxy`] | the agent's proxy from the system's settings (Windows): proxy and bypass lists, which setting wins, when to read them again |
//! | `winhttp` | Windows only: reading those settings from WinHTTP (the crate's only `unsafe`) |

pub mod chunks;
pub mod client;
pub mod endpoint;
pub mod fleet;
pub mod link;
pub mod registry;
pub mod system_proxy;
#[cfg(windows)]
mod winhttp;

use std::time::Duration;

use crate::backend::{Backend, ConnectError};
use crate::config::Target;
use crate::tls::BackendTls;

pub use registry::Registry;

/// Idle data links the server asks each agent to keep open, unless the endpoint says otherwise.
pub const DEFAULT_POOL: usize = 4;

/// Agents and agent endpoints declared in a server's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentsConfig {
    /// `[[agent]]`: who may connect, and the SHA-256 of each one's secret.
    pub declared: Vec<AgentDecl>,
    /// `[[agent_endpoint]]`: the paths agents dial.
    pub endpoints: Vec<EndpointConfig>,
    /// `[[agents]]`: files or directories of `NAME: SHA256HEX` lines, re-read on change.
    pub sources: Vec<std::path::PathBuf>,
}

impl AgentsConfig {
    /// For `wsbridge check`: one line per endpoint and per declared agent (never its hash).
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for e in &self.endpoints {
            let _ = writeln!(out, "agent endpoint path = {:?}, pool = {}", e.path, e.pool);
        }
        for a in &self.declared {
            let _ = match a.secret_sha256.len() {
                1 => writeln!(out, "agent {:<34} secret_sha256 set", a.name),
                n => writeln!(out, "agent {:<34} secret_sha256 set ({n} hashes: a rotation)", a.name),
            };
        }
        for s in &self.sources {
            let _ = writeln!(out, "agents source {}", s.display());
        }
        out
    }
}

/// The agents a configuration declares, inline and in fleet files, as lookups see them.
#[derive(Debug, Default)]
pub struct Declared {
    inline: std::collections::HashMap<String, Vec<[u8; 32]>>,
    fleet: Vec<std::sync::Arc<fleet::FleetSource>>,
}

impl Declared {
    /// Reads the fleet files now (a file that has become unreadable since validation is logged
    /// and left out).
    pub fn from_config(agents: &AgentsConfig) -> Declared {
        let fleet = agents
            .sources
            .iter()
            .filter_map(|p| match fleet::FleetSource::load(p) {
                Ok(s) => Some(std::sync::Arc::new(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "agents source not read");
                    None
                }
            })
            .collect();
        Declared {
            inline: agents.declared.iter().map(|d| (d.name.clone(), d.secret_sha256.clone())).collect(),
            fleet,
        }
    }

    /// The SHA-256s of the secrets `name` may log in with (two while a secret is rotated), if
    /// `name` is declared: inline, else in the first fleet source that lists it.
    pub async fn secret_sha256(&self, name: &str) -> Option<Vec<[u8; 32]>> {
        self.lookup(name).await.hashes
    }

    /// [`Declared::secret_sha256`], with where the answer comes from.
    pub async fn lookup(&self, name: &str) -> Lookup {
        if let Some(d) = self.inline.get(name) {
            return Lookup {
                hashes: Some(d.clone()),
                inline: true,
                generations: Vec::new(),
            };
        }
        let mut generations = Vec::with_capacity(self.fleet.len());
        for source in &self.fleet {
            let (hashes, generation) = source.get(name).await;
            generations.push(generation);
            if hashes.is_some() {
                return Lookup {
                    hashes,
                    inline: false,
                    generations,
                };
            }
        }
        Lookup {
            hashes: None,
            inline: false,
            generations,
        }
    }

    /// Whether the configuration file lets a connection of `name` that logged in with `digest`
    /// stay: it declares the name with that secret, or does not declare it while fleet files
    /// (`fleet`: some are configured) may, which [`registry::Registry::recheck`] then judges.
    pub fn config_allows(&self, name: &str, digest: &[u8; 32], fleet: bool) -> bool {
        match self.inline.get(name) {
            Some(digests) => digests.contains(digest),
            None => fleet,
        }
    }
}

/// What the declarations say of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The secrets' hashes it may log in with, if it is declared.
    pub hashes: Option<Vec<[u8; 32]>>,
    /// The answer comes from the configuration file (read whole), not from a fleet file that
    /// may have been caught half written.
    pub inline: bool,
    /// The generation of each fleet source looked at (see [`fleet::FleetSource::get`]).
    pub generations: Vec<u64>,
}

/// One `[[agent]]`.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentDecl {
    /// Its name (`X-Wsbridge-Agent`, and routes' `target = { agent = … }`).
    pub name: String,
    /// SHA-256 of its secret (reading the configuration does not reveal the secret); while a
    /// secret is rotated, the new one's and the old one's, either of which logs in.
    pub secret_sha256: Vec<[u8; 32]>,
}

impl std::fmt::Debug for AgentDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentDecl").field("name", &self.name).finish_non_exhaustive()
    }
}

/// One `[[agent_endpoint]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The exact path agents dial (`/agent`); no browser route may use it.
    pub path: String,
    /// Idle data links kept per agent.
    pub pool: usize,
}

/// `[[agent]]` as the file writes it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgentDecl {
    pub(crate) name: String,
    /// One hash, or a list of them (a rotation).
    pub(crate) secret_sha256: toml::Value,
}

/// Secrets an agent may have at once (a rotation needs two).
pub const MAX_SECRETS: usize = 4;

/// `[[agents]]` as the file writes it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    pub(crate) source: std::path::PathBuf,
}

/// `[[agent_endpoint]]` as the file writes it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEndpoint {
    pub(crate) path: String,
    pub(crate) pool: Option<usize>,
}

/// An invalid value: its span in the file, its field, what is wrong.
pub(crate) type Invalid = (std::ops::Range<usize>, String, String);

/// Validates `[[agent]]` and `[[agent_endpoint]]` tables.
pub(crate) fn validate(
    agents: Vec<toml::Spanned<RawAgentDecl>>,
    endpoints: Vec<toml::Spanned<RawEndpoint>>,
    fleets: Vec<toml::Spanned<RawFleet>>,
    resolve: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
) -> Result<AgentsConfig, Invalid> {
    let mut out = AgentsConfig::default();
    for (i, f) in fleets.into_iter().enumerate() {
        let span = f.span();
        let path = resolve(&f.into_inner().source);
        fleet::FleetSource::load(&path).map_err(|e| (span, format!("agents[{i}].source"), e))?;
        out.sources.push(path);
    }
    for (i, a) in agents.into_iter().enumerate() {
        let span = a.span();
        let a = a.into_inner();
        if !link::valid_name(&a.name) {
            return Err((
                span,
                format!("agent[{i}].name"),
                format!("{:?}: use 1-64 of A-Z a-z 0-9 . _ -", a.name),
            ));
        }
        if out.declared.iter().any(|d| d.name == a.name) {
            return Err((span, format!("agent[{i}].name"), format!("agent {} is declared twice", a.name)));
        }
        let field = format!("agent[{i}].secret_sha256");
        let hex = |v: &toml::Value| v.as_str().and_then(link::parse_sha256);
        let bad = "must be the SHA-256 of the secret as 64 hex digits (`wsbridge agent --new-secret` prints one)";
        let secret_sha256: Vec<[u8; 32]> = match &a.secret_sha256 {
            toml::Value::Array(list) => {
                if list.is_empty() || list.len() > MAX_SECRETS {
                    return Err((
                        span,
                        field,
                        format!("a list of 1 to {MAX_SECRETS} hashes (two while a secret is rotated)"),
                    ));
                }
                let mut hashes = Vec::new();
                for (j, v) in list.iter().enumerate() {
                    let h = hex(v).ok_or_else(|| (span.clone(), format!("{field}[{j}]"), bad.to_owned()))?;
                    if hashes.contains(&h) {
                        return Err((span, format!("{field}[{j}]"), "is listed twice".into()));
                    }
                    hashes.push(h);
                }
                hashes
            }
            v => vec![hex(v).ok_or_else(|| (span.clone(), field.clone(), bad.to_owned()))?],
        };
        out.declared.push(AgentDecl {
            name: a.name,
            secret_sha256,
        });
    }
    for (i, e) in endpoints.into_iter().enumerate() {
        let span = e.span();
        let e = e.into_inner();
        if !e.path.starts_with('/') || e.path.contains('?') {
            return Err((
                span,
                format!("agent_endpoint[{i}].path"),
                format!("{:?} must start with '/' and have no query", e.path),
            ));
        }
        if let Some(why) = crate::config::unreachable_path(&e.path) {
            return Err((span, format!("agent_endpoint[{i}].path"), why));
        }
        if out.endpoints.iter().any(|o| o.path == e.path) {
            return Err((span, format!("agent_endpoint[{i}].path"), format!("{} is listed twice", e.path)));
        }
        let pool = e.pool.unwrap_or(DEFAULT_POOL);
        if !(1..=256).contains(&pool) {
            return Err((span, format!("agent_endpoint[{i}].pool"), "must be 1-256".into()));
        }
        out.endpoints.push(EndpointConfig { path: e.path, pool });
    }
    Ok(out)
}

/// A `[[route]]` as [`check_routes`] sees it: its span, its path (with its span), its target,
/// whether it has `backend_tls`.
pub(crate) type RouteView<'a> = (std::ops::Range<usize>, Option<(std::ops::Range<usize>, &'a str)>, &'a Target, bool);

/// Checks the routes against agent mode: an agent target names a declared agent and has no
/// `backend_tls`; no route takes an agent endpoint's path.
pub(crate) fn check_routes<'a>(agents: &AgentsConfig, routes: impl Iterator<Item = RouteView<'a>>) -> Result<(), Invalid> {
    for (i, (span, path, target, backend_tls)) in routes.enumerate() {
        if let Target::Agent { agent, service } = target {
            let placeholders = [agent, service].iter().filter(|s| s.starts_with('{')).count();
            let template = path.as_ref().and_then(|(_, p)| template_prefix(p, target));
            if placeholders > 0 && template.is_none() {
                return Err((
                    span,
                    format!("route[{i}].target"),
                    "a fleet route is path = \"/PREFIX/{agent}/{service}\" with target = { agent = \"{agent}\", service = \"{service}\" }"
                        .into(),
                ));
            }
            if template.is_some() && agents.endpoints.is_empty() {
                return Err((
                    span,
                    format!("route[{i}].target"),
                    "an agent target needs an [[agent_endpoint]] for agents to dial".into(),
                ));
            }
        }
        if path.as_ref().and_then(|(_, p)| template_prefix(p, target)).is_none() {
            check_target(agents, target).map_err(|m| (span.clone(), format!("route[{i}].target"), m))?;
        }
        if let Some((pspan, p)) = path.filter(|(_, p)| agents.endpoints.iter().any(|e| e.path == *p)) {
            return Err((pspan, format!("route[{i}].path"), format!("{p} is an [[agent_endpoint]]")));
        }
        if matches!(target, Target::Agent { .. }) && backend_tls {
            return Err((span, format!("route[{i}].backend_tls"), "TLS is for TCP targets, not agents".into()));
        }
    }
    Ok(())
}

/// Checks a route's agent target against the declarations: an undeclared agent is an error.
fn check_target(agents: &AgentsConfig, target: &Target) -> Result<(), String> {
    let Target::Agent { agent, service } = target else { return Ok(()) };
    // An agent from a fleet file may come and go with the file: the route stands either way.
    if agents.sources.is_empty() && !agents.declared.iter().any(|d| &d.name == agent) {
        return Err(format!("agent {agent:?} is not declared in an [[agent]] table"));
    }
    if agents.endpoints.is_empty() {
        return Err("an agent target needs an [[agent_endpoint]] for agents to dial".into());
    }
    if !link::valid_name(service) {
        return Err(format!("service {service:?}: use 1-64 of A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// Connects a session's backend: over an agent's link for an agent target (telling the agent
/// the session's id), directly otherwise.
///
/// # Errors
/// [`ConnectError`]; for an agent target [`ConnectError::Agent`] with the text a page shows.
pub async fn connect(
    target: &Target,
    deadline: Duration,
    tls: Option<&BackendTls>,
    proxy_header: Option<&[u8]>,
    (registry, session): (&Registry, u64),
) -> Result<Backend, ConnectError> {
    match target {
        Target::Agent { agent, service } => registry.open_session(agent, service, deadline, Some(session)).await,
        _ => Backend::connect(target, deadline, tls, proxy_header).await,
    }
}

/// In a fleet route's target, the agent named by the request's path.
pub const AGENT_PLACEHOLDER: &str = "{agent}";
/// In a fleet route's target, the service named by the request's path.
pub const SERVICE_PLACEHOLDER: &str = "{service}";

/// For a fleet route (path `…/{agent}/{service}`, target `{ agent = "{agent}", service =
/// "{service}" }`), the path's prefix before the two segments, ending with `/`.
pub fn template_prefix<'a>(path: &'a str, target: &Target) -> Option<&'a str> {
    let Target::Agent { agent, service } = target else { return None };
    if agent != AGENT_PLACEHOLDER || service != SERVICE_PLACEHOLDER {
        return None;
    }
    path.strip_suffix("{agent}/{service}").filter(|p| p.ends_with('/'))
}

/// The agent and service a request path names under a fleet route's `prefix`: two valid names
/// and nothing more.
pub fn fill_template(prefix: &str, path: &str) -> Option<(String, String)> {
    let (agent, service) = path.strip_prefix(prefix)?.split_once('/')?;
    (link::valid_name(agent) && link::valid_name(service)).then(|| (agent.to_owned(), service.to_owned()))
}

/// `{ agent = "…", service = "…" }` as a route's target.
pub(crate) fn target_from_table(t: toml::Table) -> Result<Target, String> {
    let field = |k: &str| match t.get(k) {
        Some(toml::Value::String(s)) if link::valid_name(s) => Ok(s.clone()),
        Some(toml::Value::String(s)) if s == AGENT_PLACEHOLDER || s == SERVICE_PLACEHOLDER => Ok(s.clone()),
        Some(_) => Err(format!("target.{k}: a name of 1-64 of A-Z a-z 0-9 . _ -")),
        None => Err(format!(
            "target: `{k}` is missing (an agent target is {{ agent = \"NAME\", service = \"NAME\" }})"
        )),
    };
    if let Some(k) = t.keys().find(|k| !matches!(k.as_str(), "agent" | "service")) {
        return Err(format!("target: unknown key `{k}` (an agent target has `agent` and `service`)"));
    }
    Ok(Target::Agent {
        agent: field("agent")?,
        service: field("service")?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use std::path::Path;

    const HASH: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const OTHER: &str = "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let text = format!("[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[agent_endpoint]]\npath = \"/agent\"\n\n{extra}");
        Config::from_toml(&text, Path::new("agents.toml"))
    }

    #[test]
    fn agents_endpoints_and_agent_targets_parse() {
        let c = parse(&format!(
            "[[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"{HASH}\"\n\n[[route]]\npath = \"/pos\"\ntarget = {{ agent = \"shop-17\", service = \"pos\" }}\n"
        ))
        .unwrap();
        assert_eq!(c.agents.declared[0].name, "shop-17");
        assert_eq!(c.agents.endpoints[0].path, "/agent");
        assert_eq!(c.agents.endpoints[0].pool, super::DEFAULT_POOL);
        assert_eq!(
            c.routes[0].target,
            crate::config::Target::Agent {
                agent: "shop-17".into(),
                service: "pos".into()
            }
        );
        assert_eq!(c.routes[0].target.to_string(), "agent shop-17 service pos");
        assert!(!format!("{:?}", c.agents).contains("ba78"), "the hash stays out of Debug");
    }

    #[test]
    fn fleet_routes_take_the_agent_and_service_from_the_path() {
        let c =
            parse("[[route]]\npath = \"/agents/{agent}/{service}\"\ntarget = { agent = \"{agent}\", service = \"{service}\" }\n").unwrap();
        let prefix = super::template_prefix("/agents/{agent}/{service}", &c.routes[0].target);
        assert_eq!(prefix, Some("/agents/"));
        assert_eq!(
            super::fill_template("/agents/", "/agents/shop-17/pos"),
            Some(("shop-17".into(), "pos".into()))
        );
        for bad in [
            "/agents/shop-17",
            "/agents/shop-17/pos/x",
            "/agents//pos",
            "/agents/a b/pos",
            "/other/a/b",
        ] {
            assert_eq!(super::fill_template("/agents/", bad), None, "{bad}");
        }
        let half = parse("[[route]]\npath = \"/agents/{agent}\"\ntarget = { agent = \"{agent}\", service = \"pos\" }\n").unwrap_err();
        assert!(half.to_string().contains("a fleet route is path ="), "{half}");
    }

    #[test]
    fn a_fleet_source_resolves_against_the_file_and_its_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fleet"), format!("shop-17: {HASH}\n")).unwrap();
        let file = dir.path().join("server.toml");
        let text = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[agent_endpoint]]\npath = \"/agent\"\n[[agents]]\nsource = \"fleet\"\n[[route]]\npath = \"/pos\"\ntarget = { agent = \"shop-17\", service = \"pos\" }\n";
        let c = Config::from_toml(text, &file).unwrap();
        assert_eq!(c.agents.sources, vec![dir.path().join("fleet")]);
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // Declared in a table too: the table wins, and the operator hears that the file's line
        // for it does nothing.
        let both = format!("{text}[[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"{HASH}\"\n");
        let warnings = Config::from_toml(&both, &file).unwrap().warnings();
        assert!(
            warnings.len() == 1 && warnings[0].starts_with("agent shop-17 is declared in an [[agent]] table and in "),
            "{warnings:?}"
        );
        std::fs::write(dir.path().join("fleet"), "shop-17 ba78\n").unwrap();
        let e = Config::from_toml(text, &file).unwrap_err().to_string();
        assert!(
            e.contains("server.toml:6: agents[0].source:") && e.ends_with("fleet:1: expected NAME: SHA256HEX"),
            "{e}"
        );
    }

    #[test]
    fn agent_mistakes_name_file_line_and_field() {
        let undeclared = parse("[[route]]\npath = \"/pos\"\ntarget = { agent = \"shop-9\", service = \"pos\" }\n").unwrap_err();
        assert_eq!(
            undeclared.to_string(),
            "agents.toml:9: route[0].target: agent \"shop-9\" is not declared in an [[agent]] table"
        );
        let bad_hash =
            parse("[[agent]]\nname = \"shop-17\"\nsecret_sha256 = \"secret\"\n\n[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\n")
                .unwrap_err();
        assert!(
            bad_hash
                .to_string()
                .starts_with("agents.toml:9: agent[0].secret_sha256: must be the SHA-256"),
            "{bad_hash}"
        );
        let list = |hashes: &str| {
            parse(&format!(
                "[[agent]]\nname = \"shop-17\"\nsecret_sha256 = {hashes}\n\n[[route]]\npath = \"/a\"\ntarget = \"127.0.0.1:1\"\n"
            ))
        };
        let rotation = list(&format!("[\"{HASH}\", \"{OTHER}\"]")).unwrap();
        assert_eq!(rotation.agents.declared[0].secret_sha256.len(), 2, "a rotation: two hashes");
        assert!(rotation.agents.describe().contains("secret_sha256 set (2 hashes: a rotation)"));
        let twice = list(&format!("[\"{HASH}\", \"{HASH}\"]")).unwrap_err().to_string();
        assert!(twice.contains("agent[0].secret_sha256[1]: is listed twice"), "{twice}");
        let bad_element = list(&format!("[\"{HASH}\", \"secret\"]")).unwrap_err().to_string();
        assert!(
            bad_element.starts_with("agents.toml:9: agent[0].secret_sha256[1]: must be the SHA-256"),
            "{bad_element}"
        );
        for many in ["[]".to_owned(), format!("[{}]", vec![format!("\"{HASH}\""); 5].join(", "))] {
            let e = list(&many).unwrap_err().to_string();
            assert!(e.contains("agent[0].secret_sha256: a list of 1 to 4 hashes"), "{e}");
        }
        let unknown_key = parse("[[route]]\npath = \"/pos\"\ntarget = { agent = \"a\", host = \"x\" }\n").unwrap_err();
        assert!(unknown_key.to_string().contains("unknown key `host`"), "{unknown_key}");
        let tls = parse(&format!(
            "[[agent]]\nname = \"a\"\nsecret_sha256 = \"{HASH}\"\n\n[[route]]\npath = \"/pos\"\ntarget = {{ agent = \"a\", service = \"pos\" }}\nbackend_tls = {{}}\n"
        ))
        .unwrap_err();
        assert!(tls.to_string().contains("route[0].backend_tls"), "{tls}");
        let taken = parse("[[route]]\npath = \"/agent\"\ntarget = \"127.0.0.1:1\"\n").unwrap_err();
        assert_eq!(taken.to_string(), "agents.toml:8: route[0].path: /agent is an [[agent_endpoint]]");
    }
}
