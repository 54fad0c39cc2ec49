//! The upgrade decision: what a request head is (an upgrade on a route, a static file, an error),
//! the checks an upgrade must pass, the subprotocol, and the `101` answer.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::request::{answer, write_answer, Head, Rejection};
use super::web::{self, Web, WebGuard, WebRoot};
use crate::policy::auth::{Authenticated, Credentials, BEARER_SUBPROTOCOL};
use crate::policy::{check_origin, AddressSlot, OriginRule, PerAddress, Refusal};
use crate::routes::{Miss, Route, RouteTable};
use crate::slots::Slot;

/// What the upgrade decision knows of the connection, and the bridge-wide policy it applies.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The real client address (behind a PROXY header or trusted proxies, when so configured).
    pub client: IpAddr,
    /// The common name of the client's TLS certificate, if it sent one.
    pub client_cn: Option<&'a str>,
    /// Whether the connection is TLS (the `Host`'s default port for a same-origin check).
    pub secure: bool,
    /// Origins admitted where a route sets none: the listener's, else the configuration's.
    pub origins: &'a [OriginRule],
    /// Sessions and new sessions per client address over every route, when capped.
    pub per_ip: Option<&'a Arc<PerAddress>>,
    /// Failed authentications per client address: the brake on guessing.
    pub failures: &'a Arc<PerAddress>,
    /// Token lookups in flight per client address (see [`crate::policy::Lookups`]).
    pub lookups: &'a crate::policy::Lookups,
    /// A static answer may leave the connection open for another request (the server has room
    /// for idle connections and is not draining): see [`web::serve`].
    pub keep_alive: bool,
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
    /// Its places under the caps per client address (bridge-wide and the route's), held too.
    pub per_ip: [Option<AddressSlot>; 2],
    /// Who the client authenticated as, when the route asks.
    pub authenticated: Option<Authenticated>,
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
        /// How the metrics count it when the status is an error: by its status, unless a
        /// reason of its own tells an operator more (a token source down, not a route full).
        refusal: crate::metrics::Refusal,
        /// The connection carries another request (a static file answered with keep-alive):
        /// the bytes that came after this request, which begin the next.
        next: Option<Vec<u8>>,
        /// The route that refused it, when the request got as far as one (its policy, its
        /// session cap): for the log line's `route` and the refusal's metric label.
        route: Option<String>,
    },
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
    web: Option<Web<'_>>,
    ctx: &Context<'_>,
) -> Result<Outcome, Rejection>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (request, leftover) = match head {
        Ok(v) => v,
        Err(Rejection::Status { status, reason }) => {
            answer(io, status, &reason, &[]).await?;
            let refusal = crate::metrics::Refusal::Http(status.as_u16());
            return Ok(Outcome::Answered {
                status,
                reason,
                refusal,
                next: None,
                route: None,
            });
        }
        Err(e) => return Err(e),
    };
    // A HEAD request gets the headers a GET would, and no body (RFC 9110 §9.3.2).
    let body = request.method() != Method::HEAD;
    match decide(request, leftover, routes, web, ctx).await {
        Decision::Upgrade(u) => Ok(Outcome::Upgrade(u)),
        Decision::Reject {
            status,
            reason,
            body: said,
            headers,
            route,
        } => {
            write_answer(io, status, said.unwrap_or(&reason), &headers, body).await?;
            // A cap on what an address holds open is counted as `max_connections_per_ip` is
            // (address_limit), not as the rates' 429s (rate_limited).
            let refusal = match said {
                Some(crate::policy::TOO_MANY_SESSIONS | crate::policy::TOO_MANY_CONNECTIONS) => crate::metrics::Refusal::AddressLimit,
                _ => crate::metrics::Refusal::Http(status.as_u16()),
            };
            Ok(Outcome::Answered {
                status,
                reason,
                refusal,
                next: None,
                route,
            })
        }
        Decision::SourceUnavailable(reason) => {
            let status = StatusCode::SERVICE_UNAVAILABLE;
            let retry = [(header::RETRY_AFTER, HeaderValue::from_static("1"))];
            write_answer(io, status, "token source unavailable", &retry, body).await?;
            let refusal = crate::metrics::Refusal::TokenSource;
            Ok(Outcome::Answered {
                status,
                reason,
                refusal,
                next: None,
                route: None,
            })
        }
        Decision::Static(request, leftover, web) => {
            let served = web::serve(io, &request, web, ctx.keep_alive && web::keeps_alive(&request)).await?;
            Ok(Outcome::Answered {
                status: served.status,
                reason: served.what.into(),
                refusal: crate::metrics::Refusal::Http(served.status.as_u16()),
                next: served.kept.then_some(leftover),
                route: None,
            })
        }
    }
}

