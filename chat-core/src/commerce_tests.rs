//! Commerce against the real embedded store, time passed in by hand: no
//! test sleeps until a deadline.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1::{
    self, CommerceChange, CommerceResult, GroupBuyState, commerce_answer, commerce_event,
};

use crate::tests::{Fixture, NOW, agent, buyer, code, create, drain, fixture, sub};
use crate::*;

const SHOP: &str = "shop-7";

fn product(id: &str, price_minor: i64) -> v1::Product {
    v1::Product {
        product_id: id.into(),
        title: format!("Product {id}"),
        price_minor,
        ..Default::default()
    }
}

/// A group of SHOP with an agent, `buyers` buyers who joined it, and a
/// product `sku-1`; returns the group id and an outbox watching it.
async fn shop_group(f: &Fixture, buyers: usize) -> (u64, Outbox) {
    let a = agent("a1", SHOP);
    let group_id = create(&f.groups, &a, 0).await;
    f.groups
        .put_product(&a, product("sku-1", 39_900), NOW)
        .await
        .unwrap();
    for i in 0..buyers {
        let b = buyer(&format!("b{i}"));
        let (s, _) = sub(1_000 + i as u64, &b, OutboxLimits::default());
        f.groups.join(&b, group_id, s, NOW).await.unwrap();
    }
    let (watch, outbox) = sub(1, &a, OutboxLimits::default());
    f.groups.join(&a, group_id, watch, NOW).await.unwrap();
    (group_id, outbox)
}

fn start_req(group_id: u64, target: u32, slots: u32, deadline_ms: u64) -> v1::StartGroupBuy {
    v1::StartGroupBuy {
        group_id,
        product_id: "sku-1".into(),
        price_minor: 29_900,
        target,
        slots,
        starts_at_ms: 0,
        deadline_ms,
    }
}

fn group_buy(a: &v1::CommerceAnswer) -> &v1::GroupBuy {
    match &a.object {
        Some(commerce_answer::Object::GroupBuy(g)) => g,
        other => panic!("not a group-buy: {other:?}"),
    }
}

fn result(a: &v1::CommerceAnswer) -> CommerceResult {
    a.result()
}

/// The commerce events among pushed messages, as (change, object).
fn events(msgs: &[v1::ChatMessage]) -> Vec<(CommerceChange, commerce_event::Object)> {
    msgs.iter()
        .filter_map(|m| m.commerce.as_ref())
        .map(|e| (e.change(), e.object.clone().unwrap()))
        .collect()
}

fn group_buy_states(msgs: &[v1::ChatMessage]) -> Vec<(GroupBuyState, bool)> {
    events(msgs)
        .into_iter()
        .filter_map(|(c, o)| match (c, o) {
            (CommerceChange::State, commerce_event::Object::GroupBuy(g)) => {
                Some((g.state(), g.closed))
            }
            _ => None,
        })
        .collect()
}

