//! Property tests (proptest) over the code a peer's bytes reach first: the request head reader,
//! the route and policy decision, the WebSocket frame decoder and the PROXY header reader; and
//! the fuzz corpus (`fuzz/corpus/*/*`) replayed through the fuzz targets' own checks
//! (`fuzz/checks.rs`), so the corpus is test input without nightly.
//!
//! Each property is stated against a model written here (what the head, the frames, the route
//! or the origin should be), not only "does not panic". Case counts are set per block and kept
//! small enough that the whole file runs in a few seconds.

#[allow(dead_code)]
#[path = "../fuzz/checks.rs"]
mod checks;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use checks::{Completed, Decided, HeadSummary};
use http::HeaderMap;
use ipnet::{IpNet, Ipv4Net};
use proptest::prelude::*;
use wsbridge::http::request::{MAX_HEAD, MAX_HEADERS};
use wsbridge::policy::auth::Credentials;
use wsbridge::policy::{client_address, AddressLimits, ForwardedHeader, Networks, OriginPolicy, OriginRule, PerAddress};
use wsbridge::routes::RouteTable;

/// A compiled regex strategy (a `&str` strategy compiles its regex for every value).
fn re(pattern: &str) -> proptest::string::RegexGeneratorStrategy<String> {
    proptest::string::string_regex(pattern).expect("a valid regex")
}

/// Read sizes: a few, cycled (1 byte reads included).
fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1..4usize, 1..64usize, 1..5000usize], 1..6)
}

// ---------------------------------------------------------------------------------------------
// Request heads

/// A well-formed request head, as generated: the parts, and the bytes.
#[derive(Debug, Clone)]
struct GenHead {
    method: String,
    target: String,
    version: &'static str,
    headers: Vec<(String, Vec<u8>)>,
    bytes: Vec<u8>,
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    // Visible ASCII and obs-text, spaces and tabs inside; none at the ends (a parser trims them).
    let inner = prop::collection::vec(prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff, Just(b' '), Just(b'\t')], 0..30);
    prop_oneof![
        1 => Just(Vec::new()),
        6 => (0x21u8..=0x7e, inner, 0x21u8..=0x7e).prop_map(|(a, mid, z)| [vec![a], mid, vec![z]].concat()),
    ]
}

fn gen_head() -> impl Strategy<Value = GenHead> {
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("HEAD".to_owned()),
        Just("POST".to_owned()),
        re("[A-Z]{1,10}"),
        re("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,10}"),
    ];
    let target = (
        re("(/([a-zA-Z0-9._~!$&'()*+,;=:@-]|%[0-9A-F]{2}){0,8}){1,4}"),
        prop::option::of(re("([a-zA-Z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-F]{2}){0,20}")),
    )
        .prop_map(|(p, q)| match q {
            Some(q) => format!("{p}?{q}"),
            None => p,
        });
    let version = prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")];
    let header = (
        re("[a-z0-9!#$%&'*+.^_`|~-]{1,12}"),
        header_value(),
        prop_oneof![Just(": "), Just(":"), Just(":  \t")],
    );
    let eol = prop_oneof![Just("\r\n"), Just("\n")];
    let line = (header, eol.clone()).boxed();
    // Mostly a few headers; sometimes up to the most accepted (64).
    let lines = prop_oneof![6 => prop::collection::vec(line.clone(), 0..8), 1 => prop::collection::vec(line, 56..=64)];
    (method, target, version, lines, eol).prop_map(|(method, target, version, lines, end)| {
        let mut bytes = format!("{method} {target} {version}\r\n").into_bytes();
        let mut headers = Vec::new();
        for ((name, value, sep), eol) in lines {
            bytes.extend_from_slice(format!("{name}{sep}").as_bytes());
            bytes.extend_from_slice(&value);
            bytes.extend_from_slice(eol.as_bytes());
            headers.push((name, value));
        }
        bytes.extend_from_slice(end.as_bytes());
        GenHead {
            method,
            target,
            version,
            headers,
            bytes,
        }
    })
}

