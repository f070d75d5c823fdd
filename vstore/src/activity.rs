//! The activity log of a replicated volume served on this node (DRBD's idea): the extents it may have writes in
//! flight on, recorded durably — in the cluster state, by the control plane — before such a write goes out. If this
//! node crashes mid-write, a replica may hold a write its siblings lack; the extents in the log are reconciled among
//! their replicas before the volume is served again, so replicas never diverge.
//!
//! An extent enters the log on the first write to it and leaves it once it has been idle for a while (no write in
//! flight, none started lately), so a busy extent costs one record, not one per write. Entering and leaving are
//! persisted one at a time, in the order they were decided: an extent taken out of the log and written again at
//! once is recorded as active after its removal, never before.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Persists a change of the log: `(extents, active)`. Blocks until it is durable; an `Err` says why it is not.
pub type Persist = Box<dyn Fn(&[u64], bool) -> Result<(), String> + Send + Sync>;

/// See the module docs. One per volume, inside [`crate::LocalVolume`]; inert until a [`Persist`] is installed.
#[derive(Default)]
pub struct ActivityLog {
    state: Mutex<State>,
    persist: RwLock<Option<Persist>>,
    /// Held while a change is persisted, so changes reach the cluster state in the order decided.
    persisting: Mutex<()>,
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("active", &lock(&self.state).active.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    active: HashSet<u64>,
    in_flight: HashMap<u64, u32>,
    last_write: HashMap<u64, Instant>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ActivityLog {
    /// Makes the log live: `persist` records its changes, `active` is what the cluster state holds now.
    pub fn install(&self, persist: Persist, active: impl IntoIterator<Item = u64>) {
        lock(&self.state).active = active.into_iter().collect();
        *self.persist.write().unwrap_or_else(PoisonError::into_inner) = Some(persist);
    }

    /// Whether a [`Persist`] is installed.
    pub fn is_live(&self) -> bool {
        self.persist
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The extents in the log.
    pub fn active(&self) -> Vec<u64> {
        let mut active: Vec<u64> = lock(&self.state).active.iter().copied().collect();
        active.sort_unstable();
        active
    }

    /// A write is about to go out to `extents`: counts it in flight there, and records the extents not in the log
    /// yet (blocking until that is durable). On `Err` nothing is counted and the write must not go out.
    pub(crate) fn enter(&self, extents: &[u64]) -> Result<(), String> {
        let now = Instant::now();
        let fresh: Vec<u64> = {
            let mut state = lock(&self.state);
            for extent in extents {
                *state.in_flight.entry(*extent).or_default() += 1;
                state.last_write.insert(*extent, now);
            }
            extents
                .iter()
                .copied()
                .filter(|extent| !state.active.contains(extent))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let persist = self.persist.read().unwrap_or_else(PoisonError::into_inner);
        let Some(persist) = persist.as_ref() else {
            return Ok(());
        };
        let _order = lock(&self.persisting);
        // Another writer may have recorded them meanwhile.
        let fresh: Vec<u64> = {
            let state = lock(&self.state);
            fresh
                .into_iter()
                .filter(|extent| !state.active.contains(extent))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        if let Err(error) = persist(&fresh, true) {
            self.leave(extents);
            return Err(error);
        }
        lock(&self.state).active.extend(fresh);
        Ok(())
    }

    /// A write counted by `enter` finished.
    pub(crate) fn leave(&self, extents: &[u64]) {
        let mut state = lock(&self.state);
        for extent in extents {
            if let Some(count) = state.in_flight.get_mut(extent) {
                *count -= 1;
                if *count == 0 {
                    state.in_flight.remove(extent);
                }
            }
        }
    }

    /// Takes the extents with no write in flight and none started for `idle` out of the log; returns how many.
    pub fn sweep(&self, idle: Duration) -> Result<usize, String> {
        let persist = self.persist.read().unwrap_or_else(PoisonError::into_inner);
        let Some(persist) = persist.as_ref() else {
            return Ok(0);
        };
        let _order = lock(&self.persisting);
        let quiet: Vec<u64> = {
            let mut state = lock(&self.state);
            let quiet: Vec<u64> = state
                .active
                .iter()
                .copied()
                .filter(|extent| {
                    !state.in_flight.contains_key(extent)
                        && state
                            .last_write
                            .get(extent)
                            .is_none_or(|at| at.elapsed() >= idle)
                })
                .collect();
            for extent in &quiet {
                state.active.remove(extent);
                state.last_write.remove(extent);
            }
            quiet
        };
        if quiet.is_empty() {
            return Ok(0);
        }
        if let Err(error) = persist(&quiet, false) {
            lock(&self.state).active.extend(quiet);
            return Err(error);
        }
        Ok(quiet.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The changes persisted so far: (extents, active).
    type Records = Arc<Mutex<Vec<(Vec<u64>, bool)>>>;

    fn recording() -> (ActivityLog, Records) {
        let log = ActivityLog::default();
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&records);
        log.install(
            Box::new(move |extents, active| {
                sink.lock().unwrap().push((extents.to_vec(), active));
                Ok(())
            }),
            [7],
        );
        (log, records)
    }

    #[test]
    fn an_extent_is_recorded_once_while_busy_and_leaves_when_idle() {
        let (log, records) = recording();
        log.enter(&[1, 2]).unwrap();
        log.enter(&[2]).unwrap();
        log.enter(&[7]).unwrap();
        assert_eq!(*records.lock().unwrap(), vec![(vec![1, 2], true)]);
        assert_eq!(log.active(), vec![1, 2, 7]);
        // Writes in flight keep an extent in; finished and quiet long enough, it leaves.
        log.leave(&[1, 2]);
        log.leave(&[7]);
        assert_eq!(log.sweep(Duration::ZERO).unwrap(), 2, "1 and 7 are quiet");
        assert_eq!(log.active(), vec![2]);
        log.leave(&[2]);
        assert_eq!(
            log.sweep(Duration::from_secs(3600)).unwrap(),
            0,
            "2 was written just now"
        );
        assert_eq!(log.sweep(Duration::ZERO).unwrap(), 1);
        assert!(log.active().is_empty());
        let last = records.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last, (vec![2], false));
    }

    #[test]
    fn a_write_that_cannot_be_recorded_is_refused_and_not_counted() {
        let log = ActivityLog::default();
        log.enter(&[1]).unwrap();
        assert!(log.active().is_empty(), "inert until installed");
        log.leave(&[1]);
        log.install(Box::new(|_, _| Err("no quorum".to_owned())), []);
        assert_eq!(log.enter(&[3]).unwrap_err(), "no quorum");
        assert!(log.active().is_empty());
        assert!(lock(&log.state).in_flight.is_empty());
    }
}
