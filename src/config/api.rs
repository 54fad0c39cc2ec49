//! A token source behind an HTTP API as the configuration states it: `[[tokens]]` with an `api`
//! table in TOML, or websockify's `--token-plugin JSONTokenApi --token-source URL` (or
//! `BaseTokenAPI`, plain-text answers) on the command line. The client itself (connections, the
//! deadline, the size cap) is [`crate::tokens::api`].
//!
//! The URL is websockify's: the token goes where `%s` stands, percent-encoded. It must be in the
//! path or the query, never in the host: a token picks an answer, not the server that gives it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::policy::targets::TargetRule;

/// How long a lookup may take unless the configuration says otherwise: longer than Redis's
/// default, since an API is an application that runs a query per lookup, and a lookup may have to
/// open a connection (and a TLS session) first. A handshake waits at most this long before it is
/// answered 503 when the API is down or hung.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// What the API answers: websockify's JSONTokenApi or its BaseTokenAPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApiFormat {
    /// `{"host": "HOST", "port": PORT}` (a number or a string), as JSONTokenApi reads it.
    #[default]
    Json,
    /// `HOST:PORT` as plain text, as BaseTokenAPI reads it.
    Text,
}

impl fmt::Display for ApiFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApiFormat::Json => "json",
            ApiFormat::Text => "text",
        })
    }
}

/// `http://HOST[:PORT]/PATH?QUERY` or `https://…`, with one `%s` in the path or the query where
/// the token goes; checked while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// The URL as written, `%s` and all: the source's name in logs (it holds no token).
    pub template: String,
    /// `https://`.
    pub tls: bool,
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port (80 or 443 unless the URL says).
    pub port: u16,
    /// The `Host` header: the authority as written.
    pub authority: String,
    /// The path and query before `%s`, and after it.
    before: String,
    after: String,
}

/// Characters a token keeps as they are in the URL: letters, digits and `-._~`, as Python's
/// `quote(token, safe='')` (websockify's) keeps them; every other byte is percent-encoded, so
/// `&`, `/`, `?`, `#`, `%` and spaces in a token cannot change the URL's shape.
const TOKEN_KEEPS: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl ApiUrl {
    /// The request target for `token`: the path and query with the token, percent-encoded, in
    /// place of `%s`.
    pub fn path_and_query(&self, token: &str) -> String {
        let token = percent_encoding::utf8_percent_encode(token, TOKEN_KEEPS);
        format!("{}{token}{}", self.before, self.after)
    }

    /// The URL with its query's values left out (`…`) but for `%s`: see [`ApiTokenSource::name`].
    pub fn shown(&self) -> String {
        redact_query(&self.template)
    }
}

/// A URL as written with its query's values, and a fragment, left out (`…`) but for `%s`: how
/// a source's URL shows anywhere but `wsbridge check`, its parse errors included.
fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((_, "%s")) => pair.to_owned(),
            Some((key, _)) => format!("{key}=…"),
            None if pair == "%s" || pair.is_empty() => pair.to_owned(),
            None => "…".to_owned(),
        })
        .collect();
    let mut out = format!("{base}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(if f.contains("%s") { f } else { "…" });
    }
    out
}

