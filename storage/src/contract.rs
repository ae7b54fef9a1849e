//! The storage contract: the checks every [`Store`] backend must pass.
//!
//! A backend's test module implements [`Harness`] (how to open the backend
//! at one fresh location, again and again) and calls [`run_all`]. The embedded
//! store runs it in its unit tests; a ScyllaDB backend runs it against a live
//! cluster when one is configured.
//!
//! The checks panic with a message naming what broke, like any test.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::records::{
    AutoReplyRecord, BuyerTagsRecord, CsBuyerRecord, CsShopRecord, EntryRecord, FaqRecord,
    GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord, ObjectRecord,
    PinRecord, ProductRecord, QuoteRecord, ReportRecord, ScheduleRecord, SentRecord,
};
use crate::{FeedbackDay, ReachUse, Store, StoreExt, WriteOp, keys::BUCKET_SIZE};

/// Opens a backend at one location. Every call after the first must see what
/// earlier stores at that location made durable (a restart).
pub trait Harness {
    /// Opens the backend. The previous store from this harness has been closed.
    fn open(&mut self) -> impl Future<Output = Arc<dyn Store>> + Send;
}

/// Runs every check, each on a fresh harness from `fresh`.
pub async fn run_all<H: Harness>(mut fresh: impl FnMut() -> H) {
    empty_store(&mut fresh()).await;
    groups_and_members(&mut fresh()).await;
    messages_in_order(&mut fresh()).await;
    buckets_and_groups_do_not_mix(&mut fresh()).await;
    callbacks_follow_submission_order(&mut fresh()).await;
    durable_across_reopen(&mut fresh()).await;
    sent_index_survives_reopen(&mut fresh()).await;
    read_marks(&mut fresh()).await;
    objects_entries_and_deadlines(&mut fresh()).await;
    products_and_cards(&mut fresh()).await;
    reach_feedback_mutes_and_reports(&mut fresh()).await;
    rewritten_messages_and_member_flags(&mut fresh()).await;
    replies_are_indexed_under_what_they_quote(&mut fresh()).await;
    faq_entries_and_pins(&mut fresh()).await;
    auto_reply_rules(&mut fresh()).await;
    join_requests(&mut fresh()).await;
    buyer_tags(&mut fresh()).await;
    schedules_and_targeted_messages(&mut fresh()).await;
    customer_service(&mut fresh()).await;
    many_shops(&mut fresh()).await;
}

fn msg(group_id: u64, seq: u64) -> MessageRecord {
    MessageRecord {
        group_id,
        seq,
        sender_id: format!("u{}", seq % 7),
        sender_name: "Buyer".into(),
        sender_role: 1,
        kind: 1,
        text: format!("message {seq} of group {group_id}"),
        ts_ms: 1_700_000_000_000 + seq,
        ..Default::default()
    }
}

fn seqs(records: &[MessageRecord]) -> Vec<u64> {
    records.iter().map(|m| m.seq).collect()
}

/// A new store holds nothing.
pub async fn empty_store<H: Harness>(h: &mut H) {
    let s = h.open().await;
    assert_eq!(
        s.load_group(1).await.unwrap(),
        None,
        "empty store has a group"
    );
    assert!(s.load_members(1).await.unwrap().is_empty());
    assert_eq!(s.last_seq(1).await.unwrap(), 0);
    assert_eq!(s.max_group_id().await.unwrap(), 0);
    assert!(s.messages_before(1, u64::MAX, 10).await.unwrap().is_empty());
    assert!(s.messages_after(1, 0, 10).await.unwrap().is_empty());
    assert!(s.groups_of_user("u1").await.unwrap().is_empty());
    s.close().await.unwrap();
}

