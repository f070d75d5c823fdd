//! Vessel's shared test harness: daemons, guests and clients for cross-crate tests and benchmarks.

pub mod bench;
pub mod blk_client;
pub mod daemon;
pub mod guest;
pub mod local_cluster;
pub mod namespaces;
pub mod net_driver;
pub mod netns;
