//! The replica side of the data path between nodes: a peer sends extent I/O in
//! [`vessel_proto::frame`] frames over TCP, this node runs it on its own disks and answers.
//!
//! One connection is served by two threads: a reader that takes frames off the socket (header,
//! then the payload straight into an O_DIRECT-aligned buffer), checks them and hands them over;
//! and the connection's I/O thread, which owns an [`IoQueue`], fences each request against the
//! cluster's view of the extent ([`ReplicaDirectory`]), submits it and writes the replies as their
//! I/O completes — in completion order, so requests are pipelined. Payload buffers come back to
//! the connection once their reply is sent and serve later requests of the same size. A frame
//! that fails any check closes that connection (after the requests already taken have been
//! answered or drained); it never affects another connection or the process.
//!
//! Fencing: a request carries the sender's epoch for the extent's replica set. An older epoch is
//! answered `StaleEpoch` (with this node's epoch): the sender was cut out of the set. A newer one
//! means this node has not applied the change yet: `NotReplica`, and the sender retries.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vessel_proto::frame::{self, FLAG_DURABLE, FrameError, HEADER_LEN, Header, Kind};
pub use vessel_proto::frame::{Opcode, Status};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::aligned::AlignedBuf;
use crate::{IoError, IoQueue, IoRequest, LocalPool, LocalVolume, Segment, VolumeId, VolumeLayout};

/// What this node may do with one extent, as the cluster state says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaGrant {
    /// The extent's replica-set epoch.
    pub epoch: u64,
    /// The volume's shape (to open it on this node's disks).
    pub layout: VolumeLayout,
}

/// The cluster's view of which extents this node holds replicas of. The control plane
/// implements it from the Raft state; vstore knows no more of the cluster than this.
pub trait ReplicaDirectory: Send + Sync {
    /// `Some` if this node is in the replica set of `extent` of `volume`.
    fn replica(&self, volume: VolumeId, extent: u64) -> Option<ReplicaGrant>;
}

/// Requests one connection may have in flight; more wait, unread, until replies have gone out.
const CONNECTION_DEPTH: usize = 128;
/// Data buffered for one connection's requests in flight (at least one request is always taken).
const CONNECTION_BYTES: u64 = 32 << 20;
/// How long a reply may wait for the peer to read it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Checked requests the reader may queue ahead of the I/O thread.
const READ_AHEAD: usize = 4;

/// Payload buffers a connection keeps for reuse.
const SPARE_BUFFERS: usize = 4;

/// How long a connection keeps a volume open after its last request.
const VOLUME_IDLE_CLOSE: Duration = Duration::from_secs(5);

const TOKEN_INCOMING: u64 = 0;
const TOKEN_IO: u64 = 1;

/// One checked request from the reader.
struct Incoming {
    header: Header,
    payload: Option<AlignedBuf>,
}

/// A request submitted to the block store, waiting for its completion.
struct InFlight {
    header: Header,
    buffer: Option<AlignedBuf>,
}

/// A connection's spare payload buffers: a rebuild moves a megabyte per request, and a fresh
/// buffer for each (allocated, zeroed, its pages faulted in) cost more CPU than the copy itself.
/// Shared by the connection's reader (write payloads) and I/O thread (read data, and every buffer
/// back once its reply is sent).
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<AlignedBuf>>);

impl Buffers {
    /// A buffer of exactly `len` bytes: a spare one if there is one (holding an earlier request's
    /// bytes: the caller overwrites all of it, by a whole payload read or a whole disk read), else a
    /// new one.
    fn take(&self, len: usize) -> io::Result<AlignedBuf> {
        let reused = {
            let mut spare = self.lock();
            let found = spare.iter().position(|buffer| buffer.len() == len.max(1));
            found.map(|at| spare.swap_remove(at))
        };
        reused.map_or_else(|| AlignedBuf::zeroed(len), Ok)
    }

