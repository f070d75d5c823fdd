//! Bringing a node up and down: the data-directory lock, the cluster state, the local pool, the restored
//! attachments, the admin and metrics servers, and the shutdown that leaves guests waiting to reconnect.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_stream::wrappers::UnixListenerStream;
use vstore::LocalPool;

use super::ops::{ErrorKind, OpError};
use super::{DeviceHost, LocalNode, NodeConfig};
use crate::raft::{ControlError, ControlPlane};
use crate::state::{Command, CommandError, Disk, Node, NodeState, Settings};

/// Why a node could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} is in use by another vesseld; stop it first or give --data-dir")]
    Locked { path: PathBuf },
    #[error("cannot open the cluster state: {0}")]
    Control(#[from] ControlError),
    #[error("cannot bring the node up: {0}")]
    Op(#[from] OpError),
    #[error("cannot listen on {what} {address}: {source}")]
    Listen {
        what: &'static str,
        address: String,
        source: std::io::Error,
    },
    #[error("the admin API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the node until `shutdown` resolves.
pub async fn run_node(
    config: NodeConfig,
    devices: Arc<dyn DeviceHost>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let _lock = lock_data_dir(&config.data_dir)?;
    let advertise = config.listen.map(|address| address.to_string());
    let control = ControlPlane::open(&config.data_dir, advertise).await?;
    let node = Arc::new(LocalNode::new(config, control, devices));
    let reporting = Arc::downgrade(&node);
    node.control.set_reporter(Arc::new(move || {
        reporting
            .upgrade()
            .map(|node| node.local_report())
            .unwrap_or_default()
    }));
    tracing::info!(node = node.control.node_id(), data_dir = %node.config.data_dir.display(), "vesseld starting");

    if node.config.standalone() {
        node.start_up().await?;
    }
    let reclaimer = tokio::spawn(super::reclaim::reclaim_space(Arc::clone(&node)));
    let router = tokio::spawn(follow_routing(Arc::clone(&node)));
    let settler = tokio::spawn(super::routing::settle_faults(Arc::clone(&node)));
    let rebuilder = tokio::spawn(super::rebuild::drive_rebuilds(Arc::clone(&node)));
    let sweeper = tokio::spawn(super::rebuild::sweep_activity(Arc::clone(&node)));
    let switcher = tokio::spawn(super::switch::follow_networks(Arc::clone(&node)));
    let (stop_servers, servers_stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let admin = crate::api::admin_service(Arc::clone(&node));
    let unix = bind_admin_socket(&node.config.admin_socket)?;
    servers.spawn(
        tonic::transport::Server::builder()
            .add_service(admin.clone())
            .add_service(node.control.raft_service())
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(unix),
                stopped(servers_stopped.clone()),
            ),
    );
    if let Some(address) = node.config.listen {
        let tcp = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| NodeError::Listen {
                what: "the admin/peer address",
                address: address.to_string(),
                source,
            })?;
        tracing::info!(%address, "admin API and peer traffic on TCP");
        // One port for everything: data-frame connections go to the replica service, the rest to gRPC.
        let (grpc_connections, incoming) = tokio::sync::mpsc::channel(64);
        servers.spawn(accept(
            tcp,
            Arc::clone(&node),
            grpc_connections,
            stopped(servers_stopped.clone()),
        ));
        servers.spawn(
            tonic::transport::Server::builder()
                .add_service(admin)
                .add_service(node.control.raft_service())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(incoming),
                    stopped(servers_stopped.clone()),
                ),
        );
    }
    if let Some(address) = node.config.metrics {
        let render_node = Arc::clone(&node);
        let bound = crate::metrics::serve(
            address,
            Arc::new(move || crate::metrics::render(&render_node)),
        )
        .await
        .map_err(|source| NodeError::Listen {
            what: "the metrics address",
            address: address.to_string(),
            source,
        })?;
        tracing::info!(address = %bound, "Prometheus metrics on /metrics");
        let record = node.config.data_dir.join("metrics.addr");
        if let Err(error) = std::fs::write(&record, format!("{bound}\n")) {
            tracing::warn!(path = %record.display(), %error, "cannot record the metrics address");
        }
    }
    // A --listen node is activated once its servers run: it must take part in Raft (vote, hear the leader) to learn
    // how current its state is before it restores its attachments. A self-initialising node is complete before it
    // answers at all.
    if !node.config.standalone() {
        node.start_up().await?;
    }
    tracing::info!(socket = %node.config.admin_socket.display(), "admin API ready");

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(result) = servers.join_next() => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(NodeError::Serve(error)),
            Err(panic) => Err(NodeError::Op(OpError::new(ErrorKind::Internal, format!("admin server task: {panic}")))),
        },
    };
    let _ = stop_servers.send(true);
    reclaimer.abort();
    router.abort();
    settler.abort();
    rebuilder.abort();
    sweeper.abort();
    switcher.abort();
    while servers.join_next().await.is_some() {}
    // Devices stop without a Detach: the attachments stay in the state and come back at the next start. Writes
    // waiting for a failed replica cannot be settled any more: they fail, so that the devices can stop.
    node.close_all_faults("the daemon is shutting down");
    node.devices.detach_all();
    let _ = std::fs::remove_file(&node.config.admin_socket);
    if let Err(error) = node.control.shutdown().await {
        tracing::warn!(%error, "Raft did not shut down cleanly");
    }
    tracing::info!("vesseld stopped");
    outcome
}

