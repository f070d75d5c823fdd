//! Vessel's control plane: the Raft-replicated cluster state and the admin API server.
//!
//! - [`state`]: what the cluster knows, and the typed commands that change it.
//! - [`raft`]: the state replicated with openraft and stored in redb ([`raft::ControlPlane`]).
//! - [`node`]: a node's runtime: its pool, devices and servers kept in line with the state.
//! - [`api`]: the admin API's gRPC service over the node's operations.
//! - [`metrics`]: the Prometheus endpoint.

pub mod api;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod state;