    /// Keeps `buffer` for a later request, in place of the oldest spare if there are enough.
    fn give(&self, buffer: AlignedBuf) {
        let mut spare = self.lock();
        if spare.len() >= SPARE_BUFFERS {
            spare.remove(0);
        }
        spare.push(buffer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves one peer connection until it closes; returns why it ended (`Ok` for a clean close by
/// the peer). Blocks the calling thread, and one more thread it starts.
pub fn serve_connection(
    stream: TcpStream,
    pool: Arc<LocalPool>,
    directory: Arc<dyn ReplicaDirectory>,
) -> io::Result<()> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
    let _ = stream.set_nodelay(true);
    // A peer that stops reading its replies loses the connection rather than holding this one's buffers.
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let reader_stream = stream.try_clone()?;
    let notify = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (sender, receiver) = mpsc::sync_channel::<Incoming>(READ_AHEAD);
    let buffers = Arc::new(Buffers::default());
    let reader_buffers = Arc::clone(&buffers);
    let reader_notify = Arc::clone(&notify);
    let reader_peer = peer.clone();
    let reader = std::thread::Builder::new()
        .name("replica-read".to_owned())
        .spawn(move || {
            let outcome = read_frames(&reader_stream, &sender, &reader_notify, &reader_buffers);
            if let Err(error) = &outcome {
                tracing::warn!(peer = %reader_peer, %error, "closing the replica connection");
                let _ = reader_stream.shutdown(Shutdown::Both);
            }
            // Dropping the sender tells the I/O thread that no more requests come.
            drop(sender);
            let _ = reader_notify.write(1);
            outcome
        })?;
    let served = Connection::new(stream, pool, directory, buffers)?.run(&receiver, &notify);
    if let Err(error) = &served {
        tracing::warn!(%peer, %error, "replica connection failed");
    }
    let read = reader.join().unwrap_or_else(|_| {
        Err(ReadError::Io(io::Error::other(
            "the replica reader panicked",
        )))
    });
    served.and(read.map_err(io::Error::from))
}

/// Why the reader stopped taking frames.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("a reply frame arrived where only requests are expected")]
    UnexpectedReply,
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

impl From<ReadError> for io::Error {
    fn from(error: ReadError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, error.to_string())
    }
}

/// Reads, checks and forwards frames until the peer closes (`Ok`) or sends something wrong.
fn read_frames(
    mut stream: &TcpStream,
    sender: &mpsc::SyncSender<Incoming>,
    notify: &EventFd,
    buffers: &Buffers,
) -> Result<(), ReadError> {
    loop {
        let mut bytes = [0u8; HEADER_LEN];
        match stream.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error.into()),
        }
        let header = frame::decode(&bytes)?;
        if !matches!(header.kind, Kind::Request { .. }) {
            return Err(ReadError::UnexpectedReply);
        }
        let payload = if header.payload > 0 {
            let mut buffer = buffers.take(header.payload as usize)?;
            stream.read_exact(buffer.as_mut_slice())?;
            frame::verify(&bytes, buffer.as_slice())?;
            Some(buffer)
        } else {
            frame::verify(&bytes, &[])?;
            None
        };
        if sender.send(Incoming { header, payload }).is_err() {
            // The I/O thread is gone (the socket failed for writing): nothing more to do.
            return Ok(());
        }
        let _ = notify.write(1);
    }
}

/// This machine's kernel boot id (see [`crate::remote::BootId`]); zeroes if it cannot be read.
fn boot_id() -> [u8; 16] {
    static BOOT_ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|text| uuid::Uuid::parse_str(text.trim()).ok())
            .map_or([0; 16], uuid::Uuid::into_bytes)
    })
}

/// The I/O side of one connection.
struct Connection {
    stream: TcpStream,
    pool: Arc<LocalPool>,
    directory: Arc<dyn ReplicaDirectory>,
    io: IoQueue,
    buffers: Arc<Buffers>,
    /// Volumes opened for this connection, with when they were last used.
    volumes: HashMap<VolumeId, (Arc<LocalVolume>, Instant)>,
    in_flight: HashMap<u64, InFlight>,
    /// Bytes the requests in `in_flight` cover.
    in_flight_bytes: u64,
    next_tag: u64,
    /// Set once a reply could not be written: requests are drained, no more are taken.
    broken: bool,
}

impl Connection {
    fn new(
        stream: TcpStream,
        pool: Arc<LocalPool>,
        directory: Arc<dyn ReplicaDirectory>,
        buffers: Arc<Buffers>,
    ) -> io::Result<Self> {
        Ok(Self {
            stream,
            pool,
            directory,
            buffers,
            io: IoQueue::for_replica_service(u32::try_from(CONNECTION_DEPTH).unwrap_or(128))?,
            volumes: HashMap::new(),
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
            next_tag: 0,
            broken: false,
        })
    }

