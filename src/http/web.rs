//! Static files for a web client (`--web DIR`, noVNC's pages): one file, or a directory listing
//! when the listener asks for listings, on a connection kept open for the next request when the
//! request and the server allow it (HTTP/1.1 keep-alive: see [`serve`] and [`keeps_alive`]; the
//! loop over requests is `server::Bridge::http`'s), every answer of a known length.
//!
//! Files are resolved by `hyper-staticfile`, which answers ranges (206, 416; a Range that would
//! send more than the file is taken away first, see [`ranges_amplify`]). Conditional
//! requests are decided here in RFC 9110's order ([`precondition_failed`], [`not_modified`]):
//! `If-Match` (strong) or else `If-Unmodified-Since`, a 412; then `If-None-Match` (the ETag, or
//! `*`) or else `If-Modified-Since`, a 304 carrying the validators and no body. What may be served is decided
//! here too, before and under it:
//! - the request path is checked segment by segment, percent-decoded: a `.` or `..` segment
//!   (`/a/../b`, `/%2e%2e/`), an encoded `/` or `\` (`..%2fsecret`), a NUL or a path that is not
//!   UTF-8 is refused with 404, not normalised (browsers never send them);
//! - hidden files and directories (`.git/`, `.env`) are refused with 404 and left out of listings,
//!   unless the listener allows them (`web_dotfiles`);
//! - a file or directory is opened by its real path (symlinks resolved), and refused with 404
//!   when that path is outside the web root or hidden, unless the listener follows symlinks
//!   (`web_follow_symlinks`). A symlink that stays inside the root works.
//!
//! Listing links are URL-encoded (a file named `a b#c` links to `a%20b%23c`) and HTML-escaped.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_staticfile::vfs::{FileOpener, FileWithMetadata, TokioFileOpener};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::request::Rejection;

/// What a request for a static file must pass (a listener's `web_auth` and `web_client_cn`,
/// websockify's `--web-auth`), with its files read. Built with the configuration (its htpasswd
/// or token file is read again on a reload, as a route's is); the check itself is the upgrade
/// decision's ([`super::upgrade`]), so that both answer alike.
#[derive(Debug)]
pub struct WebGuard {
    /// Credentials asked for, when any are.
    pub(crate) auth: Option<crate::policy::auth::Authenticator>,
    /// Only these certificate common names, when set.
    pub(crate) client_cn: Option<Vec<String>>,
}

impl WebGuard {
    /// The guard `settings` describe.
    ///
    /// # Errors
    /// A file that cannot be read or holds nothing usable, named with its problem.
    pub fn new(settings: &crate::config::policy::WebAuth) -> Result<WebGuard, String> {
        Ok(WebGuard {
            auth: settings.auth.as_ref().map(|a| a.authenticator()).transpose()?,
            client_cn: settings.client_cn.clone(),
        })
    }

    /// Whether a client with this certificate common name may fetch static files.
    pub(crate) fn admits(&self, client_cn: Option<&str>) -> bool {
        match &self.client_cn {
            None => true,
            Some(allowed) => client_cn.is_some_and(|cn| allowed.iter().any(|a| a == cn)),
        }
    }
}

/// Admits nobody: for a listener whose guard cannot be found (never in a bridge serving its own
/// configuration), so that static files that should be protected are not served.
pub(crate) static DENY_ALL: WebGuard = WebGuard {
    auth: None,
    client_cn: Some(Vec::new()),
};

/// A listener's static files as one request sees them: the files and who may fetch them.
#[derive(Debug, Clone, Copy)]
pub struct Web<'a> {
    /// The files.
    pub root: &'a WebRoot,
    /// What a request must pass first (`web_auth`), if anything.
    pub guard: Option<&'a WebGuard>,
}

/// Static-file settings of a listener.
#[derive(Clone)]
pub struct WebRoot {
    /// Files are served from here, through [`Guarded`].
    resolver: hyper_staticfile::Resolver<Guarded>,
    /// The directory (for listings).
    dir: PathBuf,
    /// List directories that have no `index.html`.
    listing: bool,
    /// Who may be reached: symlinks out of the root, hidden files.
    reach: Reach,
}

/// What beyond plain files under the root may be served.
#[derive(Debug, Clone, Copy)]
struct Reach {
    /// Serve what a symlink points to even outside the root.
    follow_symlinks: bool,
    /// Serve and list names that start with a dot.
    dotfiles: bool,
}

