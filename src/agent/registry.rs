//! The server's side of agent mode: which agents are connected, each one's pool of idle data
//! links, the `want` requests that keep the pool full, the per-connection token that ends every
//! session through an agent once it is lost, and the brake on repeated failed logins.
//!
//! Duplicate names: the newest connection wins (an agent whose network changed reconnects before
//! the server notices the old connection died). The old control link is closed with a reason and
//! its idle links dropped; its live sessions are left to finish.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::chunks::Framing;
use super::link::{self, AgentLink, LinkStream};
use super::{AgentsConfig, EndpointConfig};
use crate::backend::{AgentRefusal, Backend, ConnectError};
use crate::slots::Slot;

/// How long an idle data link is kept before the server closes it (and the agent dials anew):
/// below the idle cut of common NATs and balancers, so a link taken from the pool is alive.
pub const IDLE_LINK_MAX: Duration = Duration::from_secs(600);

/// How long an idle link beyond the pool's size is kept (links a burst of sessions left): closed
/// at the next top-up after this, least recently used first.
pub const SURPLUS_IDLE: Duration = Duration::from_secs(60);

/// A message for an agent's control link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Dial this many more idle data links.
    Want(usize),
    /// Connect again (through the balancer, to wherever it sends the agent now) and then let
    /// this connection go: the operator's `POST /agents/move`.
    Move,
}

/// Connected agents and the declarations they are checked against; kept across reloads.
#[derive(Debug, Default)]
pub struct Registry {
    declared: RwLock<Arc<AgentsConfig>>,
    /// Who may log in: the declarations and fleet files in force.
    names: RwLock<Arc<super::Declared>>,
    agents: Mutex<Connected>,
    brake: Brake,
    next_id: AtomicU64,
    /// Data links taken in and returned after a session, by every connection so far.
    totals: Arc<LinkCounts>,
    /// The bridge's connection count, which idle links come back to after a session.
    connections: Arc<crate::slots::Recount>,
    /// This process's id, told to each agent in its control link's `101`.
    instance: InstanceId,
    /// Connections a newer one of the same name replaced, while sessions through them go on:
    /// a revocation of the secret they logged in with ends those sessions too.
    retired: Mutex<Vec<Retired>>,
    /// Cancelled when this instance starts to drain ([`Registry::leave`]).
    leaving: CancellationToken,
    /// Replaced control links waiting for their agent's answer to our close frame, by agent
    /// name ([`Registry::closing_replaced`]).
    closing_replaced: Mutex<HashMap<String, usize>>,
    /// When this registry (the process) started: see [`AGENTS_SETTLE`].
    started: Started,
    /// Woken whenever an agent connects.
    came: Notify,
}

/// How long after start a page for an agent that is not connected waits for it (up to the
/// connect deadline) rather than reading at once that it is offline: an instance that was down
/// (restarted after a crash, or after more than a minute) takes pages as soon as a balancer finds
/// it ready, while its agents come back within their backoff (at most 30 s apart by default,
/// `retry_max`). A fleet review measured three in four new sessions to an agent failing on a
/// returning instance in the 14 s before its agent was back.
pub const AGENTS_SETTLE: Duration = Duration::from_secs(35);

/// An instant that defaults to now.
#[derive(Debug)]
struct Started(Instant);

impl Default for Started {
    fn default() -> Self {
        Started(Instant::now())
    }
}

/// The connected agents by name, with the sum of their pools per address kept beside them:
/// what an address over `max_connections_per_ip` may have logging in is looked up at accept, in
/// O(1), not by a scan of every agent. Read through `Deref`; changed only by the methods here,
/// which keep both in step.
#[derive(Debug, Default)]
struct Connected {
    by_name: HashMap<String, Agent>,
    /// The pools' sizes of the agents connected from each address (its key as the per-address
    /// caps count it: an IPv6 address's /64); no entry for an address with none.
    pools: HashMap<IpAddr, usize>,
}

impl std::ops::Deref for Connected {
    type Target = HashMap<String, Agent>;

    fn deref(&self) -> &Self::Target {
        &self.by_name
    }
}

impl Connected {
    fn insert(&mut self, name: String, agent: Agent) -> Option<Agent> {
        *self.pools.entry(crate::policy::address_key(agent.addr.ip())).or_default() += agent.pool.size;
        let old = self.by_name.insert(name, agent);
        if let Some(old) = &old {
            Connected::gone(&mut self.pools, old);
        }
        old
    }

    fn remove(&mut self, name: &str) -> Option<Agent> {
        let a = self.by_name.remove(name)?;
        Connected::gone(&mut self.pools, &a);
        Some(a)
    }

    fn retain(&mut self, mut keep: impl FnMut(&str, &mut Agent) -> bool) {
        let pools = &mut self.pools;
        self.by_name.retain(|name, a| {
            let kept = keep(name, a);
            if !kept {
                Connected::gone(pools, a);
            }
            kept
        });
    }

    /// An agent to change in place (not its address or pool, which `pools` counts).
    fn get_mut(&mut self, name: &str) -> Option<&mut Agent> {
        self.by_name.get_mut(name)
    }

    fn gone(pools: &mut HashMap<IpAddr, usize>, a: &Agent) {
        let key = crate::policy::address_key(a.addr.ip());
        if let Some(n) = pools.get_mut(&key) {
            *n = n.saturating_sub(a.pool.size);
            if *n == 0 {
                pools.remove(&key);
            }
        }
    }

    /// The pools' sizes of the agents connected from `ip`'s address, summed.
    fn pools_at(&self, ip: IpAddr) -> usize {
        self.pools.get(&crate::policy::address_key(ip)).copied().unwrap_or(0)
    }
}

/// A replaced connection whose sessions may still run.
#[derive(Debug)]
struct Retired {
    name: String,
    digest: [u8; 32],
    /// Upgrades while one of its links is still in a session.
    loss: std::sync::Weak<link::LossState>,
    /// As [`Agent`]'s.
    undeclared_at: Option<Vec<u64>>,
}

impl Retired {
    fn of(name: &str, a: &Agent) -> Retired {
        Retired {
            name: name.to_owned(),
            digest: a.digest,
            loss: a.lost.downgrade(),
            undeclared_at: None,
        }
    }
}

/// Whether a connection that logged in with `digest` is to be revoked, by what a look at the
/// declarations `found`: at once when the configuration file declares the name with other
/// secrets (or no fleet file could declare it); when only fleet files speak, at the second
/// look that finds it undeclared after every fleet source was looked at again successfully
/// since the first (`undeclared_at`), so that a file caught half written, or a re-read that
/// failed, cuts nobody off.
fn judge(found: &super::Lookup, digest: &[u8; 32], undeclared_at: &mut Option<Vec<u64>>) -> bool {
    if found.hashes.as_ref().is_some_and(|h| h.contains(digest)) {
        *undeclared_at = None;
        return false;
    }
    if found.inline || found.generations.is_empty() {
        return true;
    }
    match undeclared_at {
        Some(at) if at.len() == found.generations.len() => at.iter().zip(&found.generations).all(|(then, now)| now > then),
        _ => {
            *undeclared_at = Some(found.generations.clone());
            false
        }
    }
}

/// A random id per process (registry): an agent with several servers uses it to find two of
/// its URLs that reach the same instance, where its two connections would replace each other.
#[derive(Debug)]
struct InstanceId(String);

impl Default for InstanceId {
    fn default() -> Self {
        let mut bytes = [0u8; 8];
        // A failed random source leaves zeros: then instances look alike to agents with several
        // servers, which keep one connection where they could have two (logged on the agent).
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        InstanceId(super::link::hex(&bytes))
    }
}

/// How many data links a pool (or the whole registry) took in from the agent, and how many
/// times one went back to it after a session, to carry the next (links in chunks; a link
/// returned may still be closed later, unused, as surplus or for its age).
#[derive(Debug, Default)]
pub struct LinkCounts {
    dialled: AtomicU64,
    returned: AtomicU64,
}

impl LinkCounts {
    /// (links dialled, links returned after a session).
    pub fn get(&self) -> (u64, u64) {
        (self.dialled.load(Ordering::Relaxed), self.returned.load(Ordering::Relaxed))
    }
}

struct Agent {
    id: u64,
    addr: SocketAddr,
    /// When this connection became the agent's.
    since: std::time::SystemTime,
    services: Vec<String>,
    /// The SHA-256 of the secret it logged in with: a reload or a fleet file that declares
    /// another (or none) revokes it.
    digest: [u8; 32],
    /// The fleet sources' generations when [`Registry::recheck`] first found it not declared
    /// with that digest (see [`judge`]).
    undeclared_at: Option<Vec<u64>>,
    lost: link::Loss,
    replaced: CancellationToken,
    revoked: CancellationToken,
    pool: Arc<Pool>,
    /// The SHA-256 of the link key its hello gave ([`Registry::set_link_key`]).
    link_key: Option<[u8; 32]>,
}

