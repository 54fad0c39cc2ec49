//! `wsbridge agent`: the process on the user's computer. It dials out to the server's agent
//! endpoint (through an HTTP proxy with CONNECT when it must), keeps a control link up (pings
//! both ways, reconnect with capped exponential backoff and full jitter), dials the data links
//! the server asks for, and on `open <service>` connects to that service, and only to services
//! in its own list: the server names a service, never an address.
//!
//! Its configuration comes from flags or an `[agent]` table in a TOML file (errors name the file,
//! line and field, as the server's do). Given several servers (instances that do not share their
//! agents), it keeps a connection to each, every one on its own ([`spawn`]), and one per instance
//! (the id in the control link's `101`).
//!
//! This file: the connections to the servers (dial, log in, control link, reconnect, drain and
//! move, looks where a balancer leads). `config.rs`: the flags and the `[agent]` table.
//! `session.rs`: the data links and the sessions they carry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use super::link::{self, ControlMessage, LinkStream};
use super::system_proxy::{self, Rereads, Verdict, WindowsChoice};
use crate::tls::BackendTls;

mod config;
mod session;

pub use config::{
    is_agent_file, is_agent_text, new_secret_text, proxy_from_env, write_new_secret, AgentArgs, AgentConfig, Proxy, ProxySource, ServerUrl,
};
use session::{spawn_link, Caps, Links};

/// Reconnect delays: exponential from `initial`, full jitter, capped at `max` (at `auth_max`
/// after the server refused the secret or another agent took the name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay's cap.
    pub initial: Duration,
    /// The cap after network failures.
    pub max: Duration,
    /// The cap after a refused login.
    pub auth_max: Duration,
    /// The cap for [`Backoff::drain_window`] after the server drained (it is likely
    /// restarting): the agent is back within this of the instance taking connections again.
    pub after_drain: Duration,
    /// How long after a drain the agent retries at most [`Backoff::after_drain`] apart (a
    /// minute): not with the growing backoff, so it is back within that of a restarted
    /// instance taking connections, before a balancer's health checks send it pages.
    pub drain_window: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            auth_max: Duration::from_secs(300),
            after_drain: Duration::from_secs(2),
            drain_window: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before attempt `failures + 1`: uniform in [cap/4, cap] where cap grows from
    /// `initial` by doubling up to `max` (or `auth_max`); the floor keeps a run of small draws
    /// from turning into a spin.
    pub fn delay(&self, failures: u32, auth: bool) -> Duration {
        let limit = if auth { self.auth_max } else { self.max };
        let cap = self.initial.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(limit);
        cap.mul_f64(0.25 + 0.75 * random_fraction())
    }

    /// The delay after a drain: uniform in [after_drain/2, after_drain], so that an instance's
    /// agents do not all come back in step.
    fn after_drain_delay(&self) -> Duration {
        self.after_drain.mul_f64(0.5 + 0.5 * random_fraction())
    }
}

/// Uniform in [0, 1].
fn random_fraction() -> f64 {
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX)
}

/// What the agent is doing, for its log and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Dialling the server.
    Connecting,
    /// The server accepted it and asked for links.
    Connected,
    /// Connected, and connecting again (the server is draining or asked, or its URL leads to
    /// another instance now); the old connection serves until the new one is up.
    Moving {
        /// The last attempt's outcome, or that it is under way.
        reason: String,
    },
    /// Waiting to dial again.
    Retrying {
        /// Why the last attempt or connection ended.
        reason: String,
        /// After how long.
        after: Duration,
    },
    /// Shut down.
    Stopped,
}

/// One line on how an agent's connections are doing (systemd's `STATUS=`): `servers` and
/// `states` in the same order, as [`AgentConfig::servers`] and [`AgentHandle::states`].
pub fn status_line(name: &str, servers: &[String], states: &[watch::Receiver<State>]) -> String {
    let now: Vec<State> = states.iter().map(|s| s.borrow().clone()).collect();
    let up = now.iter().filter(|s| matches!(s, State::Connected | State::Moving { .. })).count();
    let down: Vec<String> = servers
        .iter()
        .zip(&now)
        .filter_map(|(server, state)| match state {
            State::Connected | State::Stopped => None,
            State::Moving { reason } => Some(format!("{server}: moving, connecting again ({reason})")),
            State::Connecting => Some(format!("{server}: connecting")),
            State::Retrying { reason, after } => Some(format!("{server}: retrying in {:.1}s ({reason})", after.as_secs_f64())),
        })
        .collect();
    let head = match servers.len() {
        1 if up == 1 && down.is_empty() => return format!("agent {name}: connected to {}", servers[0]),
        1 if up == 1 => format!("agent {name}: connected"),
        1 => format!("agent {name}: not connected"),
        n => format!("agent {name}: connected to {up} of {n} servers"),
    };
    match down.is_empty() {
        true => head,
        false => format!("{head}; {}", down.join("; ")),
    }
}

/// A running agent, as [`spawn`] returns it.
#[derive(Debug)]
pub struct AgentHandle {
    /// Its state (its connection to the first server's), updated at each change.
    pub state: watch::Receiver<State>,
    /// The state of its connection to each server, in the order of [`AgentConfig::servers`].
    pub states: Vec<watch::Receiver<State>>,
    /// Attempts to connect so far.
    pub attempts: Arc<AtomicU64>,
    /// Looks where a server's URL leads a new connection so far ([`AgentConfig::balancer_check`]).
    pub looks: Arc<AtomicU64>,
    /// Cancel to stop it (as SIGTERM does).
    pub shutdown: CancellationToken,
    /// Ends when it has stopped and its sessions have finished (or the grace ran out); an error
    /// if a connection's task failed (then the others were stopped too: a service manager
    /// restarts the whole agent).
    pub task: tokio::task::JoinHandle<Result<(), String>>,
}

impl AgentHandle {
    /// Waits until the state is `want`.
    pub async fn wait_for(&mut self, want: impl Fn(&State) -> bool) {
        let _ = self.state.wait_for(|s| want(s)).await;
    }
}