/// Groups and members are stored, indexed by user and removed.
pub async fn groups_and_members<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let group = |id: u64| GroupRecord {
        group_id: id,
        shop_id: "shop-1".into(),
        name: format!("group {id}"),
        max_members: 5000,
        created_at_ms: 1,
        created_by: "agent-1".into(),
        buyers_muted: id == 300,
        pins: vec![],
        join_policy: 1,
        join_expression: "tier:vip".into(),
        cs_buyer: if id == 300 {
            "buyer-9".into()
        } else {
            String::new()
        },
    };
    let member = |g: u64, u: &str| MemberRecord {
        group_id: g,
        user_id: u.into(),
        display_name: u.to_uppercase(),
        role: 1,
        joined_at_ms: 2,
    };
    s.write(vec![
        WriteOp::PutGroup(group(7)),
        WriteOp::PutGroup(group(300)),
        WriteOp::PutMember(member(7, "ab")),
        WriteOp::PutMember(member(7, "abc")),
        WriteOp::PutMember(member(300, "ab")),
    ])
    .await
    .unwrap();
    assert_eq!(s.load_group(7).await.unwrap(), Some(group(7)));
    assert_eq!(
        s.max_group_id().await.unwrap(),
        300,
        "max group id must compare numerically"
    );
    let mut users: Vec<_> = s
        .load_members(7)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    users.sort();
    assert_eq!(users, ["ab", "abc"]);
    assert_eq!(s.groups_of_user("ab").await.unwrap(), [7, 300]);
    assert_eq!(
        s.groups_of_user("abc").await.unwrap(),
        [7],
        "user ids that share a prefix must not mix"
    );

    s.write(vec![WriteOp::RemoveMember {
        group_id: 7,
        user_id: "ab".into(),
    }])
    .await
    .unwrap();
    assert_eq!(s.load_members(7).await.unwrap(), [member(7, "abc")]);
    assert_eq!(s.groups_of_user("ab").await.unwrap(), [300]);
    s.close().await.unwrap();
}

/// Paging backwards and forwards returns the right windows, ascending.
pub async fn messages_in_order<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let ops = (1..=30)
        .map(|seq| WriteOp::AppendMessage(msg(5, seq)))
        .collect();
    s.write(ops).await.unwrap();
    assert_eq!(s.last_seq(5).await.unwrap(), 30);
    assert_eq!(
        seqs(&s.messages_before(5, u64::MAX, 5).await.unwrap()),
        [26, 27, 28, 29, 30]
    );
    assert_eq!(seqs(&s.messages_before(5, 4, 10).await.unwrap()), [1, 2, 3]);
    assert_eq!(
        seqs(&s.messages_before(5, 11, 3).await.unwrap()),
        [8, 9, 10]
    );
    assert!(s.messages_before(5, 1, 10).await.unwrap().is_empty());
    assert_eq!(
        seqs(&s.messages_after(5, 27, 10).await.unwrap()),
        [28, 29, 30]
    );
    assert_eq!(seqs(&s.messages_after(5, 0, 2).await.unwrap()), [1, 2]);
    assert_eq!(
        s.messages_before(5, 2, 1).await.unwrap(),
        [msg(5, 1)],
        "record must round-trip"
    );
    s.close().await.unwrap();
}

/// Reads cross bucket boundaries in order and never mix groups.
pub async fn buckets_and_groups_do_not_mix<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let around = (BUCKET_SIZE - 3)..=(BUCKET_SIZE + 3);
    let mut ops: Vec<_> = around
        .clone()
        .map(|seq| WriteOp::AppendMessage(msg(255, seq)))
        .collect();
    ops.extend((1..=3).map(|seq| WriteOp::AppendMessage(msg(256, seq))));
    ops.extend((1..=3).map(|seq| WriteOp::AppendMessage(msg(254, seq))));
    s.write(ops).await.unwrap();
    assert_eq!(s.last_seq(255).await.unwrap(), BUCKET_SIZE + 3);
    assert_eq!(s.last_seq(256).await.unwrap(), 3);
    assert_eq!(
        seqs(&s.messages_before(255, u64::MAX, 100).await.unwrap()),
        around.clone().collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&s.messages_after(255, BUCKET_SIZE - 2, 3).await.unwrap()),
        [BUCKET_SIZE - 1, BUCKET_SIZE, BUCKET_SIZE + 1]
    );
    assert!(
        s.messages_after(255, BUCKET_SIZE + 3, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.messages_before(256, u64::MAX, 10)
            .await
            .unwrap()
            .iter()
            .all(|m| m.group_id == 256),
        "group 256 reads must not include other groups"
    );
    s.close().await.unwrap();
}

/// Callbacks report in submission order, each exactly once, and a flush
/// waits for what came before it.
pub async fn callbacks_follow_submission_order<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    for seq in 1..=200u64 {
        let seen = seen.clone();
        s.submit(
            vec![WriteOp::AppendMessage(msg(9, seq))],
            Box::new(move |r| {
                assert!(r.is_ok(), "write {seq} failed: {r:?}");
                seen.lock().unwrap().push(seq);
            }),
        )
        .unwrap();
    }
    s.flush().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=200).collect::<Vec<_>>(),
        "callbacks out of order or missing"
    );
    assert_eq!(s.last_seq(9).await.unwrap(), 200);
    s.close().await.unwrap();
}