    fn run(mut self, receiver: &mpsc::Receiver<Incoming>, notify: &EventFd) -> io::Result<()> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_INCOMING),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.io.completion_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_IO),
        )?;
        let mut events = [EpollEvent::default(); 2];
        let mut reader_done = false;
        loop {
            if reader_done && self.in_flight.is_empty() {
                return if self.broken {
                    Err(io::Error::other("a reply could not be sent"))
                } else {
                    Ok(())
                };
            }
            // With volumes open, wake up in time to let go of those no longer used.
            let timeout = if self.volumes.is_empty() {
                -1
            } else {
                i32::try_from(VOLUME_IDLE_CLOSE.as_millis()).unwrap_or(i32::MAX)
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            if self.in_flight.is_empty() {
                // A volume this peer stopped using is let go, so that deleting it can free its space.
                self.volumes
                    .retain(|_, (_, used)| used.elapsed() < VOLUME_IDLE_CLOSE);
            }
            if events[..n]
                .iter()
                .any(|event| event.data() == TOKEN_INCOMING)
            {
                let _ = notify.read();
            }
            // Completions first: they make room for more requests.
            let mut finished = Vec::new();
            self.io.reap(|tag, result| finished.push((tag, result)));
            for (tag, result) in finished {
                self.finish(tag, result);
            }
            // Then new requests, up to the connection's depth: the rest wait in the channel, and the reader (so
            // the peer) waits behind them, so a peer cannot make this node hold unbounded buffers.
            while !reader_done
                && self.in_flight.len() < CONNECTION_DEPTH
                && (self.in_flight.is_empty() || self.in_flight_bytes < CONNECTION_BYTES)
            {
                match receiver.try_recv() {
                    Ok(incoming) => self.start(incoming),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => reader_done = true,
                }
            }
            self.io.commit()?;
        }
    }

    /// Fences and submits one request, or answers it at once.
    fn start(&mut self, incoming: Incoming) {
        let Incoming { header, payload } = incoming;
        let Kind::Request { flags } = header.kind else {
            return;
        };
        if header.opcode == Opcode::Ping {
            let answer = Header {
                volume: boot_id(),
                ..header
            };
            return self.reply(&answer, Status::Ok, 0, None);
        }
        let Some(grant) = self
            .directory
            .replica(VolumeId::from_bytes(header.volume), header.extent)
        else {
            return self.reply(&header, Status::NotReplica, 0, None);
        };
        if header.epoch < grant.epoch {
            return self.reply(&header, Status::StaleEpoch, grant.epoch, None);
        }
        if header.epoch > grant.epoch {
            return self.reply(&header, Status::NotReplica, grant.epoch, None);
        }
        let layout = grant.layout;
        let within = header.offset.checked_add(u64::from(header.length));
        let start = header
            .extent
            .checked_mul(layout.extent_size)
            .and_then(|base| base.checked_add(header.offset));
        let (Some(within), Some(start)) = (within, start) else {
            return self.reply(&header, Status::OutOfRange, grant.epoch, None);
        };
        if within > layout.extent_size || start + u64::from(header.length) > layout.size {
            return self.reply(&header, Status::OutOfRange, grant.epoch, None);
        }
        let volume = match self.volume(layout) {
            Ok(volume) => volume,
            Err(error) => {
                tracing::warn!(volume = %layout.id, %error, "cannot open a replicated volume");
                return self.reply(&header, Status::IoError, grant.epoch, None);
            }
        };
        let len = header.length as usize;
        let mut buffer = match header.opcode {
            Opcode::Write => payload,
            Opcode::Read => match self.buffers.take(len) {
                Ok(buffer) => Some(buffer),
                Err(_) => return self.reply(&header, Status::IoError, grant.epoch, None),
            },
            _ => None,
        };
        let segments: Vec<Segment> = buffer
            .as_mut()
            .filter(|_| len > 0)
            .map(|buffer| Segment {
                addr: buffer.as_ptr(),
                len,
            })
            .into_iter()
            .collect();
        let request = match header.opcode {
            Opcode::Read => IoRequest::Read {
                offset: start,
                segments: &segments,
            },
            Opcode::Write => IoRequest::Write {
                offset: start,
                segments: &segments,
                write_through: flags & FLAG_DURABLE != 0,
            },
            Opcode::Flush => IoRequest::Flush,
            Opcode::Discard => IoRequest::Discard {
                offset: start,
                len: u64::from(header.length),
            },
            Opcode::WriteZeroes => IoRequest::WriteZeroes {
                offset: start,
                len: u64::from(header.length),
                may_unmap: false,
            },
            Opcode::Ping => return,
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        // SAFETY: the buffer the segments point into moves into `in_flight` with the request and
        // is dropped only after `reap` reported the tag.
        unsafe { self.io.submit(&volume, request, tag) };
        let header = Header {
            epoch: grant.epoch,
            ..header
        };
        self.in_flight_bytes += u64::from(header.length);
        self.in_flight.insert(tag, InFlight { header, buffer });
    }

    fn volume(&mut self, layout: VolumeLayout) -> Result<Arc<LocalVolume>, crate::StoreError> {
        let now = Instant::now();
        if let Some((volume, used)) = self.volumes.get_mut(&layout.id)
            && volume.layout().size >= layout.size
        {
            *used = now;
            return Ok(Arc::clone(volume));
        }
        let volume = self.pool.open_volume(layout)?;
        self.volumes.insert(layout.id, (Arc::clone(&volume), now));
        Ok(volume)
    }

    fn finish(&mut self, tag: u64, result: Result<(), IoError>) {
        let Some(done) = self.in_flight.remove(&tag) else {
            return;
        };
        self.in_flight_bytes -= u64::from(done.header.length);
        let status = match &result {
            Ok(()) => Status::Ok,
            Err(IoError::NoSpace { .. }) => Status::NoSpace,
            Err(IoError::OutOfRange { .. }) => Status::OutOfRange,
            Err(IoError::Misaligned { .. }) => Status::Unsupported,
            Err(IoError::Io(_) | IoError::Replica(_)) => Status::IoError,
        };
        if let Err(error) = &result {
            tracing::debug!(volume = %VolumeId::from_bytes(done.header.volume), extent = done.header.extent, %error, "replica I/O failed");
        }
        let data = match (done.header.opcode, status) {
            (Opcode::Read, Status::Ok) => done.buffer.as_ref(),
            _ => None,
        };
        self.reply(&done.header, status, done.header.epoch, data);
        if let Some(buffer) = done.buffer {
            self.buffers.give(buffer);
        }
    }

    fn reply(&mut self, request: &Header, status: Status, epoch: u64, data: Option<&AlignedBuf>) {
        if self.broken {
            return;
        }
        let payload = data.map_or(&[][..], |buffer| {
            &buffer.as_slice()[..request.length as usize]
        });
        let header = Header {
            kind: Kind::Reply { status },
            epoch,
            payload: u32::try_from(payload.len()).unwrap_or(0),
            ..*request
        };
        let bytes = frame::encode(&header, payload);
        let sent = self
            .stream
            .write_all(&bytes)
            .and_then(|()| self.stream.write_all(payload));
        if let Err(error) = sent {
            tracing::warn!(%error, "cannot send a replica reply; closing the connection");
            self.broken = true;
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

/// The sending side of one replica connection, blocking and pipelined: any number of requests
/// may be sent before their replies are read, and replies come in completion order (match them
/// by sequence number). The building block of the writer that fans a volume's I/O out to its
/// replicas.
#[derive(Debug)]
pub struct ReplicaConnection {
    stream: TcpStream,
    next_sequence: u64,
}

/// One request to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaRequest {
    pub opcode: Opcode,
    pub volume: VolumeId,
    pub extent: u64,
    pub epoch: u64,
    /// Byte offset within the extent.
    pub offset: u64,
    /// Bytes covered (for a write, the payload's length).
    pub length: u32,
    /// Durable before the reply (write-through).
    pub durable: bool,
}

/// A replica's answer.
#[derive(Debug)]
pub struct ReplicaReply {
    pub sequence: u64,
    pub opcode: Opcode,
    pub status: Status,
    /// The replica's epoch for the extent.
    pub epoch: u64,
    /// A successful read's data.
    pub data: Vec<u8>,
}

impl ReplicaReply {
    fn new(header: &Header, status: Status, data: Vec<u8>) -> Self {
        Self {
            sequence: header.sequence,
            opcode: header.opcode,
            status,
            epoch: header.epoch,
            data,
        }
    }
}

impl ReplicaConnection {
    pub fn connect(address: &str, timeout: Duration) -> io::Result<Self> {
        let address: std::net::SocketAddr = address.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{address}' is not IP:PORT"),
            )
        })?;
        let stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            next_sequence: 1,
        })
    }

    /// Sends a request (with `payload` for a write) and returns its sequence number.
    pub fn send(&mut self, request: &ReplicaRequest, payload: &[u8]) -> io::Result<u64> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let carries_data = request.opcode == Opcode::Write;
        if carries_data && payload.len() != request.length as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a write's payload must be exactly its length",
            ));
        }
        let payload = if carries_data { payload } else { &[] };
        let header = Header {
            opcode: request.opcode,
            kind: Kind::Request {
                flags: if request.durable { FLAG_DURABLE } else { 0 },
            },
            volume: request.volume.into_bytes(),
            extent: request.extent,
            epoch: request.epoch,
            offset: request.offset,
            length: request.length,
            payload: u32::try_from(payload.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "payload too large"))?,
            sequence,
        };
        self.stream.write_all(&frame::encode(&header, payload))?;
        self.stream.write_all(payload)?;
        Ok(sequence)
    }

    /// Reads the next reply. A malformed reply is an error: drop the connection.
    pub fn receive(&mut self) -> io::Result<ReplicaReply> {
        let (bytes, header, status) = self.receive_header()?;
        let mut data = vec![0u8; header.payload as usize];
        self.receive_payload(&bytes, &mut data)?;
        Ok(ReplicaReply::new(&header, status, data))
    }

    /// Reads the next reply, its data (if any) into the start of `into` rather than a new buffer;
    /// returns the reply (with empty `data`) and how many bytes of `into` it filled. Data longer
    /// than `into` is an error, as is anything malformed: drop the connection.
    pub fn receive_into(&mut self, into: &mut [u8]) -> io::Result<(ReplicaReply, usize)> {
        let (bytes, header, status) = self.receive_header()?;
        let len = header.payload as usize;
        let room = into.len();
        let data = into.get_mut(..len).ok_or_else(|| {
            invalid(format!(
                "a reply carries {len} bytes for a {room}-byte buffer"
            ))
        })?;
        self.receive_payload(&bytes, data)?;
        Ok((ReplicaReply::new(&header, status, Vec::new()), len))
    }

    /// Reads a reply's payload into `data` (exactly its length) and checks it against the header.
    fn receive_payload(&mut self, header: &[u8; HEADER_LEN], data: &mut [u8]) -> io::Result<()> {
        self.stream.read_exact(data)?;
        frame::verify(header, data).map_err(invalid)
    }

    /// Reads and checks the next reply's header.
    fn receive_header(&mut self) -> io::Result<([u8; HEADER_LEN], Header, Status)> {
        let mut bytes = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut bytes)?;
        let header = frame::decode(&bytes).map_err(invalid)?;
        let Kind::Reply { status } = header.kind else {
            return Err(invalid(
                "a request frame arrived where only replies are expected",
            ));
        };
        Ok((bytes, header, status))
    }

    /// The socket, to set timeouts.
    pub fn stream_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// The raw socket, for tests that send what a well-behaved peer never would.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

