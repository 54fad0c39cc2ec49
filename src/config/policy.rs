//! Access-policy settings as the configuration states them: per route (origins, networks,
//! authentication, caps per client address, a PROXY header to the backend), per listener (the
//! routes' default origins, PROXY protocol from a load balancer, trusted proxies) and globally
//! (caps per client address). The decisions themselves are [`crate::policy`]'s.
//!
//! Values are checked while parsing (an origin, a network, an algorithm), so the TOML parser
//! reports a bad one with its line and a caret under it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::policy::jwt::{JwtSettings, KeySource};
use crate::policy::targets::TargetRule;
use crate::policy::{AddressLimits, Networks, OriginRule};

/// A route's access policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutePolicy {
    /// Origins admitted; `None`: the listener's `origins`, else the configuration's default
    /// (same-origin in a file, any on the command line).
    pub origins: Option<Vec<OriginRule>>,
    /// Refuse requests that carry no `Origin` (non-browser clients).
    pub require_origin: bool,
    /// Client address ranges.
    pub networks: Networks,
    /// How clients authenticate, if they must.
    pub auth: Option<AuthSettings>,
    /// Sessions and new sessions per client address on this route.
    pub per_ip: AddressLimits,
    /// Send a PROXY protocol header of this version to the backend.
    pub proxy_protocol: Option<crate::proxy::Version>,
}

/// A listener's access settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListenerAccess {
    /// Default origins for the routes served here that set none.
    pub origins: Option<Vec<OriginRule>>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a load balancer;
    /// one without is refused.
    pub proxy_protocol: bool,
    /// Connections from these ranges may name the real client in `forwarded_header`; on a
    /// PROXY protocol listener, only these may send the PROXY header.
    pub trusted_proxies: Vec<IpNet>,
    /// Which header names the client: the one the proxies in front append to.
    pub forwarded_header: crate::policy::ForwardedHeader,
    /// Who may fetch the listener's static files (`web`); `None`: anyone.
    pub web_auth: Option<WebAuth>,
}

/// What a request for a static file must pass (`web_auth` and `web_client_cn` of a listener,
/// websockify's `--web-auth`): checked on every request, as an upgrade's route checks its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebAuth {
    /// Credentials, as a route's `auth` asks them (a missing or wrong Basic password: 401 with
    /// `WWW-Authenticate`, so a browser prompts).
    pub auth: Option<AuthSettings>,
    /// Only clients whose TLS certificate's subject CN is in this list (403 otherwise).
    pub client_cn: Option<Vec<String>>,
}

impl WebAuth {
    /// For `wsbridge check`: the listener's `web_auth` and `web_client_cn` as the file writes
    /// them (no secret).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = &self.auth {
            parts.push(format!("web_auth = {}", a.describe()));
        }
        if let Some(names) = &self.client_cn {
            let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
            parts.push(format!("web_client_cn = [{}]", list.join(", ")));
        }
        parts.join(", ")
    }
}

/// How a route authenticates.
#[derive(Clone, PartialEq)]
pub enum AuthSettings {
    /// One of these bearer tokens.
    Bearer(Vec<String>),
    /// One of the bearer tokens in this file (one per line).
    BearerFile(PathBuf),
    /// HTTP Basic against this htpasswd file (bcrypt hashes).
    Htpasswd(PathBuf),
    /// HTTP Basic with one `user:password` (websockify's BasicHTTPAuth).
    BasicUser(String),
    /// A JWT.
    Jwt(JwtSettings),
}