impl WebRoot {
    /// Static files from `dir`; `listing` lists directories without an `index.html`;
    /// `follow_symlinks` serves what symlinks point to outside `dir`; `dotfiles` serves hidden
    /// files. The last two are off in a safe setup.
    pub fn new(dir: &Path, listing: bool, follow_symlinks: bool, dotfiles: bool) -> WebRoot {
        let reach = Reach { follow_symlinks, dotfiles };
        WebRoot {
            resolver: hyper_staticfile::Resolver::with_opener(Guarded {
                root: dir.to_path_buf(),
                inner: Arc::new(TokioFileOpener::new(dir)),
                reach,
            }),
            dir: dir.to_path_buf(),
            listing,
            reach,
        }
    }
}

impl std::fmt::Debug for WebRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRoot")
            .field("dir", &self.dir)
            .field("listing", &self.listing)
            .field("follow_symlinks", &self.reach.follow_symlinks)
            .field("dotfiles", &self.reach.dotfiles)
            .finish()
    }
}

/// Opens files for `hyper-staticfile` by their real path, after checking it is inside the root
/// and not hidden (as [`Reach`] allows). Every open goes through here, the directory index
/// (`index.html`) included, so no path into the root's files is left unchecked.
struct Guarded {
    root: PathBuf,
    inner: Arc<TokioFileOpener>,
    reach: Reach,
}

type Opened = io::Result<FileWithMetadata<tokio::fs::File>>;

impl FileOpener for Guarded {
    type File = tokio::fs::File;
    type Future = Pin<Box<dyn Future<Output = Opened> + Send>>;

    fn open(&self, path: &Path) -> Self::Future {
        let inner = self.inner.clone();
        let (root, path, reach) = (self.root.clone(), path.to_path_buf(), self.reach);
        Box::pin(async move {
            let real = tokio::task::spawn_blocking(move || servable(&root, &path, reach))
                .await
                .map_err(io::Error::other)??;
            inner.open(&real).await
        })
    }
}

/// `path` (relative to `root`) as the opener should open it, or "not found": see
/// [`inside_root`], and only regular files and directories. Opening a FIFO or a device would
/// wait (a FIFO with no writer, forever) and hold a blocking thread per request.
fn servable(root: &Path, path: &Path, reach: Reach) -> io::Result<PathBuf> {
    let real = match reach.follow_symlinks {
        true => path.to_path_buf(),
        false => inside_root(root, path, reach)?,
    };
    let kind = std::fs::metadata(root.join(&real))?.file_type();
    if !kind.is_file() && !kind.is_dir() {
        tracing::debug!(path = %path.display(), "static file refused: not a regular file or directory");
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok(real)
}

/// Whether `e` is ELOOP: too many symlinks on the way.
fn is_symlink_loop(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// Static files refused by policy, said at info: at most one a 10 s.
static STATIC_REFUSED: crate::logging::Quieted = crate::logging::Quieted::new(std::time::Duration::from_secs(10));

/// `path` (relative to `root`) resolved through its symlinks, as a path relative to the root's
/// real path. A path that leads out of the root, or to a hidden name when those are not served,
/// is "not found": the client learns nothing of what is there.
fn inside_root(root: &Path, path: &Path, reach: Reach) -> io::Result<PathBuf> {
    let real_root = std::fs::canonicalize(root)?;
    let real = std::fs::canonicalize(root.join(path))?;
    // At info, with what serves it: a web root that is a tree of symlinks (`novnc ->
    // /usr/share/novnc`) is a common layout, and its 404s said nothing at the default level.
    // At most one a 10 s (any client can ask again and again on one connection).
    let refused = |why: &str| {
        match STATIC_REFUSED.take() {
            Some(left_out) => tracing::info!(path = %path.display(), why, left_out, "static file refused (answered 404)"),
            None => tracing::debug!(path = %path.display(), why, "static file refused (answered 404)"),
        }
        io::Error::from(io::ErrorKind::NotFound)
    };
    let Ok(inside) = real.strip_prefix(&real_root) else {
        return Err(refused(
            "a symlink leads out of the web root (--web-follow-symlinks, or web_follow_symlinks = true, serves it)",
        ));
    };
    if !reach.dotfiles && inside.iter().any(|c| c.as_encoded_bytes().starts_with(b".")) {
        return Err(refused(
            "a symlink leads to a hidden file (--web-dotfiles, or web_dotfiles = true, serves it)",
        ));
    }
    Ok(inside.to_path_buf())
}

/// The request path's segments, percent-decoded, or why it is refused: `.` and `..` segments, an
/// encoded `/` or `\`, a NUL, text that is not UTF-8, and (unless allowed) hidden names.
fn segments(path: &str, reach: Reach) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let s = percent_decode_str(raw).decode_utf8().map_err(|_| "the path is not UTF-8")?;
        if s == "." || s == ".." {
            return Err("a `.` or `..` segment in the path");
        }
        if s.contains(['/', '\\', '\0']) {
            return Err("an encoded `/`, `\\` or NUL in the path");
        }
        if !reach.dotfiles && s.starts_with('.') {
            return Err("a hidden file in the path");
        }
        out.push(s.into_owned());
    }
    Ok(out)
}

