//! The writer task: group commit to the cluster, in rounds.
//!
//! Everything queued becomes one round. Within a round, submissions of one
//! lane (group) are written one batch after another and lanes go
//! concurrently; a barrier submission (several groups) is written alone.
//! Callbacks run in submission order after the round: success up to the
//! first failure, that failure's error, then `Poisoned` — and the store
//! refuses writes from then on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::mpsc;

use super::exec_err;
use super::statements::{self, Lane, Shape, Statement};
use crate::stats::CommitStats;
use crate::{DurableCallback, StorageError};

/// What the store hands its writer task.
pub(crate) enum Job {
    /// A submission: its statements, its lane, its callback and when it
    /// was submitted.
    Write {
        statements: Vec<Statement>,
        lane: Lane,
        done: DurableCallback,
        submitted: Instant,
    },
    /// Report once everything before it is durable.
    Flush(DurableCallback),
    /// Stop after what came before.
    Stop,
}

/// Where the writer sends one batch: the cluster, or a test double.
pub(crate) trait BatchSink: Send + Sync + 'static {
    /// Writes `statements` atomically (one statement, an unlogged batch of
    /// one partition, or a logged batch).
    fn write(
        &self,
        statements: &[&Statement],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// The writer task's state.
pub(crate) struct Writer<S> {
    pub(crate) sink: S,
    pub(crate) max_batch: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) retry_window: Duration,
    pub(crate) poisoned: Arc<AtomicBool>,
    pub(crate) buckets: Arc<DashMap<u64, Vec<u64>>>,
    /// Rounds, submissions and statements acknowledged, and each
    /// submission's time to durability.
    pub(crate) stats: Arc<CommitStats>,
}

/// Most statements in one batch (ScyllaDB and Cassandra warn on larger).
const MAX_BATCH_STATEMENTS: usize = 256;

