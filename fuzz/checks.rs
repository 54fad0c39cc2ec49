//! The checks behind each fuzz target, shared by the fuzz crate (`fuzz_targets/*.rs`) and the
//! normal test suite (`tests/properties.rs` replays `fuzz/corpus/*/*` through them), so that the
//! corpus is test input on stable Rust and in CI, where `cargo fuzz` does not run.
//!
//! Each check drives the public entry points the server uses (the request head over an
//! in-memory reader, the frame decoder, the PROXY header reader, the upgrade decision) and
//! asserts properties, not only the absence of a panic: bounds on what is read, the same answer
//! whatever the read sizes, and no route outside the configuration.
//!
//! The first byte of a fuzz input chooses how the rest is cut into reads (and, for frames, the
//! message limit), so the fuzzer explores read boundaries as well as contents.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use wsbridge::config::{Config, Target};
use wsbridge::frame::{Decoder, Event};
use wsbridge::http::request::{read_request, Rejection, MAX_HEAD};
use wsbridge::http::upgrade::{respond, write_switching, Context, Outcome};
use wsbridge::policy::{AddressLimits, PerAddress};
use wsbridge::routes::RouteTable;

/// Runs a future to completion on this thread's runtime (one per thread: building one per
/// input would cost more than most inputs).
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(f))
}

/// An in-memory connection: reads `data` in pieces of the given sizes (cycled; empty: as much
/// as the caller asks for), records what is written, and counts what was consumed.
pub struct Chunked<'a> {
    data: &'a [u8],
    /// Bytes handed out so far.
    pub consumed: usize,
    sizes: Vec<usize>,
    next: usize,
    /// Everything written to it.
    pub written: Vec<u8>,
}

impl<'a> Chunked<'a> {
    /// A reader of `data` in reads of `sizes` bytes (cycled).
    pub fn new(data: &'a [u8], sizes: &[usize]) -> Chunked<'a> {
        Chunked {
            data,
            consumed: 0,
            sizes: sizes.iter().map(|s| (*s).max(1)).collect(),
            next: 0,
            written: Vec::new(),
        }
    }

    /// What has not been read.
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.consumed..]
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let size = match this.sizes.len() {
            0 => usize::MAX,
            n => this.sizes[this.next % n],
        };
        this.next += 1;
        let n = size.min(buf.remaining()).min(this.data.len() - this.consumed);
        buf.put_slice(&this.data[this.consumed..this.consumed + n]);
        this.consumed += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Read sizes from a fuzz input's first byte (a small and a larger size, alternating), and the
/// rest of the input.
pub fn split_sizes(data: &[u8]) -> (Vec<usize>, &[u8]) {
    match data.split_first() {
        None => (Vec::new(), data),
        Some((&b, rest)) => (vec![usize::from(b & 0x0F) + 1, usize::from(b >> 4) * 97 + 1], rest),
    }
}

/// A request head as read, in comparable form, or the way reading it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadSummary {
    /// A head: method, request target, version, headers in order (names lowercase).
    Head {
        /// The method.
        method: String,
        /// The request target.
        uri: String,
        /// `HTTP/1.0` or `HTTP/1.1`.
        version: String,
        /// Every header line, in order.
        headers: Vec<(String, Vec<u8>)>,
    },
    /// Refused with this status (to be answered).
    Status(u16),
    /// The client closed before a whole head.
    Closed,
    /// Reading failed.
    Io,
}

