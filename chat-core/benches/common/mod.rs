//! What the chat-core benches share: arguments, the runtime, a real
//! embedded store in a temporary folder, one shop group and its buyers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qun_chat_core::{
    ConnId, CoreConfig, Groups, Identity, NewGroup, Outbox, OutboxLimits, Role, Subscriber,
};
use qun_storage::{FjallConfig, FjallStore};

/// The numeric arguments after `--`, in order (others are skipped).
pub fn args() -> Vec<u32> {
    std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// A multi-threaded runtime, as the server runs.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The wall clock, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// One shop's group, on the real embedded store (fsync on, as in
/// production) in a temporary folder kept alive by `_dir`.
pub struct ShopGroup {
    pub _dir: tempfile::TempDir,
    pub groups: Groups,
    /// An agent of the shop.
    pub agent: Identity,
    pub group_id: u64,
}

/// Opens the store with `config` and creates the group `name`, room for
/// 100,000 members.
pub async fn shop_group(config: CoreConfig, name: &str) -> ShopGroup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FjallStore::open(FjallConfig::new(dir.path())).unwrap());
    let config = CoreConfig {
        max_members_limit: 100_000,
        ..config
    };
    let groups = Groups::open(store, config).await.unwrap();
    let agent = Identity::new("a1", "Agent", Role::Agent, Some("shop-1".into())).unwrap();
    let group_id = groups
        .create_group(
            &agent,
            NewGroup {
                name: name.into(),
                max_members: 100_000,
                shop_id: None,
            },
            now_ms(),
        )
        .await
        .unwrap()
        .group_id;
    ShopGroup {
        _dir: dir,
        groups,
        agent,
        group_id,
    }
}

/// The identity of buyer `i`.
pub fn buyer(i: u32) -> Identity {
    Identity::new(format!("b{i}"), "Buyer", Role::Buyer, None).unwrap()
}

/// Admits buyers `b0 … b{n-1}` to the group, a thousand at a time, showing
/// progress. They join and leave no connection behind: fan-out is measured
/// by `qun-loadtest`, not here.
pub async fn admit_buyers(g: &ShopGroup, n: u32) {
    eprintln!("admitting {n} buyers to group {}...", g.group_id);
    let started = Instant::now();
    let mut admitted = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let (groups, group_id) = (g.groups.clone(), g.group_id);
                tokio::spawn(async move {
                    let b = buyer(i);
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
        eprintln!("  {admitted}/{n} admitted ({:.1?})", started.elapsed());
    }
}

/// p50, p99 and max of `latencies` ("-" when there are none).
pub fn percentiles(latencies: &mut [Duration]) -> String {
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
