//! The replica side of the data path in the daemon: peers' data-frame connections arrive on the `--listen` port
//! beside the gRPC traffic and are told apart by their first bytes; each is served by [`vstore::replica`] against
//! this node's pool, fenced by the extent epochs of the Raft state.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use vessel_proto::frame::MAGIC;
use vstore::VolumeId;
use vstore::replica::{ReplicaDirectory, ReplicaGrant};

use super::LocalNode;
use super::ops::layout;
use super::reclaim::Stale;
use crate::raft::ControlPlane;

/// How long a new connection may take to send its first bytes before it is handed to gRPC as is.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// The Raft state's answer to "does this node hold that extent, at which epoch"; an extent whose stale copy is being
/// freed right now is refused (`NotReplica`: the sender tries again), see `reclaim`.
pub(crate) struct StateDirectory {
    control: ControlPlane,
    stale: Arc<Mutex<Stale>>,
}

impl ReplicaDirectory for StateDirectory {
    fn replica(&self, volume: VolumeId, extent: u64) -> Option<ReplicaGrant> {
        if self
            .stale
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_freeing(volume, extent)
        {
            return None;
        }
        let me = self.control.node_id();
        self.control.read(|state| {
            let volume = state.volumes.get(&volume)?;
            let replicas = volume.replica_set(extent)?;
            replicas.receives(me).then(|| ReplicaGrant {
                epoch: replicas.epoch,
                layout: layout(volume),
            })
        })
    }
}

/// Whether a fresh connection speaks the data-frame protocol (rather than HTTP/2): waits for its first four
/// bytes without consuming them.
pub(crate) async fn is_data_connection(stream: &TcpStream) -> bool {
    let mut first = [0u8; 4];
    let sniffed = tokio::time::timeout(SNIFF_TIMEOUT, async {
        loop {
            match stream.peek(&mut first).await {
                Ok(n) if n >= first.len() => return true,
                // Closed before four bytes, or an error: gRPC will find out.
                Ok(0) | Err(_) => return false,
                // Fewer bytes so far: wait for more to arrive.
                Ok(_) => {
                    if stream.readable().await.is_err() {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    })
    .await;
    sniffed == Ok(true) && first == MAGIC
}

impl LocalNode {
    /// Serves a peer's data connection on a thread of its own, until it closes. Refused (closed) while this node
    /// has no pool yet.
    pub(crate) fn serve_replica_connection(self: &Arc<Self>, stream: TcpStream) {
        let Some(pool) = self.pool().cloned() else {
            tracing::debug!("a data connection arrived before the pool is up; closing it");
            return;
        };
        let stream = match stream.into_std().and_then(|stream| {
            stream.set_nonblocking(false)?;
            Ok(stream)
        }) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot take over a data connection");
                return;
            }
        };
        let directory: Arc<dyn ReplicaDirectory> = Arc::new(StateDirectory {
            control: self.control.clone(),
            stale: Arc::clone(&self.stale),
        });
        let spawned = std::thread::Builder::new()
            .name("replica-conn".to_owned())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
                tracing::debug!(%peer, "serving a replica connection");
                let _ = vstore::replica::serve_connection(stream, pool, directory);
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a thread for a data connection");
        }
    }
}