/// What was reported durable is there after the store is closed and opened.
pub async fn durable_across_reopen<H: Harness>(h: &mut H) {
    let s = h.open().await;
    s.write(
        (1..=10)
            .map(|seq| WriteOp::AppendMessage(msg(3, seq)))
            .collect(),
    )
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(s.last_seq(3).await.unwrap(), 10);
    assert_eq!(
        s.messages_after(3, 0, 100).await.unwrap(),
        (1..=10).map(|q| msg(3, q)).collect::<Vec<_>>()
    );
    s.close().await.unwrap();
}

/// A message with a client message id can be found by it, per sender and
/// group, also after a restart; one without is not indexed.
pub async fn sent_index_survives_reopen<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let with_id = |seq: u64, sender: &str, id: &str| {
        let mut m = msg(4, seq);
        m.sender_id = sender.into();
        m.client_msg_id = id.into();
        m
    };
    s.write(vec![
        WriteOp::AppendMessage(with_id(1, "u1", "c-1")),
        WriteOp::AppendMessage(with_id(2, "u2", "c-1")),
        WriteOp::AppendMessage(with_id(3, "u1", "")),
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    let found = s.find_sent(4, "u1", "c-1").await.unwrap();
    assert_eq!(
        found,
        Some(SentRecord {
            seq: 1,
            ts_ms: msg(4, 1).ts_ms
        }),
        "u1's c-1"
    );
    assert_eq!(
        s.find_sent(4, "u2", "c-1").await.unwrap().map(|r| r.seq),
        Some(2)
    );
    assert_eq!(
        s.find_sent(4, "u1", "").await.unwrap(),
        None,
        "empty ids are not indexed"
    );
    assert_eq!(s.find_sent(4, "u3", "c-1").await.unwrap(), None);
    assert_eq!(
        s.find_sent(5, "u1", "c-1").await.unwrap(),
        None,
        "other group"
    );
    s.close().await.unwrap();
}

/// Read marks are stored per member, replaced, and removed with the member.
pub async fn read_marks<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let mark = |g: u64, u: &str, seq: u64| WriteOp::PutReadMark {
        group_id: g,
        user_id: u.into(),
        seq,
    };
    s.write(vec![mark(6, "u1", 3), mark(6, "u2", 5), mark(7, "u1", 9)])
        .await
        .unwrap();
    s.write(vec![mark(6, "u1", 4)]).await.unwrap();
    let mut marks = s.load_read_marks(6).await.unwrap();
    marks.sort();
    assert_eq!(marks, [("u1".to_string(), 4), ("u2".to_string(), 5)]);
    s.write(vec![WriteOp::RemoveMember {
        group_id: 6,
        user_id: "u2".into(),
    }])
    .await
    .unwrap();
    assert_eq!(s.load_read_marks(6).await.unwrap(), [("u1".to_string(), 4)]);
    assert_eq!(s.load_read_marks(7).await.unwrap(), [("u1".to_string(), 9)]);
    s.close().await.unwrap();
}

/// Objects and their entries are kept per group; an object's deadline is
/// listed until it is replaced with none; all of it survives a restart.
pub async fn objects_entries_and_deadlines<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let object = |g: u64, id: u64, due_ms: u64| ObjectRecord {
        group_id: g,
        object_id: id,
        body: format!("object {id} of {g}").into_bytes(),
        due_ms,
    };
    let entry = |g: u64, id: u64, u: &str, value: u64| EntryRecord {
        group_id: g,
        object_id: id,
        user_id: u.into(),
        value,
    };
    s.write(vec![
        WriteOp::PutObject(object(8, 3, 5_000)),
        WriteOp::PutObject(object(8, 9, 7_000)),
        WriteOp::PutObject(object(9, 1, 0)),
        WriteOp::PutEntry(entry(8, 3, "u1", 11)),
        WriteOp::PutEntry(entry(8, 3, "u2", 12)),
        WriteOp::PutEntry(entry(8, 9, "u1", 2)),
        WriteOp::PutEntry(entry(9, 1, "u1", 1)),
    ])
    .await
    .unwrap();
    // Resolving object 3 clears its deadline; u2 leaves; u1's entry changes.
    s.write(vec![
        WriteOp::PutObject(object(8, 3, 0)),
        WriteOp::RemoveEntry {
            group_id: 8,
            object_id: 3,
            user_id: "u2".into(),
        },
        WriteOp::PutEntry(entry(8, 9, "u1", 3)),
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.load_objects(8).await.unwrap(),
        [object(8, 3, 0), object(8, 9, 7_000)]
    );
    assert_eq!(s.load_objects(9).await.unwrap(), [object(9, 1, 0)]);
    assert_eq!(
        s.load_entries(8).await.unwrap(),
        [entry(8, 3, "u1", 11), entry(8, 9, "u1", 3)]
    );
    assert_eq!(
        s.due_objects().await.unwrap(),
        [crate::Due {
            group_id: 8,
            object_id: 9,
            due_ms: 7_000
        }]
    );
    s.close().await.unwrap();
}

