//! The HTTP side of a connection: read one request head (bounded in size and time), decide what it
//! is, and answer it.
//!
//! Every outcome is decided here, before any backend is touched:
//! - a WebSocket upgrade on a known route gets `101` and becomes a session ([`Upgrade`]);
//! - an upgrade with no route gets `404`, a bad method `405`, malformed upgrade headers `400`, a
//!   `Sec-WebSocket-Version` other than 13 gets `426` naming 13, a head over [`MAX_HEAD`] gets `431`;
//! - a client whose certificate's common name the route does not list gets `403`;
//! - a plain request on a route gets `426`; with a `web` directory, plain GET/HEAD requests get static
//!   files (resolved by `hyper-staticfile`, which refuses `..` and answers ranges and conditional
//!   requests), otherwise `404`.
//!
//! Parsing is `httparse`'s; the answers are written here because a bridge needs only a handful of
//! fixed responses and must control exactly when the connection becomes a WebSocket.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::routes::{Route, RouteTable};
use crate::slots::Slot;

/// The largest request head accepted (request line and headers); above it: 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most header lines accepted; above it: 431.
pub const MAX_HEADERS: usize = 64;

/// Why a request was not upgraded. Each carries the status the client got.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The client sent something that is not HTTP, or closed early.
    #[error("{0}")]
    BadRequest(String),
    /// Answered with an HTTP status (already written, or to be written).
    #[error("{status}: {reason}")]
    Status {
        /// The status sent.
        status: StatusCode,
        /// Why, for the log (also the response body).
        reason: String,
    },
    /// Reading or writing failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A request that will become a WebSocket session.
#[derive(Debug)]
pub struct Upgrade {
    /// The route it matched.
    pub route: Arc<Route>,
    /// The request head, for logging and policy.
    pub request: Request<()>,
    /// The subprotocol echoed to the client, if any.
    pub subprotocol: Option<String>,
    /// Bytes the client sent after the head (its first frames), to hand to the WebSocket layer.
    pub leftover: Vec<u8>,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept_key: String,
    /// The session's place under the route's `max_sessions`, held for the session's life.
    pub slot: Slot,
}

/// What the connection turned out to be.
#[derive(Debug)]
pub enum Outcome {
    /// An upgrade to run (the 101 has not been written yet: see [`write_switching`]).
    Upgrade(Box<Upgrade>),
    /// An HTTP exchange that is complete (static file or error answered).
    Answered {
        /// Status sent.
        status: StatusCode,
        /// Why, for the log.
        reason: String,
    },
}

/// Static-file settings of a listener.
#[derive(Clone)]
pub struct WebRoot {
    /// Files are served from here.
    pub resolver: hyper_staticfile::Resolver,
    /// The directory (for listings).
    pub dir: std::path::PathBuf,
    /// List directories that have no `index.html`.
    pub listing: bool,
}

impl std::fmt::Debug for WebRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRoot")
            .field("dir", &self.dir)
            .field("listing", &self.listing)
            .finish()
    }
}

/// Decides what a request is; error answers and static files are written to `io` before
/// returning (the caller bounds this with the write deadline).
///
/// # Errors
/// [`Rejection::BadRequest`] / [`Rejection::Io`] when the socket failed; statuses that were
/// answered come back as [`Outcome::Answered`].
pub async fn respond<S>(
    io: &mut S,
    head: Result<Head, Rejection>,
    routes: &RouteTable,
    web: Option<&WebRoot>,
    client_cn: Option<&str>,
) -> Result<Outcome, Rejection>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (request, leftover) = match head {
        Ok(v) => v,
        Err(Rejection::Status { status, reason }) => return answer(io, status, &reason, &[]).await,
        Err(e) => return Err(e),
    };
    // A HEAD request gets the headers a GET would, and no body (RFC 9110 §9.3.2).
    let body = request.method() != Method::HEAD;
    match decide(request, leftover, routes, web, client_cn).await {
        Decision::Upgrade(u) => Ok(Outcome::Upgrade(u)),
        Decision::Reject { status, reason, headers } => write_answer(io, status, &reason, &headers, body).await,
        Decision::Static(request, web) => serve_static(io, &request, web).await,
    }
}

