#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::*;
use crate::WriteOp;
use crate::records::MessageRecord;

/// How the double answers a batch, given its messages.
type Rule = Box<dyn FnMut(&[(u64, u64)]) -> Result<(), StorageError> + Send>;

/// A test double for the cluster: records every batch it is handed (as
/// `(group, seq)` of its messages) and answers with `rule`.
struct SinkDouble {
    attempts: Mutex<Vec<Vec<(u64, u64)>>>,
    rule: Mutex<Rule>,
}

fn messages(statements: &[&Statement]) -> Vec<(u64, u64)> {
    statements
        .iter()
        .filter(|s| s.write == statements::Write::AppendMessage)
        .map(|s| match (&s.values[0], &s.values[2]) {
            (scylla::value::CqlValue::BigInt(g), scylla::value::CqlValue::BigInt(q)) => {
                (*g as u64, *q as u64)
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

impl BatchSink for Arc<SinkDouble> {
    async fn write(&self, statements: &[&Statement]) -> Result<(), StorageError> {
        let batch = messages(statements);
        self.attempts.lock().unwrap().push(batch.clone());
        (self.rule.lock().unwrap())(&batch)
    }
}

fn sink(
    rule: impl FnMut(&[(u64, u64)]) -> Result<(), StorageError> + Send + 'static,
) -> Arc<SinkDouble> {
    Arc::new(SinkDouble {
        attempts: Mutex::new(Vec::new()),
        rule: Mutex::new(Box::new(rule)),
    })
}

fn msg(group_id: u64, seq: u64) -> WriteOp {
    WriteOp::AppendMessage(MessageRecord {
        group_id,
        seq,
        text: "x".into(),
        ..Default::default()
    })
}

type Done = oneshot::Receiver<Result<(), StorageError>>;

fn job(ops: Vec<WriteOp>, new_bucket: bool) -> (Job, Done) {
    let mut out = Vec::new();
    for op in &ops {
        statements::statements(op, |_, _| new_bucket, &mut out).unwrap();
    }
    let (tx, rx) = oneshot::channel();
    (
        Job::Write {
            lane: statements::lane(&ops),
            statements: out,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
            submitted: std::time::Instant::now(),
        },
        rx,
    )
}

struct Run {
    sink: Arc<SinkDouble>,
    stats: Arc<CommitStats>,
    poisoned: Arc<AtomicBool>,
    buckets: Arc<DashMap<u64, Vec<u64>>>,
    results: Vec<Result<(), StorageError>>,
}

/// Queues every job, then runs the writer until they are all reported:
/// they form one round.
async fn run(sink: Arc<SinkDouble>, retry_window: Duration, jobs: Vec<Vec<WriteOp>>) -> Run {
    let (tx, rx) = mpsc::channel(64);
    let mut dones = Vec::new();
    for ops in jobs {
        let (j, done) = job(ops, true);
        tx.try_send(j).unwrap();
        dones.push(done);
    }
    tx.try_send(Job::Stop).unwrap();
    let poisoned = Arc::new(AtomicBool::new(false));
    let buckets = Arc::new(DashMap::new());
    let stats = Arc::new(CommitStats::default());
    Writer {
        sink: sink.clone(),
        max_batch: 64,
        max_batch_bytes: 32 * 1024,
        retry_window,
        poisoned: poisoned.clone(),
        buckets: buckets.clone(),
        stats: stats.clone(),
    }
    .run(rx)
    .await;
    let mut results = Vec::new();
    for d in dones {
        results.push(d.await.unwrap());
    }
    Run {
        sink,
        stats,
        poisoned,
        buckets,
        results,
    }
}

fn attempts(r: &Run) -> Vec<Vec<(u64, u64)>> {
    let mut a = r.sink.attempts.lock().unwrap().clone();
    a.sort();
    a
}

#[tokio::test]
async fn a_round_writes_each_group_in_order_and_merges_its_consecutive_submissions() {
    let r = run(
        sink(|_| Ok(())),
        Duration::from_secs(1),
        vec![
            vec![msg(1, 1)],
            vec![msg(2, 1)],
            vec![msg(1, 2)],
            vec![msg(1, 3)],
            vec![msg(2, 2)],
        ],
    )
    .await;
    assert!(r.results.iter().all(Result::is_ok), "{:?}", r.results);
    assert_eq!(
        attempts(&r),
        [vec![(1, 1), (1, 2), (1, 3)], vec![(2, 1), (2, 2)]],
        "one batch per group, in submission order"
    );
    assert!(!r.poisoned.load(Ordering::SeqCst));
    // One round, five submissions, each timed.
    assert_eq!((r.stats.commits(), r.stats.submissions()), (1, 5));
    assert!(r.stats.writes() >= 5, "{}", r.stats.writes());
    assert_eq!(r.stats.durable_latency().count(), 5);
}

#[tokio::test]
async fn a_submission_of_several_groups_is_written_alone_between_its_neighbours() {
    let r = run(
        sink(|_| Ok(())),
        Duration::from_secs(1),
        vec![vec![msg(1, 1)], vec![msg(1, 2), msg(2, 1)], vec![msg(1, 3)]],
    )
    .await;
    assert!(r.results.iter().all(Result::is_ok));
    assert_eq!(
        *r.sink.attempts.lock().unwrap(),
        [vec![(1, 1)], vec![(1, 2), (2, 1)], vec![(1, 3)]],
        "the barrier must not be merged or reordered"
    );
}

#[tokio::test]
async fn a_failure_acknowledges_what_came_before_and_refuses_everything_after() {
    let r = run(
        sink(|batch| {
            if batch.contains(&(2, 1)) {
                Err(StorageError::Schema("table dropped".into()))
            } else {
                Ok(())
            }
        }),
        Duration::from_secs(1),
        vec![vec![msg(1, 1)], vec![msg(2, 1)], vec![msg(1, 2)]],
    )
    .await;
    assert!(r.results[0].is_ok(), "{:?}", r.results);
    assert!(
        matches!(r.results[1], Err(StorageError::Schema(_))),
        "{:?}",
        r.results
    );
    assert!(
        matches!(r.results[2], Err(StorageError::Poisoned)),
        "a later submission is never acknowledged after an earlier failure: {:?}",
        r.results
    );
    assert!(r.poisoned.load(Ordering::SeqCst));
    assert!(
        !r.buckets.contains_key(&2),
        "a failed submission's bucket is not registered"
    );
    assert_eq!(r.buckets.get(&1).unwrap().clone(), [0]);
    // Only the acknowledged submission counts as durable.
    assert_eq!(r.stats.submissions(), 1);
    assert_eq!(r.stats.durable_latency().count(), 1);
}

#[tokio::test]
async fn a_timeout_is_retried_until_the_write_lands() {
    let mut failures = 2;
    let r = run(
        sink(move |_| {
            if failures > 0 {
                failures -= 1;
                Err(StorageError::Timeout { op: "write" })
            } else {
                Ok(())
            }
        }),
        Duration::from_secs(5),
        vec![vec![msg(1, 1)]],
    )
    .await;
    assert!(r.results[0].is_ok(), "{:?}", r.results);
    assert_eq!(r.sink.attempts.lock().unwrap().len(), 3);
    assert!(!r.poisoned.load(Ordering::SeqCst));
}

#[tokio::test]
async fn retries_end_with_the_window_and_the_error_is_reported() {
    let r = run(
        sink(|_| {
            Err(StorageError::Unavailable {
                op: "write",
                detail: "1 of 3 replicas".into(),
            })
        }),
        Duration::from_millis(30),
        vec![vec![msg(1, 1)], vec![msg(1, 2)]],
    )
    .await;
    assert!(
        matches!(r.results[0], Err(StorageError::Unavailable { .. })),
        "{:?}",
        r.results
    );
    assert!(matches!(r.results[1], Err(StorageError::Poisoned)));
    assert!(r.poisoned.load(Ordering::SeqCst));
    let tries = r.sink.attempts.lock().unwrap().len();
    assert!(
        (2..10).contains(&tries),
        "{tries} attempts in a 30 ms window"
    );
}

#[tokio::test]
async fn a_non_retryable_error_is_not_retried() {
    let r = run(
        sink(|_| Err(StorageError::Schema("no such table".into()))),
        Duration::from_secs(5),
        vec![vec![msg(1, 1)]],
    )
    .await;
    assert!(r.results[0].is_err());
    assert_eq!(r.sink.attempts.lock().unwrap().len(), 1);
}