/// Starts an agent on the current runtime: a connection to each of its servers, each on its own
/// (its backoff, links and sessions), so that one server's loss, drain or refusal leaves the
/// others serving.
///
/// # Errors
/// The CA file cannot be used.
pub fn spawn(config: AgentConfig) -> Result<AgentHandle, crate::tls::TlsError> {
    let attempts = Arc::new(AtomicU64::new(0));
    let looks = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let several = !config.more_servers.is_empty();
    let instances = Instances::default();
    let caps = Arc::new(Caps::new(&config.max_sessions));
    let mut states = Vec::new();
    let mut loops = Vec::new();
    for (index, one) in config.per_server().into_iter().enumerate() {
        let tls = tls_for(&one)?;
        log_route(&one);
        let (tx, rx) = watch::channel(State::Connecting);
        states.push(rx);
        let span = match several {
            // Each line says which connection it is about (one server: as before, no prefix).
            // At error level, so the prefix is there whatever level the log shows.
            true => tracing::error_span!("server", url = %one.server),
            false => tracing::Span::none(),
        };
        let mine = Mine {
            instances: instances.clone(),
            index,
            caps: caps.clone(),
            looks: looks.clone(),
        };
        loops.push(run(Arc::new(one), tls, shutdown.clone(), tx, attempts.clone(), mine).instrument(span));
    }
    // A task per connection, so that one failing (a bug: a panic) cannot take the others'
    // state with it unnoticed: it is logged, the others are stopped cleanly, and the agent
    // ends with an error.
    let mut tasks: futures_util::stream::FuturesUnordered<_> = loops.into_iter().map(tokio::spawn).collect();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let mut failed = None;
        // In the order they end: the first to fail stops the others at once.
        while let Some(ended) = tasks.next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "agent: a connection's task failed; stopping");
                stop.cancel();
                failed.get_or_insert(format!("a connection's task failed: {e}"));
            }
        }
        failed.map_or(Ok(()), Err)
    });
    Ok(AgentHandle {
        state: states[0].clone(),
        states,
        attempts,
        looks,
        shutdown,
        task,
    })
}

/// The start-up line on how a connection's server is reached, and why: through which proxy or
/// directly, and the setting that decided (a warning when a Windows setting names a proxy the
/// agent cannot use, such as a SOCKS proxy).
fn log_route(config: &AgentConfig) {
    let server = &config.server;
    let from = &config.proxy_source;
    let warning = matches!(from, ProxySource::Windows(choice) if choice.warning);
    match (&config.proxy, warning) {
        (Some(proxy), false) => info!(%server, %proxy, %from, "agent: reaching the server through a proxy"),
        (Some(proxy), true) => warn!(%server, %proxy, %from, "agent: reaching the server through a proxy"),
        (None, false) => info!(%server, %from, "agent: reaching the server directly"),
        (None, true) => warn!(%server, %from, "agent: reaching the server directly"),
    }
}

/// A route for the log: `through proxy:port (from …)` or `directly (from …)`.
fn route_text(proxy: Option<&Proxy>, from: &ProxySource) -> String {
    match proxy {
        Some(p) => format!("through {p} (from {from})"),
        None => format!("directly (from {from})"),
    }
}

/// What the Windows settings read again (`read`; `None`: no answer at all) say for a
/// connection that reaches its server as `config` says: the configuration for its next attempt
/// when that is another route or another source, `None` to go on as it is. A change of route is
/// logged once (at info, at warn when a setting names a proxy the agent cannot use); the rest at
/// debug.
fn follow_windows(config: &AgentConfig, read: Option<(Option<Proxy>, WindowsChoice)>, rereads: &mut Rereads) -> Option<AgentConfig> {
    let server = &config.server;
    let was = route_text(config.proxy.as_ref(), &config.proxy_source);
    let Some((proxy, choice)) = read else {
        debug!(%server, route = %was, "agent: the Windows proxy settings could not be read again (no thread); keeping the route");
        return None;
    };
    match rereads.judge(config.proxy.as_ref(), proxy.as_ref(), &choice) {
        Verdict::Late => {
            debug!(%server, from = %choice, route = %was, "agent: the Windows proxy settings were not read again in time; keeping the route");
            return None;
        }
        Verdict::Same => debug!(%server, from = %choice, "agent: the Windows proxy settings read again: the same route"),
        Verdict::Changed => {
            let from = &choice;
            match (&proxy, choice.warning) {
                (Some(proxy), false) => info!(
                    %server, %proxy, %from, %was,
                    "agent: the Windows proxy settings changed: reaching the server through a proxy now"
                ),
                (Some(proxy), true) => warn!(
                    %server, %proxy, %from, %was,
                    "agent: the Windows proxy settings changed: reaching the server through a proxy now"
                ),
                (None, false) => info!(%server, %from, %was, "agent: the Windows proxy settings changed: reaching the server directly now"),
                (None, true) => warn!(%server, %from, %was, "agent: the Windows proxy settings changed: reaching the server directly now"),
            }
        }
    }
    let source = ProxySource::Windows(choice);
    if config.proxy == proxy && config.proxy_source == source {
        return None;
    }
    let mut next = config.clone();
    next.proxy = proxy;
    next.proxy_source = source;
    Some(next)
}

/// The TLS connector for a `wss://` server: the CA file's roots or the system's.
fn tls_for(config: &AgentConfig) -> Result<Option<BackendTls>, crate::tls::TlsError> {
    if !config.server.tls {
        return Ok(None);
    }
    BackendTls::new(&crate::config::tls::BackendTlsSettings {
        server_name: None,
        ca: config.ca_file.clone(),
        insecure_skip_verify: config.insecure_skip_verify,
    })
    .map(Some)
}

/// Why a connection attempt or a connected control link ended.
enum Ended {
    Shutdown,
    /// The server is draining. `stable`: the link had lasted its ping interval (a server that
    /// drains every connection as soon as it is made is backed off from, as one that drops it).
    Drain {
        stable: bool,
    },
    /// The agent connects again (the server asked, or its URL leads elsewhere now): the link goes
    /// on serving until the agent has.
    Moving(Move, Box<ControlLink>),
    /// The server refused the login (401) or another agent took the name: long backoff.
    Refused(String),
    /// Anything else: network, server restart, ping timeout.
    Failed {
        reason: String,
        was_connected: bool,
        /// Connected for at least the ping interval: the backoff starts again from its first
        /// step. A connection lost sooner (a server that crashes once it has let agents in, a
        /// middlebox that cuts upgraded connections) counts as one more failure, so such a loop
        /// backs off as any other does.
        stable: bool,
        /// The server's `Retry-After` (429, 503): the next attempt waits at least this long.
        retry_after: Option<Duration>,
        /// The server answered (an HTTP status): the route to it works, whatever failed.
        answered: bool,
    },
}

impl Ended {
    /// A failure before the server answered anything: not connected, no `Retry-After`.
    fn unconnected(reason: String) -> Ended {
        Ended::Failed {
            reason,
            was_connected: false,
            stable: false,
            retry_after: None,
            answered: false,
        }
    }
}

/// Why a connected control link moves: the agent connects again, the link serving its instance
/// until then (make-before-break).
enum Move {
    /// The server asked (`move`): it is draining, or its operator said so. Its reason, and
    /// whether the link had lasted its ping interval (see [`Ended::Drain`]).
    Asked(String, bool),
    /// The server's URL leads a new connection to another instance now: a balancer that sends
    /// pages there too, an instance back after a failover. That connection (upgraded, before
    /// its hello) becomes the agent's: a second dial could land elsewhere again.
    Followed {
        /// The instance it reached.
        instance: String,
        /// The instance the link that moves is on.
        from: String,
        /// The connection that found it.
        ws: Box<ControlWs>,
    },
}

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Move::Asked(reason, _) => f.write_str(reason),
            Move::Followed { .. } => f.write_str("new connections reach another instance"),
        }
    }
}