/// Accepts TCP connections on the --listen address until `stop`, sorting them by their first bytes: data frames
/// to the replica service, everything else to the gRPC server behind `grpc`.
async fn accept(
    listener: tokio::net::TcpListener,
    node: Arc<LocalNode>,
    grpc: tokio::sync::mpsc::Sender<std::io::Result<tokio::net::TcpStream>>,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "cannot accept a TCP connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (node, grpc) = (Arc::clone(&node), grpc.clone());
        tokio::spawn(async move {
            if super::replica::is_data_connection(&stream).await {
                node.serve_replica_connection(stream);
            } else {
                let _ = grpc.send(Ok(stream)).await;
            }
        });
    }
}

/// Keeps the routing of the volumes served here in step with the cluster state.
async fn follow_routing(node: Arc<LocalNode>) {
    let mut applied = node.control.subscribe();
    loop {
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            // A volume taken over elsewhere is also let go when nothing else changes (see stop_moved_volumes).
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
        node.refresh_routing();
        let stopping = Arc::clone(&node);
        let _ = tokio::task::spawn_blocking(move || stopping.stop_moved_volumes()).await;
        // Held writes may wait for exactly this change (a replica set's new epoch).
        node.fault_signal.notify_one();
    }
}

async fn stopped(mut signal: tokio::sync::watch::Receiver<bool>) {
    while !*signal.borrow_and_update() {
        if signal.changed().await.is_err() {
            return;
        }
    }
}

/// One daemon per data directory: a second one would corrupt the state and the disks.
fn lock_data_dir(dir: &Path) -> Result<File, NodeError> {
    let data_dir_error = |source| NodeError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(data_dir_error)?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(data_dir_error)?;
    // SAFETY: flock(2) on a descriptor this function owns; no memory is passed.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(NodeError::Locked {
            path: dir.to_path_buf(),
        });
    }
    Ok(lock)
}

