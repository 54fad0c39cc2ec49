//! Sessions and new sessions per client address, counted in a table of fixed size.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::Refusal;

/// Limits per client address.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AddressLimits {
    /// Sessions open at once from one address.
    pub max_sessions: Option<u32>,
    /// New sessions per second from one address, refilled continuously...
    pub rate: Option<f64>,
    /// ...with room for this many at once.
    pub burst: u32,
    /// What `max_sessions` counts, for the refusal's words: connections (`[limits]
    /// max_connections_per_ip`, counted from accept) rather than sessions.
    pub connections: bool,
}

impl AddressLimits {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.max_sessions.is_none() && self.rate.is_none()
    }
}

/// One address's counters.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The address (an IPv6 address's /64, see [`address_key`]).
    key: IpAddr,
    sessions: u32,
    /// Tokens in the bucket when last refilled.
    tokens: f64,
    refilled: Instant,
}

/// Counters per client address in a fixed table: O(1) per handshake, and memory that does not
/// grow with the number of addresses. An address has [`PROBES`] candidate slots (a keyed hash,
/// so a client cannot aim at another's slots); it takes a slot that holds it, or the first whose
/// counters have gone back to nothing (no session, a full bucket). When all hold other live
/// addresses, which takes a flood of more addresses than the table has room for, a newcomer's
/// session goes uncounted (see `with_entry`), but its failed attempts are charged to a budget
/// shared by such newcomers of its network (see `in_budget`). IPv6 addresses count by their /64. A reload changes the
/// limits and the size in place ([`PerAddress::stage`]), so the counts of the sessions open
/// across it go on.
#[derive(Debug)]
pub struct PerAddress {
    table: Mutex<Table>,
    hasher: RandomState,
    /// When the table last said it was full.
    overflow_logged: Mutex<Option<Instant>>,
    /// For a table of failed attempts: a budget per IPv6 /48 besides each /64's (see
    /// [`PerAddress::with_networks`]).
    networks: Option<Arc<PerAddress>>,
    /// With `networks`: the keys (/64s) that gave a try back lately (their credentials were
    /// right), which a spent network budget does not slow: someone in the same /48 who spends
    /// it with wrong guesses from ever new /64s locks out only those that have not proved
    /// themselves. Bounded ([`PROVEN_MAX`], [`PROVEN_PER_NETWORK`] per /48).
    proven: Mutex<HashMap<IpAddr, Instant>>,
}

/// How long a /64 whose credentials were right is not slowed by its /48's spent budget.
const PROVEN_FOR: Duration = Duration::from_secs(600);

/// The most /64s remembered as proven at once.
const PROVEN_MAX: usize = 4096;

/// The most /64s of one /48 remembered as proven at once.
const PROVEN_PER_NETWORK: usize = 16;

/// The limits and the slots, under one lock.
#[derive(Debug)]
struct Table {
    limits: AddressLimits,
    slots: Vec<Option<Entry>>,
    /// The budgets of attempts (`try_charge`, `failed`) of the addresses that find no slot,
    /// [`OVERFLOW_BUDGETS`] of them, an address's chosen by its network (see
    /// `PerAddress::overflow_index`): shared, so that a flood of addresses that keeps the table
    /// full of failures does not let each further address guess unbraked; by network, so that
    /// the flood's own overflow spends the budgets of its networks and not every newcomer's.
    overflow: Vec<Entry>,
}

/// How many budgets the addresses that find no slot share (see [`Table::overflow`]).
const OVERFLOW_BUDGETS: usize = 256;

impl Table {
    /// The size of a full bucket.
    fn burst(&self) -> f64 {
        f64::from(self.limits.burst.max(1))
    }

    /// Refills `e`'s bucket to `now` at the table's rate (none: left as it is).
    fn refill(limits: AddressLimits, burst: f64, e: &mut Entry, now: Instant) {
        if let Some(rate) = limits.rate {
            let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
            e.tokens = (e.tokens + elapsed * rate).min(burst);
        }
        e.refilled = now;
    }
}

/// A session's place in [`PerAddress`]; given back on drop. It names its address's key, not a
/// slot, since a reload may move the entry ([`PerAddress::stage`]); an entry holding a
/// session is never given to another address nor dropped, so it is found again.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<PerAddress>,
    /// `None`: admitted uncounted (the table was full of live addresses).
    key: Option<IpAddr>,
}

/// Whole seconds until a bucket holding `tokens` has one again at `rate` per second (at least 1).
fn retry_after(tokens: f64, rate: f64) -> u64 {
    // Clamped: a tiny configured rate must not overflow (a day is the most said).
    ((1.0 - tokens) / rate).clamp(1.0, 86_400.0).ceil() as u64
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        // An uncounted session has nothing to give back.
        let Some(key) = self.key else { return };
        let mut table = self.table.lock();
        if let Some(i) = self.table.find(&table.slots, key) {
            if let Some(e) = table.slots[i].as_mut() {
                e.sessions = e.sessions.saturating_sub(1);
            }
        }
    }
}

/// New limits and size for a table in service, made while a reload builds the new configuration
/// ([`PerAddress::stage`]) and put into force by [`Staged::commit`] only once all of it was
/// built: a reload that fails drops them with the rest of what it built, and the table goes on
/// as it was.
#[derive(Debug)]
#[must_use = "nothing changes until it is committed"]
pub struct Staged {
    table: Arc<PerAddress>,
    limits: AddressLimits,
    capacity: usize,
}

impl Staged {
    /// Puts the staged limits and size into force (see [`PerAddress::stage`]).
    pub fn commit(self) {
        self.table.reconfigure(self.limits, self.capacity);
    }
}

/// What a full table does with a newcomer, for its log line.
#[derive(Debug, Clone, Copy)]
enum Overflow {
    /// Lets it in uncounted ([`PerAddress::enter`] and the budgets).
    Uncounted,
    /// Refuses it ([`PerAddress::enter_within`]: an allowance past a cap).
    Refused,
    /// Charges its attempts to the budget such newcomers of its network share
    /// ([`PerAddress::try_charge`]).
    Shared,
}

/// The slots of a table made for `capacity` (see [`PerAddress::new`]).
fn table_len(capacity: usize) -> usize {
    capacity.clamp(1024, 1 << 22).next_power_of_two()
}

