//! The server's agent endpoint: the handshake of a link an agent dialled (which kind, who, the
//! secret), the failure brake, and the control link's loop (hello, `want`, pings with a pong
//! deadline, `drain` on shutdown, newest-wins replacement).
//!
//! Only requests on an `[[agent_endpoint]]` path come here, so a browser can never reach the
//! endpoint as a data route and an agent handshake is never accepted on a browser route. Every
//! refusal is one of: 403 (a browser's request: it has an `Origin`, which agents never send),
//! 400 (not an agent handshake), 429 (too many failures from this address as this agent name, or
//! as any: logged at debug and counted in the metrics, one a request, with a warning
//! when the brake turns on), 401 (one generic
//! answer for an unknown name, a wrong or missing secret; the reason is logged, never the
//! secret), 409 (a data link from an agent with no control link here), 421 (a data link naming
//! another instance than this one: its control link is there).
//!
//! The failure brake counts only logins that try a secret: a browser's request (any page a user
//! behind a shop's NAT opens can send one, cross-site) and a request without a name or a secret
//! guess nothing, and counting them would let them slow down the logins of the agents behind
//! that address. For the same reason it counts per address and agent name
//! ([`Registry::charge`]): wrong secrets for one agent from a shop's guest Wi-Fi or a carrier's
//! NAT do not slow down another agent behind it, short of a flood of failures across names that
//! spends the address's own, larger budget.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::chunks;
use super::link::{self, ControlMessage, IntoLink, LinkIo};
use super::registry::{Control, Registry};
use super::EndpointConfig;
use crate::config::Timeouts;
use crate::http::request::answer;
use crate::slots::Held;

/// A control link whose first message is not its hello (a logged-in agent's doing): warned of
/// once per 10 s at most.
static NOT_HELLO: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));

/// The `Retry-After` of a control link refused while draining, in seconds: about a balancer's
/// health-check interval, after which it sends the agent to another instance.
const DRAINING_RETRY: u64 = 2;

/// The answer (403) to a request with an `Origin`: a browser's.
pub const NOT_FOR_BROWSERS: &str = "agent endpoint: not for browsers";

enum Kind {
    Control(String),
    /// A data link, with what the agent offered of [`super::chunks`].
    Link(chunks::Framing),
}

