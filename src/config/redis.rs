//! A token source in Redis as the configuration states it: `[[tokens]]` with a `redis` table in
//! TOML, or websockify's `--token-plugin TokenRedis --token-source
//! host[:port[:db[:password[:namespace]]]]` on the command line. The source itself (the client,
//! the deadline, the cache) is [`crate::tokens::redis`].
//!
//! Credentials never stand in the configuration text: a file holds them (`credentials_file`), a
//! URL with a user or password in it is refused, and `Debug` prints only whether there are any.
//! (websockify's command-line form has the password in it; it is accepted, for compatibility, and
//! the README says where it shows.)

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::policy::targets::TargetRule;

/// How long a lookup may take unless the configuration says otherwise: a Redis on the same
/// network answers in well under a millisecond, and a handshake waits at most this long before
/// it is answered 503 when Redis is down or hung.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);
/// The longest `lookup_timeout` accepted: a handshake must never hang on Redis.
pub const MAX_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `cache_ttl` accepted: a deleted token keeps routing for up to this long.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(60);
/// How many answers a cache holds unless the configuration says otherwise.
pub const DEFAULT_CACHE_SIZE: usize = 10_000;
/// The port Redis listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 6379;

/// A Redis server: where it is, TLS or not, and which database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisServer {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `rediss://`: TLS to Redis, the certificate checked against `ca` or the system's roots.
    pub tls: bool,
    /// PEM file of the certificate authorities Redis's certificate must chain to (TLS only).
    pub ca: Option<PathBuf>,
    /// The database number (`SELECT`).
    pub db: u32,
}

impl fmt::Display for RedisServer {
    /// As a URL: `redis://host:port/db` or `rediss://…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]:{}/{}", self.host, self.port, self.db),
            false => write!(f, "{scheme}://{}:{}/{}", self.host, self.port, self.db),
        }
    }
}

/// A user name (Redis 6 ACL users; none: the `default` user) and a password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisCredentials {
    /// The ACL user, when not `default`.
    pub username: Option<String>,
    /// The password (`AUTH`).
    pub password: String,
}

impl fmt::Debug for RedisCredentials {
    /// Never prints the password (nor the user name: it is half of a credential).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCredentials")
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password", &"<redacted>")
            .finish()
    }
}

impl RedisCredentials {
    /// Reads a credentials file: the password alone on one line, or the user name on the first
    /// line and the password on the second. Line ends (`\n`, `\r\n`) are not part of them; blank
    /// lines at the end are ignored.
    ///
    /// # Errors
    /// The file cannot be read, is empty, or has more than two lines.
    pub fn from_file(path: &Path) -> Result<RedisCredentials, String> {
        let text = crate::platform::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
        RedisCredentials::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<RedisCredentials, String> {
        let mut lines: Vec<&str> = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
        while lines.last().is_some_and(|l| l.trim().is_empty()) {
            lines.pop();
        }
        let nonempty = |s: &str, what: &str| match s.is_empty() {
            true => Err(format!("the {what} is empty")),
            false => Ok(s.to_owned()),
        };
        match lines.as_slice() {
            [] => Err("empty: expected the password, or a user name and a password on two lines".into()),
            [password] => Ok(RedisCredentials {
                username: None,
                password: nonempty(password, "password")?,
            }),
            [user, password] => Ok(RedisCredentials {
                username: Some(nonempty(user, "user name")?),
                password: nonempty(password, "password")?,
            }),
            _ => Err(format!(
                "{} lines: expected the password alone, or a user name and a password on two lines",
                lines.len()
            )),
        }
    }
}

/// A validated Redis token source.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisTokenSource {
    /// The server.
    pub server: RedisServer,
    /// How to authenticate, when Redis asks.
    pub credentials: Option<RedisCredentials>,
    /// The file `credentials` came from (`credentials_file`): read again when it has changed,
    /// before each new connection, so a rotated password is used without a reload.
    pub credentials_file: Option<PathBuf>,
    /// Put before every token to make its key (websockify's namespace plus `:`).
    pub key_prefix: String,
    /// The most a lookup may take, connecting included; past it the handshake gets 503.
    pub lookup_timeout: Duration,
    /// How long an answer naming a target is reused without asking Redis again (zero: never).
    /// Answers that a token is absent are never cached: a token written a moment ago is usable
    /// at once.
    pub cache_ttl: Duration,
    /// The most answers the cache holds.
    pub cache_size: usize,
    /// The only targets a value may name; `None`: any (`allow_any_target = true`, or websockify's
    /// command line with `--token-allow-any-target`).
    pub allow_targets: Option<Vec<TargetRule>>,
}