impl Agent {
    /// No longer allowed: its control link closes, its sessions end at once.
    fn revoke(&self, name: &str) {
        warn!(agent = %name, client = %self.addr, "agent no longer declared, or its secret changed: disconnected, its sessions end");
        self.revoked.cancel();
        self.lost.revoke();
    }
}

impl Drop for Agent {
    /// A connection that is no longer the agent's takes no link back.
    fn drop(&mut self) {
        self.pool.close();
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// One agent connection's idle data links: the ones it dialled, and links in chunks that a
/// session left clean ([`AgentLink::release`]). Taken newest first, so that links the load no
/// longer needs stay at the bottom and age out.
pub struct Pool {
    idle: Mutex<VecDeque<Idle>>,
    arrived: Notify,
    /// How many idle links the agent is asked to keep.
    size: usize,
    /// It dials a new idle link for each raw one it is sent `open` on (hello version 2 and
    /// later): a taken raw link needs no `want`.
    replacing: bool,
    /// Its `open` may carry the session's id (hello version [`link::SESSION_IDS`]).
    session_ids: std::sync::atomic::AtomicBool,
    control: mpsc::Sender<Control>,
    /// Links asked for with `want` that have not arrived yet, so that a pool running low asks
    /// once, not at every take until the first one arrives (over `wss://` a link takes a TLS
    /// handshake to come). Reset at each top-up, so a dial the agent gave up on is not waited
    /// for beyond that.
    asked: AtomicUsize,
    /// The connection is no longer the agent's: links coming back are closed.
    closed: std::sync::atomic::AtomicBool,
    /// This connection's links, and the registry's totals.
    counts: LinkCounts,
    totals: Arc<LinkCounts>,
    /// Where a link coming back from a session takes its slot again.
    connections: Arc<crate::slots::Recount>,
}

struct Idle {
    io: LinkStream,
    /// Its place under `max_connections` while it waits here (an idle link is a connection),
    /// held for its drop.
    _slot: Slot,
    /// What its ends agreed on: in chunks ([`super::chunks`]), it is reusable.
    framing: Framing,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).len();
        f.debug_struct("Pool")
            .field("idle", &idle)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Pool {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Idle links beyond this are closed at once: a bound on what a burst of sessions leaves
    /// open on both computers. Below it, links beyond the pool's size that the load no longer
    /// needs are closed by age ([`SURPLUS_IDLE`]), so a load that swings does not close links
    /// it will dial again a moment later.
    fn most_idle(&self) -> usize {
        (self.size * 16).max(64)
    }

    /// Asks the agent for `n` more links, counted until they arrive.
    fn ask(&self, n: usize) {
        if self.control.try_send(Control::Want(n)).is_ok() {
            self.asked.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Takes a link a session left clean back; closed instead when the connection is gone or
    /// enough are idle. `last`: the link goes where it is taken last, for a link the agent may
    /// still be busy on (its app ended first: the agent may still be writing the browser's last
    /// bytes to it, and an `open` would wait behind them).
    pub fn give_back(&self, io: LinkStream, framing: Framing, last: bool) {
        if self.put_back(io, framing, last) {
            self.counted(|c| &c.returned);
        }
    }

    /// [`Pool::give_back`] without counting it: a link whose `open` was refused carried no
    /// session. Whether the link was kept.
    fn put_back(&self, io: LinkStream, framing: Framing, last: bool) -> bool {
        let mut idle = self.idle();
        // Under the lock `close` takes after setting the flag: a link is never left in a pool
        // that has been emptied for good.
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        if idle.len() >= self.most_idle() {
            debug!("agent link not needed in the pool; closed");
            return false;
        }
        // Back among the connections: its session's connection no longer covers it. One beyond
        // the pool's size (after a burst) stays only while the cap has room: pages come first.
        let slot = match idle.len() >= self.size {
            true => self.connections.try_take_spare(),
            false => self.connections.try_take(),
        };
        let Some(slot) = slot else {
            debug!("agent link back from a session: max_connections (nearly) reached; closed");
            return false;
        };
        let link = Idle {
            io,
            _slot: slot,
            framing,
            since: Instant::now(),
        };
        if last {
            idle.push_front(link);
        } else {
            idle.push_back(link);
        }
        drop(idle);
        self.arrived.notify_one();
        true
    }

    fn counted(&self, which: impl Fn(&LinkCounts) -> &AtomicU64) {
        which(&self.counts).fetch_add(1, Ordering::Relaxed);
        which(&self.totals).fetch_add(1, Ordering::Relaxed);
    }

    /// How many idle links there are.
    pub fn idle_links(&self) -> usize {
        self.idle().len()
    }

    /// The connection is no longer the agent's (replaced, lost, revoked): its idle links close,
    /// and the sessions waiting for one of its links look again at once (the agent's newer
    /// connection, or none: offline) rather than wait here for links that go elsewhere.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.idle().clear();
        self.arrived.notify_waiters();
    }
}

/// A connected agent, as the admin lists it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Its name.
    pub name: String,
    /// The address its control link came from (the real client's, behind a trusted proxy).
    pub addr: SocketAddr,
    /// When this connection became the agent's.
    pub since: std::time::SystemTime,
    /// The services it said it serves.
    pub services: Vec<String>,
    /// Its idle data links at the server now.
    pub idle_links: usize,
    /// Data links this connection dialled that the server took in.
    pub links_dialled: u64,
    /// Times one of them went back to the pool after a session, to carry the next.
    pub links_returned: u64,
}

/// What a control link holds while it is the agent's connection.
#[derive(Debug)]
pub struct Attached {
    /// This connection's number (a newer one of the same name gets another).
    pub id: u64,
    /// Cancelled when a newer connection of the same name took over.
    pub replaced: CancellationToken,
    /// Cancelled when the agent is no longer allowed (see [`Registry::recheck`]).
    pub revoked: CancellationToken,
    /// Requests to forward to the agent.
    pub control: mpsc::Receiver<Control>,
}

/// Why an agent login was refused (for the log; the agent reads one generic answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No name or no bearer secret in the request.
    Missing,
    /// The name is not declared.
    UnknownAgent,
    /// The secret does not hash to the declared one.
    WrongSecret,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::Missing => "no agent name or no secret given",
            AuthFailure::UnknownAgent => "unknown agent name",
            AuthFailure::WrongSecret => "wrong secret",
        })
    }
}

impl Registry {
    /// A registry for `agents` (the configuration in force).
    pub fn new(agents: &AgentsConfig) -> Registry {
        let r = Registry::default();
        r.set_config(agents);
        r
    }

    /// This instance is draining: its agents are asked to move ([`link::ControlMessage::Move`])
    /// and new control links are answered 503 until it is gone.
    pub fn leave(&self) {
        self.leaving.cancel();
    }

    /// Counts the links idle in pools in `slots`, the bridge's connections, up to `max`
    /// (`max_connections`; called again at each reload).
    pub fn count_connections(&self, slots: &crate::slots::Slots, max: usize) {
        self.connections.count_in(slots, max);
    }

    /// Cancelled once [`Registry::leave`] was called.
    pub fn leaving(&self) -> &CancellationToken {
        &self.leaving
    }

    /// This instance's id (see [`super::link::INSTANCE_HEADER`]).
    pub fn instance(&self) -> &str {
        &self.instance.0
    }

    /// Takes the declarations of a reloaded configuration. A connection (current, or an older
    /// one whose sessions go on) whose agent the file now declares with other secrets, or no
    /// longer declares while no fleet file could, is revoked at once: its control link closes and
    /// its sessions end. One that only fleet files may declare is left to
    /// [`Registry::recheck`].
    pub fn set_config(&self, agents: &AgentsConfig) {
        *self.declared.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(agents.clone());
        let names = Arc::new(super::Declared::from_config(agents));
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = names.clone();
        // The sources configured, not those read: one that failed to load now must not revoke
        // every agent it declares.
        let fleet = !agents.sources.is_empty();
        let allowed = |name: &str, digest: &[u8; 32]| names.config_allows(name, digest, fleet);
        // Locks in this order everywhere: agents, then retired.
        let mut connected = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        connected.retain(|name, a| {
            // New declarations: a fleet file's verdict starts over.
            a.undeclared_at = None;
            let keep = allowed(name, &a.digest);
            if !keep {
                a.revoke(name);
            }
            keep
        });
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain_mut(|r| {
            let Some(loss) = link::Loss::upgrade(&r.loss) else {
                return false;
            };
            r.undeclared_at = None;
            if allowed(&r.name, &r.digest) {
                return true;
            }
            warn!(agent = %r.name, "sessions of an earlier connection whose secret is no longer allowed: ended");
            loss.revoke();
            false
        });
    }