/// Products are per shop; a product's cards are listed per group, and a
/// longer product id sharing a prefix is another product.
pub async fn products_and_cards<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let product = |shop: &str, id: &str| ProductRecord {
        shop_id: shop.into(),
        product_id: id.into(),
        body: format!("{shop}/{id}").into_bytes(),
    };
    let card = |shop: &str, id: &str, g: u64| WriteOp::PutCard {
        shop_id: shop.into(),
        product_id: id.into(),
        group_id: g,
    };
    s.write(vec![
        WriteOp::PutProduct(product("s1", "p1")),
        WriteOp::PutProduct(product("s1", "p10")),
        WriteOp::PutProduct(product("s2", "p1")),
        card("s1", "p1", 300),
        card("s1", "p1", 2),
        card("s1", "p1", 2),
        card("s1", "p10", 5),
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.load_product("s1", "p1").await.unwrap(),
        Some(product("s1", "p1"))
    );
    assert_eq!(s.load_product("s1", "p2").await.unwrap(), None);
    assert_eq!(
        s.load_product("s2", "p1").await.unwrap(),
        Some(product("s2", "p1"))
    );
    assert_eq!(s.groups_with_card("s1", "p1").await.unwrap(), [2, 300]);
    assert_eq!(s.groups_with_card("s1", "p10").await.unwrap(), [5]);
    assert!(s.groups_with_card("s2", "p1").await.unwrap().is_empty());
    s.close().await.unwrap();
}

/// A group's promotion count is replaced day by day; a shop's feedback is
/// kept per day and never mixes with a shop whose id it prefixes; promotion
/// mutes go with the member; reports are listed by seq then reporter. All
/// of it survives a restart.
pub async fn reach_feedback_mutes_and_reports<H: Harness>(h: &mut H) {
    let s = h.open().await;
    assert_eq!(s.load_reach_use(1).await.unwrap(), None);
    assert!(s.load_feedback("s1").await.unwrap().is_empty());
    let feedback = |shop: &str, day: u64, positive: u64, negative: u64| WriteOp::PutFeedback {
        shop_id: shop.into(),
        day,
        positive,
        negative,
    };
    let mute = |g: u64, u: &str, muted: bool| WriteOp::PutPromotionMute {
        group_id: g,
        user_id: u.into(),
        muted,
    };
    let report = |seq: u64, who: &str| ReportRecord {
        group_id: 1,
        seq,
        reporter_id: who.into(),
        reason: format!("{who} on {seq}"),
        ts_ms: 9,
    };
    s.write(vec![
        WriteOp::PutReachUse {
            group_id: 1,
            day: 20_000,
            used: 3,
        },
        feedback("s1", 20_000, 4, 1),
        feedback("s1", 300, 1, 0),
        feedback("s10", 20_000, 9, 9),
        mute(1, "u1", true),
        mute(1, "u2", true),
        mute(2, "u1", true),
        WriteOp::PutReport(report(7, "u2")),
        WriteOp::PutReport(report(3, "u1")),
        WriteOp::PutReport(report(7, "u1")),
    ])
    .await
    .unwrap();
    s.write(vec![
        WriteOp::PutReachUse {
            group_id: 1,
            day: 20_001,
            used: 1,
        },
        feedback("s1", 20_000, 5, 1),
        mute(1, "u2", false),
        WriteOp::RemoveMember {
            group_id: 2,
            user_id: "u1".into(),
        },
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.load_reach_use(1).await.unwrap(),
        Some(ReachUse {
            day: 20_001,
            used: 1
        })
    );
    assert_eq!(s.load_reach_use(2).await.unwrap(), None);
    assert_eq!(
        s.load_feedback("s1").await.unwrap(),
        [
            FeedbackDay {
                day: 300,
                positive: 1,
                negative: 0
            },
            FeedbackDay {
                day: 20_000,
                positive: 5,
                negative: 1
            }
        ]
    );
    assert_eq!(s.load_promotion_mutes(1).await.unwrap(), ["u1"]);
    assert!(
        s.load_promotion_mutes(2).await.unwrap().is_empty(),
        "a removed member's mute goes with them"
    );
    assert_eq!(
        s.load_reports(1).await.unwrap(),
        [report(3, "u1"), report(7, "u1"), report(7, "u2")]
    );
    s.close().await.unwrap();
}

/// A rewritten message replaces the stored one in place (and leaves the
/// sent index alone); member flags are per user, removed when all zero, and
/// outlive the member's removal. All of it survives a restart.
/// A reply's append indexes it under the message it quotes, per group, in
/// seq order, across a reopen; a rewrite adds nothing.
pub async fn replies_are_indexed_under_what_they_quote<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let reply = |group_id: u64, seq: u64, to: u64| MessageRecord {
        reply_to: to,
        quote: Some(QuoteRecord {
            seq: to,
            sender_id: "u1".into(),
            sender_name: "Buyer".into(),
            text: format!("message {to}"),
            ..Default::default()
        }),
        ..msg(group_id, seq)
    };
    s.write(vec![
        WriteOp::AppendMessage(msg(14, 1)),
        WriteOp::AppendMessage(msg(14, 2)),
        WriteOp::AppendMessage(reply(14, 3, 1)),
        WriteOp::AppendMessage(reply(15, 3, 1)),
    ])
    .await
    .unwrap();
    s.write(vec![
        WriteOp::AppendMessage(reply(14, 4, 2)),
        WriteOp::AppendMessage(reply(14, 5, 1)),
        WriteOp::RewriteMessage(reply(14, 3, 1)),
    ])
    .await
    .unwrap();
    assert_eq!(s.replies_to(14, 1).await.unwrap(), [3, 5]);
    assert_eq!(s.replies_to(14, 2).await.unwrap(), [4]);
    assert!(s.replies_to(14, 3).await.unwrap().is_empty());
    assert_eq!(s.replies_to(15, 1).await.unwrap(), [3], "groups do not mix");
    assert!(s.replies_to(16, 1).await.unwrap().is_empty());
    s.close().await.unwrap();
    let s = h.open().await;
    assert_eq!(s.replies_to(14, 1).await.unwrap(), [3, 5], "after reopen");
    s.close().await.unwrap();
}