impl fmt::Debug for AuthSettings {
    /// Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl AuthSettings {
    /// The authenticator these settings describe, with its files read.
    ///
    /// # Errors
    /// A file that cannot be read or holds nothing usable, named with its problem.
    pub fn authenticator(&self) -> Result<crate::policy::auth::Authenticator, String> {
        use crate::policy::auth::{Authenticator, BasicUsers, BearerTokens};
        Ok(match self {
            AuthSettings::Bearer(tokens) => Authenticator::Bearer(BearerTokens::inline(tokens)?),
            AuthSettings::BearerFile(path) => Authenticator::Bearer(BearerTokens::watched(path)?),
            AuthSettings::Htpasswd(path) => Authenticator::Basic(BasicUsers::watched(path)?),
            AuthSettings::BasicUser(user_pass) => Authenticator::Basic(BasicUsers::inline(user_pass)?),
            AuthSettings::Jwt(jwt) => Authenticator::Jwt(crate::policy::jwt::JwtVerifier::new(jwt.clone())?),
        })
    }

    /// For `wsbridge check` and logs: the kind and file, never a secret.
    pub fn describe(&self) -> String {
        match self {
            AuthSettings::Bearer(t) => format!("{{ bearer = <{}> }}", crate::config::plural(t.len(), "token")),
            AuthSettings::BearerFile(p) => format!("{{ bearer_file = {:?} }}", p.display().to_string()),
            AuthSettings::Htpasswd(p) => format!("{{ htpasswd = {:?} }}", p.display().to_string()),
            AuthSettings::BasicUser(u) => format!("{{ basic user {:?} }}", u.split(':').next().unwrap_or("")),
            AuthSettings::Jwt(j) => {
                let (kind, p) = match &j.keys {
                    KeySource::Pem(p) => ("public_key", p),
                    KeySource::Jwks(p) => ("jwks", p),
                    KeySource::Secret(p) => ("secret_file", p),
                };
                let algs: Vec<String> = j.algorithms.iter().map(|a| format!("{a:?}")).collect();
                format!(
                    "{{ jwt = {{ {kind} = {:?}, algorithms = {algs:?}, issuer = {:?}, audience = {:?}, leeway = \"{}\", require_exp = {} }} }}",
                    p.display().to_string(),
                    j.issuers,
                    j.audiences,
                    super::format_duration(j.leeway),
                    j.require_exp
                )
            }
        }
    }
}

impl RoutePolicy {
    /// The settings that differ from the defaults, as `key = value` pairs for `wsbridge check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(o) = &self.origins {
            let list: Vec<String> = o.iter().map(|r| format!("{:?}", r.to_string())).collect();
            parts.push(format!("origins = [{}]", list.join(", ")));
        }
        if self.require_origin {
            parts.push("require_origin = true".into());
        }
        let nets = |n: &[IpNet]| n.iter().map(|n| format!("{:?}", n.to_string())).collect::<Vec<_>>().join(", ");
        if !self.networks.allow.is_empty() {
            parts.push(format!("allow = [{}]", nets(&self.networks.allow)));
        }
        if !self.networks.deny.is_empty() {
            parts.push(format!("deny = [{}]", nets(&self.networks.deny)));
        }
        if let Some(a) = &self.auth {
            parts.push(format!("auth = {}", a.describe()));
        }
        parts.extend(describe_per_ip(&self.per_ip));
        if let Some(v) = self.proxy_protocol {
            parts.push(format!("proxy_protocol = \"{v}\""));
        }
        parts.join(", ")
    }
}

/// `max_sessions_per_ip`, `new_sessions_per_ip` and `new_sessions_burst` where set.
pub fn describe_per_ip(l: &AddressLimits) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(n) = l.max_sessions {
        parts.push(format!("max_sessions_per_ip = {n}"));
    }
    if let Some(r) = l.rate {
        parts.push(format!("new_sessions_per_ip = {r}, new_sessions_burst = {}", l.burst));
    }
    parts
}

/// An origin rule in a file: checked while parsing.
#[derive(Debug, Clone)]
pub(super) struct RuleDe(pub OriginRule);

impl<'de> Deserialize<'de> for RuleDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map(RuleDe).map_err(de::Error::custom)
    }
}

/// A network in a file: an address or a CIDR range.
#[derive(Debug, Clone)]
pub(super) struct NetDe(pub IpNet);

impl<'de> Deserialize<'de> for NetDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::policy::parse_net(&String::deserialize(d)?)
            .map(NetDe)
            .map_err(de::Error::custom)
    }
}