/// What reading a generated head must give: its parts, headers grouped by name in the order
/// of each name's first line (how a header map keeps them).
fn head_model(h: &GenHead) -> HeadSummary {
    let mut grouped: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for (name, value) in &h.headers {
        match grouped.iter_mut().find(|(n, _)| n == name) {
            Some((_, values)) => values.push(value.clone()),
            None => grouped.push((name.clone(), vec![value.clone()])),
        }
    }
    HeadSummary::Head {
        method: h.method.clone(),
        uri: h.target.clone(),
        version: h.version.to_owned(),
        headers: grouped
            .into_iter()
            .flat_map(|(n, vs)| vs.into_iter().map(move |v| (n.clone(), v)))
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A well-formed head followed by anything reads back as written (method, target, version,
    /// every header in order), whatever the read sizes; what was read past the head is exactly
    /// the start of what followed it, and nothing past MAX_HEAD (32 KiB) is read.
    #[test]
    fn well_formed_heads_read_back_as_written(
        head in gen_head(),
        after in prop::collection::vec(any::<u8>(), 0..200),
        sizes in read_sizes(),
    ) {
        let bytes = [head.bytes.clone(), after.clone()].concat();
        let want = head_model(&head);
        for sizes in [&[][..], &sizes[..]] {
            let (got, consumed, ok) = checks::read_head(&bytes, sizes);
            prop_assert_eq!(&got, &want);
            prop_assert!(consumed <= MAX_HEAD);
            let (head_len, leftover) = ok.unwrap();
            prop_assert_eq!(head_len, head.bytes.len());
            prop_assert!(after.starts_with(&leftover));
        }
    }

    /// Heads over the bounds (more than MAX_HEADERS header lines, more than MAX_HEAD before the blank
    /// line) are 431, and the reader stops at MAX_HEAD whatever follows.
    #[test]
    fn heads_over_the_bounds_are_431_without_reading_past_max_head(
        lines in (MAX_HEADERS + 1)..(MAX_HEADERS + 40),
        long in (MAX_HEAD - 20)..(MAX_HEAD + 5000),
        many in any::<bool>(),
        sizes in read_sizes(),
    ) {
        let bytes = if many {
            let mut s = "GET / HTTP/1.1\r\n".to_owned();
            for i in 0..lines {
                s.push_str(&format!("x-{i}: v\r\n"));
            }
            s + "\r\n"
        } else {
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n", "a".repeat(long))
        };
        let bytes = [bytes.as_bytes(), &[b'z'; 20_000][..]].concat();
        let (got, consumed, _) = checks::read_head(&bytes, &sizes);
        prop_assert_eq!(got, HeadSummary::Status(431));
        prop_assert!(consumed <= MAX_HEAD);
    }

    /// Anything at all, and well-formed heads with a few bytes changed: the fuzz target's check
    /// (bounded read, the same answer in any read sizes, the leftover exact).
    #[test]
    fn any_bytes_read_alike_at_any_split(data in prop::collection::vec(any::<u8>(), 0..600)) {
        checks::request_head(&data);
    }

    #[test]
    fn damaged_heads_read_alike_at_any_split(
        seed in any::<u8>(),
        head in gen_head(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = head.bytes;
        for (at, byte) in damage {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        checks::request_head(&[vec![seed], bytes].concat());
    }
}

/// Found by the fuzzer (`request_head` and `upgrade`): empty lines before the request line
/// (which the parser skips) ended the head for the "parse at a blank line" check, the parse
/// said "incomplete", and an error in the request line that came in a later read was never
/// looked at: one read gave 400, smaller reads "closed before a whole head".
#[test]
fn empty_lines_before_the_request_line_answer_alike_in_any_read_sizes() {
    let cases: [(&[u8], HeadSummary); 3] = [
        (b"\n\r\nG\"T / HTTP/1.1\r\nHost: x\r\n", HeadSummary::Closed),
        (b"\n\nBAD\"LINE\r\nHost: x\r\n\r\n", HeadSummary::Status(400)),
        (b"\r\n\r\n\n\rX / HTTP/1.1\r\n\r\n", HeadSummary::Status(400)),
    ];
    for (bytes, want) in cases {
        for sizes in [&[][..], &[1], &[2, 3]] {
            let (got, _, _) = checks::read_head(bytes, sizes);
            assert_eq!(got, want, "{:?} in reads of {sizes:?}", String::from_utf8_lossy(bytes));
        }
    }
    for sizes in [&[][..], &[1]] {
        let (got, consumed, ok) = checks::read_head(b"\r\n\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nrest", sizes);
        assert!(matches!(got, HeadSummary::Head { uri, .. } if uri == "/a"));
        assert_eq!(consumed - ok.unwrap().1.len(), 31, "the head ends at its blank line");
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

/// A client frame: `first` is FIN/RSV/opcode; `wide` picks a longer length form than needed
/// (allowed by the decoder, which does not insist on the shortest).
fn client_frame(first: u8, payload: &[u8], mask: [u8; 4], wide: u8) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![first];
    match (len, wide % 3) {
        (0..=125, 0) => f.push(0x80 | len as u8),
        (0..=0xFFFF, 0 | 1) => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One step of a client's stream.
#[derive(Debug, Clone)]
enum Step {
    /// A data message in fragments (cut at these byte positions), with pings between them.
    Message {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<prop::sample::Index>,
        pings_between: Vec<Vec<u8>>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    // Longer payloads (every length form) from a seed: a vector strategy of 64 KiB elements
    // would cost more to generate than everything else here.
    let seeded = |len: std::ops::Range<usize>| {
        (any::<u64>(), len).prop_map(|(mut x, len)| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        })
    };
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..40),
        2 => seeded(120..300),
        1 => seeded(65_530..65_600),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let control = prop::collection::vec(any::<u8>(), 0..=125);
    prop_oneof![
        6 => (
            any::<bool>(),
            payload(),
            ".{0,30}",
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            prop::collection::vec(control.clone(), 0..3),
        )
            .prop_map(|(text, bytes, s, cuts, pings_between)| Step::Message {
                text,
                payload: if text { s.into_bytes() } else { bytes },
                cuts,
                pings_between,
            }),
        1 => control.clone().prop_map(Step::Ping),
        1 => control.prop_map(Step::Pong),
    ]
}

/// The stream for `steps` (plus an optional close), and what decoding it must give.
fn encode(steps: &[Step], close: &Option<(u16, String)>, masks: &[([u8; 4], u8)]) -> (Vec<u8>, Vec<Completed>) {
    let mut mask_at = 0;
    let mut next_mask = || {
        mask_at += 1;
        masks[mask_at % masks.len()]
    };
    let mut stream = Vec::new();
    let mut want = Vec::new();
    for s in steps {
        match s {
            Step::Message {
                text,
                payload,
                cuts,
                pings_between,
            } => {
                let mut at: Vec<usize> = cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
                at.sort_unstable();
                at.dedup();
                let mut bounds = vec![0];
                bounds.extend(at);
                bounds.push(payload.len());
                bounds.dedup();
                if bounds.len() == 1 {
                    bounds.push(0); // an empty message: one empty frame
                }
                let frames = bounds.len() - 1;
                for i in 0..frames {
                    let opcode = match (i, text) {
                        (0, true) => 0x1,
                        (0, false) => 0x2,
                        _ => 0x0,
                    };
                    let fin = if i + 1 == frames { 0x80 } else { 0 };
                    let (mask, wide) = next_mask();
                    stream.extend(client_frame(fin | opcode, &payload[bounds[i]..bounds[i + 1]], mask, wide));
                    if i + 1 < frames {
                        if let Some(p) = pings_between.get(i) {
                            let (mask, wide) = next_mask();
                            stream.extend(client_frame(0x89, p, mask, wide));
                            want.push(Completed::Ping(p.clone()));
                        }
                    }
                }
                want.push(Completed::Message(payload.clone()));
            }
            Step::Ping(p) => {
                let (mask, wide) = next_mask();
                stream.extend(client_frame(0x89, p, mask, wide));
                want.push(Completed::Ping(p.clone()));
            }
            Step::Pong(p) => {
                let (mask, wide) = next_mask();
                stream.extend(client_frame(0x8A, p, mask, wide));
                want.push(Completed::Pong);
            }
        }
    }
    if let Some((code, reason)) = close {
        let (mask, wide) = next_mask();
        stream.extend(client_frame(0x88, &wsbridge::frame::close_payload(Some(*code), reason), mask, wide));
        want.push(Completed::Close(Some(*code), wsbridge::frame::truncate(reason).to_owned()));
    }
    (stream, want)
}

fn close_frame() -> impl Strategy<Value = Option<(u16, String)>> {
    prop::option::of((prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16], ".{0,40}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Valid masked frames (fragmented messages, text split inside code points, pings between
    /// fragments, every length form), read in any sizes: exactly the messages and control
    /// frames sent, in order.
    #[test]
    fn valid_frames_decode_to_what_was_sent_in_any_read_sizes(
        steps in prop::collection::vec(step(), 0..8),
        close in close_frame(),
        masks in prop::collection::vec((any::<[u8; 4]>(), any::<u8>()), 1..8),
        sizes in read_sizes(),
    ) {
        let (stream, want) = encode(&steps, &close, &masks);
        for sizes in [&[][..], &sizes[..]] {
            let (got, end) = checks::decode(&stream, sizes, 1 << 20);
            prop_assert_eq!(end, Ok(()));
            prop_assert_eq!(&got, &want);
        }
    }

    /// Any bytes: progress on every call, the same outcome at any split, and a refusal only
    /// with 1002, 1007 or 1009.
    #[test]
    fn any_bytes_decode_alike_at_any_split(data in prop::collection::vec(any::<u8>(), 0..600)) {
        checks::frames(&data);
    }

    /// Valid streams with a few bytes changed: the same.
    #[test]
    fn damaged_streams_decode_alike_at_any_split(
        seed in any::<u8>(),
        steps in prop::collection::vec(step(), 1..4),
        masks in prop::collection::vec((any::<[u8; 4]>(), any::<u8>()), 1..4),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (mut stream, _) = encode(&steps, &None, &masks);
        for (at, byte) in damage {
            let i = at.index(stream.len());
            stream[i] = byte;
        }
        checks::frames(&[vec![seed], stream].concat());
    }
}

// ---------------------------------------------------------------------------------------------
// PROXY headers

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A header built by `proxy::header` (v1 or v2, any addresses) followed by anything reads
    /// back as the client's address (IPv4-mapped when the families differ), having consumed
    /// exactly the header, whatever the read sizes.
    #[test]
    fn proxy_headers_read_back_and_consume_nothing_after(
        v2 in any::<bool>(),
        client in socket_addr(),
        local in socket_addr(),
        after in prop::collection::vec(any::<u8>(), 0..64),
        sizes in read_sizes(),
    ) {
        let version = if v2 { wsbridge::proxy::Version::V2 } else { wsbridge::proxy::Version::V1 };
        let header = wsbridge::proxy::header(version, client, local);
        let want = match (client, local.is_ipv4() == client.is_ipv4()) {
            (SocketAddr::V4(c), false) => SocketAddr::from((c.ip().to_ipv6_mapped(), c.port())),
            _ => client,
        };
        let bytes = [header.clone(), after].concat();
        for sizes in [&[][..], &sizes[..]] {
            let (got, consumed) = checks::read_proxy(&bytes, sizes);
            prop_assert_eq!(got, Ok(Some(want)));
            prop_assert_eq!(consumed, header.len());
        }
    }

    /// Any bytes, and any bytes after a PROXY signature: the fuzz target's check.
    #[test]
    fn any_bytes_as_a_proxy_header(
        start in prop_oneof![Just(&b""[..]), Just(&b"PROXY "[..]), Just(&b"\r\n\r\n\0\r\nQUIT\n"[..])],
        data in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut input = data.clone();
        if let Some((seed, rest)) = data.split_first() {
            input = [vec![*seed], start.to_vec(), rest.to_vec()].concat();
        }
        checks::proxy_header(&input);
    }
}

// ---------------------------------------------------------------------------------------------
// The route and policy decision

/// The routes of [`routing_table`]: path and inline token routes, and token files looked up by
/// query and by host. No any-path route: a request that names nothing gets nothing.
const PATHS: [(&str, &str); 2] = [("/a", "127.0.0.1:2001"), ("/b", "127.0.0.1:2002")];
const INLINE_TOKEN: (&str, &str) = ("tok", "127.0.0.1:2003");
const QUERY_TOKEN: (&str, &str) = ("good", "127.0.0.1:2004");
const HOST_TOKEN: (&str, &str) = ("desk1.example", "127.0.0.1:2005");
/// What a client would like to reach and is not configured.
const OFF_LIST: &str = "127.0.0.1:2009";

fn routing_table() -> &'static RouteTable {
    static TABLE: OnceLock<(tempfile::TempDir, RouteTable)> = OnceLock::new();
    &TABLE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("query"), format!("{}: {}\n", QUERY_TOKEN.0, QUERY_TOKEN.1)).unwrap();
            std::fs::write(dir.path().join("host"), format!("{}: {}\n", HOST_TOKEN.0, HOST_TOKEN.1)).unwrap();
            let text = format!(
                "[[listen]]\naddr = \"127.0.0.1:0\"\n\
                 [[route]]\npath = \"{}\"\ntarget = \"{}\"\n\
                 [[route]]\npath = \"{}\"\ntarget = \"{}\"\norigins = [\"https://app.example.com\"]\n\
                 [[route]]\ntoken = \"{}\"\ntarget = \"{}\"\n\
                 [[tokens]]\nsource = \"query\"\n\
                 [[tokens]]\nsource = \"host\"\nlookup = \"host\"\n",
                PATHS[0].0, PATHS[0].1, PATHS[1].0, PATHS[1].1, INLINE_TOKEN.0, INLINE_TOKEN.1
            );
            let config = wsbridge::config::Config::from_toml(&text, &dir.path().join("w.toml")).unwrap();
            let table = RouteTable::from_config(&config, None).unwrap();
            (dir, table)
        })
        .1
}

/// Where the route table must send a request: the exact path; else the first `token` in the
/// query (an inline token, else the query token file; no fallback); else the Host's name
/// (without port, case or a trailing dot) in the host token file.
fn route_model(target: &str, host: Option<&str>) -> Option<&'static str> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if let Some((_, t)) = PATHS.iter().find(|(p, _)| *p == path) {
        return Some(t);
    }
    let token = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(token) = token {
        return [INLINE_TOKEN, QUERY_TOKEN]
            .iter()
            .find(|(t, _)| *t == token)
            .map(|(_, target)| *target);
    }
    let host = host?.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return None,
        None => &host,
    };
    (name.strip_suffix('.').unwrap_or(name) == HOST_TOKEN.0).then_some(HOST_TOKEN.1)
}

