//! Tokens looked up in an HTTP API, as websockify's JSONTokenApi and BaseTokenAPI do: the bridge
//! GETs the source URL with the token, percent-encoded, in place of `%s`
//! ([`crate::config::api::ApiUrl`]); a 2xx answer names the target, as JSON `{"host": "HOST",
//! "port": PORT}` or as plain text `HOST:PORT` ([`ApiFormat`]).
//!
//! What an answer means:
//! - 2xx naming a target on the allow-list: the route; off the list: 403 ([`Answer::Denied`]),
//!   exactly as a value in Redis (an answer naming any host is the same risk as a Redis value).
//! - 4xx (404 and the rest): an unknown token, 404 to the client, a guess charged to its address;
//!   but 401, 403, 408 and 429, which refuse the bridge's lookup rather than the token (the
//!   credentials in the URL, a rate limit): 503, as the API were down, with a warning, and still
//!   charged (an API written for websockify may answer so for unknown tokens).
//! - 5xx, a redirect (not followed: a lookup API answering with one is misconfigured, and
//!   following it would send tokens wherever the answer points), an answer that is no target
//!   (broken JSON, no port), one over [`MAX_ANSWER`] bytes, a refused connection, a TLS failure,
//!   or no answer within the lookup deadline: the source is down or broken, and the handshake gets
//!   503 ([`Unavailable`]), never a hang and never a 404 (a token that may well exist is not
//!   called unknown). A warning names the source by its URL with `%s` in it and the token by its
//!   keyed hash, never the token. Of these, an answer the API did give (a status, a body, or a
//!   request taken and the connection closed without an answer) keeps the client's try charged,
//!   as an API written for websockify may answer unknown tokens so (behind a gateway, as a 502
//!   or 504); no answer at all (refused, TLS, the deadline) and a 503 give it back.
//!
//! **Deadline.** One deadline ([`ApiTokenSource::lookup_timeout`]) covers everything a lookup
//! waits for: a free lookup slot, resolving and connecting, TLS, the request, the answer's head
//! and body.
//!
//! **Connections.** A connection is kept for the next lookup once its answer was read to the end
//! (HTTP/1.1 keep-alive; at most [`MAX_IDLE`] idle per source, dropped when the API closes them
//! and after [`KEPT_FOR`] unused), so a busy bridge does not pay a TCP and TLS handshake per
//! lookup: a connection a NAT or firewall dropped while it was idle answers nothing, not even a
//! reset, and would cost a lookup its whole deadline. A kept connection that turns out closed is
//! replaced by a new one within the same deadline. At most [`MAX_IN_FLIGHT`] lookups
//! run at once per source; more wait for a slot within their deadline.
//!
//! **No cache**, as in websockify: every handshake that names a token asks the API, so a token the
//! API revokes stops opening sessions at once.
//!
//! The client is hyper's HTTP/1.1 connection (`hyper::client::conn::http1`) over tokio's
//! `TcpStream` and tokio-rustls, with the certificates checked against the system's roots or the
//! source's `ca`, as backend TLS does ([`crate::tls::BackendTls`]).

use std::fmt;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use super::{Answer, Unavailable};
use crate::config::api::{ApiFormat, ApiTokenSource};
use crate::config::{redact, Target};
use crate::policy::targets;

/// The largest answer read: a target, even as JSON with other fields beside it, is far shorter.
pub const MAX_ANSWER: usize = 4096;
/// Idle connections kept per source for the next lookups.
pub const MAX_IDLE: usize = MAX_IN_FLIGHT;
/// Lookups in flight at once per source.
pub const MAX_IN_FLIGHT: usize = 64;
/// How long an idle connection is kept: shorter than the idle timeouts of the NATs, firewalls
/// and balancers on the way (minutes), after which a connection is silently dead.
pub const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// The most recently kept of `idle` (each with when it was kept) that is neither `closed` nor
/// kept [`KEPT_FOR`] or longer at `now`; the others of those are let go.
fn take_kept<T>(idle: &mut Vec<(T, Instant)>, now: Instant, closed: impl Fn(&T) -> bool) -> Option<T> {
    idle.retain(|(c, since)| !closed(c) && now.saturating_duration_since(*since) < KEPT_FOR);
    idle.pop().map(|(c, _)| c)
}