/// Slots an address may take. At a table filled to a third by live addresses (the default size
/// is four times `max_connections`, and most connections' addresses differ), all eight are taken
/// by others for one new address in 7,000; only then are counts shared.
const PROBES: usize = 8;

impl PerAddress {
    /// A table of `capacity` slots (rounded up to a power of two, at least 1,024).
    pub fn new(limits: AddressLimits, capacity: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress::table(limits, capacity))
    }

    fn table(limits: AddressLimits, capacity: usize) -> PerAddress {
        let overflow = Entry {
            key: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            sessions: 0,
            tokens: f64::from(limits.burst.max(1)),
            refilled: Instant::now(),
        };
        let overflow = vec![overflow; OVERFLOW_BUDGETS];
        PerAddress {
            table: Mutex::new(Table {
                limits,
                slots: vec![None; table_len(capacity)],
                overflow,
            }),
            hasher: RandomState::new(),
            overflow_logged: Mutex::new(None),
            networks: None,
            proven: Mutex::default(),
        }
    }

    /// A table of failed attempts (`try_charge`, `refund`, `failed`) with a second budget, per
    /// IPv6 /48 ([`network_key`]), with `limits`, charged beside each /64's own: one /48 holds
    /// 65,536 /64s, each of which would get a budget of its own, so a client that takes a new
    /// /64 for each guess (a tunnel broker hands out /48s) would guess thousands of times
    /// faster than one address may. IPv4 addresses are charged as before.
    pub fn with_networks(limits: AddressLimits, capacity: usize, networks: AddressLimits) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            networks: Some(PerAddress::new(networks, capacity)),
            ..PerAddress::table(limits, capacity)
        })
    }

    /// The network budget `ip` is charged to beside its own, if any: none for an IPv4 address,
    /// and none for a /64 that proved itself lately (see `proven`).
    fn network_of(&self, ip: IpAddr) -> Option<(&PerAddress, IpAddr)> {
        let networks = self.networks.as_deref()?;
        let IpAddr::V6(v6) = ip.to_canonical() else { return None };
        let proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        match proven.get(&address_key(ip)) {
            Some(at) if at.elapsed() < PROVEN_FOR => None,
            _ => Some((networks, network_key(IpAddr::V6(v6)))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits counted.
    pub fn limits(&self) -> AddressLimits {
        self.lock().limits
    }

    /// A reload: `limits` and a size for `capacity`, in force from [`Staged::commit`] on (the
    /// table is shared with the configuration in service, which a failed reload leaves as it was).
    pub fn stage(self: &Arc<Self>, limits: AddressLimits, capacity: usize) -> Staged {
        Staged {
            table: self.clone(),
            limits,
            capacity,
        }
    }

    /// [`Staged::commit`]: counts `limits` from now on in a table sized for `capacity`, keeping
    /// every address's counts (the sessions open across the reload go on counting against the
    /// new limits, and a bucket keeps its tokens, at most the new burst, and is full again when
    /// there is no rate any more, since nothing would refill it). When the size changes
    /// the entries are placed again, but for those back at nothing. If one that is not finds no
    /// room (a smaller table than the live addresses fit), the table keeps its size, which is
    /// only a sizing hint, and says so: an entry is never dropped while it counts something, since
    /// its address would get a fresh one, which the ends of its sessions from before would
    /// uncount, letting it past its cap.
    fn reconfigure(&self, limits: AddressLimits, capacity: usize) {
        let mut table = self.lock();
        let before = table.burst();
        table.limits = limits;
        let burst = table.burst();
        if limits.rate.is_none() {
            // Nothing refills a bucket without a rate, and a slot is free only at a full one: a
            // spent bucket would hold its slot for good (new sessions are no longer charged).
            for e in table.slots.iter_mut().flatten() {
                e.tokens = burst;
            }
            for e in &mut table.overflow {
                e.tokens = burst;
            }
        } else if burst < before {
            for e in table.slots.iter_mut().flatten() {
                e.tokens = e.tokens.min(burst);
            }
            for e in &mut table.overflow {
                e.tokens = e.tokens.min(burst);
            }
        }
        let len = table_len(capacity);
        if len == table.slots.len() {
            return;
        }
        let mut slots = vec![None; len];
        for e in table.slots.iter().flatten() {
            // Entries back at nothing (no session, a full bucket) are not worth a place.
            if e.sessions == 0 && e.tokens >= burst {
                continue;
            }
            match self.candidates(e.key, len).into_iter().find(|&i| slots[i].is_none()) {
                Some(i) => slots[i] = Some(*e),
                None => {
                    tracing::info!(
                        slots = table.slots.len(),
                        asked = len,
                        "a reload asked for a table of counts per client address too small for its live addresses: \
                         it keeps its size"
                    );
                    return;
                }
            }
        }
        table.slots = slots;
    }

    /// The slot holding `key`'s counters, if any.
    fn find(&self, slots: &[Option<Entry>], key: IpAddr) -> Option<usize> {
        self.candidates(key, slots.len())
            .into_iter()
            .find(|&i| slots[i].is_some_and(|e| e.key == key))
    }

    /// Counts a new session from `ip` now, or says why not.
    ///
    /// # Errors
    /// A 429 [`Refusal`] with `Retry-After`.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<AddressSlot, Refusal> {
        self.enter_at(ip, Instant::now())
    }

    fn enter_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<AddressSlot, Refusal> {
        let counted = self.with_entry(ip, now, |entry, limits, burst| {
            if let Some(max) = limits.max_sessions {
                if entry.sessions >= max {
                    let (public, what) = match limits.connections {
                        true => (TOO_MANY_CONNECTIONS, "connections"),
                        false => (TOO_MANY_SESSIONS, "sessions"),
                    };
                    return Err(Refusal {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        public,
                        detail: format!(
                            "client {} has {} {what} open (max {max} per address)",
                            counted_as(ip, entry.key),
                            entry.sessions
                        ),
                        retry_after: Some(5),
                    });
                }
            }
            if let Some(rate) = limits.rate {
                if entry.tokens < 1.0 {
                    return Err(Refusal {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        public: "too many new sessions from your address",
                        detail: format!(
                            "client {} is over its rate of new sessions ({rate}/s, burst {burst})",
                            counted_as(ip, entry.key)
                        ),
                        retry_after: Some(retry_after(entry.tokens, rate)),
                    });
                }
                entry.tokens -= 1.0;
            }
            entry.sessions += 1;
            Ok(())
        });
        match counted {
            Some((key, entered)) => entered.map(|()| AddressSlot {
                table: self.clone(),
                key: Some(key),
            }),
            // The table is full of live addresses: admitted uncounted (see `with_entry`).
            None => Ok(AddressSlot {
                table: self.clone(),
                key: None,
            }),
        }
    }

    /// Counts a connection from `ip` if fewer than `max` are counted for it, whatever this
    /// table's own limits: for an allowance given on top of a cap, whose size the caller works
    /// out per address. `None` at `max`, and also when every slot `ip` may take holds another
    /// live address: an extra is refused then, never given uncounted (see `in_table`); that is
    /// logged as [`PerAddress::enter`]'s overflow is, at most once a minute.
    pub fn enter_within(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<AddressSlot> {
        let now = Instant::now();
        let Some((key, entered)) = self.in_table(ip, now, |entry, _, _| (entry.sessions < max).then(|| entry.sessions += 1)) else {
            self.overflowed(now, Overflow::Refused);
            return None;
        };
        entered.map(|()| AddressSlot {
            table: self.clone(),
            key: Some(key),
        })
    }

    /// The slots of this table (for tests of its sizing).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Takes one attempt from `ip`'s budget of authentication attempts before its credentials
    /// are checked, so that parallel guesses cannot all start before the first failure counts;
    /// [`PerAddress::refund`] gives it back when they were right. Used on a table whose `rate`
    /// is the failures forgiven per second and whose `burst` the failures allowed at once.
    ///
    /// # Errors
    /// A 429 [`Refusal`] with `Retry-After` when the budget is spent.
    ///
    /// An address that finds no slot (the table is full of others' recent failures) is charged
    /// to a budget shared by such addresses of its network (see `in_budget`).
    pub fn try_charge(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.try_charge_at(ip, Instant::now())
    }

    fn try_charge_at(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let key = address_key(ip);
        self.in_budget(ip, now, |entry, limits, _| spend(entry, limits, key))?;
        if let Some((networks, net)) = self.network_of(ip) {
            if let Err(r) = networks.try_charge_at(net, now) {
                // Not tried: the address's own try is given back.
                self.give_back(ip, now);
                return Err(r);
            }
        }
        Ok(())
    }

    /// [`PerAddress::try_charge`] for a key that has a budget of its own only while the table
    /// has room for it: `None`, and nothing charged, when every slot it may take holds another
    /// live key (the caller charges a budget of its choosing instead of the shared one).
    pub fn try_charge_own(&self, ip: IpAddr) -> Option<Result<(), Refusal>> {
        let key = address_key(ip);
        let now = Instant::now();
        let mut table = self.lock();
        let (limits, burst) = (table.limits, table.burst());
        let i = self.place(&mut table, key, now)?;
        let entry = table.slots[i].as_mut()?;
        Table::refill(limits, burst, entry, now);
        Some(spend(entry, limits, key))
    }

    /// Gives back an attempt taken by [`PerAddress::try_charge`] that succeeded.
    pub fn refund(&self, ip: IpAddr) {
        self.give_back(ip, Instant::now());
        // The network's try back where one was taken (not for a /64 already proven).
        if let Some((networks, net)) = self.network_of(ip) {
            networks.refund(net);
        }
    }

    /// One try back to `ip`'s own budget (up to its burst).
    fn give_back(&self, ip: IpAddr, now: Instant) {
        self.in_budget(ip, now, |entry, _, burst| entry.tokens = (entry.tokens + 1.0).min(burst));
    }

    /// [`PerAddress::refund`] for a try whose credentials were right (a token found, a
    /// password that matched): with networks, its /64 is also remembered as proven (see
    /// `proven`). Not for a try given back for any other reason (a source that did not answer).
    pub fn proved(&self, ip: IpAddr) {
        self.refund(ip);
        if self.networks.is_none() || !ip.to_canonical().is_ipv6() {
            return;
        }
        let key = address_key(ip);
        let mut proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        if !proven.contains_key(&key) {
            // Room is made from what has expired, never by forgetting the others (which anyone
            // with a valid credential could otherwise wipe, again and again); and a /48 holds
            // at most PROVEN_PER_NETWORK proven /64s, so that one valid credential used from
            // ever new /64s does not buy each of them past the /48's budget.
            if proven.len() >= PROVEN_MAX {
                proven.retain(|_, at| at.elapsed() < PROVEN_FOR);
            }
            let net = network_key(ip);
            let in_net = proven
                .iter()
                .filter(|(k, at)| network_key(**k) == net && at.elapsed() < PROVEN_FOR)
                .count();
            if proven.len() >= PROVEN_MAX || in_net >= PROVEN_PER_NETWORK {
                return;
            }
        }
        proven.insert(key, Instant::now());
    }

    /// Whether `ip` may try to authenticate now (its budget is not spent): a look, which takes
    /// nothing from the budget, even for an instant (a login racing it for the address's last
    /// try gets it), and adds no address to the table. For checks that cannot be raced, which
    /// take no time between this and [`PerAddress::failed`], and for a look before a try.
    ///
    /// # Errors
    /// A 429 [`Refusal`] with `Retry-After`.
    pub fn may_try(&self, ip: IpAddr) -> Result<(), Refusal> {
        if let Some((networks, net)) = self.network_of(ip) {
            networks.may_try(net)?;
        }
        let (tokens, rate) = self.tokens_and_rate(ip, Instant::now());
        if tokens >= 1.0 {
            return Ok(());
        }
        let rate = rate.unwrap_or(1.0);
        Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            public: "too many failed attempts",
            detail: format!("client {} failed too often; slowed down", address_key(ip)),
            retry_after: Some(retry_after(tokens, rate)),
        })
    }

    /// The tokens in `ip`'s bucket now (refilled to now in the reckoning, not in the table; a
    /// full bucket for an address the table does not hold), read under one lock and changing
    /// nothing.
    pub fn tokens_of(&self, ip: IpAddr) -> f64 {
        let own = self.tokens_and_rate(ip, Instant::now()).0;
        match self.network_of(ip) {
            Some((networks, net)) => own.min(networks.tokens_of(net)),
            None => own,
        }
    }

    /// [`PerAddress::tokens_of`], with the rate they refill at: the shared budget's for an
    /// address that the table holds not and has no room for (see `in_budget`).
    fn tokens_and_rate(&self, ip: IpAddr, now: Instant) -> (f64, Option<f64>) {
        let key = address_key(ip);
        let table = self.lock();
        let (limits, burst, rate) = (table.limits, table.burst(), table.limits.rate);
        let refilled = |mut e: Entry| {
            Table::refill(limits, burst, &mut e, now);
            e.tokens
        };
        let tokens = match self.find(&table.slots, key).and_then(|i| table.slots[i]) {
            Some(e) => refilled(e),
            None => {
                // Whether a charge would find it a slot: an empty one, or one whose address is
                // back at nothing.
                let room = self
                    .candidates(key, table.slots.len())
                    .iter()
                    .any(|&i| table.slots[i].is_none_or(|e| e.sessions == 0 && refilled(e) >= burst));
                match room {
                    true => burst,
                    false => refilled(table.overflow[self.overflow_index(key)]),
                }
            }
        };
        (tokens, rate)
    }

    /// Counts a failed attempt from `ip` (charged as [`PerAddress::try_charge`] charges).
    pub fn failed(&self, ip: IpAddr) {
        self.failed_at(ip, Instant::now());
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) {
        self.in_budget(ip, now, |entry, _, _| entry.tokens = (entry.tokens - 1.0).max(0.0));
        if let Some((networks, net)) = self.network_of(ip) {
            networks.failed_at(net, now);
        }
    }

    /// Runs `f` on the budget of attempts of `ip`'s key: its own counters (see `in_table`), or,
    /// when every slot the key may take holds another live key, the budget such keys of its
    /// network share ([`Table::overflow`], refilled at the same rate, with the same burst). Not uncounted, as a
    /// session is (`with_entry`): a flood that keeps the table full of recent failures would
    /// otherwise let every further address guess unbraked. The shared budget fails closed for
    /// the addresses it holds while the flood lasts; once the table's entries are back at
    /// nothing (their buckets refilled), an address gets its own slot again. Logged, at most
    /// once a minute.
    fn in_budget<R>(&self, ip: IpAddr, now: Instant, f: impl FnOnce(&mut Entry, AddressLimits, f64) -> R) -> R {
        let key = address_key(ip);
        let mut table = self.lock();
        let (limits, burst) = (table.limits, table.burst());
        if let Some(i) = self.place(&mut table, key, now) {
            if let Some(entry) = table.slots[i].as_mut() {
                Table::refill(limits, burst, entry, now);
                return f(entry, limits, burst);
            }
        }
        let shared = &mut table.overflow[self.overflow_index(key)];
        Table::refill(limits, burst, shared, now);
        let r = f(shared, limits, burst);
        drop(table);
        self.overflowed(now, Overflow::Shared);
        r
    }

    /// Runs `f` on the counters of `ip`'s key (see `in_table`), for the sessions it counts (a
    /// budget of attempts is `in_budget`'s). `None` when every slot the key
    /// may take holds another live key: that takes more live addresses than the table has room
    /// for (a flood from a huge address space); the newcomer is then not counted, rather than
    /// counted with a stranger (which would let the flood lock out innocent clients), and the
    /// bridge's own caps (`max_connections`) still hold. Logged, at most once a minute.
    fn with_entry<R>(&self, ip: IpAddr, now: Instant, f: impl FnOnce(&mut Entry, AddressLimits, f64) -> R) -> Option<(IpAddr, R)> {
        let counted = self.in_table(ip, now, f);
        if counted.is_none() {
            self.overflowed(now, Overflow::Uncounted);
        }
        counted
    }

    /// The [`PROBES`] slots `key` may take in a table of `len` slots (a power of two).
    fn candidates(&self, key: IpAddr, len: usize) -> [usize; PROBES] {
        let mask = len - 1;
        let h = self.hasher.hash_one(key);
        // Double hashing: PROBES slots, a stride apart (odd, so every slot of the power-of-two
        // table can be reached).
        let (start, stride) = (h as usize, ((h >> 32) as usize) | 1);
        std::array::from_fn(|i| start.wrapping_add(i.wrapping_mul(stride)) & mask)
    }

    /// Runs `f` on the counters of `ip`'s key (the address; an IPv6 address's /64, since one
    /// host commonly holds a whole /64), refilled to `now`, and returns the key with `f`'s
    /// result. `f` also gets the limits and the bucket's size. `None` when every slot the key may
    /// take holds another live key.
    fn in_table<R>(&self, ip: IpAddr, now: Instant, f: impl FnOnce(&mut Entry, AddressLimits, f64) -> R) -> Option<(IpAddr, R)> {
        let key = address_key(ip);
        let mut table = self.lock();
        let (limits, burst) = (table.limits, table.burst());
        let index = self.place(&mut table, key, now)?;
        let entry = table.slots[index].as_mut()?;
        Table::refill(limits, burst, entry, now);
        Some((key, f(entry, limits, burst)))
    }

    /// The slot of `key`'s entry: the one holding it, or else the first of its candidates that
    /// is empty or whose address is back at nothing (no session, a full bucket), given a fresh
    /// entry. `None` when every candidate holds another live key.
    fn place(&self, table: &mut Table, key: IpAddr, now: Instant) -> Option<usize> {
        let (limits, burst) = (table.limits, table.burst());
        let slots = &mut table.slots;
        let candidates = self.candidates(key, slots.len());
        let refill = |e: &mut Entry| Table::refill(limits, burst, e, now);
        let mut found = None;
        let mut free = None;
        for &i in &candidates {
            match &mut slots[i] {
                Some(e) if e.key == key => {
                    found = Some(i);
                    break;
                }
                Some(e) => {
                    refill(e);
                    if free.is_none() && e.sessions == 0 && e.tokens >= burst {
                        free = Some(i);
                    }
                }
                None => {
                    if free.is_none() {
                        free = Some(i);
                    }
                }
            }
        }
        let index = match (found, free) {
            (Some(i), _) => i,
            (None, Some(i)) => {
                slots[i] = Some(Entry {
                    key,
                    sessions: 0,
                    tokens: burst,
                    refilled: now,
                });
                i
            }
            (None, None) => return None,
        };
        Some(index)
    }

    /// Which of [`Table::overflow`]'s budgets `key` shares: one chosen by its network (an IPv4
    /// /24, an IPv6 /48) under the table's keyed hash, so that a flood spends the budgets of
    /// its own networks (a /52 of IPv6 is one) and a newcomer from elsewhere most likely has one
    /// the flood does not touch.
    fn overflow_index(&self, key: IpAddr) -> usize {
        let network = match key {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & !0xff).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
        };
        (self.hasher.hash_one(network) % OVERFLOW_BUDGETS as u64) as usize
    }

    /// Logs that the table is full, at most once a minute.
    fn overflowed(&self, now: Instant, what: Overflow) {
        let mut last = self.overflow_logged.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60)) {
            *last = Some(now);
            let slots = self.lock().slots.len();
            match what {
                Overflow::Uncounted => tracing::warn!(
                    slots,
                    "the table of counts per client address is full of live addresses: new addresses go uncounted \
                     (a flood from very many addresses; max_connections still caps the whole)"
                ),
                Overflow::Shared => tracing::warn!(
                    slots,
                    "the table of failed attempts per client address is full of recent failures: new addresses' \
                     attempts share a budget per network, and are slowed down together (a flood of guesses from very many \
                     addresses)"
                ),
                Overflow::Refused => tracing::warn!(
                    slots,
                    "the table of places past max_connections_per_ip (agents' logins) is full of live addresses: \
                     new addresses over their cap are refused, agents' logins included (a flood from very many addresses)"
                ),
            }
        }
    }

    /// What is counted for `ip`'s key now (sessions, or connections): a look at its candidate
    /// slots only, where its entry is.
    pub fn sessions_of(&self, ip: IpAddr) -> u32 {
        let key = address_key(ip);
        let table = self.lock();
        self.find(&table.slots, key).and_then(|i| table.slots[i]).map_or(0, |e| e.sessions)
    }
}