enum Decision<'w> {
    Upgrade(Box<Upgrade>),
    Reject {
        status: StatusCode,
        reason: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Static(Request<()>, &'w WebRoot),
}

fn reject<'w>(status: StatusCode, reason: impl Into<String>) -> Decision<'w> {
    Decision::Reject {
        status,
        reason: reason.into(),
        headers: Vec::new(),
    }
}

async fn decide<'w>(
    request: Request<()>,
    leftover: Vec<u8>,
    routes: &RouteTable,
    web: Option<&'w WebRoot>,
    client_cn: Option<&str>,
) -> Decision<'w> {
    let headers = request.headers();
    if !header_has_token(headers, &header::UPGRADE, "websocket") {
        // A plain HTTP request.
        let is_get = matches!(*request.method(), Method::GET | Method::HEAD);
        let path = request.uri().path();
        let exact = routes.has_exact_path(path);
        if let (Some(web), false) = (web, exact) {
            return match is_get {
                true => Decision::Static(request, web),
                false => Decision::Reject {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    reason: format!("method {} not allowed", request.method()),
                    headers: vec![(header::ALLOW, HeaderValue::from_static("GET, HEAD"))],
                },
            };
        }
        return match exact || routes.has_any_path() {
            true if !is_get => Decision::Reject {
                status: StatusCode::METHOD_NOT_ALLOWED,
                reason: format!("method {} not allowed", request.method()),
                headers: vec![(header::ALLOW, HeaderValue::from_static("GET"))],
            },
            true => Decision::Reject {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: "this is a WebSocket endpoint: upgrade required".into(),
                headers: vec![
                    (header::UPGRADE, HeaderValue::from_static("websocket")),
                    (header::CONNECTION, HeaderValue::from_static("Upgrade")),
                ],
            },
            false => reject(StatusCode::NOT_FOUND, "not found"),
        };
    }

    if request.method() != Method::GET {
        return Decision::Reject {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: format!("a WebSocket upgrade must be a GET, not {}", request.method()),
            headers: vec![(header::ALLOW, HeaderValue::from_static("GET"))],
        };
    }
    let route = match routes.lookup(&request).await {
        Ok(route) => route,
        Err(miss) => return reject(StatusCode::NOT_FOUND, miss.to_string()),
    };
    if !route.admits(client_cn) {
        let reason = match client_cn {
            None => format!("{} needs a client certificate", route.name),
            Some(cn) => format!("client certificate {cn:?} is not allowed on {}", route.name),
        };
        return reject(StatusCode::FORBIDDEN, reason);
    }
    if request.version() != Version::HTTP_11 {
        return reject(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1");
    }
    if !header_has_token(headers, &header::CONNECTION, "upgrade") {
        return reject(StatusCode::BAD_REQUEST, "missing `Connection: Upgrade`");
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if !version_ok {
        return Decision::Reject {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "unsupported Sec-WebSocket-Version (only 13 is)".into(),
            headers: vec![(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"))],
        };
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) if is_valid_key(k.as_bytes()) => k.as_bytes().trim_ascii().to_vec(),
        _ => return reject(StatusCode::BAD_REQUEST, "missing or malformed Sec-WebSocket-Key"),
    };
    let Some(slot) = route.try_enter() else {
        return Decision::Reject {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("{} is at its session limit", route.name),
            headers: vec![(header::RETRY_AFTER, HeaderValue::from_static("5"))],
        };
    };
    let subprotocol = choose_subprotocol(headers, &route.options.subprotocols);
    let accept_key = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    Decision::Upgrade(Box::new(Upgrade {
        route,
        request,
        subprotocol,
        leftover,
        accept_key,
        slot,
    }))
}

/// The first subprotocol the client offers (its order is its preference) that the route accepts.
/// Offers are comma-separated, possibly over several headers, with any spacing.
/// `binary` is always accepted: noVNC and websockify clients offer it, and routes name others.
pub fn choose_subprotocol(headers: &HeaderMap, accepted: &[String]) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|offer| *offer == "binary" || accepted.iter().any(|a| a == offer))
        .map(str::to_owned)
}

