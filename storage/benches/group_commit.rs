//! Durable appends through the embedded store's group commit.
//!
//! `cargo bench -p qun-storage --bench group_commit [-- APPENDS GROUPS IN_FLIGHT TEXT_BYTES [PARTITIONS [KEYS]]]`
//!
//! Opens the real fjall store (fsync on, as in production) in a temporary
//! folder and appends APPENDS messages round-robin over GROUPS groups, each
//! submission shaped like a real send: the message (with its client message
//! id, so the idempotency index entry is written too) and the sender's read
//! mark. IN_FLIGHT submissions are kept outstanding at once, as many phones
//! do; each is timed from `submit` to its durability callback.
//!
//! PARTITIONS (default: the number of cores, as the server does) is the
//! store's partition count: each partition has its own journal and writer
//! thread. Every group is of its own shop, so the groups spread over the
//! partitions as a server's many shops do.
//!
//! KEYS is what each submission writes: 3 (the default) a real send as
//! above; 2 the message and its idempotency entry, without the read mark;
//! 1 the message alone, with no client message id and no read mark (what
//! an append costs the store by itself, for comparison).
//!
//! Prints durable appends per second, the append-to-durable latency
//! percentiles, and how many appends each group commit carried (the
//! store's own counters). Progress goes to stderr every second.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use qun_storage::records::{GroupRecord, MessageRecord};
use qun_storage::{FjallConfig, FjallStore, Store, StoreExt, WriteOp};
use tokio::sync::Semaphore;

/// The allocator the `qun` binary uses, so the bench measures the store
/// as the server runs it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let appends = args.first().copied().unwrap_or(300_000);
    let groups = args.get(1).copied().unwrap_or(100).max(1);
    let in_flight = args.get(2).copied().unwrap_or(8_192).max(1);
    let text_bytes = args.get(3).copied().unwrap_or(100) as usize;
    let partitions = args
        .get(4)
        .map_or_else(|| FjallConfig::new(".").partitions, |p| *p as usize);
    let keys = args.get(5).copied().unwrap_or(3).clamp(1, 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(
        appends, groups, in_flight, text_bytes, partitions, keys,
    ));
}

async fn run(
    appends: u64,
    groups: u64,
    in_flight: u64,
    text_bytes: usize,
    partitions: usize,
    keys: u64,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = FjallConfig::new(dir.path());
    config.partitions = partitions;
    let store = FjallStore::open(config).unwrap();
    store
        .write(
            (1..=groups)
                .map(|g| {
                    WriteOp::PutGroup(GroupRecord {
                        group_id: g,
                        shop_id: format!("shop-{g}"),
                        ..Default::default()
                    })
                })
                .collect(),
        )
        .await
        .unwrap();
    let permits = Arc::new(Semaphore::new(in_flight as usize));
    let latencies = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let done = Arc::new(AtomicU64::new(0));
    let text = "x".repeat(text_bytes);
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                eprintln!("  {} / {appends} durable", done.load(Ordering::Relaxed));
            }
        })
    };
    let started = Instant::now();
    for n in 0..appends {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let group_id = 1 + n % groups;
        let seq = 1 + n / groups;
        let sender = format!("buyer-{}", n % 997);
        let mut ops = vec![WriteOp::AppendMessage(MessageRecord {
            group_id,
            seq,
            sender_id: sender.clone(),
            sender_name: "Buyer".into(),
            sender_role: 1,
            kind: 1,
            text: text.clone(),
            ts_ms: 1_700_000_000_000 + n,
            client_msg_id: if keys >= 2 {
                // As the Rust client makes them (128 random bits, hex), so
                // the idempotency key is as long as a real one and lands
                // where a real one would: spread over the keyspace.
                format!(
                    "{:032x}",
                    (n as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                )
            } else {
                String::new()
            },
            ..Default::default()
        })];
        if keys == 3 {
            ops.push(WriteOp::PutReadMark {
                group_id,
                user_id: sender,
                seq,
            });
        }
        let submitted = Instant::now();
        let latencies = latencies.clone();
        let done = done.clone();
        store
            .submit(
                ops,
                Box::new(move |r| {
                    r.unwrap();
                    let us = submitted.elapsed().as_micros() as u64;
                    latencies.lock().unwrap().record(us.max(1)).unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                }),
            )
            .unwrap_or_else(|e| panic!("submit refused ({e}); lower IN_FLIGHT"));
    }
    // Wait for the last callbacks: every permit back.
    let _all = permits.acquire_many(in_flight as u32).await.unwrap();
    let elapsed = started.elapsed();
    progress.abort();
    let h = latencies.lock().unwrap().clone();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "group_commit appends={appends} groups={groups} in_flight={in_flight} text_bytes={text_bytes} partitions={} keys={}",
        store.partitions(),
        match keys {
            3 => "send (3)",
            2 => "message and idempotency entry (2)",
            _ => "message (1)",
        }
    );
    println!(
        "  elapsed {:.2} s, {:.0} durable appends/s",
        elapsed.as_secs_f64(),
        appends as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  append-to-durable p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
    let stats = store.commit_stats();
    println!(
        "  {} group commits (fsyncs), {:.0} appends and {:.0} keys per commit",
        stats.commits(),
        stats.submissions() as f64 / stats.commits().max(1) as f64,
        stats.writes() as f64 / stats.commits().max(1) as f64,
    );
    let mean_us = |h: &qun_storage::stats::LatencyHistogram| h.sum_us() / h.count().max(1);
    println!(
        "  a commit's batch written in {} µs, its journal persisted in {} µs (means)",
        mean_us(stats.write_phase()),
        mean_us(stats.persist_phase()),
    );
    store.close().await.unwrap();
}