/// After a connection left an instance (moved, drained, lost), the next one, if it is on
/// another instance, looks where its URL leads at most this far apart ([`FAST_CHECKS`];
/// [`AgentConfig::fast_check`])...
const FAST_CHECK: Duration = Duration::from_secs(5);
/// ...for this long, then further apart, to [`AgentConfig::balancer_check`] at this many times
/// the time since it left: the instance left is likely restarting (a deploy, a reboot), and the
/// balancer sends new connections and pages back to it once its health checks pass.
const FAST_CHECKS: (Duration, u32) = (Duration::from_secs(120), 24);

/// What a connection loop knows of its last connection, for the next.
#[derive(Default)]
struct Last {
    /// The instance its last connected link reached.
    instance: Option<String>,
    /// When that link stopped being the loop's (it moved, was drained or lost).
    left: Option<Instant>,
    /// Since when that link's looks were quick ([`Checks::fast_since`]): a link back on the same
    /// instance (a blip, an operator's move before the balancer had the other one up) goes on
    /// from there, the instance left before still being on its way back.
    fast_since: Option<Instant>,
    /// A connection made already (a look that found where to move), with its instance: the
    /// next attempt's.
    dialled: Option<(ControlWs, Option<String>)>,
    /// That link left because the server asked (a move, a drain).
    asked: bool,
    /// When the last moves its looks found were: more than [`MOVES_DAMPED`] of them within
    /// [`FAST_CHECKS`]' window, and looks are no longer quick (a balancer that sends each new
    /// connection elsewhere while no data link has met the wrong instance yet).
    follows: std::collections::VecDeque<Instant>,
}

/// See [`Last::follows`].
const MOVES_DAMPED: usize = 3;

