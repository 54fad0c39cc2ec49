//! Counted caps: the connection limit and each route's `max_sessions`.
//!
//! The count lives apart from the cap, so a reload that changes a cap (or rebuilds the route
//! table) keeps counting the sessions that are already open: a cap lowered from 50 to 10 with 30
//! sessions live refuses new ones until fewer than 10 remain.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// How many slots are taken; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct Slots(Arc<AtomicUsize>);

impl Slots {
    /// Takes a slot if fewer than `max` are taken.
    pub fn try_take(&self, max: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.0.clone()))
    }

    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// A taken slot; given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A slot counted on its own, for unit tests.
    #[cfg(test)]
    pub fn alone() -> Slot {
        Slot(Arc::new(AtomicUsize::new(1)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection count and the cap in force, for a connection that leaves the count and comes
/// back to it: an agent's data link counts while it waits in its pool, not while it carries a
/// session, which its page's connection covers (as a forward session's covers its backend's).
#[derive(Debug)]
pub struct Recount {
    slots: OnceLock<Slots>,
    max: AtomicUsize,
}

impl Default for Recount {
    fn default() -> Recount {
        Recount {
            slots: OnceLock::new(),
            max: AtomicUsize::new(usize::MAX),
        }
    }
}

impl Recount {
    /// Counts in `slots` (the first call's; later calls change only the cap) up to `max`.
    pub fn count_in(&self, slots: &Slots, max: usize) {
        let _ = self.slots.set(slots.clone());
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes a slot if fewer than the cap are taken.
    pub fn try_take(&self) -> Option<Slot> {
        self.slots.get_or_init(Slots::default).try_take(self.max.load(Ordering::Relaxed))
    }

    /// Takes a slot for something that can do without (an agent's link beyond its pool, kept
    /// for the next burst) only while less than 90 % of the cap is taken: the last tenth is
    /// kept for the rest.
    pub fn try_take_spare(&self) -> Option<Slot> {
        let max = self.max.load(Ordering::Relaxed);
        self.slots.get_or_init(Slots::default).try_take(max.saturating_mul(9) / 10)
    }
}

/// A connection's place under `max_connections_per_ip`, given back on drop.
#[derive(Debug)]
pub enum Place {
    /// The cap is off.
    Uncounted,
    /// Counted under its address's cap.
    Counted(crate::policy::AddressSlot),
    /// Its address was over the cap: one of the few places past it where an agent may log in
    /// (the shop's pages behind one NAT fill the allowance, and its agent must still connect).
    /// Let in for an agent endpoint only; anything else gets this refusal once its request is
    /// read.
    AgentLogin(crate::policy::AddressSlot, crate::policy::Refusal),
}

/// What an accepted connection holds while it is open: its slot under `max_connections` and
/// its [`Place`] under `max_connections_per_ip`. Both are given back when the connection ends,
/// or when it becomes an agent's: see [`Held::into_agents`].
#[derive(Debug)]
pub struct Held {
    /// Before `connection`: dropped first, so that a connection seen gone under
    /// `max_connections` has given back its place too.
    place: Place,
    connection: Slot,
}

impl Held {
    /// A connection's slot and its place under its address's cap.
    pub fn new(connection: Slot, place: Place) -> Held {
        Held { connection, place }
    }

    /// The refusal a request that is not an agent's login gets ([`Place::AgentLogin`]).
    pub fn refusal(&self) -> Option<&crate::policy::Refusal> {
        match &self.place {
            Place::AgentLogin(_, refusal) => Some(refusal),
            Place::Uncounted | Place::Counted(_) => None,
        }
    }

    /// The connection proved an agent's secret: it gives back its place under (or past) its
    /// address's cap (the agents behind one NAT share it, and the registry bounds each agent's
    /// links) but stays a connection under `max_connections`: a control link for as long as
    /// it is open, a data link while it waits in its pool (each is a descriptor the open-file
    /// fit counts on).
    pub fn into_agents(self) -> Slot {
        self.connection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_against_the_cap_given_at_each_take() {
        let slots = Slots::default();
        let a = slots.try_take(2).unwrap();
        let b = slots.clone().try_take(2).unwrap();
        assert!(slots.try_take(2).is_none());
        // A lower cap (after a reload) counts the slots already taken.
        drop(a);
        assert!(slots.try_take(1).is_none());
        assert_eq!(slots.taken(), 1);
        drop(b);
        let _c = slots.try_take(1).unwrap();
        assert_eq!(slots.taken(), 1);
    }
}
