//! Where an attached volume's I/O goes: the routing this node installs on the volumes it serves, built from each
//! extent's replica set in the Raft state and kept in step with it (a grown volume, a replica set that changed).
//!
//! A volume whose every extent lives on this node alone gets no routing: its I/O stays on the local fast path.
//!
//! Failover: a write that a replica fails (unreachable, timed out, refused) is held by the device's queue as a
//! [`Fault`], and [`settle_faults`] settles it. When the Raft state already answers — the replica set moved on to a
//! newer epoch without the node (`Dropped`: the write stands on the others) or with it (`Retry`), or this node no
//! longer holds the volume (`Fail`) — that is the answer. Otherwise this node, as the volume's holder, proposes
//! `DropReplica`, which fences the node off by bumping the epochs of its replica sets, and the write completes
//! once that is applied. When dropping would leave fewer than `min_replicas`, the writes wait (the volume pauses)
//! and the node is probed until it answers again; then they are sent to it again.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use vessel_proto::frame::Status;
use vstore::remote::{
    DirtyMaps, Fault, Faults, RemoteError, RouteRun, Routes, Routing, Settlement,
};
use vstore::{LocalVolume, VolumeId};

use super::LocalNode;
use crate::raft::ControlError;
use crate::state::{ClusterState, Command, CommandError, NodeId, Volume};

/// How often held faults are looked at again while they wait (a paused volume's probe interval).
const SETTLE_INTERVAL: Duration = Duration::from_millis(500);

impl LocalNode {
    /// The routing `volume` needs on this node, or `None` when all its extents are here alone.
    fn routing_for(&self, state: &ClusterState, volume: &Volume) -> Option<Routes> {
        let me = self.control.node_id();
        let tracked = self.dirty_seeded(state, volume.id).tracked();
        let runs: Vec<RouteRun> = volume
            .placement
            .runs()
            .map(|(first, run)| RouteRun {
                first,
                count: run.count,
                epoch: run.replicas.epoch,
                nodes: run.replicas.nodes.clone(),
                targets: run.replicas.targets().to_vec(),
                // Fenced-off nodes that may come back and catch up on what changed meanwhile.
                out: tracked
                    .iter()
                    .filter(|(node, dirty)| {
                        dirty.runs.contains(&first) && !run.replicas.receives(*node)
                    })
                    .map(|(node, _)| *node)
                    .collect(),
            })
            .collect();
        if runs
            .iter()
            .all(|run| run.nodes == [me] && run.targets.is_empty())
        {
            return None;
        }
        self.learn_addresses(state);
        Some(Routes::new(runs))
    }

    /// Tells the peer connections where every node listens.
    pub(super) fn learn_addresses(&self, state: &ClusterState) {
        for node in state.nodes.values() {
            if let Some(address) = &node.address {
                self.peers.set_address(node.id, address);
            }
        }
    }

    /// Installs on `open` the routing the state gives `volume`, if it changed.
    pub(super) fn install_routing(
        &self,
        state: &ClusterState,
        volume: &Volume,
        open: &LocalVolume,
    ) {
        let routes = self.routing_for(state, volume);
        let current = open.routing();
        if current.as_ref().map(|routing| &routing.routes) == routes.as_ref() {
            return;
        }
        tracing::debug!(volume = %volume.name, runs = routes.as_ref().map_or(0, |r| r.runs().len()), "routing installed");
        if routes.is_some() {
            let active = state
                .attachments
                .get(&volume.id)
                .filter(|a| a.node == self.control.node_id())
                .map(|a| a.active.iter().copied().collect())
                .unwrap_or_default();
            self.install_activity(volume, open, active);
        }
        let faults = routes.as_ref().map(|_| self.faults_of(volume.id));
        let dirty = routes.as_ref().map(|_| self.dirty_seeded(state, volume.id));
        open.set_routing(routes.map(|routes| {
            Arc::new(Routing {
                me: self.control.node_id(),
                routes,
                peers: Arc::clone(&self.peers),
                faults,
                dirty,
            })
        }));
    }