impl fmt::Display for ApiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl std::str::FromStr for ApiUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<ApiUrl, String> {
        // Errors show the URL as everywhere else: its query values may be an API key (a review
        // found one in a failed reload's error).
        let shown = redact_query(s);
        let form = "expected http://HOST[:PORT]/PATH?…%s… or https://…, with %s where the token goes";
        let (tls, rest) = match (s.strip_prefix("http://"), s.strip_prefix("https://")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => return Err(format!("{shown:?} is not an http:// or https:// URL: {form}")),
        };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err("a user or password does not go in the URL: the API must answer the bridge without them".into());
        }
        if authority.contains('%') {
            return Err(format!(
                "{shown:?}: %s goes in the path or the query, never in the host (a token must not choose the server asked)"
            ));
        }
        if path.contains('#') {
            return Err(format!("{shown:?}: a fragment is never sent; {form}"));
        }
        let Some(at) = path.find("%s") else {
            return Err(format!("{shown:?} has no %s: {form}"));
        };
        if path[at + 2..].contains("%s") {
            return Err(format!("{shown:?} has %s more than once: the token goes in one place"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| format!("{shown:?}: no ']'"))?;
                if host.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(format!("{shown:?}: [{host}] is not an IPv6 address"));
                }
                match after {
                    "" => (host, None),
                    a => (
                        host,
                        Some(a.strip_prefix(':').ok_or_else(|| format!("{shown:?}: expected :PORT after ]"))?),
                    ),
                }
            }
            None => match authority.rsplit_once(':') {
                // `http://::1:8080/` could be [::1]:8080 or [::1:8080] (and `http://::1/` read as
                // [::]:1): said, as the agent's proxy URL does (a review).
                Some((h, _)) if h.contains(':') => {
                    return Err(format!("{shown:?}: an IPv6 address goes in brackets, as http://[::1]:8080/…"))
                }
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        check_host(host).map_err(|e| format!("{shown:?}: {e}"))?;
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{shown:?}: the port must be 1-65535"))?,
        };
        // A query right after the host has the root as its path.
        let path = match path.starts_with('/') {
            true => path.to_owned(),
            false => format!("/{path}"),
        };
        let at = path.find("%s").unwrap_or_default();
        let url = ApiUrl {
            template: s.to_owned(),
            tls,
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            before: path[..at].to_owned(),
            after: path[at + 2..].to_owned(),
        };
        // The rest of the URL must be a request target as it stands (no spaces, no control
        // characters): checked once here, with a token that needs no encoding.
        url.path_and_query("token")
            .parse::<http::uri::PathAndQuery>()
            .map_err(|e| format!("{shown:?}: {e}"))?;
        Ok(url)
    }
}

impl<'de> Deserialize<'de> for ApiUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A host to connect to: an IP address, or a DNS name (letters, digits, `-`, `.`, `_`).
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no host".into());
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
        false => Err(format!("invalid host {host:?}")),
    }
}

/// A validated token source behind an HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiTokenSource {
    /// Where to ask.
    pub url: ApiUrl,
    /// What the answers look like.
    pub format: ApiFormat,
    /// PEM file of the certificate authorities the API's certificate must chain to (https://
    /// only; default: the system's roots). A file of one certificate is also taken as the API's
    /// own, as for backends.
    pub ca: Option<PathBuf>,
    /// The most a lookup may take, connecting and reading the answer included; past it the
    /// handshake gets 503.
    pub lookup_timeout: Duration,
    /// The only targets an answer may name; `None`: any (`allow_any_target = true`, or
    /// `--token-allow-any-target`).
    pub allow_targets: Option<Vec<TargetRule>>,
}

impl ApiTokenSource {
    /// A source with the defaults for everything but the URL and the format (and an empty
    /// allow-list, for the caller to fill).
    pub fn new(url: ApiUrl, format: ApiFormat) -> ApiTokenSource {
        ApiTokenSource {
            url,
            format,
            ca: None,
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            allow_targets: Some(Vec::new()),
        }
    }

    /// The source's name in logs, route names, `/sessions` and metrics: the URL with `%s` where
    /// tokens go (never a token), and every other query value left out (`?apikey=…&token=%s`): a
    /// key the API takes in its query is its credential, and those are read by far more people
    /// than the configuration file (an admin review found one in every session's route label).
    pub fn name(&self) -> String {
        self.url.shown()
    }