/// How reading a request head from `data` (in reads of `sizes`) went: the summary, the bytes
/// consumed from the reader, and on success the head's length and the bytes read after it.
pub fn read_head(data: &[u8], sizes: &[usize]) -> (HeadSummary, usize, Option<(usize, Vec<u8>)>) {
    let mut io = Chunked::new(data, sizes);
    let result = block_on(read_request(&mut io));
    let consumed = io.consumed;
    match result {
        Ok((request, leftover)) => {
            let mut headers = Vec::new();
            // HeaderMap groups values by name: compare per name, in the order of first appearance.
            for name in request.headers().keys() {
                for value in request.headers().get_all(name) {
                    headers.push((name.as_str().to_owned(), value.as_bytes().to_vec()));
                }
            }
            let summary = HeadSummary::Head {
                method: request.method().as_str().to_owned(),
                uri: request.uri().to_string(),
                version: format!("{:?}", request.version()),
                headers,
            };
            let head_len = consumed - leftover.len();
            (summary, consumed, Some((head_len, leftover)))
        }
        Err(Rejection::Status { status, .. }) => (HeadSummary::Status(status.as_u16()), consumed, None),
        Err(Rejection::BadRequest(_)) => (HeadSummary::Closed, consumed, None),
        Err(Rejection::Io(_)) => (HeadSummary::Io, consumed, None),
    }
}

/// The request head reader: never reads past [`MAX_HEAD`], answers the same whatever the read
/// sizes, ends a head at a blank line, and hands back exactly the bytes that followed it.
pub fn request_head(data: &[u8]) {
    let (sizes, bytes) = split_sizes(data);
    let (whole, consumed_whole, ok_whole) = read_head(bytes, &[]);
    let (split, consumed_split, ok_split) = read_head(bytes, &sizes);
    assert_eq!(whole, split, "read sizes {sizes:?} changed the result");
    for (consumed, ok) in [(consumed_whole, ok_whole), (consumed_split, ok_split)] {
        assert!(consumed <= MAX_HEAD, "read {consumed} bytes, past the {MAX_HEAD}-byte bound");
        if let Some((head_len, leftover)) = ok {
            assert!(bytes[..head_len].ends_with(b"\n"), "a head ends at a blank line");
            assert_eq!(&bytes[head_len..consumed], &leftover[..], "leftover is what followed the head");
        }
    }
    if let HeadSummary::Status(status) = whole {
        assert!(matches!(status, 400 | 431), "status {status}");
    }
}

/// A WebSocket stream decoded to what completed, in order (data messages whole), and how it
/// ended: `Ok` when every byte was used without error, `Err(close code)` on a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    /// A data message, its pieces joined.
    Message(Vec<u8>),
    /// A ping and its payload.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame.
    Close(Option<u16>, String),
}

/// Decodes `stream` in reads of `sizes` bytes (empty: one read), checking on every call that
/// the decoder makes progress within its input and hands out no more than it was given.
pub fn decode(stream: &[u8], sizes: &[usize], max_message: usize) -> (Vec<Completed>, Result<(), u16>) {
    let mut decoder = Decoder::new(max_message);
    let mut out = Vec::new();
    let mut open: Option<Vec<u8>> = None;
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let size = match sizes.len() {
            0 => stream.len(),
            n => sizes[i % n].max(1),
        };
        i += 1;
        let mut buf = stream[at..(at + size).min(stream.len())].to_vec();
        at += buf.len();
        let mut pos = 0;
        while pos < buf.len() {
            let len = buf.len() - pos;
            let (n, event) = match decoder.next(&mut buf[pos..]) {
                Ok(v) => v,
                Err(e) => return (out, Err(e.code())),
            };
            assert!(n >= 1 && n <= len, "decoder used {n} of {len} bytes");
            pos += n;
            match event {
                None => {}
                Some(Event::Data { bytes, end }) => {
                    assert!(bytes.len() <= n, "more payload than input");
                    open.get_or_insert_with(Vec::new).extend_from_slice(bytes);
                    if end {
                        out.push(Completed::Message(open.take().unwrap_or_default()));
                    }
                }
                Some(Event::Ping(p)) => {
                    assert!(p.len() <= wsbridge::frame::MAX_CONTROL);
                    out.push(Completed::Ping(p));
                }
                Some(Event::Pong) => out.push(Completed::Pong),
                Some(Event::Close(code, reason)) => {
                    assert!(reason.len() <= wsbridge::frame::MAX_REASON);
                    out.push(Completed::Close(code, reason));
                }
            }
        }
    }
    (out, Ok(()))
}