/// Serves one request on an agent endpoint, to its end (a control link lives as long as the
/// agent's connection; a data link is handed to the registry's pool). `client` is the agent's
/// address as the browser routes see theirs (from the PROXY header or a trusted proxy's
/// forwarded header, else the TCP peer): the failure brake counts per real address, not per
/// load balancer. `held` is the connection's place under the caps: a data link that proved its
/// secret, and a control link once its hello made it the agent's connection, no longer count
/// against their address ([`Held::into_agents`]); a data link takes its slot into the pool.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: IntoLink>(
    mut stream: S,
    held: Held,
    client: SocketAddr,
    request: Request<()>,
    leftover: Vec<u8>,
    registry: &Registry,
    endpoint: &EndpointConfig,
    timeouts: &Timeouts,
    shutdown: &CancellationToken,
    metrics: &crate::metrics::Metrics,
) {
    let addr = client;
    let write_end = Instant::now() + timeouts.http_write;
    // Counted with the endpoint as their route: an agent's failed login is not a browser's
    // request for a path no route has, nor a cap at accept (`route=""`).
    let route = format!("agent endpoint {}", endpoint.path);
    let refused = |status: u16| metrics.refused_by(crate::metrics::Refusal::Http(status), Some(&route));
    let headers = request.headers();
    // Any page can open a WebSocket here, cross-site, but cannot leave out its Origin, which no
    // agent sends: refused before anything else, and not charged to the address's brake.
    if let Some(origin) = headers.get(header::ORIGIN) {
        refuse(&mut stream, write_end, StatusCode::FORBIDDEN, NOT_FOR_BROWSERS).await;
        refused(403);
        return info!(
            status = 403,
            origin = %shown(origin.as_bytes()),
            "agent endpoint: a browser's request (it has an Origin, which agents never send); refused, not counted as a failed login"
        );
    }
    let kind = if !is_login(headers) {
        refuse(&mut stream, write_end, StatusCode::BAD_REQUEST, "this is an agent endpoint").await;
        refused(400);
        return info!(status = 400, "agent endpoint: not an agent handshake");
    } else if has_token(headers, &header::UPGRADE, link::LINK_TOKEN) {
        let framing = header::HeaderName::from_static(chunks::FRAMING_HEADER);
        Kind::Link(chunks::Framing::from_tokens(
            headers.get_all(&framing).iter().filter_map(|v| v.to_str().ok()),
        ))
    } else {
        match headers.get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().trim_ascii()) {
            Some(key) if key.len() == 24 => Kind::Control(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key)),
            _ => {
                refuse(
                    &mut stream,
                    write_end,
                    StatusCode::BAD_REQUEST,
                    "missing or malformed Sec-WebSocket-Key",
                )
                .await;
                refused(400);
                return info!(status = 400, "agent endpoint: malformed control link request");
            }
        }
    };
    if matches!(kind, Kind::Control(_)) && registry.leaving().is_cancelled() {
        // Its agents are moving to other instances: a control link here would be told to move
        // at once. Data links for the control links still here are taken.
        let retry = [(header::RETRY_AFTER, HeaderValue::from(DRAINING_RETRY))];
        let _ = timeout_at(
            write_end,
            answer(&mut stream, StatusCode::SERVICE_UNAVAILABLE, link::DRAINING, &retry),
        )
        .await;
        // Every agent that moves tries every 2 s or so until it lands elsewhere.
        return debug!(status = 503, "agent endpoint: control link refused while draining");
    }
    let name = headers
        .get(link::NAME_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, s)| s.trim())
        .filter(|s| !s.is_empty());
    let (Some(name), Some(secret)) = (name, secret) else {
        // Guesses nothing: not charged to the brake (see the module's doc), and not looked up.
        refuse(&mut stream, write_end, StatusCode::UNAUTHORIZED, "unauthorized").await;
        refused(401);
        return info!(
            status = 401,
            agent = %shown(name.unwrap_or_default().as_bytes()),
            reason = super::registry::AuthFailure::Missing.to_string().as_str(),
            "agent endpoint: login refused, not counted as a failed one"
        );
    };
    // A data link with its connection's link key (see link::ControlMessage::Hello) and the
    // secret that connection logged in with: nothing to charge, so that failed logins as this
    // agent from its own address (someone else behind the shop's NAT) cannot keep its pool from
    // being refilled. The key alone opens nothing (a proxy's log may show a header): the secret
    // is checked against the connection's own digest, no fleet lookup.
    let keyed = match kind {
        Kind::Link(_) => headers
            .get(link::LINK_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|key| registry.link_key_owner(name, key))
            .filter(|digest| link::secret_matches(secret, digest)),
        Kind::Control(_) => None,
    };
    let digest = match keyed {
        Some(digest) => digest,
        None => match braked_login(
            &mut stream,
            write_end,
            registry,
            addr,
            name,
            secret,
            matches!(kind, Kind::Link(_)),
            &refused,
        )
        .await
        {
            Some(digest) => digest,
            None => return,
        },
    };
    let name = name.to_owned();
    match kind {
        Kind::Link(framing) => {
            // A link naming the instance its control link is on, and reaching another one (a
            // balancer that spreads an agent's connections): its control link's instance needs
            // it, not this one. (Agents from before the header send none.)
            let other = headers
                .get(link::INSTANCE_HEADER)
                .is_some_and(|v| v.as_bytes() != registry.instance().as_bytes());
            if other {
                // 421 Misdirected Request: not 409, which also answers a link that races its
                // control link's loss, so the agent can tell a misrouting URL from that.
                refuse(
                    &mut stream,
                    write_end,
                    StatusCode::MISDIRECTED_REQUEST,
                    "this link's control link is on another instance",
                )
                .await;
                refused(421);
                return info!(agent = %name, status = 421, "agent data link for another instance; refused");
            }
            // Its control link logged in with the same secret: during a rotation the old one is
            // still listed, and a link with it must not join the new connection's pool.
            if !registry.takes_links(&name, &digest) || !leftover.is_empty() {
                refuse(&mut stream, write_end, StatusCode::CONFLICT, "no control link for this agent").await;
                refused(409);
                return debug!(agent = %name, status = 409, "agent data link without a control link (with its secret)");
            }
            // Answering the agent's offer of chunks makes the link reusable (an agent that did
            // not offer them gets a raw link, used for one session), and its offer of resets
            // lets it end a session with its app's reset.
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {}\r\nConnection: Upgrade\r\n{}\r\n",
                link::LINK_TOKEN,
                framing.header_line()
            );
            let written = timeout_at(write_end, async {
                stream.write_all(head.as_bytes()).await?;
                stream.flush().await
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                return debug!(agent = %name, "agent data link closed during its 101");
            }
            if registry
                .add_link(&name, &digest, stream.into_link(), framing, held.into_agents())
                .is_err()
            {
                debug!(agent = %name, "agent data link not needed; closed");
            }
        }
        Kind::Control(accept) => {
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n{}: {}\r\n\r\n",
                link::CONTROL_PROTOCOL,
                link::INSTANCE_HEADER,
                registry.instance()
            );
            let written = timeout_at(write_end, async {
                stream.write_all(head.as_bytes()).await?;
                stream.flush().await
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                return debug!(agent = %name, "agent control link closed during its 101");
            }
            let config = link::control_ws_config();
            let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
            control(ws, (name, digest), held, addr, (registry, metrics), endpoint, timeouts, shutdown).await;
        }
    }
}

