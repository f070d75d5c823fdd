//! Giving back disk space this node holds for nothing: the extents of volumes the cluster deleted, and those of
//! replicas this node no longer belongs to.
//!
//! A replica this node was fenced off from (it failed, was cut off, or was drained) stays on its disks for
//! [`NodeConfig::stale_replica_keep`](super::NodeConfig) after the node first sees itself out of the extent's replica
//! set — longer than the ten minutes a returning node may catch up in by copying only what it missed, for which it
//! needs that old copy — and is freed after that.
//!
//! Freeing an extent must not race with this node becoming its replica again (a rebuild onto it): a write that
//! lands between the check and the freeing would be lost. So the check is made again just before the freeing, with
//! (a) the extents being freed refused to peers (their requests get `NotReplica` and are retried, see
//! [`StateDirectory`](super::replica)), and (b) the `membership` gate held, which the local writers take while they
//! read the state they act on (a rebuild's copier starting, a device's routing being installed). A request that a
//! peer sent before (a) was checked against a state no newer than the re-check's: if that state made this node a
//! replica, the re-check finds it still one (or out again, when the write no longer matters here). Volumes attached
//! on this node are left alone until they are detached.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use vstore::{LocalPool, VolumeId};

use super::LocalNode;
use super::ops::layout;

/// How often the reclaimer looks again when nothing in the state changed (a deleted volume was still open, a stale
/// replica's time is not up yet).
const RECLAIM_RETRY: Duration = Duration::from_secs(10);

/// Keeps this node's disks free of deleted volumes' extents and of stale replicas: after every change of the
/// cluster state, and every [`RECLAIM_RETRY`].
pub(super) async fn reclaim_space(node: Arc<LocalNode>) {
    let mut applied = node.control.subscribe();
    loop {
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RECLAIM_RETRY) => {}
        }
        let Some(pool) = node.pool().cloned() else {
            continue;
        };
        let missing_disk = !node
            .unavailable_disks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if missing_disk {
            // The missing disk's slot tables are unknown: reclaim nothing (as at start-up).
            continue;
        }
        let reclaiming = Arc::clone(&node);
        // Freeing zeroes space on the disks: off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            reclaiming.reclaim_deleted(&pool);
            reclaiming.reclaim_stale(&pool);
        })
        .await;
    }
}

/// Replicas this node no longer belongs to, and since when it knows.
#[derive(Debug, Default)]
pub(super) struct Stale {
    since: HashMap<(VolumeId, u64), Instant>,
    /// Extents being freed right now: refused to peers.
    freeing: HashSet<(VolumeId, u64)>,
}

impl Stale {
    /// Whether a peer's request for this extent must wait (it is being freed).
    pub(super) fn is_freeing(&self, volume: VolumeId, extent: u64) -> bool {
        !self.freeing.is_empty() && self.freeing.contains(&(volume, extent))
    }
}

impl LocalNode {
    /// Frees, on this node's disks, the extents of volumes the cluster no longer has, wherever their deletion was
    /// sent. A volume still open here (a peer's connection used it a moment ago) is left for a later pass; any
    /// other failure is reported once.
    pub(super) fn reclaim_deleted(&self, pool: &LocalPool) {
        let on_disk = pool.volumes_on_disk();
        if on_disk.is_empty() {
            return;
        }
        let deleted: Vec<(VolumeId, u64)> = self.control.read(|state| {
            on_disk
                .into_iter()
                .filter(|(volume, _)| !state.volumes.contains_key(volume))
                .collect()
        });
        for (volume, extents) in deleted {
            match pool.delete_volume(volume) {
                Ok(_) => {
                    tracing::info!(volume = %volume, extents, "reclaimed the space of a deleted volume")
                }
                Err(vstore::StoreError::VolumeBusy { .. }) => {
                    tracing::debug!(volume = %volume, "deleted volume still open here; reclaiming it later")
                }
                Err(error) => {
                    let first = self
                        .reclaim_failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(volume);
                    if first {
                        self.warn(format!(
                            "cannot reclaim the space of deleted volume {volume}: {error}"
                        ));
                    }
                }
            }
        }
    }

    /// The extents of `volume` held in `pool` whose replica set does not include this node, unless the volume is
    /// attached here (or gone: [`Self::reclaim_deleted`] frees those).
    fn stale_extents(&self, pool: &LocalPool, volume: VolumeId) -> Vec<u64> {
        let held = pool.extents_of(volume);
        if held.is_empty() {
            return held;
        }
        let me = self.control.node_id();
        self.control.read(|state| {
            let Some(described) = state.volumes.get(&volume) else {
                return Vec::new();
            };
            if state.attachments.get(&volume).is_some_and(|a| a.node == me) {
                return Vec::new();
            }
            held.into_iter()
                .filter(|&extent| {
                    !described
                        .replica_set(extent)
                        .is_some_and(|set| set.receives(me))
                })
                .collect()
        })
    }

    /// Frees the replicas this node has been out of for at least `stale_replica_keep` (see the module docs).
    pub(super) fn reclaim_stale(&self, pool: &Arc<LocalPool>) {
        let keep = self.config.stale_replica_keep;
        let now = Instant::now();
        let mut due: HashMap<VolumeId, Vec<u64>> = HashMap::new();
        {
            let mut seen = HashSet::new();
            for (volume, _) in pool.volumes_on_disk() {
                for extent in self.stale_extents(pool, volume) {
                    seen.insert((volume, extent));
                }
            }
            let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
            stale.since.retain(|key, _| seen.contains(key));
            for key in seen {
                let since = *stale.since.entry(key).or_insert(now);
                if now.duration_since(since) >= keep {
                    due.entry(key.0).or_default().push(key.1);
                }
            }
        }
        for (volume, extents) in due {
            self.free_stale(pool, volume, &extents);
        }
    }

    /// Frees those of `extents` that are still stale, checked again behind the gates of the module docs.
    fn free_stale(&self, pool: &Arc<LocalPool>, volume: VolumeId, extents: &[u64]) {
        let _gate = self
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let freeing = |add: bool| {
            let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
            for &extent in extents {
                if add {
                    stale.freeing.insert((volume, extent));
                } else {
                    stale.freeing.remove(&(volume, extent));
                    stale.since.remove(&(volume, extent));
                }
            }
        };
        freeing(true);
        let still: HashSet<u64> = self.stale_extents(pool, volume).into_iter().collect();
        let confirmed: Vec<u64> = extents
            .iter()
            .copied()
            .filter(|extent| still.contains(extent))
            .collect();
        let described = self
            .control
            .read(|state| state.volumes.get(&volume).map(layout));
        let outcome = match described {
            Some(layout) if !confirmed.is_empty() => pool
                .open_volume(layout)
                .and_then(|open| open.release_extents(confirmed.iter().copied())),
            _ => Ok(0),
        };
        freeing(false);
        match outcome {
            Ok(0) => {}
            Ok(freed) => {
                tracing::info!(volume = %volume, extents = freed, "freed replicas this node no longer belongs to")
            }
            Err(error) => {
                tracing::warn!(volume = %volume, %error, "cannot free replicas this node no longer belongs to; trying again later")
            }
        }
    }
}
