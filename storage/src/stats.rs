//! Counters of the stores' write paths, read by the server's `/metrics`.
//!
//! Everything here is plain atomics, bumped with relaxed increments by the
//! threads that do the work and read whenever the page is rendered: no
//! lock, nothing allocated per observation.
//!
//! ```
//! use qun_storage::stats::LatencyHistogram;
//! use std::time::Duration;
//!
//! let h = LatencyHistogram::default();
//! h.observe(Duration::from_millis(3));
//! h.observe(Duration::from_secs(9));
//! assert_eq!(h.count(), 2);
//! let counts: Vec<u64> = h.counts().collect();
//! // 3 ms falls in the bucket up to 5 ms; 9 s in the last, unbounded one.
//! let five_ms = qun_storage::stats::BUCKET_BOUNDS_US.iter().position(|&b| b == 5_000);
//! assert_eq!(counts[five_ms.unwrap()], 1);
//! assert_eq!(counts[counts.len() - 1], 1);
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Upper bounds of [`LatencyHistogram`]'s buckets, in microseconds; a last
/// bucket above them holds the rest. Finer from 10 to 100 ms, where a busy
/// server's tail and the 50 ms a push should take at p99 lie: a bucket up
/// to 25 ms and the next up to 50 could not tell 26 ms from 49.
pub const BUCKET_BOUNDS_US: [u64; 18] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 75_000,
    100_000, 250_000, 500_000, 1_000_000, 2_500_000,
];

/// A latency histogram in Prometheus's sense: a count per bucket and a sum,
/// all atomics, so observing is two relaxed increments and never a lock.
/// Buckets run from 250 µs to 2.5 s ([`BUCKET_BOUNDS_US`]).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is above
    /// every bound.
    buckets: [AtomicU64; BUCKET_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKET_BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations per bucket, not cumulative, in the order of
    /// [`BUCKET_BOUNDS_US`] and then the bucket above them.
    pub fn counts(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets.iter().map(|b| b.load(Relaxed))
    }

    /// How many observations there are.
    pub fn count(&self) -> u64 {
        self.counts().sum()
    }

    /// The sum of every observation, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }
}

/// What a store's writers have made durable.
///
/// In the embedded store a *commit* is one group commit of one partition:
/// one atomic batch and one journal fsync, however many submissions it
/// carries; *writes* are keys. In the cluster store a commit is one round
/// of the writer task (batches of many groups written concurrently), and
/// writes are statements. The latency is per submission (in the embedded
/// store, per partition's part of one), from
/// [`Store::submit`](crate::Store::submit) to durable: queueing behind
/// other commits included.
#[derive(Debug, Default)]
pub struct CommitStats {
    commits: AtomicU64,
    submissions: AtomicU64,
    writes: AtomicU64,
    durable: LatencyHistogram,
    write_phase: LatencyHistogram,
    persist_phase: LatencyHistogram,
}

impl CommitStats {
    /// Group commits made durable.
    pub fn commits(&self) -> u64 {
        self.commits.load(Relaxed)
    }

    /// Submissions made durable.
    pub fn submissions(&self) -> u64 {
        self.submissions.load(Relaxed)
    }

    /// Keys (embedded) or statements (cluster) those submissions wrote.
    pub fn writes(&self) -> u64 {
        self.writes.load(Relaxed)
    }

    /// Time from each submission to its durability.
    pub fn durable_latency(&self) -> &LatencyHistogram {
        &self.durable
    }

    /// Time each embedded group commit spent writing its batch (into the
    /// memtables and the journal's buffer, waiting for fjall's locks
    /// included). Empty for the cluster store.
    pub fn write_phase(&self) -> &LatencyHistogram {
        &self.write_phase
    }

    /// Time each embedded group commit spent persisting the journal (its
    /// fsync, when `fsync` is on). Empty for the cluster store. Beside
    /// [`CommitStats::write_phase`] it tells a slow disk from a store busy
    /// flushing or compacting.
    pub fn persist_phase(&self) -> &LatencyHistogram {
        &self.persist_phase
    }

    /// Records how long one embedded group commit took to write its batch
    /// and to persist the journal.
    pub(crate) fn phases(&self, write: Duration, persist: Duration) {
        self.write_phase.observe(write);
        self.persist_phase.observe(persist);
    }

    /// Counts one group commit, durable now, of the submissions made at
    /// `submitted`, carrying `writes` keys or statements; a commit of no
    /// submission (a flush alone) is not counted.
    pub(crate) fn committed(&self, submitted: impl IntoIterator<Item = Instant>, writes: usize) {
        let durable = Instant::now();
        let mut submissions = 0u64;
        for at in submitted {
            submissions += 1;
            self.durable.observe(durable.saturating_duration_since(at));
        }
        if submissions > 0 {
            self.commits.fetch_add(1, Relaxed);
            self.submissions.fetch_add(submissions, Relaxed);
            self.writes.fetch_add(writes as u64, Relaxed);
        }
    }
}