fn progress_counts(msgs: &[v1::ChatMessage]) -> Vec<u32> {
    events(msgs)
        .into_iter()
        .filter_map(|(c, o)| match (c, o) {
            (CommerceChange::Progress, commerce_event::Object::GroupBuy(g)) => Some(g.joined),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_group_buy_succeeds_sells_out_and_announces_each_change_once() {
    let f = fixture().await;
    let (group_id, watch) = shop_group(&f, 6).await;
    let a = agent("a1", SHOP);
    let started = f
        .groups
        .start_group_buy(&a, start_req(group_id, 3, 5, NOW + 60_000), NOW)
        .await
        .unwrap();
    let id = started.seq;
    assert_eq!(
        group_buy(&started).group_buy_id,
        id,
        "the id is the event's seq"
    );
    let (msgs, _) = drain(&watch).await;
    assert_eq!(events(&msgs)[0].0, CommerceChange::Created);
    assert_eq!(msgs[0].kind(), v1::MessageKind::Commerce);
    assert!(msgs[0].text.contains("Group-buy"), "{}", msgs[0].text);

    let join = |i: usize, t: u64| {
        let groups = f.groups.clone();
        async move {
            groups
                .join_group_buy(&buyer(&format!("b{i}")), group_id, id, t)
                .await
                .unwrap()
        }
    };
    let first = join(0, NOW + 1).await;
    assert_eq!(result(&first), CommerceResult::Joined);
    assert!(first.joined_by_you);
    assert_eq!(
        result(&join(0, NOW + 2).await),
        CommerceResult::AlreadyJoined
    );
    join(1, NOW + 3).await;
    // Progress is coalesced: one event for both joins, on the tick.
    let report = f.groups.tick(NOW + 300).await;
    assert_eq!(report.progress_posted, 1);
    assert_eq!(
        f.groups.tick(NOW + 301).await.progress_posted,
        0,
        "nothing new"
    );
    let (msgs, _) = drain(&watch).await;
    assert_eq!(progress_counts(&msgs), [2]);

    join(2, NOW + 400).await; // reaches the target
    join(3, NOW + 401).await;
    let last = join(4, NOW + 402).await; // takes the last slot
    assert_eq!(group_buy(&last).state(), GroupBuyState::SoldOut);
    assert_eq!(result(&join(5, NOW + 403).await), CommerceResult::SoldOut);
    f.groups.tick(NOW + 1_000).await;
    f.groups.tick(NOW + 60_000).await; // the deadline: already closed
    let (msgs, _) = drain(&watch).await;
    assert_eq!(
        group_buy_states(&msgs),
        [
            (GroupBuyState::Succeeded, false),
            (GroupBuyState::SoldOut, true)
        ]
    );
    // The fourth join's progress is carried by the sold-out event.
    assert_eq!(progress_counts(&msgs), [0u32; 0]);
    let counts: Vec<u32> = events(&msgs)
        .into_iter()
        .filter_map(|(_, o)| match o {
            commerce_event::Object::GroupBuy(g) => Some(g.joined),
            _ => None,
        })
        .collect();
    assert_eq!(counts, [3, 5]);
    let shown = f
        .groups
        .commerce_object(&a, group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(group_buy(&shown).joined, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_never_oversell() {
    let f = fixture().await;
    let (group_id, watch) = shop_group(&f, 120).await;
    let a = agent("a1", SHOP);
    let id = f
        .groups
        .start_group_buy(&a, start_req(group_id, 10, 50, NOW + 60_000), NOW)
        .await
        .unwrap()
        .seq;
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let groups = f.groups.clone();
            tokio::spawn(async move {
                groups
                    .join_group_buy(&buyer(&format!("b{i}")), group_id, id, NOW + 1)
                    .await
                    .unwrap()
                    .result()
            })
        })
        .collect();
    let mut joined = 0;
    let mut sold_out = 0;
    for t in tasks {
        match t.await.unwrap() {
            CommerceResult::Joined => joined += 1,
            CommerceResult::SoldOut => sold_out += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((joined, sold_out), (50, 70));
    let (msgs, _) = drain(&watch).await;
    let states = group_buy_states(&msgs);
    assert_eq!(
        states
            .iter()
            .filter(|s| s.0 == GroupBuyState::SoldOut)
            .count(),
        1
    );
    assert_eq!(
        states
            .iter()
            .filter(|s| s.0 == GroupBuyState::Succeeded)
            .count(),
        1
    );
}

#[tokio::test]
async fn a_deadline_that_passed_while_stopped_resolves_at_start_up_once() {
    let mut f = fixture().await;
    let (group_id, _watch) = shop_group(&f, 2).await;
    let a = agent("a1", SHOP);
    let id = f
        .groups
        .start_group_buy(&a, start_req(group_id, 2, 10, NOW + 1_000), NOW)
        .await
        .unwrap()
        .seq;
    f.groups
        .join_group_buy(&buyer("b0"), group_id, id, NOW + 1)
        .await
        .unwrap();
    f.reopen(CoreConfig::default()).await;
    // Restarted: the participant is still there, and joining is idempotent.
    let again = f
        .groups
        .join_group_buy(&buyer("b0"), group_id, id, NOW + 2)
        .await
        .unwrap();
    assert_eq!(result(&again), CommerceResult::AlreadyJoined);
    assert_eq!(group_buy(&again).joined, 1);
    f.reopen(CoreConfig::default()).await;
    // Down past the deadline: the first tick after start-up resolves it.
    let report = f.groups.tick(NOW + 5_000).await;
    assert_eq!(report.deadlines_resolved, 1);
    assert_eq!(f.groups.tick(NOW + 6_000).await.deadlines_resolved, 0);
    let shown = f
        .groups
        .commerce_object(&a, group_id, id, NOW + 6_000)
        .await
        .unwrap();
    assert_eq!(
        (group_buy(&shown).state(), group_buy(&shown).closed),
        (GroupBuyState::Failed, true)
    );
    let late = f
        .groups
        .join_group_buy(&buyer("b1"), group_id, id, NOW + 6_000)
        .await
        .unwrap();
    assert_eq!(result(&late), CommerceResult::Closed);
    // The failure is on the stream for every member, once.
    let page = f.groups.history(&a, group_id, 0, 50).await.unwrap();
    assert_eq!(
        group_buy_states(&page.messages),
        [(GroupBuyState::Failed, true)]
    );
    f.reopen(CoreConfig::default()).await;
    assert_eq!(
        f.groups.tick(NOW + 7_000).await.deadlines_resolved,
        0,
        "resolved for good"
    );
}

#[tokio::test]
async fn progress_left_unbroadcast_at_a_restart_is_broadcast_after_it() {
    let mut f = fixture().await;
    let (group_id, _watch) = shop_group(&f, 2).await;
    let a = agent("a1", SHOP);
    let id = f
        .groups
        .start_group_buy(&a, start_req(group_id, 2, 10, NOW + 60_000), NOW)
        .await
        .unwrap()
        .seq;
    f.groups
        .join_group_buy(&buyer("b0"), group_id, id, NOW + 1)
        .await
        .unwrap();
    f.reopen(CoreConfig::default()).await;
    let (watch, outbox) = sub(9, &a, OutboxLimits::default());
    f.groups.join(&a, group_id, watch, NOW).await.unwrap();
    assert_eq!(f.groups.tick(NOW + 500).await.progress_posted, 1);
    let (msgs, _) = drain(&outbox).await;
    assert_eq!(progress_counts(&msgs), [1]);
    // Once broadcast, a further restart has nothing left to send.
    f.reopen(CoreConfig::default()).await;
    f.groups
        .commerce_object(&a, group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(f.groups.tick(NOW + 1_000).await.progress_posted, 0);
}

#[tokio::test]
async fn leaving_is_for_open_group_buys_only() {
    let f = fixture().await;
    let (group_id, _watch) = shop_group(&f, 3).await;
    let a = agent("a1", SHOP);
    let id = f
        .groups
        .start_group_buy(&a, start_req(group_id, 2, 10, NOW + 60_000), NOW)
        .await
        .unwrap()
        .seq;
    let b0 = buyer("b0");
    f.groups
        .join_group_buy(&b0, group_id, id, NOW)
        .await
        .unwrap();
    let left = f
        .groups
        .leave_group_buy(&b0, group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(
        (result(&left), group_buy(&left).joined),
        (CommerceResult::Left, 0)
    );
    let none = f
        .groups
        .leave_group_buy(&b0, group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(result(&none), CommerceResult::NotJoined);
    for b in ["b0", "b1"] {
        f.groups
            .join_group_buy(&buyer(b), group_id, id, NOW)
            .await
            .unwrap();
    }
    let late = f
        .groups
        .leave_group_buy(&b0, group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(
        result(&late),
        CommerceResult::Closed,
        "succeeded: the deal is on"
    );
    let cancelled = f.groups.end_commerce(&a, group_id, id, NOW).await.unwrap();
    assert_eq!(group_buy(&cancelled).state(), GroupBuyState::Cancelled);
    let twice = f.groups.end_commerce(&a, group_id, id, NOW).await.unwrap();
    assert_eq!((result(&twice), twice.seq), (CommerceResult::Closed, 0));
}

#[tokio::test]
async fn coupons_are_claimed_atomically_within_their_limits() {
    let mut f = fixture().await;
    let (group_id, watch) = shop_group(&f, 4).await;
    let a = agent("a1", SHOP);
    let issued = f
        .groups
        .issue_coupon(
            &a,
            v1::IssueCoupon {
                group_id,
                title: "Spring sale".into(),
                amount_minor: 2_000,
                min_spend_minor: 10_000,
                currency: String::new(),
                quantity: 3,
                per_buyer_limit: 2,
                expires_at_ms: NOW + 10_000,
            },
            NOW,
        )
        .await
        .unwrap();
    let id = issued.seq;
    let claim = |b: &str, t: u64| {
        let groups = f.groups.clone();
        let b = buyer(b);
        async move { groups.claim_coupon(&b, group_id, id, t).await.unwrap() }
    };
    assert_eq!(claim("b0", NOW).await.claimed_by_you, 1);
    assert_eq!(claim("b0", NOW).await.claimed_by_you, 2);
    assert_eq!(
        result(&claim("b0", NOW).await),
        CommerceResult::LimitReached
    );
    assert_eq!(result(&claim("b1", NOW).await), CommerceResult::Claimed);
    assert_eq!(result(&claim("b2", NOW).await), CommerceResult::Exhausted);
    f.reopen(CoreConfig::default()).await;
    let after = f
        .groups
        .commerce_object(&buyer("b0"), group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(after.claimed_by_you, 2, "claims survive a restart");
    let Some(commerce_answer::Object::Coupon(c)) = after.object else {
        panic!()
    };
    assert_eq!((c.claimed, c.currency.as_str()), (3, "CNY"));
    let expired = f
        .groups
        .claim_coupon(&buyer("b3"), group_id, id, NOW + 10_000)
        .await
        .unwrap();
    assert_eq!(result(&expired), CommerceResult::Expired);
    let (msgs, _) = drain(&watch).await;
    let changes: Vec<_> = events(&msgs).into_iter().map(|e| e.0).collect();
    assert_eq!(
        changes,
        [CommerceChange::Created, CommerceChange::State],
        "all claimed, once"
    );
}

#[tokio::test]
async fn polls_tally_coalesced_and_close_once_with_the_final_result() {
    let f = fixture().await;
    let (group_id, watch) = shop_group(&f, 3).await;
    let a = agent("a1", SHOP);
    let opened = f
        .groups
        .open_poll(
            &a,
            v1::OpenPoll {
                group_id,
                question: "Which colour next?".into(),
                options: vec!["red".into(), "green".into()],
                deadline_ms: NOW + 5_000,
                votes_final: false,
            },
            NOW,
        )
        .await
        .unwrap();
    let id = opened.seq;
    for (b, o) in [("b0", 0), ("b1", 1), ("b2", 1), ("b0", 1)] {
        let v = f
            .groups
            .vote(&buyer(b), group_id, id, o, NOW + 1)
            .await
            .unwrap();
        assert_eq!((result(&v), v.your_vote), (CommerceResult::Voted, o + 1));
    }
    let bad = f.groups.vote(&buyer("b0"), group_id, id, 2, NOW + 1).await;
    assert_eq!(code(bad), ErrorCode::InvalidArgument);
    assert_eq!(f.groups.tick(NOW + 300).await.progress_posted, 1);
    assert_eq!(f.groups.tick(NOW + 5_000).await.deadlines_resolved, 1);
    let late = f
        .groups
        .vote(&buyer("b1"), group_id, id, 0, NOW + 5_001)
        .await
        .unwrap();
    assert_eq!(result(&late), CommerceResult::VoteClosed);
    let (msgs, _) = drain(&watch).await;
    let polls: Vec<_> = events(&msgs)
        .into_iter()
        .filter_map(|(c, o)| match o {
            commerce_event::Object::Poll(p) => Some((
                c,
                p.options.iter().map(|o| o.votes).collect::<Vec<_>>(),
                p.closed,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        polls,
        [
            (CommerceChange::Created, vec![0, 0], false),
            (CommerceChange::Progress, vec![0, 3], false),
            (CommerceChange::State, vec![0, 3], true),
        ]
    );
    assert!(
        msgs.last().unwrap().text.contains("green"),
        "{}",
        msgs.last().unwrap().text
    );
}

#[tokio::test]
async fn a_product_update_reaches_every_card_in_every_group() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let (g1, watch1) = shop_group(&f, 0).await;
    let (g2, watch2) = shop_group(&f, 0).await;
    let (g3, watch3) = shop_group(&f, 0).await;
    for g in [g1, g2] {
        let card = v1::PostCard {
            group_id: g,
            product_id: "sku-1".into(),
            product: None,
        };
        f.groups.post_card(&a, card, NOW).await.unwrap();
    }
    let mut changed = product("sku-1", 35_900);
    changed.sold_out = true;
    let updated = f
        .groups
        .put_product(&a, changed.clone(), NOW + 1)
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    let same = f.groups.put_product(&a, changed, NOW + 2).await.unwrap();
    assert_eq!(same.version, 2, "an unchanged product is not a new version");
    for (watch, cards) in [(&watch1, 1), (&watch2, 1), (&watch3, 0)] {
        let (msgs, _) = drain(watch).await;
        let seen: Vec<_> = events(&msgs)
            .into_iter()
            .map(|(c, o)| match o {
                commerce_event::Object::Product(p) => (c, p.version, p.sold_out),
                other => panic!("{other:?}"),
            })
            .collect();
        let expected: Vec<_> = [
            (CommerceChange::Created, 1, false),
            (CommerceChange::ProductUpdated, 2, true),
        ]
        .into_iter()
        .take(cards * 2)
        .collect();
        assert_eq!(seen, expected);
    }
    let _ = g3;
}

#[tokio::test]
async fn bad_commerce_input_is_refused_with_its_code_and_changes_nothing() {
    let f = fixture().await;
    let (group_id, _watch) = shop_group(&f, 1).await;
    let a = agent("a1", SHOP);
    let other = agent("x1", "shop-9");
    let b0 = buyer("b0");
    let last_seq = |groups: &Groups| {
        let groups = groups.clone();
        let a = a.clone();
        async move {
            groups
                .history(&a, group_id, 0, 1)
                .await
                .unwrap()
                .messages
                .last()
                .map_or(0, |m| m.seq)
        }
    };
    let before = last_seq(&f.groups).await;
    let card = |p: Option<v1::Product>| v1::PostCard {
        group_id,
        product_id: "sku-1".into(),
        product: p,
    };
    assert_eq!(
        code(f.groups.post_card(&b0, card(None), NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(f.groups.post_card(&other, card(None), NOW).await),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(
            f.groups
                .post_card(&a, card(Some(product("sku-2", -1))), NOW)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            f.groups
                .post_card(&a, card(Some(product("sku-2", MAX_MONEY_MINOR + 1))), NOW)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.product(&a, "sku-2").await),
        ErrorCode::UnknownProduct,
        "nothing created"
    );
    let unknown = v1::PostCard {
        group_id,
        product_id: "nope".into(),
        product: None,
    };
    assert_eq!(
        code(f.groups.post_card(&a, unknown, NOW).await),
        ErrorCode::UnknownProduct
    );
    let past = start_req(group_id, 2, 5, NOW - 1);
    assert_eq!(
        code(f.groups.start_group_buy(&a, past, NOW).await),
        ErrorCode::InvalidArgument
    );
    let too_big = start_req(group_id, 100_001, 200_000, NOW + 1_000);
    assert_eq!(
        code(f.groups.start_group_buy(&a, too_big, NOW).await),
        ErrorCode::InvalidArgument
    );
    let slots_short = start_req(group_id, 10, 5, NOW + 1_000);
    assert_eq!(
        code(f.groups.start_group_buy(&a, slots_short, NOW).await),
        ErrorCode::InvalidArgument
    );
    let mut negative = start_req(group_id, 2, 5, NOW + 1_000);
    negative.price_minor = -5;
    assert_eq!(
        code(f.groups.start_group_buy(&a, negative, NOW).await),
        ErrorCode::InvalidArgument
    );
    let by_buyer = start_req(group_id, 2, 5, NOW + 1_000);
    assert_eq!(
        code(f.groups.start_group_buy(&b0, by_buyer, NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(f.groups.join_group_buy(&b0, group_id, 999, NOW).await),
        ErrorCode::UnknownObject
    );
    assert_eq!(
        code(f.groups.join_group_buy(&a, group_id, 999, NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(
            f.groups
                .join_group_buy(&buyer("stranger"), group_id, 1, NOW)
                .await
        ),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.join_group_buy(&b0, 424_242, 1, NOW).await),
        ErrorCode::UnknownGroup
    );
    let poll = v1::OpenPoll {
        group_id,
        question: "Q?".into(),
        options: vec!["only".into()],
        deadline_ms: NOW + 1_000,
        votes_final: false,
    };
    assert_eq!(
        code(f.groups.open_poll(&a, poll, NOW).await),
        ErrorCode::InvalidArgument
    );
    let coupon = v1::IssueCoupon {
        group_id,
        title: "X".into(),
        amount_minor: 100,
        quantity: 0,
        expires_at_ms: NOW + 1_000,
        ..Default::default()
    };
    assert_eq!(
        code(f.groups.issue_coupon(&a, coupon, NOW).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(last_seq(&f.groups).await, before, "no event was posted");
    // A joined group-buy that is closed is a result, not an error.
    let id = f
        .groups
        .start_group_buy(&a, start_req(group_id, 2, 5, NOW + 1_000), NOW)
        .await
        .unwrap()
        .seq;
    f.groups.end_commerce(&a, group_id, id, NOW).await.unwrap();
    let closed = f
        .groups
        .join_group_buy(&b0, group_id, id, NOW)
        .await
        .unwrap();
    assert_eq!(
        (result(&closed), group_buy(&closed).joined),
        (CommerceResult::Closed, 0)
    );
}