/// A login checked the ordinary way: a try charged to the brake (a data link's by
/// [`Registry::charge_link`], a control link's by [`Registry::charge`]) before the secret is
/// checked against the agent's declared ones, given back when it was right. Charged before the
/// name is looked up and the secret checked, so that parallel guesses cannot all start before
/// the first failure counts, and alike for every name, declared or not: the answers tell no
/// names apart, and a braked flood does not reach the fleet files' lock. The secret's digest,
/// or `None` once the refusal (429, 401) is answered and logged.
#[allow(clippy::too_many_arguments)]
async fn braked_login<S: LinkIo>(
    stream: &mut S,
    write_end: Instant,
    registry: &Registry,
    addr: SocketAddr,
    name: &str,
    secret: &str,
    data_link: bool,
    refused: &(dyn Fn(u16) + Sync),
) -> Option<[u8; 32]> {
    let charge = match data_link {
        true => registry.charge_link(addr.ip(), name),
        false => registry.charge(addr.ip(), name),
    };
    let charged = match charge {
        Ok(charged) => charged,
        Err(wait) => {
            let retry = [(header::RETRY_AFTER, HeaderValue::from(wait))];
            let _ = timeout_at(
                write_end,
                answer(stream, StatusCode::TOO_MANY_REQUESTS, "too many failed attempts", &retry),
            )
            .await;
            // One a request, which any host can send: at debug, and counted (as the 429s at accept
            // are); the brake turning on was a warning ([`Registry::brake_came_on`]).
            refused(429);
            debug!(
                status = 429,
                agent = %shown(name.as_bytes()),
                "agent endpoint: too many failed logins from this address (as this agent, or as any); slowed down"
            );
            return None;
        }
    };
    let digests = registry.secrets_of(name).await;
    let digest = match Registry::check_secret(secret, digests) {
        Ok(digest) => digest,
        Err(why) => {
            // The try was charged above; a failed one stays spent.
            refuse(stream, write_end, StatusCode::UNAUTHORIZED, "unauthorized").await;
            refused(401);
            let shown = shown(name.as_bytes());
            warn!(status = 401, agent = %shown, reason = why.to_string().as_str(), "agent endpoint: login refused");
            if registry.brake_came_on(charged) {
                warn!(
                    agent = %shown,
                    "agent endpoint: too many failed logins from this address (as this agent, or as any); slowed \
                     down: 429 until a try comes back (one per 2 s), each such refusal logged at debug"
                );
            }
            return None;
        }
    };
    registry.succeeded(charged);
    Some(digest)
}

async fn refuse<S: LinkIo>(stream: &mut S, end: Instant, status: StatusCode, body: &'static str) {
    let _ = timeout_at(end, answer(stream, status, body, &[])).await;
}

/// Whether a request is an agent's login: a data link's handshake or a control link's (a
/// malformed one included: the endpoint answers it), without an `Origin` (a browser's request
/// never is one). Anything else on an agent endpoint's path is refused.
pub fn is_login(headers: &http::HeaderMap) -> bool {
    !headers.contains_key(header::ORIGIN)
        && (has_token(headers, &header::UPGRADE, link::LINK_TOKEN)
            || (has_token(headers, &header::UPGRADE, "websocket")
                && has_token(headers, &header::SEC_WEBSOCKET_PROTOCOL, link::CONTROL_PROTOCOL)))
}

