//! The MAC table of one network: where each known MAC address lives.
//!
//! Two kinds of entry share the table:
//! - **static** entries come from the control plane (a local port's own MAC, a remote port's MAC
//!   at its node's VTEP). Learning never overrides them and aging never removes them; only the
//!   control plane does ([`MacTable::remove_static`], [`MacTable::forget`]).
//! - **learned** entries come from the source address of frames the switch forwards. Each one is
//!   refreshed by every frame from that MAC, moves when the MAC shows up somewhere else, and stops
//!   counting once it has not been seen for the aging time.
//!
//! Size limit policy: learned entries are capped; when the cap is reached a new MAC is *not*
//! learned (frames to it are flooded, as to any unknown MAC) and the refusal is counted. Existing
//! entries are never evicted to make room: a guest sending from thousands of forged MACs (on a port
//! that allows any MAC, or from the underlay) would otherwise flush everyone else's entries and
//! turn all unicast traffic of the network into floods. Room comes back as entries age out; when
//! full, the table sweeps aged entries at most once per [`FULL_SWEEP_INTERVAL`], so a flood of new
//! MACs costs no more than a lookup per frame. Static entries do not count against the cap (the
//! control plane bounds them).
//!
//! Time is passed in (`now`), never read here, so tests age entries without sleeping; instants
//! from different worker threads may arrive slightly out of order, which the table tolerates.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{Mac, PortId};

/// How long a learned entry lives without traffic from its MAC (the Linux bridge's and OVS's
/// default).
pub const DEFAULT_AGING: Duration = Duration::from_secs(300);
/// Learned entries per network.
pub const DEFAULT_LIMIT: usize = 8192;
/// A full table sweeps out aged entries at most this often.
pub const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Where frames to a MAC go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A port on this node.
    Port(PortId),
    /// A port behind another node's VTEP (its underlay address and VXLAN UDP port).
    Vtep(SocketAddr),
}

/// What [`MacTable::learn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    New,
    /// Already known at this location; its age is reset.
    Refreshed,
    /// Known elsewhere before; it now points here.
    Moved {
        from: Location,
    },
    /// A static entry holds the MAC; nothing changed.
    Static,
    /// The table is full of live learned entries; the MAC was not learned.
    Refused,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    location: Location,
    /// `None` for a static entry.
    last_seen: Option<Instant>,
}

/// One network's MAC table.
#[derive(Debug)]
pub struct MacTable {
    entries: HashMap<Mac, Entry>,
    limit: usize,
    aging: Duration,
    learned: usize,
    refused: u64,
    moves: u64,
    next_full_sweep: Option<Instant>,
}

impl MacTable {
    /// A table of at most `limit` learned entries, each forgotten after `aging` without traffic.
    pub fn new(limit: usize, aging: Duration) -> Self {
        MacTable {
            entries: HashMap::new(),
            limit,
            aging,
            learned: 0,
            refused: 0,
            moves: 0,
            next_full_sweep: None,
        }
    }

    fn is_live(&self, entry: &Entry, now: Instant) -> bool {
        entry
            .last_seen
            .is_none_or(|seen| now.saturating_duration_since(seen) < self.aging)
    }

    /// Records that a frame from `mac` arrived from `location` at `now`.
    pub fn learn(&mut self, mac: Mac, location: Location, now: Instant) -> Learned {
        if self.learned >= self.limit
            && !self.entries.contains_key(&mac)
            && self.next_full_sweep.is_none_or(|at| now >= at)
        {
            self.expire(now);
            self.next_full_sweep = Some(now + FULL_SWEEP_INTERVAL);
        }
        let aging = self.aging;
        match self.entries.entry(mac) {
            Slot::Occupied(mut slot) => {
                let entry = slot.get_mut();
                let Some(seen) = entry.last_seen else {
                    return Learned::Static;
                };
                let expired = now.saturating_duration_since(seen) >= aging;
                entry.last_seen = Some(seen.max(now));
                if entry.location == location {
                    return if expired {
                        Learned::New
                    } else {
                        Learned::Refreshed
                    };
                }
                let from = std::mem::replace(&mut entry.location, location);
                if expired {
                    Learned::New
                } else {
                    self.moves += 1;
                    Learned::Moved { from }
                }
            }
            Slot::Vacant(slot) => {
                if self.learned >= self.limit {
                    self.refused += 1;
                    return Learned::Refused;
                }
                slot.insert(Entry {
                    location,
                    last_seen: Some(now),
                });
                self.learned += 1;
                Learned::New
            }
        }
    }