pub async fn rewritten_messages_and_member_flags<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let mut first = msg(12, 1);
    first.client_msg_id = "c-1".into();
    s.write(vec![
        WriteOp::AppendMessage(first.clone()),
        WriteOp::AppendMessage(msg(12, 2)),
    ])
    .await
    .unwrap();
    let recalled = MessageRecord {
        text: String::new(),
        recalled: true,
        ..first.clone()
    };
    let flags = |m: u64, b: u64| MemberFlagsRecord {
        muted_until_ms: m,
        banned_until_ms: b,
    };
    let put = |u: &str, f: MemberFlagsRecord| WriteOp::PutMemberFlags {
        group_id: 12,
        user_id: u.into(),
        flags: f,
    };
    s.write(vec![
        WriteOp::RewriteMessage(recalled.clone()),
        put("u1", flags(500, 0)),
        put("u2", flags(0, 900)),
        put("u3", flags(7, 7)),
    ])
    .await
    .unwrap();
    s.write(vec![
        put("u3", MemberFlagsRecord::default()),
        WriteOp::RemoveMember {
            group_id: 12,
            user_id: "u2".into(),
        },
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.messages_after(12, 0, 10).await.unwrap(),
        [recalled, msg(12, 2)],
        "rewritten in place"
    );
    assert_eq!(s.last_seq(12).await.unwrap(), 2);
    assert_eq!(
        s.find_sent(12, &first.sender_id, "c-1")
            .await
            .unwrap()
            .map(|r| r.seq),
        Some(1),
        "the sent index still finds it"
    );
    assert_eq!(
        s.load_member_flags(12).await.unwrap(),
        [
            ("u1".to_string(), flags(500, 0)),
            ("u2".to_string(), flags(0, 900))
        ],
        "u3's flags cleared; u2's ban outlives the removal"
    );
    s.close().await.unwrap();
}

