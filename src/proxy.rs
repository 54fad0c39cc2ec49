//! The PROXY protocol (HAProxy's, v1 text and v2 binary): reading the header a load balancer
//! puts before a connection's first byte, and writing one before the first byte sent to a
//! backend, so that a backend behind wsbridge sees who is really connecting.
//!
//! Parsing and building are the `ppp` crate's; this module reads exactly the header's bytes off
//! the socket (nothing past it, so TLS sniffing and the HTTP head read what follows untouched)
//! and bounds what a peer can make it read.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 header's fixed signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The most address and TLV bytes accepted after a v2 header's first 16: addresses take at
/// most 216 (unix), and HAProxy's TLVs (ALPN, authority, SSL details) fit well within this.
const V2_MAX_PAYLOAD: usize = 2048;

/// Which version of the header to send to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The text header: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection did not start with a PROXY header.
    #[error("no PROXY protocol header (this listener expects one from its load balancer)")]
    Missing,
    /// It started with one that cannot be parsed.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    /// Reading failed or the connection closed first.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one PROXY header (v1 or v2) from the start of `io`, and not a byte more. Returns the
/// client's address it carries, or `None` for a header that carries none (v2 `LOCAL`, a load
/// balancer's own health check; v1 `UNKNOWN`): the connection's own peer is the client then.
/// The caller bounds the wait.
///
/// # Errors
/// [`ProxyError`] when the connection does not start with a valid header.
pub async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> Result<Option<SocketAddr>, ProxyError> {
    Ok(read_addresses(io).await?.map(|a| a.client))
}

/// What a PROXY header says: who connected, to which address of the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub client: SocketAddr,
    /// The address the client connected to (the balancer's), which a PROXY header wsbridge sends
    /// a backend passes on.
    pub destination: SocketAddr,
}

/// [`read_header`], with the destination too.
///
/// # Errors
/// As [`read_header`].
pub async fn read_addresses<S: AsyncRead + Unpin>(io: &mut S) -> Result<Option<Addresses>, ProxyError> {
    let mut buf = vec![0u8; 16];
    io.read_exact(&mut buf[..12]).await?;
    if buf[..12] == V2_SIGNATURE[..] {
        io.read_exact(&mut buf[12..16]).await?;
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyError::Malformed(format!(
                "v2 header of {len} bytes (at most {V2_MAX_PAYLOAD})"
            )));
        }
        buf.resize(16 + len, 0);
        io.read_exact(&mut buf[16..]).await?;
        let header = ppp::v2::Header::try_from(&buf[..]).map_err(|e| ProxyError::Malformed(e.to_string()))?;
        return Ok(match (header.command, header.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(Addresses {
                client: SocketAddr::from((a.source_address, a.source_port)),
                destination: SocketAddr::from((a.destination_address, a.destination_port)),
            }),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(Addresses {
                client: SocketAddr::from((a.source_address, a.source_port)),
                destination: SocketAddr::from((a.destination_address, a.destination_port)),
            }),
            (_, _) => None,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing);
    }
    // The text header ends at CRLF within 107 bytes; read it a byte at a time so that nothing
    // after it is consumed (v1 is the rare case; load balancers mostly send v2).
    buf.truncate(12);
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Malformed(format!("v1 header longer than {V1_MAX} bytes")));
        }
        buf.push(io.read_u8().await?);
    }
    let header = ppp::v1::Header::try_from(&buf[..]).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Tcp6(a) => Some(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// The header to send a backend: the connection came from `client` to `local` (wsbridge's
/// listening address as the client reached it). Addresses of different families are both sent
/// as IPv6 (IPv4-mapped), as the protocol needs one family per header.
pub fn header(version: Version, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    match version {
        Version::V1 => ppp::v1::Addresses::from((client, local)).to_string().into_bytes(),
        Version::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, local),
        )
        .build()
        // Building fails only past 64 KiB of TLVs; we add none.
        .unwrap_or_default(),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |s: SocketAddr| match s {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut io = bytes;
        let r = read_header(&mut io).await;
        (r, io.to_vec())
    }

    #[tokio::test]
    async fn both_versions_round_trip_and_leave_the_rest_unread() {
        let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let local: SocketAddr = "192.0.2.1:6080".parse().unwrap();
        for version in [Version::V1, Version::V2] {
            let mut bytes = header(version, client, local);
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (r, rest) = read(&bytes).await;
            assert_eq!(r.unwrap(), Some(client), "{version}");
            assert_eq!(rest, b"GET / HTTP/1.1\r\n", "{version}");
        }
        let mut bytes = &header(Version::V2, client, local)[..];
        let both = read_addresses(&mut bytes).await.unwrap().unwrap();
        assert_eq!((both.client, both.destination), (client, local));
        let v6: SocketAddr = "[2001:db8::7]:1234".parse().unwrap();
        let (r, _) = read(&header(Version::V2, v6, local)).await;
        assert_eq!(r.unwrap(), Some(v6), "mixed families are sent as IPv6");
        assert!(String::from_utf8(header(Version::V1, client, local))
            .unwrap()
            .starts_with("PROXY TCP4 203.0.113.7 192.0.2.1 40000 6080\r\n"));
    }

    #[tokio::test]
    async fn local_and_unknown_carry_no_address() {
        let (r, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"X");
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn junk_is_refused_without_reading_far() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.0,
            Err(ProxyError::Missing)
        ));
        assert!(matches!(
            read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00").await.0,
            Err(ProxyError::Missing)
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(read(long.as_bytes()).await.0, Err(ProxyError::Malformed(_))));
        assert!(matches!(
            read(b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n").await.0,
            Err(ProxyError::Malformed(_))
        ));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(read(&big).await.0, Err(ProxyError::Malformed(_))));
        assert!(matches!(read(b"PROXY TC").await.0, Err(ProxyError::Io(_))));
    }
}
