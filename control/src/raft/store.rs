//! The redb database of one voter: Raft log, vote, committed and purge markers, the applied state
//! machine row by row, the current snapshot, and the node's identity.
//!
//! One file, `DATA_DIR/meta.redb`, holds every table (listed in [`tables`]); every value is
//! `[FORMAT_VERSION, postcard...]` (see [`super::types`]). Each write is one redb transaction,
//! committed with `Durability::Immediate` (fsync) before openraft is told it happened, except the
//! optional `committed` hint, which rides on the next durable commit.
//!
//! The state machine keeps the whole [`ClusterState`] in memory for reads and persists an apply
//! batch by rewriting only the rows its commands name ([`Command::rows`]), together with the
//! applied log id, in one transaction. Invariant: after every commit the rows on disk equal the
//! in-memory state at `applied`, so a restart loads exactly what was acknowledged.
//!
//! [`Command::rows`]: crate::state::Command::rows

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::types::{
    ApplyResult, DecodeError, Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
    Vote, decode, encode,
};
use crate::state::{ClusterState, NodeId, Row, Settings};

/// The tables of `meta.redb`.
pub mod tables {
    use redb::TableDefinition;

    /// Raft log: index → entry.
    pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
    /// Raft metadata: `vote`, `committed`, `last_purged` → log id / vote.
    pub const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
    /// State machine metadata: `applied` (log id), `membership` (stored membership), `cluster`
    /// (cluster id and settings), `counters` (the next network and port ids).
    pub const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
    /// Nodes by id.
    pub const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("sm_nodes");
    /// Disks by id (the UUID as u128).
    pub const DISKS: TableDefinition<u128, &[u8]> = TableDefinition::new("sm_disks");
    /// Volumes, with their placement, by id (the UUID as u128).
    pub const VOLUMES: TableDefinition<u128, &[u8]> = TableDefinition::new("sm_volumes");
    /// Attachments by volume id (the UUID as u128).
    pub const ATTACHMENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("sm_attachments");
    /// Networks by id.
    pub const NETWORKS: TableDefinition<u64, &[u8]> = TableDefinition::new("sm_networks");
    /// Ports by id.
    pub const PORTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sm_ports");
    /// What fenced-off replica nodes miss (`crate::state::Missed` by node), by volume id (the UUID as u128).
    pub const MISSED: TableDefinition<u128, &[u8]> = TableDefinition::new("sm_missed");
    /// The current snapshot: `meta` (snapshot metadata) and `data` (the encoded cluster state).
    pub const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
    /// This data directory's identity: `node_id`.
    pub const IDENTITY: TableDefinition<&str, u64> = TableDefinition::new("identity");
}

use tables::{
    ATTACHMENTS, DISKS, IDENTITY, LOG, MISSED, NETWORKS, NODES, PORTS, RAFT_META, SM_META,
    SNAPSHOT, VOLUMES,
};

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} (check the disk and the data directory's permissions)")]
    Redb(#[from] redb::Error),
    #[error("{what} is unreadable: {source}")]
    Corrupt { what: String, source: DecodeError },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: String,
        source: postcard::Error,
    },
    #[error("storage task failed: {0}")]
    Task(String),
    #[error(
        "the database is in use by another process (or a shutdown still closing it); stop the other vesseld using this data directory"
    )]
    InUse,
}

macro_rules! store_error_from_redb {
    ($($error:ty),*) => {
        $(impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                Self::Redb(error.into())
            }
        })*
    };
}
store_error_from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<StoreError> for io::Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Corrupt { .. } => io::Error::new(io::ErrorKind::InvalidData, error),
            _ => io::Error::other(error),
        }
    }
}

fn encode_value<T: Serialize + ?Sized>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    encode(value).map_err(|source| StoreError::Encode {
        what: what.to_owned(),
        source,
    })
}

fn decode_value<T: DeserializeOwned>(
    what: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<T, StoreError> {
    decode(bytes).map_err(|source| StoreError::Corrupt {
        what: what(),
        source,
    })
}

/// Cluster id and settings: the `cluster` row.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterRecord {
    cluster_id: Uuid,
    settings: Settings,
}

/// The opened `meta.redb`.
#[derive(Debug, Clone)]
pub struct MetaStore {
    db: Arc<Database>,
}