/// What a request gets from the API.
enum Reply {
    /// A target (2xx).
    Target(String, u16),
    /// An unknown token (4xx), with the status for the debug log.
    Unknown(StatusCode),
    /// The bridge's lookup refused (401, 403, 408, 429).
    Refused(StatusCode),
    /// An answer that says nothing usable (a 5xx, a redirect, a 2xx with no target, a body too
    /// long or cut short), and why. The API did answer: an API written for websockify may
    /// answer an unknown token so (a 500 from a lookup that raised), so the lookup is a try at a
    /// token, charged to the client like any other; read as "no answer", it was refunded, and
    /// a client could try tokens without end, the 503s telling the valid ones (the 101s) apart.
    Broken(String),
    /// 503 Service Unavailable (an API or its gateway down for maintenance or overloaded): not
    /// a judgement of the token; given back like no answer, so pages retrying through an outage
    /// are not slowed once it is over. (Not 502 or 504: behind a gateway, an API that raised or
    /// hung on an unknown token answers so, and a refund would make guessing free.)
    Down(String),
}

/// A connection to the API, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A token API in service.
pub struct ApiTokens {
    settings: ApiTokenSource,
    name: String,
    /// TLS for `https://` (with the name the certificate must have).
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Connections whose last answer was read to the end, for the next lookups.
    idle: Mutex<Vec<(SendRequest<Empty<Bytes>>, Instant)>>,
    /// Lookup slots ([`MAX_IN_FLIGHT`]).
    slots: Semaphore,
    /// The warning that the API is down: once per 10 s, not one a handshake.
    quiet: crate::logging::Quieted,
    /// The CA file as it was read ([`super::stamp`]), to notice a new one at a reload.
    ca_stamp: Option<u64>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiTokens")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ApiTokens {
    /// A source for `settings`, named `name` in logs (the name its sessions' route label has:
    /// [`ApiTokenSource::name`], with its place in the file when two read alike). Nothing is
    /// connected yet (the API may be down while the bridge starts: its handshakes get 503 until
    /// it is up).
    ///
    /// # Errors
    /// The CA file cannot be read or holds no usable certificate, there are no system roots for
    /// `https://`, or the host is no name a certificate can have.
    pub fn new(settings: ApiTokenSource, name: String) -> Result<ApiTokens, String> {
        let settings_ca_stamp = settings.ca.as_deref().and_then(|ca| super::stamp(ca).ok());
        let tls = match settings.url.tls {
            false => None,
            true => {
                let tls = crate::tls::BackendTls::new(&crate::config::tls::BackendTlsSettings {
                    server_name: None,
                    ca: settings.ca.clone(),
                    insecure_skip_verify: false,
                })
                .map_err(|e| e.to_string())?;
                let name = ServerName::try_from(settings.url.host.clone()).map_err(|e| format!("{}: {e}", settings.url.host))?;
                Some((tls.connector, name))
            }
        };
        Ok(ApiTokens {
            name,
            settings,
            tls,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            quiet: crate::logging::Quieted::new(std::time::Duration::from_secs(10)),
            ca_stamp: settings_ca_stamp,
        })
    }

    /// What the configuration said.
    pub fn settings(&self) -> &ApiTokenSource {
        &self.settings
    }

    /// Whether the CA file (if any) is still the one this source read: a reload that finds it
    /// replaced makes a new source, so that a rotated CA is trusted without a restart.
    pub fn ca_unchanged(&self) -> bool {
        self.settings.ca.as_deref().is_none_or(|ca| super::stamp(ca).ok() == self.ca_stamp)
    }

