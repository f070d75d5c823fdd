//! Where an attached volume's I/O goes: the routing this node installs on the volumes it serves, built from each
//! extent's replica set in the Raft state and kept in step with it (a grown volume, a replica set that changed).
//!
//! A volume whose every extent lives on this node alone gets no routing: its I/O stays on the local fast path.

use std::sync::Arc;

use vstore::LocalVolume;
use vstore::remote::{RouteRun, Routes, Routing};

use super::LocalNode;
use crate::state::{ClusterState, Volume};

impl LocalNode {
    /// The routing `volume` needs on this node, or `None` when all its extents are here alone.
    fn routing_for(&self, state: &ClusterState, volume: &Volume) -> Option<Routes> {
        let me = self.control.node_id();
        let runs: Vec<RouteRun> = volume
            .placement
            .runs()
            .map(|(first, run)| RouteRun {
                first,
                count: run.count,
                epoch: run.replicas.epoch,
                nodes: run.replicas.nodes.clone(),
            })
            .collect();
        if runs.iter().all(|run| run.nodes == [me]) {
            return None;
        }
        for run in &runs {
            for node in &run.nodes {
                if let Some(address) = state.nodes.get(node).and_then(|n| n.address.as_deref()) {
                    self.peers.set_address(*node, address);
                }
            }
        }
        Some(Routes::new(runs))
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
        open.set_routing(routes.map(|routes| {
            Arc::new(Routing {
                me: self.control.node_id(),
                routes,
                peers: Arc::clone(&self.peers),
            })
        }));
    }

    /// Brings the routing of every volume served here in line with the state.
    pub(super) fn refresh_routing(&self) {
        let open = self.open_volumes();
        if open.is_empty() {
            return;
        }
        self.control.read(|state| {
            for volume in &open {
                if let Some(described) = state.volumes.get(&volume.id()) {
                    self.install_routing(state, described, volume);
                }
            }
        });
    }
}