/// New sessions per second: a positive number.
#[derive(Debug, Clone, Copy)]
pub(super) struct RateDe(pub f64);

impl<'de> Deserialize<'de> for RateDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = match super::NumOrString::deserialize(d)? {
            super::NumOrString::Int(i) => i as f64,
            super::NumOrString::Float(f) => f,
            super::NumOrString::S(s) if s.trim().parse::<f64>().is_ok() => {
                return Err(de::Error::custom(format!("{s:?} is a string: write the number without quotes")))
            }
            super::NumOrString::S(_) => f64::NAN,
        };
        if !(r.is_finite() && r > 0.0 && r <= 1e6) {
            return Err(de::Error::custom("must be a positive number of new sessions per second"));
        }
        Ok(RateDe(r))
    }
}

/// A JWT algorithm name.
#[derive(Debug, Clone, Copy)]
pub(super) struct AlgDe(pub jsonwebtoken::Algorithm);

impl<'de> Deserialize<'de> for AlgDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(AlgDe)
            .map_err(|_| de::Error::custom(format!("unknown JWT algorithm {s:?} (HS256, RS256, ES256, EdDSA, …)")))
    }
}

/// The policy fields a `[[route]]` or `[[tokens]]` table may have (both list them: serde's
/// `flatten` cannot be combined with `deny_unknown_fields`).
#[derive(Debug, Default)]
pub(super) struct RawPolicy {
    pub origins: Option<Vec<RuleDe>>,
    pub require_origin: Option<bool>,
    pub allow: Option<Vec<NetDe>>,
    pub deny: Option<Vec<NetDe>>,
    pub max_sessions_per_ip: Option<u32>,
    pub new_sessions_per_ip: Option<RateDe>,
    pub new_sessions_burst: Option<u32>,
    pub auth: Option<RawAuth>,
    pub proxy_protocol: Option<crate::proxy::Version>,
}

/// `auth = { … }`: exactly one of its kinds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    bearer: Option<Vec<String>>,
    bearer_file: Option<PathBuf>,
    htpasswd: Option<PathBuf>,
    jwt: Option<RawJwt>,
}

/// `auth = { jwt = { … } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    public_key: Option<PathBuf>,
    jwks: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    algorithms: Option<Vec<AlgDe>>,
    issuer: Option<Vec<String>>,
    audience: Option<Vec<String>>,
    leeway: Option<super::Dur>,
    require_exp: Option<bool>,
}

/// The default clock skew allowed on a JWT's `exp` and `nbf`.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);

impl RawPolicy {
    /// The validated policy; `resolve` makes file names absolute. Errors name the field
    /// (relative to the table) and what is wrong.
    pub fn resolve(self, resolve: &dyn Fn(&std::path::Path) -> PathBuf) -> Result<RoutePolicy, (String, String)> {
        let auth = match self.auth {
            None => None,
            Some(a) => Some(a.resolve(resolve)?),
        };
        let per_ip = per_ip(self.max_sessions_per_ip, self.new_sessions_per_ip, self.new_sessions_burst)?;
        Ok(RoutePolicy {
            origins: self.origins.map(|o| o.into_iter().map(|r| r.0).collect()),
            require_origin: self.require_origin.unwrap_or(false),
            networks: Networks {
                allow: self.allow.unwrap_or_default().into_iter().map(|n| n.0).collect(),
                deny: self.deny.unwrap_or_default().into_iter().map(|n| n.0).collect(),
            },
            auth,
            per_ip,
            proxy_protocol: self.proxy_protocol,
        })
    }
}