enum Decision<'w> {
    Upgrade(Box<Upgrade>),
    Reject {
        status: StatusCode,
        /// For the log; also the body unless `body` says otherwise.
        reason: String,
        /// What the client is told when `reason` holds what only the operator may see (a route's
        /// name, which can carry a token file's path; a certificate's name).
        body: Option<&'static str>,
        headers: Vec<(HeaderName, HeaderValue)>,
        /// The route that refused it, if one did.
        route: Option<String>,
    },
    /// A static file: the request, the bytes after it (the next request's, with keep-alive).
    Static(Request<()>, Vec<u8>, &'w WebRoot),
    /// A token source that must be asked could not answer (503, Retry-After: 1); the reason is
    /// for the log.
    SourceUnavailable(String),
}

fn reject<'w>(status: StatusCode, reason: impl Into<String>) -> Decision<'w> {
    Decision::Reject {
        status,
        reason: reason.into(),
        body: None,
        headers: Vec::new(),
        route: None,
    }
}

/// A refusal whose details go to the log only; the client reads `body`.
fn refuse<'w>(status: StatusCode, body: &'static str, reason: String) -> Decision<'w> {
    Decision::Reject {
        status,
        reason,
        body: Some(body),
        headers: Vec::new(),
        route: None,
    }
}

/// A policy's refusal as an answer: its public text for the client, its detail (with the
/// route's name) for the log, and the header it calls for.
fn refused<'w>(route: &Route, r: Refusal, challenge: Option<&'static str>) -> Decision<'w> {
    by(route, answer_refusal(&route.name, r, challenge))
}

/// `refusal`, as `route`'s (its name goes on the log line and the refusal's metric).
fn by<'w>(route: &Route, mut refusal: Decision<'w>) -> Decision<'w> {
    if let Decision::Reject { route: named, .. } = &mut refusal {
        *named = Some(route.name.clone());
    }
    refusal
}

/// [`refused`] where `what` names the stage (a route's name, or "token lookup").
fn answer_refusal<'w>(what: &str, r: Refusal, challenge: Option<&'static str>) -> Decision<'w> {
    let mut headers = Vec::new();
    if let Some(secs) = r.retry_after {
        headers.push((header::RETRY_AFTER, HeaderValue::from(secs)));
    }
    if let (Some(c), StatusCode::UNAUTHORIZED) = (challenge, r.status) {
        headers.push((header::WWW_AUTHENTICATE, HeaderValue::from_static(c)));
    }
    Decision::Reject {
        status: r.status,
        reason: format!("{what}: {}", r.detail),
        body: Some(r.public),
        headers,
        route: None,
    }
}