    /// What failed replicas of a volume served here miss; created on first use from the cluster state's record
    /// (whole extents) of what its fenced-off nodes miss — written before this process served the volume, maybe on
    /// another node — so that every write from now on is recorded on top of it. The only way the record is made,
    /// first when the volume's routing is installed, that is before it writes to any replica.
    pub(super) fn dirty_seeded(&self, state: &ClusterState, volume: VolumeId) -> Arc<DirtyMaps> {
        let mut maps = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(maps.entry(volume).or_insert_with(|| {
            let dirty = DirtyMaps::new();
            for (node, missed) in state.missed.get(&volume).into_iter().flatten() {
                dirty.record_drop(*node, missed.runs.iter().copied(), missed.boot_id);
                for extent in &missed.extents {
                    dirty.mark_extent(*node, *extent);
                }
            }
            dirty
        }))
    }

    /// Brings the routing of every volume served here in line with the state.
    pub(super) fn refresh_routing(&self) {
        let open = self.open_volumes();
        if open.is_empty() {
            return;
        }
        // Stale replicas are not freed while the devices learn where to write (see `reclaim`).
        let _gate = self
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.control.read(|state| {
            for volume in &open {
                if let Some(described) = state.volumes.get(&volume.id()) {
                    self.install_routing(state, described, volume);
                }
            }
        });
    }

    /// Stops serving the volumes whose attachment moved to another node (taken over while this node was cut off):
    /// their writes would be refused anyway (fenced by epoch), and the guest gets I/O errors rather than a hang.
    pub(super) fn stop_moved_volumes(&self) {
        // Not while an admin operation of this node runs: an attach serves the volume before its commit applies.
        let Ok(_guard) = self.writes.try_lock() else {
            return;
        };
        let me = self.control.node_id();
        let moved: Vec<Volume> = self.control.read(|state| {
            self.open_volumes()
                .iter()
                .filter(|open| {
                    state
                        .attachments
                        .get(&open.id())
                        .is_some_and(|attachment| attachment.node != me)
                })
                .filter_map(|open| state.volumes.get(&open.id()).cloned())
                .collect()
        });
        for volume in moved {
            tracing::warn!(volume = %volume.name, "the volume was taken over by another node; no longer serving it here");
            self.unserve(&volume);
        }
    }

    /// The faults desk of a volume served here, created on first use.
    fn faults_of(&self, volume: VolumeId) -> Arc<Faults> {
        let mut desks = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let signal = Arc::clone(&self.fault_signal);
        Arc::clone(
            desks
                .entry(volume)
                .or_insert_with(|| Faults::new(move || signal.notify_one())),
        )
    }

