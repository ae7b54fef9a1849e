//! The cost of a targeted push: resolving its audience (every buyer's tags
//! read from the store) and storing the buyers it matched with the message.
//!
//! `cargo bench -p qun-chat-core --bench targeted_push [-- BUYERS PUSHES]`
//!
//! Opens the real embedded store (fsync on) in a temporary folder, admits
//! BUYERS buyers to one group, tags one in ten `vip`, then pushes PUSHES
//! announcements to `vip` one after another and reports the time per push
//! (from the request to durable) beside an untargeted one for comparison.
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
    let buyers = args.first().copied().unwrap_or(5_000);
    let pushes = args.get(1).copied().unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(buyers, pushes));
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

fn push(group_id: u64, audience: &str) -> v1::PushPromotion {
    v1::PushPromotion {
        group_id,
        content: Some(v1::PushContent {
            kind: Some(v1::push_content::Kind::Announcement("New arrivals".into())),
            audience: audience.into(),
        }),
    }
}

async fn run(buyers: u32, pushes: u32) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FjallStore::open(FjallConfig::new(dir.path())).unwrap());
    let config = CoreConfig {
        max_members_limit: 100_000,
        // Pushes are what is measured, not the quota.
        reach: qun_chat_core::reach::ReachPolicy {
            base_per_day: 0,
            ..Default::default()
        },
        ..CoreConfig::default()
    };
    let groups = Groups::open(store, config).await.unwrap();
    let agent = Identity::new("a1", "Agent", Role::Agent, Some("shop-1".into())).unwrap();
    let group_id = groups
        .create_group(
            &agent,
            NewGroup {
                name: "Segments".into(),
                max_members: 100_000,
                shop_id: None,
            },
            now_ms(),
        )
        .await
        .unwrap()
        .group_id;
    eprintln!("admitting and tagging {buyers} buyers...");
    for chunk in (0..buyers).collect::<Vec<_>>().chunks(1_000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let (groups, agent) = (groups.clone(), agent.clone());
                tokio::spawn(async move {
                    let b = Identity::new(format!("b{i}"), "Buyer", Role::Buyer, None).unwrap();
                    let outbox = Outbox::new(OutboxLimits::default());
                    let sub = Subscriber::new(ConnId(u64::from(i)), b.user_id(), outbox);
                    groups.join(&b, group_id, sub, now_ms()).await.unwrap();
                    groups.unsubscribe(ConnId(u64::from(i)), group_id);
                    let tags = if i % 10 == 0 { "vip" } else { "orders:1" };
                    groups
                        .tag_buyer(&agent, b.user_id(), vec![tags.into()], vec![], false)
                        .await
                        .unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let mut targeted = Vec::new();
    let mut everyone = Vec::new();
    let mut reached = 0;
    for _ in 0..pushes {
        let t = Instant::now();
        reached = groups
            .push_promotion(&agent, push(group_id, "vip"), now_ms())
            .await
            .unwrap()
            .audience_size;
        targeted.push(t.elapsed());
        let t = Instant::now();
        groups
            .push_promotion(&agent, push(group_id, ""), now_ms())
            .await
            .unwrap();
        everyone.push(t.elapsed());
    }
    println!(
        "targeted_push buyers={buyers} reached={reached} targeted:[{}] everyone:[{}]",
        percentiles(&mut targeted),
        percentiles(&mut everyone)
    );
}

/// `p50=… max=…` of some latencies.
fn percentiles(latencies: &mut [Duration]) -> String {
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    format!("p50={:.2?} max={:.2?}", at(0.5), at(1.0))
}