    /// Keeps an earlier connection of `name` whose sessions may go on, for revocation.
    fn retire(&self, name: &str, a: &Agent) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|r| r.loss.strong_count() > 0);
        retired.push(Retired::of(name, a));
    }

    /// Checks connection `id` of `name`, and earlier connections of the name whose sessions go
    /// on, against the declarations as they are now (fleet files re-read if they changed), and
    /// revokes those no longer declared with the secret they logged in with (see [`judge`]).
    /// Each control link calls it at every ping: a fleet file's change reaches connected agents
    /// within two ping intervals, not at their next login. Earlier connections of names with no
    /// connection now are checked too (by whichever control link comes first).
    pub async fn recheck(&self, name: &str, id: u64) {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner()).clone();
        let orphans: Vec<String> = {
            let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            let mut orphans: Vec<String> = retired
                .iter()
                .filter(|r| !agents.contains_key(&r.name))
                .map(|r| r.name.clone())
                .collect();
            orphans.sort();
            orphans.dedup();
            orphans
        };
        for n in std::iter::once(name.to_owned()).chain(orphans.into_iter().filter(|n| n != name)) {
            let found = names.lookup(&n).await;
            // A reload meanwhile judged with its own declarations; this look is stale.
            if !Arc::ptr_eq(&names, &self.names.read().unwrap_or_else(|p| p.into_inner())) {
                return;
            }
            let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            if n == name {
                if let Some(a) = agents.get_mut(name).filter(|a| a.id == id) {
                    let first = a.undeclared_at.is_none();
                    if judge(&found, &a.digest, &mut a.undeclared_at) {
                        if let Some(a) = agents.remove(name) {
                            a.revoke(name);
                        }
                    } else if first && a.undeclared_at.is_some() {
                        info!(
                            agent = %name,
                            "agent not declared with the secret it logged in with: cut off if still so at the next check"
                        );
                    }
                }
            }
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            retired.retain_mut(|r| {
                let Some(loss) = link::Loss::upgrade(&r.loss) else {
                    return false;
                };
                if r.name != n || !judge(&found, &r.digest, &mut r.undeclared_at) {
                    return true;
                }
                warn!(agent = %r.name, "sessions of an earlier connection whose secret is no longer allowed: ended");
                loss.revoke();
                false
            });
        }
    }

    fn config(&self) -> Arc<AgentsConfig> {
        self.declared.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The agent endpoint at exactly this path, if any.
    pub fn endpoint(&self, path: &str) -> Option<EndpointConfig> {
        self.config().endpoints.iter().find(|e| e.path == path).cloned()
    }

    /// The SHA-256s of the secrets `name` may log in with, if it is declared (inline or in a
    /// fleet file, as they are now).
    pub async fn secrets_of(&self, name: &str) -> Option<Vec<[u8; 32]>> {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner()).clone();
        names.secret_sha256(name).await
    }

    /// Checks `secret` against a name's `digests` ([`Registry::secrets_of`]; `None`: the name is
    /// not declared), returning the digest it matched.
    ///
    /// # Errors
    /// Why not, for the log.
    pub fn check_secret(secret: &str, digests: Option<Vec<[u8; 32]>>) -> Result<[u8; 32], AuthFailure> {
        // Each compared in constant time; that there are one or two is no secret.
        digests
            .ok_or(AuthFailure::UnknownAgent)?
            .into_iter()
            .find(|d| link::secret_matches(secret, d))
            .ok_or(AuthFailure::WrongSecret)
    }

    /// Takes a try from the budgets of a login from `ip` as `name` before its secret is checked
    /// (so that parallel tries cannot all start before the first failure counts); `Err` holds
    /// seconds to wait. Two budgets: the pair of the address and the name ([`BRAKE_BURST`], one
    /// more per [`BRAKE_REFILL`]), so that guesses at one agent's secret are slowed but slow no
    /// other agent logging in from the same address (a shop's guest Wi-Fi, a carrier's NAT); and
    /// the address's, across every name ([`ADDRESS_BRAKE_BURST`], one more per
    /// [`ADDRESS_BRAKE_REFILL`]), so that an address guessing many agents' secrets is not let
    /// guess each at the pair's rate. Declared or not, a name is charged alike: the answers tell
    /// nothing of which names exist. When the table of pairs has no room for this one (a flood
    /// of failures at very many pairs), the address's budget alone is charged.
    pub fn charge(&self, ip: IpAddr, name: &str) -> Result<LoginTry, u64> {
        let wait = |r: crate::policy::Refusal| r.retry_after.unwrap_or(1);
        self.brake.addresses.try_charge(ip).map_err(wait)?;
        let key = self.brake.pair(ip, name);
        match self.brake.names.try_charge_own(key) {
            Some(Ok(())) => Ok(LoginTry {
                ip,
                pair: Some(key),
                address: true,
            }),
            Some(Err(r)) => {
                // Not tried: the address's try is given back.
                self.brake.addresses.refund(ip);
                Err(wait(r))
            }
            None => Ok(LoginTry {
                ip,
                pair: None,
                address: true,
            }),
        }
    }

    /// A data link's login: as [`Registry::charge`], except that a link naming an agent whose
    /// control link is connected from this very address is charged to its (address, name) pair
    /// alone. Failed logins under made-up names from that address (someone else behind the
    /// shop's NAT) spend the address's budget, and would otherwise stop the connected agent's
    /// pool from being refilled, so that its pages found it offline while it was connected.
    /// Guesses at that agent's secret are still slowed, at the pair's rate.
    pub fn charge_link(&self, ip: IpAddr, name: &str) -> Result<LoginTry, u64> {
        let connected_here = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .is_some_and(|a| a.addr.ip() == ip);
        if !connected_here {
            return self.charge(ip, name);
        }
        let key = self.brake.pair(ip, name);
        match self.brake.names.try_charge_own(key) {
            Some(Ok(())) => Ok(LoginTry {
                ip,
                pair: Some(key),
                address: false,
            }),
            Some(Err(r)) => Err(r.retry_after.unwrap_or(1)),
            // The pairs' table is full: charged as any login is.
            None => self.charge(ip, name),
        }
    }

    /// Gives back the tries of a login that succeeded.
    pub fn succeeded(&self, login: LoginTry) {
        if let Some(key) = login.pair {
            self.brake.names.refund(key);
        }
        if login.address {
            self.brake.addresses.proved(login.ip);
        }
    }

    /// A place for a replaced control link of agent `name` to wait for the agent's answer to
    /// our close frame (up to the close deadline), or `None` when [`MAX_CLOSING_REPLACED`] of
    /// that name already wait: that one is then closed at once. An agent's connection is not
    /// counted under its address's cap, so without a bound an agent that logged in again and
    /// again, never answering a close, would keep a connection open per login for the close
    /// deadline. Counted by name, so that one such agent (a stolen secret) cannot take the
    /// places of others, whose replaced links then lose their reason (an agent told it was
    /// replaced backs off; one whose link just ends reconnects as after a loss).
    pub fn closing_replaced(&self, name: &str) -> Option<ClosingReplaced<'_>> {
        let mut closing = self.closing_replaced.lock().unwrap_or_else(|p| p.into_inner());
        let n = closing.entry(name.to_owned()).or_default();
        if *n >= MAX_CLOSING_REPLACED {
            return None;
        }
        *n += 1;
        Some(ClosingReplaced {
            registry: self,
            name: name.to_owned(),
        })
    }

    /// Whether a failed login just turned the brake on (it spent the last try of its pair's or
    /// its address's budget), and that was not yet said in the last minute: the one warning an
    /// address's brake is worth. Its refusals that follow, one per request, are at debug: any
    /// host can send them. At most once a minute per address, in a fixed table (bounded memory;
    /// a flood of more addresses than it holds may be warned of more often).
    pub fn brake_came_on(&self, login: LoginTry) -> bool {
        let pair_spent = login.pair.is_some_and(|key| self.brake.names.may_try(key).is_err());
        (pair_spent || self.braked(login.ip)) && self.brake.warnings.try_charge(login.ip).is_ok()
    }

    /// Whether `ip`'s logins are slowed now, whatever their name (its failures spent the
    /// address's budget): a look that takes no try, not even for an instant (a login racing it
    /// for the address's last try gets it). An address over `max_connections_per_ip` then gets
    /// no place to log in.
    pub fn braked(&self, ip: IpAddr) -> bool {
        self.brake.addresses.may_try(ip).is_err()
    }

    /// Makes this control link the agent's connection; an older one of the same name is told
    /// it was replaced (newest wins). `digest`: the SHA-256 of the secret it logged in with.
    /// `replacing`: the agent replaces each link it is sent `open` on by itself (see
    /// [`link::REPLACING`]).
    ///
    /// `None` when the declarations changed since its login and no longer let it in (a reload
    /// between the login and its hello).
    pub fn attach(
        &self,
        name: &str,
        digest: [u8; 32],
        services: Vec<String>,
        addr: SocketAddr,
        pool: usize,
        replacing: bool,
    ) -> Option<Attached> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        let lost = link::Loss::default();
        let replaced = CancellationToken::new();
        let revoked = CancellationToken::new();
        let agent = Agent {
            id,
            addr,
            since: std::time::SystemTime::now(),
            services,
            digest,
            undeclared_at: None,
            lost: lost.clone(),
            replaced: replaced.clone(),
            revoked: revoked.clone(),
            pool: Arc::new(Pool {
                idle: Mutex::new(VecDeque::new()),
                arrived: Notify::new(),
                size: pool,
                replacing,
                session_ids: std::sync::atomic::AtomicBool::new(false),
                control: tx,
                asked: AtomicUsize::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
                counts: LinkCounts::default(),
                totals: self.totals.clone(),
                connections: self.connections.clone(),
            }),
            link_key: None,
        };
        // Under the agents lock, which a reload takes after it swaps the declarations in: either
        // this sees the new ones, or the reload sees this connection.
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let names = self.names.read().unwrap_or_else(|p| p.into_inner()).clone();
        if !names.config_allows(name, &digest, !self.config().sources.is_empty()) {
            return None;
        }
        let previous = agents.insert(name.to_owned(), agent);
        // Pages that wait for an agent after start ([`AGENTS_SETTLE`]) look again.
        self.came.notify_waiters();
        if let Some(old) = previous {
            // Once per 10 s at most: an agent (or two that share a name) logging in again and
            // again would otherwise write a warning per login.
            match REPLACED.take() {
                Some(left_out) => {
                    warn!(agent = %name, old_client = %old.addr, new_client = %addr, left_out, "agent connected again: the newer connection replaces the older one")
                }
                None => {
                    debug!(agent = %name, old_client = %old.addr, new_client = %addr, "agent connected again: the newer connection replaces the older one")
                }
            }
            old.replaced.cancel();
            // Its idle links drop with it; its live sessions go on, revocable.
            self.retire(name, &old);
        }
        Some(Attached {
            id,
            replaced,
            revoked,
            control: rx,
        })
    }

    /// Ends connection `id` of `name` (if it is still the agent's): its idle links are closed;
    /// when `lost`, every session through it ends too.
    pub fn detach(&self, name: &str, id: u64, lost: bool) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if agents.get(name).is_some_and(|a| a.id == id) {
            if let Some(a) = agents.remove(name) {
                if lost {
                    a.lost.lose();
                }
                // Sessions that still move bytes go on: revocable until they end.
                self.retire(name, &a);
            }
        }
    }

    /// The agent `name`'s connection `id` reads session ids in `open` (its hello's version).
    pub fn set_session_ids(&self, name: &str, id: u64) {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = agents.by_name.get(name).filter(|a| a.id == id) {
            a.pool.session_ids.store(true, Ordering::Relaxed);
        }
    }

    /// Records the link key the hello of the agent's connection `id` gave (see
    /// [`link::ControlMessage::Hello`]): its data links with that key are taken without the
    /// failed-login brake ([`Registry::link_key_owner`]).
    pub fn set_link_key(&self, name: &str, id: u64, key: &str) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = agents.by_name.get_mut(name).filter(|a| a.id == id) {
            let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
            a.link_key = digest.as_ref().try_into().ok();
        }
    }

    /// The SHA-256 of the secret the agent `name` is connected with, when `key` is its
    /// connection's link key (compared by digest, in constant time): a data link that carries
    /// it, and that secret, takes nothing from the brake. A 256-bit random key is not guessed,
    /// so no brake is owed for trying one; the secret is still asked for, as the key travels in
    /// a header a proxy's log may keep.
    pub fn link_key_owner(&self, name: &str, key: &str) -> Option<[u8; 32]> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let a = agents.get(name)?;
        let expected = a.link_key?;
        link::secret_matches(key, &expected).then_some(a.digest)
    }

    /// Whether a data link that logged in as `name` with `digest` may join its pool: `name` has
    /// a control link here, logged in with the same secret (a link with another one, say an
    /// old secret still listed during a rotation, is not this connection's).
    pub fn takes_links(&self, name: &str, digest: &[u8; 32]) -> bool {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.get(name).is_some_and(|a| a.digest == *digest)
    }

    /// Adds an idle data link the agent dialled, with what the two ends agreed on.
    ///
    /// # Errors
    /// The link back when the agent has no control link here logged in with `digest`, or its
    /// pool is over-full.
    pub fn add_link(&self, name: &str, digest: &[u8; 32], io: LinkStream, framing: Framing, slot: Slot) -> Result<(), LinkStream> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = agents.get(name).filter(|a| a.digest == *digest) else {
            return Err(io);
        };
        let mut idle = a.pool.idle();
        let _ = a
            .pool
            .asked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if idle.len() >= a.pool.most_idle() {
            return Err(io);
        }
        idle.push_back(Idle {
            io,
            _slot: slot,
            framing,
            since: Instant::now(),
        });
        drop(idle);
        a.pool.counted(|c| &c.dialled);
        a.pool.arrived.notify_one();
        Ok(())
    }

    /// Asks the connected agents (`name`: that one only) to move ([`Control::Move`]); how many
    /// were asked. An agent from before `move` ignores it (its control loop logs that).
    pub fn move_agents(&self, name: Option<&str>) -> usize {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .iter()
            .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
            .filter(|(_, a)| a.pool.control.try_send(Control::Move).is_ok())
            .count()
    }

    /// Drops idle links older than [`IDLE_LINK_MAX`] and asks for the pool to be topped up.
    pub fn top_up(&self, name: &str, id: u64) {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = agents.get(name).filter(|a| a.id == id) else {
            return;
        };
        let pool = &a.pool;
        let mut idle = pool.idle();
        idle.retain(|l| l.since.elapsed() < IDLE_LINK_MAX);
        // Beyond the pool's size, the least recently used links (at the bottom) that have been
        // idle a while go.
        while idle.len() > pool.size && idle.front().is_some_and(|l| l.since.elapsed() >= SURPLUS_IDLE) {
            idle.pop_front();
        }
        pool.asked.store(0, Ordering::Relaxed);
        if idle.len() < pool.size {
            pool.ask(pool.size - idle.len());
        }
    }

    /// The connected agents now, by name (for the admin's `/agents` and the metrics).
    pub fn list(&self) -> Vec<AgentInfo> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<AgentInfo> = agents
            .iter()
            .map(|(name, a)| {
                let (links_dialled, links_returned) = a.pool.counts.get();
                AgentInfo {
                    name: name.clone(),
                    addr: a.addr,
                    since: a.since,
                    services: a.services.clone(),
                    idle_links: a.pool.idle_links(),
                    links_dialled,
                    links_returned,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Data links taken in, and returned after a session, since the server started, by all agents.
    pub fn link_totals(&self) -> (u64, u64) {
        self.totals.get()
    }

    /// How many idle data links `name` has now (`None`: not connected).
    pub fn idle_links(&self, name: &str) -> Option<usize> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|a| a.pool.idle_links())
    }

    /// The idle links the agents connected from `ip` keep, summed (0: no agent is connected
    /// from there); an IPv6 address counts by its /64, as the per-address caps count it. At most
    /// that many of their links log in at once to refill their pools, so it sizes what an
    /// address over `max_connections_per_ip` may have logging in. A lookup (the sum is kept as
    /// agents come and go), since a flood from an address over its cap asks at every accept.
    pub fn pools_at(&self, ip: IpAddr) -> usize {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).pools_at(ip)
    }

    /// Whether `name` is connected now.
    pub fn is_connected(&self, name: &str) -> bool {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).contains_key(name)
    }

    /// Takes an idle link of `name`, or says what to wait on for one.
    fn take(&self, name: &str, service: &str) -> Result<Taken, ConnectError> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = agents.get(name) else {
            return Err(ConnectError::Agent(AgentRefusal::Offline, format!("agent {name} is offline")));
        };
        if !a.services.iter().any(|s| s == service) {
            return Err(ConnectError::Agent(
                AgentRefusal::NoService,
                format!("agent {name} has no service {service}"),
            ));
        }
        let pool = &a.pool;
        let mut idle = pool.idle();
        // Links in chunks newest first: the ones at the bottom are what the load no longer
        // needs, and age out. Raw links (an agent without chunks) oldest first, each used once
        // well before its age would close it.
        loop {
            let newest = idle.back().is_some_and(|l| l.framing.chunks);
            let Some(l) = (if newest { idle.pop_back() } else { idle.pop_front() }) else {
                break;
            };
            if l.since.elapsed() < IDLE_LINK_MAX {
                // The pool stays warm for the next session: a link in chunks comes back after
                // its session, so one more is asked for only when the pool runs low; a raw
                // link is used once, and an agent that replaces the raw links it is sent `open`
                // on needs no asking.
                let ask = if l.framing.chunks {
                    idle.len() + pool.asked.load(Ordering::Relaxed) < pool.size
                } else {
                    !pool.replacing
                };
                if ask {
                    pool.ask(1);
                }
                // Its slot goes: the session's own connection covers it from here.
                return Ok(Taken::Link(l.io, l.framing, a.lost.clone(), pool.clone()));
            }
        }
        // None idle: this session waits for the next link to arrive or come back. At most a
        // pool's worth are asked for at a time: links out in sessions come back, and one asked
        // for each waiting session of a burst would leave a surplus behind it.
        if !pool.replacing || pool.asked.load(Ordering::Relaxed) < pool.size {
            pool.ask(1);
        }
        Ok(Taken::Wait(pool.clone()))
    }

    /// Until `end` at most, while this instance is within [`AGENTS_SETTLE`] of its start and not
    /// draining: waits for agent `name` to connect, if it is not.
    async fn settle(&self, name: &str, end: Instant) {
        let until = end.min(self.started.0 + AGENTS_SETTLE);
        // Past the window (nearly always): no look at the agents here.
        if Instant::now() >= until {
            return;
        }
        loop {
            // Registered before the look: an agent connecting after it wakes this wait.
            let came = self.came.notified();
            tokio::pin!(came);
            came.as_mut().enable();
            let connected = self.agents.lock().unwrap_or_else(|p| p.into_inner()).contains_key(name);
            if connected || Instant::now() >= until || self.leaving.is_cancelled() {
                return;
            }
            if timeout_at(until, came).await.is_err() {
                return;
            }
        }
    }

    /// Opens `service` on agent `name` for a session: an idle link, `open`, and its answer,
    /// all within `deadline`. Within [`AGENTS_SETTLE`] of the start, an agent that is not
    /// connected is waited for, up to `deadline`.
    ///
    /// # Errors
    /// [`ConnectError::Agent`] with the text the page reads.
    pub async fn open(&self, name: &str, service: &str, deadline: Duration) -> Result<Backend, ConnectError> {
        self.open_session(name, service, deadline, None).await
    }

    /// [`Registry::open`] for the server's session `session`, whose id the agent is told (if
    /// its version reads it) and logs with its own lines of the session.
    ///
    /// # Errors
    /// As [`Registry::open`].
    pub async fn open_session(&self, name: &str, service: &str, deadline: Duration, session: Option<u64>) -> Result<Backend, ConnectError> {
        let end = Instant::now() + deadline;
        self.settle(name, end).await;
        let timed_out = || ConnectError::Agent(AgentRefusal::Timeout, format!("agent {name}: {service}: timed out"));
        // Idle links found closed (by something between that cuts idle connections: a NAT, a
        // proxy's read timeout): a pool can hold many after a burst, all cut at once.
        let mut dead = 0usize;
        // Each turn takes a link out of the pool (bounded: `most_idle`) or waits for one to
        // arrive; a closed link fails at once, so the deadline is what ends the turns.
        loop {
            // Checked here too: past the deadline a waiter's stored wake-up, or a link that
            // fails at once, would otherwise start another turn.
            if dead > 0 && Instant::now() >= end {
                return Err(ConnectError::Agent(
                    AgentRefusal::NoLink,
                    format!("agent {name}: no live data link from the agent in time ({dead} found closed)"),
                ));
            }
            let (mut io, framing, lost, pool) = loop {
                match self.take(name, service)? {
                    Taken::Link(io, framing, lost, pool) => break (io, framing, lost, pool),
                    Taken::Wait(pool) => {
                        // Registered before the look at `closed`: `close` wakes only the
                        // waiters registered by then, so a close after the look wakes this
                        // one, and one before it is seen.
                        let arrived = pool.arrived.notified();
                        tokio::pin!(arrived);
                        arrived.as_mut().enable();
                        if pool.closed.load(Ordering::Acquire) {
                            continue;
                        }
                        if timeout_at(end, arrived).await.is_err() {
                            // Not the app's doing: no link came (the agent's dials failing,
                            // refused at this server's caps, say), or none that was alive.
                            return Err(ConnectError::Agent(
                                AgentRefusal::NoLink,
                                match dead {
                                    0 => format!("agent {name}: no data link from the agent in time"),
                                    n => format!("agent {name}: no live data link from the agent in time ({n} found closed)"),
                                },
                            ));
                        }
                    }
                }
            };
            let mut rest = Vec::new();
            let answer = timeout_at(end, async {
                let open = match session.filter(|_| pool.session_ids.load(Ordering::Relaxed)) {
                    Some(id) => format!("open {service} session={id}\n"),
                    None => format!("open {service}\n"),
                };
                io.write_all(open.as_bytes()).await?;
                io.flush().await?;
                link::read_line_carried(&mut io, &mut rest).await
            })
            .await;
            match answer {
                Err(_) => return Err(timed_out()),
                // Chunks only when the agent confirms them in its answer as well as in the
                // 101's headers (a proxy on the way could have dropped the header from the 101):
                // a plain `ok` is a raw link, used once.
                Ok(Ok(Some(line))) if line == "ok" || (framing.chunks && line == link::OK_CHUNKS) => {
                    debug!(agent = %name, service, "agent link opened");
                    let link = if line == link::OK_CHUNKS {
                        AgentLink::chunked(io, rest, lost, name.to_owned(), pool, framing.resets)
                    } else {
                        AgentLink::new(io, rest, lost, name.to_owned())
                    };
                    return Ok(Backend::Agent(Box::new(link)));
                }
                Ok(Ok(Some(line))) => {
                    let why = line.strip_prefix("err ").map_or(AgentRefusal::App, AgentRefusal::of_answer);
                    let reason = line
                        .strip_prefix("err ")
                        .map_or_else(|| format!("agent {name}: {service}: unexpected answer"), link::clean_reason);
                    // A link in chunks that answered `err` carried no session: it serves the next.
                    if framing.chunks && rest.is_empty() && line.starts_with("err ") {
                        pool.put_back(io, framing, false);
                    }
                    return Err(ConnectError::Agent(why, reason));
                }
                Ok(Ok(None) | Err(_)) => {
                    dead += 1;
                    // One more in place of a raw link found dead: an agent that replaces the
                    // raw links it is sent `open` on never saw this one's. (A link in chunks
                    // was asked for by `take` if the pool runs low.)
                    if pool.replacing && !framing.chunks {
                        pool.ask(1);
                    }
                }
            }
        }
    }
}