impl MetaStore {
    /// Opens (or creates) the database at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse),
            other => other?,
        };
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(RAFT_META)?;
        txn.open_table(SM_META)?;
        txn.open_table(NODES)?;
        txn.open_table(DISKS)?;
        txn.open_table(VOLUMES)?;
        txn.open_table(ATTACHMENTS)?;
        txn.open_table(NETWORKS)?;
        txn.open_table(PORTS)?;
        txn.open_table(MISSED)?;
        txn.open_table(SNAPSHOT)?;
        txn.open_table(IDENTITY)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// This data directory's node id, generated (random, non-zero) and persisted on first use.
    pub fn node_id(&self) -> Result<NodeId, StoreError> {
        let txn = self.db.begin_write()?;
        let id = {
            let mut table = txn.open_table(IDENTITY)?;
            let existing = table.get("node_id")?.map(|guard| guard.value());
            match existing {
                Some(id) => id,
                None => {
                    let id = random_node_id();
                    table.insert("node_id", id)?;
                    id
                }
            }
        };
        txn.commit()?;
        Ok(id)
    }

    /// A handle that tells when the database has been closed (every user dropped).
    pub fn watch_close(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }

    /// The Raft log half of the store.
    pub fn log_store(&self) -> LogStore {
        LogStore {
            db: Arc::clone(&self.db),
        }
    }

    /// The state machine, loaded from its rows.
    pub fn state_machine(&self) -> Result<StateMachine, StoreError> {
        let applied = load_applied(&self.db)?;
        let index = applied.last_applied.as_ref().map_or(0, |id| id.index());
        let (notify, _) = watch::channel(index);
        let shared = Arc::new(SharedState {
            applied: RwLock::new(applied),
            notify,
        });
        Ok(StateMachine {
            db: Arc::clone(&self.db),
            shared,
        })
    }
}

fn random_node_id() -> NodeId {
    // A v4 UUID is 122 random bits from the OS; any 64 of them make a node id. Zero is avoided so
    // that "no node" never collides with a real one in logs and tools.
    loop {
        let (high, _) = Uuid::new_v4().as_u64_pair();
        if high != 0 {
            return high;
        }
    }
}

/// Runs `f` in a write transaction on the blocking pool and commits it.
async fn write_txn<T, F>(db: &Arc<Database>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut WriteTransaction) -> Result<T, StoreError> + Send + 'static,
{
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || {
        let mut txn = db.begin_write()?;
        let value = f(&mut txn)?;
        txn.commit()?;
        Ok(value)
    })
    .await
    .map_err(|error| StoreError::Task(error.to_string()))?
}

fn get_meta<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(table)?;
    let Some(guard) = table.get(key)? else {
        return Ok(None);
    };
    decode_value(|| format!("metadata '{key}'"), guard.value()).map(Some)
}

fn put_meta(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(table)?;
    match value {
        Some(bytes) => table.insert(key, bytes)?,
        None => table.remove(key)?,
    };
    Ok(())
}

/// Turns any range of log indexes into `[start, end)`, `end == None` meaning unbounded, or `None`
/// when the range is empty.
fn half_open(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => end.checked_add(1),
        Bound::Excluded(&end) => Some(end),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if end <= start => None,
        _ => Some((start, end)),
    }
}

