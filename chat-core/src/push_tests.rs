//! Pushes, targeted pushes and scheduled pushes against the real embedded
//! store, with time passed in: no test waits for a schedule.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1::{self, push_content::Kind};

use crate::reach::DAY_MS;
use crate::tests::{Fixture, NOW, agent, buyer, code, create, drain, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-p";
const WEEK: u64 = 7 * DAY_MS;

fn announcement(text: &str, audience: &str) -> v1::PushContent {
    v1::PushContent {
        kind: Some(Kind::Announcement(text.into())),
        audience: audience.into(),
    }
}

fn push(group_id: u64, content: v1::PushContent) -> v1::PushPromotion {
    v1::PushPromotion {
        group_id,
        content: Some(content),
    }
}

/// A group of SHOP with agent a1 and buyers `vip` (tagged vip, size:s),
/// `reg` (orders:3) and `new`, each with an outbox.
async fn segmented(f: &Fixture) -> (u64, Vec<(Identity, Outbox)>) {
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    f.groups
        .tag_buyer(
            &a,
            "vip",
            vec!["vip".into(), "size:s".into()],
            vec![],
            false,
        )
        .await
        .unwrap();
    f.groups
        .tag_buyer(&a, "reg", vec!["orders:3".into()], vec![], false)
        .await
        .unwrap();
    let mut members = Vec::new();
    for (n, id) in ["vip", "reg", "new"].into_iter().enumerate() {
        let b = buyer(id);
        let (s, outbox) = sub(10 + n as u64, &b, OutboxLimits::default());
        f.groups.join(&b, g, s, NOW).await.unwrap();
        members.push((b, outbox));
    }
    (g, members)
}

fn kinds(msgs: &[v1::ChatMessage]) -> Vec<i32> {
    msgs.iter().map(|m| m.kind).collect()
}

const COMMERCE: i32 = v1::MessageKind::Commerce as i32;
const HIDDEN: i32 = v1::MessageKind::Hidden as i32;

#[tokio::test]
async fn a_targeted_push_reaches_only_its_audience_live_in_history_and_on_resume() {
    let f = fixture().await;
    let (g, members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let pushed = f
        .groups
        .push_promotion(
            &a,
            push(g, announcement("VIP early access", "vip AND size:s")),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(pushed.audience_size, 1, "only the VIP matches");
    let everyone = f
        .groups
        .push_promotion(&a, push(g, announcement("Sale", "")), NOW)
        .await
        .unwrap();
    assert_eq!(everyone.audience_size, 0, "0 means everyone");

    // Live.
    let (vip_live, _) = drain(&members[0].1).await;
    let (reg_live, _) = drain(&members[1].1).await;
    assert_eq!(kinds(&vip_live), [COMMERCE, COMMERCE]);
    assert_eq!(vip_live[0].audience, "vip AND size:s");
    assert!(vip_live[0].text.contains("VIP early access"));
    assert_eq!(kinds(&reg_live), [HIDDEN, COMMERCE]);
    assert_eq!(reg_live[0].seq, pushed.seq, "the placeholder keeps the seq");
    assert!(reg_live[0].text.is_empty() && reg_live[0].commerce.is_none());

    // History (from the ring, then from the store after a reopen below).
    let page = f.groups.history(&members[2].0, g, 0, 10).await.unwrap();
    let seen: Vec<_> = page.messages.iter().map(|m| (m.seq, m.kind)).collect();
    assert!(seen.contains(&(pushed.seq, HIDDEN)), "{seen:?}");
    let page = f.groups.history(&a, g, 0, 10).await.unwrap();
    assert!(
        page.messages
            .iter()
            .any(|m| m.seq == pushed.seq && m.kind == COMMERCE),
        "staff see every push"
    );

    // Resume and range from before the push.
    let (s, outbox) = sub(99, &members[1].0, OutboxLimits::default());
    f.groups
        .resume(&members[1].0, g, pushed.seq - 1, s)
        .await
        .unwrap();
    let (resumed, _) = drain(&outbox).await;
    assert_eq!(kinds(&resumed), [HIDDEN, COMMERCE]);
    let range = f
        .groups
        .fetch_range(&members[1].0, g, pushed.seq - 1, 10)
        .await
        .unwrap();
    assert_eq!(kinds(&range.messages), [HIDDEN, COMMERCE]);

    // Quoting it would show it: refused for those outside.
    let mut reply = text(g, "what was that?");
    reply.reply_to = pushed.seq;
    assert_eq!(
        code(f.groups.post(&members[1].0, reply, NOW).await),
        ErrorCode::ReplyToUnknown
    );
    let mut reply = text(g, "thanks!");
    reply.reply_to = pushed.seq;
    f.groups.post(&members[0].0, reply, NOW).await.unwrap();
}

#[tokio::test]
async fn stored_targeted_pushes_stay_hidden_after_a_restart_and_late_joiners_are_outside() {
    let mut f = fixture().await;
    let (g, members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let pushed = f
        .groups
        .push_promotion(
            &a,
            push(g, announcement("Back in stock", "tier:regular")),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(pushed.audience_size, 1);
    f.reopen(CoreConfig::default()).await;
    for (who, expect) in [(&members[1].0, COMMERCE), (&members[0].0, HIDDEN)] {
        let page = f.groups.history(who, g, 0, 10).await.unwrap();
        let m = page.messages.iter().find(|m| m.seq == pushed.seq).unwrap();
        assert_eq!(m.kind, expect, "{}", who.user_id());
    }
    // Tagged and joined after the push: not in its audience.
    f.groups
        .tag_buyer(&a, "late", vec!["returning".into()], vec![], false)
        .await
        .unwrap();
    let late = buyer("late");
    let (s, _) = sub(50, &late, OutboxLimits::default());
    let joined = f.groups.join(&late, g, s, NOW).await.unwrap();
    let m = joined.recent.iter().find(|m| m.seq == pushed.seq).unwrap();
    assert_eq!(m.kind, HIDDEN);
}

/// The audience is read in chunks of buyers (`TAG_READ_CHUNK`): a group
/// larger than one chunk counts every match once, and a buyer who was never
/// tagged matches an expression that no tags satisfy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_larger_than_one_tag_read_counts_every_match_once() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let ids: Vec<String> = (0..crate::push::TAG_READ_CHUNK + 300)
        .map(|i| format!("b{i:05}"))
        .collect();
    let joins = ids.iter().enumerate().map(|(n, id)| {
        let groups = &f.groups;
        async move {
            let b = buyer(id);
            let (s, _) = sub(1_000 + n as u64, &b, OutboxLimits::default());
            groups.join(&b, g, s, NOW).await.unwrap();
        }
    });
    futures_util::future::join_all(joins).await;
    // Every seventh is a VIP; every other of the rest has a tag, the others
    // none at all.
    let tagging = ids
        .iter()
        .enumerate()
        .filter(|(n, _)| n % 7 == 0 || n % 2 == 0)
        .map(|(n, id)| {
            let tag = if n % 7 == 0 { "vip" } else { "size:s" };
            f.groups.tag_buyer(&a, id, vec![tag.into()], vec![], false)
        });
    for tagged in futures_util::future::join_all(tagging).await {
        tagged.unwrap();
    }
    let vips = ids.len().div_ceil(7) as u32;
    let pushed = f
        .groups
        .push_promotion(&a, push(g, announcement("VIP hour", "vip")), NOW)
        .await
        .unwrap();
    assert_eq!(pushed.audience_size, vips);
    let pushed = f
        .groups
        .push_promotion(&a, push(g, announcement("Welcome offer", "not vip")), NOW)
        .await
        .unwrap();
    assert_eq!(pushed.audience_size, ids.len() as u32 - vips);
}

#[tokio::test]
async fn bad_pushes_are_refused_and_take_no_quota() {
    let f = fixture().await;
    let (g, members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let refused = |c: v1::PushContent| f.groups.push_promotion(&a, push(g, c), NOW);
    assert_eq!(
        code(refused(announcement("x", "spend:high AND size:xl")).await),
        ErrorCode::NotEligible,
        "nobody matches"
    );
    assert_eq!(
        code(refused(announcement("x", "vip AND")).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(refused(announcement("x", "size:huge")).await),
        ErrorCode::InvalidArgument,
        "size is a pool name and huge is not its value"
    );
    assert_eq!(
        code(refused(announcement("  ", "")).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(refused(announcement(&"x".repeat(2_001), "")).await),
        ErrorCode::InvalidArgument
    );
    let card = v1::PushContent {
        kind: Some(Kind::ProductId("no-such".into())),
        audience: String::new(),
    };
    assert_eq!(code(refused(card).await), ErrorCode::UnknownProduct);
    assert_eq!(
        code(
            f.groups
                .push_promotion(&members[0].0, push(g, announcement("x", "")), NOW)
                .await
        ),
        ErrorCode::ForbiddenRole
    );
    let q = f.groups.reach_quota(&a, g, NOW).await.unwrap();
    assert_eq!(q.used, 0, "nothing refused took quota");
    for _ in 0..q.limit {
        refused(announcement("x", "")).await.unwrap();
    }
    assert_eq!(
        code(refused(announcement("x", "")).await),
        ErrorCode::QuotaExhausted
    );
}

#[tokio::test]
async fn a_pushed_card_takes_quota_and_is_updated_in_place() {
    let f = fixture().await;
    let (g, members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let mut product = v1::Product {
        product_id: "sku-9".into(),
        title: "Runner".into(),
        price_minor: 9_900,
        ..Default::default()
    };
    f.groups
        .put_product(&a, product.clone(), NOW)
        .await
        .unwrap();
    let card = v1::PushContent {
        kind: Some(Kind::ProductId("sku-9".into())),
        audience: "vip".into(),
    };
    f.groups
        .push_promotion(&a, push(g, card), NOW)
        .await
        .unwrap();
    assert_eq!(f.groups.reach_quota(&a, g, NOW).await.unwrap().used, 1);
    drain(&members[0].1).await;
    product.price_minor = 7_900;
    f.groups.put_product(&a, product, NOW).await.unwrap();
    let (update, _) = drain(&members[0].1).await;
    assert_eq!(update.len(), 1, "the group holds a card of it now");
}

fn weekly(group_id: u64, content: v1::PushContent, first_at_ms: u64) -> v1::SchedulePush {
    v1::SchedulePush {
        group_id,
        content: Some(content),
        first_at_ms,
        every_ms: WEEK,
    }
}

#[tokio::test]
async fn a_weekly_push_fires_once_per_occurrence_also_across_a_restart() {
    let mut f = fixture().await;
    let (g, members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let first = NOW + 60_000;
    let created = f
        .groups
        .schedule_push(&a, weekly(g, announcement("New arrivals", ""), first), NOW)
        .await
        .unwrap();
    let id = created.created;
    assert_eq!(created.schedules.len(), 1);
    assert_eq!(created.schedules[0].next_at_ms, first);

    assert_eq!(f.groups.tick(first - 1).await.schedules.fired, 0, "not yet");
    assert_eq!(f.groups.tick(first).await.schedules.fired, 1);
    assert_eq!(
        f.groups.tick(first + 1_000).await.schedules.fired,
        0,
        "the same occurrence never fires twice"
    );
    let (live, _) = drain(&members[2].1).await;
    assert_eq!(live.len(), 1);
    assert!(live[0].text.contains("New arrivals"));
    assert_eq!(f.groups.reach_quota(&a, g, first).await.unwrap().used, 1);

    // A restart: the fired occurrence is remembered with its message.
    f.reopen(CoreConfig::default()).await;
    assert_eq!(f.groups.tick(first + 2_000).await.schedules.fired, 0);
    let listed = f.groups.list_schedules(&a, g).await.unwrap().schedules;
    assert_eq!(listed[0].schedule_id, id);
    assert_eq!(listed[0].fired, 1);
    assert_eq!(listed[0].next_at_ms, first + WEEK);
    assert_eq!(listed[0].last_outcome, "fired");
    assert_eq!(f.groups.tick(first + WEEK).await.schedules.fired, 1);
    let page = f.groups.history(&a, g, 0, 10).await.unwrap();
    let fired: Vec<_> = page
        .messages
        .iter()
        .filter(|m| m.text.contains("New arrivals"))
        .collect();
    assert_eq!(fired.len(), 2, "one message per occurrence");
    assert_eq!(fired[0].sender_id, "a1", "posted in its creator's name");

    // Cancelled: never again.
    let after = f.groups.cancel_schedule(&a, g, id).await.unwrap();
    assert!(after.schedules.is_empty());
    assert_eq!(f.groups.tick(first + 2 * WEEK).await.schedules.fired, 0);
    assert_eq!(
        code(f.groups.cancel_schedule(&a, g, id).await),
        ErrorCode::UnknownObject
    );
}

#[tokio::test]
async fn occurrences_that_cannot_fire_are_skipped_with_the_reason() {
    let f = fixture().await;
    let (g, _members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let first = NOW + 60_000;
    // Nobody will match: the only VIP loses the tag before it fires.
    f.groups
        .schedule_push(&a, weekly(g, announcement("VIPs", "vip"), first), NOW)
        .await
        .unwrap();
    f.groups
        .tag_buyer(&a, "vip", vec![], vec!["vip".into()], false)
        .await
        .unwrap();
    let r = f.groups.tick(first).await.schedules;
    assert_eq!((r.fired, r.skipped), (0, 1));
    let s = &f.groups.list_schedules(&a, g).await.unwrap().schedules[0];
    assert_eq!((s.skipped, s.last_outcome.as_str()), (1, "no_audience"));
    assert_eq!(s.next_at_ms, first + WEEK, "it moves on");

    // The server was down for three weeks and a day: all missed, none
    // posted at once.
    let r = f.groups.tick(first + WEEK * 3 + DAY_MS).await.schedules;
    assert_eq!((r.fired, r.skipped), (0, 1));
    let s = &f.groups.list_schedules(&a, g).await.unwrap().schedules[0];
    assert_eq!((s.skipped, s.last_outcome.as_str()), (4, "missed"));
    assert_eq!(s.next_at_ms, first + 4 * WEEK);

    // The quota is used up by hand: the occurrence is skipped for it.
    let when = first + 4 * WEEK;
    for _ in 0..3 {
        f.groups
            .push_promotion(&a, push(g, announcement("by hand", "")), when)
            .await
            .unwrap();
    }
    f.groups
        .tag_buyer(&a, "vip", vec!["vip".into()], vec![], false)
        .await
        .unwrap();
    f.groups.tick(when).await;
    let s = &f.groups.list_schedules(&a, g).await.unwrap().schedules[0];
    assert_eq!(s.last_outcome, "quota_exhausted");
}

#[tokio::test]
async fn bad_schedules_are_refused() {
    let f = fixture().await;
    let (g, members) = segmented(&f).await;
    let a = agent("a1", SHOP);
    let schedule = |first_at_ms: u64, every_ms: u64| v1::SchedulePush {
        group_id: g,
        content: Some(announcement("x", "")),
        first_at_ms,
        every_ms,
    };
    for (req, why) in [
        (schedule(NOW, 0), "not in the future"),
        (schedule(NOW + 400 * DAY_MS, 0), "more than a year ahead"),
        (schedule(NOW + 1, 60_000), "a period under an hour"),
    ] {
        assert_eq!(
            code(f.groups.schedule_push(&a, req, NOW).await),
            ErrorCode::InvalidArgument,
            "{why}"
        );
    }
    assert_eq!(
        code(
            f.groups
                .schedule_push(&members[0].0, schedule(NOW + 1, 0), NOW)
                .await
        ),
        ErrorCode::ForbiddenRole
    );
    let other = agent("a9", "another-shop");
    assert_eq!(
        code(
            f.groups
                .schedule_push(&other, schedule(NOW + 1, 0), NOW)
                .await
        ),
        ErrorCode::WrongShop
    );
    for _ in 0..MAX_SCHEDULES_PER_GROUP {
        f.groups
            .schedule_push(&a, schedule(NOW + 1, 0), NOW)
            .await
            .unwrap();
    }
    assert_eq!(
        code(f.groups.schedule_push(&a, schedule(NOW + 1, 0), NOW).await),
        ErrorCode::InvalidArgument,
        "at most {MAX_SCHEDULES_PER_GROUP} per group"
    );
    // Once they have fired they still show, but make room for new ones.
    let base = f.groups.reach_quota(&a, g, NOW).await.unwrap().limit as usize;
    let r = f.groups.tick(NOW + 1).await.schedules;
    assert_eq!(
        (r.fired, r.skipped),
        (base, MAX_SCHEDULES_PER_GROUP - base),
        "the quota allows {base} a day"
    );
    let listed = f
        .groups
        .schedule_push(&a, schedule(NOW + 10, 0), NOW + 2)
        .await
        .unwrap()
        .schedules;
    assert_eq!(listed.len(), MAX_SCHEDULES_PER_GROUP);
    assert_eq!(listed.iter().filter(|s| s.next_at_ms > 0).count(), 1);
}

#[tokio::test]
async fn a_stored_schedule_that_no_longer_parses_is_skipped_not_retried() {
    use qun_storage::StoreExt as _;
    let mut f = fixture().await;
    let (g, _members) = segmented(&f).await;
    let bad = v1::PushContent {
        kind: Some(Kind::Announcement("x".into())),
        audience: "size:huge".into(),
    };
    f.store
        .write(vec![qun_storage::WriteOp::PutSchedule(
            qun_storage::records::ScheduleRecord {
                group_id: g,
                schedule_id: 7,
                content: prost::Message::encode_to_vec(&bad),
                first_at_ms: NOW + 5,
                next_at_ms: NOW + 5,
                created_by: "a1".into(),
                ..Default::default()
            },
        )])
        .await
        .unwrap();
    f.reopen(CoreConfig::default()).await;
    let r = f.groups.tick(NOW + 5).await.schedules;
    assert_eq!((r.fired, r.skipped), (0, 1));
    let s = &f
        .groups
        .list_schedules(&agent("a1", SHOP), g)
        .await
        .unwrap()
        .schedules[0];
    assert_eq!((s.last_outcome.as_str(), s.next_at_ms), ("invalid", 0));
    assert_eq!(f.groups.tick(NOW + 6).await.schedules.skipped, 0);
}