enum Taken {
    Link(LinkStream, Framing, link::Loss, Arc<Pool>),
    Wait(Arc<Pool>),
}

/// Failed logins an address may make in a row as one agent name before it must wait.
pub const BRAKE_BURST: u32 = 5;
/// One more try per this long.
pub const BRAKE_REFILL: Duration = Duration::from_secs(2);
/// Failed logins an address may make in a row across all names before it must wait.
pub const ADDRESS_BRAKE_BURST: u32 = 20;
/// One more try across all names per this long.
pub const ADDRESS_BRAKE_REFILL: Duration = Duration::from_secs(1);

/// The warning that an agent's connection replaced an older one, at most once per 10 s.
static REPLACED: crate::logging::Quieted = crate::logging::Quieted::new(Duration::from_secs(10));

/// The most replaced control links of one agent name that wait for the agent's answers to our
/// close frames at once ([`Registry::closing_replaced`]).
pub const MAX_CLOSING_REPLACED: usize = 4;

/// A replaced control link's place while it waits for its agent's answer to our close frame;
/// given back when dropped.
pub struct ClosingReplaced<'a> {
    registry: &'a Registry,
    name: String,
}

impl Drop for ClosingReplaced<'_> {
    fn drop(&mut self) {
        let mut closing = self.registry.closing_replaced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = closing.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                closing.remove(&self.name);
            }
        }
    }
}