    /// For `wsbridge check`: every setting in the configuration's words, the URL's query values
    /// left out as in the logs (check's output is pasted into tickets and chats).
    pub fn describe(&self) -> String {
        let mut out = format!("url = {}, format = \"{}\"", super::toml_str(&self.url.shown()), self.format);
        if let Some(ca) = &self.ca {
            out.push_str(&format!(", ca = {}", super::toml_str(&ca.display().to_string())));
        }
        out.push_str(&format!(", lookup_timeout = \"{}\", ", super::format_duration(self.lookup_timeout)));
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

/// `api = { … }` in a `[[tokens]]` table (or `[tokens.api]` after it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    /// Parsed after the table is read, not while: the TOML parser's own errors quote the line,
    /// which would show an API key in the URL's query (a review found it in a failed reload).
    url: String,
    #[serde(default)]
    format: ApiFormat,
    ca: Option<PathBuf>,
    lookup_timeout: Option<super::redis::LookupTimeout>,
}

impl RawApi {
    /// The validated source; `allow_targets` is the table's. Errors are (field under `api`,
    /// message).
    pub(super) fn resolve(
        self,
        allow_targets: Option<Vec<TargetRule>>,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<ApiTokenSource, (String, String)> {
        let url: ApiUrl = self.url.parse().map_err(|e| ("url".to_owned(), e))?;
        let ca = self.ca.map(|c| resolve(&c));
        if let Some(ca) = &ca {
            if !url.tls {
                return Err(("ca".into(), "a CA file is for TLS: use an https:// URL".into()));
            }
            std::fs::metadata(ca).map_err(|e| ("ca".to_owned(), format!("{}: {e}", ca.display())))?;
        }
        Ok(ApiTokenSource {
            url,
            format: self.format,
            ca,
            lookup_timeout: self.lookup_timeout.map_or(DEFAULT_LOOKUP_TIMEOUT, |t| t.0),
            allow_targets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query values other than `%s` are left out of the name a source shows.
    #[test]
    fn a_urls_parse_errors_leave_its_query_values_out() {
        let e = "http://127.0.0.1:0/lookup?apikey=S3CRET&token=%s".parse::<ApiUrl>().unwrap_err();
        assert!(e.contains("apikey=…") && !e.contains("S3CRET"), "{e}");
    }

    #[test]
    fn a_urls_query_values_are_left_out_of_its_name() {
        let shown = |u: &str| u.parse::<ApiUrl>().unwrap().shown();
        assert_eq!(
            shown("http://h:1/lookup?apikey=S3CRET&token=%s"),
            "http://h:1/lookup?apikey=…&token=%s"
        );
        assert_eq!(shown("http://h/desks/%s?key=S3CRET"), "http://h/desks/%s?key=…");
        assert_eq!(shown("http://h/lookup?token=%s"), "http://h/lookup?token=%s");
        assert_eq!(shown("http://h/p?S3CRET&t=%s"), "http://h/p?…&t=%s");
        assert_eq!(shown("http://h/t/%s"), "http://h/t/%s");
    }

    #[test]
    fn urls_put_the_token_where_websockify_puts_it() {
        let u: ApiUrl = "http://api.internal/lookup?token=%s".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls, u.authority.as_str()),
            ("api.internal", 80, false, "api.internal")
        );
        assert_eq!(u.path_and_query("desk1"), "/lookup?token=desk1");
        // Python's quote(token, safe=''): only letters, digits and -._~ stay.
        assert_eq!(
            u.path_and_query("a&b=c/d e?f#g%h+i~j.k_l-m"),
            "/lookup?token=a%26b%3Dc%2Fd%20e%3Ff%23g%25h%2Bi~j.k_l-m"
        );
        assert_eq!(u.path_and_query("é"), "/lookup?token=%C3%A9");
        let u: ApiUrl = "https://[::1]:8443/desks/%s/target".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls, u.authority.as_str()),
            ("::1", 8443, true, "[::1]:8443")
        );
        assert_eq!(u.path_and_query("x/y"), "/desks/x%2Fy/target");
        let u: ApiUrl = "https://h?t=%s".parse().unwrap();
        assert_eq!((u.port, u.path_and_query("x").as_str()), (443, "/?t=x"));
        for bare in ["http://::1:8080/t?token=%s", "http://::1/t?token=%s"] {
            let e = bare.parse::<ApiUrl>().unwrap_err();
            assert!(e.contains("goes in brackets"), "{bare}: {e}");
        }
    }

    fn toml(tokens: &str, dir: &Path) -> Result<crate::config::Config, String> {
        let text = format!("[[listen]]\naddr = \"127.0.0.1:1\"\n\n[[tokens]]\n{tokens}");
        crate::config::Config::from_toml(&text, &dir.join("w.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn an_api_table_in_toml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api-ca.pem"), "").unwrap();
        let c = toml(
            "allow_targets = [\"10.0.0.0/8:5900-5999\"]\nlookup = \"host\"\n[tokens.api]\n\
             url = \"https://api.internal:8443/desks/%s\"\nformat = \"text\"\nca = \"api-ca.pem\"\nlookup_timeout = \"250ms\"\n",
            dir.path(),
        )
        .unwrap();
        let s = &c.token_sources[0];
        let a = s.api.as_ref().unwrap();
        assert_eq!((a.url.host.as_str(), a.url.port, a.url.tls), ("api.internal", 8443, true));
        assert_eq!((a.format, a.lookup_timeout), (ApiFormat::Text, Duration::from_millis(250)));
        assert_eq!(a.ca.as_deref(), Some(dir.path().join("api-ca.pem").as_path()));
        assert_eq!(a.allow_targets.as_ref().unwrap()[0].to_string(), "10.0.0.0/8:5900-5999");
        assert_eq!(s.lookup, crate::config::TokenLookup::Host);
        assert_eq!(s.path, Path::new("https://api.internal:8443/desks/%s"));
        assert!(s.redis.is_none() && s.jwt.is_none());
        // Defaults: JSON, 1 s; the inline form; opting out of the allow-list.
        let c = toml(
            "allow_any_target = true\napi = { url = \"http://h/?key=S3CRET&t=%s\" }\n",
            dir.path(),
        )
        .unwrap();
        let a = c.token_sources[0].api.as_ref().unwrap();
        assert_eq!(
            (a.format, a.lookup_timeout, a.allow_targets.is_none()),
            (ApiFormat::Json, DEFAULT_LOOKUP_TIMEOUT, true)
        );
        assert_eq!(
            a.describe(),
            "url = \"http://h/?key=…&t=%s\", format = \"json\", lookup_timeout = \"1s\", allow_any_target = true"
        );
    }

