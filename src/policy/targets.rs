//! An allow-list of backend targets, for token sources whose tokens name a target themselves (a
//! JWT's `host` and `port` claims, websockify's JWTTokenApi): whoever can mint a token can then
//! reach only what the operator wrote here, never any address.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// One entry: addresses (a range, or one host name written exactly) and a port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRule {
    hosts: Hosts,
    ports: RangeInclusive<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hosts {
    Net(IpNet),
    /// A host name, lowercase, without a trailing dot. Matched as written, never resolved here:
    /// a name that resolves to an address in a range is not thereby allowed (DNS can change).
    Name(String),
}

impl std::str::FromStr for TargetRule {
    type Err = String;

    /// `10.0.0.0/8:5900-5999`, `[fd00::/8]:5900`, `192.0.2.7:*`, `vnc.internal:5901`.
    fn from_str(s: &str) -> Result<TargetRule, String> {
        let bad = |why: &str| {
            format!("invalid target rule {s:?}: {why} (e.g. \"10.0.0.0/8:5900-5999\", \"[fd00::/8]:5900\", \"vnc.internal:5901\")")
        };
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("no ']'"))?;
            (h, after.strip_prefix(':').ok_or_else(|| bad("no port"))?)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            if h.contains(':') {
                return Err(bad("an IPv6 range goes in brackets"));
            }
            (h, p)
        };
        let ports = match ports {
            "*" => 1..=u16::MAX,
            p => {
                let (a, b) = p.split_once('-').unwrap_or((p, p));
                let a: u16 = a.parse().ok().filter(|a| *a != 0).ok_or_else(|| bad("ports are 1-65535"))?;
                let b: u16 = b.parse().ok().filter(|b| *b >= a).ok_or_else(|| bad("a port range is LOW-HIGH"))?;
                a..=b
            }
        };
        let hosts = match crate::policy::parse_net(host) {
            Ok(net) => Hosts::Net(net),
            Err(_) if !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') => {
                Hosts::Name(host.trim_end_matches('.').to_ascii_lowercase())
            }
            Err(_) => return Err(bad("the host is not an address, a range or a name")),
        };
        Ok(TargetRule { hosts, ports })
    }
}

impl fmt::Display for TargetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.hosts {
            Hosts::Net(n) if n.addr().is_ipv6() => write!(f, "[{n}]")?,
            Hosts::Net(n) => write!(f, "{n}")?,
            Hosts::Name(name) => f.write_str(name)?,
        }
        match (*self.ports.start(), *self.ports.end()) {
            (1, u16::MAX) => f.write_str(":*"),
            (a, b) if a == b => write!(f, ":{a}"),
            (a, b) => write!(f, ":{a}-{b}"),
        }
    }
}

/// Whether `host:port` (a token's claim) is on the allow-list.
pub fn allowed(rules: &[TargetRule], host: &str, port: u16) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    rules.iter().any(|r| {
        r.ports.contains(&port)
            && match (&r.hosts, ip) {
                (Hosts::Net(n), Some(ip)) => n.contains(&ip),
                (Hosts::Name(n), None) => *n == name,
                _ => false,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[&str]) -> Vec<TargetRule> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }

    #[test]
    fn ranges_names_and_ports() {
        let r = rules(&["10.0.0.0/8:5900-5999", "[fd00::/8]:5900", "vnc.internal:5901", "192.0.2.7:*"]);
        for (h, p) in [
            ("10.1.2.3", 5900),
            ("10.1.2.3", 5999),
            ("fd12::1", 5900),
            ("[fd12::1]", 5900),
            ("VNC.internal.", 5901),
            ("192.0.2.7", 22),
        ] {
            assert!(allowed(&r, h, p), "{h}:{p}");
        }
        for (h, p) in [
            ("10.1.2.3", 6000),
            ("11.0.0.1", 5900),
            ("fd12::1", 5901),
            ("vnc.internal", 5900),
            ("evil.vnc.internal", 5901),
            ("127.0.0.1", 5900),
            ("::ffff:127.0.0.1", 5900),
        ] {
            assert!(!allowed(&r, h, p), "{h}:{p}");
        }
        // A mapped IPv4 address counts as the IPv4 address.
        assert!(allowed(&r, "::ffff:10.0.0.1", 5900));
        for s in ["10.0.0.0/8:5900-5999", "[fd00::/8]:5900", "vnc.internal:5901", "192.0.2.7/32:*"] {
            assert_eq!(s.parse::<TargetRule>().unwrap().to_string(), s);
        }
        for bad in [
            "10.0.0.0/8",
            "10.0.0.0/8:0",
            "10.0.0.0/8:6000-5900",
            "fd00::/8:5900",
            "bad host:1",
            ":1",
        ] {
            assert!(bad.parse::<TargetRule>().is_err(), "{bad}");
        }
    }
}