/// The Raft log, vote and markers.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let Some((start, end)) = half_open(&range) else {
            return Ok(Vec::new());
        };
        let read = || -> Result<Vec<Entry>, StoreError> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let rows = match end {
                Some(end) => table.range(start..end)?,
                None => table.range(start..)?,
            };
            let mut entries = Vec::new();
            for row in rows {
                let (index, bytes) = row?;
                entries.push(decode_value(
                    || format!("raft log entry {}", index.value()),
                    bytes.value(),
                )?);
            }
            Ok(entries)
        };
        Ok(read()?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(get_meta(&self.db, RAFT_META, "vote")?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let read = || -> Result<LogState<TypeConfig>, StoreError> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let last = match table.last()? {
                Some((index, bytes)) => {
                    let entry: Entry = decode_value(
                        || format!("raft log entry {}", index.value()),
                        bytes.value(),
                    )?;
                    Some(entry.log_id())
                }
                None => None,
            };
            drop(table);
            drop(txn);
            let last_purged_log_id: Option<LogId> = get_meta(&self.db, RAFT_META, "last_purged")?;
            let last_log_id = last.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        };
        Ok(read()?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode_value("vote", vote)?;
        write_txn(&self.db, move |txn| {
            put_meta(txn, RAFT_META, "vote", Some(&bytes))
        })
        .await?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let bytes = committed
            .map(|id| encode_value("committed log id", &id))
            .transpose()?;
        write_txn(&self.db, move |txn| {
            // Only a hint for faster recovery: it becomes durable with the next immediate commit
            // (an append or an apply), and losing it merely replays less on restart.
            txn.set_durability(Durability::None)?;
            put_meta(txn, RAFT_META, "committed", bytes.as_deref())
        })
        .await?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(get_meta(&self.db, RAFT_META, "committed")?)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|entry| {
                let index = entry.log_id().index();
                encode_value("raft log entry", &entry).map(|bytes| (index, bytes))
            })
            .collect::<Result<Vec<_>, _>>()?;
        write_txn(&self.db, move |txn| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in &rows {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        })
        .await?;
        // The transaction above committed durably, so the entries are both readable and on disk.
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let start = last_log_id.map_or(0, |id| id.index().saturating_add(1));
        write_txn(&self.db, move |txn| {
            txn.open_table(LOG)?.retain_in(start.., |_, _| false)?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let bytes = encode_value("purged log id", &log_id)?;
        let end = log_id.index();
        write_txn(&self.db, move |txn| {
            // Marker and deletion commit together: the log never shows a hole below a stale marker.
            put_meta(txn, RAFT_META, "last_purged", Some(&bytes))?;
            txn.open_table(LOG)?.retain_in(..=end, |_, _| false)?;
            Ok(())
        })
        .await?;
        Ok(())
    }
}

/// The applied state and the Raft bookkeeping that goes with it, always mutually consistent.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub state: ClusterState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// The state machine's in-memory value, shared with readers of [`crate::raft::ControlPlane`].
#[derive(Debug)]
pub struct SharedState {
    applied: RwLock<Applied>,
    /// Last applied log index, bumped after each durable apply or snapshot install.
    notify: watch::Sender<u64>,
}

impl SharedState {
    /// Runs `f` on the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&Applied) -> R) -> R {
        // A panic while holding the lock cannot leave `Applied` half-written (apply validates
        // before mutating), so a poisoned lock still guards a consistent value.
        f(&self.applied.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<R>(&self, f: impl FnOnce(&mut Applied) -> R) -> R {
        f(&mut self.applied.write().unwrap_or_else(PoisonError::into_inner))
    }

    /// A receiver that wakes when the applied index moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }
}

/// The Raft state machine: applies committed commands to [`ClusterState`] and persists them.
#[derive(Debug)]
pub struct StateMachine {
    db: Arc<Database>,
    shared: Arc<SharedState>,
}

impl StateMachine {
    /// The in-memory state, for readers.
    pub fn shared(&self) -> Arc<SharedState> {
        Arc::clone(&self.shared)
    }
}

fn load_applied(db: &Database) -> Result<Applied, StoreError> {
    let last_applied: Option<LogId> = get_meta(db, SM_META, "applied")?;
    let membership: StoredMembership = get_meta(db, SM_META, "membership")?.unwrap_or_default();
    let cluster: Option<ClusterRecord> = get_meta(db, SM_META, "cluster")?;
    let mut state = ClusterState::default();
    if let Some(record) = cluster {
        state.cluster_id = record.cluster_id;
        state.settings = record.settings;
    }
    let txn = db.begin_read()?;
    for row in txn.open_table(NODES)?.iter()? {
        let (id, bytes) = row?;
        let node: crate::state::Node =
            decode_value(|| format!("node {}", id.value()), bytes.value())?;
        state.nodes.insert(node.id, node);
    }
    for row in txn.open_table(DISKS)?.iter()? {
        let (id, bytes) = row?;
        let disk: crate::state::Disk = decode_value(
            || format!("disk {}", Uuid::from_u128(id.value())),
            bytes.value(),
        )?;
        state.disks.insert(disk.id, disk);
    }
    for row in txn.open_table(VOLUMES)?.iter()? {
        let (id, bytes) = row?;
        let volume: crate::state::Volume = decode_value(
            || format!("volume {}", Uuid::from_u128(id.value())),
            bytes.value(),
        )?;
        state.volume_names.insert(volume.name.clone(), volume.id);
        state.volumes.insert(volume.id, volume);
    }
    for row in txn.open_table(ATTACHMENTS)?.iter()? {
        let (id, bytes) = row?;
        let attachment: crate::state::Attachment = decode_value(
            || format!("attachment of volume {}", Uuid::from_u128(id.value())),
            bytes.value(),
        )?;
        state.attachments.insert(attachment.volume, attachment);
    }
    if let Some(counters) = get_meta(db, SM_META, "counters")? {
        state.counters = counters;
    }
    for row in txn.open_table(NETWORKS)?.iter()? {
        let (id, bytes) = row?;
        let network: crate::state::Network =
            decode_value(|| format!("network {}", id.value()), bytes.value())?;
        state.networks.insert(network.id, network);
    }
    for row in txn.open_table(PORTS)?.iter()? {
        let (id, bytes) = row?;
        let port: crate::state::Port =
            decode_value(|| format!("port {}", id.value()), bytes.value())?;
        state.ports.insert(port.id, port);
    }
    for row in txn.open_table(MISSED)?.iter()? {
        let (id, bytes) = row?;
        let volume = Uuid::from_u128(id.value());
        let records: MissedRecords = decode_value(
            || format!("what fenced-off nodes miss of volume {volume}"),
            bytes.value(),
        )?;
        state.missed.insert(volume, records);
    }
    Ok(Applied {
        state,
        last_applied,
        membership,
    })
}

/// The encoded value of `row` in `state`, or `None` when the object no longer exists.
fn encode_row(state: &ClusterState, row: Row) -> Result<Option<Vec<u8>>, StoreError> {
    match row {
        Row::Cluster => {
            let record = ClusterRecord {
                cluster_id: state.cluster_id,
                settings: state.settings.clone(),
            };
            encode_value("cluster record", &record).map(Some)
        }
        Row::Node(id) => state
            .nodes
            .get(&id)
            .map(|node| encode_value("node", node))
            .transpose(),
        Row::Disk(id) => state
            .disks
            .get(&id)
            .map(|disk| encode_value("disk", disk))
            .transpose(),
        Row::Volume(id) => state
            .volumes
            .get(&id)
            .map(|volume| encode_value("volume", volume))
            .transpose(),
        Row::Attachment(id) => state
            .attachments
            .get(&id)
            .map(|attachment| encode_value("attachment", attachment))
            .transpose(),
        Row::Counters => encode_value("id counters", &state.counters).map(Some),
        Row::Network(id) => state
            .networks
            .get(&id)
            .map(|network| encode_value("network", network))
            .transpose(),
        Row::Port(id) => state
            .ports
            .get(&id)
            .map(|port| encode_value("port", port))
            .transpose(),
        Row::Missed(id) => state
            .missed
            .get(&id)
            .map(|records| encode_value("missed extents", records))
            .transpose(),
    }
}

fn write_row(txn: &WriteTransaction, row: Row, value: Option<&[u8]>) -> Result<(), StoreError> {
    fn put<K: redb::Key + 'static>(
        txn: &WriteTransaction,
        table: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut table = txn.open_table(table)?;
        match value {
            Some(bytes) => table.insert(key, bytes)?,
            None => table.remove(key)?,
        };
        Ok(())
    }
    match row {
        Row::Cluster => put_meta(txn, SM_META, "cluster", value),
        Row::Node(id) => put(txn, NODES, id, value),
        Row::Disk(id) => put(txn, DISKS, id.as_u128(), value),
        Row::Volume(id) => put(txn, VOLUMES, id.as_u128(), value),
        Row::Attachment(id) => put(txn, ATTACHMENTS, id.as_u128(), value),
        Row::Counters => put_meta(txn, SM_META, "counters", value),
        Row::Network(id) => put(txn, NETWORKS, id, value),
        Row::Port(id) => put(txn, PORTS, id, value),
        Row::Missed(id) => put(txn, MISSED, id.as_u128(), value),
    }
}

/// What fenced-off replica nodes miss of one volume, by node: the value of a [`MISSED`] row.
type MissedRecords = BTreeMap<crate::state::NodeId, crate::state::Missed>;

/// Encodes the whole state for a snapshot, rebuilding nothing: the snapshot is the state as is. The missed records
/// follow the state's own encoding (they are not part of it, see [`ClusterState::missed`]).
fn encode_state(state: &ClusterState) -> Result<Vec<u8>, StoreError> {
    encode_value("cluster state", &(state, &state.missed))
}

/// Decodes a snapshot's state, re-deriving the name index so a snapshot can never install an
/// index that disagrees with the volumes. A snapshot from before the missed records were kept
/// is the state alone.
fn decode_state(bytes: &[u8]) -> Result<ClusterState, StoreError> {
    let mut state = match decode::<(
        ClusterState,
        BTreeMap<crate::state::VolumeId, MissedRecords>,
    )>(bytes)
    {
        Ok((mut state, missed)) => {
            state.missed = missed;
            state
        }
        Err(_) => decode_value::<ClusterState>(|| "snapshot data".to_owned(), bytes)?,
    };
    state.volume_names = state
        .volumes
        .values()
        .map(|volume| (volume.name.clone(), volume.id))
        .collect();
    Ok(state)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self
            .shared
            .read(|applied| (applied.last_applied, applied.membership.clone())))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut rows = BTreeMap::<Row, Option<Vec<u8>>>::new();
        let mut responses = Vec::new();
        let mut last = None;
        let mut membership = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let result = self.shared.write(|applied| -> Result<_, StoreError> {
                applied.last_applied = Some(log_id);
                Ok(match entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(command) => {
                        let touched = command.rows(&applied.state);
                        let verdict = applied.state.apply(command);
                        if verdict.is_ok() {
                            for row in touched {
                                rows.insert(row, encode_row(&applied.state, row)?);
                            }
                        }
                        Some(verdict)
                    }
                    EntryPayload::Membership(config) => {
                        let stored = StoredMembership::new(Some(log_id), config);
                        applied.membership = stored.clone();
                        membership = Some(stored);
                        None
                    }
                })
            })?;
            if let Some(responder) = responder {
                responses.push((responder, ApplyResult(result)));
            }
            last = Some(log_id);
        }
        let Some(last) = last else {
            return Ok(());
        };
        let applied_bytes = encode_value("applied log id", &last)?;
        let membership_bytes = membership
            .map(|m| encode_value("membership", &m))
            .transpose()?;
        write_txn(&self.db, move |txn| {
            for (row, value) in &rows {
                write_row(txn, *row, value.as_deref())?;
            }
            put_meta(txn, SM_META, "applied", Some(&applied_bytes))?;
            if let Some(bytes) = &membership_bytes {
                put_meta(txn, SM_META, "membership", Some(bytes))?;
            }
            Ok(())
        })
        .await?;
        // Subscribers first: whoever sees a write's reply must also see the index move.
        self.shared.notify.send_replace(last.index());
        for (responder, result) in responses {
            responder.send(result);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured here, between two apply batches, where memory equals what is on disk: the
        // builder runs concurrently with later applies, and a snapshot must never be ahead of the
        // durable state machine.
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            applied: self.shared.read(Applied::clone),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let state = decode_state(&snapshot)?;
        let mut rows = Vec::new();
        rows.push((Row::Cluster, encode_row(&state, Row::Cluster)?));
        for id in state.nodes.keys() {
            rows.push((Row::Node(*id), encode_row(&state, Row::Node(*id))?));
        }
        for id in state.disks.keys() {
            rows.push((Row::Disk(*id), encode_row(&state, Row::Disk(*id))?));
        }
        for id in state.volumes.keys() {
            rows.push((Row::Volume(*id), encode_row(&state, Row::Volume(*id))?));
        }
        for id in state.attachments.keys() {
            rows.push((
                Row::Attachment(*id),
                encode_row(&state, Row::Attachment(*id))?,
            ));
        }
        rows.push((Row::Counters, encode_row(&state, Row::Counters)?));
        for id in state.networks.keys() {
            rows.push((Row::Network(*id), encode_row(&state, Row::Network(*id))?));
        }
        for id in state.ports.keys() {
            rows.push((Row::Port(*id), encode_row(&state, Row::Port(*id))?));
        }
        for id in state.missed.keys() {
            rows.push((Row::Missed(*id), encode_row(&state, Row::Missed(*id))?));
        }
        let applied_bytes = meta
            .last_log_id
            .as_ref()
            .map(|id| encode_value("applied log id", id))
            .transpose()?;
        let membership_bytes = encode_value("membership", &meta.last_membership)?;
        let meta_bytes = encode_value("snapshot metadata", meta)?;
        write_txn(&self.db, move |txn| {
            txn.open_table(NODES)?.retain(|_, _| false)?;
            txn.open_table(DISKS)?.retain(|_, _| false)?;
            txn.open_table(VOLUMES)?.retain(|_, _| false)?;
            txn.open_table(ATTACHMENTS)?.retain(|_, _| false)?;
            txn.open_table(NETWORKS)?.retain(|_, _| false)?;
            txn.open_table(PORTS)?.retain(|_, _| false)?;
            txn.open_table(MISSED)?.retain(|_, _| false)?;
            for (row, value) in &rows {
                write_row(txn, *row, value.as_deref())?;
            }
            put_meta(txn, SM_META, "applied", applied_bytes.as_deref())?;
            put_meta(txn, SM_META, "membership", Some(&membership_bytes))?;
            put_meta(txn, SNAPSHOT, "meta", Some(&meta_bytes))?;
            put_meta(txn, SNAPSHOT, "data", Some(&snapshot))?;
            Ok(())
        })
        .await?;
        let index = meta.last_log_id.as_ref().map_or(0, |id| id.index());
        self.shared.write(|applied| {
            *applied = Applied {
                state,
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
        });
        self.shared.notify.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let meta: Option<SnapshotMeta> = get_meta(&self.db, SNAPSHOT, "meta")?;
        let Some(meta) = meta else {
            return Ok(None);
        };
        let read = || -> Result<Option<Vec<u8>>, StoreError> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            Ok(table.get("data")?.map(|guard| guard.value().to_vec()))
        };
        Ok(read()?.map(|data| Snapshot {
            meta,
            snapshot: data,
        }))
    }
}

