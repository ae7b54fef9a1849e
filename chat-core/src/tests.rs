//! chat-core against the real embedded store, time passed in by hand.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use qun_proto::{ErrorCode, decode_server_frame, v1};
use qun_storage::{FjallConfig, FjallStore, Store};

use std::sync::atomic::Ordering::Relaxed;

use crate::*;

pub(crate) const NOW: u64 = 1_700_000_000_000;

pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    pub(crate) store: Arc<FjallStore>,
    pub(crate) groups: Groups,
}

/// A fixture with a fan-out worker, as the server runs them: a group
/// bigger than one turn (`fanout_budget`) is fanned out by it.
pub(crate) async fn fixture() -> Fixture {
    let f = fixture_with(CoreConfig::default()).await;
    spawn_fan_out(&f.groups);
    f
}

/// Works `groups`' fan-out queue in the background until the test ends.
pub(crate) fn spawn_fan_out(groups: &Groups) {
    let groups = groups.clone();
    tokio::spawn(async move { groups.run_fan_out(std::future::pending()).await });
}

/// A fixture without a fan-out worker: whatever does not fit in the turn
/// run at commit waits for `Groups::fan_out_turn` by hand.
pub(crate) async fn fixture_with(config: CoreConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = Arc::new(FjallStore::open(FjallConfig::new(&path)).unwrap());
    let groups = Groups::open(store.clone(), config).await.unwrap();
    Fixture {
        _dir: dir,
        path,
        store,
        groups,
    }
}

impl Fixture {
    /// Reopens the store and the groups, with a fan-out worker.
    pub(crate) async fn reopen(&mut self, config: CoreConfig) {
        self.store.close().await.unwrap();
        let store = Arc::new(FjallStore::open(FjallConfig::new(&self.path)).unwrap());
        self.groups = Groups::open(store.clone(), config).await.unwrap();
        spawn_fan_out(&self.groups);
        self.store = store;
    }
}

pub(crate) fn agent(id: &str, shop: &str) -> Identity {
    Identity::new(id, format!("Agent {id}"), Role::Agent, Some(shop.into())).unwrap()
}

pub(crate) fn buyer(id: &str) -> Identity {
    Identity::new(id, format!("Buyer {id}"), Role::Buyer, None).unwrap()
}

pub(crate) fn sub(conn: u64, who: &Identity, limits: OutboxLimits) -> (Subscriber, Outbox) {
    let outbox = Outbox::new(limits);
    (
        Subscriber::new(ConnId(conn), who.user_id(), outbox.clone()),
        outbox,
    )
}

/// A text message with a fresh client message id.
pub(crate) fn text(group_id: u64, s: &str) -> NewMessage {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    with_id(group_id, s, &format!("c-{id}"))
}

pub(crate) fn with_id(group_id: u64, s: &str, client_msg_id: &str) -> NewMessage {
    NewMessage {
        group_id,
        text: Bytes::copy_from_slice(s.as_bytes()),
        reply_to: 0,
        client_msg_id: client_msg_id.into(),
        first_attempt: false,
    }
}

pub(crate) async fn create(groups: &Groups, who: &Identity, max_members: u32) -> u64 {
    groups
        .create_group(
            who,
            NewGroup {
                name: "Sneaker fans".into(),
                max_members,
                shop_id: None,
            },
            NOW,
        )
        .await
        .unwrap()
        .group_id
}

/// Drains what is queued in an outbox right now, decoding pushed messages.
pub(crate) async fn drain(outbox: &Outbox) -> (Vec<v1::ChatMessage>, u64) {
    let mut msgs = Vec::new();
    let mut dropped = 0;
    while let Ok(Some(item)) =
        tokio::time::timeout(std::time::Duration::from_millis(50), outbox.recv()).await
    {
        match item {
            Outgoing::Frame(b) => match decode_server_frame(&b).unwrap().body {
                Some(v1::server_frame::Body::Message(m)) => msgs.push(m),
                other => panic!("unexpected push {other:?}"),
            },
            Outgoing::OutOfSync { dropped: d } => dropped += d,
        }
    }
    (msgs, dropped)
}