/// A key is the base64 of 16 bytes: 22 characters and `==`.
fn is_valid_key(k: &[u8]) -> bool {
    let k = k.trim_ascii();
    k.len() == 24 && k.ends_with(b"==") && k[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Whether a comma-separated header contains `token` (case-insensitive), as `Connection:
/// keep-alive, Upgrade` does.
fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A parsed request head and the bytes that followed it.
pub type Head = (Request<()>, Vec<u8>);

/// Reads the request head from `io` (the part a slow or silent client controls, which the caller
/// bounds with the handshake deadline); returns it and the bytes after it.
///
/// # Errors
/// [`Rejection::Status`] for a head that must be answered with an error (400, 431), which
/// [`respond`] writes; [`Rejection::BadRequest`] / [`Rejection::Io`] when there is nobody to answer.
pub async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Result<Head, Rejection> {
    // One allocation that holds a typical head (a browser's is under 1 KiB), filled in place:
    // `read_buf` reads into the spare capacity, with no zeroing and no copy as it grows.
    let mut buf = Vec::with_capacity(4096);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(Rejection::Status {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                reason: format!("request head over {MAX_HEAD} bytes"),
            });
        }
        // Read at most up to the limit, so a flood cannot grow the buffer past it.
        let room = (MAX_HEAD - buf.len()).min(4096);
        let start = buf.len();
        buf.reserve(room);
        let n = io.read_buf(&mut bytes::BufMut::limit(&mut buf, room)).await?;
        if n == 0 {
            return Err(Rejection::BadRequest(if buf.is_empty() {
                "connection closed before a request".into()
            } else {
                "connection closed in the middle of the request head".into()
            }));
        }
        // Parse only when the new bytes may end the head (a blank line): a client that sends a
        // byte at a time must not make us re-parse up to 16 KiB per byte.
        let window = &buf[start.saturating_sub(3)..];
        if window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n") {
            if let Some(parsed) = parse_head(&buf)? {
                return Ok(parsed);
            }
        }
    }
}

/// Parses a complete head out of `buf`, or `None` if more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Rejection> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::Status {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                reason: format!("more than {MAX_HEADERS} headers"),
            })
        }
        Err(e) => {
            return Err(Rejection::Status {
                status: StatusCode::BAD_REQUEST,
                reason: format!("malformed request: {e}"),
            })
        }
    };
    let bad = |what: &str| Rejection::Status {
        status: StatusCode::BAD_REQUEST,
        reason: format!("malformed request: {what}"),
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| bad("method"))?;
    let uri: Uri = req.path.unwrap_or("").parse().map_err(|_| bad("request target"))?;
    if uri.path_and_query().is_none() || !uri.path().starts_with('/') {
        return Err(bad("request target must be a path"));
    }
    let version = if req.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut builder = Request::builder().method(method).uri(uri).version(version);
    let headers = builder.headers_mut().ok_or_else(|| bad("head"))?;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("header value"))?;
        headers.append(name, value);
    }
    let request = builder.body(()).map_err(|_| bad("head"))?;
    Ok(Some((request, buf[len..].to_vec())))
}

/// Writes `101 Switching Protocols` for an accepted upgrade.
///
/// # Errors
/// The write failed.
pub async fn write_switching<S: AsyncWrite + Unpin>(io: &mut S, upgrade: &Upgrade) -> std::io::Result<()> {
    let mut head = String::with_capacity(160);
    head.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    head.push_str(&upgrade.accept_key);
    if let Some(p) = &upgrade.subprotocol {
        head.push_str("\r\nSec-WebSocket-Protocol: ");
        head.push_str(p);
    }
    head.push_str("\r\n\r\n");
    io.write_all(head.as_bytes()).await?;
    io.flush().await
}

/// Writes a short plain-text answer (Content-Length computed, `Connection: close`) and returns it
/// as the outcome. The server uses it too, for answers given before a request is read.
pub(crate) async fn answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    reason: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> Result<Outcome, Rejection> {
    write_answer(io, status, reason, extra, true).await
}

/// [`answer`], with the body left out when `with_body` is false (an answer to HEAD).
async fn write_answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    reason: &str,
    extra: &[(HeaderName, HeaderValue)],
    with_body: bool,
) -> Result<Outcome, Rejection> {
    let head = answer_text(status, reason, extra, with_body);
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;
    Ok(Outcome::Answered {
        status,
        reason: reason.to_owned(),
    })
}

/// The text of [`answer`]: status line, headers and (unless `with_body` is false) the body.
pub(crate) fn answer_text(status: StatusCode, reason: &str, extra: &[(HeaderName, HeaderValue)], with_body: bool) -> String {
    let body = format!("{} {}: {reason}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut head = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in extra {
        let _ = write!(head, "{}: {}\r\n", name, value.to_str().unwrap_or(""));
    }
    let _ = write!(
        head,
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        head.push_str(&body);
    }
    head
}

