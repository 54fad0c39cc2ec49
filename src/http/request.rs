//! Reading one request head and writing a short answer: the pieces both the upgrade path and
//! static files use, and the server for answers given before a request is read.

use std::fmt::Write as _;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// The largest request head accepted (request line and headers); above it: 431. nginx's default
/// reach (four 8 KiB header buffers): a page on a domain whose cookies are large still gets in.
pub const MAX_HEAD: usize = 32 * 1024;
/// The most header lines accepted; above it: 431 (websockify's limit, Python's http.server's).
pub const MAX_HEADERS: usize = 100;

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

/// A parsed request head and the bytes that followed it.
pub type Head = (Request<()>, Vec<u8>);

/// [`read_request`] on a connection that carries another request after one answered (HTTP
/// keep-alive): `carried` holds the bytes read after the previous head (a client that sends its
/// next requests without waiting: pipelining), which come first. The bytes after this head are
/// returned as ever, what is left of `carried` included; bounded, as the head is by
/// [`MAX_HEAD`] and what follows it by one read.
///
/// # Errors
/// As [`read_request`].
pub async fn read_request_after<S: AsyncRead + Unpin>(io: &mut S, carried: Vec<u8>) -> Result<Head, Rejection> {
    if carried.is_empty() {
        return read_request(io).await;
    }
    let mut chained = (&carried[..]).chain(io);
    let (request, mut leftover) = read_request(&mut chained).await?;
    let (rest, _) = chained.into_inner();
    leftover.extend_from_slice(rest);
    Ok((request, leftover))
}

/// Reads the request head from `io` (the part a slow or silent client controls, which the caller
/// bounds with the handshake deadline); returns it and the bytes after it.
///
/// # Errors
/// [`Rejection::Status`] for a head that must be answered with an error (400, 431), which
/// [`crate::http::respond`] writes; [`Rejection::BadRequest`] / [`Rejection::Io`] when there is
/// nobody to answer.
pub async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Result<Head, Rejection> {
    // One allocation that holds a typical head (a browser's is under 1 KiB), filled in place:
    // `read_buf` reads into the spare capacity, with no zeroing and no copy as it grows.
    let mut buf = Vec::with_capacity(4096);
    // Where the request line starts: the parser skips empty lines before it (RFC 9112 §2.2),
    // so a blank line among them ends nothing, and parsing there would say "incomplete"
    // and then miss an error that arrives later, making the answer depend on read sizes.
    let mut request_start = None;
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
        // byte at a time must not make us re-parse up to MAX_HEAD per byte.
        if request_start.is_none() {
            request_start = buf[start..].iter().position(|b| !matches!(b, b'\r' | b'\n')).map(|i| start + i);
        }
        let Some(request_start) = request_start else { continue };
        let window = &buf[start.saturating_sub(3).max(request_start)..];
        if window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n") {
            if let Some(parsed) = parse_head(&buf)? {
                return Ok(parsed);
            }
        }
    }
}

/// Parses a complete head out of `buf`, or `None` if more bytes are needed.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<Head>, Rejection> {
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

/// Writes a short plain-text answer (Content-Length computed, `Connection: close`). The server
/// uses it too, for answers given before a request is read.
///
/// # Errors
/// The write failed.
pub(crate) async fn answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    reason: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> Result<(), Rejection> {
    write_answer(io, status, reason, extra, true).await
}

/// [`answer`], with the body left out when `with_body` is false (an answer to HEAD).
pub(crate) async fn write_answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: StatusCode,
    reason: &str,
    extra: &[(HeaderName, HeaderValue)],
    with_body: bool,
) -> Result<(), Rejection> {
    let head = answer_text(status, reason, extra, with_body);
    io.write_all(head.as_bytes()).await?;
    io.flush().await?;
    Ok(())
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

/// Ends an answered connection cleanly: FIN (close_notify over TLS), then up to 64 KiB of what the
/// client still sends is read and dropped for at most `wait`, so that closing a socket with unread
/// request bytes does not reset the connection and destroy the answer before the client reads it.
pub(crate) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, wait: Duration) {
    linger_up_to(stream, wait, 64 * 1024).await;
}

/// [`linger`], reading and dropping up to `max` bytes.
pub(crate) async fn linger_up_to<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, wait: Duration, max: usize) {
    let _ = timeout(wait, async {
        stream.shutdown().await?;
        // On the heap: an array here would sit in every connection's future, used or not. 4 KiB
        // for an answered request's leftovers (every 404 and 401 lingers with one); 64 KiB only
        // for the relay's drain of a large message after a client's error.
        let mut buf = vec![0u8; if max > 64 * 1024 { 64 * 1024 } else { 4096 }];
        let mut total = 0;
        while total < max {
            match stream.read(&mut buf).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