    /// Fails the writes of `volume` that wait for a replica (and any that would later): it stops being served
    /// here, and its device must be able to drain.
    pub(super) fn close_faults(&self, volume: VolumeId, reason: &str) {
        // Whoever serves it next has no record of what failed replicas miss: they get full copies.
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&volume);
        let desk = self
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&volume);
        if let Some(desk) = desk {
            desk.close(reason);
        }
    }

    /// [`LocalNode::close_faults`] for every volume (daemon shutdown).
    pub(super) fn close_all_faults(&self, reason: &str) {
        let desks: Vec<Arc<Faults>> = self
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, desk)| desk)
            .collect();
        for desk in desks {
            desk.close(reason);
        }
    }

    /// Settles what it can of `volume`'s held faults; see the module docs.
    async fn settle_volume(&self, volume: VolumeId, desk: &Arc<Faults>) {
        let me = self.control.node_id();
        self.control
            .read(|state| desk.settle(|fault| decide(state, volume, me, fault)));
        // Faults the state does not answer yet: the failed nodes must be fenced off.
        let failed: BTreeSet<NodeId> = desk
            .pending()
            .iter()
            .filter(|fault| needs_drop(fault))
            .map(|fault| fault.node)
            .collect();
        for node in failed {
            let name = self.control.read(|state| state.node_label(node));
            // Where it held complete replicas, it misses only what is written from now on (and the failed writes,
            // already recorded): remembered before the drop makes the routing record them.
            let held: Vec<u64> = self.control.read(|state| {
                state
                    .runs_held(volume, node)
                    .into_iter()
                    .map(|(first, _)| first)
                    .collect()
            });
            let boot_id = self.peers.boot_id(node);
            self.control
                .read(|state| self.dirty_seeded(state, volume))
                .record_drop(node, held, boot_id);
            // The state keeps its own, coarser record, which outlives this process (see `state::Missed`).
            let dropped = self
                .control
                .write(Command::DropFailedReplica {
                    volume,
                    node,
                    holder: me,
                    since_unix: super::ops::now_unix(),
                    boot_id,
                })
                .await;
            match dropped {
                Ok(_) => tracing::warn!(
                    %volume, node = %name,
                    "replica node failed; fenced it off (new epoch), writes go on with the other replicas"
                ),
                Err(ControlError::Rejected(CommandError::TooFewReplicas { .. })) => {
                    let peers = Arc::clone(&self.peers);
                    let back = tokio::task::spawn_blocking(move || peers.reachable(node))
                        .await
                        .unwrap_or(false);
                    if back {
                        tracing::info!(%volume, node = %name, "replica node reachable again; resending the writes that waited for it");
                        self.control.read(|state| {
                            desk.settle(|fault| {
                                (fault.node == node)
                                    .then(|| state.volumes.get(&volume)?.replica_set(fault.extent))
                                    .flatten()
                                    .map(|set| Settlement::Retry { epoch: set.epoch })
                            })
                        });
                    } else {
                        tracing::warn!(%volume, node = %name, "replica node unreachable and the volume has no replica to spare: its writes wait");
                    }
                }
                Err(error) => {
                    tracing::warn!(%volume, node = %name, %error, "cannot fence off a failed replica yet; retrying")
                }
            }
        }
        self.control
            .read(|state| desk.settle(|fault| decide(state, volume, me, fault)));
    }
}

/// Whether settling `fault` takes fencing its node off: not when the node only lags behind the state
/// (`NotReplica`) or this node does (`StaleEpoch`).
fn needs_drop(fault: &Fault) -> bool {
    !matches!(
        fault.error,
        RemoteError::Refused {
            status: Status::NotReplica | Status::StaleEpoch,
            ..
        }
    )
}

/// What the Raft state says about a held fault, if anything yet.
fn decide(state: &ClusterState, volume: VolumeId, me: NodeId, fault: &Fault) -> Option<Settlement> {
    let Some(described) = state.volumes.get(&volume) else {
        return Some(Settlement::Fail("the volume was deleted".to_owned()));
    };
    if state.attachments.get(&volume).map(|a| a.node) != Some(me) {
        return Some(Settlement::Fail(format!(
            "volume '{}' is no longer attached on this node",
            described.name
        )));
    }
    let Some(set) = described.replica_set(fault.extent) else {
        return Some(Settlement::Fail(format!(
            "extent {} of volume '{}' has no replica set",
            fault.extent, described.name
        )));
    };
    if set.epoch > fault.epoch {
        return Some(if set.contains(fault.node) {
            Settlement::Retry { epoch: set.epoch }
        } else {
            Settlement::Dropped
        });
    }
    match fault.error {
        // The replica has not applied the set yet: try again (one settle interval later).
        RemoteError::Refused {
            status: Status::NotReplica,
            ..
        } => Some(Settlement::Retry { epoch: set.epoch }),
        _ => None,
    }
}

/// Settles held faults whenever one arrives, and every [`SETTLE_INTERVAL`] while any wait.
pub(super) async fn settle_faults(node: Arc<LocalNode>) {
    loop {
        tokio::select! {
            () = node.fault_signal.notified() => {}
            () = tokio::time::sleep(SETTLE_INTERVAL) => {}
        }
        let desks: Vec<(VolumeId, Arc<Faults>)> = node
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(volume, desk)| (*volume, Arc::clone(desk)))
            .collect();
        for (volume, desk) in desks {
            if !desk.pending().is_empty() {
                node.settle_volume(volume, &desk).await;
            }
        }
    }
}