    /// The source's name for logs and route names: its URL with `%s` ([`ApiTokenSource::name`]),
    /// and its place in the file when another reads alike.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the API says of `token`, within the lookup deadline.
    ///
    /// # Errors
    /// [`Unavailable`] when the API did not answer in time, or answered that it is broken (see
    /// the module's documentation; logged).
    pub async fn lookup(&self, token: &str) -> Result<Answer, Unavailable> {
        let timeout = self.settings.lookup_timeout;
        let deadline = Instant::now() + timeout;
        let asked = tokio::time::timeout_at(deadline, self.ask(token, deadline)).await;
        let reply = match asked {
            Ok(Ok(reply)) => reply,
            Ok(Err(problem)) => return Err(self.unavailable(token, problem)),
            Err(_) => {
                let problem = format!("no answer within the lookup timeout ({})", crate::config::format_duration(timeout));
                return Err(self.unavailable(token, problem));
            }
        };
        let (host, port) = match reply {
            Reply::Target(host, port) => (host, port),
            Reply::Unknown(status) => {
                tracing::debug!(source = %self.name, token = %redact(token), %status, "token API: unknown token");
                return Ok(Answer::Absent);
            }
            Reply::Refused(status) => {
                let problem = format!("answered {status}: the API refuses the bridge's lookups, not the token");
                return Err(Unavailable {
                    answered: true,
                    ..self.unavailable(token, problem)
                });
            }
            Reply::Broken(problem) => {
                return Err(Unavailable {
                    answered: true,
                    ..self.unavailable(token, problem)
                })
            }
            Reply::Down(problem) => return Err(self.unavailable(token, problem)),
        };
        let allowed = (self.settings.allow_targets.as_ref()).is_none_or(|rules| targets::allowed(rules, &host, port));
        let target = Target::Tcp { host, port };
        if !allowed {
            return Ok(Answer::Denied(format!(
                "token {} from {} names {target}, which no allow_targets rule (--token-allow-target) admits",
                redact(token),
                self.name
            )));
        }
        Ok(Answer::Target(target))
    }

    fn unavailable(&self, token: &str, problem: String) -> Unavailable {
        Unavailable::logged(&self.name, token, problem, &self.quiet)
    }