impl RedisTokenSource {
    /// A source with the defaults for everything but the server.
    pub fn new(server: RedisServer) -> RedisTokenSource {
        RedisTokenSource {
            server,
            credentials: None,
            credentials_file: None,
            key_prefix: String::new(),
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            cache_ttl: Duration::ZERO,
            cache_size: DEFAULT_CACHE_SIZE,
            allow_targets: Some(Vec::new()),
        }
    }

    /// The source's name in logs, route names and metrics: the server's URL, and the key prefix
    /// when there is one. Never a credential.
    pub fn name(&self) -> String {
        match self.key_prefix.is_empty() {
            true => self.server.to_string(),
            false => format!("{} keys {}*", self.server, self.key_prefix),
        }
    }

    /// For `wsbridge check`: every setting in the configuration's words, credentials as set or not.
    pub fn describe(&self) -> String {
        let mut out = format!("url = {}", super::toml_str(&self.server.to_string()));
        if let Some(ca) = &self.server.ca {
            out.push_str(&format!(", ca = {}", super::toml_str(&ca.display().to_string())));
        }
        let credentials = match &self.credentials {
            None => "none",
            Some(c) if c.username.is_some() => "user and password",
            Some(_) => "password",
        };
        out.push_str(&format!(
            ", credentials: {credentials}, key_prefix = {}, lookup_timeout = \"{}\", cache_ttl = \"{}\", cache_size = {}, ",
            super::toml_str(&self.key_prefix),
            super::format_duration(self.lookup_timeout),
            super::format_duration(self.cache_ttl),
            self.cache_size
        ));
        match &self.allow_targets {
            None => out.push_str("allow_any_target = true"),
            Some(rules) => {
                let rules: Vec<String> = rules.iter().map(|r| super::toml_str(&r.to_string())).collect();
                out.push_str(&format!("allow_targets = [{}]", rules.join(", ")));
            }
        }
        out
    }
}

/// Splits websockify's `--token-source` for TokenRedis at `:`, as its `parse_source_args` does: a
/// field that starts with `"` and has its closing `"` right before a `:` or the end is taken
/// without the quotes and may hold `:` (`host::::"ns1:ns2"`); any other field runs to the next
/// `:`, quotes and all.
pub fn split_source_args(src: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut rest = src;
    loop {
        let quoted = rest.strip_prefix('"').and_then(|inner| {
            let close = inner.find('"')?;
            let after = &inner[close + 1..];
            (close > 0 && (after.is_empty() || after.starts_with(':'))).then(|| (&inner[..close], after))
        });
        let (field, after) = match quoted {
            Some(q) => q,
            None => rest.split_at(rest.find(':').unwrap_or(rest.len())),
        };
        fields.push(field.to_owned());
        match after.strip_prefix(':') {
            Some(next) => rest = next,
            None => return fields,
        }
    }
}

/// websockify's TokenRedis source, `host[:port[:db[:password[:namespace]]]]`: an empty field takes
/// its default (port 6379, database 0, no password, no namespace); a namespace `ns` makes keys
/// `ns:TOKEN`. The allow-list is the caller's to fill (it is not part of this string).
///
/// # Errors
/// The message names the field that is wrong and the expected form.
pub fn parse_websockify_source(src: &str) -> Result<RedisTokenSource, String> {
    let form = "expected host[:port[:db[:password[:namespace]]]], e.g. redis.internal:6379:0::wsbridge";
    // An IPv6 address in brackets (not in websockify, which splits it at its colons).
    let (v6, rest) = match src.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((v6, rest)) if rest.is_empty() || rest.starts_with(':') => (Some(v6), rest),
        _ => (None, src),
    };
    let mut fields = split_source_args(rest);
    if let Some(v6) = v6 {
        fields[0] = v6.to_owned();
    }
    if fields.len() > 5 {
        return Err(format!("{} fields: {form}", fields.len()));
    }
    let field = |i: usize| fields.get(i).map(String::as_str).unwrap_or("");
    let host = field(0).trim();
    check_host(host).map_err(|e| format!("{e}: {form}"))?;
    let port = match field(1) {
        "" => DEFAULT_PORT,
        p => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port (field 2) is not 1-65535: {form}"))?,
    };
    let db = match field(2) {
        "" => 0,
        // The field's text is not shown: a source written with a field missing puts the
        // password here.
        d => d
            .parse::<u32>()
            .map_err(|_| format!("database (field 3) is not a number: {form}"))?,
    };
    let credentials = match field(3) {
        "" => None,
        p => Some(RedisCredentials {
            username: None,
            password: p.to_owned(),
        }),
    };
    let key_prefix = match field(4) {
        "" => String::new(),
        ns => format!("{ns}:"),
    };
    let mut source = RedisTokenSource::new(RedisServer {
        host: host.to_owned(),
        port,
        tls: false,
        ca: None,
        db,
    });
    source.credentials = credentials;
    source.key_prefix = key_prefix;
    Ok(source)
}

