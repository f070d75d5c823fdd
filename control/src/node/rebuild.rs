//! Bringing replica sets back to full strength: after a failed replica was fenced off, the node that drives the
//! volume's rebuilds — the node it is attached on, or the Raft leader while it is detached — picks a target for each
//! run that lacks a replica (`StartRebuild`; the target takes the run's writes from the new epoch on) and copies the
//! rest to it with a [`vstore::rebuild::Copier`], extent by extent, from the run's healthy replicas in turn. Progress
//! is committed every [`PROGRESS_INTERVAL`] (a restarted driver resumes there; `volume show` shows it anywhere), and
//! `FinishRebuild` makes the target a healthy replica once everything is copied and flushed.
//!
//! A copy is fenced like any I/O: it carries the run's epoch, and anything that changes the set (a failure, the
//! volume changing hands) bumps the epoch, so a copier that lost its place is refused and stops; the next pass starts
//! a fresh one from the state.
//!
//! A node fenced off from a run that answers again within the catch-up window, without having rebooted, is made the
//! run's target and copies only what it missed ([`Scope::CatchUp`]): the regions the holder recorded in memory
//! (`vstore::remote::DirtyMaps`, 64 per extent) while it has served the volume since the node went away, else the
//! whole extents the cluster state recorded (`state::Missed`: the activity log at the drop and every extent entering
//! it since), which outlive the holder and seed its memory when it serves the volume again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use vstore::LocalVolume;
use vstore::activity::PersistError;
use vstore::rebuild::{Copier, Endpoint};

use super::LocalNode;
use super::ops::layout;
use crate::state::{Command, CommandError, NodeId, Volume, VolumeId};

/// How often the driver looks for work when nothing in the state changed.
const DRIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How often a copy commits its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a copy that failed waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Extents of one run copied at once (each lane reads from the run's healthy replicas in turn).
const LANES: usize = 4;
/// How long a copy waits for writes planned before it armed an extent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fenced-off replica node may stay away and still catch up by copying only what changed; after that a
/// run short of replicas is rebuilt wherever there is room.
const REPLACE_AFTER_SECS: i64 = crate::state::CATCH_UP_WINDOW_SECS;

/// One run's copy: which rebuild it serves (by epoch) and from where it resumes.
#[derive(Debug, Clone)]
struct CopyJob {
    volume: Volume,
    first: u64,
    epoch: u64,
    count: u64,
    copied: u64,
    targets: Vec<NodeId>,
    sources: Vec<NodeId>,
    /// Whether the volume is attached here (its device's writes must be guarded against).
    attached_here: bool,
}

/// How one run is copied: everything, or only what a returning node missed.
enum Scope {
    Full,
    /// What the node misses: this node's record in memory (regions of extents) when it has one for the run — the
    /// volume has been served here since the node was fenced off, or since the memory was seeded from the state's
    /// record — else the cluster state's record (whole extents).
    CatchUp {
        node: NodeId,
        memory: Option<Arc<vstore::remote::DirtyMaps>>,
    },
}

/// Copies running or failed lately, by (volume, first extent, epoch).
#[derive(Debug, Default)]
pub(super) struct Copies {
    running: std::collections::HashSet<(VolumeId, u64, u64)>,
    failed: HashMap<(VolumeId, u64, u64), Instant>,
}

/// Drives the rebuilds of the volumes this node is responsible for, whenever the state changes and every
/// [`DRIVE_INTERVAL`].
pub(super) async fn drive_rebuilds(node: Arc<LocalNode>) {
    let mut applied = node.control.subscribe();
    loop {
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(DRIVE_INTERVAL) => {}
        }
        node.drive_once().await;
    }
}

impl LocalNode {
    async fn drive_once(self: &Arc<Self>) {
        if self.pool().is_none() {
            return;
        }
        let me = self.control.node_id();
        let leader = self.control.raft_status().leader;
        let driven: Vec<(Volume, bool)> = self.control.read(|state| {
            state
                .volumes
                .values()
                .filter_map(|volume| match state.attachments.get(&volume.id) {
                    Some(attachment) if attachment.node == me => Some((volume.clone(), true)),
                    None if leader == Some(me) => Some((volume.clone(), false)),
                    _ => None,
                })
                .collect()
        });
        for (volume, attached_here) in driven {
            self.retire_drained(&volume).await;
            self.start_rebuilds(&volume).await;
            self.start_copies(volume.id, attached_here);
        }
    }