/// FAQ entries are kept per group by id and removed one by one; pins ride
/// in the group's record. All of it survives a restart.
pub async fn faq_entries_and_pins<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let faq = |g: u64, id: u64| FaqRecord {
        group_id: g,
        faq_id: id,
        question: format!("q{id}"),
        answer: format!("a{id}"),
        question_seq: id * 2,
        answer_seq: id * 2 + 1,
        asked_by: "u1".into(),
        answered_by: "a1".into(),
        created_at_ms: 5,
    };
    let group = GroupRecord {
        group_id: 20,
        shop_id: "s".into(),
        name: "g".into(),
        max_members: 10,
        pins: vec![
            PinRecord {
                message_seq: 4,
                faq_id: 0,
            },
            PinRecord {
                message_seq: 0,
                faq_id: 2,
            },
        ],
        ..Default::default()
    };
    s.write(vec![
        WriteOp::PutGroup(group.clone()),
        WriteOp::PutFaq(faq(20, 1)),
        WriteOp::PutFaq(faq(20, 2)),
        WriteOp::PutFaq(faq(20, 300)),
        WriteOp::PutFaq(faq(21, 1)),
    ])
    .await
    .unwrap();
    s.write(vec![WriteOp::RemoveFaq {
        group_id: 20,
        faq_id: 1,
    }])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(s.load_faq(20).await.unwrap(), [faq(20, 2), faq(20, 300)]);
    assert_eq!(s.load_faq(21).await.unwrap(), [faq(21, 1)]);
    assert_eq!(s.load_group(20).await.unwrap(), Some(group));
    s.close().await.unwrap();
}

/// Auto-reply rules are kept per shop by rule id, replaced and removed one
/// by one, and a shop whose id prefixes another's never sees its rules.
pub async fn auto_reply_rules<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let rule = |shop: &str, id: &str, answer: &str| AutoReplyRecord {
        shop_id: shop.into(),
        rule_id: id.into(),
        keywords: vec!["size".into(), "EU".into()],
        pattern: r"\bS\b".into(),
        answer: answer.into(),
        cooldown_ms: 60_000,
    };
    s.write(vec![
        WriteOp::PutAutoReply(rule("s1", "size", "old")),
        WriteOp::PutAutoReply(rule("s1", "a-first", "a")),
        WriteOp::PutAutoReply(rule("s10", "size", "other shop")),
    ])
    .await
    .unwrap();
    s.write(vec![
        WriteOp::PutAutoReply(rule("s1", "size", "S is EU 34")),
        WriteOp::RemoveAutoReply {
            shop_id: "s1".into(),
            rule_id: "a-first".into(),
        },
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.load_auto_replies("s1").await.unwrap(),
        [rule("s1", "size", "S is EU 34")]
    );
    assert_eq!(s.load_auto_replies("s10").await.unwrap().len(), 1);
    assert!(s.load_auto_replies("s").await.unwrap().is_empty());
    s.close().await.unwrap();
}

/// Join requests are kept per group and user, and removed one by one.
pub async fn join_requests<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let req = |g: u64, u: &str| JoinRequestRecord {
        group_id: g,
        user_id: u.into(),
        display_name: u.to_uppercase(),
        requested_at_ms: 3,
    };
    s.write(vec![
        WriteOp::PutJoinRequest(req(30, "u2")),
        WriteOp::PutJoinRequest(req(30, "u1")),
        WriteOp::PutJoinRequest(req(31, "u1")),
    ])
    .await
    .unwrap();
    s.write(vec![WriteOp::RemoveJoinRequest {
        group_id: 30,
        user_id: "u2".into(),
    }])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(s.load_join_requests(30).await.unwrap(), [req(30, "u1")]);
    assert_eq!(s.load_join_requests(31).await.unwrap(), [req(31, "u1")]);
    s.close().await.unwrap();
}