/// What [`serve`] sent: its status, what it was (for the log), and whether the connection may
/// carry another request (the answer said nothing of closing and gave its length).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served {
    pub status: StatusCode,
    pub what: &'static str,
    pub kept: bool,
}

/// Serves one static file (or a listing, or the resolver's 301/404/403). With `keep_alive` (the
/// request allows it: see [`keeps_alive`]) an answer whose length is known leaves the connection
/// open for the next request, as websockify's does (a noVNC page is some 60 files: over wss://
/// each new connection is a TLS handshake); otherwise it says `Connection: close`.
///
/// # Errors
/// Reading the file or writing to the client failed.
pub(crate) async fn serve<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request<()>,
    web: &WebRoot,
    keep_alive: bool,
) -> Result<Served, Rejection> {
    let with_body = request.method() != Method::HEAD;
    let segs = match segments(request.uri().path(), web.reach) {
        Ok(segs) => segs,
        Err(why) => return not_found(io, request, keep_alive, why).await,
    };
    let resolved = match web.resolver.resolve_request(request).await {
        Ok(resolved) => resolved,
        // A name longer than the file system takes (255 bytes) is no file here: a 404, where the
        // connection was dropped without an answer (a review).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidFilename => {
            return not_found(
                io,
                request,
                keep_alive,
                "not found: a name in the path is longer than file names can be",
            )
            .await
        }
        // A path through a file (`/vnc.html/x`), or a loop of symlinks: no file there either,
        // where the connection was dropped unanswered (a review).
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory || is_symlink_loop(&e) => {
            return not_found(io, request, keep_alive, "not found").await
        }
        Err(e) => return Err(e.into()),
    };
    if web.listing && matches!(resolved, hyper_staticfile::ResolveResult::NotFound) && request.uri().path().ends_with('/') {
        if let Some(html) = listing(web, &segs).await {
            let extra = [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))];
            write_response(io, request, StatusCode::OK, &extra, Bytes::from(html), keep_alive).await?;
            return Ok(Served {
                status: StatusCode::OK,
                what: "directory listing",
                kept: keep_alive,
            });
        }
    }
    let size = match &resolved {
        hyper_staticfile::ResolveResult::Found(file) => Some(file.size),
        _ => None,
    };
    let found = size.is_some();
    // hyper-staticfile answers If-Modified-Since itself (a 304 without the ETag), but knows
    // nothing of If-None-Match, which when present overrides it (RFC 9110 §13.2.2): the
    // preconditions are decided here, on the answer it would give otherwise. It serves every
    // range it is asked for, overlapping or not: a Range that would send more than the file is
    // taken away here (see [`ranges_amplify`]), and the file is answered once, with a 200.
    let without_since;
    let drop_range = size.is_some_and(|size| ranges_amplify(request.headers(), size));
    let headers = match request.headers().contains_key(header::IF_MODIFIED_SINCE) || drop_range {
        true => {
            let mut h = request.headers().clone();
            h.remove(header::IF_MODIFIED_SINCE);
            if drop_range {
                h.remove(header::RANGE);
            }
            without_since = h;
            &without_since
        }
        false => request.headers(),
    };
    let response = hyper_staticfile::ResponseBuilder::new()
        .request_parts(request.method(), request.uri(), headers)
        .build(resolved)
        .map_err(|e| Rejection::Io(std::io::Error::other(e)))?;
    let (mut parts, mut body) = response.into_parts();
    if parts.status == StatusCode::NOT_FOUND {
        // A directory without index.html (Debian's noVNC has none: websockify lists it).
        // A directory itself, not a symlink to one (which may lead out of the root, where a
        // listing would not be served either).
        let is_dir = || std::fs::symlink_metadata(segs.iter().fold(web.dir.clone(), |p, s| p.join(s))).is_ok_and(|m| m.is_dir());
        let why = match !web.listing && request.uri().path().ends_with('/') && is_dir() {
            true => "not found: a directory without index.html, and listings are off (--web-listing, or web_listing = true)",
            false => "not found",
        };
        return not_found(io, request, keep_alive, why).await;
    }
    if let (StatusCode::RANGE_NOT_SATISFIABLE, Some(size)) = (parts.status, size) {
        // The length the ranges missed (§15.5.17), which hyper-staticfile leaves out.
        if let Ok(v) = HeaderValue::try_from(format!("bytes */{size}")) {
            parts.headers.insert(header::CONTENT_RANGE, v);
        }
    }
    // If-Match and If-Unmodified-Since come first (§13.2.2): a file that is no longer the one
    // the client names gets 412 and nothing of it.
    let failed = found && precondition_failed(request.headers(), &parts.headers);
    if failed {
        let mut kept = http::HeaderMap::new();
        for name in [header::ETAG, header::LAST_MODIFIED] {
            if let Some(v) = parts.headers.get(&name) {
                kept.insert(name, v.clone());
            }
        }
        (parts.status, parts.headers) = (StatusCode::PRECONDITION_FAILED, kept);
    }
    let unchanged = found && !failed && not_modified(request.headers(), &parts.headers);
    if unchanged {
        // What a 304 carries of the 200 it stands for (§15.4.5): its validators and caching
        // headers; no body, and no Content-Length but the file's (§8.6), so none.
        let mut kept = http::HeaderMap::new();
        for name in [
            header::ETAG,
            header::LAST_MODIFIED,
            header::CACHE_CONTROL,
            header::EXPIRES,
            header::VARY,
        ] {
            if let Some(v) = parts.headers.get(&name) {
                kept.insert(name, v.clone());
            }
        }
        (parts.status, parts.headers) = (StatusCode::NOT_MODIFIED, kept);
    }
    if parts.status == StatusCode::MOVED_PERMANENTLY {
        // A directory asked for without its `/`. hyper-staticfile writes the path back
        // percent-decoded: empty for a name that is not ASCII (a browser then asks for the same
        // URL again, for ever), `/a b/` with a raw space, `/q?x/` for a directory named `q?x`.
        // The request's own path is still encoded as the client sent it.
        // One leading `/`: the resolver ignores empty segments, so `//app` finds the directory
        // `app`, and `//app/` as a Location is another host's URL (scheme-relative).
        let path = format!("/{}", request.uri().path().trim_start_matches('/'));
        let to = match request.uri().query() {
            Some(query) => format!("{path}/?{query}"),
            None => format!("{path}/"),
        };
        if let Ok(v) = HeaderValue::try_from(to) {
            parts.headers.insert(header::LOCATION, v);
        }
    }
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    put_headers(&mut head, &parts.headers);
    if !unchanged && !parts.headers.contains_key(header::CONTENT_LENGTH) && !parts.headers.contains_key(header::TRANSFER_ENCODING) {
        head.extend_from_slice(b"Content-Length: 0\r\n");
    }
    // The body is written as it comes: its end is known to the client only by its length.
    let kept = keep_alive && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    head.extend_from_slice(if kept { b"\r\n" } else { b"Connection: close\r\n\r\n" });
    io.write_all(&head).await?;
    if with_body && !unchanged && !failed {
        let promised = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut sent = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                io.write_all(&data).await?;
                sent += data.len() as u64;
            }
        }
        // A file cut short while it was sent (rewritten in place): the client waits for the
        // rest, so the connection must end, not wait for another request.
        if promised.is_some_and(|n| n != sent) {
            io.flush().await?;
            return Err(Rejection::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the file changed while it was sent: {sent} of {} bytes",
                    promised.unwrap_or_default()
                ),
            )));
        }
    }
    io.flush().await?;
    Ok(Served {
        status: parts.status,
        what: "static file",
        kept,
    })
}