impl<S: BatchSink> Writer<S> {
    /// Writes rounds until [`Job::Stop`] or until every sender is gone.
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Job>) {
        // A round's writes and its callbacks, kept apart: callbacks are not
        // `Sync`, and the writes are borrowed across awaits.
        let mut writes: Vec<(Lane, Vec<Statement>)> = Vec::with_capacity(self.max_batch);
        // When each submission came (`None` for a flush).
        let mut dones: Vec<(DurableCallback, Option<Instant>)> = Vec::with_capacity(self.max_batch);
        let mut stop = false;
        while !stop {
            let take =
                |job: Job,
                 writes: &mut Vec<(Lane, Vec<Statement>)>,
                 dones: &mut Vec<(DurableCallback, Option<Instant>)>| match job {
                    Job::Write {
                        statements,
                        lane,
                        done,
                        submitted,
                    } => {
                        writes.push((lane, statements));
                        dones.push((done, Some(submitted)));
                        true
                    }
                    Job::Flush(done) => {
                        writes.push((Lane::Shop, Vec::new()));
                        dones.push((done, None));
                        true
                    }
                    Job::Stop => false,
                };
            match rx.recv().await {
                None => break,
                Some(job) => {
                    if !take(job, &mut writes, &mut dones) {
                        break;
                    }
                }
            }
            while dones.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => {
                        if !take(job, &mut writes, &mut dones) {
                            stop = true;
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let failed = if self.poisoned.load(Ordering::Acquire) {
                Some((0, StorageError::Poisoned))
            } else {
                self.round(&writes).await
            };
            tracing::trace!(
                jobs = dones.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "scylla write round"
            );
            if let Some((_, e)) = &failed {
                if !matches!(e, StorageError::Poisoned) {
                    tracing::error!(error = %e, "store write failed; refusing all further writes until restart");
                }
                self.poisoned.store(true, Ordering::Release);
            }
            // Buckets registered by acknowledged submissions need no more
            // registering.
            let acknowledged = failed.as_ref().map_or(writes.len(), |(at, _)| *at);
            self.count(&writes[..acknowledged], &dones[..acknowledged]);
            for (_, statements) in &writes[..acknowledged] {
                for (g, b) in statements.iter().filter_map(Statement::registered_bucket) {
                    let mut known = self.buckets.entry(g).or_default();
                    if !known.contains(&b) {
                        known.push(b);
                    }
                }
            }
            writes.clear();
            for (i, (done, _)) in dones.drain(..).enumerate() {
                done(match &failed {
                    Some((at, e)) if i == *at => Err(e.duplicate()),
                    Some((at, _)) if i > *at => Err(StorageError::Poisoned),
                    _ => Ok(()),
                });
            }
        }
        tracing::debug!("scylla store writer stopped");
    }

    /// Counts the acknowledged submissions of a round in [`CommitStats`]:
    /// the round, its submissions, their statements and each one's time to
    /// durability. Flushes are not submissions.
    fn count(
        &self,
        writes: &[(Lane, Vec<Statement>)],
        dones: &[(DurableCallback, Option<Instant>)],
    ) {
        let statements = writes.iter().map(|(_, written)| written.len()).sum();
        self.stats
            .committed(dones.iter().filter_map(|(_, at)| *at), statements);
    }

    /// Writes one round. Returns the first failed submission (in submission
    /// order) and its error; everything before it is durable.
    async fn round(&self, jobs: &[(Lane, Vec<Statement>)]) -> Option<(usize, StorageError)> {
        let mut start = 0;
        while start < jobs.len() {
            // A segment ends before a barrier; a barrier is a segment alone.
            let is_barrier = |j: &(Lane, Vec<Statement>)| j.0 == Lane::Barrier;
            let end = if is_barrier(&jobs[start]) {
                start + 1
            } else {
                jobs[start..]
                    .iter()
                    .position(is_barrier)
                    .map_or(jobs.len(), |p| start + p)
            };
            if let Some(failed) = self.segment(jobs, start..end).await {
                return Some(failed);
            }
            start = end;
        }
        None
    }

    /// Writes `range` of `jobs`: lanes concurrently, each lane in order.
    async fn segment(
        &self,
        jobs: &[(Lane, Vec<Statement>)],
        range: std::ops::Range<usize>,
    ) -> Option<(usize, StorageError)> {
        let mut lanes: HashMap<Lane, Vec<usize>> = HashMap::new();
        for i in range {
            let (lane, statements) = &jobs[i];
            if !statements.is_empty() {
                lanes.entry(*lane).or_default().push(i);
            }
        }
        let results = futures_util::future::join_all(lanes.into_values().map(|lane| async move {
            // Consecutive submissions of a lane share one batch (atomic),
            // so a busy group costs one round trip per batch, not per
            // message; batches of a lane go one after another.
            let subs: Vec<&[Statement]> = lane.iter().map(|&i| &jobs[i].1[..]).collect();
            for run in statements::runs(&subs, self.max_batch_bytes, MAX_BATCH_STATEMENTS) {
                let batch: Vec<&Statement> =
                    subs[run.clone()].iter().flat_map(|s| s.iter()).collect();
                if let Err(e) = self.write_with_retry(&batch).await {
                    return Some((lane[run.start], e));
                }
            }
            None
        }))
        .await;
        results.into_iter().flatten().min_by_key(|(i, _)| *i)
    }

    async fn write_with_retry(&self, statements: &[&Statement]) -> Result<(), StorageError> {
        let deadline = Instant::now() + self.retry_window;
        let mut pause = Duration::from_millis(10);
        loop {
            match self.sink.write(statements).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && Instant::now() + pause < deadline => {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "store write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The cluster: prepared write statements on a driver session.
pub(crate) struct CqlSink {
    pub(crate) session: Arc<Session>,
    /// One per [`statements::Write`], in [`statements::Write::ALL`] order.
    pub(crate) writes: Vec<PreparedStatement>,
}

impl BatchSink for CqlSink {
    async fn write(&self, statements: &[&Statement]) -> Result<(), StorageError> {
        let batch_type = match statements::shape(statements.iter().copied()) {
            Shape::Empty => return Ok(()),
            Shape::Single => {
                let s = statements[0];
                self.session
                    .execute_unpaged(&self.writes[s.write.index()], &s.values)
                    .await
                    .map_err(|e| exec_err("write", e))?;
                return Ok(());
            }
            Shape::SamePartition => BatchType::Unlogged,
            Shape::Logged => BatchType::Logged,
        };
        let mut batch = Batch::new(batch_type);
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(statements.len());
        for s in statements {
            batch.append_statement(self.writes[s.write.index()].clone());
            values.push(&s.values);
        }
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| exec_err("write batch", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