async fn run(
    mut config: Arc<AgentConfig>,
    tls: Option<BackendTls>,
    shutdown: CancellationToken,
    state: watch::Sender<State>,
    attempts: Arc<AtomicU64>,
    mine: Mine,
) {
    let sessions = TaskTracker::new();
    let mut failures = 0u32;
    // Connections in a row that were lost before they were stable ([`Ended::Failed`]'s
    // `stable`): where the backoff starts again after the next.
    let mut short = 0u32;
    let set = |s: State| {
        state.send_if_modified(|old| {
            let changed = *old != s;
            *old = s;
            changed
        });
    };
    // The reason of the last failure: a retry that fails the same way is logged at debug only,
    // so an outage of hours is a few lines, not one per attempt.
    let mut last_failure: Option<String> = None;
    let mut retry_after: Option<Duration> = None;
    // When the server last drained: it is likely back soon (a restart), and pages reaching it
    // then find this agent only once it is back too.
    let mut drained: Option<Instant> = None;
    // A link that was asked to move, serving its instance until this loop is connected again.
    let mut previous: Option<Previous> = None;
    let mut last = Last::default();
    // A route from the Windows settings is read again before a retry after a failure (the
    // network may have changed under it), at most every REREAD_EVERY; the start's read counts.
    let mut rereads = Rereads::new(std::time::Instant::now());
    loop {
        attempts.fetch_add(1, Ordering::Relaxed);
        // While the link that moves serves, the agent is still connected.
        let moving = previous.as_ref().is_some_and(Previous::serves);
        if !moving {
            set(State::Connecting);
        }
        match last_failure {
            None => info!(server = %config.server, agent = %config.name, "agent: connecting"),
            Some(_) => debug!(server = %config.server, "agent: connecting again"),
        }
        let ended = control(&config, tls.as_ref(), &shutdown, &set, &sessions, &mine, &mut previous, &mut last).await;
        if matches!(
            ended,
            Ended::Moving(..) | Ended::Drain { .. } | Ended::Failed { was_connected: true, .. }
        ) {
            last.left = Some(Instant::now());
            // The server asked (a drain, an operator): quick looks even back on the same instance.
            last.asked = matches!(ended, Ended::Moving(Move::Asked(..), _) | Ended::Drain { .. });
            // The route worked: timeouts reading the Windows settings count again from none.
            rereads.connected();
        }
        // The server said to reconnect (a drain): logged as what it is, not as a failure.
        let mut told = false;
        // The attempt failed or the connection was lost: the route may be what failed.
        let mut failed = false;
        // A drain on a link that had not lasted, after another such (see `Ended::Drain`).
        let mut quick_again = false;
        let (reason, auth) = match ended {
            Ended::Shutdown => break,
            Ended::Moving(why, link) => {
                let reason = why.to_string();
                // Asked on a link that had not lasted, after another such: a server that moves
                // every connection as soon as it is made is backed off from, not followed at
                // once for ever (one move soon after a move is a rolling deploy: followed).
                let quick = matches!(why, Move::Asked(_, false));
                let again = quick && short > 0;
                let asked = match why {
                    Move::Asked(reason, _) => {
                        info!(
                            %reason,
                            "agent: the server asked this agent to move: connecting again; this connection serves until then"
                        );
                        true
                    }
                    Move::Followed { instance, from, ws } => {
                        info!(
                            %instance,
                            %from,
                            "agent: the server's URL leads new connections to another instance now: connecting there; this \
                             connection serves until then"
                        );
                        last.dialled = Some((*ws, Some(instance)));
                        last.follows.push_back(Instant::now());
                        false
                    }
                };
                let moved = Previous::default();
                sessions.spawn(
                    link.finish(shutdown.clone(), moved.let_go.clone(), moved.ended.clone())
                        .in_current_span(),
                );
                if let Some(older) = previous.replace(moved) {
                    older.let_go.cancel();
                }
                set(State::Moving { reason });
                short = if quick { short.saturating_add(1) } else { 0 };
                failures = if again { short - 1 } else { 0 };
                last_failure = None;
                if !asked {
                    // At once: its check found where to go.
                    continue;
                }
                // Soon: a balancer whose health checks saw the drain sends it elsewhere, and the
                // draining server answers 503 with a Retry-After until then. Within a second,
                // not at once: every agent of the instance was told in the same instant.
                let mut wait = config.backoff.after_drain.mul_f64(0.5 * random_fraction());
                match again {
                    true => wait = wait.max(config.backoff.delay(failures, false)),
                    false => drained = Some(Instant::now()),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            Ended::Drain { stable } => {
                // As a move (above): a drain on a link that had not lasted, after another such,
                // is backed off from as a short loss, without the short wait after a drain.
                let again = !stable && short > 0;
                short = if stable { 0 } else { short.saturating_add(1) };
                failures = if again { short - 1 } else { 0 };
                if !again {
                    drained = Some(Instant::now());
                }
                quick_again = again;
                last_failure = None;
                told = true;
                ("the server is draining: reconnecting".to_owned(), false)
            }
            Ended::Refused(r) => (r, true),
            Ended::Failed {
                reason,
                was_connected,
                stable,
                retry_after: server_says,
                answered,
            } => {
                if was_connected {
                    // The backoff starts again after a connection, from as many steps as there
                    // were short ones in a row before it (none, after one that lasted).
                    failures = if stable { 0 } else { short };
                    short = if stable { 0 } else { short.saturating_add(1) };
                    last_failure = None;
                }
                // A draining instance's 503: the quick retries start with the first one (no
                // drain message came), but later ones do not start them again, or an instance
                // that drains for long (a long shutdown_grace), or answers so for good, would be
                // asked every second or two for as long (a hostile-server review: without end).
                // A drain seen long ago (ten windows) is another drain's.
                if reason.contains(link::DRAINING) && drained.is_none_or(|t| t.elapsed() >= config.backoff.drain_window.saturating_mul(10))
                {
                    drained = Some(Instant::now());
                }
                retry_after = server_says;
                // A server that answered was reached: the route is not what failed.
                failed = !answered;
                (reason, false)
            }
        };
        failures = failures.saturating_add(1);
        // What the server asked for counts, up to the longest backoff this agent would use.
        let floor = retry_after.take().unwrap_or_default().min(config.backoff.auth_max);
        let mut after = config.backoff.delay(failures, auth);
        if drained.is_some_and(|t| t.elapsed() < config.backoff.drain_window) && !auth && !quick_again {
            after = after.min(config.backoff.after_drain_delay());
        }
        // No sooner than the server asked, and spread by up to a second past that: a server's
        // Retry-After is the same for every agent it answers (a drain, the login brake).
        let after = match floor > after {
            true => floor + config.backoff.after_drain.mul_f64(0.5 * random_fraction()),
            false => after,
        };
        let moving = previous.as_ref().is_some_and(Previous::serves);
        // For the log, to the millisecond.
        let retry_in = Duration::from_millis(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        if last_failure.as_deref() == Some(reason.as_str()) {
            debug!(%reason, ?retry_in, "agent: still not connected; retrying");
        } else if moving {
            info!(%reason, ?retry_in, "agent: not connected again yet; the connection that moves still serves");
        } else if told {
            // What the server said it would do: not a failure.
            info!(%reason, ?retry_in, "agent: reconnecting");
        } else {
            match &config.proxy_source {
                // The route may be what failed (the computer moved to another network): the line
                // says where it came from, and that it is read again. Not after the server
                // answered (a refused secret, a 503): the route worked, and is not read again.
                ProxySource::Windows(_) if failed => warn!(
                    %reason,
                    ?retry_in,
                    route = %config.proxy_source,
                    "agent: not connected; retrying (with the Windows proxy settings read again first, at most every 10 s)"
                ),
                _ => warn!(%reason, ?retry_in, "agent: not connected; retrying"),
            }
        }
        last_failure = Some(reason.clone());
        match moving {
            true => set(State::Moving { reason }),
            false => set(State::Retrying { reason, after }),
        }
        // Its deadline is set now: a read of the Windows settings runs within the backoff's
        // wait, and the next attempt starts when both are over.
        let wait = tokio::time::sleep(after);
        tokio::pin!(wait);
        let reading = match (&config.proxy_source, failed) {
            (ProxySource::Windows(_), true) if rereads.start(std::time::Instant::now()) => {
                system_proxy::windows_again(&config.server, config.connect_timeout, rereads.busy())
            }
            _ => None,
        };
        if let Some(reading) = reading {
            // Not waited for at shutdown: its threads end by themselves (the answer within its
            // deadline; WinHTTP's maybe later, holding `rereads.busy()` until then).
            let read = tokio::select! {
                _ = shutdown.cancelled() => break,
                read = reading => read.ok(),
            };
            if let Some(next) = follow_windows(&config, read, &mut rereads) {
                if next.proxy != config.proxy {
                    // A new route is tried soon (the backoff grew on the old one's failures), but
                    // no sooner than the server asked; the failures count on (a setting that
                    // flips between two answers must not undo the backoff).
                    let soon = config.backoff.delay(1, false).max(floor);
                    if Instant::now() + soon < wait.deadline() {
                        wait.as_mut().reset(Instant::now() + soon);
                        if !moving {
                            set(State::Retrying {
                                reason: last_failure.clone().unwrap_or_default(),
                                after: soon,
                            });
                        }
                    }
                }
                // For the next attempt's dials and its links'; links and sessions open now keep
                // theirs.
                config = Arc::new(next);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wait => {}
        }
    }
    sessions.close();
    if timeout(config.shutdown_grace, sessions.wait()).await.is_err() {
        warn!(
            remaining = sessions.len(),
            "agent: shutdown grace over; ending the remaining sessions"
        );
    }
    info!("agent: stopped");
    set(State::Stopped);
}

/// A control link that was asked to move, serving its instance on its own task
/// ([`ControlLink::finish`]) until the agent is connected again.
#[derive(Default)]
struct Previous {
    /// Cancelled once the agent is connected again: the link closes.
    let_go: CancellationToken,
    /// Cancelled when the link has ended, for whatever reason.
    ended: CancellationToken,
}

impl Previous {
    /// Whether the link still serves.
    fn serves(&self) -> bool {
        !self.ended.is_cancelled()
    }
}

/// One control connection, from dialling (or `last.dialled`) to its end. Once it is connected,
/// `previous` (a link that moves, serving its instance meanwhile) is let go, and `last` says
/// which instance it is on.
#[allow(clippy::too_many_arguments)]
async fn control(
    config: &Arc<AgentConfig>,
    tls: Option<&BackendTls>,
    shutdown: &CancellationToken,
    set: &impl Fn(State),
    sessions: &TaskTracker,
    mine: &Mine,
    previous: &mut Option<Previous>,
    last: &mut Last,
) -> Ended {
    let failed = Ended::unconnected;
    let dialled = match last.dialled.take() {
        Some(made) => Ok(Ok(made)),
        None => tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            r = timeout(config.connect_timeout, open_control(config, tls)) => r,
        },
    };
    let (mut ws, instance) = match dialled {
        Err(_) => return failed(format!("no answer within {:?}", config.connect_timeout)),
        Ok(Err(Ended::Refused(r))) => return Ended::Refused(r),
        Ok(Err(e)) => return e,
        Ok(Ok(dialled)) => dialled,
    };
    // Before the hello, which would replace this agent's connection already on that instance.
    let url = config.server.to_string();
    let claim = match instance.clone().map(|id| mine.instances.claim(id, mine.index, &url)) {
        Some(Err(other)) => {
            leave_before_hello(&mut ws, "this agent is connected to this instance already").await;
            return failed(format!(
                "{url} reaches the same instance as {other}, which this agent is connected to already"
            ));
        }
        Some(Ok(claim)) => Some(claim),
        None => None,
    };
    // Quick looks on another instance than the last link's, which it left a moment ago; on the
    // same one, as that link's.
    let (window, _) = FAST_CHECKS;
    last.follows.retain(|t| t.elapsed() < window);
    let fast_since = match last.left {
        // Hopping between instances: the ordinary looks, no quicker.
        Some(_) if last.follows.len() > MOVES_DAMPED => None,
        Some(left) if last.instance != instance || last.asked => Some(left),
        _ => last.fast_since,
    };
    // A server that names no instance cannot say where its URL leads.
    let checks = config.balancer_check.filter(|_| instance.is_some()).map(|every| Checks {
        every,
        fast: config.fast_check,
        fast_since,
    });
    // This connection's link key (see link::ControlMessage::Hello): its data links carry it.
    let link_key = link::new_secret().ok();
    let hello = ControlMessage::Hello {
        name: config.name.clone(),
        services: config.services.keys().cloned().collect(),
        version: link::SESSION_IDS,
        link_key: link_key.clone(),
    };
    let Ok(text) = serde_json::to_string(&hello) else {
        return failed("hello not encoded".into());
    };
    if let Err(e) = timeout(config.pong_timeout, ws.send(Message::text(text)))
        .await
        .unwrap_or(Err(tungstenite::Error::ConnectionClosed))
    {
        return failed(format!("hello not sent: {e}"));
    }
    // Idle links wait for `open` until the control link ends; sessions already open go on.
    let idle = shutdown.child_token();
    let links = Links {
        config: config.clone(),
        tls: tls.cloned(),
        idle: idle.clone(),
        sessions: sessions.clone(),
        instance,
        link_key,
        misrouted: Arc::default(),
        capped: Arc::default(),
        raw: Arc::default(),
        caps: mine.caps.clone(),
        dials: Arc::default(),
    };
    let mut link = ControlLink {
        ws,
        _idle: idle.drop_guard(),
        links,
        claim,
        checks,
        looks: mine.looks.clone(),
        tick: tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval),
        pong_due: None,
        connected: false,
        since: None,
    };
    // Servers from before instance ids name none.
    let link_instance = link.links.instance.clone();
    let instance = link.links.instance.clone().unwrap_or_else(|| "-".into());
    let mut on_connected = || {
        info!(agent = %config.name, services = config.services.len(), %instance, "agent: connected");
        last.instance = link_instance.clone();
        last.left = None;
        last.fast_since = fast_since;
        set(State::Connected);
        if let Some(old) = previous.take() {
            old.let_go.cancel();
        }
    };
    match link.serve(shutdown, None, &mut on_connected).await {
        Served::Ended(ended) => ended,
        Served::Moving(why) => {
            // Its data links may reach the instance it moves to by now (421): expected, not a
            // balancer that spreads connections.
            link.links.misrouted.store(true, Ordering::Relaxed);
            Ended::Moving(why, Box::new(link))
        }
    }
}

/// A connected control link, owned: asked to move (`move`, the server is draining), it goes on
/// serving its instance on a task of its own ([`ControlLink::finish`]) while the agent connects
/// again, until that connection is up (make-before-break).
struct ControlLink {
    ws: ControlWs,
    /// Cancels `links.idle` when the link is dropped: its idle data links close.
    _idle: tokio_util::sync::DropGuard,
    links: Links,
    claim: Option<Claim>,
    /// When it looks where its URL leads a new connection (`None`: never).
    checks: Option<Checks>,
    /// Looks so far, over all of the agent's connections ([`AgentHandle::looks`]).
    looks: Arc<AtomicU64>,
    tick: tokio::time::Interval,
    pong_due: Option<Instant>,
    /// Its first `want` came: the server took it.
    connected: bool,
    /// When that was.
    since: Option<Instant>,
}

/// How [`ControlLink::serve`] stopped.
enum Served {
    Ended(Ended),
    /// The agent is to connect again; the link is still up.
    Moving(Move),
}

/// When a control link looks where its server's URL leads a new connection.
struct Checks {
    every: Duration,
    /// [`AgentConfig::fast_check`]: [`FAST_CHECK`] but in tests.
    fast: Duration,
    /// When the loop's previous link left another instance: looks are closer together for a
    /// while after ([`FAST_CHECKS`]).
    fast_since: Option<Instant>,
}

impl Checks {
    fn next(&self) -> Instant {
        let now = Instant::now();
        now + self.interval(now).mul_f64(0.75 + 0.5 * random_fraction())
    }

    /// The interval at `now` before its spread (agents that moved in one instant do not look in
    /// step): `fast` ([`FAST_CHECK`]) for [`FAST_CHECKS`]' time after `fast_since`, then growing
    /// with the time since, up to `every`. Never under 100 ms, whatever it is given.
    fn interval(&self, now: Instant) -> Duration {
        let every = match self.fast_since {
            Some(t) => {
                let (window, slope) = FAST_CHECKS;
                let since = now.saturating_duration_since(t);
                let grown = if since < window {
                    self.fast
                } else {
                    (since / slope).max(self.fast)
                };
                self.every.min(grown)
            }
            None => self.every,
        };
        every.max(Duration::from_millis(100))
    }
}

/// What the check of [`ControlLink::serve`] came to.
enum Checked {
    /// Time to look.
    Due,
    /// What the look found ([`where_new_connections_go`]).
    Found(Looked),
}

/// A new connection (upgraded, before its hello) and the instance it reached, if a look could
/// tell.
type Looked = Option<(Box<ControlWs>, String)>;

/// A look under way.
type Looking = std::pin::Pin<Box<dyn std::future::Future<Output = Looked> + Send>>;

impl ControlLink {
    /// Serves the link: pings, `want`, `drain`, `move`, until it ends, or until the server asks
    /// it to move (unless `let_go` is given: the link moves already, and ends when it fires).
    async fn serve(&mut self, shutdown: &CancellationToken, let_go: Option<&CancellationToken>, on_connected: &mut impl FnMut()) -> Served {
        let config = self.links.config.clone();
        // From its first `want` (the server took it); a link that moves already looks no more.
        let looks = let_go.is_none();
        let mut check_at = self.checks.as_ref().filter(|_| looks && self.connected).map(Checks::next);
        let mut checking: Option<Looking> = None;
        loop {
            let pong_due = self.pong_due;
            let pong_wait = async {
                match pong_due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let moved = async {
                match let_go {
                    Some(t) => t.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let check = async {
                match (checking.as_mut(), check_at) {
                    (Some(looking), _) => Checked::Found(looking.await),
                    (None, Some(t)) => {
                        tokio::time::sleep_until(t).await;
                        Checked::Due
                    }
                    (None, None) => std::future::pending().await,
                }
            };
            let connected = self.connected;
            let stable = self.since.is_some_and(|t| t.elapsed() >= config.ping_interval);
            let lost = |reason: String| {
                Served::Ended(Ended::Failed {
                    reason,
                    was_connected: connected,
                    stable,
                    retry_after: None,
                    answered: false,
                })
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.close("agent shutting down").await;
                    return Served::Ended(Ended::Shutdown);
                }
                _ = moved => {
                    self.close("connected elsewhere").await;
                    info!("agent: the connection that moved is closed");
                    return Served::Ended(Ended::Shutdown);
                }
                _ = pong_wait => return lost(format!("no pong within {:?}", config.pong_timeout)),
                _ = self.tick.tick() => {
                    self.pong_due.get_or_insert(Instant::now() + config.pong_timeout);
                    match timeout(config.pong_timeout, self.ws.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return lost(link::describe_ws(&e)),
                        Err(_) => return lost("ping not written in time".into()),
                    }
                }
                m = self.ws.next() => {
                    self.pong_due = None;
                    match m {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ControlMessage>(&text) {
                            Ok(ControlMessage::Want { links }) => {
                                if !self.connected {
                                    self.connected = true;
                                    self.since = Some(Instant::now());
                                    on_connected();
                                    check_at = self.checks.as_ref().filter(|_| looks).map(Checks::next);
                                }
                                // Bounded: the server asks for its pool's worth; a confused one
                                // cannot make the agent dial without end.
                                for _ in 0..links.min(64) {
                                    if self.links.sessions.len() >= 4096 {
                                        break;
                                    }
                                    spawn_link(&self.links);
                                }
                            }
                            Ok(ControlMessage::Drain { reason }) => {
                                let reason = link::clean_reason(&reason);
                                info!(%reason, "agent: the server is draining");
                                let _ = timeout(Duration::from_secs(2), self.ws.close(None)).await;
                                return Served::Ended(Ended::Drain { stable });
                            }
                            Ok(ControlMessage::Move { reason }) if let_go.is_none() => {
                                return Served::Moving(Move::Asked(link::clean_reason(&reason), stable));
                            }
                            _ => debug!("agent: unexpected control message ignored"),
                        },
                        Some(Ok(Message::Close(frame))) => {
                            let reason = frame.map(|f| link::clean_reason(&f.reason)).unwrap_or_default();
                            if reason.contains("replaced") {
                                return Served::Ended(Ended::Refused(format!(
                                    "another agent connected with the name {}",
                                    config.name
                                )));
                            }
                            return lost(format!("the server closed the control link: {reason}"));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return lost(link::describe_ws(&e)),
                        None => return lost("the server closed the connection".into()),
                    }
                }
                checked = check => match checked {
                    Checked::Due => {
                        self.looks.fetch_add(1, Ordering::Relaxed);
                        let (config, tls) = (config.clone(), self.links.tls.clone());
                        checking = Some(Box::pin(async move { where_new_connections_go(&config, tls.as_ref()).await }));
                    }
                    Checked::Found(found) => {
                        checking = None;
                        check_at = self.checks.as_ref().map(Checks::next);
                        let Some((mut ws, instance)) = found else { continue };
                        if self.links.instance.as_deref() == Some(instance.as_str()) {
                            let next = check_at.map(|t| t.saturating_duration_since(Instant::now()));
                            debug!(%instance, next_in = ?next, "agent: looked where the server's URL leads: this instance");
                        }
                        if self.follows(&instance) {
                            let from = self.links.instance.clone().unwrap_or_default();
                            return Served::Moving(Move::Followed { instance, from, ws });
                        }
                        // Not waited for here: the link goes on serving meanwhile.
                        self.links.sessions.spawn(async move { leave_before_hello(&mut ws, "looking where new connections go").await });
                    }
                },
            }
        }
    }

    /// Whether a new connection's reaching `instance` means this link is to move there.
    fn follows(&self, instance: &str) -> bool {
        if self.links.instance.as_deref() == Some(instance) {
            return false;
        }
        // Its data links reach other instances too: a balancer that spreads connections, where
        // following would only hop (the 421's warning says so).
        if self.links.misrouted.load(Ordering::Relaxed) {
            debug!(%instance, "agent: new connections reach another instance, but so do data links; staying");
            return false;
        }
        if let Some(other) = self.claim.as_ref().and_then(|c| c.held_elsewhere(instance)) {
            debug!(%instance, %other, "agent: new connections reach an instance another of its connections is on; staying");
            return false;
        }
        true
    }

    /// The rest of a link asked to move: it serves its instance (pages the balancer still sends
    /// there find the agent) until `let_go` (the agent connected again), the server's drain, the
    /// agent's shutdown or its loss.
    async fn finish(mut self, shutdown: CancellationToken, let_go: CancellationToken, ended: CancellationToken) {
        let _ended = ended.drop_guard();
        if let Served::Ended(Ended::Failed { reason, .. }) = self.serve(&shutdown, Some(&let_go), &mut || {}).await {
            debug!(%reason, "agent: the connection that was moving ended");
        }
    }

    /// Closes the link with `reason` and waits (at most 2 s) for the server's answer, reading
    /// and dropping what comes before it: a socket closed with bytes unread is reset, and the
    /// server could take the reset for a lost agent and end the sessions through it.
    async fn close(&mut self, reason: &'static str) {
        let frame = tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: reason.into(),
        };
        let _ = timeout(Duration::from_secs(2), async {
            if self.ws.close(Some(frame)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = self.ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
    }
}

type ControlWs = tokio_tungstenite::WebSocketStream<LinkStream>;

/// The instances an agent's connections are on (by the id in each control link's `101`), with
/// the connection (its index among the servers, and its URL) on each: one connection per
/// instance, since two would replace each other there.
#[derive(Clone, Default)]
struct Instances(Arc<std::sync::Mutex<std::collections::HashMap<String, Holding>>>);

/// Which connection holds an instance: its index and URL, and how many of its connections do
/// (two while a connection that moves lands on the instance it left, until the old one goes).
struct Holding {
    index: usize,
    url: String,
    claims: usize,
}

/// One connection's view of what the agent's connections share: the [`Instances`] they are on,
/// and the capped services' sessions.
struct Mine {
    instances: Instances,
    /// Which of the agent's servers this connection is to.
    index: usize,
    /// The capped services' open sessions, over all of the agent's connections.
    caps: Arc<Caps>,
    /// Looks where a URL leads so far ([`AgentHandle::looks`]).
    looks: Arc<AtomicU64>,
}

/// An instance held by one connection, until it is dropped.
struct Claim {
    instances: Instances,
    id: String,
    index: usize,
}

impl Instances {
    /// Claims instance `id` for connection `index` (to `url`); if another connection has it,
    /// that one's URL.
    fn claim(&self, id: String, index: usize, url: &str) -> Result<Claim, String> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match held.get_mut(&id) {
            Some(h) if h.index != index => return Err(h.url.clone()),
            Some(h) => h.claims += 1,
            None => {
                held.insert(
                    id.clone(),
                    Holding {
                        index,
                        url: url.to_owned(),
                        claims: 1,
                    },
                );
            }
        }
        Ok(Claim {
            instances: self.clone(),
            id,
            index,
        })
    }
}

impl Claim {
    /// The URL of another of the agent's connections that is on `instance`, if one is.
    fn held_elsewhere(&self, instance: &str) -> Option<String> {
        let held = self.instances.0.lock().unwrap_or_else(|p| p.into_inner());
        held.get(instance).filter(|h| h.index != self.index).map(|h| h.url.clone())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.instances.0.lock().unwrap_or_else(|p| p.into_inner());
        // Only its own: another connection may hold the id by now.
        if let Some(h) = held.get_mut(&self.id).filter(|h| h.index == self.index) {
            h.claims -= 1;
            if h.claims == 0 {
                held.remove(&self.id);
            }
        }
    }
}

/// Closes a control link before its hello (which would replace the agent's connection on that
/// instance), saying why.
async fn leave_before_hello(ws: &mut ControlWs, reason: &'static str) {
    let frame = tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: reason.into(),
    };
    let _ = timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
}

/// Where the server's URL leads a new connection now: a control link, upgraded, before its
/// hello, and the instance its `101` names. `None` when it cannot tell (no answer in time, a
/// refusal, a server that names no instance): the link stays where it is.
async fn where_new_connections_go(config: &AgentConfig, tls: Option<&BackendTls>) -> Looked {
    let (mut ws, instance) = match timeout(config.connect_timeout, open_control(config, tls)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(Ended::Failed { reason, .. } | Ended::Refused(reason))) => {
            debug!(%reason, "agent: could not look where the server's URL leads now");
            return None;
        }
        Ok(Err(_)) => return None,
        Err(_) => {
            debug!(within = ?config.connect_timeout, "agent: could not look where the server's URL leads now: no answer");
            return None;
        }
    };
    match instance {
        Some(instance) => Some((Box::new(ws), instance)),
        None => {
            leave_before_hello(&mut ws, "looking where new connections go").await;
            None
        }
    }
}

/// Dials and upgrades the control link; with the instance id the server's `101` gave (servers
/// from before it give none).
async fn open_control(config: &AgentConfig, tls: Option<&BackendTls>) -> Result<(ControlWs, Option<String>), Ended> {
    let failed = Ended::unconnected;
    let (io, _) = dial(config, tls)
        .await
        .map_err(|e| failed(format!("cannot reach the server: {e}")))?;
    let s = &config.server;
    let url = s.to_string();
    let mut request = url.into_client_request().map_err(|e| failed(e.to_string()))?;
    let headers = request.headers_mut();
    let value = |v: &str| http::HeaderValue::from_str(v).map_err(|_| failed("a header value is not valid".into()));
    headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value(link::CONTROL_PROTOCOL)?);
    headers.insert(http::header::AUTHORIZATION, value(&format!("Bearer {}", config.secret))?);
    headers.insert(link::NAME_HEADER, value(&config.name)?);
    match tokio_tungstenite::client_async_with_config(request, io, Some(link::control_ws_config())).await {
        Ok((ws, response)) => {
            let instance = response
                .headers()
                .get(link::INSTANCE_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 64)
                .map(str::to_owned);
            Ok((ws, instance))
        }
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status();
            // Delay-seconds only (what wsbridge and most servers send); an HTTP date is ignored.
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let failed = |reason: String| Ended::Failed {
                reason,
                was_connected: false,
                stable: false,
                retry_after,
                answered: true,
            };
            // The answer's text, without the status line wsbridge's answers begin with.
            let text = response
                .body()
                .as_deref()
                .map(|b| link::clean_reason(String::from_utf8_lossy(b).trim()))
                .map(|t| match t.strip_prefix(status.to_string().as_str()) {
                    Some(rest) => rest.trim_start_matches(':').trim().to_owned(),
                    None => t,
                })
                .filter(|t| !t.is_empty());
            match status.as_u16() {
                401 => Err(Ended::Refused(format!("the server refused this agent's name or secret ({status})"))),
                // Not the secret: a wsbridge server refuses a request with an `Origin` (a
                // browser's) this way, which an agent's has only if something between added it;
                // otherwise a policy (the server's networks, a proxy's). The long backoff all
                // the same: retrying soon will not change it.
                403 => Err(Ended::Refused(match text {
                    Some(t) if t.contains(super::endpoint::NOT_FOR_BROWSERS) => format!(
                        "the server took this agent's request for a browser's ({status}: {t}): something between the \
                         agent and the server adds an Origin header"
                    ),
                    Some(t) => format!("the server refused this agent ({status}: {t})"),
                    None => format!("the server refused this agent ({status})"),
                })),
                // Not necessarily this agent's doing (another agent behind the same address,
                // a proxy's): the network backoff, not the refused secret's, but no sooner than
                // the server's Retry-After.
                429 if text.as_deref().is_none_or(|t| t.contains("failed attempts")) => {
                    Err(failed(format!("the server is slowing down this address's logins ({status})")))
                }
                // Its text says why (a draining instance, the connection caps), for the log.
                _ => match text {
                    Some(text) => Err(failed(format!("the server answered {status}: {text}"))),
                    None => Err(failed(format!("the server answered {status}"))),
                },
            }
        }
        // The connection ended before any answer: what a balancer with no server up does.
        Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete)) => Err(failed(
            "the connection closed before the server answered (a balancer with no server up?)".into(),
        )),
        Err(e) => Err(failed(format!("handshake failed: {e}"))),
    }
}