async fn decide<'w>(request: Request<()>, leftover: Vec<u8>, routes: &RouteTable, web: Option<Web<'w>>, ctx: &Context<'_>) -> Decision<'w> {
    let client_cn = ctx.client_cn;
    let headers = request.headers();
    // RFC 9112 §3.2: an HTTP/1.1 request without a Host, or any request with two, gets 400 (two
    // Hosts are how a request is made to mean one thing to a proxy and another here).
    match (headers.get_all(header::HOST).iter().count(), request.version()) {
        (0, Version::HTTP_11) => return reject(StatusCode::BAD_REQUEST, "missing Host header"),
        (2.., _) => return reject(StatusCode::BAD_REQUEST, "more than one Host header"),
        _ => {}
    }
    // A credential named twice, or in another spelling, could be read as another one by a proxy
    // in front that checks it (see routes::ambiguous_credential).
    if let Some(name) = crate::routes::ambiguous_credential(request.uri().query()) {
        return reject(
            StatusCode::BAD_REQUEST,
            format!("the query names `{name}` more than once, or spelled otherwise"),
        );
    }
    if !header_has_token(headers, &header::UPGRADE, "websocket") {
        // A plain HTTP request.
        let is_get = matches!(*request.method(), Method::GET | Method::HEAD);
        let path = request.uri().path();
        let exact = routes.has_exact_path(path);
        if let (Some(web), false) = (web, exact) {
            if let (true, Some(guard)) = (is_get, web.guard) {
                if let Some(refusal) = web_access(guard, &request, routes, ctx).await {
                    return refusal;
                }
            }
            return match is_get {
                true => Decision::Static(request, leftover, web.root),
                false => Decision::Reject {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    reason: format!("method {} not allowed", request.method()),
                    body: None,
                    headers: vec![(header::ALLOW, HeaderValue::from_static("GET, HEAD"))],
                    route: None,
                },
            };
        }
        return match exact || routes.has_any_path() {
            true if !is_get => Decision::Reject {
                status: StatusCode::METHOD_NOT_ALLOWED,
                reason: format!("method {} not allowed", request.method()),
                body: None,
                headers: vec![(header::ALLOW, HeaderValue::from_static("GET"))],
                route: None,
            },
            true => Decision::Reject {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: "this is a WebSocket endpoint: upgrade required".into(),
                body: None,
                headers: vec![
                    (header::UPGRADE, HeaderValue::from_static("websocket")),
                    (header::CONNECTION, HeaderValue::from_static("Upgrade")),
                ],
                route: None,
            },
            false => reject(StatusCode::NOT_FOUND, "not found"),
        };
    }

    // The checks that need only the head come before the route lookup: a malformed request
    // must not make a token source look at its files.
    if request.method() != Method::GET {
        return Decision::Reject {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: format!("a WebSocket upgrade must be a GET, not {}", request.method()),
            body: None,
            headers: vec![(header::ALLOW, HeaderValue::from_static("GET"))],
            route: None,
        };
    }
    if request.version() != Version::HTTP_11 {
        return reject(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1");
    }
    if !header_has_token(headers, &header::CONNECTION, "upgrade") {
        return reject(StatusCode::BAD_REQUEST, "missing `Connection: Upgrade`");
    }
    // RFC 9110 §9.3.1: a GET's body has no meaning; after the upgrade its bytes would be read as
    // the client's first frames, and a proxy in front that does not upgrade would read them as
    // its next request (smuggling). No browser sends one.
    if headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            // Zero in any spelling RFC 9110 §8.6 allows (`00`, a list `0, 0`) is none.
            .any(|v| v.to_str().map_or(true, |v| v.split(',').any(|n| n.trim().parse::<u64>() != Ok(0))))
    {
        return reject(StatusCode::BAD_REQUEST, "a WebSocket upgrade has no body");
    }
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        (Some(_), Some(_)) => return reject(StatusCode::BAD_REQUEST, "more than one Sec-WebSocket-Version header"),
        _ => {
            return Decision::Reject {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: "unsupported Sec-WebSocket-Version (only 13 is)".into(),
                body: None,
                headers: vec![(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"))],
                route: None,
            }
        }
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) if is_valid_key(k.as_bytes()) => k.as_bytes().trim_ascii().to_vec(),
        _ => return reject(StatusCode::BAD_REQUEST, "missing or malformed Sec-WebSocket-Key"),
    };
    // From here on the details (a route's name, a token, a path) are for the log, not the client.
    // A token (in the query, or a host name that is one) is a credential too: guessing one is
    // charged to the address like a wrong password, and a right one costs nothing.
    let names_token = routes.names_token(&request);
    let in_flight = match names_token {
        true => match charge_for_lookup(ctx).await {
            Ok(in_flight) => Some(in_flight),
            Err(Uncharged::Refused(r)) => return answer_refusal("token lookup", r, None),
            // Nothing failed: the source is slow to answer the address's pages opened at once.
            Err(Uncharged::Waited) => {
                return Decision::SourceUnavailable(format!(
                    "the address's token lookups in flight still hold its tries after {LOOKUP_WAIT:?} (a slow token source)"
                ))
            }
        },
        false => None,
    };
    let looked_up = routes.lookup(&request).await;
    // A token found costs nothing. Neither does a lookup whose sources (Redis, a token API, a
    // socket directory) did not answer and that checked the token against nothing else: pages
    // retrying through an outage (as its Retry-After asks) are not slowed down once it is over.
    // Where it was checked against something (inline, JWT or file tokens, another source that
    // answered, an API that refused the lookup) the try stays charged, or guesses at those would
    // be free for as long as the source is down.
    match &looked_up {
        // A token found proves the client (its /64 passes a spent /48 budget for a while); the
        // any-path route reached by a host that is no token proves nothing, and costs nothing.
        Ok(route) if names_token && !routes.is_any_path(route) => ctx.failures.proved(ctx.client),
        Ok(_) | Err(Miss::Unavailable { checked: false, .. }) if names_token => ctx.failures.refund(ctx.client),
        _ => {}
    }
    // Ended, with its try given back or not: the address's handshakes waiting for it go on.
    drop(in_flight);
    let route = match looked_up {
        Ok(route) => route,
        Err(miss @ Miss::Token(_)) => return refuse(StatusCode::NOT_FOUND, "unknown token", miss.to_string()),
        Err(miss @ (Miss::Path(_) | Miss::NoToken(_))) => return refuse(StatusCode::NOT_FOUND, "no such route", miss.to_string()),
        Err(miss @ Miss::Denied(_)) => return refuse(StatusCode::FORBIDDEN, "forbidden", miss.to_string()),
        Err(Miss::Unavailable { why, .. }) => return Decision::SourceUnavailable(why),
    };
    if !route.admits(client_cn) {
        let reason = match client_cn {
            None => format!("{} needs a client certificate", route.name),
            Some(cn) => format!("client certificate {cn:?} is not allowed on {}", route.name),
        };
        return by(&route, refuse(StatusCode::FORBIDDEN, "forbidden", reason));
    }
    let policy = &route.options.policy;
    if let Err(r) = policy.networks.check(ctx.client) {
        return refused(&route, r, None);
    }
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let origin = match (origins.next(), origins.next()) {
        (_, Some(_)) => {
            return by(
                &route,
                refuse(
                    StatusCode::FORBIDDEN,
                    "origin not allowed",
                    format!("{}: more than one Origin header", route.name),
                ),
            )
        }
        (None, _) => None,
        (Some(o), None) => Some(o.to_str().unwrap_or("(not text)")),
    };
    let rules = policy.origins.as_deref().unwrap_or(ctx.origins);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Err(r) = check_origin(rules, policy.require_origin, origin, host, ctx.secure) {
        return refused(&route, r, None);
    }
    let authenticated = match &route.auth {
        None => None,
        Some(auth) => {
            // Where `?token=` picks the route it is not also a password.
            let creds = Credentials::of(headers, request.uri().query(), !routes.takes_query_tokens());
            if creds.is_empty() {
                // A browser's first request, or a client that has none: asked for them, not
                // charged (the real user must not find the budget spent).
                return refused(&route, crate::policy::auth::unauthorized("no credentials"), Some(auth.challenge()));
            }
            // Charged before the check and refunded when right: parallel guesses cannot all
            // start before the first failure counts.
            if let Err(r) = ctx.failures.try_charge(ctx.client) {
                return refused(&route, r, None);
            }
            match auth.check(&creds).await {
                Ok(who) => {
                    ctx.failures.proved(ctx.client);
                    Some(who)
                }
                Err(r) => return refused(&route, r, Some(auth.challenge())),
            }
        }
    };
    let mut per_ip = [None, None];
    for (i, table) in [ctx.per_ip, route.per_ip.as_ref()].into_iter().enumerate() {
        if let Some(table) = table {
            match table.enter(ctx.client) {
                Ok(s) => per_ip[i] = Some(s),
                Err(r) => return refused(&route, r, None),
            }
        }
    }
    let Some(slot) = route.try_enter() else {
        return Decision::Reject {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("{} is at its session limit", route.name),
            body: Some("too many sessions"),
            headers: vec![(header::RETRY_AFTER, HeaderValue::from_static("5"))],
            route: Some(route.name.clone()),
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
        per_ip,
        authenticated,
    }))
}