#[tokio::test]
async fn seqs_start_at_one_and_every_subscriber_sees_the_same_order() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    let (b1, b2) = (buyer("b1"), buyer("b2"));
    let (s1, o1) = sub(1, &b1, OutboxLimits::default());
    let (s2, o2) = sub(2, &b2, OutboxLimits::default());
    f.groups.join(&b1, g, s1, NOW).await.unwrap();
    f.groups.join(&b2, g, s2, NOW).await.unwrap();

    let mut tasks = Vec::new();
    for (i, who) in [a.clone(), b1.clone(), b2.clone()].into_iter().enumerate() {
        let groups = f.groups.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..30 {
                // A second apart: within the buyers' rate limits.
                let now = NOW + n * 1_000;
                let ack = groups
                    .post(&who, text(g, &format!("{i}-{n}")), now)
                    .await
                    .unwrap();
                seqs.push(ack.seq);
            }
            seqs
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked.sort_unstable();
    assert_eq!(
        acked,
        (1..=90).collect::<Vec<_>>(),
        "acks must be gap-free from 1"
    );

    let (m1, d1) = drain(&o1).await;
    let (m2, d2) = drain(&o2).await;
    assert_eq!((d1, d2), (0, 0));
    let seqs: Vec<u64> = m1.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=90).collect::<Vec<_>>(),
        "pushes must arrive once each, in order"
    );
    assert_eq!(m1, m2, "both members see the same stream");
}

#[tokio::test]
async fn join_returns_recent_and_history_pages_backwards() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    for n in 1..=120 {
        f.groups
            .post(&a, text(g, &format!("m{n}")), NOW + n)
            .await
            .unwrap();
    }
    let b = buyer("b1");
    let (s, _o) = sub(1, &b, OutboxLimits::default());
    let joined = f.groups.join(&b, g, s, NOW).await.unwrap();
    assert!(!joined.already_member);
    assert_eq!(joined.role, v1::Role::Buyer as i32);
    let seqs: Vec<u64> = joined.recent.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (71..=120).collect::<Vec<_>>());
    assert_eq!(joined.group.as_ref().unwrap().member_count, 2);

    let page = f.groups.history(&b, g, 71, 30).await.unwrap();
    assert_eq!(page.messages.first().unwrap().seq, 41);
    assert_eq!(page.messages.last().unwrap().seq, 70);
    assert!(page.has_more);
    let first = f.groups.history(&b, g, 11, 50).await.unwrap();
    assert_eq!(
        first.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(!first.has_more);
    assert_eq!(first.messages[0].text, "m1");
}

#[tokio::test]
async fn history_survives_restart_and_seqs_continue() {
    let mut f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    for n in 1..=5 {
        f.groups
            .post(&a, text(g, &format!("before {n}")), NOW)
            .await
            .unwrap();
    }
    let before = f.groups.history(&a, g, 0, 50).await.unwrap();
    // A tiny ring forces reads from the store after the restart.
    f.reopen(CoreConfig {
        recent_ring: 2,
        join_recent: 2,
        ..CoreConfig::default()
    })
    .await;
    let after = f.groups.history(&a, g, 0, 50).await.unwrap();
    assert_eq!(before, after);
    let ack = f.groups.post(&a, text(g, "after"), NOW).await.unwrap();
    assert_eq!(ack.seq, 6);
    let g2 = create(&f.groups, &a, 0).await;
    assert!(g2 > g, "group ids are never reused after a restart");
}