/// Builds a snapshot of the state machine as it was when the builder was made, and keeps it as
/// the current snapshot.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<Database>,
    applied: Applied,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
        };
        let data = encode_state(&self.applied.state)?;
        let meta_bytes = encode_value("snapshot metadata", &meta)?;
        let stored = data.clone();
        write_txn(&self.db, move |txn| {
            put_meta(txn, SNAPSHOT, "meta", Some(&meta_bytes))?;
            put_meta(txn, SNAPSHOT, "data", Some(&stored))
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures::stream;
    use openraft::storage::RaftLogStorage;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;
    use openraft::{Membership, StorageError};
    use tempfile::TempDir;

    use super::*;
    use crate::state::{
        Attachment, Command, CommandOutcome, Disk, NewPort, Node, NodeState, PortKind,
    };

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let dir =
                TempDir::new().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
            let store = MetaStore::open(&dir.path().join("meta.redb"))
                .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
            let sm = store
                .state_machine()
                .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
            Ok((dir, store.log_store(), sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_conformance_suite() {
        Suite::test_all(Builder).await.unwrap();
    }

    #[test]
    fn half_open_ranges() {
        assert_eq!(half_open(&(3..7)), Some((3, Some(7))));
        assert_eq!(half_open(&(3..=7)), Some((3, Some(8))));
        assert_eq!(half_open(&(3..)), Some((3, None)));
        assert_eq!(half_open(&(..)), Some((0, None)));
        assert_eq!(half_open(&(5..5)), None);
        assert_eq!(half_open(&(..=u64::MAX)), Some((0, None)));
        assert_eq!(
            half_open(&(Bound::Excluded(u64::MAX), Bound::Unbounded)),
            None
        );
        #[allow(clippy::reversed_empty_ranges)]
        let inverted = 7..3;
        assert_eq!(half_open(&inverted), None);
    }

    fn log_id(index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(1, 1, index)
    }

    fn normal(index: u64, command: Command) -> Result<EntryResponder<TypeConfig>, io::Error> {
        Ok((Entry::new_normal(log_id(index), command), None))
    }

    /// `commands` as log entries, the first at index `first`.
    fn log_entries(
        commands: Vec<Command>,
        first: u64,
    ) -> Vec<Result<EntryResponder<TypeConfig>, io::Error>> {
        commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| normal(i as u64 + first, c))
            .collect()
    }

    fn commands() -> Vec<Command> {
        let node = Node {
            id: 1,
            name: "n1".to_owned(),
            address: None,
            labels: BTreeMap::new(),
            state: NodeState::Active,
            underlay: None,
        };
        let volume = |n: u128, name: &str| Command::CreateVolume {
            id: Uuid::from_u128(n),
            name: name.to_owned(),
            size: 1 << 30,
            block_size: None,
            replicas: 1,
            created_unix: 42,
        };
        let network = |name: &str, vni: u32| Command::CreateNetwork {
            name: name.to_owned(),
            vni,
            mtu: None,
            subnet: Some("10.0.0.0/24".parse().unwrap()),
            created_unix: 44,
        };
        let port = |network: u64, ifname: &str, mac: u8| Command::CreatePort {
            port: NewPort {
                network,
                node: 1,
                kind: PortKind::Tap {
                    ifname: ifname.to_owned(),
                    queues: 1,
                },
                mac: vessel_proto::net::MacAddress([2, 0, 0, 0, 0, mac]),
                ipv4: Some(std::net::Ipv4Addr::new(10, 0, 0, 5)),
                allow_any_mac: false,
                created_unix: 45,
            },
        };
        vec![
            Command::InitCluster {
                cluster_id: Uuid::from_u128(99),
                settings: Settings::default(),
                node,
            },
            Command::AddDisk {
                disk: Disk {
                    id: Uuid::from_u128(1),
                    node: 1,
                    path: "/pool/d1".to_owned(),
                    capacity: 8 << 30,
                    block_device: false,
                },
            },
            volume(10, "db1"),
            volume(11, "db2"),
            volume(12, "db3"),
            Command::DeleteVolume {
                id: Uuid::from_u128(11),
            },
            Command::GrowVolume {
                id: Uuid::from_u128(12),
                new_size: 2 << 30,
            },
            Command::Attach {
                attachment: Attachment {
                    volume: Uuid::from_u128(10),
                    node: 1,
                    socket: "/run/db1.sock".to_owned(),
                    queues: 1,
                    read_only: false,
                    socket_mode: 0o600,
                    attached_unix: 43,
                    active: Default::default(),
                },
            },
            network("blue", 100),
            network("red", 200),
            port(2, "tap1", 1),
            Command::DeleteNetwork { id: 2, force: true },
            port(1, "tap1", 2),
            // Refused (duplicate name): must change nothing on disk.
            volume(13, "db1"),
        ]
    }

    #[tokio::test]
    async fn applied_rows_reload_to_the_same_state() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("meta.redb");
        let expected = {
            let store = MetaStore::open(&path).unwrap();
            let mut sm = store.state_machine().unwrap();
            let entries = log_entries(commands(), 1);
            // Apply in two batches so both the single-row and multi-row paths run.
            let (first, second) = entries.split_at(3);
            sm.apply(stream::iter(first.iter().map(clone_entry)))
                .await
                .unwrap();
            sm.apply(stream::iter(second.iter().map(clone_entry)))
                .await
                .unwrap();
            let applied = sm.shared().read(Applied::clone);
            assert_eq!(applied.last_applied, Some(log_id(14)));
            assert_eq!(applied.state.volumes.len(), 2);
            assert_eq!(applied.state.networks.len(), 1);
            assert_eq!(applied.state.ports.keys().copied().collect::<Vec<_>>(), [2]);
            assert_eq!(applied.state.counters.next_network, 3);
            assert_eq!(*sm.shared().subscribe().borrow(), 14);
            applied
        };
        // Reopen from disk only.
        let store = MetaStore::open(&path).unwrap();
        let mut sm = store.state_machine().unwrap();
        let reloaded = sm.shared().read(Applied::clone);
        assert_eq!(reloaded.state, expected.state);
        assert_eq!(reloaded.last_applied, expected.last_applied);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(14)));
        assert_eq!(*sm.shared().subscribe().borrow(), 14);
    }

    fn clone_entry(
        entry: &Result<EntryResponder<TypeConfig>, io::Error>,
    ) -> Result<EntryResponder<TypeConfig>, io::Error> {
        let (entry, _) = entry.as_ref().unwrap();
        Ok((entry.clone(), None))
    }

    #[tokio::test]
    async fn apply_answers_each_responder_with_the_verdict() {
        // Responders cannot be built outside openraft; the verdicts are checked through the state
        // instead, and the refused command must leave no row behind.
        let dir = TempDir::new().unwrap();
        let store = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        let mut sm = store.state_machine().unwrap();
        let entries = log_entries(commands(), 1);
        sm.apply(stream::iter(entries)).await.unwrap();
        let state = sm.shared().read(|applied| applied.state.clone());
        assert!(!state.volumes.contains_key(&Uuid::from_u128(13)));
        let mut check = ClusterState::default();
        let verdicts: Vec<_> = commands().into_iter().map(|c| check.apply(c)).collect();
        assert!(matches!(verdicts.last(), Some(Err(_))));
        assert!(matches!(
            verdicts[2],
            Ok(CommandOutcome::VolumeCreated { .. })
        ));
        assert_eq!(check, state);
    }

    #[tokio::test]
    async fn snapshot_round_trip_installs_the_same_state() {
        let source_dir = TempDir::new().unwrap();
        let source = MetaStore::open(&source_dir.path().join("meta.redb")).unwrap();
        let mut source_sm = source.state_machine().unwrap();
        let mut entries = log_entries(commands(), 2);
        let membership = Membership::new_with_defaults(vec![[1u64].into()], []);
        entries.insert(
            0,
            Ok((Entry::new_membership(log_id(1), membership.clone()), None)),
        );
        source_sm.apply(stream::iter(entries)).await.unwrap();

        let snapshot = source_sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(15)));
        assert_eq!(snapshot.meta.last_membership.membership(), &membership);
        assert_eq!(snapshot.snapshot[0], super::super::types::FORMAT_VERSION);
        let current = source_sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot.meta);
        assert_eq!(current.snapshot, snapshot.snapshot);

        // Install into a store that already holds unrelated rows: they must be gone afterwards.
        let target_dir = TempDir::new().unwrap();
        let target_path = target_dir.path().join("meta.redb");
        {
            let target = MetaStore::open(&target_path).unwrap();
            let mut target_sm = target.state_machine().unwrap();
            let mut stale = commands();
            stale.truncate(5);
            stale.push(Command::CreateVolume {
                id: Uuid::from_u128(77),
                name: "stale".to_owned(),
                size: 1 << 20,
                block_size: None,
                replicas: 1,
                created_unix: 0,
            });
            // A network and port the snapshot does not have (port 1 is deleted in the source).
            stale.push(Command::CreateNetwork {
                name: "stale".to_owned(),
                vni: 7,
                mtu: None,
                subnet: None,
                created_unix: 0,
            });
            stale.push(Command::CreatePort {
                port: NewPort {
                    network: 1,
                    node: 1,
                    kind: PortKind::Tap {
                        ifname: "stale0".to_owned(),
                        queues: 1,
                    },
                    mac: vessel_proto::net::MacAddress([2, 0, 0, 0, 0, 9]),
                    ipv4: None,
                    allow_any_mac: false,
                    created_unix: 0,
                },
            });
            let stale = log_entries(stale, 1);
            target_sm.apply(stream::iter(stale)).await.unwrap();
            target_sm
                .install_snapshot(&snapshot.meta, snapshot.snapshot.clone())
                .await
                .unwrap();
            let installed = target_sm.shared().read(Applied::clone);
            let original = source_sm.shared().read(Applied::clone);
            assert_eq!(installed.state, original.state);
            assert_eq!(installed.last_applied, Some(log_id(15)));
            assert_eq!(*target_sm.shared().subscribe().borrow(), 15);
        }
        let reopened = MetaStore::open(&target_path)
            .unwrap()
            .state_machine()
            .unwrap();
        let reloaded = reopened.shared().read(Applied::clone);
        assert_eq!(reloaded.state, source_sm.shared().read(|a| a.state.clone()));
        assert!(!reloaded.state.volumes.contains_key(&Uuid::from_u128(77)));
        assert!(!reloaded.state.ports.contains_key(&1));
        assert_eq!(reloaded.state.networks[&1].name, "blue");
        assert_eq!(reloaded.membership.membership(), &membership);
    }

    /// A three-node cluster with a 3-replica volume attached on node 1, whose node 3 failed and was fenced off.
    fn fenced_off_commands() -> Vec<Command> {
        let node = |id: u64| Node {
            id,
            name: format!("n{id}"),
            address: None,
            labels: BTreeMap::new(),
            state: NodeState::Active,
            underlay: None,
        };
        let volume = Uuid::from_u128(10);
        let mut commands = vec![Command::InitCluster {
            cluster_id: Uuid::from_u128(99),
            settings: Settings::default(),
            node: node(1),
        }];
        for id in 1..=3u64 {
            if id > 1 {
                commands.push(Command::AddNode { node: node(id) });
            }
            commands.push(Command::AddDisk {
                disk: Disk {
                    id: Uuid::from_u128(u128::from(id)),
                    node: id,
                    path: "/pool/d1".to_owned(),
                    capacity: 8 << 30,
                    block_device: false,
                },
            });
        }
        commands.extend([
            Command::CreateVolume {
                id: volume,
                name: "r3".to_owned(),
                size: 1 << 30,
                block_size: None,
                replicas: 3,
                created_unix: 42,
            },
            Command::Attach {
                attachment: Attachment {
                    volume,
                    node: 1,
                    socket: "/run/r3.sock".to_owned(),
                    queues: 1,
                    read_only: false,
                    socket_mode: 0o600,
                    attached_unix: 43,
                    active: Default::default(),
                },
            },
            Command::Activity {
                volume,
                holder: 1,
                extents: vec![1],
                active: true,
            },
            Command::DropFailedReplica {
                volume,
                node: 3,
                holder: 1,
                since_unix: 44,
                boot_id: Some([7; 16]),
            },
            Command::Activity {
                volume,
                holder: 1,
                extents: vec![4],
                active: true,
            },
        ]);
        commands
    }

    #[tokio::test]
    async fn what_a_fenced_off_node_misses_survives_a_reopen_and_a_snapshot() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("meta.redb");
        let commands = fenced_off_commands();
        let count = commands.len() as u64;
        let (expected, snapshot) = {
            let store = MetaStore::open(&path).unwrap();
            let mut sm = store.state_machine().unwrap();
            let entries = log_entries(commands, 1);
            sm.apply(stream::iter(entries)).await.unwrap();
            let state = sm.shared().read(|applied| applied.state.clone());
            let missed = &state.missed[&Uuid::from_u128(10)][&3];
            assert_eq!(missed.extents.iter().copied().collect::<Vec<_>>(), [1, 4]);
            assert_eq!(missed.boot_id, Some([7; 16]));
            let snapshot = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            (state, snapshot)
        };
        let reopened = MetaStore::open(&path).unwrap().state_machine().unwrap();
        assert_eq!(reopened.shared().read(|a| a.state.clone()), expected);

        let target_dir = TempDir::new().unwrap();
        let mut target = MetaStore::open(&target_dir.path().join("meta.redb"))
            .unwrap()
            .state_machine()
            .unwrap();
        target
            .install_snapshot(&snapshot.meta, snapshot.snapshot.clone())
            .await
            .unwrap();
        assert_eq!(target.shared().read(|a| a.state.clone()), expected);
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(count)));

        // A snapshot written before the records were kept is the state alone: it still installs.
        let old = encode_value("cluster state", &expected).unwrap();
        let decoded = decode_state(&old).unwrap();
        assert!(decoded.missed.is_empty());
        assert_eq!(decoded.volumes, expected.volumes);
    }

    #[tokio::test]
    async fn corrupt_snapshot_data_is_refused_without_touching_the_state() {
        let dir = TempDir::new().unwrap();
        let store = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        let mut sm = store.state_machine().unwrap();
        let entries = log_entries(commands(), 1);
        sm.apply(stream::iter(entries)).await.unwrap();
        let before = sm.shared().read(Applied::clone);
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(50)),
            last_membership: StoredMembership::default(),
        };
        let error = sm
            .install_snapshot(&meta, vec![super::super::types::FORMAT_VERSION, 0xff, 0xff])
            .await;
        let error = error.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            error.to_string().starts_with("snapshot data is unreadable"),
            "{error}"
        );
        let error = sm.install_snapshot(&meta, vec![7, 0]).await.unwrap_err();
        assert!(
            error.to_string().contains("format version 7 is not known"),
            "{error}"
        );
        assert_eq!(sm.shared().read(Applied::clone).state, before.state);
        assert_eq!(
            sm.shared().read(Applied::clone).last_applied,
            before.last_applied
        );
    }

    #[tokio::test]
    async fn log_survives_reopen_and_purge_leaves_no_hole() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = MetaStore::open(&path).unwrap();
            let mut log = store.log_store();
            let entries: Vec<Entry> = (1..=10).map(|i| Entry::new_blank(log_id(i))).collect();
            let (tx, done) = TypeConfig::oneshot();
            log.append(entries, IOFlushed::<TypeConfig>::signal(tx))
                .await
                .unwrap();
            done.await.unwrap().unwrap();
            log.purge(log_id(4)).await.unwrap();
            log.truncate_after(Some(log_id(8))).await.unwrap();
            log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        }
        let store = MetaStore::open(&path).unwrap();
        let mut log = store.log_store();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(4)));
        assert_eq!(state.last_log_id, Some(log_id(8)));
        let indexes: Vec<u64> = log
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id().index())
            .collect();
        assert_eq!(indexes, vec![5, 6, 7, 8]);
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(1, 1))
        );
    }

    #[test]
    fn node_identity_is_stable_per_data_dir() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("meta.redb");
        let first = MetaStore::open(&path).unwrap().node_id().unwrap();
        assert_ne!(first, 0);
        assert_eq!(MetaStore::open(&path).unwrap().node_id().unwrap(), first);
        let other = TempDir::new().unwrap();
        assert_ne!(
            MetaStore::open(&other.path().join("meta.redb"))
                .unwrap()
                .node_id()
                .unwrap(),
            first
        );
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("meta.redb");
        let _first = MetaStore::open(&path).unwrap();
        let error = MetaStore::open(&path).unwrap_err();
        assert!(matches!(error, StoreError::InUse));
        assert!(
            error
                .to_string()
                .starts_with("the database is in use by another process"),
            "{error}"
        );
    }
}