/// The frame decoder on any bytes: progress on every call, the same messages and the same
/// verdict whatever the read sizes.
pub fn frames(data: &[u8]) {
    let (sizes, bytes) = split_sizes(data);
    let max = match data.first().map(|b| b & 0x03) {
        Some(0) => 10,
        Some(1) => 1000,
        Some(2) => 1 << 20,
        _ => usize::MAX,
    };
    let whole = decode(bytes, &[], max);
    let split = decode(bytes, &sizes, max);
    assert_eq!(whole, split, "read sizes {sizes:?} changed the result");
    if let Err(code) = whole.1 {
        assert!(matches!(code, 1002 | 1007 | 1009), "close code {code}");
    }
}

/// The v2 header's signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// How reading a PROXY header went, and how many bytes it consumed.
pub fn read_proxy(data: &[u8], sizes: &[usize]) -> (Result<Option<SocketAddr>, String>, usize) {
    let mut io = Chunked::new(data, sizes);
    let result = block_on(wsbridge::proxy::read_header(&mut io));
    let kind = result.map_err(|e| match e {
        wsbridge::proxy::ProxyError::Missing => "missing".to_owned(),
        wsbridge::proxy::ProxyError::Malformed(m) => format!("malformed: {m}"),
        wsbridge::proxy::ProxyError::Io(e) => format!("io: {:?}", e.kind()),
    });
    (kind, io.consumed)
}

/// The PROXY header reader on any bytes: it consumes exactly the header it accepts (a v2
/// header's announced length, a v1 line up to its CRLF), never more than the protocol's
/// bounds, and answers the same read at once or a byte at a time.
pub fn proxy_header(data: &[u8]) {
    let (sizes, bytes) = split_sizes(data);
    let (whole, consumed) = read_proxy(bytes, &[]);
    let (split, consumed_split) = read_proxy(bytes, &sizes);
    assert_eq!(
        (&whole, consumed),
        (&split, consumed_split),
        "read sizes {sizes:?} changed the result"
    );
    assert!(consumed <= 16 + 2048, "read {consumed} bytes");
    if whole.is_ok() {
        if bytes.starts_with(V2_SIGNATURE) {
            assert_eq!(consumed, 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]])));
        } else {
            assert!(bytes.starts_with(b"PROXY ") && consumed <= 107);
            let line = &bytes[..consumed];
            assert!(line.ends_with(b"\r\n"), "a v1 header ends at its CRLF");
            assert!(
                !line[..consumed - 2].windows(2).any(|w| w == b"\r\n"),
                "nothing past the first CRLF"
            );
        }
    }
}

/// The targets the upgrade check's configuration allows: nothing else may come out of it.
pub const ALLOWED: [&str; 5] = [
    "127.0.0.1:1001",
    "127.0.0.1:1002",
    "127.0.0.1:1003",
    "127.0.0.1:1004",
    "127.0.0.1:1005",
];

/// A small fixed configuration covering every kind of route and policy that needs no file:
/// paths, an inline token, origins, networks, bearer authentication, a cap per address.
pub fn upgrade_table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let text = format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\
             [[route]]\npath = \"/a\"\ntarget = \"{}\"\n\
             [[route]]\npath = \"/b\"\ntarget = \"{}\"\norigins = [\"https://app.example.com\", \"https://*.corp.example\"]\nrequire_origin = true\n\
             [[route]]\npath = \"/c\"\ntarget = \"{}\"\nauth = {{ bearer = [\"s3cret-token\"] }}\nallow = [\"10.0.0.0/8\"]\n\
             [[route]]\ntoken = \"tok\"\ntarget = \"{}\"\norigins = [\"any\"]\n\
             [[route]]\npath = \"/d\"\ntarget = \"{}\"\nmax_sessions_per_ip = 1\ndeny = [\"192.0.2.0/24\"]\n",
            ALLOWED[0], ALLOWED[1], ALLOWED[2], ALLOWED[3], ALLOWED[4]
        );
        let config = Config::from_toml(&text, std::path::Path::new("fuzz.toml")).expect("the fuzz configuration is valid");
        RouteTable::from_config(&config, None).expect("the fuzz route table builds")
    })
}

