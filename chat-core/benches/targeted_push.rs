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

mod common;

use std::time::Instant;

use common::{admit_buyers, buyer, now_ms, percentiles, shop_group};
use qun_chat_core::CoreConfig;
use qun_proto::v1;

fn main() {
    let args = common::args();
    let buyers = args.first().copied().unwrap_or(5_000);
    let pushes = args.get(1).copied().unwrap_or(10);
    common::runtime().block_on(run(buyers, pushes));
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
    let config = CoreConfig {
        // Pushes are what is measured, not the quota.
        reach: qun_chat_core::reach::ReachPolicy {
            base_per_day: 0,
            ..Default::default()
        },
        ..CoreConfig::default()
    };
    let g = shop_group(config, "Segments").await;
    admit_buyers(&g, buyers).await;
    let (groups, agent, group_id) = (&g.groups, &g.agent, g.group_id);
    eprintln!("tagging one buyer in ten vip...");
    for chunk in (0..buyers).collect::<Vec<_>>().chunks(1_000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let (groups, agent) = (groups.clone(), agent.clone());
                tokio::spawn(async move {
                    let tags = if i % 10 == 0 { "vip" } else { "orders:1" };
                    groups
                        .tag_buyer(&agent, buyer(i).user_id(), vec![tags.into()], vec![], false)
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
            .push_promotion(agent, push(group_id, "vip"), now_ms())
            .await
            .unwrap()
            .audience_size;
        targeted.push(t.elapsed());
        let t = Instant::now();
        groups
            .push_promotion(agent, push(group_id, ""), now_ms())
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
