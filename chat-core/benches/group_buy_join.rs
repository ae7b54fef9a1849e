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

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{admit_buyers, buyer, now_ms, percentiles, shop_group};
use qun_chat_core::CoreConfig;
use qun_proto::v1;

fn main() {
    let args = common::args();
    let buyers = args.first().copied().unwrap_or(20_000);
    let slots = args.get(1).copied().unwrap_or(5_000);
    common::runtime().block_on(run(buyers, slots));
}

async fn run(buyers: u32, slots: u32) {
    let g = shop_group(CoreConfig::default(), "Flash sale").await;
    admit_buyers(&g, buyers).await;
    let (groups, agent, group_id) = (&g.groups, &g.agent, g.group_id);
    groups
        .put_product(
            agent,
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
            agent,
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
                let b = buyer(i);
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