    #[test]
    fn api_mistakes_name_the_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let allow = "allow_targets = [\"10.0.0.0/8:1\"]\n";
        for (tokens, want) in [
            (
                "api = { url = \"http://h/%s\" }\n".to_owned(),
                "w.toml:4: tokens[0].allow_targets: an API token source needs allow_targets",
            ),
            (
                format!("{allow}allow_any_target = true\napi = {{ url = \"http://h/%s\" }}\n"),
                "w.toml:6: tokens[0].allow_any_target: give allow_targets or",
            ),
            (
                format!("{allow}api = {{ url = \"ftp://h/%s\" }}\n"),
                "w.toml:6: tokens[0].api.url: ",
            ),
            (
                format!("{allow}api = {{ url = \"ftp://h/%s\" }}\n"),
                "not an http:// or https:// URL",
            ),
            (format!("{allow}api = {{ url = \"http://h/lookup\" }}\n"), "has no %s"),
            (format!("{allow}api = {{ url = \"http://%s/x\" }}\n"), "never in the host"),
            (
                format!("{allow}api = {{ url = \"http://h/%s\", ca = \"ca.pem\" }}\n"),
                "w.toml:6: tokens[0].api.ca: a CA file is for TLS",
            ),
            (
                format!("{allow}api = {{ url = \"https://h/%s\", ca = \"nope.pem\" }}\n"),
                "w.toml:6: tokens[0].api.ca:",
            ),
            (
                format!("{allow}api = {{ url = \"http://h/%s\", lookup_timeout = \"11s\" }}\n"),
                "at most 10s",
            ),
            (format!("{allow}api = {{ url = \"http://h/%s\", format = \"xml\" }}\n"), "json"),
            (
                format!("{allow}api = {{ url = \"http://h/%s\", headers = [] }}\n"),
                "unknown field `headers`",
            ),
            (
                format!("{allow}format = \"lines\"\napi = {{ url = \"http://h/%s\" }}\n"),
                "w.toml:6: tokens[0].format: is for `source` token files only",
            ),
            (
                format!("{allow}api = {{ url = \"http://h/%s\" }}\nredis = {{ url = \"redis://h\" }}\n"),
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
        // The same URL and lookup twice.
        let twice = format!("{allow}api = {{ url = \"http://h/%s\" }}\n[[tokens]]\n{allow}api = {{ url = \"http://h/%s\" }}\n");
        let e = toml(&twice, dir.path()).unwrap_err();
        assert!(e.contains("tokens[1].api: http://h/%s is already a token source"), "{e}");
    }

    #[test]
    fn url_mistakes_say_what_is_wrong() {
        for (bad, says) in [
            ("ftp://h/%s", "not an http:// or https:// URL"),
            ("api.internal/%s", "not an http:// or https:// URL"),
            ("http://h/lookup", "has no %s"),
            ("http://h", "has no %s"),
            ("http://%s.example/x", "never in the host"),
            ("http://h:%s/x", "never in the host"),
            ("http://u:p@h/%s", "user or password"),
            ("http://h/%s#frag", "fragment"),
            ("http://h/%s/%s", "more than once"),
            ("http://h:0/%s", "1-65535"),
            ("http://h:x/%s", "1-65535"),
            ("http:///%s", "no host"),
            ("http://h h/%s", "invalid host"),
            ("http://[::1/%s", "no ']'"),
            ("http://[zz]/%s", "not an IPv6 address"),
            ("http://h/a b/%s", "\"http://h/a b/%s\""),
        ] {
            let e = bad.parse::<ApiUrl>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
