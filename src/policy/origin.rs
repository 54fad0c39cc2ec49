//! The `Origin` check: which web pages may open sessions (cross-site WebSocket hijacking).

use std::fmt;

use super::Refusal;

/// One entry of an origin allow-list, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginRule {
    /// Every origin, and requests without one.
    Any,
    /// The Origin's host and port equal the request's `Host`.
    SameOrigin,
    /// Exactly this origin (scheme, host, port; the port defaults to the scheme's).
    Exact(Origin),
    /// Any subdomain of `suffix` (at any depth, not the bare domain), with this scheme and port:
    /// `https://*.example.com`.
    Subdomains {
        /// `http` or `https`.
        scheme: String,
        /// `.example.com`, with its leading dot.
        suffix: String,
        /// The port (the scheme's default when not written).
        port: u16,
    },
    /// The `null` origin of sandboxed frames and `file:` pages, only when written.
    Null,
}

impl fmt::Display for OriginRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginRule::Any => f.write_str("any"),
            OriginRule::SameOrigin => f.write_str("same-origin"),
            OriginRule::Exact(o) => o.fmt(f),
            OriginRule::Subdomains { scheme, suffix, port } => {
                write!(f, "{scheme}://*{suffix}")?;
                if Some(*port) != default_port(scheme) {
                    write!(f, ":{port}")?;
                }
                Ok(())
            }
            OriginRule::Null => f.write_str("null"),
        }
    }
}

impl std::str::FromStr for OriginRule {
    type Err = String;

    /// Parses `any`, `same-origin`, `null`, `https://app.example.com[:port]` or
    /// `https://*.example.com[:port]`.
    fn from_str(s: &str) -> Result<OriginRule, String> {
        let s = s.trim();
        match s {
            "any" | "*" => return Ok(OriginRule::Any),
            "same-origin" => return Ok(OriginRule::SameOrigin),
            "null" => return Ok(OriginRule::Null),
            _ => {}
        }
        let bad =
            |why: &str| format!("invalid origin {s:?}: {why} (expected https://host[:port], https://*.domain, same-origin, null or any)");
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if default_port(&scheme).is_none() {
            return Err(bad("the scheme must be http or https"));
        }
        if let Some(domain) = rest.strip_prefix("*.") {
            let probe: Origin = format!("{scheme}://x.{domain}").parse().map_err(|e: String| bad(&e))?;
            let suffix = probe.host[1..].to_owned();
            if !suffix[1..].contains('.') {
                return Err(bad("a wildcard needs a domain with at least two labels, such as *.example.com"));
            }
            return Ok(OriginRule::Subdomains {
                scheme,
                suffix,
                port: probe.port,
            });
        }
        s.parse().map(OriginRule::Exact).map_err(|e: String| bad(&e))
    }
}

/// A browser origin: scheme, host (lowercase, IPv6 without brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `http` or `https` (other schemes never match a rule but `any`).
    pub scheme: String,
    /// The host, lowercase.
    pub host: String,
    /// The port, the scheme's default when the origin has none.
    pub port: u16,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{}://{host}", self.scheme)?;
        if Some(self.port) != default_port(&self.scheme) {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Origin {
    type Err = String;

    /// Parses an `Origin` header value (RFC 6454: `scheme://host[:port]`, no path).
    fn from_str(s: &str) -> Result<Origin, String> {
        let (scheme, rest) = s.trim().split_once("://").ok_or("no scheme")?;
        let scheme = scheme.to_ascii_lowercase();
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err("an origin is scheme://host[:port], without path or user".into());
        }
        let (host, port) = split_authority(rest).ok_or("malformed host or port")?;
        // Browsers serialize an origin's host as a name (IDNA: letters, digits, `-`, `.`) or an
        // address; `evil.com%2f.example.org` would otherwise pass for a subdomain of example.org.
        if host.contains(['%', '~']) {
            return Err("an origin's host is a name or an address, never percent-encoded".into());
        }
        let port = match port {
            Some(p) => p,
            None => default_port(&scheme).ok_or("no port and no default port for the scheme")?,
        };
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// `http`'s and `https`'s default ports (`ws`/`wss` likewise).
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Splits `host[:port]` or `[v6][:port]`; the host comes back without brackets. `None` when the
/// port is not a number or the host is empty.
pub fn split_authority(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            // An IPv6 literal without brackets is not a host here.
            Some((h, _)) if h.contains(':') => return None,
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:~%".contains(&b)) {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => None,
    };
    Some((host, port))
}

/// Which origins a route admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    /// The allow-list; empty admits no browser request.
    pub rules: Vec<OriginRule>,
    /// Refuse requests without an `Origin` header (non-browser clients send none).
    pub require_origin: bool,
}