    /// Drops the replicas of `volume` on draining nodes once every run holding one has its full count elsewhere.
    async fn retire_drained(&self, volume: &Volume) {
        let retiring: Vec<NodeId> = self.control.read(|state| {
            let Some(described) = state.volumes.get(&volume.id) else {
                return Vec::new();
            };
            let mut draining: Vec<NodeId> = described
                .placement
                .runs()
                .flat_map(|(_, run)| run.replicas.nodes.clone())
                .filter(|node| state.is_draining(*node))
                .collect();
            draining.sort_unstable();
            draining.dedup();
            draining.retain(|node| {
                described
                    .placement
                    .runs()
                    .filter(|(_, run)| run.replicas.receives(*node))
                    .all(|(_, run)| {
                        run.replicas.rebuild.is_none()
                            && state.staying(&run.replicas) >= usize::from(described.replicas)
                    })
            });
            draining
        });
        let me = self.control.node_id();
        for node in retiring {
            let name = self.control.read(|state| state.node_label(node));
            let dropped = self
                .control
                .write(Command::DropReplica {
                    volume: volume.id,
                    node,
                    holder: me,
                })
                .await;
            match dropped {
                Ok(_) => {
                    tracing::info!(volume = %volume.name, node = %name, "replicas moved off a draining node")
                }
                Err(error) => {
                    tracing::debug!(volume = %volume.name, node = %name, %error, "cannot retire drained replicas yet")
                }
            }
        }
    }