/// The most ranges of a file one answer serves (a multipart 206). Players and resumable
/// downloads ask for one range; the clients that ask for several (PDF viewers fetching pages,
/// download managers) ask for a few. Each part costs its own header (some 100 bytes) besides
/// its bytes, so without a bound `bytes=0-0,2-2,4-4,…` in a 32 KiB request head would still
/// make an answer several times its size; 16 keeps that overhead to a couple of kilobytes.
const MAX_RANGES: usize = 16;

/// Whether the request's `Range` asks for more than a file of `size` bytes once: more than
/// [`MAX_RANGES`] ranges, or ranges that overlap (`bytes=0-,0-,…` would send the whole file
/// once per range). Such a Range is ignored, as RFC 9110 §14.2 allows (the answer is the file,
/// once, with a 200; nginx and Apache refuse these too). One range is always served as it is,
/// and so is a Range that is not well-formed or that nothing of the file satisfies
/// (hyper-staticfile ignores the one and answers the other with 416). Ranges are read with the
/// parser hyper-staticfile uses, so those judged here are those it would serve.
fn ranges_amplify(request: &http::HeaderMap, size: u64) -> bool {
    let Some(range) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Ok(mut ranges) = http_range::HttpRange::parse(range, size) else {
        return false;
    };
    if ranges.len() <= 1 {
        return false;
    }
    if ranges.len() > MAX_RANGES {
        return true;
    }
    ranges.sort_by_key(|r| r.start);
    // Sorted and none overlapping the next: together no more than the file.
    ranges.windows(2).any(|w| w[0].start + w[0].length > w[1].start)
}