/// Limits per address from their three fields. Errors: (field, message).
pub(super) fn per_ip(max: Option<u32>, rate: Option<RateDe>, burst: Option<u32>) -> Result<AddressLimits, (String, String)> {
    if max == Some(0) {
        return Err(("max_sessions_per_ip".into(), "must be at least 1 (leave it out for no cap)".into()));
    }
    if burst.is_some() && rate.is_none() {
        return Err(("new_sessions_burst".into(), "goes with new_sessions_per_ip".into()));
    }
    if burst == Some(0) {
        return Err(("new_sessions_burst".into(), "must be at least 1".into()));
    }
    let rate = rate.map(|r| r.0);
    Ok(AddressLimits {
        max_sessions: max,
        rate,
        // A second's worth by default, at least one.
        burst: burst.unwrap_or_else(|| rate.map_or(1, |r| r.ceil().max(1.0) as u32)),
        connections: false,
    })
}

impl RawAuth {
    /// The validated settings; errors are (field, starting with `auth`, message).
    pub(super) fn resolve(self, resolve: &dyn Fn(&std::path::Path) -> PathBuf) -> Result<AuthSettings, (String, String)> {
        let given = [
            self.bearer.is_some(),
            self.bearer_file.is_some(),
            self.htpasswd.is_some(),
            self.jwt.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(("auth".into(), "needs exactly one of bearer, bearer_file, htpasswd or jwt".into()));
        }
        if let Some(tokens) = self.bearer {
            if tokens.is_empty() || tokens.iter().any(|t| t.trim().is_empty()) {
                return Err(("auth.bearer".into(), "needs one or more tokens, none empty".into()));
            }
            return Ok(AuthSettings::Bearer(tokens));
        }
        if let Some(p) = self.bearer_file {
            let p = resolve(&p);
            super::readable(&p).map_err(|m| ("auth.bearer_file".to_owned(), m))?;
            return Ok(AuthSettings::BearerFile(p));
        }
        if let Some(p) = self.htpasswd {
            let p = resolve(&p);
            super::readable(&p).map_err(|m| ("auth.htpasswd".to_owned(), m))?;
            return Ok(AuthSettings::Htpasswd(p));
        }
        let Some(j) = self.jwt else { unreachable!("counted above") };
        j.resolve(resolve).map(AuthSettings::Jwt).map_err(|(f, m)| (format!("auth.{f}"), m))
    }
}

impl RawJwt {
    /// The JWT settings; errors are (field under `jwt`, message).
    pub(super) fn resolve(self, resolve: &dyn Fn(&std::path::Path) -> PathBuf) -> Result<JwtSettings, (String, String)> {
        let j = self;
        let (keys, field, path) = match (j.public_key, j.jwks, j.secret_file) {
            (Some(p), None, None) => (KeySource::Pem(resolve(&p)), "public_key", resolve(&p)),
            (None, Some(p), None) => (KeySource::Jwks(resolve(&p)), "jwks", resolve(&p)),
            (None, None, Some(p)) => (KeySource::Secret(resolve(&p)), "secret_file", resolve(&p)),
            _ => return Err(("jwt".into(), "needs exactly one of public_key, jwks or secret_file".into())),
        };
        super::readable(&path).map_err(|m| (format!("jwt.{field}"), m))?;
        Ok(JwtSettings {
            keys,
            algorithms: j.algorithms.unwrap_or_default().into_iter().map(|a| a.0).collect(),
            issuers: j.issuer.unwrap_or_default(),
            audiences: j.audience.unwrap_or_default(),
            leeway: j.leeway.map_or(DEFAULT_JWT_LEEWAY, |d| d.0),
            require_exp: j.require_exp.unwrap_or(true),
        })
    }
}

/// A token source whose tokens are JWTs naming their target (`host`, `port` claims), as
/// websockify's JWTTokenApi: verified with `jwt`, and the target must be on `allow_targets`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtTokenSource {
    /// How the tokens are verified.
    pub jwt: JwtSettings,
    /// The only targets a token may name.
    pub allow_targets: Vec<TargetRule>,
}

/// A target rule in a file: checked while parsing.
#[derive(Debug, Clone)]
pub(super) struct TargetRuleDe(pub TargetRule);

impl<'de> Deserialize<'de> for TargetRuleDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map(TargetRuleDe).map_err(de::Error::custom)
    }
}