/// How long a token lookup waits for its address's lookups in flight to end when they hold its
/// failure budget: the longest a remote source's lookup takes by default (an HTTP API's 1 s).
const LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a token lookup's try was not charged.
enum Uncharged {
    /// The brake's refusal: the address's tries are spent on failures.
    Refused(Refusal),
    /// Lookups of the address still in flight held the tries for the whole [`LOOKUP_WAIT`]: a
    /// slow source, not a failure of the client's (a review: valid tokens got the brake's 429,
    /// "too many failed attempts", from one address with a source at 0.5 s). Guesses beside a
    /// slow source get it too, once a try came back and a lookup holds it: whether those
    /// lookups will give theirs back is not known while they run. Nothing is looked up for
    /// either answer, so no guess goes faster than the brake allows.
    Waited,
}

/// Charges a token lookup's try to the client's address. When the budget is spent while lookups
/// from the address are in flight (pages opened at once, each holding a try while a remote
/// source answers), waits for them to end, at most [`LOOKUP_WAIT`], and tries again: a valid
/// token gives its try back. Without lookups in flight the brake's 429; past the wait with
/// lookups still in flight, [`Uncharged::Waited`].
async fn charge_for_lookup<'c>(ctx: &Context<'c>) -> Result<crate::policy::InFlight<'c>, Uncharged> {
    let deadline = tokio::time::Instant::now() + LOOKUP_WAIT;
    let begin = || ctx.lookups.try_begin(ctx.failures, ctx.client);
    loop {
        let notify = match begin() {
            Ok(in_flight) => return Ok(in_flight),
            Err((r, None)) => return Err(Uncharged::Refused(r)),
            Err((_, Some(notify))) => notify,
        };
        // Listening, then trying again: an end between the first try and the wait is not missed.
        let ended = notify.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        match begin() {
            Ok(in_flight) => return Ok(in_flight),
            Err((r, None)) => return Err(Uncharged::Refused(r)),
            // Those lookups all ended and newer ones began: wait for theirs.
            Err((_, Some(newer))) if !Arc::ptr_eq(&newer, &notify) => continue,
            Err((_, Some(_))) => {
                if tokio::time::timeout_at(deadline, ended).await.is_err() {
                    // A last try: the budget may have refilled meanwhile.
                    return match begin() {
                        Ok(in_flight) => Ok(in_flight),
                        Err((r, None)) => Err(Uncharged::Refused(r)),
                        Err((_, Some(_))) => Err(Uncharged::Waited),
                    };
                }
            }
        }
    }
}

