//! Per-volume I/O counters and a latency histogram.
//!
//! Owned by each `LocalVolume`; the device records every finished request with
//! [`VolumeStats::record`], vstore itself counts writes that found the pool full. Readers
//! (`/metrics`, `vessel volume show`) take a [`StatsSnapshot`]. Plain relaxed atomics: a
//! snapshot is not one instant across counters, but each counter only grows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in microseconds, of the latency buckets: powers of two from 16 µs to about
/// 1 s; a last bucket (+Inf) takes the rest. Chosen for Prometheus histograms.
pub const LATENCY_BUCKETS_US: [u64; 17] = [
    16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072,
    262_144, 524_288, 1_048_576,
];
const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// The kind of a finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

/// Counters of one volume. All methods are lock-free.
#[derive(Debug)]
pub struct VolumeStats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    get_ids: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: AtomicU64,
    no_space_errors: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS],
    latency_sum_us: AtomicU64,
}

impl Default for VolumeStats {
    fn default() -> Self {
        Self {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            write_zeroes: AtomicU64::new(0),
            get_ids: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            no_space_errors: AtomicU64::new(0),
            latency_buckets: [const { AtomicU64::new(0) }; BUCKETS],
            latency_sum_us: AtomicU64::new(0),
        }
    }
}

/// Index of the bucket holding a latency of `us` microseconds.
fn bucket_of(us: u64) -> usize {
    if us <= LATENCY_BUCKETS_US[0] {
        return 0;
    }
    // ceil(log2(us)) - 4: 17..=32 µs land in bucket 1 (bound 32), and so on.
    let ceil_log2 = (u64::BITS - (us - 1).leading_zeros()) as usize;
    (ceil_log2 - 4).min(BUCKETS - 1)
}

impl VolumeStats {
    /// Records one finished request: `bytes` moved (counted for successful reads and writes),
    /// its latency from arrival to completion, and whether it succeeded.
    pub fn record(&self, op: OpKind, bytes: u64, latency: Duration, ok: bool) {
        let counter = match op {
            OpKind::Read => &self.reads,
            OpKind::Write => &self.writes,
            OpKind::Flush => &self.flushes,
            OpKind::Discard => &self.discards,
            OpKind::WriteZeroes => &self.write_zeroes,
            OpKind::GetId => &self.get_ids,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if ok {
            match op {
                OpKind::Read => self.read_bytes.fetch_add(bytes, Ordering::Relaxed),
                OpKind::Write => self.write_bytes.fetch_add(bytes, Ordering::Relaxed),
                _ => 0,
            };
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Counts a write that found the pool full. vstore calls this itself when a write fails
    /// with `IoError::NoSpace`; a frontend need not (and should not) call it for those.
    pub fn record_no_space(&self) {
        self.no_space_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counts: Vec<u64> = self.latency_buckets.iter().map(load).collect();
        StatsSnapshot {
            reads: load(&self.reads),
            writes: load(&self.writes),
            flushes: load(&self.flushes),
            discards: load(&self.discards),
            write_zeroes: load(&self.write_zeroes),
            get_ids: load(&self.get_ids),
            read_bytes: load(&self.read_bytes),
            write_bytes: load(&self.write_bytes),
            errors: load(&self.errors),
            no_space_errors: load(&self.no_space_errors),
            latency: LatencyHistogram {
                count: counts.iter().sum(),
                counts,
                sum_us: load(&self.latency_sum_us),
            },
        }
    }
}

/// The counters of a volume at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_ids: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests that finished with an error (of any kind, `no_space_errors` included).
    pub errors: u64,
    /// Writes that failed because the pool had no free extent.
    pub no_space_errors: u64,
    pub latency: LatencyHistogram,
}

/// Request latencies: one count per bucket of [`LATENCY_BUCKETS_US`] plus a last +Inf bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Requests per bucket (not cumulative); `counts.len() == LATENCY_BUCKETS_US.len() + 1`.
    pub counts: Vec<u64>,
    /// Total requests: the sum of `counts`.
    pub count: u64,
    /// Sum of all latencies, in microseconds.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// (upper bound in µs, requests at or below it) per bucket, as Prometheus `le` buckets
    /// want them; `None` is +Inf and its count equals `count`.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut total = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                total += n;
                (LATENCY_BUCKETS_US.get(i).copied(), total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_their_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(16), 0);
        assert_eq!(bucket_of(17), 1);
        assert_eq!(bucket_of(32), 1);
        assert_eq!(bucket_of(33), 2);
        assert_eq!(bucket_of(1_048_576), 16);
        assert_eq!(bucket_of(1_048_577), 17);
        assert_eq!(bucket_of(u64::MAX), 17);
        for (i, &bound) in LATENCY_BUCKETS_US.iter().enumerate() {
            assert_eq!(bucket_of(bound), i);
            assert_eq!(bucket_of(bound + 1), i + 1);
        }
    }

    #[test]
    fn record_counts_ops_bytes_errors_and_latency() {
        let stats = VolumeStats::default();
        stats.record(OpKind::Read, 4096, Duration::from_micros(10), true);
        stats.record(OpKind::Read, 4096, Duration::from_micros(100), false);
        stats.record(OpKind::Write, 8192, Duration::from_millis(3), true);
        stats.record(OpKind::Flush, 0, Duration::from_secs(5), true);
        stats.record(OpKind::Discard, 1 << 20, Duration::ZERO, true);
        stats.record(OpKind::WriteZeroes, 1 << 20, Duration::ZERO, true);
        stats.record(OpKind::GetId, 20, Duration::ZERO, true);
        stats.record_no_space();
        let s = stats.snapshot();
        assert_eq!(
            (
                s.reads,
                s.writes,
                s.flushes,
                s.discards,
                s.write_zeroes,
                s.get_ids
            ),
            (2, 1, 1, 1, 1, 1)
        );
        assert_eq!((s.read_bytes, s.write_bytes), (4096, 8192));
        assert_eq!((s.errors, s.no_space_errors), (1, 1));
        assert_eq!(s.latency.count, 7);
        assert_eq!(s.latency.sum_us, 10 + 100 + 3000 + 5_000_000);
        let cumulative = s.latency.cumulative();
        assert_eq!(cumulative.len(), LATENCY_BUCKETS_US.len() + 1);
        assert_eq!(cumulative[0], (Some(16), 4));
        assert_eq!(cumulative[3], (Some(128), 5));
        assert_eq!(cumulative[8], (Some(4096), 6));
        assert_eq!(cumulative[16], (Some(1_048_576), 6));
        assert_eq!(cumulative[17], (None, 7));
    }
}