/// A host name or IP address to connect to.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no Redis host".into());
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name_ok = host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    match name_ok {
        true => Ok(()),
        false => Err(format!("invalid Redis host {host:?}")),
    }
}

/// `redis://host[:port][/db]` or `rediss://…` (TLS), checked while parsing. A user or password
/// in it is refused: they go in `credentials_file`.
#[derive(Debug, Clone)]
pub(super) struct RedisUrl {
    host: String,
    port: u16,
    tls: bool,
    db: u32,
}

impl std::str::FromStr for RedisUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<RedisUrl, String> {
        let form = "expected redis://HOST[:PORT][/DB] or rediss://HOST[:PORT][/DB] (TLS)";
        let (tls, rest) = match (s.strip_prefix("redis://"), s.strip_prefix("rediss://")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => return Err(format!("invalid Redis URL {s:?}: {form}")),
        };
        if rest.contains('@') {
            return Err(
                "a user or password does not go in the URL (the configuration is not a place for secrets): put them in credentials_file"
                    .into(),
            );
        }
        if rest.contains(['?', '#']) {
            return Err(format!("invalid Redis URL {s:?}: no query or fragment is taken; {form}"));
        }
        let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
        let db = match db {
            "" => 0,
            d => d
                .parse::<u32>()
                .map_err(|_| format!("invalid Redis URL {s:?}: the database {d:?} is not a number"))?,
        };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| format!("invalid Redis URL {s:?}: no ']'"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        check_host(host).map_err(|e| format!("invalid Redis URL {s:?}: {e}"))?;
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("invalid Redis URL {s:?}: the port must be 1-65535"))?,
        };
        Ok(RedisUrl {
            host: host.to_owned(),
            port,
            tls,
            db,
        })
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A lookup timeout: more than zero, at most [`MAX_LOOKUP_TIMEOUT`].
#[derive(Debug, Clone, Copy)]
pub(super) struct LookupTimeout(pub(super) Duration);

impl<'de> Deserialize<'de> for LookupTimeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = super::Dur::deserialize(d)?.0;
        if t > MAX_LOOKUP_TIMEOUT {
            return Err(de::Error::custom(format!(
                "at most {}: a handshake must not wait on a token source longer",
                super::format_duration(MAX_LOOKUP_TIMEOUT)
            )));
        }
        Ok(LookupTimeout(t))
    }
}

/// A cache time to live: zero or `"off"` (no cache), at most [`MAX_CACHE_TTL`].
#[derive(Debug, Clone, Copy)]
pub(super) struct CacheTtl(Duration);

impl<'de> Deserialize<'de> for CacheTtl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = super::OptDur::deserialize(d)?.0.unwrap_or(Duration::ZERO);
        if t > MAX_CACHE_TTL {
            return Err(de::Error::custom(format!(
                "at most {}: a deleted token keeps routing for as long as its answer is cached",
                super::format_duration(MAX_CACHE_TTL)
            )));
        }
        Ok(CacheTtl(t))
    }
}

/// `redis = { … }` in a `[[tokens]]` table (or `[tokens.redis]` after it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    url: RedisUrl,
    ca: Option<PathBuf>,
    credentials_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    key_prefix: String,
    lookup_timeout: Option<LookupTimeout>,
    cache_ttl: Option<CacheTtl>,
    cache_size: Option<super::AtLeastOne>,
}