/// Token lookups in flight per client address, each holding one try of the address's failure
/// budget until it ends (given back when the token was found). A handshake that finds the
/// budget spent while lookups from its address are still in flight waits for them to end
/// rather than being refused: many pages opened at once from one address (an office behind a
/// NAT, a dashboard of consoles) each hold a try while a remote source (Redis, an HTTP API)
/// answers, and valid tokens give theirs back. Guesses are refused as before: theirs are not
/// given back. Entries exist only while lookups are in flight.
#[derive(Debug, Default)]
pub struct Lookups {
    in_flight: std::sync::Mutex<HashMap<IpAddr, (usize, Arc<tokio::sync::Notify>)>>,
}

/// A lookup in flight ([`Lookups::begin`]); its end wakes the address's waiters.
#[derive(Debug)]
pub struct InFlight<'a> {
    lookups: &'a Lookups,
    key: IpAddr,
}

impl Lookups {
    /// Charges a lookup's try to `ip` in `failures` and counts it in flight, in one step (a
    /// handshake that looks in between sees either the try spent or the lookup in flight).
    ///
    /// # Errors
    /// The budget is spent: the brake's refusal, and what wakes when one of the address's
    /// lookups in flight ends (`None`: none is in flight, nothing to wait for).
    pub fn try_begin<'l>(&'l self, failures: &PerAddress, ip: IpAddr) -> Result<InFlight<'l>, (Refusal, Option<Arc<tokio::sync::Notify>>)> {
        let key = address_key(ip);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match failures.try_charge(ip) {
            Ok(()) => {
                in_flight.entry(key).or_insert_with(|| (0, Arc::default())).0 += 1;
                Ok(InFlight { lookups: self, key })
            }
            Err(r) => Err((r, in_flight.get(&key).map(|(_, notify)| notify.clone()))),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.lookups.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((count, notify)) = in_flight.get_mut(&self.key) {
            *count -= 1;
            notify.notify_waiters();
            if *count == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

/// Takes one attempt from `entry`'s budget (refilled already) for `key`, or the 429 saying when
/// the next comes; the budget may be one `key` shares (see `PerAddress::in_budget`), which the
/// refusal's detail says.
fn spend(entry: &mut Entry, limits: AddressLimits, key: IpAddr) -> Result<(), Refusal> {
    if entry.tokens < 1.0 {
        let shared = match entry.key == key {
            true => "",
            false => " (with the addresses the full table has no room for)",
        };
        return Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            public: "too many failed attempts",
            detail: format!("client {key} failed too often{shared}; slowed down"),
            retry_after: Some(retry_after(entry.tokens, limits.rate.unwrap_or(1.0))),
        });
    }
    entry.tokens -= 1.0;
    Ok(())
}

