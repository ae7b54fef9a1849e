//! chat-core against the real embedded store, time passed in by hand.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use qun_proto::{ErrorCode, decode_server_frame, v1};
use qun_storage::{FjallConfig, FjallStore, Store};

use crate::*;

const NOW: u64 = 1_700_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Arc<FjallStore>,
    groups: Groups,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = Arc::new(FjallStore::open(FjallConfig::new(&path)).unwrap());
    let groups = Groups::open(store.clone(), CoreConfig::default())
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        path,
        store,
        groups,
    }
}

impl Fixture {
    async fn reopen(&mut self, config: CoreConfig) {
        self.store.close().await.unwrap();
        let store = Arc::new(FjallStore::open(FjallConfig::new(&self.path)).unwrap());
        self.groups = Groups::open(store.clone(), config).await.unwrap();
        self.store = store;
    }
}

fn agent(id: &str, shop: &str) -> Identity {
    Identity::new(id, format!("Agent {id}"), Role::Agent, Some(shop.into())).unwrap()
}

fn buyer(id: &str) -> Identity {
    Identity::new(id, format!("Buyer {id}"), Role::Buyer, None).unwrap()
}

fn sub(conn: u64, who: &Identity, limits: OutboxLimits) -> (Subscriber, Outbox) {
    let outbox = Outbox::new(limits);
    (
        Subscriber {
            conn: ConnId(conn),
            user_id: who.user_id().into(),
            outbox: outbox.clone(),
        },
        outbox,
    )
}

fn text(group_id: u64, s: &str) -> NewMessage {
    NewMessage {
        group_id,
        text: Bytes::copy_from_slice(s.as_bytes()),
        ..Default::default()
    }
}

async fn create(groups: &Groups, who: &Identity, max_members: u32) -> u64 {
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
async fn drain(outbox: &Outbox) -> (Vec<v1::ChatMessage>, u64) {
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
                let ack = groups
                    .post(&who, text(g, &format!("{i}-{n}")), NOW)
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

fn code<T: std::fmt::Debug>(r: Result<T, ChatError>) -> ErrorCode {
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
        code(f.groups.leave(&outsider, g).await),
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
    f.groups.leave(&b, g).await.unwrap();
    assert_eq!(f.groups.subscriber_count(g), 0);
    f.groups.post(&a, text(g, "two"), NOW).await.unwrap();
    assert!(drain(&o_phone).await.0.is_empty());
    let c = buyer("c1");
    let (sc, _oc) = sub(3, &c, OutboxLimits::default());
    f.groups.join(&c, g, sc, NOW).await.unwrap();
}

#[tokio::test]
async fn a_slow_subscriber_is_marked_out_of_sync_and_others_get_everything() {
    let f = fixture().await;
    let a = agent("a1", "shop");
    let g = create(&f.groups, &a, 0).await;
    let (slow_b, fast_b) = (buyer("slow"), buyer("fast"));
    let (slow, o_slow) = sub(
        1,
        &slow_b,
        OutboxLimits {
            max_frames: 5,
            max_bytes: 1 << 20,
        },
    );
    let (fast, o_fast) = sub(2, &fast_b, OutboxLimits::default());
    f.groups.join(&slow_b, g, slow, NOW).await.unwrap();
    f.groups.join(&fast_b, g, fast, NOW).await.unwrap();
    for n in 0..20 {
        f.groups
            .post(&a, text(g, &format!("{n}")), NOW)
            .await
            .unwrap();
    }
    let (fast_msgs, fast_dropped) = drain(&o_fast).await;
    assert_eq!(fast_msgs.len(), 20);
    assert_eq!(fast_dropped, 0);
    let (slow_msgs, slow_dropped) = drain(&o_slow).await;
    assert_eq!(
        slow_msgs.len() as u64 + slow_dropped,
        20,
        "every message is delivered or counted as dropped"
    );
    assert!(slow_dropped > 0);
    let stats = f.groups.stats();
    assert!(
        stats
            .deliveries_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
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
