//! Group-buy join throughput on one group-buy: the flash-sale hot spot.
//!
//! `cargo bench -p qun-chat-core --bench group_buy_join [-- BUYERS SLOTS]`
//!
//! Opens the real embedded store (fsync on, as in production) in a
//! temporary folder, admits BUYERS buyers to one group, starts one
//! group-buy with SLOTS slots, then lets every buyer join at the same
//! moment from concurrent tasks. Reports joins per second (answered joins,
//! winners and sold-out answers alike) and the latency of an answered join,
//! with the progress events the crowd caused. No sockets: this measures
//! chat-core and the store; `qun-loadtest` measures the whole server.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qun_chat_core::{
    ConnId, CoreConfig, Groups, Identity, NewGroup, Outbox, OutboxLimits, Role, Subscriber,
};
use qun_proto::v1;
use qun_storage::{FjallConfig, FjallStore};

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let buyers = args.first().copied().unwrap_or(20_000);
    let slots = args.get(1).copied().unwrap_or(5_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(buyers, slots));
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn run(buyers: u32, slots: u32) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FjallStore::open(FjallConfig::new(dir.path())).unwrap());
    let config = CoreConfig {
        max_members_limit: 100_000,
        ..CoreConfig::default()
    };
    let groups = Groups::open(store, config).await.unwrap();
    let agent = Identity::new("a1", "Agent", Role::Agent, Some("shop-1".into())).unwrap();
    let group_id = groups
        .create_group(
            &agent,
            NewGroup {
                name: "Flash sale".into(),
                max_members: 100_000,
                shop_id: None,
            },
            now_ms(),
        )
        .await
        .unwrap()
        .group_id;
    eprintln!("admitting {buyers} buyers to group {group_id}...");
    let started = Instant::now();
    let mut admitted = 0;
    for chunk in (0..buyers).collect::<Vec<_>>().chunks(1_000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let groups = groups.clone();
                tokio::spawn(async move {
                    let b = Identity::new(format!("b{i}"), "Buyer", Role::Buyer, None).unwrap();
                    // Members without a connection: the fan-out cost is
                    // measured by qun-loadtest, not here.
                    let outbox = Outbox::new(OutboxLimits::default());
                    let sub = Subscriber::new(ConnId(u64::from(i)), b.user_id(), outbox);
                    groups.join(&b, group_id, sub, now_ms()).await.unwrap();
                    groups.unsubscribe(ConnId(u64::from(i)), group_id);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        admitted += chunk.len();
        eprintln!("  {admitted}/{buyers} admitted ({:.1?})", started.elapsed());
    }
    groups
        .put_product(
            &agent,
            v1::Product {
                product_id: "sku-1".into(),
                title: "Phone".into(),
                price_minor: 599_900,
                ..Default::default()
            },
            now_ms(),
        )
        .await
        .unwrap();
    let id = groups
        .start_group_buy(
            &agent,
            v1::StartGroupBuy {
                group_id,
                product_id: "sku-1".into(),
                price_minor: 499_900,
                target: 2,
                slots,
                starts_at_ms: 0,
                deadline_ms: now_ms() + 600_000,
            },
            now_ms(),
        )
        .await
        .unwrap()
        .seq;

    // The ticker, as the gateway runs it: every 100 ms.
    let ticker = {
        let groups = groups.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                groups.tick(now_ms()).await;
            }
        })
    };
    eprintln!("{buyers} buyers join group-buy {id} ({slots} slots) at once...");
    let go = Arc::new(tokio::sync::Barrier::new(buyers as usize + 1));
    let tasks: Vec<_> = (0..buyers)
        .map(|i| {
            let groups = groups.clone();
            let go = go.clone();
            tokio::spawn(async move {
                let b = Identity::new(format!("b{i}"), "Buyer", Role::Buyer, None).unwrap();
                go.wait().await;
                let t = Instant::now();
                let a = groups
                    .join_group_buy(&b, group_id, id, now_ms())
                    .await
                    .unwrap();
                (a.result(), t.elapsed())
            })
        })
        .collect();
    go.wait().await;
    let started = Instant::now();
    // Winners wait for their durable write; the rest are answered from
    // memory: two very different latencies, reported apart.
    let mut won = Vec::with_capacity(slots as usize);
    let mut refused = Vec::with_capacity(buyers as usize);
    for (n, t) in tasks.into_iter().enumerate() {
        let (result, latency) = t.await.unwrap();
        if result == v1::CommerceResult::Joined {
            won.push(latency);
        } else {
            refused.push(latency);
        }
        if (n + 1) % 5_000 == 0 {
            eprintln!("  {}/{buyers} answered", n + 1);
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    groups.tick(now_ms() + 1_000).await;
    let joined = u32::try_from(won.len()).unwrap();
    let stats = groups.stats();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "group_buy_join buyers={buyers} slots={slots} joined={joined} elapsed={elapsed:.2?} \
         answers_per_sec={:.0} joined:[{}] refused:[{}] progress_events={} commerce_events={}",
        f64::from(buyers) / elapsed.as_secs_f64(),
        percentiles(&mut won),
        percentiles(&mut refused),
        count(&stats.progress_events),
        count(&stats.commerce_events),
    );
    assert_eq!(joined, slots.min(buyers), "oversold or undersold");
}

/// `p50=… p99=… max=…` of some latencies (`-` when there are none).
fn percentiles(latencies: &mut [Duration]) -> String {
    if latencies.is_empty() {
        return "-".into();
    }
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    format!(
        "p50={:.2?} p99={:.2?} max={:.2?}",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}