/// An IPv6 address's /48, the network a failed-attempt table's second budget counts (see
/// [`PerAddress::with_networks`]); an IPv4 address itself.
pub fn network_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 80) - 1))),
        v4 => v4,
    }
}

/// What a client past its address's cap on open connections reads (429).
pub const TOO_MANY_CONNECTIONS: &str = "too many connections from your address";
/// What a client past its address's cap on open sessions reads (429).
pub const TOO_MANY_SESSIONS: &str = "too many sessions from your address";

/// A client as a refusal's log line names it: its address, and for an IPv6 one the /64 it is
/// counted with (grepping the log for the client's address finds the line).
fn counted_as(ip: IpAddr, key: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V6(v6) => format!("{v6} (counted with its /64, {key}/64)"),
        v4 => v4.to_string(),
    }
}

/// What an address is counted as, here and wherever the per-address caps' unit matters (the
/// agents connected from an address): an IPv4 address (IPv4-mapped IPv6 included) itself, an
/// IPv6 address its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal's line names the client as the log's other lines do, and an IPv6 one's /64.
    #[test]
    fn a_refusal_names_the_client_and_its_counted_64() {
        let limits = AddressLimits {
            max_sessions: Some(1),
            rate: Some(0.001),
            burst: 2,
            connections: false,
        };
        let t = PerAddress::new(limits, 100);
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        let _held = t.enter(v6).unwrap();
        let said = t.enter("2001:db8::6".parse().unwrap()).unwrap_err().detail;
        assert_eq!(
            said,
            "client 2001:db8::6 (counted with its /64, 2001:db8::/64) has 1 sessions open (max 1 per address)"
        );
        let v4: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        drop(t.enter(v4).unwrap());
        drop(t.enter(v4).unwrap());
        let said = t.enter(v4).unwrap_err().detail;
        assert_eq!(said, "client 192.0.2.7 is over its rate of new sessions (0.001/s, burst 2)");
    }

    /// A client that takes a new IPv6 /64 for each guess (a tunnel broker's /48 holds 65,536)
    /// is held to its /48's budget: ten addresses' worth (an auth review guessed ~1,000 times a
    /// second so, against ten and one per 6 s for one address). Another /48, an IPv4 address,
    /// and the same /48 once its tries are given back (right credentials) are not slowed.
    #[test]
    fn new_64s_of_one_48_share_its_budget() {
        let own = AddressLimits {
            rate: Some(1.0 / 6.0),
            burst: 10,
            ..Default::default()
        };
        let networks = AddressLimits {
            rate: Some(10.0 / 6.0),
            burst: 100,
            ..Default::default()
        };
        let t = PerAddress::with_networks(own, 4096, networks);
        let now = Instant::now();
        let in_48 = |i: u32| -> IpAddr { format!("2001:db8:1:{i:x}::1").parse().unwrap() };
        for i in 0..100 {
            assert!(t.try_charge_at(in_48(i), now).is_ok(), "guess {i}");
        }
        let spent = t.try_charge_at(in_48(100), now).unwrap_err();
        assert_eq!(spent.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(t.may_try(in_48(101)).is_err() && t.tokens_of(in_48(101)) < 1.0);
        // Its own /64's budget was given back with the refusal: nothing charged there.
        let own_100 = address_key(in_48(100));
        assert!(t
            .lock()
            .slots
            .iter()
            .flatten()
            .filter(|e| e.key == own_100)
            .all(|e| e.tokens >= 10.0 - 1e-9));
        assert!(t.try_charge_at("2001:db8:2::1".parse().unwrap(), now).is_ok(), "another /48");
        assert!(t.try_charge_at("192.0.2.1".parse().unwrap(), now).is_ok(), "IPv4");
        // Right credentials give their tries back to both budgets, and their /64 is not slowed
        // by the spent /48 for a while (a review: a neighbour in the /48 spending it locked out
        // everyone there); other /64s of the /48 still are.
        t.proved(in_48(7));
        for _ in 0..5 {
            assert!(t.try_charge_at(in_48(7), now).is_ok());
            t.proved(in_48(7));
        }
        assert!(t.may_try(in_48(7)).is_ok());
        // The one try the first refund gave back to the /48, then no more.
        assert!(t.try_charge_at(in_48(500), now).is_ok());
        assert!(t.try_charge_at(in_48(501), now).is_err(), "a /64 that proved nothing");
        // One valid credential used from ever new /64s proves at most 16 of them (a review: each
        // would otherwise get its own budget past the /48's).
        let t = PerAddress::with_networks(own, 4096, networks);
        for i in 1000..1100 {
            assert!(t.try_charge_at(in_48(i), now).is_ok());
            t.proved(in_48(i));
        }
        assert_eq!(t.proven.lock().unwrap().len(), PROVEN_PER_NETWORK);
        t.proved("2001:db8:2::1".parse().unwrap());
        assert_eq!(t.proven.lock().unwrap().len(), PROVEN_PER_NETWORK + 1, "another /48's");
    }

    #[test]
    fn sessions_per_address_are_capped_and_given_back() {
        let t = PerAddress::new(
            AddressLimits {
                max_sessions: Some(2),
                ..Default::default()
            },
            0,
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = t.enter(a).unwrap();
        let _s2 = t.enter(a).unwrap();
        let r = t.enter(a).unwrap_err();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(r.retry_after.is_some());
        let _other = t.enter(b).unwrap();
        drop(s1);
        assert_eq!(t.sessions_of(a), 1);
        let _s3 = t.enter(a).unwrap();
    }

    #[test]
    fn new_sessions_per_address_follow_a_token_bucket() {
        let t = PerAddress::new(
            AddressLimits {
                rate: Some(2.0),
                burst: 3,
                ..Default::default()
            },
            0,
        );
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(t.enter_at(a, t0).unwrap());
        }
        let r = t.enter_at(a, t0).unwrap_err();
        assert_eq!(r.retry_after, Some(1));
        // Half a second later one token (2/s) has come back, and only one.
        let later = t0 + Duration::from_millis(500);
        drop(t.enter_at(a, later).unwrap());
        assert!(t.enter_at(a, later).is_err());
    }

    #[test]
    fn failures_are_forgiven_at_their_rate() {
        let t = PerAddress::new(
            AddressLimits {
                rate: Some(0.1),
                burst: 3,
                ..Default::default()
            },
            0,
        );
        let a: IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..3 {
            t.may_try(a).unwrap();
            t.failed(a);
        }
        let r = t.may_try(a).unwrap_err();
        assert_eq!((r.status, r.retry_after), (StatusCode::TOO_MANY_REQUESTS, Some(10)));
        assert!(t.may_try("192.0.2.10".parse().unwrap()).is_ok(), "other addresses are not slowed");
    }

    #[test]
    fn a_flood_of_addresses_keeps_the_table_bounded_and_locks_no_one_out() {
        let t = PerAddress::new(
            AddressLimits {
                max_sessions: Some(1),
                ..Default::default()
            },
            1024,
        );
        let mut held = Vec::new();
        for i in 0..5000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            // Past the table's room the newcomers go uncounted: admitted, not refused for a
            // stranger's count.
            held.push((ip, t.enter(ip).expect("a new address is never refused for another's count")));
        }
        assert_eq!(t.len(), 1024, "the table never grows");
        let counted: Vec<_> = held.iter().filter(|(_, s)| s.key.is_some()).map(|(ip, _)| *ip).collect();
        assert!(counted.len() > 900, "only {} of 1024 slots used", counted.len());
        // A counted address is still held to its cap.
        assert!(t.enter(counted[0]).is_err());
        drop(held);
        assert!(t.enter("192.0.2.200".parse().unwrap()).is_ok());
    }

    /// An allowance whose size the caller gives per address: counted and given back as the
    /// cap's places are, and refused, never given uncounted, when the table has no room.
    #[test]
    fn an_allowance_is_counted_up_to_the_size_given_and_fails_closed() {
        let t = PerAddress::new(AddressLimits::default(), 1024);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let first = t.enter_within(a, 2).unwrap();
        let _second = t.enter_within(a, 2).unwrap();
        assert!(t.enter_within(a, 2).is_none());
        let _third = t.enter_within(a, 3).expect("a larger allowance (more agents there)");
        drop(first);
        assert_eq!(t.sessions_of(a), 2);
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..5000u32 {
            match t.enter_within(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 1) {
                Some(s) => held.push(s),
                None => refused += 1,
            }
        }
        assert!(refused > 0, "the table filled up");
        assert!(held.iter().all(|s| s.key.is_some()), "nothing given uncounted");
    }

    /// A full table refuses an allowance past a cap (above) and says so, as it does when it lets
    /// newcomers in uncounted.
    #[test]
    fn a_full_table_refusing_an_allowance_is_logged() {
        let t = PerAddress::new(AddressLimits::default(), 1024);
        let mut held = Vec::new();
        let mut i = 0u32;
        while t.overflow_logged.lock().unwrap().is_none() {
            held.extend(t.enter_within(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 1));
            i += 1;
            assert!(i < 100_000, "never full");
        }
        assert!(held.len() < i as usize, "the newcomer that found it full was refused");
    }

    /// A look at an address's budget of attempts takes nothing from it, not even for an
    /// instant: a try racing the look for the address's last attempt always gets it. Nor does
    /// it add an address to the table.
    #[test]
    fn a_look_at_the_budget_takes_nothing_from_it() {
        let t = PerAddress::new(
            AddressLimits {
                rate: Some(1e-9),
                burst: 3,
                ..Default::default()
            },
            1024,
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..100 {
            t.may_try(a).unwrap();
        }
        assert!(t.lock().slots.iter().all(Option::is_none), "looking adds no address");
        t.failed(a);
        t.failed(a);
        assert!((t.tokens_of(a) - 1.0).abs() < 1e-3);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Err while the try below holds the attempt: this only looks.
                    let _ = t.may_try(a);
                }
            });
            // Counted, not asserted here: the looking thread must be stopped either way.
            let mut refused = 0;
            for _ in 0..100_000 {
                if t.try_charge(a).is_err() {
                    refused += 1;
                } else {
                    t.refund(a);
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(refused, 0, "the last attempt was taken by a look");
        });
        t.failed(a);
        let r = t.may_try(a).unwrap_err();
        assert_eq!((r.status, r.retry_after), (StatusCode::TOO_MANY_REQUESTS, Some(86_400)));
        assert!(t.tokens_of(a) < 1.0, "the look left it spent");
    }

    /// A table is rebuilt for another sizing only when the size would differ.
    #[test]
    fn a_reload_keeps_the_counts_under_new_limits_and_sizes() {
        let limits = |max: u32, rate: f64, burst: u32| AddressLimits {
            max_sessions: Some(max),
            rate: Some(rate),
            burst,
            connections: false,
        };
        let t = PerAddress::new(limits(5, 0.001, 10), 3000);
        assert_eq!(t.len(), 4096);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| t.enter(ip).unwrap()).collect();
        // Addresses that came and went are not carried into a new size.
        for i in 0..100u8 {
            drop(t.enter(IpAddr::from([198, 51, 100, i])).unwrap());
        }

        // A lower cap: the three open sessions count against it at once, and a smaller burst
        // leaves the bucket no more than it holds.
        t.reconfigure(limits(3, 0.001, 2), 3000);
        assert_eq!(t.sessions_of(ip), 3);
        let r = t.enter(ip).unwrap_err();
        assert!(r.detail.contains("has 3 sessions open (max 3"), "{}", r.detail);
        t.reconfigure(limits(10, 0.001, 2), 3000);
        let more: Vec<_> = (0..2).map(|_| t.enter(ip).unwrap()).collect();
        assert!(t.enter(ip).unwrap_err().detail.contains("over its rate"), "the burst of 2 is spent");

        // Resized both ways, counts and all; a session's place is given back where it moved.
        for len in [1 << 16, 1024] {
            t.reconfigure(limits(10, 0.001, 2), len);
            assert_eq!((t.len(), t.sessions_of(ip)), (len, 5));
            assert_eq!(t.lock().slots.iter().flatten().count(), 1, "only the live address moved");
        }
        drop(held);
        drop(more);
        assert_eq!(t.sessions_of(ip), 0);
    }

    /// A reload that makes a table smaller than its live addresses fit keeps its size: every
    /// address with sessions open stays counted, held to its cap, and gets its places back
    /// where they are (an entry dropped and made anew would be uncounted by the old sessions'
    /// ends, letting the address past its cap). Once they end, the table shrinks.
    #[test]
    fn a_reload_too_small_for_the_live_addresses_keeps_the_size() {
        let limits = AddressLimits {
            max_sessions: Some(2),
            ..Default::default()
        };
        let t = PerAddress::new(limits, 1 << 16);
        let ips: Vec<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let mut held: Vec<_> = ips.iter().map(|&ip| t.enter(ip).unwrap()).collect();
        assert!(held.iter().all(|s| s.key.is_some()), "all counted in the large table");

        t.reconfigure(limits, 1024);
        assert_eq!(t.len(), 1 << 16, "5,000 live addresses do not fit 1,024 slots");
        let counted: Vec<u32> = t.lock().slots.iter().flatten().map(|e| e.sessions).collect();
        assert_eq!(
            (counted.len(), counted.iter().sum()),
            (5000, 5000),
            "every address's session still counted"
        );
        // Each is held to its cap of 2 with the session from before, which gives its place back.
        for (ip, old) in ips.iter().zip(held.drain(..100)) {
            let new = t.enter(*ip).unwrap();
            assert!(t.enter(*ip).is_err(), "{ip}: a third session under a cap of 2");
            drop(old);
            assert_eq!(t.sessions_of(*ip), 1, "{ip}");
            let again = t.enter(*ip).unwrap();
            assert!(t.enter(*ip).is_err(), "{ip}: past its cap after the old session ended");
            drop((new, again));
        }
        drop(held);
        t.reconfigure(limits, 1024);
        assert_eq!(t.len(), 1024, "nothing live: the table shrinks");
    }

    /// A reload that drops the rate of new sessions (keeping the cap on sessions) leaves no
    /// bucket spent for good: with no rate to refill them, entries of addresses gone would hold
    /// their slots forever, and newcomers would go uncounted past their cap.
    #[test]
    fn a_reload_that_drops_the_rate_frees_the_slots_of_addresses_gone() {
        let capped = |rate: Option<f64>| AddressLimits {
            max_sessions: Some(1),
            rate,
            burst: 1,
            connections: false,
        };
        let t = PerAddress::new(capped(Some(1e-9)), 1024);
        // Addresses that came and went, each leaving its bucket spent, until one finds every
        // slot it may take held: it goes uncounted.
        let mut i = 0u32;
        let newcomer = loop {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if t.enter(ip).unwrap().key.is_none() {
                break ip;
            }
            i += 1;
            assert!(i < 100_000, "never full");
        };

        t.reconfigure(capped(None), 1024);
        let first = t.enter(newcomer).unwrap();
        assert!(first.key.is_some(), "counted");
        assert!(t.enter(newcomer).is_err(), "held to its cap of 1");
        drop(first);
        // And so is every address, after the reload, that the spent buckets would have shut out.
        let others: Vec<_> = (0..200u8).map(|i| IpAddr::from([198, 51, 100, i])).collect();
        let held: Vec<_> = others.iter().map(|&ip| t.enter(ip).unwrap()).collect();
        assert!(held.iter().all(|s| s.key.is_some()), "every newcomer counted");
    }

    /// A failure brake of 1,024 slots: two tries, one more a second.
    fn failure_table() -> Arc<PerAddress> {
        PerAddress::new(
            AddressLimits {
                rate: Some(1.0),
                burst: 2,
                ..Default::default()
            },
            1024,
        )
    }

    /// A flood of addresses that keeps the table full of recent failures does not let further
    /// addresses guess unbraked: those that find no slot share their network's budget, as
    /// braked as one address's. Once the flood's buckets have refilled, an address gets its own
    /// slot again.
    #[test]
    fn failures_from_addresses_the_full_table_has_no_room_for_are_braked_together() {
        let t = failure_table();
        let t0 = Instant::now();
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        // The flood: each address fails its two tries, until one finds every slot it may take
        // held by another's failures.
        let mut i = 0u32;
        let newcomer = loop {
            let a = ip(i);
            let charged = t.try_charge_at(a, t0).is_ok() && t.try_charge_at(a, t0).is_ok();
            if t.find(&t.lock().slots, address_key(a)).is_none() {
                assert!(charged, "the shared budget was full: {a}'s tries were its own");
                break a;
            }
            i += 1;
            assert!(i < 100_000, "never full");
        };
        let late = ip(i + 1);
        let braked = |a: IpAddr| (0..3).filter(|_| t.try_charge_at(a, t0).is_ok()).count();
        assert_eq!(braked(newcomer), 0, "no try past the shared budget");
        let r = t.try_charge_at(newcomer, t0).unwrap_err();
        assert!(r.detail.contains("the full table has no room for"), "{}", r.detail);
        assert_eq!(r.retry_after, Some(1));
        t.failed_at(newcomer, t0);
        assert!(t.tokens_and_rate(newcomer, t0).0 < 1.0, "the look sees the shared budget spent");

        // A second later the shared budget has one try again, and only one.
        let t1 = t0 + Duration::from_secs(1);
        assert!(t.try_charge_at(newcomer, t1).is_ok());
        assert!(t.try_charge_at(newcomer, t1).is_err());
        // Once the flood's failures are forgiven (2 s at 1/s), the newcomer has its own slot
        // and its own budget, and is not locked out.
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(t.tokens_and_rate(newcomer, t2).0, 2.0);
        assert!(t.try_charge_at(newcomer, t2).is_ok());
        assert!(t.find(&t.lock().slots, address_key(newcomer)).is_some(), "its own slot");
        assert!(t.try_charge_at(newcomer, t2).is_ok());
        assert!(t.try_charge_at(newcomer, t2).is_err(), "held to its own burst");
        assert!(t.try_charge_at(late, t2).is_ok(), "another address is not charged for it");
    }

    /// A flood from one IPv6 /48 (thousands of /64s) that fills the table spends the shared
    /// budget of its own network: newcomers from other networks that find no slot meanwhile
    /// still get their tries (from their networks' budgets), and the flood's next address none.
    #[test]
    fn a_flood_spends_the_shared_budget_of_its_network_only() {
        let t = failure_table();
        let now = Instant::now();
        let flood = |i: u32| IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xaaaa, i as u16, 0, 0, 0, 1));
        let own = |a: IpAddr| t.find(&t.lock().slots, address_key(a)).is_some();
        let mut overflowed = 0;
        for i in 0..u32::from(u16::MAX) {
            let a = flood(i);
            let _ = (t.try_charge_at(a, now), t.try_charge_at(a, now));
            overflowed += usize::from(!own(a));
            if overflowed >= 4 {
                break;
            }
        }
        assert!(overflowed >= 4, "the table never filled");
        // Newcomers from other /48s, each of a budget nobody has used yet (the flood's is used):
        // each that finds no slot is charged to its network's budget, and gets its try.
        let mut used = std::collections::HashSet::from([t.overflow_index(address_key(flood(0)))]);
        let mut served = 0;
        for j in 0..4096u16 {
            let a = IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xb000 + j, 1, 0, 0, 0, 1));
            if !used.insert(t.overflow_index(address_key(a))) {
                continue;
            }
            let tried = t.try_charge_at(a, now);
            if !own(a) {
                assert!(tried.is_ok(), "{a}: braked by another network's flood");
                served += 1;
            }
        }
        assert!(served > 0, "no newcomer found the table full");
        // The flood's own next address finds its network's budget spent.
        let next = (0..u32::from(u16::MAX)).rev().map(flood).find(|&a| {
            let tried = t.try_charge_at(a, now);
            !own(a) && tried.is_err()
        });
        assert!(next.is_some(), "the flood's network budget was not spent");
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let t = PerAddress::new(
            AddressLimits {
                max_sessions: Some(1),
                ..Default::default()
            },
            0,
        );
        let _a = t.enter("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(t.enter("2001:db8:1:2:ffff::9".parse().unwrap()).is_err(), "same /64");
        assert!(t.enter("2001:db8:1:3::1".parse().unwrap()).is_ok(), "another /64");
    }

    #[test]
    fn a_charge_is_taken_before_the_check_and_refunded_on_success() {
        let t = PerAddress::new(
            AddressLimits {
                rate: Some(1e-9),
                burst: 2,
                ..Default::default()
            },
            0,
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        // Two checks in flight at once spend the budget; a third waits for one to end.
        t.try_charge(a).unwrap();
        t.try_charge(a).unwrap();
        let r = t.try_charge(a).unwrap_err();
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        // A tiny rate's Retry-After is capped at a day (no overflow).
        assert_eq!(r.retry_after, Some(86_400));
        t.refund(a);
        t.try_charge(a).unwrap();
    }
}
