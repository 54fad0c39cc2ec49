//! Static files for a web client (`--web DIR`, noVNC's pages): one file, or a directory listing
//! when the listener asks for listings, answered and closed.
//!
//! Files are resolved by `hyper-staticfile`, which answers ranges and conditional requests.

use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::request::{write_answer, Rejection};

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

/// Serves one static file (or a listing, or the resolver's 301/404/403) and closes. Returns the
/// status sent and what it was, for the log.
///
/// # Errors
/// Reading the file or writing to the client failed.
pub(crate) async fn serve<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request<()>,
    web: &WebRoot,
) -> Result<(StatusCode, &'static str), Rejection> {
    let resolved = web.resolver.resolve_request(request).await?;
    if web.listing && matches!(resolved, hyper_staticfile::ResolveResult::NotFound) && request.uri().path().ends_with('/') {
        if let Some(html) = listing(&web.dir, request.uri().path()).await {
            let extra = [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))];
            write_response(io, request, StatusCode::OK, &extra, Bytes::from(html)).await?;
            return Ok((StatusCode::OK, "directory listing"));
        }
    }
    let response = hyper_staticfile::ResponseBuilder::new()
        .request(request)
        .build(resolved)
        .map_err(|e| Rejection::Io(std::io::Error::other(e)))?;
    let (parts, mut body) = response.into_parts();
    if parts.status == StatusCode::NOT_FOUND {
        write_answer(io, StatusCode::NOT_FOUND, "not found", &[], request.method() != Method::HEAD).await?;
        return Ok((StatusCode::NOT_FOUND, "not found"));
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
    Ok((parts.status, "static file"))
}

async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request<()>,
    status: StatusCode,
    extra: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<(), Rejection> {
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
    Ok(())
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
    fn listing_refuses_traversal() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(listing(Path::new("/"), "/../etc/")).is_none());
        assert!(rt.block_on(listing(Path::new("/"), "/%2e%2e/")).is_none());
    }
}