fn invalid(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn spare_buffers_are_reused_by_size_and_bounded() {
        let buffers = Buffers::default();
        let first = buffers.take(8192).unwrap();
        let at = first.as_ptr();
        buffers.give(first);
        // A different size is a new buffer; the same size is the spare one.
        assert_ne!(buffers.take(4096).unwrap().as_ptr(), at);
        assert_eq!(buffers.take(8192).unwrap().as_ptr(), at);
        for _ in 0..SPARE_BUFFERS + 3 {
            buffers.give(AlignedBuf::zeroed(4096).unwrap());
        }
        assert_eq!(buffers.lock().len(), SPARE_BUFFERS);
    }

    /// A connection whose peer sends `replies` (header, then data) and hangs up.
    fn connection_answering(replies: Vec<(Header, Vec<u8>)>) -> ReplicaConnection {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            for (header, data) in replies {
                stream.write_all(&frame::encode(&header, &data)).unwrap();
                stream.write_all(&data).unwrap();
            }
        });
        let connection = ReplicaConnection::connect(&address, Duration::from_secs(5)).unwrap();
        peer.join().unwrap();
        connection
    }

    fn read_reply(sequence: u64, payload: u32) -> Header {
        Header {
            opcode: Opcode::Read,
            kind: Kind::Reply { status: Status::Ok },
            volume: [7; 16],
            extent: 1,
            epoch: 3,
            offset: 0,
            length: payload,
            payload,
            sequence,
        }
    }

    #[test]
    fn a_reply_lands_in_the_callers_buffer_and_one_too_large_for_it_is_refused() {
        let mut connection = connection_answering(vec![
            (read_reply(1, 4), vec![1, 2, 3, 4]),
            (read_reply(2, 16), vec![9; 16]),
        ]);
        let mut buffer = [0u8; 8];
        let (reply, read) = connection.receive_into(&mut buffer).unwrap();
        assert_eq!((reply.sequence, reply.status, read), (1, Status::Ok, 4));
        assert_eq!(buffer, [1, 2, 3, 4, 0, 0, 0, 0]);
        let error = connection.receive_into(&mut buffer).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }
}