#[tokio::test]
async fn replies_carry_a_quote_of_the_question() {
    let mut f = fixture().await;
    let a = agent("a1", "shop");
    let b = buyer("b1");
    let g = create(&f.groups, &a, 0).await;
    let (s, _o) = sub(1, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    let q = f
        .groups
        .post(&b, text(g, "Is S size EU 34 or 36?"), NOW)
        .await
        .unwrap();
    let mut reply = text(g, "S is EU 34.");
    reply.reply_to = q.seq;
    let r = f.groups.post(&a, reply.clone(), NOW).await.unwrap();
    let page = f.groups.history(&b, g, 0, 10).await.unwrap();
    let m = page.messages.iter().find(|m| m.seq == r.seq).unwrap();
    assert_eq!(m.reply_to, q.seq);
    let quote = m.quote.as_ref().unwrap();
    assert_eq!(
        (quote.sender_id.as_str(), quote.text.as_str()),
        ("b1", "Is S size EU 34 or 36?")
    );

    // After a restart with an empty ring the quote comes from the store.
    f.reopen(CoreConfig {
        recent_ring: 1,
        join_recent: 1,
        ..CoreConfig::default()
    })
    .await;
    for _ in 0..3 {
        f.groups.post(&a, text(g, "filler"), NOW).await.unwrap();
    }
    let r2 = f.groups.post(&a, reply, NOW).await.unwrap();
    let page = f.groups.history(&b, g, r2.seq + 1, 1).await.unwrap();
    assert_eq!(
        page.messages[0].quote.as_ref().unwrap().text,
        "Is S size EU 34 or 36?"
    );
}

pub(crate) fn code<T: std::fmt::Debug>(r: Result<T, ChatError>) -> ErrorCode {
    r.unwrap_err().code()
}

#[tokio::test]
async fn bad_input_is_refused_with_its_code_and_nothing_changes() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let other_shop = agent("x1", "other");
    let b = buyer("b1");
    let outsider = buyer("b9");
    let g = create(&f.groups, &a, 2).await;
    let (s, _o) = sub(1, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    f.groups.post(&b, text(g, "hello"), NOW).await.unwrap();

    let s9 = || sub(9, &outsider, OutboxLimits::default()).0;
    assert_eq!(
        code(
            f.groups
                .create_group(
                    &b,
                    NewGroup {
                        name: "x".into(),
                        ..Default::default()
                    },
                    NOW
                )
                .await
        ),
        ErrorCode::ForbiddenRole
    );
    let wrong_shop = NewGroup {
        name: "x".into(),
        shop_id: Some("other".into()),
        ..Default::default()
    };
    assert_eq!(
        code(f.groups.create_group(&a, wrong_shop, NOW).await),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(
            f.groups
                .create_group(
                    &a,
                    NewGroup {
                        name: " ".into(),
                        ..Default::default()
                    },
                    NOW
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
    let too_big = NewGroup {
        name: "x".into(),
        max_members: 1_000_000,
        ..Default::default()
    };
    assert_eq!(
        code(f.groups.create_group(&a, too_big, NOW).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.join(&b, 999, s9(), NOW).await),
        ErrorCode::UnknownGroup
    );
    assert_eq!(
        code(f.groups.join(&b, 0, s9(), NOW).await),
        ErrorCode::UnknownGroup
    );
    assert_eq!(
        code(f.groups.join(&other_shop, g, s9(), NOW).await),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(f.groups.join(&outsider, g, s9(), NOW).await),
        ErrorCode::GroupFull
    );
    assert_eq!(
        code(f.groups.post(&outsider, text(g, "hi"), NOW).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.history(&outsider, g, 0, 10).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.leave(&outsider, g, NOW).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.post(&b, text(g, "  "), NOW).await),
        ErrorCode::TextEmpty
    );
    let long = "字".repeat(2000); // 6,000 bytes
    assert_eq!(
        code(f.groups.post(&b, text(g, &long), NOW).await),
        ErrorCode::TextTooLong
    );
    let not_utf8 = NewMessage {
        group_id: g,
        text: Bytes::from_static(b"\xff\xfe"),
        ..Default::default()
    };
    assert_eq!(
        code(f.groups.post(&b, not_utf8, NOW).await),
        ErrorCode::TextNotUtf8
    );
    let mut bad_reply = text(g, "re");
    bad_reply.reply_to = 2;
    assert_eq!(
        code(f.groups.post(&b, bad_reply, NOW).await),
        ErrorCode::ReplyToUnknown
    );
    assert_eq!(
        code(f.groups.history(&b, g, 0, 1000).await),
        ErrorCode::InvalidArgument
    );

    // Nothing of that changed the group: one message, two members.
    let page = f.groups.history(&b, g, 0, 50).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    let (s, _o) = sub(1, &b, OutboxLimits::default());
    let joined = f.groups.join(&b, g, s, NOW).await.unwrap();
    assert!(joined.already_member);
    assert_eq!(joined.group.unwrap().member_count, 2);
}

#[tokio::test]
async fn leaving_stops_pushes_to_every_device_and_frees_a_place() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let b = buyer("b1");
    let g = create(&f.groups, &a, 2).await;
    let (phone, o_phone) = sub(1, &b, OutboxLimits::default());
    let (pad, o_pad) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, phone, NOW).await.unwrap();
    f.groups.join(&b, g, pad, NOW).await.unwrap();
    f.groups.post(&a, text(g, "one"), NOW).await.unwrap();
    assert_eq!(drain(&o_phone).await.0.len(), 1);
    assert_eq!(
        drain(&o_pad).await.0.len(),
        1,
        "each device gets every message"
    );
    f.groups.leave(&b, g, NOW).await.unwrap();
    assert_eq!(f.groups.subscriber_count(g), 0);
    f.groups.post(&a, text(g, "two"), NOW).await.unwrap();
    assert!(drain(&o_phone).await.0.is_empty());
    let c = buyer("c1");
    let (sc, _oc) = sub(3, &c, OutboxLimits::default());
    f.groups.join(&c, g, sc, NOW).await.unwrap();
}

#[tokio::test]
async fn a_slow_subscriber_falls_out_of_sync_then_resumes_to_the_complete_sequence() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    let (slow_b, fast_b) = (buyer("slow"), buyer("fast"));
    let slow_limits = OutboxLimits {
        max_frames: 5,
        max_bytes: 1 << 20,
    };
    let (slow, o_slow) = sub(1, &slow_b, slow_limits);
    let (fast, o_fast) = sub(2, &fast_b, OutboxLimits::default());
    f.groups.join(&slow_b, g, slow, NOW).await.unwrap();
    f.groups.join(&fast_b, g, fast, NOW).await.unwrap();
    for n in 1..=20 {
        f.groups
            .post(&a, text(g, &format!("{n}")), NOW)
            .await
            .unwrap();
    }
    let (fast_msgs, fast_dropped) = drain(&o_fast).await;
    assert_eq!(seqs(&fast_msgs), (1..=20).collect::<Vec<_>>());
    assert_eq!(fast_dropped, 0);
    // The slow one overflowed at its sixth message: its queue went, and so
    // did its subscription — nothing more was queued for it.
    assert_eq!(f.groups.subscriber_count(g), 1);
    let (slow_msgs, slow_dropped) = drain(&o_slow).await;
    assert!(slow_msgs.is_empty(), "the queue was dropped whole");
    assert_eq!(slow_dropped, 6);
    assert!(o_slow.peak_bytes() <= slow_limits.max_bytes);
    let stats = f.groups.stats();
    assert_eq!(stats.deliveries_dropped.load(Relaxed), 1);

    // It had nothing; it resumes from 0 while reading, and ends complete.
    let reader = tokio::spawn({
        let o = o_slow.clone();
        async move { drain_until(&o, 21).await }
    });
    let resumed = f
        .groups
        .resume(
            &slow_b,
            g,
            0,
            Subscriber::new(ConnId(1), "slow", o_slow.clone()),
        )
        .await
        .unwrap();
    assert_eq!(resumed.through_seq, 20);
    assert!(!resumed.gap_too_large);
    f.groups.post(&a, text(g, "21"), NOW).await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(
        seqs(&got),
        (1..=21).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

fn seqs(msgs: &[v1::ChatMessage]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

/// Reads pushed messages until the one with seq `last` arrives.
pub(crate) async fn drain_until(outbox: &Outbox, last: u64) -> Vec<v1::ChatMessage> {
    let mut msgs = Vec::new();
    loop {
        let item = tokio::time::timeout(std::time::Duration::from_secs(10), outbox.recv())
            .await
            .expect("pushes stopped before the last seq")
            .expect("outbox closed");
        match item {
            Outgoing::Frame(b) => match decode_server_frame(&b).unwrap().body {
                Some(v1::server_frame::Body::Message(m)) => {
                    let done = m.seq == last;
                    msgs.push(m);
                    if done {
                        return msgs;
                    }
                }
                other => panic!("unexpected push {other:?}"),
            },
            Outgoing::OutOfSync { dropped } => panic!("out of sync ({dropped})"),
        }
    }
}

fn small_ring() -> CoreConfig {
    CoreConfig {
        recent_ring: 8,
        join_recent: 4,
        ..CoreConfig::default()
    }
}

#[tokio::test]
async fn resume_pushes_exactly_the_gap_from_store_and_ring_then_live() {
    let mut f = fixture().await;
    f.reopen(small_ring()).await;
    let a = agent("a1", "shop");
    let b = buyer("b1");
    let g = create(&f.groups, &a, 0).await;
    let (s, _o) = sub(1, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    for n in 1..=30 {
        f.groups
            .post(&a, text(g, &format!("m{n}")), NOW)
            .await
            .unwrap();
    }
    // A new connection of the same buyer had up to 5; the ring holds 23..=30,
    // so 6..=22 come from the store.
    let (s2, o2) = sub(2, &b, OutboxLimits::default());
    let r = f.groups.resume(&b, g, 5, s2).await.unwrap();
    assert_eq!((r.through_seq, r.gap_too_large), (30, false));
    f.groups.post(&a, text(g, "m31"), NOW).await.unwrap();
    let got = drain_until(&o2, 31).await;
    assert_eq!(seqs(&got), (6..=31).collect::<Vec<_>>());
    assert_eq!(got[0].text, "m6");
    assert!(drain(&o2).await.0.is_empty(), "nothing after: no duplicate");
    // Resuming when up to date pushes nothing but keeps it live.
    let (s3, o3) = sub(3, &b, OutboxLimits::default());
    let r = f.groups.resume(&b, g, 31, s3).await.unwrap();
    assert_eq!(r.through_seq, 31);
    f.groups.post(&a, text(g, "m32"), NOW).await.unwrap();
    assert_eq!(seqs(&drain(&o3).await.0), [32]);
    // A cursor beyond the newest message is refused.
    let (s4, _o4) = sub(4, &b, OutboxLimits::default());
    let err = f.groups.resume(&b, g, 99, s4).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    // Non-members may not resume.
    let (s5, _o5) = sub(5, &buyer("x"), OutboxLimits::default());
    let err = f.groups.resume(&buyer("x"), g, 0, s5).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotMember);
}

#[tokio::test]
async fn catch_up_waits_for_a_slow_reader_instead_of_dropping_it() {
    let mut f = fixture().await;
    f.reopen(small_ring()).await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    for n in 1..=40 {
        f.groups
            .post(&a, text(g, &format!("m{n}")), NOW)
            .await
            .unwrap();
    }
    // An outbox of 3 frames must carry 40 messages of catch-up.
    let tiny = OutboxLimits {
        max_frames: 3,
        max_bytes: 1 << 20,
    };
    let (s, o) = sub(1, &a, tiny);
    let reader = tokio::spawn({
        let o = o.clone();
        async move { drain_until(&o, 40).await }
    });
    let r = f.groups.resume(&a, g, 0, s).await.unwrap();
    assert_eq!(r.through_seq, 40);
    assert_eq!(seqs(&reader.await.unwrap()), (1..=40).collect::<Vec<_>>());
    assert_eq!(f.groups.subscriber_count(g), 1);
}

#[tokio::test]
async fn a_gap_over_the_cap_is_reported_and_paged_forwards() {
    let mut f = fixture().await;
    f.reopen(CoreConfig {
        resume_max_gap: 10,
        ..small_ring()
    })
    .await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    for n in 1..=30 {
        f.groups
            .post(&a, text(g, &format!("m{n}")), NOW)
            .await
            .unwrap();
    }
    let (s, o) = sub(1, &a, OutboxLimits::default());
    let r = f.groups.resume(&a, g, 3, s).await.unwrap();
    assert_eq!((r.through_seq, r.gap_too_large), (30, true));
    f.groups.post(&a, text(g, "m31"), NOW).await.unwrap();
    assert_eq!(
        seqs(&drain(&o).await.0),
        [31],
        "live continues after the gap"
    );
    // The client pages 4..=30 forwards.
    let mut have = Vec::new();
    let mut after = 3;
    loop {
        let page = f.groups.fetch_range(&a, g, after, 7).await.unwrap();
        have.extend(seqs(&page.messages));
        after = *have.last().unwrap();
        if after >= 30 {
            break;
        }
        assert!(page.has_more);
    }
    assert_eq!(have[..27], (4..=30).collect::<Vec<_>>()[..]);
    let last = f.groups.fetch_range(&a, g, 31, 7).await.unwrap();
    assert!(last.messages.is_empty() && !last.has_more);
}

#[tokio::test]
async fn a_retried_send_gets_the_original_seq_also_after_restart() {
    let mut f = fixture().await;
    f.reopen(CoreConfig {
        sent_window: 2,
        ..CoreConfig::default()
    })
    .await;
    let a = agent("a1", "shop");
    let b = buyer("b1");
    let g = create(&f.groups, &a, 0).await;
    let (s, o) = sub(1, &a, OutboxLimits::default());
    f.groups.join(&a, g, s, NOW).await.unwrap();
    let (sb, _ob) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, sb, NOW).await.unwrap();
    let first = f
        .groups
        .post(&b, with_id(g, "is S EU 34?", "x-1"), NOW)
        .await
        .unwrap();
    assert!(!first.duplicate);
    // From memory.
    let again = f
        .groups
        .post(&b, with_id(g, "is S EU 34?", "x-1"), NOW + 5)
        .await
        .unwrap();
    assert_eq!(
        (again.seq, again.ts_ms, again.duplicate),
        (first.seq, first.ts_ms, true)
    );
    // Another sender may use the same id.
    let other = f
        .groups
        .post(&a, with_id(g, "yes", "x-1"), NOW)
        .await
        .unwrap();
    assert_ne!(other.seq, first.seq);
    // Push x-1 out of the in-memory window: the store's index answers.
    for n in 0..4 {
        f.groups
            .post(&b, text(g, &format!("more {n}")), NOW)
            .await
            .unwrap();
    }
    let old = f
        .groups
        .post(&b, with_id(g, "is S EU 34?", "x-1"), NOW)
        .await
        .unwrap();
    assert_eq!((old.seq, old.duplicate), (first.seq, true));
    assert_eq!(
        seqs(&drain(&o).await.0),
        (1..=6).collect::<Vec<_>>(),
        "posted once"
    );
    // And after a restart.
    f.reopen(CoreConfig::default()).await;
    let after = f
        .groups
        .post(&b, with_id(g, "is S EU 34?", "x-1"), NOW)
        .await
        .unwrap();
    assert_eq!((after.seq, after.duplicate), (first.seq, true));
    assert_eq!(f.store.last_seq(g).await.unwrap(), 6);
    assert_eq!(
        f.groups.stats().duplicate_sends.load(Relaxed),
        1,
        "counted since the restart"
    );
    // The id is required.
    let err = f
        .groups
        .post(&b, with_id(g, "no id", ""), NOW)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn concurrent_retries_of_one_id_post_once() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    let tickets: Vec<_> = futures_util::future::join_all((0..8).map(|_| {
        f.groups
            .post(&a, with_id(g, "flash sale at 8!", "dup"), NOW)
    }))
    .await;
    let seqs: std::collections::BTreeSet<u64> =
        tickets.iter().map(|t| t.as_ref().unwrap().seq).collect();
    assert_eq!(seqs.len(), 1);
    assert_eq!(
        tickets
            .iter()
            .filter(|t| !t.as_ref().unwrap().duplicate)
            .count(),
        1
    );
    assert_eq!(f.store.last_seq(g).await.unwrap(), 1);
}

#[tokio::test]
async fn buyers_are_rate_limited_and_slowed_but_staff_never() {
    let mut f = fixture().await;
    f.reopen(CoreConfig {
        buyer_send_rate: Rate {
            per_sec: 1.0,
            burst: 2,
        },
        group_buyer_rate: Rate {
            per_sec: 0.5,
            burst: 3,
        },
        ..CoreConfig::default()
    })
    .await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    let (b1, b2, b3) = (buyer("b1"), buyer("b2"), buyer("b3"));
    for (i, b) in [&b1, &b2, &b3].into_iter().enumerate() {
        let (s, _o) = sub(i as u64, b, OutboxLimits::default());
        f.groups.join(b, g, s, NOW).await.unwrap();
    }
    f.groups.post(&b1, text(g, "1"), NOW).await.unwrap();
    f.groups
        .post(&b1, with_id(g, "2", "b1-2"), NOW)
        .await
        .unwrap();
    let err = f.groups.post(&b1, text(g, "3"), NOW).await.unwrap_err();
    assert!(
        matches!(
            err,
            ChatError::RateLimited {
                retry_after_ms: 1000
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), ErrorCode::RateLimited);
    // A retry is answered, not limited.
    let dup = f
        .groups
        .post(&b1, with_id(g, "2", "b1-2"), NOW)
        .await
        .unwrap();
    assert!(dup.duplicate);
    // The group has one buyer message left in its burst.
    f.groups.post(&b2, text(g, "b2"), NOW).await.unwrap();
    let err = f.groups.post(&b3, text(g, "b3"), NOW).await.unwrap_err();
    assert!(
        matches!(
            err,
            ChatError::SlowMode {
                retry_after_ms: 2000
            }
        ),
        "{err:?}"
    );
    // b3's own bucket was not charged for the refused message.
    // Staff are never limited.
    for n in 0..50 {
        f.groups
            .post(&a, text(g, &format!("answer {n}")), NOW)
            .await
            .unwrap();
    }
    // Time passes: both buckets refill.
    f.groups
        .post(&b3, text(g, "b3 later"), NOW + 2_000)
        .await
        .unwrap();
    f.groups
        .post(&b3, text(g, "b3 again"), NOW + 4_000)
        .await
        .unwrap();
    assert_eq!(f.groups.stats().sends_rate_limited.load(Relaxed), 2);
}

#[tokio::test]
async fn read_marks_count_unread_reach_every_device_and_survive_restart() {
    let mut f = fixture().await;
    let a = agent("a1", "shop");
    let b = buyer("b1");
    let g = create(&f.groups, &a, 0).await;
    f.groups
        .post(&a, text(g, "before b joined"), NOW)
        .await
        .unwrap();
    let (phone, o_phone) = sub(1, &b, OutboxLimits::default());
    let (pad, o_pad) = sub(2, &b, OutboxLimits::default());
    f.groups.attach_device(&b, ConnId(1), o_phone.clone());
    f.groups.attach_device(&b, ConnId(2), o_pad.clone());
    let joined = f.groups.join(&b, g, phone, NOW).await.unwrap();
    assert_eq!((joined.last_read_seq, joined.unread), (1, 0));
    f.groups.join(&b, g, pad, NOW).await.unwrap();
    for n in 2..=4 {
        f.groups
            .post(&a, text(g, &format!("{n}")), NOW)
            .await
            .unwrap();
    }
    drain(&o_phone).await;
    drain(&o_pad).await;
    let marked = f.groups.mark_read(&b, ConnId(1), g, 3).await.unwrap();
    assert_eq!((marked.last_read_seq, marked.unread), (3, 1));
    // The pad hears of it; the phone (which asked) does not.
    let pushed = o_pad.try_recv().unwrap();
    let Outgoing::Frame(bytes) = pushed else {
        panic!("{pushed:?}")
    };
    let Some(v1::server_frame::Body::ReadState(rs)) = decode_server_frame(&bytes).unwrap().body
    else {
        panic!("not a ReadState")
    };
    assert_eq!((rs.group_id, rs.last_read_seq, rs.unread), (g, 3, 1));
    assert!(o_phone.try_recv().is_err());
    // Marks never move back, and never past the newest message.
    assert_eq!(
        f.groups
            .mark_read(&b, ConnId(1), g, 2)
            .await
            .unwrap()
            .last_read_seq,
        3
    );
    assert!(o_pad.try_recv().is_err(), "nothing moved, nothing pushed");
    assert_eq!(
        f.groups
            .mark_read(&b, ConnId(1), g, 99)
            .await
            .unwrap()
            .last_read_seq,
        4
    );
    // Sending moves the sender's own mark.
    f.groups.post(&a, text(g, "5"), NOW).await.unwrap();
    f.groups.post(&b, text(g, "6"), NOW).await.unwrap();
    f.reopen(CoreConfig::default()).await;
    let mine = f.groups.my_groups(&b).await.unwrap();
    assert_eq!(mine.groups.len(), 1);
    let entry = &mine.groups[0];
    assert_eq!(entry.group.as_ref().unwrap().group_id, g);
    assert_eq!((entry.last_read_seq, entry.unread), (6, 0));
    // The agent's own posts moved its mark to 5; b's message is unread.
    assert_eq!(f.groups.my_groups(&a).await.unwrap().groups[0].unread, 1);
    f.groups.detach_device(&b, ConnId(1));
    assert_eq!(f.groups.device_count("b1"), 0, "registry is per server run");
}

#[tokio::test]
async fn writes_after_the_store_is_closed_fail_and_show_nothing() {
    let mut f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    let (s, o) = sub(1, &a, OutboxLimits::default());
    f.groups.join(&a, g, s, NOW).await.unwrap();
    f.store.close().await.unwrap();
    let err = f.groups.post(&a, text(g, "lost?"), NOW).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::StorageUnavailable);
    assert!(
        drain(&o).await.0.is_empty(),
        "a message that is not durable is never shown"
    );
    let page = f.groups.history(&a, g, 0, 10).await.unwrap();
    assert!(page.messages.is_empty());
    // After a restart the seq was not consumed.
    f.reopen(CoreConfig::default()).await;
    assert_eq!(f.store.last_seq(g).await.unwrap(), 0);
    assert_eq!(f.groups.post(&a, text(g, "now"), NOW).await.unwrap().seq, 1);
}