    /// Asks the API about `token` (the caller bounds the wait by `deadline`): on a kept connection
    /// when there is one that still works, else on a new one.
    async fn ask(&self, token: &str, deadline: Instant) -> Result<Reply, String> {
        let _slot = self.slots.acquire().await.map_err(|_| "the source is closed".to_owned())?;
        let url = &self.settings.url;
        let path = url.path_and_query(token);
        let accept = match self.settings.format {
            ApiFormat::Json => "application/json",
            ApiFormat::Text => "text/plain",
        };
        let request = || {
            Request::get(path.as_str())
                .header(header::HOST, url.authority.as_str())
                .header(header::USER_AGENT, concat!("wsbridge/", env!("CARGO_PKG_VERSION")))
                .header(header::ACCEPT, accept)
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("cannot make the request: {e}"))
        };
        loop {
            let (mut sender, kept) = match self.kept() {
                Some(s) => (s, true),
                None => (self.connect(deadline).await?, false),
            };
            // A kept connection the API closed in the meantime fails here or on the request,
            // before any answer (closed, reset, cut short): try the next, or a new one. A GET
            // asks again safely.
            if let Err(e) = sender.ready().await {
                match kept {
                    true => continue,
                    false => return Err(format!("connection to the API lost: {e}")),
                }
            }
            let response = match sender.send_request(request()?).await {
                Ok(r) => r,
                Err(e) if kept => {
                    tracing::debug!(source = %self.name, error = %e, "token API: a kept connection failed; asking on another");
                    continue;
                }
                // The API took the connection and the request, and closed it without an answer:
                // what a handler that raised on an unknown token does (an answer, charged; else
                // a client could try tokens without end, the valid ones told by their 101).
                Err(e) => return Ok(Reply::Broken(format!("the request got no answer: {e}"))),
            };
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER).collect().await;
            let body = match body {
                Ok(b) => {
                    self.keep(sender);
                    b.to_bytes()
                }
                Err(e) if status.is_client_error() => {
                    tracing::debug!(source = %self.name, error = %e, "token API: the body of a {status} answer was not read");
                    Bytes::new()
                }
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(Reply::Broken(format!(
                        "answered {status} with more than {MAX_ANSWER} bytes, longer than a target needs"
                    )))
                }
                Err(e) => return Ok(Reply::Broken(format!("answered {status}, then the answer broke off: {e}"))),
            };
            return Ok(self.read(status, &body));
        }
    }

    /// What an answer means (see the module's documentation).
    fn read(&self, status: StatusCode, body: &[u8]) -> Reply {
        // Answers about the bridge's request rather than the token: the API throttling it (429),
        // giving up on it (408), or refusing the bridge itself (401, 403: its own credentials in
        // the URL are wrong). Read as "unknown token", every valid token would be a 404, charged
        // to the client as a guess, with no warning for the operator.
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            return Reply::Refused(status);
        }
        if status.is_client_error() {
            return Reply::Unknown(status);
        }
        if status.is_redirection() {
            return Reply::Broken(format!(
                "answered {status}: redirects are not followed (give the URL the API answers at)"
            ));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return Reply::Down(format!("answered {status}"));
        }
        if !status.is_success() {
            return Reply::Broken(format!("answered {status}"));
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return Reply::Broken(format!("answered {status} with text that is not UTF-8"));
        };
        let json = text.trim_start().starts_with('{');
        let parsed = match (self.settings.format, json) {
            (ApiFormat::Json, false) => Err("not a JSON object (expected {\"host\": \"HOST\", \"port\": PORT})".to_owned()),
            (ApiFormat::Text, true) => Err("JSON where HOST:PORT was expected (format = \"json\" reads JSON)".to_owned()),
            _ => super::redis::parse_target(text),
        };
        match parsed {
            Ok((host, port)) => Reply::Target(host, port),
            Err(why) => Reply::Broken(format!("answered {status} with no usable target: {why}")),
        }
    }

    /// A kept connection that has not been closed nor idled past [`KEPT_FOR`], if there is one.
    fn kept(&self) -> Option<SendRequest<Empty<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        take_kept(&mut idle, Instant::now(), SendRequest::is_closed)
    }

    /// Keeps a connection whose answer was read to the end, if there is room.
    fn keep(&self, sender: SendRequest<Empty<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push((sender, Instant::now()));
        }
    }

    /// A new connection to the API (every address its name resolves to, in turn), TLS on it
    /// for `https://`, and HTTP/1.1 over that; the connection's task runs until it closes.
    async fn connect(&self, deadline: Instant) -> Result<SendRequest<Empty<Bytes>>, String> {
        let url = &self.settings.url;
        let addrs = crate::dns::resolve(&url.host, url.port)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", url.authority))?;
        // Its addresses share what is left of the lookup's deadline (a black-holed first one does
        // not spend it).
        let tcp = crate::backend::connect_in_turn(&addrs, deadline)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", url.authority))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", url.authority))?,
            ),
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP with {}: {e}", url.authority))?;
        let source = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%source, error = %e, "token API connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A kept connection is taken most recent first, and let go once closed or kept for
    /// [`KEPT_FOR`] (a review: with no age limit, connections a NAT dropped overnight cost the
    /// morning's first lookups their whole deadline, one after another).
    #[test]
    fn kept_connections_are_taken_newest_first_and_let_go_when_old_or_closed() {
        let t0 = Instant::now();
        let mut idle = vec![
            ("old", t0),
            ("closed", t0 + Duration::from_secs(20)),
            ("new", t0 + Duration::from_secs(25)),
        ];
        let closed = |c: &&str| *c == "closed";
        assert_eq!(take_kept(&mut idle, t0 + Duration::from_secs(26), closed), Some("new"));
        assert_eq!(idle, [("old", t0)], "the closed one is let go");
        assert_eq!(take_kept(&mut idle, t0 + KEPT_FOR, closed), None, "kept too long");
        assert!(idle.is_empty());
    }
}
