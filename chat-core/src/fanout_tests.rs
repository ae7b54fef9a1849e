//! Fan-out in turns: a big group's fan-out does not hold up other groups,
//! and whatever changes between its turns, every subscriber gets every
//! message once, in order. The queue is worked by hand here, so each step
//! is deterministic.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use crate::tests::{NOW, agent, buyer, create, fixture_with, sub, text};
use crate::*;

const SHOP: &str = "shop-f";

fn small_turns() -> CoreConfig {
    CoreConfig {
        fanout_budget: 16,
        ..CoreConfig::default()
    }
}

/// A group with `n` buyers subscribed, each with its own outbox.
async fn group_with(groups: &Groups, n: usize, conn_base: u64) -> (u64, Vec<(Identity, Outbox)>) {
    let g = create(groups, &agent("a1", SHOP), 0).await;
    let mut subs = Vec::new();
    for i in 0..n {
        let b = buyer(&format!("g{g}-b{i}"));
        let (s, outbox) = sub(conn_base + i as u64, &b, OutboxLimits::default());
        groups.join(&b, g, s, NOW).await.unwrap();
        subs.push((b, outbox));
    }
    (g, subs)
}

/// What is queued in an outbox now (fan-out here is synchronous, so
/// there is nothing to wait for), and how many were dropped.
fn drain(outbox: &Outbox) -> (Vec<qun_proto::v1::ChatMessage>, u64) {
    let (mut msgs, mut dropped) = (Vec::new(), 0);
    while let Ok(item) = outbox.try_recv() {
        match item {
            Outgoing::Frame(b) => match qun_proto::decode_server_frame(&b).unwrap().body {
                Some(qun_proto::v1::server_frame::Body::Message(m)) => msgs.push(m),
                other => panic!("unexpected push {other:?}"),
            },
            Outgoing::OutOfSync { dropped: d } => dropped += d,
        }
    }
    (msgs, dropped)
}