/// The admin socket is root's alone (mode 0600); a stale one from a killed daemon is replaced.
fn bind_admin_socket(path: &Path) -> Result<tokio::net::UnixListener, NodeError> {
    let listen_error = |source| NodeError::Listen {
        what: "the admin socket",
        address: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(listen_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(listen_error(error)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    Ok(listener)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// How long a disk may stay locked by a previous daemon at start-up. A SIGKILLed vesseld's io_uring instances
/// are torn down by the kernel after the process is gone, and the disk's lock goes with its last file reference.
const DISK_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl LocalNode {
    /// Makes this node the first member of a new cluster; `Ok(false)` if it already is a member.
    pub(super) async fn initialize_cluster(&self) -> Result<bool, OpError> {
        if self.control.is_initialized() {
            return Ok(false);
        }
        let settings = Settings {
            extent_size: self.config.extent_size,
            overcommit_ratio_milli: self.config.overcommit_ratio_milli,
            ..Settings::default()
        };
        let node = Node {
            id: self.control.node_id(),
            name: self.config.name.clone().unwrap_or_else(host_name),
            address: self.config.listen.map(|address| address.to_string()),
            labels: self.config.labels.clone(),
            state: NodeState::Active,
            underlay: None,
        };
        let initialized = self.control.initialize(settings, node).await?;
        if initialized {
            tracing::info!(cluster = %self.control.read(|state| state.cluster_id), "cluster initialised");
        }
        self.activate().await?;
        if initialized && self.config.standalone() && self.config.default_disk_size > 0 {
            self.add_default_disk().await?;
        }
        Ok(initialized)
    }

    /// Makes this fresh node a member of the cluster `seed` (a member's --listen address) belongs to and
    /// records it in the cluster state. `Ok(None)` if it was a member already, else whether it votes.
    pub(super) async fn join_cluster(&self, seed: &str) -> Result<Option<bool>, OpError> {
        let joined = if self.control.is_initialized() {
            let seed_is_a_member = self
                .control
                .raft_status()
                .addresses
                .values()
                .any(|address| address == seed);
            if !seed_is_a_member {
                let cluster = self.control.read(|state| state.cluster_id);
                return Err(OpError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "this node is already a member of cluster {cluster}, which has no node at {seed}; a node \
                         joins one cluster in its life: start a vesseld with a fresh data directory{} to join that one",
                        if self.config.listen.is_none() {
                            " and --listen IP:PORT"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            None
        } else {
            let voter = self.control.join(seed).await.map_err(|error| match error {
                // Already phrased for the user, and not about committing.
                ControlError::Unavailable(reason) => OpError::new(ErrorKind::Unavailable, reason),
                ControlError::Membership(reason) => {
                    OpError::new(ErrorKind::FailedPrecondition, reason)
                }
                other => other.into(),
            })?;
            Some(voter)
        };
        // Also when it was a member already: an earlier attempt may have joined Raft and then failed to
        // record the node (its name taken, say), and repeating the join finishes it.
        self.register().await?;
        self.activate().await?;
        Ok(joined)
    }

    /// Records this node (name, address, labels) in the cluster state, unless it is there.
    async fn register(&self) -> Result<(), OpError> {
        let me = self.control.node_id();
        let host = host_name();
        let (known, host_taken) = self.control.read(|state| {
            (
                state.nodes.contains_key(&me),
                state.nodes.values().any(|node| node.name == host),
            )
        });
        if known {
            return Ok(());
        }
        // Nodes of one machine (namespaces, tests) share a host name: the node id tells them apart.
        let name = match &self.config.name {
            Some(name) => name.clone(),
            None if host_taken => format!("{host}-{me}"),
            None => host,
        };
        let node = Node {
            id: me,
            name,
            address: self.config.listen.map(|address| address.to_string()),
            labels: self.config.labels.clone(),
            state: NodeState::Active,
            underlay: None,
        };
        match self.control.write(Command::AddNode { node }).await {
            // Recorded by an earlier attempt whose answer was lost.
            Ok(_) | Err(ControlError::Rejected(CommandError::NodeExists { .. })) => Ok(()),
            Err(ControlError::Rejected(CommandError::NodeNameTaken { name, id })) => {
                Err(OpError::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "node name '{name}' is already used by node {id}; set another `name` in this node's config and \
                     run `vessel node join` again"
                    ),
                ))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Activates a member, initialises a self-initialising node, or waits for `cluster init` / `node join`.
    async fn start_up(&self) -> Result<(), OpError> {
        if self.control.is_initialized() {
            self.activate().await
        } else if self.config.standalone() {
            self.initialize_cluster().await.map(drop)
        } else {
            tracing::info!(
                "waiting to become a cluster member: run `vessel cluster init` against this node"
            );
            Ok(())
        }
    }

    /// Brings the local pool and devices in line with the cluster state.
    async fn activate(&self) -> Result<(), OpError> {
        if self.pool.get().is_some() {
            return Ok(());
        }
        let (extent_size, disks) = self.control.read(|state| {
            let me = self.control.node_id();
            (
                state.settings.extent_size,
                state.disks_on(me).cloned().collect::<Vec<_>>(),
            )
        });
        let pool = Arc::new(
            LocalPool::try_new(extent_size)
                .map_err(|error| OpError::new(ErrorKind::Internal, error.to_string()))?,
        );
        for disk in &disks {
            let opened = {
                let (pool, path) = (Arc::clone(&pool), PathBuf::from(&disk.path));
                tokio::task::spawn_blocking(move || {
                    pool.open_disk_waiting(&path, DISK_LOCK_WAIT, || {
                        tracing::info!(path = %path.display(), "disk still locked, probably by the previous vesseld's draining I/O; waiting");
                    })
                })
                .await
            };
            let failed = match opened {
                Ok(Ok(_)) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(error) => Some(format!("the thread opening it failed ({error})")),
            };
            if let Some(error) = failed {
                self.warn(format!(
                    "disk {} ({}) cannot be opened: {error}; no volume is served on this node until it can \
                     (restart vesseld once the disk is back)",
                    disk.path, disk.id
                ));
                self.unavailable_disks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(disk.path.clone());
            }
        }
        if !self
            .unavailable_disks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
        {
            // Extents on a missing disk would read back as zeroes: serve nothing rather than wrong data,
            // and reclaim nothing either (the missing disk's slot tables are unknown).
            let _ = self.pool.set(pool);
            return Ok(());
        }
        // Space of volumes deleted while this daemon was down (or died between the commit and the freeing).
        self.reclaim_deleted(&pool);
        // The attachments to restore are those of the cluster's state now, not of this node's last view of it: a
        // volume taken over while this node was down must not be served (its local replica may be stale).
        self.sync_for_restore().await;
        let (attachments, volumes) = self.control.read(|state| {
            let me = self.control.node_id();
            (
                state.attachments_on(me).cloned().collect::<Vec<_>>(),
                state.volumes.clone(),
            )
        });
        let _ = self.pool.set(Arc::clone(&pool));
        for attachment in attachments {
            let Some(volume) = volumes.get(&attachment.volume) else {
                continue;
            };
            if let Err(error) = self.reconcile(volume, &attachment).await {
                self.warn(format!(
                    "attachment of volume '{}' not restored: {error}",
                    volume.name
                ));
                continue;
            }
            match self.serve(&pool, volume, &attachment) {
                Ok(()) => {
                    tracing::info!(volume = %volume.name, id = %volume.id, socket = %attachment.socket, "attachment restored")
                }
                Err(error) => self.warn(format!(
                    "attachment of volume '{}' not restored: {error}",
                    volume.name
                )),
            }
        }
        Ok(())
    }

    /// Waits (up to a minute) until this node's state has caught up with the leader's; on a node that cannot reach a
    /// majority, it restores what its own state says, with a warning.
    async fn sync_for_restore(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match self.control.sync(std::time::Duration::from_secs(5)).await {
                Ok(()) => return,
                Err(error) if std::time::Instant::now() >= deadline => {
                    self.warn(format!(
                        "restoring attachments from this node's own view of the cluster state: {error}"
                    ));
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }

    /// The file-backed pool a self-initialising node starts with.
    async fn add_default_disk(&self) -> Result<(), OpError> {
        let Some(pool) = self.pool.get() else {
            return Ok(());
        };
        let dir = self.config.data_dir.join("disks");
        std::fs::create_dir_all(&dir).map_err(|error| {
            OpError::new(
                ErrorKind::Internal,
                format!("cannot create {}: {error}", dir.display()),
            )
        })?;
        let path = std::path::absolute(dir.join("disk0.img")).map_err(|error| {
            OpError::new(
                ErrorKind::Internal,
                format!("cannot resolve the default disk path: {error}"),
            )
        })?;
        let info = pool
            .add_disk(&path, Some(self.config.default_disk_size))
            .map_err(|error| {
                OpError::new(
                    ErrorKind::Internal,
                    format!("cannot create the default disk: {error}"),
                )
            })?;
        let disk = Disk {
            id: info.id,
            node: self.control.node_id(),
            path: path.display().to_string(),
            capacity: info.capacity,
            block_device: false,
        };
        self.control.write(Command::AddDisk { disk }).await?;
        tracing::info!(path = %path.display(), capacity = info.capacity, "default file-backed disk created");
        Ok(())
    }
}