    /// The record of what failed replicas of `volume` miss, if this node keeps one.
    fn dirty_if_any(&self, volume: VolumeId) -> Option<Arc<vstore::remote::DirtyMaps>> {
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&volume)
            .cloned()
    }

    /// Proposes a target for every run of `volume` that lacks replicas and has none being built: the node fenced off
    /// from it, if it answers again within [`REPLACE_AFTER`] (it catches up on what changed), else the candidate with
    /// the most room.
    async fn start_rebuilds(&self, volume: &Volume) {
        let me = self.control.node_id();
        // Each short run, with the nodes fenced off from it that may catch up (and since when).
        type Short = (u64, Vec<NodeId>, Vec<(NodeId, i64)>);
        let short: Vec<Short> = self.control.read(|state| {
            self.learn_addresses(state);
            volume
                .placement
                .runs()
                .filter(|(_, run)| {
                    run.replicas.rebuild.is_none()
                        && !run.replicas.nodes.is_empty()
                        && state.staying(&run.replicas) < usize::from(volume.replicas)
                })
                .map(|(first, _)| {
                    let away = state
                        .away_from_run(volume.id, first)
                        .map(|(node, missed)| (node, missed.since_unix))
                        .collect();
                    (first, state.rebuild_candidates(volume, first), away)
                })
                .collect()
        });
        let now = super::ops::now_unix();
        let mut targets = Vec::new();
        'runs: for (first, candidates, away) in short {
            for (node, since) in away {
                // Away too long, or no longer fit to hold replicas: the run is rebuilt elsewhere (which ends the
                // record in the state).
                if now - since >= REPLACE_AFTER_SECS || !candidates.contains(&node) {
                    continue;
                }
                let peers = Arc::clone(&self.peers);
                let back = tokio::task::spawn_blocking(move || peers.reachable(node))
                    .await
                    .unwrap_or(false);
                if back {
                    targets.push((first, node));
                }
                // Not back yet: the run waits for it rather than copying everything elsewhere.
                continue 'runs;
            }
            for candidate in candidates {
                let peers = Arc::clone(&self.peers);
                let reachable = candidate == me
                    || tokio::task::spawn_blocking(move || peers.reachable(candidate))
                        .await
                        .unwrap_or(false);
                if reachable {
                    targets.push((first, candidate));
                    break;
                }
            }
        }
        if targets.is_empty() {
            return;
        }
        let names = self.control.read(|state| {
            targets
                .iter()
                .map(|(first, node)| format!("extent {first} on {}", state.node_label(*node)))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let started = self
            .control
            .write(Command::StartRebuild {
                volume: volume.id,
                driver: me,
                targets,
                started_unix: super::ops::now_unix(),
            })
            .await;
        match started {
            Ok(_) => tracing::info!(volume = %volume.name, targets = %names, "rebuilding replicas"),
            Err(error) => {
                tracing::debug!(volume = %volume.name, %error, "cannot start a rebuild yet")
            }
        }
    }

    /// Starts a copier thread for every rebuild of the volume without one.
    fn start_copies(self: &Arc<Self>, id: VolumeId, attached_here: bool) {
        // Held until the copies are started: stale replicas are not freed meanwhile (see `reclaim`).
        let _gate = self
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let jobs: Vec<CopyJob> = self.control.read(|state| {
            let Some(volume) = state.volumes.get(&id) else {
                return Vec::new();
            };
            volume
                .placement
                .runs()
                .filter_map(|(first, run)| {
                    let rebuild = run.replicas.rebuild.as_ref()?;
                    Some(CopyJob {
                        volume: volume.clone(),
                        first,
                        epoch: run.replicas.epoch,
                        count: run.count,
                        copied: rebuild.copied_extents.min(run.count),
                        targets: rebuild.targets.clone(),
                        sources: run.replicas.nodes.clone(),
                        attached_here,
                    })
                })
                .collect()
        });
        for job in jobs {
            let key = (id, job.first, job.epoch);
            {
                let mut copies = self.copies.lock().unwrap_or_else(PoisonError::into_inner);
                if copies.running.contains(&key)
                    || copies
                        .failed
                        .get(&key)
                        .is_some_and(|at| at.elapsed() < RETRY_AFTER)
                {
                    continue;
                }
                copies.running.insert(key);
            }
            let node = Arc::clone(self);
            let handle = tokio::runtime::Handle::current();
            let spawned = std::thread::Builder::new()
                .name("rebuild".to_owned())
                .spawn(move || node.run_copy(&handle, &job));
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start a rebuild thread");
                self.copies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .running
                    .remove(&key);
            }
        }
    }

    fn run_copy(&self, handle: &tokio::runtime::Handle, job: &CopyJob) {
        let key = (job.volume.id, job.first, job.epoch);
        let started = Instant::now();
        let outcome = self.copy_run(handle, job);
        let mut copies = self.copies.lock().unwrap_or_else(PoisonError::into_inner);
        copies.running.remove(&key);
        match outcome {
            Ok(bytes) => {
                tracing::info!(volume = %job.volume.name, first_extent = job.first, bytes, seconds = started.elapsed().as_secs_f64(), extents = job.count - job.copied, "rebuild done");
            }
            Err(error) => {
                tracing::warn!(volume = %job.volume.name, first_extent = job.first, %error, "rebuild stopped; it resumes from its last progress");
                copies.failed.insert(key, Instant::now());
            }
        }
    }

    /// Whether the run's one target may catch up by copying only what it missed: the cluster state records what it
    /// misses of the run (it was fenced off from it, and came back within the catch-up window) and it has not
    /// rebooted meanwhile (it may have lost unflushed writes).
    fn scope(&self, job: &CopyJob) -> Scope {
        let memory = self.dirty_if_any(job.volume.id);
        let full = |why: &str| {
            if let (Some(memory), [target]) = (&memory, job.targets.as_slice()) {
                memory.forget_run(*target, job.first, job.count);
            }
            if !why.is_empty() {
                tracing::info!(volume = %job.volume.name, first_extent = job.first, "{why}: copying the whole run");
            }
            Scope::Full
        };
        let [target] = job.targets.as_slice() else {
            return full("");
        };
        let Some(boot_id) = self.control.read(|state| {
            state
                .missed_run(job.volume.id, *target, job.first)
                .map(|missed| missed.boot_id)
        }) else {
            return full("");
        };
        let now = self.peers.ping(*target);
        if now.is_none() || now != boot_id {
            return full("the returning node rebooted (or its boot id is unknown)");
        }
        let memory = memory.filter(|memory| {
            job.attached_here
                && memory
                    .get(*target)
                    .is_some_and(|missed| missed.runs.contains(&job.first))
        });
        Scope::CatchUp {
            node: *target,
            memory,
        }
    }

    /// The regions of `extent` a copy of `scope` must move. Read after the extent's older writes drained, so each of
    /// them is recorded by now: in memory, which has recorded every write since the node was fenced off (or since it
    /// was seeded from the state's record), else in the state's record (this node's own activity entries are applied
    /// here before their writes go out, and a restored attachment waited for the state to catch up first).
    fn regions(&self, job: &CopyJob, scope: &Scope, extent: u64) -> Result<u64, String> {
        let Scope::CatchUp { node, memory } = scope else {
            return Ok(u64::MAX);
        };
        if let Some(memory) = memory {
            return Ok(memory.regions(*node, extent));
        }
        let recorded = self.control.read(|state| {
            state
                .missed_run(job.volume.id, *node, job.first)
                .map(|missed| missed.extents.contains(&extent))
        });
        match recorded {
            Some(true) => Ok(u64::MAX),
            Some(false) => Ok(0),
            None => Err("the record of what the returning node missed is gone".to_owned()),
        }
    }

    /// Copies the rest of one run and finishes its rebuild; returns the bytes written to targets.
    fn copy_run(&self, handle: &tokio::runtime::Handle, job: &CopyJob) -> Result<u64, String> {
        let me = self.control.node_id();
        let scope = self.scope(job);
        let open: Arc<LocalVolume> = match self.open_volume_handle(job.volume.id) {
            Some(open) => open,
            None if job.attached_here => return Err("the volume is not open here".to_owned()),
            None => self
                .pool()
                .ok_or("no pool")?
                .open_volume(layout(&job.volume))
                .map_err(|error| error.to_string())?,
        };
        if job.attached_here {
            // The device's writes must reach the target before anything is copied.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !open.routing().is_some_and(|routing| {
                routing
                    .routes
                    .lookup(job.first)
                    .is_some_and(|run| run.epoch >= job.epoch)
            }) {
                if Instant::now() > deadline {
                    return Err("the device's routing did not catch up with the rebuild".to_owned());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let endpoint = |node: NodeId| -> Result<Endpoint, String> {
            if node == me {
                return Ok(Endpoint::Local);
            }
            let address = self
                .control
                .read(|state| state.nodes.get(&node).and_then(|n| n.address.clone()))
                .ok_or_else(|| format!("node {node} has no address"))?;
            Ok(Endpoint::Remote { node, address })
        };
        let targets = job
            .targets
            .iter()
            .map(|node| endpoint(*node))
            .collect::<Result<Vec<_>, _>>()?;
        let sources = job
            .sources
            .iter()
            .map(|node| endpoint(*node))
            .collect::<Result<Vec<_>, _>>()?;
        if sources.is_empty() {
            return Err("no healthy replica to copy from".to_owned());
        }
        let blocks = job.volume.extent_size / u64::from(job.volume.block_size);
        // Lane `l` copies extents copied + l, copied + l + LANES, ...; `next[l]` is the next it will copy, so every
        // extent below the smallest of them is done: the progress a restarted copy resumes from.
        let next: Vec<AtomicU64> = (0..LANES as u64)
            .map(|lane| AtomicU64::new(job.copied + lane))
            .collect();
        let failed = AtomicBool::new(false);
        let lane_rate = self.config.rebuild_rate / LANES as u64;
        let copy_lane = |lane: usize| -> Result<u64, String> {
            let mut copier =
                Copier::new(Arc::clone(&open), lane_rate).map_err(|error| error.to_string())?;
            let mut index = job.copied + lane as u64;
            while index < job.count && !failed.load(Ordering::Relaxed) {
                let extent = job.first + index;
                let source = &sources[(index as usize) % sources.len()];
                let guard = open.rebuild();
                let barrier = guard.arm(extent, blocks);
                let copied = if guard.wait_older_writes(barrier, DRAIN_TIMEOUT) {
                    self.regions(job, &scope, extent).and_then(|regions| {
                        copier
                            .copy_extent(extent, job.epoch, regions, source, &targets)
                            .map_err(|error| error.to_string())
                    })
                } else {
                    Err("writes in flight did not finish".to_owned())
                };
                guard.disarm(extent);
                if let Err(error) = copied {
                    failed.store(true, Ordering::Relaxed);
                    return Err(error);
                }
                index += LANES as u64;
                next[lane].store(index.min(job.count), Ordering::Relaxed);
            }
            copier
                .flush(job.first, job.epoch, &targets)
                .map_err(|error| error.to_string())?;
            Ok(copier.copied_bytes())
        };
        let copied: Result<u64, String> = std::thread::scope(|threads| {
            // Each lane holds a sender until it ends (returns or panics): the channel disconnects the
            // moment the last lane is done, and the copy is finished then, not at the next look.
            let (running, all_ended) = std::sync::mpsc::channel::<()>();
            let lanes: Vec<_> = (0..LANES)
                .map(|lane| {
                    let running = running.clone();
                    threads.spawn(move || {
                        let _running = running;
                        copy_lane(lane)
                    })
                })
                .collect();
            drop(running);
            let mut reported = Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                all_ended.recv_timeout(Duration::from_millis(100))
            {
                if reported.elapsed() < PROGRESS_INTERVAL || failed.load(Ordering::Relaxed) {
                    continue;
                }
                reported = Instant::now();
                let done = next
                    .iter()
                    .map(|n| n.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(job.copied);
                let progress = handle.block_on(self.control.write(Command::RebuildProgress {
                    volume: job.volume.id,
                    first_extent: job.first,
                    epoch: job.epoch,
                    copied_extents: done,
                    reported_unix: super::ops::now_unix(),
                }));
                if let Err(error) = progress {
                    failed.store(true, Ordering::Relaxed);
                    tracing::debug!(%error, "cannot record rebuild progress");
                }
            }
            lanes
                .into_iter()
                .map(|lane| {
                    lane.join()
                        .unwrap_or_else(|_| Err("a copy lane panicked".to_owned()))
                })
                .sum()
        });
        let copied = copied?;
        handle
            .block_on(self.control.write(Command::FinishRebuild {
                volume: job.volume.id,
                first_extent: job.first,
                epoch: job.epoch,
            }))
            .map_err(|error| format!("cannot finish: {error}"))?;
        if let Scope::CatchUp {
            node,
            memory: Some(memory),
        } = &scope
        {
            memory.forget_run(*node, job.first, job.count);
        }
        Ok(copied)
    }
}

/// How long an extent stays in the activity log after its last write.
const ACTIVITY_IDLE: Duration = Duration::from_secs(30);
/// How often the activity logs are swept.
const ACTIVITY_SWEEP: Duration = Duration::from_secs(10);
/// How long reconciling one extent keeps retrying (its replicas may still be applying the new epochs).
const RECONCILE_PATIENCE: Duration = Duration::from_secs(20);

/// Takes extents that went quiet out of the activity logs of the volumes served here.
pub(super) async fn sweep_activity(node: Arc<LocalNode>) {
    loop {
        tokio::time::sleep(ACTIVITY_SWEEP).await;
        for open in node.open_volumes() {
            if !open.activity().is_live() {
                continue;
            }
            let swept =
                tokio::task::spawn_blocking(move || open.activity().sweep(ACTIVITY_IDLE)).await;
            if let Ok(Err(error)) = swept {
                tracing::warn!(%error, "cannot shorten an activity log; retrying");
            }
        }
    }
}

impl LocalNode {
    /// Makes the activity log of `open` (a replicated volume served here) record its changes in the cluster state.
    pub(super) fn install_activity(&self, volume: &Volume, open: &LocalVolume, active: Vec<u64>) {
        if open.activity().is_live() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let control = self.control.clone();
        let (id, holder) = (volume.id, self.control.node_id());
        open.activity().install(
            Box::new(move |extents, active| {
                // A device starts serving just before its attachment is committed: a first write may race it.
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let recorded = handle.block_on(control.write(Command::Activity {
                        volume: id,
                        holder,
                        extents: extents.to_vec(),
                        active,
                    }));
                    match recorded {
                        Ok(_) => return Ok(()),
                        Err(crate::raft::ControlError::Rejected(CommandError::NotTheHolder {
                            ..
                        })) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        // No leader or no quorum: the write may wait for it (see `vstore::activity`).
                        Err(
                            error @ (crate::raft::ControlError::Unavailable(_)
                            | crate::raft::ControlError::NotLeader { .. }),
                        ) => {
                            return Err(PersistError::Unavailable(error.to_string()));
                        }
                        Err(error) => return Err(PersistError::Refused(error.to_string())),
                    }
                }
            }),
            active,
        );
    }

    /// Reconciles the extents in the activity log of `attachment` — writes may have been in flight there when its
    /// holder stopped — by copying each from one healthy replica to the others, then empties the log. Done before
    /// the volume is served again.
    pub(super) async fn reconcile(
        &self,
        volume: &Volume,
        attachment: &crate::state::Attachment,
    ) -> Result<(), super::OpError> {
        use super::{ErrorKind, OpError};
        if attachment.active.is_empty() {
            return Ok(());
        }
        let me = self.control.node_id();
        let pool = self
            .pool()
            .cloned()
            .ok_or_else(|| OpError::new(ErrorKind::FailedPrecondition, "no pool yet"))?;
        let open = pool
            .open_volume(layout(volume))
            .map_err(|error| OpError::new(ErrorKind::Internal, error.to_string()))?;
        // A replica that does not answer cannot be reconciled: it is fenced off first (and rebuilt in full when it
        // returns), or, if too few would remain, the volume is not served yet.
        let members: std::collections::BTreeSet<NodeId> = self.control.read(|state| {
            self.learn_addresses(state);
            state
                .volumes
                .get(&volume.id)
                .map_or_else(Default::default, |described| {
                    described
                        .placement
                        .runs()
                        .flat_map(|(_, run)| run.replicas.members().collect::<Vec<_>>())
                        .filter(|node| *node != me)
                        .collect()
                })
        });
        let dirty = self
            .control
            .read(|state| self.dirty_seeded(state, volume.id));
        for node in members {
            let peers = Arc::clone(&self.peers);
            let answers = tokio::task::spawn_blocking(move || peers.reachable(node))
                .await
                .unwrap_or(false);
            if !answers {
                let (name, held) = self
                    .control
                    .read(|state| (state.node_label(node), state.runs_held(volume.id, node)));
                // As when a write fails (see `routing`): the memory record first, then the state's. Writes may
                // have been in flight to it on every extent in the log.
                dirty.record_drop(
                    node,
                    held.iter().map(|(first, _)| *first),
                    self.peers.boot_id(node),
                );
                for (first, count) in &held {
                    for extent in attachment.active.range(*first..first + count) {
                        dirty.mark_extent(node, *extent);
                    }
                }
                self.control
                    .write(Command::DropFailedReplica {
                        volume: volume.id,
                        node,
                        holder: me,
                        since_unix: super::ops::now_unix(),
                        boot_id: self.peers.boot_id(node),
                    })
                    .await?;
                tracing::warn!(volume = %volume.name, node = %name, "replica node unreachable while reconciling; fenced it off");
            }
        }
        let mut jobs = Vec::new();
        self.control.read(|state| {
            self.learn_addresses(state);
            let described = state.volumes.get(&volume.id).unwrap_or(volume);
            for extent in &attachment.active {
                let Some(set) = described.replica_set(*extent) else {
                    continue;
                };
                let source = if set.contains(me) {
                    Some(me)
                } else {
                    set.nodes.first().copied()
                };
                let Some(source) = source else {
                    continue;
                };
                let endpoint = |node: NodeId| -> Option<Endpoint> {
                    if node == me {
                        return Some(Endpoint::Local);
                    }
                    let address = state.nodes.get(&node)?.address.clone()?;
                    Some(Endpoint::Remote { node, address })
                };
                let targets: Vec<Endpoint> = set
                    .members()
                    .filter(|node| *node != source)
                    .filter_map(endpoint)
                    .collect();
                if let Some(source) = endpoint(source)
                    && !targets.is_empty()
                {
                    jobs.push((*extent, set.epoch, source, targets));
                }
            }
        });
        let count = jobs.len();
        let copied = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let mut copier = Copier::new(open, 0).map_err(|error| error.to_string())?;
            for (extent, epoch, source, targets) in jobs {
                let deadline = Instant::now() + RECONCILE_PATIENCE;
                loop {
                    let done = copier
                        .copy_extent(extent, epoch, u64::MAX, &source, &targets)
                        .and_then(|()| copier.flush(extent, epoch, &targets));
                    match done {
                        Ok(()) => break,
                        Err(error) if Instant::now() >= deadline => {
                            return Err(format!("extent {extent}: {error}"));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            }
            Ok(copier.copied_bytes())
        })
        .await
        .map_err(|error| OpError::new(ErrorKind::Internal, error.to_string()))?
        .map_err(|error| {
            OpError::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot reconcile the replicas of volume '{}' where writes were in flight: {error}",
                    volume.name
                ),
            )
        })?;
        self.control
            .write(Command::Activity {
                volume: volume.id,
                holder: me,
                extents: attachment.active.iter().copied().collect(),
                active: false,
            })
            .await?;
        tracing::info!(volume = %volume.name, extents = count, bytes = copied, "reconciled the replicas of the extents writes were in flight on");
        Ok(())
    }
}