/// Serves one static file (or a listing, or the resolver's 301/404/403) and closes.
async fn serve_static<S: AsyncWrite + Unpin>(io: &mut S, request: &Request<()>, web: &WebRoot) -> Result<Outcome, Rejection> {
    let resolved = web.resolver.resolve_request(request).await?;
    if web.listing && matches!(resolved, hyper_staticfile::ResolveResult::NotFound) && request.uri().path().ends_with('/') {
        if let Some(html) = listing(&web.dir, request.uri().path()).await {
            let extra = [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))];
            return write_response(io, request, StatusCode::OK, &extra, Bytes::from(html)).await;
        }
    }
    let response = hyper_staticfile::ResponseBuilder::new()
        .request(request)
        .build(resolved)
        .map_err(|e| Rejection::Io(std::io::Error::other(e)))?;
    let (parts, mut body) = response.into_parts();
    if parts.status == StatusCode::NOT_FOUND {
        return write_answer(io, StatusCode::NOT_FOUND, "not found", &[], request.method() != Method::HEAD).await;
    }
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        let _ = write!(head, "{}: {}\r\n", name, value.to_str().unwrap_or(""));
    }
    if !parts.headers.contains_key(header::CONTENT_LENGTH) && !parts.headers.contains_key(header::TRANSFER_ENCODING) {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    io.write_all(head.as_bytes()).await?;
    if request.method() != Method::HEAD {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                io.write_all(&data).await?;
            }
        }
    }
    io.flush().await?;
    Ok(Outcome::Answered {
        status: parts.status,
        reason: "static file".into(),
    })
}

async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request<()>,
    status: StatusCode,
    extra: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<Outcome, Rejection> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in extra {
        let _ = write!(head, "{}: {}\r\n", name, value.to_str().unwrap_or(""));
    }
    let _ = write!(head, "Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    io.write_all(head.as_bytes()).await?;
    if request.method() != Method::HEAD {
        io.write_all(&body).await?;
    }
    io.flush().await?;
    Ok(Outcome::Answered {
        status,
        reason: "directory listing".into(),
    })
}

/// An HTML listing of the directory at request path `path`, or `None` if it is not a directory
/// inside the root. Every component must be a plain name: `..`, `.` and empty ones are refused
/// rather than normalised.
async fn listing(root: &Path, path: &str) -> Option<String> {
    let decoded: Vec<u8> = percent_decode(path.as_bytes())?;
    let decoded = String::from_utf8(decoded).ok()?;
    let mut dir = root.to_path_buf();
    for part in decoded.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." || part.contains('\\') || part.contains('\0') {
            return None;
        }
        dir.push(part);
    }
    let mut entries = tokio::fs::read_dir(&dir).await.ok()?;
    let mut names = Vec::new();
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
        names.push(if is_dir { format!("{name}/") } else { name });
    }
    names.sort();
    let title = html_escape(&decoded);
    let mut html = format!("<!doctype html><meta charset=utf-8><title>Index of {title}</title><h1>Index of {title}</h1><ul>");
    for n in names {
        let _ = write!(html, "<li><a href=\"{}\">{}</a></li>", html_escape(&n), html_escape(&n));
    }
    html.push_str("</ul>");
    Some(html)
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_choice() {
        let mut h = HeaderMap::new();
        h.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("base64 ,  binary"));
        let accepted = vec!["binary".to_string()];
        assert_eq!(choose_subprotocol(&h, &accepted).as_deref(), Some("binary"));
        let mut h = HeaderMap::new();
        h.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("chat"));
        assert_eq!(choose_subprotocol(&h, &accepted), None);
    }

    #[test]
    fn keys() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b"short=="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ!!"));
    }

    #[test]
    fn head_parsing() {
        let raw = b"GET /ws?token=a%20b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nFRAME";
        let (req, rest) = parse_head(raw).unwrap().unwrap();
        assert_eq!(req.uri().path(), "/ws");
        assert_eq!(req.uri().query(), Some("token=a%20b"));
        assert_eq!(rest, b"FRAME");
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost").unwrap().is_none());
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(Rejection::Status {
                status: StatusCode::BAD_REQUEST,
                ..
            })
        ));
    }

    #[test]
    fn listing_refuses_traversal() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(listing(Path::new("/"), "/../etc/")).is_none());
        assert!(rt.block_on(listing(Path::new("/"), "/%2e%2e/")).is_none());
    }
}