    /// Where frames to `mac` go, if it is known and (when learned) not aged out.
    pub fn lookup(&self, mac: Mac, now: Instant) -> Option<Location> {
        let entry = self.entries.get(&mac)?;
        self.is_live(entry, now).then_some(entry.location)
    }

    /// Pins `mac` to `location` until [`MacTable::remove_static`]; replaces a learned entry.
    pub fn set_static(&mut self, mac: Mac, location: Location) {
        let old = self.entries.insert(
            mac,
            Entry {
                location,
                last_seen: None,
            },
        );
        if old.is_some_and(|old| old.last_seen.is_some()) {
            self.learned -= 1;
        }
    }

    /// Removes the static entry of `mac`; returns whether there was one (a learned entry stays).
    pub fn remove_static(&mut self, mac: Mac) -> bool {
        match self.entries.entry(mac) {
            Slot::Occupied(slot) if slot.get().last_seen.is_none() => {
                slot.remove();
                true
            }
            _ => false,
        }
    }

    /// Removes the entries that point at `location` (a port or VTEP that is gone): learned ones,
    /// and static ones too if `including_static`.
    pub fn forget(&mut self, location: Location, including_static: bool) {
        let mut learned = 0;
        self.entries.retain(|_, entry| {
            let learned_here = entry.last_seen.is_some();
            let keep = entry.location != location || !(learned_here || including_static);
            if !keep && learned_here {
                learned += 1;
            }
            keep
        });
        self.learned -= learned;
    }