/// Whether a file's answer (`response`: the 200, 206 or 416 it would get) is a 304 for a GET or
/// HEAD with these request headers (RFC 9110 §13.1.1, §13.1.3, in the order of §13.2.2): with
/// `If-None-Match`, when it is `*` (the file exists) or lists the file's ETag (weak comparison);
/// only without it, `If-Modified-Since`, when the file is no newer than that date (whole
/// seconds, as HTTP dates are). An unparsable date is no condition; a malformed tag list
/// matches what it listed well-formed before the fault.
fn not_modified(request: &http::HeaderMap, response: &http::HeaderMap) -> bool {
    let mut none_match = request.get_all(header::IF_NONE_MATCH).iter().peekable();
    if none_match.peek().is_some() {
        let etag = response.get(header::ETAG).and_then(|v| v.to_str().ok()).map(opaque_tag);
        return none_match.filter_map(|v| v.to_str().ok()).any(|list| lists_tag(list, etag));
    }
    let date = |map: &http::HeaderMap, name| {
        let v: &HeaderValue = map.get(name)?;
        httpdate::parse_http_date(v.to_str().ok()?).ok()
    };
    match (date(request, header::IF_MODIFIED_SINCE), date(response, header::LAST_MODIFIED)) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Whether a file's answer fails the request's `If-Match` (`*` matches any file; else the
/// strong comparison: a weak tag never matches, RFC 9110 §13.1.1) or, only without it,
/// `If-Unmodified-Since` (the file changed after that date; an unparsable date is no
/// condition, §13.1.4): the client's copy is not the file any more.
fn precondition_failed(request: &http::HeaderMap, response: &http::HeaderMap) -> bool {
    let mut if_match = request.get_all(header::IF_MATCH).iter().peekable();
    if if_match.peek().is_some() {
        let etag = response
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.starts_with("W/"));
        let matched = if_match
            .filter_map(|v| v.to_str().ok())
            .any(|list| list.trim() == "*" || (etag.is_some() && lists_strong_tag(list, etag)));
        return !matched;
    }
    let date = |map: &http::HeaderMap, name| {
        let v: &HeaderValue = map.get(name)?;
        httpdate::parse_http_date(v.to_str().ok()?).ok()
    };
    match (date(request, header::IF_UNMODIFIED_SINCE), date(response, header::LAST_MODIFIED)) {
        (Some(since), Some(modified)) => modified > since,
        _ => false,
    }
}

/// Whether a list of entity tags names `etag` by the strong comparison: its weak tags (`W/"x"`)
/// name nothing.
fn lists_strong_tag(list: &str, etag: Option<&str>) -> bool {
    let strong: Vec<&str> = list.split(',').map(str::trim).filter(|t| !t.starts_with("W/")).collect();
    lists_tag(&strong.join(", "), etag)
}

/// An entity tag without its weakness mark: what the weak comparison compares (`W/"x"` and
/// `"x"` are the same tag to it).
fn opaque_tag(tag: &str) -> &str {
    tag.trim().trim_start_matches("W/")
}

/// Whether an `If-None-Match` value (`*`, or a list of entity tags) matches a file whose ETag is
/// `etag` (opaque, quoted; `None`: it has none).
fn lists_tag(list: &str, etag: Option<&str>) -> bool {
    if list.trim() == "*" {
        return true;
    }
    let mut rest = list;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let Some(quoted) = rest.strip_prefix("W/").unwrap_or(rest).strip_prefix('"') else {
            return false;
        };
        let Some(end) = quoted.find('"') else { return false };
        if etag.is_some_and(|e| e.strip_prefix('"').and_then(|e| e.strip_suffix('"')) == Some(&quoted[..end])) {
            return true;
        }
        rest = &quoted[end + 1..];
    }
}