impl RawRedis {
    /// The validated source with its files read; `allow_targets` is the table's. Errors are
    /// (field under `redis`, message, where in the text when a field says).
    pub(super) fn resolve(
        self,
        allow_targets: Option<Vec<TargetRule>>,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<RedisTokenSource, (String, String, Option<std::ops::Range<usize>>)> {
        let ca = self.ca.map(|c| resolve(&c));
        if let Some(ca) = &ca {
            if !self.url.tls {
                return Err(("ca".into(), "a CA file is for TLS: use a rediss:// URL".into(), None));
            }
            // Read for certificates when the source is built (crate::tls reads PEM; imports point
            // from tls to config, not back): here only whether it is there.
            std::fs::metadata(ca).map_err(|e| ("ca".to_owned(), format!("{}: {e}", ca.display()), None))?;
        }
        let (credentials, credentials_file) = match self.credentials_file {
            None => (None, None),
            Some(f) => {
                let span = f.span();
                let path = resolve(f.get_ref());
                let c = RedisCredentials::from_file(&path).map_err(|e| ("credentials_file".to_owned(), e, Some(span)))?;
                (Some(c), Some(path))
            }
        };
        Ok(RedisTokenSource {
            server: RedisServer {
                host: self.url.host,
                port: self.url.port,
                tls: self.url.tls,
                ca,
                db: self.url.db,
            },
            credentials,
            credentials_file,
            key_prefix: self.key_prefix,
            lookup_timeout: self.lookup_timeout.map_or(DEFAULT_LOOKUP_TIMEOUT, |t| t.0),
            cache_ttl: self.cache_ttl.map_or(Duration::ZERO, |t| t.0),
            cache_size: self.cache_size.map_or(DEFAULT_CACHE_SIZE, |n| n.0),
            allow_targets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_args_split_as_websockify_splits_them() {
        // websockify's own cases (tests/test_token_plugins.py, ParseSourceArgumentsTestCase).
        let cases: &[(&str, &[&str])] = &[
            ("", &[""]),
            (":", &["", ""]),
            ("::", &["", "", ""]),
            ("\"", &["\""]),
            ("\"\"", &["\"\""]),
            ("\"\"\"", &["\"\"\""]),
            ("\"localhost\"", &["localhost"]),
            ("\"localhost\":", &["localhost", ""]),
            ("\"localhost\"::", &["localhost", "", ""]),
            ("\"local:host\"", &["local:host"]),
            ("\"local:host:\"pass\"", &["\"local", "host", "pass"]),
            ("\"local\":\"host\"", &["local", "host"]),
            ("\"local\":host\"", &["local", "host\""]),
            (
                "localhost:6379:1:pass\"word:\"my-app-namespace:dev\"",
                &["localhost", "6379", "1", "pass\"word", "my-app-namespace:dev"],
            ),
        ];
        for (src, want) in cases {
            assert_eq!(split_source_args(src), *want, "{src:?}");
        }
    }

    #[test]
    fn websockify_token_sources_take_defaults_for_empty_fields() {
        let s = |src: &str| parse_websockify_source(src).unwrap();
        let check = |src: &str, port: u16, db: u32, password: Option<&str>, prefix: &str| {
            let got = s(src);
            assert_eq!(got.server.host, "127.0.0.1", "{src}");
            assert_eq!((got.server.port, got.server.db), (port, db), "{src}");
            assert_eq!(got.credentials.as_ref().map(|c| c.password.as_str()), password, "{src}");
            assert_eq!(got.key_prefix, prefix, "{src}");
            assert!(!got.server.tls);
        };
        // websockify's TokenRedisTestCase, one by one.
        check("127.0.0.1", 6379, 0, None, "");
        check("127.0.0.1:1234", 1234, 0, None, "");
        check("127.0.0.1:1234:2", 1234, 2, None, "");
        check("127.0.0.1:1234:2:verysecret", 1234, 2, Some("verysecret"), "");
        check("127.0.0.1:1234:2:verysecret:namespace", 1234, 2, Some("verysecret"), "namespace:");
        check("127.0.0.1:::verysecret", 6379, 0, Some("verysecret"), "");
        check("127.0.0.1::::", 6379, 0, None, "");
        check("127.0.0.1:::", 6379, 0, None, "");
        check("127.0.0.1::", 6379, 0, None, "");
        check("127.0.0.1:", 6379, 0, None, "");
        check("127.0.0.1::::namespace", 6379, 0, None, "namespace:");
        check("127.0.0.1::::\"ns1:ns2\"", 6379, 0, None, "ns1:ns2:");
        check("127.0.0.1::2", 6379, 2, None, "");
        check("127.0.0.1:1234::verysecret", 1234, 0, Some("verysecret"), "");
        check("127.0.0.1::2:verysecret", 6379, 2, Some("verysecret"), "");
        check("127.0.0.1::2:", 6379, 2, None, "");
        // A password with a colon, quoted.
        check("127.0.0.1:1:0:\"pa:ss\"", 1, 0, Some("pa:ss"), "");
        assert_eq!(s("[::1]:7000").server.host, "::1");
        assert_eq!(s("redis.internal").server.to_string(), "redis://redis.internal:6379/0");
        for (bad, says) in [
            ("", "no Redis host"),
            (":6379", "no Redis host"),
            ("h:port", "port (field 2) is not 1-65535"),
            ("h:0", "port (field 2) is not 1-65535"),
            ("h:1:x", "database (field 3) is not a number"),
            ("h:1:0:p:ns:extra", "6 fields"),
            ("bad host", "invalid Redis host"),
        ] {
            let e = parse_websockify_source(bad).unwrap_err();
            assert!(e.contains(says) && e.contains("host[:port[:db"), "{bad:?}: {e}");
        }
        // A field left out moves the password into the port's or the database's place: the
        // error must not show it.
        for bad in ["h:s3cret-pw", "h:1:s3cret-pw"] {
            let e = parse_websockify_source(bad).unwrap_err();
            assert!(!e.contains("s3cret"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn urls_and_their_mistakes() {
        let u = |s: &str| s.parse::<RedisUrl>();
        let ok = u("rediss://redis.internal:6380/2").unwrap();
        assert_eq!((ok.host.as_str(), ok.port, ok.tls, ok.db), ("redis.internal", 6380, true, 2));
        let ok = u("redis://[::1]").unwrap();
        assert_eq!((ok.host.as_str(), ok.port, ok.tls, ok.db), ("::1", 6379, false, 0));
        assert_eq!(u("redis://h/").unwrap().db, 0);
        for (bad, says) in [
            ("redis://user:pw@h:6379", "credentials_file"),
            ("redis://:pw@h", "credentials_file"),
            ("http://h:6379", "expected redis://"),
            ("h:6379", "expected redis://"),
            ("redis://h:0", "1-65535"),
            ("redis://h:x", "1-65535"),
            ("redis://h/x", "database"),
            ("redis://h?db=1", "no query"),
            ("redis://", "no Redis host"),
            ("redis://[::1", "no ']'"),
        ] {
            let e = u(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn credentials_files_and_their_redaction() {
        let c = RedisCredentials::parse("s3cret\n").unwrap();
        assert_eq!((c.username, c.password.as_str()), (None, "s3cret"));
        let c = RedisCredentials::parse("wsbridge\r\npa:ss word\r\n\n").unwrap();
        assert_eq!((c.username.as_deref(), c.password.as_str()), (Some("wsbridge"), "pa:ss word"));
        assert!(RedisCredentials::parse("").unwrap_err().contains("empty"));
        assert!(RedisCredentials::parse("\n\n").unwrap_err().contains("empty"));
        assert!(RedisCredentials::parse("a\nb\nc\n").unwrap_err().contains("3 lines"));
        assert!(RedisCredentials::parse("user\n\n").is_ok(), "trailing blank lines do not count");
        assert!(RedisCredentials::parse("\npw\n").unwrap_err().contains("user name"));
        let mut source = parse_websockify_source("h:1:0:hunter2:ns").unwrap();
        source.credentials.as_mut().unwrap().username = Some("alice".into());
        let shown = format!("{source:?} {}", source.describe());
        assert!(!shown.contains("hunter2") && !shown.contains("alice"), "{shown}");
        assert!(shown.contains("credentials: user and password"), "{shown}");
    }

    fn toml(tokens: &str, dir: &Path) -> Result<crate::config::Config, String> {
        let text = format!("[[listen]]\naddr = \"127.0.0.1:1\"\n\n[[tokens]]\n{tokens}");
        crate::config::Config::from_toml(&text, &dir.join("w.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_redis_table_in_toml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("redis.cred"), "wsbridge\ns3cret\n").unwrap();
        let c = toml(
            "allow_targets = [\"10.0.0.0/8:5900-5999\"]\nlookup = \"host\"\n[tokens.redis]\nurl = \"redis://10.1.2.3:7000/3\"\n\
             credentials_file = \"redis.cred\"\nkey_prefix = \"vnc:\"\nlookup_timeout = \"150ms\"\ncache_ttl = \"2s\"\ncache_size = 50\n",
            dir.path(),
        )
        .unwrap();
        let s = &c.token_sources[0];
        let r = s.redis.as_ref().unwrap();
        assert_eq!(r.server.to_string(), "redis://10.1.2.3:7000/3");
        let creds = r.credentials.as_ref().unwrap();
        assert_eq!((creds.username.as_deref(), creds.password.as_str()), (Some("wsbridge"), "s3cret"));
        assert_eq!(r.key_prefix, "vnc:");
        assert_eq!(
            (r.lookup_timeout, r.cache_ttl, r.cache_size),
            (Duration::from_millis(150), Duration::from_secs(2), 50)
        );
        assert_eq!(r.allow_targets.as_ref().unwrap()[0].to_string(), "10.0.0.0/8:5900-5999");
        assert_eq!(s.lookup, crate::config::TokenLookup::Host);
        assert_eq!(s.path, Path::new("redis://10.1.2.3:7000/3 keys vnc:*"));
        // Defaults: 300 ms, no cache; the inline form; opting out of the allow-list.
        let c = toml("allow_any_target = true\nredis = { url = \"rediss://r.example\" }\n", dir.path()).unwrap();
        let r = c.token_sources[0].redis.as_ref().unwrap();
        assert_eq!(
            (r.lookup_timeout, r.cache_ttl, r.cache_size),
            (DEFAULT_LOOKUP_TIMEOUT, Duration::ZERO, DEFAULT_CACHE_SIZE)
        );
        assert_eq!((r.server.tls, r.server.port, r.allow_targets.is_none()), (true, 6379, true));
    }

    #[test]
    fn redis_mistakes_name_the_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.cred"), "\n").unwrap();
        let allow = "allow_targets = [\"10.0.0.0/8:1\"]\n";
        for (tokens, want) in [
            (
                "redis = { url = \"redis://h\" }\n".to_owned(),
                "w.toml:4: tokens[0].allow_targets: a Redis token source needs allow_targets",
            ),
            (
                format!("{allow}allow_any_target = true\nredis = {{ url = \"redis://h\" }}\n"),
                "tokens[0].allow_any_target: give allow_targets or",
            ),
            (format!("{allow}redis = {{ url = \"redis://u:p@h\" }}\n"), "credentials_file"),
            (
                format!("{allow}redis = {{ url = \"redis://h\", ca = \"ca.pem\" }}\n"),
                "tokens[0].redis.ca: a CA file is for TLS",
            ),
            (
                format!("{allow}redis = {{ url = \"rediss://h\", ca = \"nope.pem\" }}\n"),
                "tokens[0].redis.ca:",
            ),
            (
                format!("{allow}redis = {{ url = \"redis://h\", credentials_file = \"nope\" }}\n"),
                "w.toml:6: tokens[0].redis.credentials_file:",
            ),
            (
                format!("{allow}redis = {{ url = \"redis://h\", credentials_file = \"empty.cred\" }}\n"),
                "empty.cred: empty",
            ),
            (
                format!("{allow}redis = {{ url = \"redis://h\", lookup_timeout = \"0s\" }}\n"),
                "greater than zero",
            ),
            (
                format!("{allow}redis = {{ url = \"redis://h\", lookup_timeout = \"11s\" }}\n"),
                "at most 10s",
            ),
            (
                format!("{allow}redis = {{ url = \"redis://h\", cache_ttl = \"2m\" }}\n"),
                "at most 1m",
            ),
            (format!("{allow}redis = {{ url = \"redis://h\", cache_size = 0 }}\n"), "at least 1"),
            (
                format!("{allow}redis = {{ url = \"redis://h\", password = \"x\" }}\n"),
                "unknown field `password`",
            ),
            (
                format!("{allow}source = \"t.cfg\"\nredis = {{ url = \"redis://h\" }}\n"),
                "do not go together",
            ),
            (
                "source = \"t.cfg\"\nallow_any_target = true\n".to_owned(),
                "tokens[0].allow_any_target: is for Redis and API sources only",
            ),
        ] {
            let e = toml(&tokens, dir.path()).unwrap_err();
            assert!(e.contains(want), "{tokens}: {e}");
            assert!(e.starts_with(&dir.path().join("w.toml").display().to_string()), "{e}");
        }
        // The same server, prefix and lookup twice.
        let twice = format!("{allow}redis = {{ url = \"redis://h\" }}\n[[tokens]]\n{allow}redis = {{ url = \"redis://h:6379/0\" }}\n");
        let e = toml(&twice, dir.path()).unwrap_err();
        assert!(e.contains("tokens[1].redis: redis://h:6379/0 is already a token source"), "{e}");
    }
}