fn seqs(m: &[qun_proto::v1::ChatMessage]) -> Vec<u64> {
    m.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn a_big_groups_fan_out_waits_its_turn_while_small_groups_are_served_at_once() {
    let f = fixture_with(small_turns()).await;
    let (big, big_subs) = group_with(&f.groups, 100, 1_000).await;
    let (small, small_subs) = group_with(&f.groups, 3, 5_000).await;
    let a = agent("a1", SHOP);

    // Durable and acknowledged: the writer ran one turn of 16, the rest
    // waits on the queue.
    f.groups
        .post(&a, text(big, "Flash sale!"), NOW)
        .await
        .unwrap();
    let mut got_it = 0;
    for (_, o) in &big_subs {
        got_it += drain(o).0.len();
    }
    assert!(got_it < 20, "only one turn ran on the writer: {got_it}");

    // Another shop's group is not behind it.
    f.groups.post(&a, text(small, "Hi"), NOW).await.unwrap();
    for (_, o) in &small_subs {
        assert_eq!(seqs(&drain(o).0), [1]);
    }

    // The workers' turns finish the big group.
    let mut turns = 0;
    while f.groups.fan_out_turn() {
        turns += 1;
    }
    assert!(turns >= 5, "100 subscribers in turns of 16: {turns}");
    let mut total = got_it;
    for (_, o) in &big_subs {
        let (m, dropped) = drain(o);
        assert_eq!(dropped, 0);
        total += m.len();
    }
    assert_eq!(total, 100, "every subscriber once");
    assert!(f.groups.stats().fanout_turns.load(Ordering::Relaxed) >= 5);
}

#[tokio::test]
async fn subscriptions_changing_between_turns_lose_and_double_nothing() {
    let f = fixture_with(small_turns()).await;
    let (g, mut subs) = group_with(&f.groups, 60, 1_000).await;
    let a = agent("a1", SHOP);
    // Each round: a message, one turn (16 of them visited), then visited
    // subscriptions go — closing a connection and leaving take different
    // paths — so that ones not yet visited move behind the cursor, and no
    // new message comes to start another pass.
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); subs.len()];
    for (round, text_) in ["one", "two"].into_iter().enumerate() {
        f.groups.post(&a, text(g, text_), NOW).await.unwrap();
        f.groups.fan_out_turn();
        if round == 0 {
            f.groups.unsubscribe(ConnId(1_000), g);
            f.groups.unsubscribe(ConnId(1_001), g);
        } else {
            f.groups.leave(&subs[0].0, g, NOW).await.unwrap();
        }
        let gone = if round == 0 { 2 } else { 1 };
        subs.drain(0..gone);
        got.drain(0..gone);
        while f.groups.fan_out_turn() {}
        for ((who, o), seen) in subs.iter().zip(&mut got) {
            seen.extend(seqs(&drain(o).0));
            let want: Vec<u64> = (1..=round as u64 + 1).collect();
            assert_eq!(seen, &want, "{} in round {round}", who.user_id());
        }
    }
    // A newcomer mid-pass gets what is visible from its join, the rest
    // by push, nothing twice.
    f.groups.post(&a, text(g, "three"), NOW).await.unwrap();
    let late = buyer("late");
    let (s, late_outbox) = sub(9_999, &late, OutboxLimits::default());
    let joined = f.groups.join(&late, g, s, NOW).await.unwrap();
    f.groups.post(&a, text(g, "four"), NOW).await.unwrap();
    while f.groups.fan_out_turn() {}
    for ((who, o), seen) in subs.iter().zip(&mut got) {
        let (m, dropped) = drain(o);
        seen.extend(seqs(&m));
        assert_eq!(
            (seen.clone(), dropped),
            (vec![1, 2, 3, 4], 0),
            "{}",
            who.user_id()
        );
    }
    let mut late_seen = seqs(&joined.recent);
    late_seen.extend(seqs(&drain(&late_outbox).0));
    assert_eq!(late_seen, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_subscriber_left_behind_the_ring_is_out_of_sync_not_silently_skipped() {
    let f = fixture_with(CoreConfig {
        fanout_budget: 2,
        recent_ring: 50,
        ..CoreConfig::default()
    })
    .await;
    let (g, subs) = group_with(&f.groups, 120, 1_000).await;
    let a = agent("a1", SHOP);
    // 60 messages and no worker: the writer's turns of 2 cannot keep
    // 120 subscribers up to date, and the ring holds only 50.
    for n in 0..60 {
        f.groups
            .post(&a, text(g, &format!("m{n}")), NOW)
            .await
            .unwrap();
    }
    while f.groups.fan_out_turn() {}
    let mut behind = 0;
    for (_, o) in &subs {
        let (m, dropped) = drain(o);
        if dropped > 0 {
            behind += 1;
        } else {
            assert_eq!(seqs(&m), (1..=60).collect::<Vec<_>>());
        }
    }
    assert!(behind > 0, "some fell behind the ring and were told so");
}

#[tokio::test]
async fn handed_over_fan_out_runs_only_on_the_workers_turns_and_in_order() {
    // As the server runs it: the commit only publishes and queues.
    let f = fixture_with(CoreConfig {
        fan_out_on_commit: false,
        ..small_turns()
    })
    .await;
    let (g, subs) = group_with(&f.groups, 3, 1_000).await;
    let a = agent("a1", SHOP);
    for n in 0..3 {
        f.groups
            .post(&a, text(g, &format!("m{n}")), NOW)
            .await
            .unwrap();
    }
    // Durable and acknowledged, but nothing pushed yet, even in a group
    // that fits in one turn.
    for (_, o) in &subs {
        assert!(drain(o).0.is_empty());
    }
    // The time on the queue is measured, from the queueing to the turn (a
    // lower bound only: the clock cannot run backwards).
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert!(f.groups.fan_out_turn(), "the group was queued");
    let wait = &f.groups.stats().fanout_wait;
    assert_eq!(wait.count(), 1);
    assert!(wait.sum_us() >= 30_000, "waited {} µs", wait.sum_us());
    for (_, o) in &subs {
        let (m, dropped) = drain(o);
        assert_eq!((seqs(&m), dropped), (vec![1, 2, 3], 0));
    }
    assert!(!f.groups.fan_out_turn(), "queued once, done in one turn");
    assert_eq!(
        f.groups.stats().fanout_wait.count(),
        1,
        "one turn, one wait"
    );
}