/// Whether a request for a static file passes the listener's `web_auth` (`None`), or its
/// refusal: the same answers an upgrade's route gives (403 for a certificate not listed; 401
/// with `WWW-Authenticate` for missing or wrong credentials, so a browser prompts; 429 while the
/// brake on failed logins holds the address), the same charge on the brake for a try.
async fn web_access<'w>(guard: &WebGuard, request: &Request<()>, routes: &RouteTable, ctx: &Context<'_>) -> Option<Decision<'w>> {
    if !guard.admits(ctx.client_cn) {
        let reason = match ctx.client_cn {
            None => "static files need a client certificate".to_owned(),
            Some(cn) => format!("client certificate {cn:?} may not fetch static files"),
        };
        return Some(refuse(StatusCode::FORBIDDEN, "forbidden", reason));
    }
    let auth = guard.auth.as_ref()?;
    // As for an upgrade: where `?token=` picks a route it is not also a password.
    let creds = Credentials::of(request.headers(), request.uri().query(), !routes.takes_query_tokens());
    if creds.is_empty() {
        // A browser's first request: asked for credentials, not charged.
        let r = crate::policy::auth::unauthorized("no credentials");
        return Some(answer_refusal("static files", r, Some(auth.challenge())));
    }
    if let Err(r) = ctx.failures.try_charge(ctx.client) {
        return Some(answer_refusal("static files", r, None));
    }
    match auth.check(&creds).await {
        Ok(_) => {
            ctx.failures.proved(ctx.client);
            None
        }
        Err(r) => Some(answer_refusal("static files", r, Some(auth.challenge()))),
    }
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
        // A bearer token carried as a subprotocol is never echoed: it is a credential, and the
        // page offers it beside the protocol it speaks.
        .filter(|offer| !offer.starts_with(BEARER_SUBPROTOCOL))
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
}