/// What a proxy's refusal of CONNECT means, and what to do (a review with squid: "the proxy
/// answered 403 to CONNECT" named neither the proxy nor the usual cause).
fn proxy_refused(status: u16, proxy: &config::Proxy, source: &impl std::fmt::Display, server: &config::ServerUrl) -> String {
    let (target, port) = (server.authority(), server.port);
    let hint = match status {
        407 if proxy.authorization.is_some() => {
            ": it refused the user and password in the proxy's URL (http://USER:PASSWORD@HOST:PORT)".to_owned()
        }
        407 => ": it asks for a user and password (http://USER:PASSWORD@HOST:PORT, special characters %-encoded)".to_owned(),
        403 if port != 443 => format!(
            ": it does not let this computer through to {target}; many proxies allow CONNECT to port 443 only \
             (serve the agent endpoint on 443, or ask for port {port} to be allowed)"
        ),
        403 => format!(": it does not let this computer through to {target}"),
        _ => String::new(),
    };
    format!("the proxy {proxy} ({source}) answered {status} to CONNECT {target}{hint}")
}

/// TCP to the server (or to the proxy, then CONNECT), then TLS for `wss://`; the callers' deadline
/// is `connect_timeout`, which the addresses of the name share ([`crate::backend::connect_in_turn`]:
/// a black-holed IPv6 address first does not keep an agent from the IPv4 one behind it). With the
/// TCP socket's acknowledgements, for as long as the link lives ([`crate::platform::Acks`]).
async fn dial(config: &AgentConfig, tls: Option<&BackendTls>) -> std::io::Result<(LinkStream, crate::platform::Acks)> {
    let s = &config.server;
    let end = Instant::now() + config.connect_timeout;
    let tcp = match &config.proxy {
        // Names resolved once at a time for the control link and the pool's dials together.
        None => crate::backend::connect_in_turn(&crate::dns::resolve(&s.host, s.port).await?, end).await?,
        Some(p) => {
            // Said as the proxy's: "connection refused" alone reads as the server's.
            let proxy_failed = |e: std::io::Error| std::io::Error::new(e.kind(), format!("the proxy {p} ({}): {e}", config.proxy_source));
            let addrs = crate::dns::resolve(&p.host, p.port).await.map_err(proxy_failed)?;
            let mut tcp = crate::backend::connect_in_turn(&addrs, end).await.map_err(proxy_failed)?;
            let target = s.authority();
            let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(auth) = &p.authorization {
                head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
            }
            head.push_str("\r\n");
            tcp.write_all(head.as_bytes()).await?;
            let (status, _) = link::read_response_head(&mut tcp).await?;
            if !(200..300).contains(&status) {
                return Err(std::io::Error::other(proxy_refused(status, p, &config.proxy_source, s)));
            }
            tcp
        }
    };
    tcp.set_nodelay(true)?;
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&crate::backend::tcp_keepalive())?;
    // The socket stays the link's (inside TLS too) for as long as the link lives.
    let acks = crate::platform::Acks::of(&tcp);
    match tls {
        None => Ok((LinkStream::Tcp(tcp), acks)),
        Some(tls) => {
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => rustls_pki_types::ServerName::try_from(s.host.clone()).map_err(std::io::Error::other)?,
            };
            Ok((LinkStream::Other(Box::new(tls.connector.connect(name, tcp).await?)), acks))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `max_sessions` in the file (a service as a table) and as a flag, which wins; every mistake
    /// named by its line and key.
    /// Looks after leaving another instance: 5 s apart for 2 minutes, then growing with the time
    /// since (a 24th of it) up to `balancer_check`; without one, `balancer_check`; never under
    /// 100 ms.
    #[test]
    fn looks_come_closer_after_leaving_an_instance_and_space_out_again() {
        let now = Instant::now();
        let every = Duration::from_secs(30);
        let checks = |fast_since: Option<Instant>, every: Duration| Checks {
            every,
            fast: FAST_CHECK,
            fast_since,
        };
        assert_eq!(checks(None, every).interval(now), every);
        let left = checks(Some(now), every);
        let at = |secs: u64| left.interval(now + Duration::from_secs(secs));
        assert_eq!(at(0), FAST_CHECK);
        assert_eq!(at(119), FAST_CHECK);
        assert_eq!(at(240), Duration::from_secs(10));
        assert_eq!(at(600), Duration::from_secs(25));
        assert_eq!(at(3600), every);
        assert_eq!(checks(Some(now), Duration::from_secs(2)).interval(now), Duration::from_secs(2));
        assert_eq!(checks(None, Duration::ZERO).interval(now), Duration::from_millis(100));
        let next = checks(None, every).next();
        assert!(next >= Instant::now() + every * 3 / 4 - Duration::from_millis(50) && next <= Instant::now() + every * 5 / 4);
    }

    /// A route from the Windows settings read again: the next attempt's configuration changes
    /// with what they say now (the proxy and where it came from), not with a late reading, and
    /// not at all when nothing differs; the log's words for a route.
    #[test]
    fn a_connection_follows_the_windows_settings_read_again() {
        use super::system_proxy::WindowsSetting;
        let windows = |setting: Option<WindowsSetting>, late: bool| WindowsChoice {
            setting,
            late,
            ..WindowsChoice::default()
        };
        let office: Proxy = "proxy.corp:8080".parse().unwrap();
        let mut config = AgentConfig::new("wss://bridge.example.com/agent".parse().unwrap(), "n".into(), "s".into());
        config.proxy = Some(office.clone());
        config.proxy_source = ProxySource::Windows(windows(Some(WindowsSetting::InternetOptions), false));
        assert_eq!(
            route_text(config.proxy.as_ref(), &config.proxy_source),
            "through proxy.corp:8080 (from Windows settings (Internet Options))"
        );
        let mut rereads = Rereads::new(std::time::Instant::now());
        // Nothing differs: nothing to replace.
        let same = (Some(office.clone()), windows(Some(WindowsSetting::InternetOptions), false));
        assert!(follow_windows(&config, Some(same), &mut rereads).is_none());
        // No answer at all (no thread): the route stays.
        assert!(follow_windows(&config, None, &mut rereads).is_none());
        // Late: the route stays.
        let home = (None, windows(None, true));
        assert!(follow_windows(&config, Some(home.clone()), &mut rereads).is_none());
        // Home, in time: direct now, and why.
        let home = (None, windows(None, false));
        let next = follow_windows(&config, Some(home), &mut rereads).expect("a new route");
        assert_eq!(next.proxy, None);
        assert_eq!(next.proxy_source, ProxySource::Windows(windows(None, false)));
        assert_eq!(
            route_text(next.proxy.as_ref(), &next.proxy_source),
            "directly (from Windows settings (none))"
        );
        assert_eq!((next.server.clone(), next.secret.as_str()), (config.server.clone(), "s"));
        // The same proxy from another setting: the route stays, its source is brought up to date.
        let pac = WindowsSetting::Pac("http://pac.corp/p.pac".into());
        let next = follow_windows(
            &config,
            Some((Some(office.clone()), windows(Some(pac.clone()), false))),
            &mut rereads,
        )
        .unwrap();
        assert_eq!(next.proxy.as_ref(), Some(&office));
        assert_eq!(next.proxy_source, ProxySource::Windows(windows(Some(pac), false)));
        // Off Windows there is nothing to read again.
        #[cfg(not(windows))]
        assert!(system_proxy::windows_again(&config.server, Duration::from_secs(1), Arc::default()).is_none());
    }

    #[test]
    fn the_status_line_says_which_connection_is_down_and_why() {
        let state = |s: State| watch::channel(s).1;
        let one = ["wss://a:443/agent".to_owned()];
        assert_eq!(
            status_line("shop-17", &one, &[state(State::Connected)]),
            "agent shop-17: connected to wss://a:443/agent"
        );
        let retrying = State::Retrying {
            reason: "cannot reach the server: refused".into(),
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            status_line("shop-17", &one, &[state(retrying.clone())]),
            "agent shop-17: not connected; wss://a:443/agent: retrying in 1.5s (cannot reach the server: refused)"
        );
        let two = ["wss://a:443/agent".to_owned(), "wss://b:443/agent".to_owned()];
        assert_eq!(
            status_line("shop-17", &two, &[state(State::Connected), state(retrying)]),
            "agent shop-17: connected to 1 of 2 servers; wss://b:443/agent: retrying in 1.5s (cannot reach the server: refused)"
        );
        assert_eq!(
            status_line("shop-17", &two, &[state(State::Connecting), state(State::Stopped)]),
            "agent shop-17: connected to 0 of 2 servers; wss://a:443/agent: connecting"
        );
        let moving = State::Moving {
            reason: "the server answered 503 Service Unavailable: this instance is draining".into(),
        };
        assert_eq!(
            status_line("shop-17", &one, &[state(moving)]),
            "agent shop-17: connected; wss://a:443/agent: moving, connecting again (the server answered 503 Service \
             Unavailable: this instance is draining)",
            "still connected: the old connection serves"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_never_reaches_zero() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            auth_max: Duration::from_secs(10),
            ..Backoff::default()
        };
        for _ in 0..50 {
            let first = b.delay(1, false);
            assert!(
                first >= Duration::from_millis(25) && first <= Duration::from_millis(100),
                "{first:?}"
            );
            assert!(b.delay(30, false) <= Duration::from_secs(1));
            assert!(b.delay(30, false) >= Duration::from_millis(250));
            assert!(b.delay(30, true) >= Duration::from_millis(2500));
        }
    }
}