/// Whether the request target's query names a credential (`token`, `access_token`) more than
/// once, or spelled otherwise than exactly (any case, percent-encoded): such a request is
/// answered 400 and routed nowhere, since a proxy in front could read it as naming another.
fn credential_ambiguous(target: &str) -> bool {
    let Some((_, query)) = target.split_once('?') else {
        return false;
    };
    ["token", "access_token"].iter().any(|name| {
        let named: Vec<&str> = query
            .split('&')
            .map(|part| part.split('=').next().unwrap_or(part))
            .filter(|raw| {
                let decoded: String = form_urlencoded::parse(raw.as_bytes()).map(|(k, _)| k.into_owned()).collect();
                raw.eq_ignore_ascii_case(name) || decoded.eq_ignore_ascii_case(name)
            })
            .collect();
        named.len() > 1 || named.iter().any(|raw| raw != name)
    })
}

/// A request a client might send to reach somewhere: paths, queries, hosts and headers mixing
/// configured names, the off-list target, encodings, case and duplicates.
#[derive(Debug, Clone)]
struct GenRequest {
    method: &'static str,
    target: String,
    hosts: Vec<String>,
    upgrade: bool,
    extra: Vec<(&'static str, String)>,
}

impl GenRequest {
    fn bytes(&self) -> Vec<u8> {
        let mut s = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for h in &self.hosts {
            s.push_str(&format!("Host: {h}\r\n"));
        }
        if self.upgrade {
            s.push_str(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            );
        }
        for (name, value) in &self.extra {
            s.push_str(&format!("{name}: {value}\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

fn gen_request() -> impl Strategy<Value = GenRequest> {
    let path = prop_oneof![
        Just("/a".to_owned()),
        Just("/b".to_owned()),
        Just("/A".to_owned()),
        Just("/a/".to_owned()),
        Just("//a".to_owned()),
        Just("/%61".to_owned()),
        Just("/a/../b".to_owned()),
        Just("/".to_owned()),
        Just("/websockify".to_owned()),
        Just(format!("/{OFF_LIST}")),
        re("/[a-z%0-9.]{0,8}"),
    ];
    let key = prop_oneof![
        Just("token"),
        Just("TOKEN"),
        Just("token%20"),
        Just("access_token"),
        Just("path"),
        Just("host"),
        Just("target")
    ];
    let value = prop_oneof![
        Just("tok".to_owned()),
        Just("good".to_owned()),
        Just("%67ood".to_owned()),
        Just("go%6Fd".to_owned()),
        Just("t+ok".to_owned()),
        Just("good%00".to_owned()),
        Just("tok%20".to_owned()),
        Just(String::new()),
        Just(OFF_LIST.to_owned()),
        Just("desk1.example".to_owned()),
        re("[a-z0-9%+.:]{0,10}"),
    ];
    let query = prop::option::of(
        prop::collection::vec((key, value), 0..4)
            .prop_map(|pairs| pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")),
    );
    let target = (path, query).prop_map(|(p, q)| match q {
        Some(q) => format!("{p}?{q}"),
        None => p,
    });
    let host = prop_oneof![
        Just("x".to_owned()),
        Just("desk1.example".to_owned()),
        Just("DESK1.Example:6080".to_owned()),
        Just("desk1.example.".to_owned()),
        Just("desk1.example:99999".to_owned()),
        Just("desk1.example.evil".to_owned()),
        Just("tok".to_owned()),
        Just("good".to_owned()),
        Just(OFF_LIST.to_owned()),
        Just("[::1]:80".to_owned()),
        re("[a-zA-Z0-9.:-]{0,16}"),
    ];
    let extra = prop_oneof![
        (
            Just("Origin"),
            prop_oneof![
                Just("https://app.example.com".to_owned()),
                Just("http://x".to_owned()),
                Just("http://desk1.example".to_owned()),
                Just("null".to_owned()),
                Just(format!("http://{OFF_LIST}")),
            ]
        ),
        (Just("X-Forwarded-For"), Just(OFF_LIST.to_owned())),
        (Just("Forwarded"), Just(format!("for=127.0.0.1;host={OFF_LIST}"))),
        (Just("X-Forwarded-Host"), Just(OFF_LIST.to_owned())),
        (Just("Authorization"), Just("Bearer tok".to_owned())),
        (Just("Sec-WebSocket-Protocol"), Just("binary, bearer.good".to_owned())),
    ];
    (
        prop_oneof![8 => Just("GET"), 1 => Just("POST"), 1 => Just("HEAD")],
        target,
        prop::collection::vec(host, 0..3),
        prop::bool::weighted(0.9),
        prop::collection::vec(extra, 0..4),
    )
        .prop_map(|(method, target, hosts, upgrade, extra)| GenRequest {
            method,
            target,
            hosts,
            upgrade,
            extra,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the path, query, Host and other headers, an upgrade goes where the model of the
    /// route table says (so never off the configuration), and a well-formed upgrade that names
    /// a route and passes its policy (no Origin here: a non-browser client) is made.
    #[test]
    fn the_decision_routes_only_where_the_configuration_says(
        request in gen_request(),
        client in prop_oneof![Just(IpAddr::from([10, 0, 0, 1])), Just(IpAddr::from([127, 0, 0, 1]))],
        sizes in read_sizes(),
    ) {
        let table = routing_table();
        let bytes = request.bytes();
        let got = checks::decide(table, &bytes, &sizes, client);
        prop_assert_eq!(&got, &checks::decide(table, &bytes, &[], client));
        let ambiguous = credential_ambiguous(&request.target);
        let want = match request.hosts.len() {
            _ if ambiguous => None,
            1 => route_model(&request.target, Some(&request.hosts[0])),
            0 => route_model(&request.target, None),
            _ => None,
        };
        if let Decided::Upgrade(target) = &got {
            prop_assert_ne!(target.as_str(), OFF_LIST);
            prop_assert_eq!(Some(target.as_str()), want);
        }
        let plain = request.method == "GET" && request.upgrade && request.hosts.len() == 1
            && request.extra.iter().all(|(name, _)| *name != "Origin");
        if plain {
            match want {
                _ if ambiguous => prop_assert_eq!(got, Decided::Answered(400)),
                Some(target) => prop_assert_eq!(got, Decided::Upgrade(target.to_owned())),
                None => prop_assert_eq!(got, Decided::Answered(404)),
            }
        }
    }

    /// The fixed table of the fuzz target (routes with origins, networks, bearer
    /// authentication, a cap per address): the fuzz target's check on generated requests.
    #[test]
    fn the_fuzz_table_upgrades_only_to_configured_targets(
        seed in any::<u8>(),
        request in gen_request(),
    ) {
        checks::upgrade(&[vec![seed], request.bytes()].concat());
    }
}

// ---------------------------------------------------------------------------------------------
// Origins, networks, addresses, credentials, caps per address

/// An origin as generated: its parts (for the model) and whether it is well-formed.
#[derive(Debug, Clone)]
struct GenOrigin {
    text: String,
    scheme: String,
    host: String,
    port: Option<u16>,
    valid: bool,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn gen_origin() -> impl Strategy<Value = GenOrigin> {
    let scheme = prop_oneof![Just("http"), Just("https"), Just("HTTPS"), Just("ws"), Just("ftp")];
    let host = prop_oneof![
        Just("app.example.com"),
        Just("APP.example.com"),
        Just("evil-app.example.com"),
        Just("app.example.com.evil.test"),
        Just("a.corp.example"),
        Just("x.Y.corp.example"),
        Just("corp.example"),
        Just("xcorp.example"),
        Just("bridge.example"),
        Just("[::1]"),
    ];
    let port = prop::option::of(prop_oneof![Just(80u16), Just(443), Just(8080), Just(6080)]);
    // A trailing slash is tolerated; a path, query, fragment or user is not an origin.
    let tail = prop_oneof![4 => Just(""), 1 => Just("/"), 1 => Just("/x"), 1 => Just("?q"), 1 => Just("#f")];
    let user = prop::bool::weighted(0.1);
    (scheme, host, port, tail, user).prop_map(|(scheme, host, port, tail, user)| {
        let port_text = port.map(|p| format!(":{p}")).unwrap_or_default();
        let at = if user { "u@" } else { "" };
        let lower = scheme.to_ascii_lowercase();
        GenOrigin {
            text: format!("{scheme}://{at}{host}{port_text}{tail}"),
            valid: !user && matches!(tail, "" | "/") && port.or(default_port(&lower)).is_some(),
            scheme: lower,
            host: host.trim_matches(['[', ']']).to_ascii_lowercase(),
            port,
        }
    })
}

/// The rules a policy may hold, as written in a configuration.
const RULES: [&str; 6] = [
    "https://app.example.com",
    "http://app.example.com:8080",
    "https://*.corp.example",
    "same-origin",
    "null",
    "any",
];

/// Whether `rule` (one of [`RULES`]) admits a well-formed origin, by the words:
/// exact origins, wildcard subdomains (not the bare domain), same-origin (host and port equal
/// the Host's, its port defaulting by the connection; over plain ws:// only for an IP or
/// localhost Host), `null` only when written.
fn rule_admits(rule: &str, o: &GenOrigin, host: Option<(&str, Option<u16>)>, secure: bool) -> bool {
    let port = o.port.or(default_port(&o.scheme));
    match rule {
        "https://app.example.com" => o.scheme == "https" && o.host == "app.example.com" && port == Some(443),
        "http://app.example.com:8080" => o.scheme == "http" && o.host == "app.example.com" && port == Some(8080),
        "https://*.corp.example" => o.scheme == "https" && o.host.ends_with(".corp.example") && port == Some(443),
        // Over plain ws:// only an IP literal or localhost proves the page is ours (a name may be
        // DNS rebinding); over TLS the certificate does.
        "same-origin" => host.is_some_and(|(h, p)| {
            let h = h.trim_matches(['[', ']']);
            let proof = secure || h.parse::<IpAddr>().is_ok() || h.eq_ignore_ascii_case("localhost");
            proof && h.eq_ignore_ascii_case(&o.host) && Some(p.unwrap_or(if secure { 443 } else { 80 })) == port
        }),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The origin check agrees with the model for every generated origin, Host and rule set;
    /// its refusals are 403.
    #[test]
    fn origins_are_admitted_as_the_model_says(
        rules in prop::sample::subsequence(RULES.to_vec(), 0..=RULES.len()),
        origin in prop_oneof![
            8 => gen_origin().prop_map(Some),
            1 => Just(None),
            1 => Just(Some(GenOrigin { text: "null".into(), scheme: String::new(), host: String::new(), port: None, valid: false })),
        ],
        host in prop::option::of((
            prop_oneof![Just("bridge.example"), Just("BRIDGE.example"), Just("app.example.com"), Just("[::1]"), Just("a.corp.example")],
            prop::option::of(prop_oneof![Just(80u16), Just(443), Just(6080), Just(8080)]),
        )),
        secure in any::<bool>(),
        require_origin in any::<bool>(),
    ) {
        let policy = OriginPolicy {
            rules: rules.iter().map(|r| r.parse::<OriginRule>().unwrap()).collect(),
            require_origin,
        };
        let host_text = host.map(|(h, p)| match p {
            Some(p) => format!("{h}:{p}"),
            None => h.to_owned(),
        });
        let got = policy.check(origin.as_ref().map(|o| o.text.as_str()), host_text.as_deref(), secure);
        let want = match &origin {
            None => !require_origin,
            Some(_) if rules.contains(&"any") => true,
            Some(o) if o.text == "null" => rules.contains(&"null"),
            Some(o) if !o.valid => false,
            Some(o) => rules.iter().any(|r| rule_admits(r, o, host, secure)),
        };
        prop_assert_eq!(got.is_ok(), want, "origin {:?} host {:?} rules {:?}", origin.map(|o| o.text), host_text, rules);
        if let Err(r) = got {
            prop_assert_eq!(r.status, http::StatusCode::FORBIDDEN);
        }
    }

    /// Any Origin text at all: no panic, and only `any` admits what does not parse.
    #[test]
    fn any_origin_text_is_answered(origin in "\\PC{0,40}", host in prop::option::of("\\PC{0,20}")) {
        let policy = OriginPolicy {
            rules: RULES[..4].iter().map(|r| r.parse::<OriginRule>().unwrap()).collect(),
            require_origin: false,
        };
        let _ = policy.check(Some(&origin), host.as_deref(), false);
        prop_assert!(OriginPolicy::any().check(Some(&origin), host.as_deref(), false).is_ok());
    }

    /// Client networks agree with prefix arithmetic: deny wins, a non-empty allow list admits
    /// only its ranges, and an IPv4-mapped IPv6 address counts as its IPv4 address.
    #[test]
    fn networks_agree_with_prefix_arithmetic(
        allow in prop::collection::vec((any::<u32>(), 0..=32u8), 0..3),
        deny in prop::collection::vec((any::<u32>(), 0..=32u8), 0..3),
        ip in any::<u32>(),
        near in prop::option::of((0..3usize, any::<u8>())),
        mapped in any::<bool>(),
    ) {
        // Often close to a listed range, so both sides of a boundary are tried.
        let ip = match near {
            Some((i, low)) if !allow.is_empty() => (allow[i % allow.len()].0 & !0xFF) | u32::from(low),
            _ => ip,
        };
        let within = |(net, prefix): &(u32, u8), ip: u32| {
            let mask = if *prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            net & mask == ip & mask
        };
        let want = !deny.iter().any(|n| within(n, ip)) && (allow.is_empty() || allow.iter().any(|n| within(n, ip)));
        let nets = |list: &[(u32, u8)]| -> Vec<IpNet> {
            list.iter().map(|(n, p)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(*n), *p).unwrap().trunc())).collect()
        };
        let networks = Networks { allow: nets(&allow), deny: nets(&deny) };
        let addr = match mapped {
            true => IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped()),
            false => IpAddr::V4(Ipv4Addr::from(ip)),
        };
        prop_assert_eq!(networks.check(addr).is_ok(), want);
    }

    /// Forwarding headers: from a peer that is not trusted they change nothing; from a trusted
    /// one the answer is the peer or an address the headers name, never anything else.
    #[test]
    fn forwarded_addresses_come_only_from_trusted_peers(
        trusted_peer in any::<bool>(),
        xff in prop::collection::vec(prop_oneof![
            Just("203.0.113.7".to_owned()), Just("10.0.0.9".to_owned()), Just("[2001:db8::1]:80".to_owned()),
            Just("unknown".to_owned()), "[0-9.:\\[\\]a-f]{0,20}",
        ], 0..4),
        forwarded in prop::option::of(prop_oneof![
            Just("for=192.0.2.60;proto=https".to_owned()), Just("for=\"[2001:db8:cafe::17]:4711\"".to_owned()),
            Just("for=_hidden".to_owned()), "[a-z=;,\" 0-9.:]{0,30}",
        ]),
    ) {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = if trusted_peer { [10, 0, 0, 5].into() } else { [198, 51, 100, 9].into() };
        let mut headers = HeaderMap::new();
        let xff_text = xff.join(", ");
        headers.append("x-forwarded-for", xff_text.parse().unwrap());
        if let Some(f) = &forwarded {
            headers.append(http::header::FORWARDED, f.parse().unwrap());
        }
        let which = if forwarded.is_some() && xff.is_empty() { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
        let got = client_address(peer, &headers, &trusted, which);
        if !trusted_peer {
            prop_assert_eq!(got, peer);
        } else {
            // Every address the headers' text names, in any of the forms proxies write.
            let text = format!("{xff_text} {}", forwarded.unwrap_or_default());
            let named: Vec<IpAddr> = text
                .split([',', ';', '=', '"', ' '])
                .filter_map(|t| {
                    t.parse::<IpAddr>()
                        .ok()
                        .or_else(|| t.parse::<SocketAddr>().ok().map(|s| s.ip()))
                        .or_else(|| t.strip_prefix('[')?.split_once(']')?.0.parse().ok())
                })
                .map(|ip| ip.to_canonical())
                .collect();
            prop_assert!(got == peer || named.contains(&got), "{} is neither the peer nor named in {:?}", got, text);
        }
    }

    /// Where a bearer credential is taken from, in order: the Authorization header, a
    /// `bearer.` subprotocol, the `access_token` query parameter, the `token` one.
    #[test]
    fn bearer_credentials_are_found_in_order(
        header in prop::option::of(("(?i:bearer)", "[A-Za-z0-9._~-]{1,20}")),
        subprotocol in prop::option::of("[A-Za-z0-9._~-]{1,20}"),
        access_token in prop::option::of("[A-Za-z0-9._~-]{1,20}"),
        token in prop::option::of("[A-Za-z0-9._~-]{1,20}"),
    ) {
        let mut headers = HeaderMap::new();
        if let Some((scheme, t)) = &header {
            headers.append(http::header::AUTHORIZATION, format!("{scheme} {t}").parse().unwrap());
        }
        if let Some(t) = &subprotocol {
            headers.append(http::header::SEC_WEBSOCKET_PROTOCOL, format!("binary, bearer.{t}").parse().unwrap());
        }
        let mut query = vec!["a=1".to_owned()];
        query.extend(token.iter().map(|t| format!("token={t}")));
        query.extend(access_token.iter().map(|t| format!("access_token={t}")));
        let query = query.join("&");
        // `token` counts only where it does not pick a route.
        let want = header.clone().map(|(_, t)| t).or(subprotocol.clone()).or(access_token.clone()).or(token);
        prop_assert_eq!(Credentials::of(&headers, Some(&query), true).bearer, want);
        let want = header.map(|(_, t)| t).or(subprotocol).or(access_token);
        prop_assert_eq!(Credentials::of(&headers, Some(&query), false).bearer, want);
    }

    /// Sessions per address: one address alone in the table is admitted exactly while it has
    /// fewer than the cap open; among several, none is ever admitted past its cap (the table
    /// may count two together when they share a slot: it fails closed).
    #[test]
    fn sessions_per_address_never_pass_the_cap(
        cap in 1..4u32,
        ops in prop::collection::vec((0..3usize, any::<bool>()), 1..40),
        alone in any::<bool>(),
    ) {
        let table = PerAddress::new(AddressLimits { max_sessions: Some(cap), rate: None, burst: 0, connections: false }, 1024);
        let ips: [IpAddr; 3] = [[192, 0, 2, 1].into(), [192, 0, 2, 2].into(), "2001:db8::3".parse().unwrap()];
        let mut held: HashMap<usize, Vec<wsbridge::policy::AddressSlot>> = HashMap::new();
        for (who, enter) in ops {
            let who = if alone { 0 } else { who };
            let open = held.entry(who).or_default();
            if enter {
                let before = open.len() as u32;
                match table.enter(ips[who]) {
                    Ok(slot) => {
                        prop_assert!(before < cap, "admitted past the cap");
                        open.push(slot);
                    }
                    Err(r) => {
                        prop_assert_eq!(r.status, http::StatusCode::TOO_MANY_REQUESTS);
                        prop_assert!(!alone || before >= cap, "refused under the cap while alone");
                    }
                }
            } else {
                open.pop();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fuzz corpus

/// Every file of `fuzz/corpus/TARGET/` through TARGET's check; each target has a corpus.
#[test]
fn the_fuzz_corpus_replays_through_the_targets_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 4] = [
        ("request_head", checks::request_head),
        ("frames", checks::frames),
        ("proxy_header", checks::proxy_header),
        ("upgrade", checks::upgrade),
    ];
    for (target, check) in targets {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} has no corpus", dir.display());
        for file in files {
            let data = std::fs::read(&file).unwrap();
            // A panic names the file: replaying it under `cargo fuzz run TARGET FILE` shows more.
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "corpus file {} fails {target}'s check", file.display());
        }
    }
}
