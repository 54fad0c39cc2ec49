//! Access policy: which requests may open a session, decided before the upgrade and before any
//! backend is touched.
//!
//! - [`OriginPolicy`]: the `Origin` header against an allow-list (exact origins, wildcard
//!   subdomains, `same-origin`, `any`), the defence against cross-site WebSocket hijacking: a
//!   page on another site opening a session with the user's network position.
//! - [`Networks`]: `allow` / `deny` CIDR lists on the client's address.
//! - [`PerAddress`]: sessions per client address and new sessions per second per address (a
//!   token bucket), O(1) per handshake and bounded memory whatever the number of addresses.
//! - [`client_address`]: the real client address behind trusted proxies (`X-Forwarded-For`,
//!   `Forwarded`), honoured only when the connection comes from a trusted range.
//!
//! Every check answers a [`Refusal`]: the status the client gets, a body that says only what a
//! client may know, and the detail that goes to the log line.

pub mod auth;
mod forwarded;
pub mod jwt;
mod limits;
mod origin;
pub mod reread;
pub mod targets;

use std::net::IpAddr;

use http::StatusCode;
use ipnet::IpNet;

pub use forwarded::{client_address, ForwardedHeader};
pub use limits::{address_key, AddressLimits, AddressSlot, InFlight, Lookups, PerAddress, Staged, TOO_MANY_CONNECTIONS, TOO_MANY_SESSIONS};
pub use origin::{check_origin, split_authority, Origin, OriginPolicy, OriginRule};

/// Why a request may not open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status answered (403, 429, 503).
    pub status: StatusCode,
    /// The answer's body: what a client may know.
    pub public: &'static str,
    /// What the log line says (never a secret).
    pub detail: String,
    /// Seconds for `Retry-After`, where a later try can succeed.
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub(crate) fn forbidden(public: &'static str, detail: String) -> Refusal {
        Refusal {
            status: StatusCode::FORBIDDEN,
            public,
            detail,
            retry_after: None,
        }
    }
}

/// `allow` / `deny` address ranges. Deny wins; a non-empty allow list admits only its ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks {
    /// Only these ranges, when not empty.
    pub allow: Vec<IpNet>,
    /// Never these.
    pub deny: Vec<IpNet>,
}

impl Networks {
    /// Whether no rule is set.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Checks a client address (IPv4-mapped IPv6 addresses count as the IPv4 address).
    ///
    /// # Errors
    /// A 403 [`Refusal`] naming the address in its detail.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::forbidden("forbidden", format!("client {ip} is in a denied network")));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::forbidden("forbidden", format!("client {ip} is not in an allowed network")));
        }
        Ok(())
    }
}

/// Parses a CIDR range or a single address (`10.0.0.0/8`, `::1`, `192.0.2.7`). IPv4-mapped IPv6
/// (`::ffff:192.0.2.7`, `::ffff:10.0.0.0/104`, as dual-stack servers log IPv4 clients) is the
/// IPv4 network it maps: addresses are checked as IPv4 ([`IpAddr::to_canonical`]), so as written
/// such a rule would never match (a `deny` of it let the client in; a review).
///
/// # Errors
/// What is wrong with it.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n.trunc(),
        Err(_) => s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("invalid network {s:?}: expected an address or a CIDR range such as 10.0.0.0/8 or fd00::/8"))?,
    };
    Ok(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, |n| IpNet::V4(n.trunc())),
            None => net,
        },
        _ => net,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_deny_wins_and_allow_narrows() {
        let n = Networks {
            allow: vec![parse_net("10.0.0.0/8").unwrap(), parse_net("fd00::/8").unwrap()],
            deny: vec![parse_net("10.9.0.0/16").unwrap()],
        };
        assert!(n.check("10.1.2.3".parse().unwrap()).is_ok());
        assert!(n.check("::ffff:10.1.2.3".parse().unwrap()).is_ok(), "mapped IPv4");
        assert!(n.check("fd12::1".parse().unwrap()).is_ok());
        assert!(n.check("10.9.1.1".parse().unwrap()).is_err());
        assert!(n.check("192.0.2.1".parse().unwrap()).is_err());
        assert!(Networks::default().check("192.0.2.1".parse().unwrap()).is_ok());
        assert!(parse_net("10.0.0.1/33").is_err());
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        // IPv4-mapped rules are the IPv4 networks they map (clients are checked as IPv4).
        for (rule, net) in [
            ("::ffff:127.0.0.1", "127.0.0.1/32"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::ffff:10.1.2.3/112", "10.1.0.0/16"),
        ] {
            assert_eq!(parse_net(rule).unwrap().to_string(), net, "{rule}");
        }
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        let n = Networks {
            allow: Vec::new(),
            deny: vec![parse_net("::ffff:127.0.0.1").unwrap()],
        };
        assert!(n.check("127.0.0.1".parse().unwrap()).is_err(), "a mapped deny rule denies");
        assert!(n.check("::ffff:127.0.0.1".parse().unwrap()).is_err());
    }
}