impl OriginPolicy {
    /// Every origin: websockify's behaviour, and the command line's default.
    pub fn any() -> OriginPolicy {
        OriginPolicy {
            rules: vec![OriginRule::Any],
            require_origin: false,
        }
    }

    /// Same origin only: a configuration file's default.
    pub fn same_origin() -> OriginPolicy {
        OriginPolicy {
            rules: vec![OriginRule::SameOrigin],
            require_origin: false,
        }
    }

    /// Whether every origin is admitted.
    pub fn is_any(&self) -> bool {
        self.rules.contains(&OriginRule::Any)
    }

    /// Checks a request's `Origin` header (`None`: absent) against the rules: see
    /// [`check_origin`].
    ///
    /// # Errors
    /// A 403 [`Refusal`] naming the origin in its detail.
    pub fn check(&self, origin: Option<&str>, host: Option<&str>, secure: bool) -> Result<(), Refusal> {
        check_origin(&self.rules, self.require_origin, origin, host, secure)
    }
}

/// Checks a request's `Origin` header (`None`: absent) against `rules` (borrowed: a route's own,
/// or its listener's, checked per handshake without a copy). `host` is the
/// request's `Host` header and `secure` whether it came over TLS (for the Host's default
/// port in a same-origin check).
///
/// # Errors
/// A 403 [`Refusal`] naming the origin in its detail.
pub fn check_origin(
    rules: &[OriginRule],
    require_origin: bool,
    origin: Option<&str>,
    host: Option<&str>,
    secure: bool,
) -> Result<(), Refusal> {
    let Some(origin) = origin else {
        if require_origin {
            return Err(Refusal::forbidden(
                "origin required",
                "no Origin header, and the route requires one".into(),
            ));
        }
        return Ok(());
    };
    if rules.contains(&OriginRule::Any) {
        return Ok(());
    }
    // The default of a configuration file (its own origin only) surprises whoever serves the
    // page from elsewhere: the line says what to do.
    let own_only = rules.iter().all(|r| *r == OriginRule::SameOrigin);
    let refused = || {
        let detail = match own_only {
            true => format!(
                "origin {:?} is not allowed: only the bridge's own origin is, unless the route or its listener lists others in `origins` (or --origin)",
                clip(origin)
            ),
            false => format!("origin {:?} is not allowed (not in `origins`)", clip(origin)),
        };
        Refusal::forbidden("origin not allowed", detail)
    };
    if origin.trim() == "null" {
        return match rules.contains(&OriginRule::Null) {
            true => Ok(()),
            false => Err(refused()),
        };
    }
    let Ok(o) = origin.parse::<Origin>() else {
        return Err(refused());
    };
    let admitted = rules.iter().any(|rule| match rule {
        OriginRule::Any => true,
        OriginRule::Null => false,
        OriginRule::Exact(e) => *e == o,
        OriginRule::Subdomains { scheme, suffix, port } => {
            *scheme == o.scheme && *port == o.port && o.host.len() > suffix.len() && o.host.ends_with(suffix.as_str())
        }
        OriginRule::SameOrigin => host.and_then(split_authority).is_some_and(|(h, p)| {
            h.eq_ignore_ascii_case(&o.host) && p.unwrap_or(if secure { 443 } else { 80 }) == o.port && rebinding_proof(h, secure)
        }),
    });
    if admitted {
        return Ok(());
    }
    let named_itself = rules.contains(&OriginRule::SameOrigin)
        && host
            .and_then(split_authority)
            .is_some_and(|(h, _)| h.eq_ignore_ascii_case(&o.host) && !rebinding_proof(h, secure));
    if named_itself {
        return Err(Refusal::forbidden(
            "origin not allowed",
            format!(
                "origin {:?}: same-origin over plain ws:// admits only IP addresses and localhost, as a name may be DNS \
                 rebinding; list the origin in `origins` (or --origin), or serve wss://",
                clip(origin)
            ),
        ));
    }
    Err(refused())
}