/// The 404 of a static request (`why`: for the log only).
async fn not_found<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request<()>,
    keep_alive: bool,
    why: &'static str,
) -> Result<Served, Rejection> {
    let body = Bytes::from_static(b"404 Not Found: not found\n");
    let extra = [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"))];
    write_response(io, request, StatusCode::NOT_FOUND, &extra, body, keep_alive).await?;
    Ok(Served {
        status: StatusCode::NOT_FOUND,
        what: why,
        kept: keep_alive,
    })
}

/// Whether `request` leaves its connection open for another once answered: HTTP/1.1 without
/// `Connection: close`, and no body (a GET or HEAD has none; one that comes anyway would be
/// read as the next request).
pub(crate) fn keeps_alive(request: &Request<()>) -> bool {
    let headers = request.headers();
    request.version() == http::Version::HTTP_11
        && !headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        })
        && !headers.contains_key(header::TRANSFER_ENCODING)
        // Every `Content-Length` (a second one, differing, would hide a request in a body).
        && headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.to_str().is_ok_and(|v| v.trim() == "0"))
}

async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    request: &Request<()>,
    status: StatusCode,
    extra: &[(HeaderName, HeaderValue)],
    body: Bytes,
    keep_alive: bool,
) -> Result<(), Rejection> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or("")).into_bytes();
    put_headers(&mut head, extra.iter().map(|(name, value)| (name, value)));
    let close = if keep_alive { "" } else { "Connection: close\r\n" };
    head.extend_from_slice(format!("Content-Length: {}\r\n{close}\r\n", body.len()).as_bytes());
    io.write_all(&head).await?;
    if request.method() != Method::HEAD {
        io.write_all(&body).await?;
    }
    io.flush().await?;
    Ok(())
}

/// Writes `name: value` lines, each value's bytes as they are (a value need not be text: never
/// written as an empty one).
fn put_headers<'a>(head: &mut Vec<u8>, headers: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>) {
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
}

/// An HTML listing of the directory at the request path's `parts` (checked by [`segments`]), or
/// `None` if it is not a directory that may be served. Entries that would not be served (hidden,
/// or symlinks out of the root, as the listener allows) are left out.
async fn listing(web: &WebRoot, parts: &[String]) -> Option<String> {
    let dir: PathBuf = parts.iter().collect();
    if !web.reach.follow_symlinks {
        let (root, rel, reach) = (web.dir.clone(), dir.clone(), web.reach);
        tokio::task::spawn_blocking(move || inside_root(&root, &rel, reach))
            .await
            .ok()?
            .ok()?;
    }
    let full = web.dir.join(&dir);
    let mut entries = tokio::fs::read_dir(&full).await.ok()?;
    let mut names = Vec::new();
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if !web.reach.dotfiles && name.starts_with('.') {
            continue;
        }
        if !web.reach.follow_symlinks {
            let (root, rel, reach) = (web.dir.clone(), dir.join(&name), web.reach);
            if !matches!(
                tokio::task::spawn_blocking(move || inside_root(&root, &rel, reach)).await,
                Ok(Ok(_))
            ) {
                continue;
            }
        }
        // Through symlinks: a link to a directory lists as one.
        let is_dir = tokio::fs::metadata(e.path()).await.map(|m| m.is_dir()).unwrap_or(false);
        names.push((name, is_dir));
    }
    names.sort();
    let title = html_escape(&format!("/{}", parts.iter().map(|p| format!("{p}/")).collect::<String>()));
    let mut html = format!("<!doctype html><meta charset=utf-8><title>Index of {title}</title><h1>Index of {title}</h1><ul>");
    for (name, is_dir) in names {
        let slash = if is_dir { "/" } else { "" };
        let href = utf8_percent_encode(&name, SEGMENT);
        let _ = write!(
            html,
            "<li><a href=\"./{}{slash}\">{}{slash}</a></li>",
            html_escape(&href.to_string()),
            html_escape(&name)
        );
    }
    html.push_str("</ul>");
    Some(html)
}