/// How often the brake turning on for one address is warned of at most.
pub const BRAKE_WARNING: Duration = Duration::from_secs(60);

/// A login's try, taken from a budget by [`Registry::charge`]: given back when it succeeds.
#[derive(Debug, Clone, Copy)]
pub struct LoginTry {
    /// The client's address.
    ip: IpAddr,
    /// The key of the (address, agent name) pair it was charged to ([`Brake::pair`]) besides
    /// the address; `None`: to the address's budget alone (the pairs' table had no room).
    pair: Option<IpAddr>,
    /// Charged to the address's budget too (see [`Registry::charge_link`]).
    address: bool,
}

/// The brake on repeated failed logins, in the same fixed tables (O(1), bounded memory) the
/// access policy uses: a bucket per address and agent name ([`BRAKE_BURST`] tries, one more per
/// [`BRAKE_REFILL`]) and one per address across all names ([`ADDRESS_BRAKE_BURST`], one more
/// per [`ADDRESS_BRAKE_REFILL`]), both charged by every login (see [`Registry::charge`]); and
/// beside them, one warning per address per [`BRAKE_WARNING`].
#[derive(Debug)]
struct Brake {
    /// Per (address, agent name), keyed by [`Brake::pair`].
    names: Arc<crate::policy::PerAddress>,
    /// Per address, across all names.
    addresses: Arc<crate::policy::PerAddress>,
    /// The warnings, per address.
    warnings: Arc<crate::policy::PerAddress>,
    /// Keys the pairs' hash, so that no client can aim at another pair's key.
    hasher: std::collections::hash_map::RandomState,
}

