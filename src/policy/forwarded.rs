//! The real client address behind trusted proxies (`X-Forwarded-For`, `Forwarded`).

use std::net::IpAddr;

use ipnet::IpNet;

/// Which header a listener's trusted proxies name the client in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, which nginx (`$proxy_add_x_forwarded_for`), HAProxy (`option
    /// forwardfor`) and most load balancers append to.
    #[default]
    XForwardedFor,
    /// RFC 7239's `Forwarded: for=…`.
    Forwarded,
}

impl std::fmt::Display for ForwardedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        })
    }
}

/// The real client address of a request that arrived from `peer`: `peer` itself unless it is in
/// `trusted`; then the chain in `header` (only that one: a proxy that appends to one header passes
/// the other through as the client wrote it) is walked from its right end (the entry the nearest
/// proxy added) past every trusted address, and the first address that is not trusted is the
/// client. A chain that cannot be parsed, or that holds only trusted addresses, leaves the last
/// trusted hop: a client never chooses its address by sending these headers.
pub fn client_address(peer: IpAddr, headers: &http::HeaderMap, trusted: &[IpNet], header: ForwardedHeader) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    match header {
        ForwardedHeader::Forwarded => {
            let values = headers.get_all(http::header::FORWARDED).iter().filter_map(|v| v.to_str().ok());
            for element in values.flat_map(|v| v.split(',')) {
                let for_ = element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                    .map(|(_, v)| v.trim().trim_matches('"'));
                match for_.and_then(parse_node) {
                    Some(ip) => chain.push(ip),
                    // An obfuscated or unknown node ends what can be known.
                    None => chain.clear(),
                }
            }
        }
        ForwardedHeader::XForwardedFor => {
            for v in headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()) {
                for part in v.split(',') {
                    match parse_node(part.trim()) {
                        Some(ip) => chain.push(ip),
                        None => chain.clear(),
                    }
                }
            }
        }
    }
    let mut client = peer;
    for ip in chain.iter().rev() {
        client = *ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client.to_canonical()
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`,
/// `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = s.strip_prefix('[')?.split_once(']')?.0;
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_net;
    const X: ForwardedHeader = ForwardedHeader::XForwardedFor;

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let trusted = vec![parse_net("10.0.0.0/8").unwrap()];
        let headers = |name: &str, value: &str| {
            let mut h = http::HeaderMap::new();
            h.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            h
        };
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        let xff = headers("x-forwarded-for", "203.0.113.7, 10.0.0.9");
        assert_eq!(client_address(proxy, &xff, &trusted, X), "203.0.113.7".parse::<IpAddr>().unwrap());
        // From an untrusted peer the header is the client's own word: ignored.
        assert_eq!(client_address(stranger, &xff, &trusted, X), stranger);
        // A client prepending a forged entry does not get past the first untrusted hop.
        let forged = headers("x-forwarded-for", "127.0.0.1, 203.0.113.7");
        assert_eq!(
            client_address(proxy, &forged, &trusted, X),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        let fwd = headers("forwarded", "for=192.0.2.60;proto=https, for=\"[2001:db8:cafe::17]:4711\"");
        assert_eq!(
            client_address(proxy, &fwd, &trusted, ForwardedHeader::Forwarded),
            "2001:db8:cafe::17".parse::<IpAddr>().unwrap()
        );
        // Only the configured header counts: a client's own Forwarded is ignored where proxies
        // append to X-Forwarded-For, and the other way round.
        assert_eq!(client_address(proxy, &fwd, &trusted, X), proxy);
        assert_eq!(client_address(proxy, &xff, &trusted, ForwardedHeader::Forwarded), proxy);
        let junk = headers("x-forwarded-for", "not-an-address");
        assert_eq!(client_address(proxy, &junk, &trusted, X), proxy);
    }
}
