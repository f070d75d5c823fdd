//! The activity log of a replicated volume served on this node (DRBD's idea): the extents it may have writes in
//! flight on, recorded durably — in the cluster state, by the control plane — before such a write goes out. If this
//! node crashes mid-write, a replica may hold a write its siblings lack; the extents in the log are reconciled among
//! their replicas before the volume is served again, so replicas never diverge.
//!
//! An extent enters the log on the first write to it and leaves it once it has been idle for a while (no write in
//! flight, none started lately), so a busy extent costs one record, not one per write. Entering and leaving are
//! persisted one at a time, in the order they were decided: an extent taken out of the log and written again at
//! once is recorded as active after its removal, never before.
//!
//! While the cluster state cannot be written (no quorum, or this node cut off from it), a write to an extent not in
//! the log waits — the volume's I/O pauses rather than fail — for as long as its caller lets it (`enter`'s
//! `keep_trying`: a queue worker, until it is told to stop, see [`crate::IoQueue::wait_for_the_cluster_until`]); a
//! refusal (this node no longer holds the volume) fails it at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Persists a change of the log: `(extents, active)`. Blocks until it is durable; an `Err` says why it is not.
pub type Persist = Box<dyn Fn(&[u64], bool) -> Result<(), PersistError> + Send + Sync>;

/// Why a change of the log was not persisted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The cluster state cannot be written now (no leader, no quorum): trying again later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The cluster state refused it (e.g. this node no longer holds the volume): it never will.
    #[error("{0}")]
    Refused(String),
}

/// How long a write that waits for the cluster state sleeps between attempts.
const RETRY_AFTER: Duration = Duration::from_millis(250);

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
    /// yet (blocking until that is durable). While the cluster state is unavailable it tries again as long as
    /// `keep_trying` says so. On `Err` nothing is counted and the write must not go out.
    pub(crate) fn enter(
        &self,
        extents: &[u64],
        keep_trying: &dyn Fn() -> bool,
    ) -> Result<(), String> {
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
        let mut waiting = false;
        loop {
            match persist(&fresh, true) {
                Ok(()) => break,
                Err(PersistError::Unavailable(reason)) if keep_trying() => {
                    if !waiting {
                        waiting = true;
                        tracing::warn!(%reason, extents = ?fresh, "cannot record a write in the activity log; it waits for the cluster state");
                    }
                    std::thread::sleep(RETRY_AFTER);
                }
                Err(error) => {
                    self.leave(extents);
                    return Err(error.to_string());
                }
            }
        }
        if waiting {
            tracing::info!(extents = ?fresh, "the activity log recorded the waiting write; it goes out");
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
            return Err(error.to_string());
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
        log.enter(&[1, 2], &|| false).unwrap();
        log.enter(&[2], &|| false).unwrap();
        log.enter(&[7], &|| false).unwrap();
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
        log.enter(&[1], &|| false).unwrap();
        assert!(log.active().is_empty(), "inert until installed");
        log.leave(&[1]);
        log.install(
            Box::new(|_, _| Err(PersistError::Unavailable("no quorum".to_owned()))),
            [],
        );
        assert_eq!(log.enter(&[3], &|| false).unwrap_err(), "no quorum");
        assert!(log.active().is_empty());
        assert!(lock(&log.state).in_flight.is_empty());
    }

    #[test]
    fn a_write_waits_while_the_cluster_state_is_unavailable_and_fails_when_refused() {
        let log = ActivityLog::default();
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        log.install(
            Box::new(move |extents, _| {
                match counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    0 | 1 => Err(PersistError::Unavailable("no leader".to_owned())),
                    _ if extents == [9] => Err(PersistError::Refused("not the holder".to_owned())),
                    _ => Ok(()),
                }
            }),
            [],
        );
        // Unavailable twice, then recorded: the write waited and goes out.
        log.enter(&[4], &|| true).unwrap();
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(log.active(), vec![4]);
        // A refusal is final, however long the caller would wait.
        assert_eq!(log.enter(&[9], &|| true).unwrap_err(), "not the holder");
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert!(!lock(&log.state).in_flight.contains_key(&9));
        // A caller that stops waiting (its worker is told to stop) gets the reason.
        attempts.store(0, std::sync::atomic::Ordering::SeqCst);
        let asked = std::sync::atomic::AtomicU32::new(0);
        let once = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        assert_eq!(log.enter(&[5], &once).unwrap_err(), "no leader");
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(!log.active().contains(&5));
    }
}