impl Brake {
    /// The key of the pair (`ip`'s address, agent `name`) in [`Brake::names`]: a keyed 64-bit
    /// hash of the two, as the upper half of an IPv6 address (the table counts an IPv6 address
    /// by its /64, so the lower half would be lost). That table holds only such keys.
    fn pair(&self, ip: IpAddr, name: &str) -> IpAddr {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((crate::policy::address_key(ip), name));
        IpAddr::V6(std::net::Ipv6Addr::from(u128::from(h) << 64))
    }
}

impl Default for Brake {
    fn default() -> Brake {
        let bucket = |per: Duration, burst| {
            crate::policy::PerAddress::new(
                crate::policy::AddressLimits {
                    max_sessions: None,
                    rate: Some(1.0 / per.as_secs_f64()),
                    burst,
                    connections: false,
                },
                4096,
            )
        };
        let limits = |per: Duration, burst| crate::policy::AddressLimits {
            max_sessions: None,
            rate: Some(1.0 / per.as_secs_f64()),
            burst,
            connections: false,
        };
        Brake {
            names: bucket(BRAKE_REFILL, BRAKE_BURST),
            // With a budget per IPv6 /48 beside each /64's (ten addresses' worth): a client that
            // takes a new /64 for each guess is held to it.
            addresses: crate::policy::PerAddress::with_networks(
                limits(ADDRESS_BRAKE_REFILL, ADDRESS_BRAKE_BURST),
                4096,
                limits(ADDRESS_BRAKE_REFILL / 10, ADDRESS_BRAKE_BURST * 10),
            ),
            warnings: bucket(BRAKE_WARNING, 1),
            hasher: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New /64s of one IPv6 /48, each with a wrong secret, are held to the /48's budget (ten
    /// addresses' worth), as on browser routes (a review: 500 of 500 were tried unbraked).
    #[test]
    fn new_64s_of_one_48_are_braked_together() {
        let registry = Registry::default();
        let in_48 = |i: u32| -> IpAddr { format!("2001:db8:1:{i:x}::1").parse().unwrap() };
        let tried = (0..ADDRESS_BRAKE_BURST * 10 + 50)
            .filter(|&i| registry.charge(in_48(i), "shop-17").is_ok())
            .count();
        assert!(tried as u32 <= ADDRESS_BRAKE_BURST * 10 + 2, "{tried}");
        assert!(registry.charge("2001:db8:2::1".parse().unwrap(), "shop-17").is_ok(), "another /48");
    }

    #[test]
    fn the_brake_slows_an_address_after_a_burst_of_failures() {
        let registry = Registry::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        // Each try is charged before the check; a failed one is not refunded. Across names
        // (each within its pair's burst), the address's budget runs out.
        let mut last = None;
        for i in 0..ADDRESS_BRAKE_BURST {
            assert!(!registry.braked(ip), "looking takes no try");
            last = Some(registry.charge(ip, &format!("shop-{}", i % 4)).unwrap());
        }
        assert!(registry.braked(ip));
        assert!(registry.charge(ip, "shop-99").is_err(), "whatever the name");
        let last = last.unwrap();
        assert!(registry.brake_came_on(last), "the one warning");
        assert!(!registry.brake_came_on(last), "not again within BRAKE_WARNING");
        let elsewhere = registry.charge("192.0.2.2".parse().unwrap(), "shop-1").unwrap();
        assert!(!registry.brake_came_on(elsewhere), "not braked");
        assert!(!registry.braked("192.0.2.2".parse().unwrap()), "other addresses are not slowed");
        // A login that succeeded gives its tries back.
        let other: IpAddr = "192.0.2.3".parse().unwrap();
        for _ in 0..ADDRESS_BRAKE_BURST * 2 {
            registry.succeeded(registry.charge(other, "shop-17").unwrap());
        }
    }

    /// Failed logins as one name slow that name's logins from the address, not another's, nor
    /// those of the same name from elsewhere; a name no agent has is charged as a declared one
    /// is (the answers tell no names apart), and a try the pair refuses costs the address
    /// nothing.
    #[test]
    fn the_brake_counts_per_address_and_agent_name() {
        let registry = Registry::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for name in ["shop-17", "made-up"] {
            let tries: Vec<LoginTry> = (0..BRAKE_BURST).map(|_| registry.charge(ip, name).unwrap()).collect();
            assert!(
                registry.brake_came_on(tries[tries.len() - 1]) || name == "made-up",
                "the last try turned it on"
            );
            for _ in 0..ADDRESS_BRAKE_BURST {
                assert!(registry.charge(ip, name).is_err(), "{name} from there is slowed");
            }
        }
        assert!(!registry.braked(ip), "refused tries do not spend the address's budget");
        assert!(registry.charge(ip, "shop-18").is_ok(), "another agent from there is not slowed");
        assert!(
            registry.charge("192.0.2.2".parse().unwrap(), "shop-17").is_ok(),
            "nor shop-17 from elsewhere"
        );
    }

    /// A registry that declares `shop-17`, with the secret whose hash is all zeros (the
    /// digest the pool tests attach with).
    fn shop_17() -> Registry {
        Registry::new(&AgentsConfig {
            declared: vec![super::super::AgentDecl {
                name: "shop-17".into(),
                secret_sha256: vec![[0; 32]],
            }],
            ..AgentsConfig::default()
        })
    }

    /// Revocation reaches what still runs on a secret: an earlier connection (replaced, or
    /// ended with sessions going on) as well as the current one; a data link with another
    /// listed secret does not join the pool; a login that a reload revoked before its hello is
    /// not attached.
    #[tokio::test]
    async fn revoking_a_secret_reaches_every_connection_that_logged_in_with_it() {
        let (old, new) = ([1; 32], [2; 32]);
        let declare = |hashes: Vec<[u8; 32]>| AgentsConfig {
            declared: vec![super::super::AgentDecl {
                name: "shop-17".into(),
                secret_sha256: hashes,
            }],
            ..AgentsConfig::default()
        };
        let registry = Registry::new(&declare(vec![new, old]));
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let loss_of = |r: &Registry| r.agents.lock().unwrap().get("shop-17").unwrap().lost.clone();
        let first = registry.attach("shop-17", old, vec![], addr, 4, true).unwrap();
        let ended = loss_of(&registry);
        registry.detach("shop-17", first.id, false);
        let _second = registry.attach("shop-17", old, vec![], addr, 4, true).unwrap();
        let replaced = loss_of(&registry);
        let current = registry.attach("shop-17", new, vec![], addr, 4, true).unwrap();
        assert!(
            !registry.takes_links("shop-17", &old),
            "a link with the old secret is not this connection's"
        );
        assert!(registry.takes_links("shop-17", &new));
        let (server, _client) = link();
        assert!(registry
            .add_link("shop-17", &old, LinkStream::Tcp(server), CHUNKED, Slot::alone())
            .is_err());
        registry.set_config(&declare(vec![new]));
        assert!(ended.is_revoked() && replaced.is_revoked(), "earlier connections on the old secret");
        assert!(!current.revoked.is_cancelled() && registry.is_connected("shop-17"));
        assert!(
            registry.attach("shop-17", old, vec![], addr, 4, true).is_none(),
            "a login from before the reload"
        );
    }

    /// A fleet file found without the agent once (caught half written, say) cuts nobody off, nor
    /// does a re-read that fails after it (a line half written); found so at two good looks, a
    /// re-read apart, it revokes the agent.
    #[tokio::test]
    async fn an_agent_missing_from_its_fleet_file_is_revoked_only_when_it_stays_missing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet");
        let digest = link::parse_sha256(&link::secret_sha256("s")).unwrap();
        let declared = format!("shop-17: {}\n", link::hex(&digest));
        std::fs::write(&file, &declared).unwrap();
        let registry = Registry::new(&AgentsConfig {
            sources: vec![file.clone()],
            ..AgentsConfig::default()
        });
        let attached = registry
            .attach("shop-17", digest, vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        // Each check after the source may be re-read: the time this rule is about, not a wait
        // for an event.
        let check = || async {
            tokio::time::sleep(super::super::fleet::RECHECK).await;
            registry.recheck("shop-17", attached.id).await;
        };
        std::fs::write(&file, "").unwrap();
        check().await;
        assert!(
            registry.is_connected("shop-17") && !attached.revoked.is_cancelled(),
            "one look is not enough"
        );
        std::fs::write(&file, "shop-17: 12ab").unwrap();
        check().await;
        assert!(registry.is_connected("shop-17"), "a re-read that failed is not a second look");
        std::fs::write(&file, &declared).unwrap();
        check().await;
        assert!(registry.is_connected("shop-17"), "back in the file: kept");
        std::fs::write(&file, "").unwrap();
        check().await;
        check().await;
        assert!(!registry.is_connected("shop-17") && attached.revoked.is_cancelled());
    }

    #[tokio::test]
    async fn an_offline_agent_and_an_unknown_service_are_named() {
        let registry = shop_17();
        let e = registry.open("shop-17", "pos", Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.to_string(), "agent shop-17 is offline");
        let _attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        let e = registry.open("shop-17", "label", Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.to_string(), "agent shop-17 has no service label");
        let e = registry.open("shop-17", "pos", Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.to_string(), "agent shop-17: no data link from the agent in time");
    }

    /// A connected TCP pair: (the link as the server holds it, the agent's end).
    fn link() -> (tokio::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let agent = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (tokio::net::TcpStream::from_std(server).unwrap(), agent)
    }

    /// Which link `take` gives: the agent end's port, so a test can tell links apart.
    fn take_port(registry: &Registry) -> u16 {
        match registry.take("shop-17", "pos").unwrap() {
            Taken::Link(LinkStream::Tcp(s), ..) => s.peer_addr().unwrap().port(),
            _ => panic!("no idle link"),
        }
    }

    const CHUNKED: Framing = Framing {
        chunks: true,
        resets: false,
    };

    fn add(registry: &Registry, chunks: bool, ends: &mut Vec<std::net::TcpStream>) -> u16 {
        let (server, agent) = link();
        let port = agent.local_addr().unwrap().port();
        ends.push(agent);
        assert!(registry
            .add_link(
                "shop-17",
                &[0; 32],
                LinkStream::Tcp(server),
                Framing { chunks, resets: false },
                Slot::alone()
            )
            .is_ok());
        port
    }

    fn wants(attached: &mut Attached) -> usize {
        let mut n = 0;
        while let Ok(Control::Want(k)) = attached.control.try_recv() {
            n += k;
        }
        n
    }

    /// Links in chunks are taken newest first, a returned one the agent may still be busy on
    /// last; raw links oldest first.
    #[tokio::test]
    async fn the_pool_gives_links_in_its_order() {
        let registry = shop_17();
        let _attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        let mut ends = Vec::new();
        let a = add(&registry, true, &mut ends);
        let b = add(&registry, true, &mut ends);
        let (server, agent) = link();
        let busy = agent.local_addr().unwrap().port();
        ends.push(agent);
        let pool = match registry.take("shop-17", "pos").unwrap() {
            Taken::Link(LinkStream::Tcp(s), _, _, pool) => {
                assert_eq!(s.peer_addr().unwrap().port(), b, "the newest first");
                pool
            }
            _ => panic!("no idle link"),
        };
        pool.give_back(LinkStream::Tcp(server), CHUNKED, true);
        assert_eq!([take_port(&registry), take_port(&registry)], [a, busy]);
        let r1 = add(&registry, false, &mut ends);
        let r2 = add(&registry, false, &mut ends);
        assert_eq!([take_port(&registry), take_port(&registry)], [r1, r2]);
    }

    /// An idle link holds a connection slot; one taken for a session gives it up (the page's
    /// connection covers it) and takes one again when it comes back, or closes when none is
    /// free.
    #[tokio::test]
    async fn idle_links_count_as_connections_and_come_back_only_under_the_cap() {
        let registry = shop_17();
        let connections = crate::slots::Slots::default();
        registry.count_connections(&connections, 2);
        let _attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        let (server, _agent) = link();
        let slot = connections.try_take(2).unwrap();
        assert!(registry
            .add_link("shop-17", &[0; 32], LinkStream::Tcp(server), CHUNKED, slot)
            .is_ok());
        assert_eq!(connections.taken(), 1, "the idle link");
        let Taken::Link(io, _, _, pool) = registry.take("shop-17", "pos").unwrap() else {
            panic!("no idle link")
        };
        assert_eq!(connections.taken(), 0, "in a session: covered by the page's connection");
        let page = connections.try_take(2).unwrap();
        let other = connections.try_take(2).unwrap();
        pool.give_back(io, CHUNKED, false);
        assert_eq!(registry.idle_links("shop-17"), Some(0), "no slot free: closed");
        drop(other);
        let (server, _agent) = link();
        pool.give_back(LinkStream::Tcp(server), CHUNKED, false);
        assert_eq!(registry.idle_links("shop-17"), Some(1), "back under the cap");
        assert_eq!(connections.taken(), 2, "the page's and the idle link's");
        drop(page);
    }

    /// The pools of the agents connected from an address, as the per-address caps count it
    /// (IPv6 by /64).
    #[test]
    fn an_agent_is_found_by_its_address() {
        let registry = shop_17();
        assert_eq!(registry.pools_at("2001:db8::1".parse().unwrap()), 0);
        let _attached = registry
            .attach(
                "shop-17",
                [0; 32],
                vec!["pos".into()],
                "[2001:db8::1]:4000".parse().unwrap(),
                4,
                true,
            )
            .unwrap();
        assert_eq!(registry.pools_at("2001:db8::99".parse().unwrap()), 4, "the same /64");
        assert_eq!(registry.pools_at("2001:db8:0:1::1".parse().unwrap()), 0, "another /64");
        assert_eq!(registry.pools_at("127.0.0.1".parse().unwrap()), 0);
    }

    /// The pools' sum per address follows agents as they come and go: two behind one address
    /// add up; a newer connection from elsewhere moves its pool there; a detach, a stale one
    /// (an older connection's) aside, and a revocation at a reload take it away.
    #[test]
    fn the_pools_at_an_address_follow_its_agents() {
        let declared = |names: &[&str]| AgentsConfig {
            declared: names
                .iter()
                .map(|n| super::super::AgentDecl {
                    name: (*n).into(),
                    secret_sha256: vec![[0; 32]],
                })
                .collect(),
            ..AgentsConfig::default()
        };
        let registry = Registry::new(&declared(&["shop-17", "shop-18"]));
        let (nat, elsewhere): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "198.51.100.1".parse().unwrap());
        let attach = |name: &str, ip: IpAddr, pool: usize| {
            registry
                .attach(name, [0; 32], Vec::new(), SocketAddr::new(ip, 4000), pool, true)
                .unwrap()
        };
        let first17 = attach("shop-17", nat, 4);
        let _a18 = attach("shop-18", nat, 2);
        assert_eq!(registry.pools_at(nat), 6);
        // shop-17 connects again from elsewhere: the newer connection replaces the older.
        let a17 = attach("shop-17", elsewhere, 3);
        assert_eq!((registry.pools_at(nat), registry.pools_at(elsewhere)), (2, 3));
        registry.detach("shop-17", first17.id, false);
        assert_eq!(registry.pools_at(elsewhere), 3, "the older connection is no longer the agent's");
        registry.detach("shop-17", a17.id, true);
        assert_eq!(registry.pools_at(elsewhere), 0);
        assert!(
            !registry.agents.lock().unwrap().pools.contains_key(&elsewhere),
            "no entry left behind"
        );
        registry.set_config(&declared(&["shop-17"]));
        assert_eq!(registry.pools_at(nat), 0, "shop-18 revoked");
        assert!(registry.agents.lock().unwrap().pools.is_empty());
    }

    /// A link coming back beyond the pool's size (after a burst) stays only while less than
    /// 90 % of `max_connections` is taken: idle links must not fill the cap against pages.
    #[tokio::test]
    async fn links_beyond_the_pool_come_back_only_while_the_cap_has_room() {
        let registry = shop_17();
        let connections = crate::slots::Slots::default();
        registry.count_connections(&connections, 10);
        let _attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        let mut ends = Vec::new();
        for _ in 0..5 {
            let (server, agent) = link();
            ends.push(agent);
            let slot = connections.try_take(10).unwrap();
            assert!(registry
                .add_link("shop-17", &[0; 32], LinkStream::Tcp(server), CHUNKED, slot)
                .is_ok());
        }
        let Taken::Link(io, _, _, pool) = registry.take("shop-17", "pos").unwrap() else {
            panic!("no idle link")
        };
        let pages: Vec<_> = (0..4).map(|_| connections.try_take(10).unwrap()).collect();
        assert_eq!(connections.taken(), 8, "4 idle links and 4 pages");
        pool.give_back(io, CHUNKED, false);
        assert_eq!(registry.idle_links("shop-17"), Some(5), "the 9th of 10: kept");
        let (server, _agent) = link();
        pool.give_back(LinkStream::Tcp(server), CHUNKED, false);
        assert_eq!(registry.idle_links("shop-17"), Some(5), "a 10th would leave no room: closed");
        assert_eq!(connections.taken(), 9);
        drop(pages);
    }

    /// A pool running low asks for a pool's worth at most until they arrive, whether sessions
    /// take links or wait for one.
    #[tokio::test]
    async fn a_pool_asks_for_links_it_has_not_been_sent_yet_once() {
        let registry = shop_17();
        let mut attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        let mut ends = Vec::new();
        for _ in 0..4 {
            add(&registry, true, &mut ends);
        }
        for _ in 0..4 {
            take_port(&registry);
        }
        assert_eq!(wants(&mut attached), 4, "one for each link taken below the pool's size");
        for _ in 0..10 {
            assert!(matches!(registry.take("shop-17", "pos").unwrap(), Taken::Wait(_)));
        }
        assert_eq!(wants(&mut attached), 0, "four are on their way: waiting sessions ask for no more");
        add(&registry, true, &mut ends);
        take_port(&registry);
        assert_eq!(wants(&mut attached), 1, "one arrived and was taken: one more is asked for");
    }

    /// Beyond the pool's size, links unused for SURPLUS_IDLE close at the top-up, the least
    /// recently used first; the pool's own size stays.
    #[tokio::test(start_paused = true)]
    async fn surplus_links_close_once_unused_for_a_while() {
        let registry = shop_17();
        let mut attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 2, true)
            .unwrap();
        let mut ends = Vec::new();
        for _ in 0..5 {
            add(&registry, true, &mut ends);
        }
        tokio::time::advance(SURPLUS_IDLE - Duration::from_secs(1)).await;
        let newest = add(&registry, true, &mut ends);
        registry.top_up("shop-17", attached.id);
        assert_eq!(registry.idle_links("shop-17"), Some(6), "none unused long enough yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        registry.top_up("shop-17", attached.id);
        assert_eq!(registry.idle_links("shop-17"), Some(2), "the pool's size stays");
        assert_eq!(wants(&mut attached), 0, "a pool at its size asks for nothing at the top-up");
        assert_eq!(take_port(&registry), newest, "the most recently used stays");
    }

    /// Adds a link whose agent end answers `open pos` with `ok` (a raw link), as an agent does;
    /// the task gives that end back.
    fn add_live(registry: &Registry) -> tokio::task::JoinHandle<tokio::net::TcpStream> {
        use tokio::io::AsyncReadExt;
        let (server, agent) = link();
        agent.set_nonblocking(true).unwrap();
        let mut agent = tokio::net::TcpStream::from_std(agent).unwrap();
        assert!(registry
            .add_link("shop-17", &[0; 32], LinkStream::Tcp(server), Framing::RAW, Slot::alone())
            .is_ok());
        tokio::spawn(async move {
            let mut open = [0u8; 9];
            agent.read_exact(&mut open).await.unwrap();
            assert_eq!(&open, b"open pos\n");
            agent.write_all(b"ok\n").await.unwrap();
            agent
        })
    }

    /// Just after start a page for an agent that is not connected waits for it, up to its
    /// deadline (an instance back from a crash takes pages before its agents are back); the
    /// agent connecting wakes it (it then waits for the agent's link, and says that); past
    /// [`AGENTS_SETTLE`] the page reads at once that the agent is offline.
    #[tokio::test(start_paused = true)]
    async fn an_agent_not_connected_is_waited_for_just_after_start_only() {
        let registry = shop_17();
        let deadline = Duration::from_secs(5);
        let started = Instant::now();
        let opened = registry.open("shop-17", "pos", deadline).await;
        assert_eq!(opened.map(|_| ()).unwrap_err().to_string(), "agent shop-17 is offline");
        assert_eq!(started.elapsed(), deadline);

        let comes = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            registry
                .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
                .unwrap()
        };
        let (opened, attached) = tokio::join!(registry.open("shop-17", "pos", deadline), comes);
        let why = opened.map(|_| ()).unwrap_err().to_string();
        assert_eq!(
            why, "agent shop-17: no data link from the agent in time",
            "the wait saw the agent come"
        );
        registry.detach("shop-17", attached.id, true);

        tokio::time::advance(AGENTS_SETTLE).await;
        let started = Instant::now();
        let opened = registry.open("shop-17", "pos", deadline).await;
        assert_eq!(opened.map(|_| ()).unwrap_err().to_string(), "agent shop-17 is offline");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A session waiting for a link of a connection that is replaced (the agent connected again,
    /// or moved and landed here again) takes the newer connection's link as soon as it comes;
    /// one whose connection is lost is told the agent is offline at once. Neither waits for
    /// links of a connection that is gone until its deadline.
    #[tokio::test]
    async fn a_session_waiting_for_a_link_follows_the_agents_connection() {
        let registry = shop_17();
        let attach = || {
            registry
                .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
                .unwrap()
        };
        let deadline = Duration::from_secs(3);
        let mut first = attach();
        let started = Instant::now();
        let replace = async {
            // The session asks for a link once it waits for one.
            assert_eq!(first.control.recv().await, Some(Control::Want(1)));
            let second = attach();
            (second, add_live(&registry))
        };
        let (opened, (mut second, agent_end)) = tokio::join!(registry.open("shop-17", "pos", deadline), replace);
        assert!(
            matches!(opened, Ok(Backend::Agent(_))),
            "{:?}",
            opened.map(|_| ()).unwrap_err().to_string()
        );
        assert!(started.elapsed() < deadline / 3, "took {:?}", started.elapsed());
        agent_end.await.unwrap();

        // The newer connection's pool is empty now: a session waits, and the connection is lost.
        let started = Instant::now();
        let id = second.id;
        let lose = async {
            assert_eq!(second.control.recv().await, Some(Control::Want(1)));
            registry.detach("shop-17", id, true);
        };
        let (opened, ()) = tokio::join!(registry.open("shop-17", "pos", deadline), lose);
        assert_eq!(opened.map(|_| ()).unwrap_err().to_string(), "agent shop-17 is offline");
        assert!(started.elapsed() < deadline / 3, "took {:?}", started.elapsed());
    }

    /// Idle links cut while idle (a NAT, a proxy's read timeout), more of them than any fixed
    /// number of tries (a pool after a burst holds many), while the agent is connected: the
    /// session passes over every one, asks for a pool's worth, not one per dead link, and takes
    /// the first live link that arrives; with none arriving, the reason says what was found.
    #[tokio::test]
    async fn idle_links_found_closed_are_passed_over_until_a_live_one_comes() {
        let registry = shop_17();
        let mut attached = registry
            .attach("shop-17", [0; 32], vec!["pos".into()], "127.0.0.1:1".parse().unwrap(), 4, true)
            .unwrap();
        let cut = |n: usize| {
            let mut ends = Vec::new();
            for _ in 0..n {
                add(&registry, true, &mut ends);
            }
            // The far ends go: each link reads EOF at its `open`.
            drop(ends);
        };
        cut(10);
        let deadline = Duration::from_secs(3);
        let started = Instant::now();
        let arrives = async {
            // The pool ran dry: one asked for each link taken below the pool's size.
            for _ in 0..4 {
                assert_eq!(attached.control.recv().await, Some(Control::Want(1)));
            }
            // Its `open` answered: the agent's end, kept while the session is checked.
            add_live(&registry).await.unwrap()
        };
        let (opened, _agent_end) = tokio::join!(registry.open("shop-17", "pos", deadline), arrives);
        assert!(
            matches!(opened, Ok(Backend::Agent(_))),
            "{:?}",
            opened.map(|_| ()).unwrap_err().to_string()
        );
        assert!(started.elapsed() < deadline / 3, "took {:?}", started.elapsed());
        assert_eq!(wants(&mut attached), 0, "a pool's worth asked for, no more");

        cut(3);
        let short = Duration::from_millis(200);
        let started = Instant::now();
        let e = registry.open("shop-17", "pos", short).await.map(|_| ()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent shop-17: no live data link from the agent in time (3 found closed)"
        );
        assert!(started.elapsed() >= short);
    }
}