    /// Removes learned entries not seen for the aging time; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let aging = self.aging;
        let before = self.entries.len();
        self.entries.retain(|_, entry| {
            entry
                .last_seen
                .is_none_or(|seen| now.saturating_duration_since(seen) < aging)
        });
        let removed = before - self.entries.len();
        self.learned -= removed;
        removed
    }

    /// Entries held, static and learned (aged entries count until swept by [`MacTable::expire`]).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Learned entries held.
    pub fn learned_len(&self) -> usize {
        self.learned
    }

    /// New MACs not learned because the table was full, since the table was made.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Learned MACs that moved to another location, since the table was made.
    pub fn moves(&self) -> u64 {
        self.moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGING: Duration = Duration::from_secs(300);

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    fn vtep(n: u8) -> Location {
        Location::Vtep(SocketAddr::from(([192, 0, 2, n], 4789)))
    }

    const P1: Location = Location::Port(PortId(1));
    const P2: Location = Location::Port(PortId(2));

    #[test]
    fn learns_refreshes_and_moves() {
        let t0 = Instant::now();
        let mut table = MacTable::new(16, AGING);
        assert_eq!(table.lookup(mac(1), t0), None);
        assert_eq!(table.learn(mac(1), P1, t0), Learned::New);
        assert_eq!(table.lookup(mac(1), t0), Some(P1));
        assert_eq!(table.learn(mac(1), P1, t0 + AGING / 2), Learned::Refreshed);
        // The refresh restarted the clock: still there past the first sighting's aging time.
        assert_eq!(table.lookup(mac(1), t0 + AGING), Some(P1));
        assert_eq!(
            table.learn(mac(1), vtep(7), t0 + AGING),
            Learned::Moved { from: P1 }
        );
        assert_eq!(table.lookup(mac(1), t0 + AGING), Some(vtep(7)));
        assert_eq!(
            table.learn(mac(1), P2, t0 + AGING),
            Learned::Moved { from: vtep(7) }
        );
        assert_eq!(table.lookup(mac(1), t0 + AGING), Some(P2));
        assert_eq!((table.len(), table.learned_len(), table.moves()), (1, 1, 2));
    }

    #[test]
    fn entries_age_out() {
        let t0 = Instant::now();
        let mut table = MacTable::new(16, AGING);
        table.learn(mac(1), P1, t0);
        table.learn(mac(2), P1, t0 + Duration::from_secs(100));
        let t1 = t0 + AGING;
        assert_eq!(
            table.lookup(mac(1), t1 - Duration::from_millis(1)),
            Some(P1)
        );
        assert_eq!(
            table.lookup(mac(1), t1),
            None,
            "aged out, although not swept yet"
        );
        assert_eq!(table.len(), 2);
        assert_eq!(table.expire(t1), 1);
        assert_eq!((table.len(), table.learned_len()), (1, 1));
        assert_eq!(table.lookup(mac(2), t1), Some(P1));
        // An aged entry seen again elsewhere is simply new there, not a move.
        assert_eq!(
            table.learn(mac(2), P2, t1 + Duration::from_secs(100)),
            Learned::New
        );
        assert_eq!(table.moves(), 0);
    }

    #[test]
    fn an_instant_from_the_past_does_not_rewind_an_entry() {
        let t0 = Instant::now();
        let mut table = MacTable::new(16, AGING);
        table.learn(mac(1), P1, t0 + Duration::from_secs(10));
        assert_eq!(table.learn(mac(1), P1, t0), Learned::Refreshed);
        assert_eq!(
            table.lookup(mac(1), t0 + AGING + Duration::from_secs(5)),
            Some(P1)
        );
    }

    #[test]
    fn static_entries_neither_move_nor_age() {
        let t0 = Instant::now();
        let mut table = MacTable::new(16, AGING);
        table.learn(mac(1), P1, t0);
        table.set_static(mac(1), vtep(3));
        table.set_static(mac(2), P2);
        assert_eq!(table.learned_len(), 0);
        assert_eq!(table.learn(mac(1), P1, t0), Learned::Static);
        assert_eq!(table.learn(mac(2), P1, t0), Learned::Static);
        let much_later = t0 + AGING * 100;
        assert_eq!(table.expire(much_later), 0);
        assert_eq!(table.lookup(mac(1), much_later), Some(vtep(3)));
        assert_eq!(table.lookup(mac(2), much_later), Some(P2));
        assert!(table.remove_static(mac(1)));
        assert!(!table.remove_static(mac(1)));
        assert_eq!(table.lookup(mac(1), much_later), None);
        // Removing a static entry leaves a learned one alone.
        table.learn(mac(3), P1, much_later);
        assert!(!table.remove_static(mac(3)));
        assert_eq!(table.lookup(mac(3), much_later), Some(P1));
    }

    #[test]
    fn a_full_table_refuses_new_macs_and_keeps_the_old() {
        let t0 = Instant::now();
        let mut table = MacTable::new(2, AGING);
        table.set_static(mac(100), P2);
        assert_eq!(table.learn(mac(1), P1, t0), Learned::New);
        assert_eq!(table.learn(mac(2), P1, t0), Learned::New);
        assert_eq!(table.learn(mac(3), P1, t0), Learned::Refused);
        assert_eq!(table.learn(mac(4), P1, t0), Learned::Refused);
        assert_eq!(table.refused(), 2);
        assert_eq!(table.lookup(mac(3), t0), None);
        assert_eq!(table.lookup(mac(1), t0), Some(P1));
        // Known MACs still refresh and move when full.
        assert_eq!(table.learn(mac(2), P2, t0), Learned::Moved { from: P1 });
        // Static entries come from the control plane and are not capped.
        table.set_static(mac(101), P2);
        assert_eq!(table.lookup(mac(101), t0), Some(P2));
        // Room comes back once entries age out, without an explicit sweep.
        let later = t0 + AGING;
        assert_eq!(table.learn(mac(3), P1, later), Learned::New);
        assert_eq!(table.lookup(mac(3), later), Some(P1));
        assert_eq!((table.learned_len(), table.len()), (1, 3));
    }

    #[test]
    fn a_full_table_sweeps_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut table = MacTable::new(2, AGING);
        table.learn(mac(1), P1, t0);
        table.learn(mac(2), P1, t0 + Duration::from_secs(2));
        let t1 = t0 + AGING - Duration::from_millis(500);
        assert_eq!(table.learn(mac(3), P1, t1), Learned::Refused); // swept, nothing aged yet
        // mac(1) has aged by now, but the last sweep was less than an interval ago.
        assert_eq!(
            table.learn(mac(3), P1, t1 + Duration::from_millis(600)),
            Learned::Refused
        );
        assert_eq!(
            table.learn(mac(3), P1, t1 + FULL_SWEEP_INTERVAL),
            Learned::New
        );
        assert_eq!(table.refused(), 2);
    }

    #[test]
    fn forgetting_a_location_removes_its_entries() {
        let t0 = Instant::now();
        let mut table = MacTable::new(16, AGING);
        table.learn(mac(1), P1, t0);
        table.learn(mac(2), P2, t0);
        table.set_static(mac(3), P1);
        table.learn(mac(4), vtep(1), t0);
        table.set_static(mac(5), vtep(1));
        table.forget(P1, true);
        assert_eq!(table.lookup(mac(1), t0), None);
        assert_eq!(table.lookup(mac(3), t0), None);
        assert_eq!(table.lookup(mac(2), t0), Some(P2));
        table.forget(vtep(1), false);
        assert_eq!(table.lookup(mac(4), t0), None);
        assert_eq!(
            table.lookup(mac(5), t0),
            Some(vtep(1)),
            "static entries stay"
        );
        assert_eq!((table.len(), table.learned_len()), (2, 1));
    }
}