/// What the upgrade decision made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// An upgrade to this target.
    Upgrade(String),
    /// Answered with this status.
    Answered(u16),
    /// The connection ended before a head.
    Ended,
}

/// The upgrade decision on the request in `data` (read in pieces of `sizes`) from `client`,
/// over `table`. Checks that whatever it answered is what it wrote, and that an upgrade's route
/// has a TCP target; the caller checks which.
pub fn decide(table: &RouteTable, data: &[u8], sizes: &[usize], client: IpAddr) -> Decided {
    // The server's brake on guessing (10 failures, then one per 6 s), new for every request so
    // that one input's failures do not change how the next is answered.
    let limits = AddressLimits {
        max_sessions: None,
        rate: Some(1.0 / 6.0),
        burst: 10,
        connections: false,
    };
    let failures = &PerAddress::new(limits, 1024);
    let lookups = wsbridge::policy::Lookups::default();
    let origins = [wsbridge::policy::OriginRule::SameOrigin];
    let ctx = Context {
        client,
        client_cn: None,
        secure: false,
        origins: &origins,
        per_ip: None,
        failures,
        lookups: &lookups,
        keep_alive: false,
    };
    let mut io = Chunked::new(data, sizes);
    block_on(async {
        let head = read_request(&mut io).await;
        match respond(&mut io, head, table, None, &ctx).await {
            Ok(Outcome::Upgrade(u)) => {
                assert!(io.written.is_empty(), "nothing is written before the 101");
                let target = match &u.route.target {
                    Target::Tcp { host, port } => format!("{host}:{port}"),
                    other => panic!("a target that is not configured: {other}"),
                };
                let mut out = Vec::new();
                write_switching(&mut out, &u).await.expect("writing to memory");
                assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
                Decided::Upgrade(target)
            }
            Ok(Outcome::Answered { status, .. }) => {
                let line = format!("HTTP/1.1 {} ", status.as_u16());
                assert!(io.written.starts_with(line.as_bytes()), "answered {status} but wrote otherwise");
                assert!(status.is_client_error() || status.is_server_error(), "answered {status}");
                Decided::Answered(status.as_u16())
            }
            Err(_) => {
                assert!(io.written.is_empty(), "an error that wrote an answer");
                Decided::Ended
            }
        }
    })
}

/// The upgrade decision on any request: an upgrade only ever reaches a configured target, and
/// the decision does not depend on how the request was cut into reads.
pub fn upgrade(data: &[u8]) {
    let (sizes, bytes) = split_sizes(data);
    let client: IpAddr = match data.first().map(|b| b % 3) {
        Some(0) => [10, 1, 2, 3].into(),
        Some(1) => [192, 0, 2, 9].into(),
        _ => "2001:db8::1".parse().expect("an address"),
    };
    let table = upgrade_table();
    let whole = decide(table, bytes, &[], client);
    let split = decide(table, bytes, &sizes, client);
    assert_eq!(whole, split, "read sizes {sizes:?} changed the decision");
    if let Decided::Upgrade(target) = &whole {
        assert!(ALLOWED.contains(&target.as_str()), "upgrade to {target}, not in the configuration");
        // An exact path wins over everything else in the request.
        let path = bytes.split(|b| *b == b' ').nth(1).unwrap_or_default();
        let names_a = path == b"/a" || path.starts_with(b"/a?");
        assert!(!names_a || target == ALLOWED[0], "path /a went to {target}");
    }
}