/// Whether a `Host` that equals the `Origin` proves the page came from this bridge. Over TLS it
/// does: the browser checked the bridge's certificate for that name. Over plain ws:// a name
/// does not: a page on evil.example whose name an attacker re-points at the bridge's address
/// (DNS rebinding) sends `Origin: http://evil.example` and `Host: evil.example`, equal. An IP
/// literal or `localhost` cannot be re-pointed; other plain names must be listed as origins.
fn rebinding_proof(host: &str, secure: bool) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    secure || host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" || host.ends_with(".localhost")
}

/// At most 200 characters of a peer's text, for a log line.
fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn policy(rules: &[&str]) -> OriginPolicy {
        OriginPolicy {
            rules: rules.iter().map(|r| r.parse().unwrap()).collect(),
            require_origin: false,
        }
    }

    #[test]
    fn exact_and_wildcard_origins() {
        let p = policy(&["https://app.example.com", "https://*.corp.example"]);
        for ok in [
            "https://app.example.com",
            "https://APP.example.com:443",
            "https://a.corp.example",
            "https://a.b.corp.example",
        ] {
            assert!(p.check(Some(ok), None, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evil-app.example.com",
            "https://app.example.com.evil.test",
            "https://corp.example",
            "https://xcorp.example",
            "https://a.corp.example.evil",
            "null",
            "garbage",
            "https://app.example.com/path",
        ] {
            let r = p.check(Some(bad), None, false).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{bad}");
        }
        // No Origin: a non-browser client, allowed unless the route requires one.
        assert!(p.check(None, None, false).is_ok());
        let strict = OriginPolicy { require_origin: true, ..p };
        assert!(strict.check(None, None, false).is_err());
    }

    #[test]
    fn a_percent_encoded_host_is_no_subdomain() {
        let rule: OriginRule = "https://*.example.org".parse().unwrap();
        let policy = OriginPolicy {
            rules: vec![rule],
            require_origin: false,
        };
        assert!(policy.check(Some("https://app.example.org"), None, true).is_ok());
        assert!(policy.check(Some("https://evil.com%2f.example.org"), None, true).is_err());
        assert!(policy.check(Some("https://evil.com~.example.org"), None, true).is_err());
    }

    #[test]
    fn same_origin_compares_host_and_port() {
        let p = OriginPolicy::same_origin();
        assert!(p.check(Some("http://127.0.0.1:6080"), Some("127.0.0.1:6080"), false).is_ok());
        assert!(p.check(Some("http://localhost:6080"), Some("localhost:6080"), false).is_ok());
        assert!(p.check(Some("https://Bridge.Example"), Some("bridge.example"), true).is_ok());
        assert!(p.check(Some("http://[::1]:6080"), Some("[::1]:6080"), false).is_ok());
        assert!(p.check(Some("http://127.0.0.1:6081"), Some("127.0.0.1:6080"), false).is_err());
        assert!(p.check(Some("https://evil.test"), Some("bridge.example"), true).is_err());
        assert!(p.check(Some("http://127.0.0.1"), None, false).is_err());
        // The Host's port defaults by the connection's scheme.
        assert!(p.check(Some("https://bridge.example"), Some("bridge.example"), false).is_err());
        // Over plain ws:// a name proves nothing (DNS rebinding: evil.example re-pointed at the
        // bridge sends Origin and Host both evil.example): only IP literals and localhost.
        assert!(p.check(Some("http://evil.example:6080"), Some("evil.example:6080"), false).is_err());
    }

    #[test]
    fn origin_rules_parse_and_print_as_written() {
        for s in [
            "any",
            "same-origin",
            "null",
            "https://a.example",
            "http://*.example.com:8080",
            "https://[::1]:8443",
        ] {
            assert_eq!(s.parse::<OriginRule>().unwrap().to_string(), s);
        }
        for bad in [
            "ftp://a.example",
            "a.example",
            "https://*.com",
            "https://a.example/x",
            "https://a.example:0",
        ] {
            assert!(bad.parse::<OriginRule>().is_err(), "{bad}");
        }
    }
}