/// A peer's words for a log line: printable ASCII only (no line breaks, no escapes), at most 128
/// characters.
fn shown(bytes: &[u8]) -> String {
    bytes
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .take(128)
        .map(|&b| char::from(b))
        .collect()
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &http::HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How a control link ended.
enum End {
    /// The agent closed it (SIGTERM, or it moved to another instance), with this reason (shown:
    /// printable, bounded; empty when it gave none): its sessions finish on their own.
    Closed(String),
    /// The server is shutting down: the agent was told to reconnect elsewhere.
    Drained,
    /// A newer connection of the same name took over.
    Replaced,
    /// The agent is no longer declared, or with another secret: its sessions were ended.
    Revoked,
    /// No pong in time, a broken connection: every session through it ends.
    Lost(String),
}

#[allow(clippy::too_many_arguments)]
async fn control<S: LinkIo>(
    mut ws: WebSocketStream<S>,
    (name, digest): (String, [u8; 32]),
    held: Held,
    addr: SocketAddr,
    (registry, metrics): (&Registry, &crate::metrics::Metrics),
    endpoint: &EndpointConfig,
    timeouts: &Timeouts,
    shutdown: &CancellationToken,
) {
    // The hello is part of the handshake: under its deadline.
    let hello = timeout(timeouts.handshake, ws.next()).await;
    let (services, (replacing, moves, session_ids), link_key) = match hello {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ControlMessage>(&text) {
            Ok(ControlMessage::Hello {
                name: said,
                services,
                version,
                link_key,
            }) if said == name => (
                services,
                (version >= link::REPLACING, version >= link::MOVING, version >= link::SESSION_IDS),
                link_key,
            ),
            _ => {
                return match NOT_HELLO.take() {
                    Some(left_out) => warn!(agent = %name, left_out, "agent control link: the first message is not its hello; closed"),
                    None => debug!(agent = %name, "agent control link: the first message is not its hello; closed"),
                }
            }
        },
        // An agent looking where its URL leads (its balancer check), or one of its connections
        // that found this instance taken by another.
        Ok(Some(Ok(Message::Close(_)))) => return debug!(agent = %name, "agent control link closed before its hello"),
        _ => return debug!(agent = %name, "agent control link: no hello; closed"),
    };
    let services: Vec<String> = services.into_iter().filter(|s| link::valid_name(s)).take(1024).collect();
    let Some(mut attached) = registry.attach(&name, digest, services.clone(), addr, endpoint.pool, replacing) else {
        // A reload between its login and its hello revoked that secret.
        close_with(&mut ws, revoked_close(), timeouts.close).await;
        return warn!(agent = %name, "agent no longer allowed since its login (a reload): closed");
    };
    // Until now the link held its place under its address's cap (a login that sends no hello
    // is no agent yet: without it, one agent's secret could open connections past the cap up
    // to `max_connections`, each for the handshake deadline); an agent's connections are
    // bounded by the registry from here on.
    let _slot = held.into_agents();
    metrics.agent_connected();
    if let Some(key) = link_key.filter(|k| link::valid_link_key(k)) {
        registry.set_link_key(&name, attached.id, &key);
    }
    if session_ids {
        registry.set_session_ids(&name, attached.id);
    }
    // The names a log line shows (an agent may list up to 1,024: 64 KiB on every login).
    let shown_services = &services[..services.len().min(16)];
    match services.len() > shown_services.len() {
        true => {
            info!(agent = %name, services = %shown_services.join(","), services_in_all = services.len(), instance = registry.instance(), "agent connected")
        }
        false => info!(agent = %name, services = %shown_services.join(","), instance = registry.instance(), "agent connected"),
    }
    let send_timeout = timeouts.pong_timeout;
    let ping_every = timeouts.ping_interval.unwrap_or(Duration::from_secs(20));
    let mut tick = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut pong_due: Option<Instant> = None;
    let first = ControlMessage::Want { links: endpoint.pool };
    let mut end = match send(&mut ws, &first, send_timeout).await {
        Ok(()) => None,
        Err(e) => Some(End::Lost(e)),
    };
    // Whether the agent was asked to move (only an agent that knows `move`: an older one is told
    // `drain` when the sessions here end, as before).
    let mut moving = false;
    while end.is_none() {
        let pong_wait = async {
            match pong_due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        end = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let drain = ControlMessage::Drain { reason: "server shutting down".into() };
                let _ = send(&mut ws, &drain, send_timeout).await;
                Some(End::Drained)
            }
            _ = registry.leaving().cancelled(), if moves && !moving => {
                moving = true;
                info!(agent = %name, "instance draining: agent asked to move");
                let message = ControlMessage::Move { reason: "server draining".into() };
                send(&mut ws, &message, send_timeout).await.err().map(End::Lost)
            }
            _ = attached.replaced.cancelled() => Some(End::Replaced),
            _ = attached.revoked.cancelled() => Some(End::Revoked),
            _ = pong_wait => Some(End::Lost(format!("no pong within {:?}", timeouts.pong_timeout))),
            Some(control) = attached.control.recv() => match control {
                Control::Want(links) => send(&mut ws, &ControlMessage::Want { links }, send_timeout).await.err().map(End::Lost),
                Control::Move if moves => {
                    info!(agent = %name, "agent asked to move (admin)");
                    let message = ControlMessage::Move { reason: "asked by the operator".into() };
                    send(&mut ws, &message, send_timeout).await.err().map(End::Lost)
                }
                Control::Move => {
                    warn!(agent = %name, "agent asked to move, but it is older than `move`: not moved");
                    None
                }
            },
            _ = tick.tick() => {
                // A fleet file that no longer declares the agent (or another secret) ends it.
                // This loop waits for it at most a re-read of the fleet files (bounded by
                // fleet::REREAD_WAIT, and once a second per source however many agents ask).
                registry.recheck(&name, attached.id).await;
                if attached.revoked.is_cancelled() {
                    // No ping now: its pong would cross our close frame.
                    Some(End::Revoked)
                } else {
                    registry.top_up(&name, attached.id);
                    pong_due.get_or_insert(Instant::now() + timeouts.pong_timeout);
                    match timeout(send_timeout, ws.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(End::Lost(link::describe_ws(&e))),
                        Err(_) => Some(End::Lost("ping not written in time".into())),
                    }
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Close(frame))) => Some(End::Closed(frame.map(|f| shown(f.reason.as_bytes())).unwrap_or_default())),
                Some(Ok(_)) => {
                    pong_due = None;
                    None
                }
                Some(Err(e)) => Some(End::Lost(link::describe_ws(&e))),
                None => Some(End::Lost("connection closed without a close frame".into())),
            },
        };
    }
    let close = |reason: &'static str| CloseFrame {
        code: CloseCode::Away,
        reason: reason.into(),
    };

    let why = match &end {
        Some(End::Closed(_)) | None => "closed",
        Some(End::Drained) => "drained",
        Some(End::Replaced) => "replaced",
        Some(End::Revoked) => "revoked",
        Some(End::Lost(_)) => "lost",
    };
    // Every reason is exported at 0 from the start: one added here belongs in that list too.
    debug_assert!(crate::metrics::AGENT_DISCONNECTS.contains(&why), "{why} not in AGENT_DISCONNECTS");
    metrics.agent_disconnected(why);
    match end {
        Some(End::Closed(reason)) => {
            registry.detach(&name, attached.id, false);
            let reason = if reason.is_empty() { "none given" } else { reason.as_str() };
            match moving {
                true => info!(agent = %name, reason, "agent moved on: disconnected"),
                false => info!(agent = %name, reason, "agent disconnected"),
            }
        }
        Some(End::Drained) => {
            registry.detach(&name, attached.id, false);
            close_with(&mut ws, close("server shutting down"), timeouts.close).await;
            info!(agent = %name, "agent told to reconnect elsewhere (drain)");
        }
        Some(End::Replaced) => {
            // Registry::attach warned of it; an agent that never answers a close would keep a
            // connection per login for the close deadline: past a bound, closed at once.
            if let Some(_closing) = registry.closing_replaced(&name) {
                close_with(&mut ws, close("replaced by a newer connection of this agent"), timeouts.close).await;
            }
            debug!(agent = %name, "agent control link replaced");
        }
        Some(End::Revoked) => {
            // Out of the registry already, its sessions ended (logged there).
            close_with(&mut ws, revoked_close(), timeouts.close).await;
        }
        Some(End::Lost(why)) => {
            registry.detach(&name, attached.id, true);
            warn!(agent = %name, reason = why.to_string().as_str(), "agent lost: its sessions end");
        }
        None => {}
    }
}

/// Closes a control link with `frame` and waits, at most `within`, for the agent's answer to it,
/// reading and dropping what comes before (a pong in flight): closing the socket with bytes
/// unread would reset the connection, and the agent could lose our close frame, and its reason,
/// to the reset.
async fn close_with<S: LinkIo>(ws: &mut WebSocketStream<S>, frame: CloseFrame, within: Duration) {
    let _ = timeout(within, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}

/// The control link's close when its agent is no longer allowed (1008).
fn revoked_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Policy,
        reason: "this agent is no longer allowed".into(),
    }
}

async fn send<S: LinkIo>(ws: &mut WebSocketStream<S>, m: &ControlMessage, within: Duration) -> Result<(), String> {
    let text = serde_json::to_string(m).map_err(|e| e.to_string())?;
    match timeout(within, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("control message not written in time".into()),
    }
}