/// What a listing link percent-encodes in a name: everything but RFC 3986's unreserved
/// characters, so no name can read as a scheme (`javascript:`), a query, a fragment or a path.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAFE: Reach = Reach {
        follow_symlinks: false,
        dotfiles: false,
    };

    #[test]
    fn traversal_and_hidden_names_are_refused_not_normalised() {
        assert_eq!(segments("/sub/a%20b.js", SAFE).unwrap(), ["sub", "a b.js"]);
        assert_eq!(segments("//sub//", SAFE).unwrap(), ["sub"]);
        for bad in [
            "/../etc/passwd",
            "/sub/../x",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/./x",
            "/..%2fx",
            "/sub%2f..%2f..%2fx",
            "/a%5c..%5cx",
            "/a%00b",
            "/%ff",
            "/.git/config",
            "/.env",
            "/sub/.htpasswd",
        ] {
            assert!(segments(bad, SAFE).is_err(), "{bad}");
        }
        let dotfiles = Reach { dotfiles: true, ..SAFE };
        assert_eq!(segments("/.well-known/x", dotfiles).unwrap(), [".well-known", "x"]);
        assert!(segments("/../x", dotfiles).is_err());
    }

    #[test]
    fn ranges_that_would_send_more_than_the_file_are_told_apart() {
        let amplify = |range: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
            ranges_amplify(&h, 1000)
        };
        for (range, expected) in [
            ("bytes=0-", false),
            ("bytes=-10", false),
            ("bytes=0-1,4-5", false),
            ("bytes=0-9,10-19", false),
            ("bytes=500-599,0-99", false),
            ("bytes=0-1,1-2", true),
            ("bytes=0-,-1", true),
            ("bytes=0-,0-", true),
            ("bytes=0-499,-500", false),
            ("bytes=0-500,-500", true),
            // Past the end: only what the file holds counts.
            ("bytes=0-1,5000-6000,5000-", false),
            ("bytes=5000-,6000-", false),
            ("not bytes", false),
            ("bytes=x-y,0-", false),
        ] {
            assert_eq!(amplify(range), expected, "{range}");
        }
        let many = |n: usize| (0..n).map(|i| format!("{}-{}", i * 10, i * 10 + 4)).collect::<Vec<_>>().join(",");
        assert!(!amplify(&format!("bytes={}", many(MAX_RANGES))));
        assert!(amplify(&format!("bytes={}", many(MAX_RANGES + 1))));
    }

    #[test]
    fn if_none_match_lists_compare_weakly() {
        let etag = Some(r#""a-1.2""#);
        for (list, matches) in [
            ("*", true),
            (r#"W/"a-1.2""#, true),
            (r#""a-1.2""#, true),
            (r#""x", W/"a-1.2""#, true),
            (r#""x",W/"y""#, false),
            (r#""a-1.2"#, false),
            ("a-1.2", false),
            ("", false),
            (r#""x", broken, "a-1.2""#, false),
        ] {
            assert_eq!(lists_tag(list, etag), matches, "{list}");
        }
        assert!(lists_tag("*", None));
        assert!(!lists_tag(r#""a-1.2""#, None));
    }

    #[tokio::test]
    async fn listing_links_are_url_encoded_and_escaped() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a b#c?d.txt", "javascript:alert(1)", "x\"y<z>&.txt", ".hidden"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub dir")).unwrap();
        let web = WebRoot::new(dir.path(), true, false, false);
        let html = listing(&web, &[]).await.unwrap();
        assert!(html.contains(r#"<a href="./a%20b%23c%3Fd.txt">a b#c?d.txt</a>"#), "{html}");
        assert!(html.contains(r#"href="./javascript%3Aalert%281%29""#), "{html}");
        assert!(
            html.contains(r#"href="./x%22y%3Cz%3E%26.txt">x&quot;y&lt;z&gt;&amp;.txt<"#),
            "{html}"
        );
        assert!(html.contains(r#"<a href="./sub%20dir/">sub dir/</a>"#), "{html}");
        assert!(!html.contains("hidden"), "{html}");
    }
}