/// A buyer's tags are kept per shop, replaced whole, and removed when empty.
pub async fn buyer_tags<H: Harness>(h: &mut H) {
    let s = h.open().await;
    let tags = |shop: &str, user: &str, t: &[&str]| BuyerTagsRecord {
        shop_id: shop.into(),
        user_id: user.into(),
        tags: t.iter().map(|x| x.to_string()).collect(),
    };
    s.write(vec![
        WriteOp::PutBuyerTags(tags("s1", "u1", &["orders:3", "size:s"])),
        WriteOp::PutBuyerTags(tags("s1", "u2", &["vip"])),
        WriteOp::PutBuyerTags(tags("s10", "u1", &["vip"])),
    ])
    .await
    .unwrap();
    s.write(vec![
        WriteOp::PutBuyerTags(tags("s1", "u1", &["vip"])),
        WriteOp::PutBuyerTags(tags("s1", "u2", &[])),
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.load_buyer_tags("s1", "u1").await.unwrap(),
        Some(tags("s1", "u1", &["vip"]))
    );
    assert_eq!(s.load_buyer_tags("s1", "u2").await.unwrap(), None);
    assert_eq!(
        s.load_buyer_tags("s10", "u1").await.unwrap(),
        Some(tags("s10", "u1", &["vip"]))
    );

    // Many at once: more buyers than one round of reads, every third with
    // tags, beside buyers without any and another shop's tags.
    let many: Vec<String> = (0..2 * crate::BUYER_TAG_READS_IN_FLIGHT + 22)
        .map(|i| format!("m{i:03}"))
        .collect();
    let tagged: Vec<BuyerTagsRecord> = many
        .iter()
        .step_by(3)
        .map(|u| tags("s1", u, &["size:m"]))
        .collect();
    s.write(tagged.iter().cloned().map(WriteOp::PutBuyerTags).collect())
        .await
        .unwrap();
    s.write(vec![WriteOp::PutBuyerTags(tags("s10", "m001", &["vip"]))])
        .await
        .unwrap();
    let mut asked = many.clone();
    asked.extend(["u1".to_string(), "u2".to_string(), "nobody".to_string()]);
    let mut found = s.load_buyer_tags_of("s1", &asked).await.unwrap();
    found.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let mut expected = tagged;
    expected.push(tags("s1", "u1", &["vip"]));
    assert_eq!(found, expected);
    assert_eq!(s.load_buyer_tags_of("s1", &[]).await.unwrap(), []);
    assert_eq!(
        s.load_buyer_tags_of("s10", &many[..3]).await.unwrap(),
        [tags("s10", "m001", &["vip"])]
    );
    s.close().await.unwrap();
}

async fn schedules_and_targeted_messages(h: &mut impl Harness) {
    let s = h.open().await;
    assert!(s.load_schedules().await.unwrap().is_empty());
    let schedule = |group_id: u64, schedule_id: u64, next_at_ms: u64| ScheduleRecord {
        group_id,
        schedule_id,
        content: vec![1, 2, 3],
        first_at_ms: 1_000,
        every_ms: 604_800_000,
        next_at_ms,
        created_by: "agent".into(),
        ..Default::default()
    };
    let targeted = MessageRecord {
        audience: vec!["u1".into(), "u3".into()],
        audience_expr: "vip".into(),
        ..msg(2, 1)
    };
    s.write(vec![
        WriteOp::PutSchedule(schedule(2, 7, 1_000)),
        WriteOp::PutSchedule(schedule(1, 9, 1_000)),
        WriteOp::PutSchedule(schedule(2, 3, 1_000)),
        WriteOp::AppendMessage(targeted.clone()),
    ])
    .await
    .unwrap();
    // One occurrence fired: the schedule moves on in the same batch as
    // its message; another is cancelled.
    let mut fired = schedule(2, 7, 605_801_000);
    fired.fired = 1;
    fired.last_seq = 2;
    s.write(vec![
        WriteOp::AppendMessage(msg(2, 2)),
        WriteOp::PutSchedule(fired.clone()),
        WriteOp::RemoveSchedule {
            group_id: 1,
            schedule_id: 9,
        },
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.load_schedules().await.unwrap(),
        [schedule(2, 3, 1_000), fired],
        "ascending group and schedule id, the cancelled one gone"
    );
    assert_eq!(
        s.messages_after(2, 0, 10).await.unwrap()[0],
        targeted,
        "a targeted message keeps its audience"
    );
    s.close().await.unwrap();
}

async fn customer_service(h: &mut impl Harness) {
    let s = h.open().await;
    assert_eq!(s.load_cs_shop("s1").await.unwrap(), None);
    assert_eq!(s.load_cs_buyer("s1", "b1").await.unwrap(), None);
    let shop = |used: u32| CsShopRecord {
        shop_id: "s1".into(),
        required_tier: "vip".into(),
        agent_cap: 5,
        idle_close_ms: 1_800_000,
        proactive_base: 10,
        proactive_day: 20_000,
        proactive_used: used,
    };
    let buyer = |shop: &str, b: &str, state: u32| CsBuyerRecord {
        shop_id: shop.into(),
        buyer_id: b.into(),
        session_id: 42,
        assigned_agent: "mei".into(),
        state,
        ..Default::default()
    };
    s.write(vec![
        WriteOp::PutCsShop(shop(1)),
        WriteOp::PutCsBuyer(buyer("s1", "b1", 1)),
        WriteOp::PutCsBuyer(buyer("s10", "b1", 2)),
    ])
    .await
    .unwrap();
    s.write(vec![
        WriteOp::PutCsShop(shop(2)),
        WriteOp::PutCsBuyer(buyer("s1", "b1", 3)),
    ])
    .await
    .unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(s.load_cs_shop("s1").await.unwrap(), Some(shop(2)));
    assert_eq!(
        s.load_cs_buyer("s1", "b1").await.unwrap(),
        Some(buyer("s1", "b1", 3))
    );
    assert_eq!(
        s.load_cs_buyer("s10", "b1").await.unwrap(),
        Some(buyer("s10", "b1", 2)),
        "per shop"
    );
    assert_eq!(s.load_cs_buyer("s1", "b10").await.unwrap(), None);
    s.close().await.unwrap();
}

/// Many shops, each with a group, and one buyer in all of them: whatever a
/// backend spreads by shop, listings across shops still see every shop, in
/// key order, before and after a reopen; and one submission that names every
/// shop is durable whole when its callback says so.
pub async fn many_shops<H: Harness>(h: &mut H) {
    const SHOPS: u64 = 24;
    let shop = |i: u64| format!("shop-{i}");
    let group_id = |i: u64| 1_000 - i * 7; // ids not in shop order
    let s = h.open().await;
    for i in 0..SHOPS {
        let g = group_id(i);
        s.write(vec![
            WriteOp::PutGroup(GroupRecord {
                group_id: g,
                shop_id: shop(i),
                name: format!("group of {}", shop(i)),
                ..Default::default()
            }),
            WriteOp::PutMember(MemberRecord {
                group_id: g,
                user_id: "buyer".into(),
                ..Default::default()
            }),
            WriteOp::AppendMessage(msg(g, 1)),
            WriteOp::AppendMessage(msg(g, 2)),
            WriteOp::PutObject(ObjectRecord {
                group_id: g,
                object_id: 1,
                body: vec![1],
                due_ms: 5_000 + i,
            }),
            WriteOp::PutSchedule(ScheduleRecord {
                group_id: g,
                schedule_id: 1,
                next_at_ms: 9_000 + i,
                ..Default::default()
            }),
            WriteOp::PutCard {
                shop_id: "mall".into(),
                product_id: "phone".into(),
                group_id: g,
            },
        ])
        .await
        .unwrap();
    }
    // One submission for every shop, as the buyer-feedback tick writes.
    s.write(
        (0..SHOPS)
            .map(|i| WriteOp::PutFeedback {
                shop_id: shop(i),
                day: 3,
                positive: i,
                negative: 1,
            })
            .collect(),
    )
    .await
    .unwrap();
    let mut ids: Vec<u64> = (0..SHOPS).map(group_id).collect();
    ids.sort_unstable();
    many_shops_read(&s, &ids, "before a reopen").await;
    s.close().await.unwrap();
    let s = h.open().await;
    many_shops_read(&s, &ids, "after a reopen").await;
    s.close().await.unwrap();
}

/// What [`many_shops`] wrote, read back: group `ids[k]` is of shop
/// `shop-{(1000 - ids[k]) / 7}`.
async fn many_shops_read(s: &Arc<dyn Store>, ids: &[u64], round: &str) {
    assert_eq!(s.groups_of_user("buyer").await.unwrap(), ids, "{round}");
    assert_eq!(
        s.groups_with_card("mall", "phone").await.unwrap(),
        ids,
        "{round}"
    );
    assert_eq!(s.max_group_id().await.unwrap(), 1_000, "{round}");
    let mut due: Vec<u64> = s
        .due_objects()
        .await
        .unwrap()
        .iter()
        .map(|d| d.group_id)
        .collect();
    // Due objects come in no promised order.
    due.sort_unstable();
    assert_eq!(due, ids, "{round}: due objects of every shop");
    let scheduled: Vec<u64> = s
        .load_schedules()
        .await
        .unwrap()
        .iter()
        .map(|r| r.group_id)
        .collect();
    assert_eq!(scheduled, ids, "{round}: schedules of every shop, by group");
    for &g in ids {
        let i = (1_000 - g) / 7;
        let shop = format!("shop-{i}");
        let group = s.load_group(g).await.unwrap();
        assert_eq!(group.map(|r| r.shop_id), Some(shop.clone()), "{round}");
        assert_eq!(s.last_seq(g).await.unwrap(), 2, "{round}: group {g}");
        assert_eq!(seqs(&s.messages_after(g, 0, 10).await.unwrap()), [1, 2]);
        assert_eq!(
            s.load_feedback(&shop).await.unwrap(),
            [FeedbackDay {
                day: 3,
                positive: i,
                negative: 1
            }],
            "{round}: {shop}"
        );
    }
}
