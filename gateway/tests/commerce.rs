//! Commerce against the real server: the flash crowd on one group-buy,
//! restarts, the merchant HTTP API and bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, code, no_rate_limits};
use qun_client::{Client, ClientError, Event};
use qun_proto::ErrorCode;
use qun_proto::v1::{
    self, CommerceChange, CommerceResult, GroupBuyState, commerce_answer, commerce_event,
};
use serde_json::json;

const SHOP: &str = "shop-1";

fn now_ms() -> u64 {
    common::now_secs() * 1000
}

fn product(id: &str) -> v1::Product {
    v1::Product {
        product_id: id.into(),
        title: "Phone X 256 GB".into(),
        price_minor: 599_900,
        ..Default::default()
    }
}

/// Posts a card of `sku-1` (creating the product) into the group.
async fn card(agent: &Client, group_id: u64) {
    agent
        .post_card(v1::PostCard {
            group_id,
            product_id: "sku-1".into(),
            product: Some(product("sku-1")),
        })
        .await
        .unwrap();
}

async fn start(agent: &Client, group_id: u64, target: u32, slots: u32, ends_in_ms: u64) -> u64 {
    agent
        .start_group_buy(v1::StartGroupBuy {
            group_id,
            product_id: "sku-1".into(),
            price_minor: 499_900,
            target,
            slots,
            starts_at_ms: 0,
            deadline_ms: now_ms() + ends_in_ms,
        })
        .await
        .unwrap()
        .seq
}

fn group_buy(a: &v1::CommerceAnswer) -> &v1::GroupBuy {
    match &a.object {
        Some(commerce_answer::Object::GroupBuy(g)) => g,
        other => panic!("not a group-buy: {other:?}"),
    }
}

/// Reads pushed commerce events until `until` says stop (10 s of silence
/// fails).
async fn events_until(
    client: &mut Client,
    mut until: impl FnMut(&[(CommerceChange, commerce_event::Object)]) -> bool,
) -> Vec<(CommerceChange, commerce_event::Object)> {
    let mut seen = Vec::new();
    while !until(&seen) {
        let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
            .await
            .expect("no push within 10 s")
            .expect("connection ended");
        if let Event::Message(m) = event
            && let Some(e) = m.commerce
        {
            seen.push((e.change(), e.object.unwrap()));
        }
    }
    seen
}

fn group_buy_state(e: &(CommerceChange, commerce_event::Object)) -> Option<GroupBuyState> {
    match e {
        (CommerceChange::State, commerce_event::Object::GroupBuy(g)) => Some(g.state()),
        _ => None,
    }
}

/// 2,000 buyers press "join" on a 500-slot group-buy at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_crowd_takes_exactly_the_slots_and_progress_is_coalesced() {
    const BUYERS: usize = 2_000;
    const SLOTS: u32 = 500;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), no_rate_limits).await;
    let (mut agent, group_id) = server.agent_with_group("Phone launch", 5_000).await;
    agent.join(group_id).await.unwrap();
    card(&agent, group_id).await;
    let id = start(&agent, group_id, 100, SLOTS, 600_000).await;

    // Connect and join the group, 100 phones at a time.
    let url = Arc::new(server.url.clone());
    let mut buyers = Vec::with_capacity(BUYERS);
    for chunk in (0..BUYERS).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let url = url.clone();
                let token = server.token(&format!("fan-{i}"), "buyer", None);
                tokio::spawn(async move {
                    let c = Client::connect(&url, &token).await.unwrap();
                    c.join(group_id).await.unwrap();
                    c
                })
            })
            .collect();
        for t in batch {
            buyers.push(t.await.unwrap());
        }
    }

    // Everyone presses at once.
    let go = Arc::new(tokio::sync::Barrier::new(BUYERS));
    let presses: Vec<_> = buyers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                let a = c.join_group_buy(group_id, id).await.unwrap();
                (i, a.result(), c)
            })
        })
        .collect();
    let mut winners = HashSet::new();
    let mut sold_out = 0;
    let mut clients = Vec::with_capacity(BUYERS);
    for p in presses {
        let (i, result, c) = p.await.unwrap();
        match result {
            CommerceResult::Joined => assert!(winners.insert(i), "buyer {i} joined twice"),
            CommerceResult::SoldOut => sold_out += 1,
            other => panic!("buyer {i}: unexpected {other:?}"),
        }
        clients.push(c);
    }
    assert_eq!(
        winners.len(),
        SLOTS as usize,
        "exactly the slots were taken"
    );
    assert_eq!(sold_out, BUYERS - SLOTS as usize);

    let shown = agent.commerce_object(group_id, id).await.unwrap();
    let g = group_buy(&shown);
    assert_eq!(
        (g.joined, g.state(), g.closed),
        (SLOTS, GroupBuyState::SoldOut, true)
    );

    // The agent's stream: the start, coalesced progress, and each state
    // change exactly once.
    let seen = events_until(&mut agent, |seen| {
        seen.iter()
            .any(|e| group_buy_state(e) == Some(GroupBuyState::SoldOut))
    })
    .await;
    let states: Vec<_> = seen.iter().filter_map(group_buy_state).collect();
    assert_eq!(states, [GroupBuyState::Succeeded, GroupBuyState::SoldOut]);
    let progress = seen
        .iter()
        .filter(|(c, _)| *c == CommerceChange::Progress)
        .count();
    assert!(
        progress < SLOTS as usize / 10,
        "{progress} progress events for {SLOTS} joins: not coalesced"
    );
    // Retrying (a flaky network) changes nothing.
    let again = clients[*winners.iter().next().unwrap()]
        .join_group_buy(group_id, id)
        .await
        .unwrap();
    assert_eq!(again.result(), CommerceResult::AlreadyJoined);
    assert_eq!(
        server.metric("qun_commerce_actions_total").await,
        u64::from(SLOTS)
    );
    drop(clients);
    server.stop().await;
}

#[tokio::test]
async fn a_group_buy_survives_a_restart_and_a_deadline_passed_while_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, group_id) = server.agent_with_group("Restart", 0).await;
    card(&agent, group_id).await;
    let long = start(&agent, group_id, 2, 10, 600_000).await;
    let short = start(&agent, group_id, 2, 10, 1_500).await;
    let buyer = server.client("b1", "buyer", None).await;
    buyer.join(group_id).await.unwrap();
    for id in [long, short] {
        let a = buyer.join_group_buy(group_id, id).await.unwrap();
        assert_eq!(a.result(), CommerceResult::Joined);
    }
    drop((agent, buyer));
    server.stop().await;

    // Stopped past the short one's deadline (a wait, not a timing check).
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let server = TestServer::start(dir.path()).await;
    let buyer = server.client("b1", "buyer", None).await;
    let kept = buyer.join_group_buy(group_id, long).await.unwrap();
    assert_eq!(
        kept.result(),
        CommerceResult::AlreadyJoined,
        "the join survived"
    );
    assert_eq!(group_buy(&kept).joined, 1);
    assert_eq!(group_buy(&kept).state(), GroupBuyState::Open);
    let failed = buyer.commerce_object(group_id, short).await.unwrap();
    let g = group_buy(&failed);
    assert_eq!(
        (g.state(), g.closed, g.joined),
        (GroupBuyState::Failed, true, 1)
    );
    let late = buyer.join_group_buy(group_id, short).await.unwrap();
    assert_eq!(late.result(), CommerceResult::AlreadyJoined);
    let other = server.client("b2", "buyer", None).await;
    other.join(group_id).await.unwrap();
    let closed = other.join_group_buy(group_id, short).await.unwrap();
    assert_eq!(closed.result(), CommerceResult::Closed);
    // The failure was announced once, on the stream.
    let page = buyer.history(group_id, 0, 50).await.unwrap();
    let failures = page
        .messages
        .iter()
        .filter_map(|m| m.commerce.as_ref())
        .filter(|e| {
            e.change() == CommerceChange::State
                && matches!(&e.object, Some(commerce_event::Object::GroupBuy(g)) if g.state() == GroupBuyState::Failed)
        })
        .count();
    assert_eq!(failures, 1);
    drop((buyer, other));
    server.stop().await;
}

#[tokio::test]
async fn bad_commerce_input_gets_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, group_id) = server.agent_with_group("Bad input", 0).await;
    let buyer = server.client("b1", "buyer", None).await;
    buyer.join(group_id).await.unwrap();
    let mut p = product("sku-1");
    let post = |p: v1::Product| v1::PostCard {
        group_id,
        product_id: String::new(),
        product: Some(p),
    };
    assert_eq!(
        code(buyer.post_card(post(p.clone())).await),
        ErrorCode::ForbiddenRole
    );
    p.price_minor = -1;
    assert_eq!(
        code(agent.post_card(post(p.clone())).await),
        ErrorCode::InvalidArgument
    );
    p.price_minor = i64::MAX;
    assert_eq!(
        code(agent.post_card(post(p.clone())).await),
        ErrorCode::InvalidArgument
    );
    let past = v1::StartGroupBuy {
        group_id,
        product_id: "sku-1".into(),
        price_minor: 100,
        target: 2,
        slots: 5,
        starts_at_ms: 0,
        deadline_ms: now_ms() - 1_000,
    };
    assert_eq!(
        code(agent.start_group_buy(past).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(buyer.join_group_buy(group_id, 12_345).await),
        ErrorCode::UnknownObject
    );
    let other_shop = server.client("x", "agent", Some("shop-2")).await;
    assert_eq!(
        code(other_shop.post_card(post(product("sku-1"))).await),
        ErrorCode::WrongShop
    );
    // Nothing was posted or created by any of it.
    let page = agent.history(group_id, 0, 50).await.unwrap();
    assert!(page.messages.is_empty(), "{:?}", page.messages);
    let (status, _) = server
        .http_json(
            "GET",
            "/v1/products/sku-1",
            Some(&server.token("mei", "agent", Some(SHOP))),
            None,
        )
        .await;
    assert_eq!(status, 404, "the refused card created no product");
    // Joining a closed group-buy is a result; the connection goes on.
    card(&agent, group_id).await;
    let id = start(&agent, group_id, 2, 5, 60_000).await;
    agent.end_commerce(group_id, id).await.unwrap();
    let closed = buyer.join_group_buy(group_id, id).await.unwrap();
    assert_eq!(closed.result(), CommerceResult::Closed);
    assert!(buyer.ping().await.is_ok());
    drop((agent, buyer, other_shop));
    server.stop().await;
}

#[tokio::test]
async fn the_merchant_api_runs_a_group_buy_for_its_own_shop_only() {
    let dir = tempfile::tempdir().unwrap();
    // Four promotions in one group: above the default reach quota, which
    // gateway/tests/reach.rs covers.
    let server = TestServer::start_with(dir.path(), |c| c.reach_base_per_day = 10).await;
    let (mut agent, group_id) = server.agent_with_group("HTTP", 0).await;
    agent.join(group_id).await.unwrap();
    let owner = server.token("boss", "owner", Some(SHOP));
    let token = Some(owner.as_str());
    let http = |method: &'static str, path: String, token: Option<String>, body| {
        let server = &server;
        async move {
            server
                .http_json(method, &path, token.as_deref(), body)
                .await
        }
    };

    let (s, p) = http(
        "PUT",
        "/v1/products/sku-9".into(),
        token.map(Into::into),
        Some(json!({"title": "Trail shoe", "price_minor": 39900, "member_price_minor": 35900})),
    )
    .await;
    assert_eq!(
        (s, p["version"].as_u64(), p["currency"].as_str()),
        (200, Some(1), Some("CNY"))
    );
    let (s, c) = http(
        "POST",
        format!("/v1/groups/{group_id}/cards"),
        token.map(Into::into),
        Some(json!({"product_id": "sku-9"})),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    let (s, g) = http(
        "POST",
        format!("/v1/groups/{group_id}/group-buys"),
        token.map(Into::into),
        Some(json!({"product_id": "sku-9", "price_minor": 29900, "target": 2, "slots": 3, "duration_ms": 600000})),
    )
    .await;
    assert_eq!((s, g["state"].as_str()), (201, Some("open")), "{g}");
    let id = g["group_buy_id"].as_u64().unwrap();

    // The price changes: the card in the group updates in place.
    let (s, p) = http(
        "PUT",
        "/v1/products/sku-9".into(),
        token.map(Into::into),
        Some(json!({"title": "Trail shoe", "price_minor": 34900})),
    )
    .await;
    assert_eq!((s, p["version"].as_u64()), (200, Some(2)));
    let seen = events_until(&mut agent, |seen| {
        seen.iter()
            .any(|(c, _)| *c == CommerceChange::ProductUpdated)
    })
    .await;
    let Some((_, commerce_event::Object::Product(updated))) = seen.last() else {
        panic!("{seen:?}")
    };
    assert_eq!((updated.price_minor, updated.version), (34_900, 2));

    // Another shop's token, a buyer's, none, and a bad body: clear errors.
    let other = server.token("x", "agent", Some("shop-2"));
    let path = format!("/v1/groups/{group_id}/group-buys/{id}");
    let (s, e) = http("GET", path.clone(), Some(other.clone()), None).await;
    assert_eq!(
        (s, e["code"].as_i64(), e["name"].as_str()),
        (403, Some(21), Some("WRONG_SHOP"))
    );
    let (s, e) = http("POST", format!("{path}/cancel"), Some(other), None).await;
    assert_eq!((s, e["name"].as_str()), (403, Some("WRONG_SHOP")));
    let buyer = server.token("b1", "buyer", None);
    let (s, e) = http(
        "PUT",
        "/v1/products/sku-9".into(),
        Some(buyer),
        Some(json!({"title": "x", "price_minor": 1})),
    )
    .await;
    assert_eq!((s, e["name"].as_str()), (403, Some("FORBIDDEN_ROLE")));
    let (s, e) = http("GET", path.clone(), None, None).await;
    assert_eq!((s, e["name"].as_str()), (401, Some("NOT_AUTHENTICATED")));
    let (s, e) = http("GET", path.clone(), Some("not.a.token".into()), None).await;
    assert_eq!((s, e["name"].as_str()), (401, Some("TOKEN_INVALID")));
    let (s, e) = http(
        "POST",
        format!("/v1/groups/{group_id}/group-buys"),
        token.map(Into::into),
        Some(json!({"product_id": "sku-9", "price_minor": -1, "target": 2, "slots": 3, "duration_ms": 1000})),
    )
    .await;
    assert_eq!(
        (s, e["name"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{e}"
    );
    let (s, e) = http(
        "POST",
        format!("/v1/groups/{group_id}/polls"),
        token.map(Into::into),
        Some(json!({"question": 5})),
    )
    .await;
    assert_eq!(
        (s, e["name"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{e}"
    );
    let (s, e) = http(
        "GET",
        format!("/v1/groups/{group_id}/coupons/{id}"),
        token.map(Into::into),
        None,
    )
    .await;
    assert_eq!(
        (s, e["name"].as_str()),
        (404, Some("UNKNOWN_OBJECT")),
        "a group-buy is not a coupon"
    );
    let (s, g) = http("GET", path.clone(), token.map(Into::into), None).await;
    assert_eq!(
        (s, g["state"].as_str(), g["joined"].as_u64()),
        (200, Some("open"), Some(0)),
        "unchanged"
    );

    // Coupons and polls over the same API.
    let (s, c) = http(
        "POST",
        format!("/v1/groups/{group_id}/coupons"),
        token.map(Into::into),
        Some(json!({"title": "20 off 100", "amount_minor": 2000, "min_spend_minor": 10000, "quantity": 10, "expires_in_ms": 60000})),
    )
    .await;
    assert_eq!((s, c["per_buyer_limit"].as_u64()), (201, Some(1)), "{c}");
    let (s, poll) = http(
        "POST",
        format!("/v1/groups/{group_id}/polls"),
        token.map(Into::into),
        Some(json!({"question": "Next colour?", "options": ["red", "blue"], "duration_ms": 60000})),
    )
    .await;
    assert_eq!(s, 201, "{poll}");
    let poll_id = poll["poll_id"].as_u64().unwrap();
    let (s, closed) = http(
        "POST",
        format!("/v1/groups/{group_id}/polls/{poll_id}/close"),
        token.map(Into::into),
        None,
    )
    .await;
    assert_eq!((s, closed["closed"].as_bool()), (200, Some(true)));
    let (s, cancelled) = http(
        "POST",
        format!("{path}/cancel"),
        token.map(Into::into),
        None,
    )
    .await;
    assert_eq!((s, cancelled["state"].as_str()), (200, Some("cancelled")));

    let (s, doc) = http("GET", "/openapi.json".into(), None, None).await;
    assert_eq!((s, doc["openapi"].as_str()), (200, Some("3.0.3")));
    drop(agent);
    server.stop().await;
}

#[tokio::test]
async fn coupons_and_polls_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, group_id) = server.agent_with_group("Fans", 0).await;
    let coupon = agent
        .issue_coupon(v1::IssueCoupon {
            group_id,
            title: "10 off".into(),
            amount_minor: 1_000,
            quantity: 1,
            expires_at_ms: now_ms() + 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .seq;
    let poll = agent
        .open_poll(v1::OpenPoll {
            group_id,
            question: "Which colour?".into(),
            options: vec!["red".into(), "blue".into()],
            deadline_ms: now_ms() + 60_000,
            votes_final: true,
        })
        .await
        .unwrap()
        .seq;
    let b1 = server.client("b1", "buyer", None).await;
    let b2 = server.client("b2", "buyer", None).await;
    for b in [&b1, &b2] {
        b.join(group_id).await.unwrap();
    }
    assert_eq!(
        b1.claim_coupon(group_id, coupon).await.unwrap().result(),
        CommerceResult::Claimed
    );
    assert_eq!(
        b2.claim_coupon(group_id, coupon).await.unwrap().result(),
        CommerceResult::Exhausted
    );
    let voted = b1.vote(group_id, poll, 1).await.unwrap();
    assert_eq!(
        (voted.result(), voted.your_vote),
        (CommerceResult::Voted, 2)
    );
    assert_eq!(
        b1.vote(group_id, poll, 0).await.unwrap().result(),
        CommerceResult::VoteClosed,
        "final"
    );
    assert_eq!(
        code(b1.vote(group_id, poll, 7).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(agent.end_commerce(group_id, coupon).await),
        ErrorCode::InvalidArgument
    );
    let err = b2.vote(group_id, coupon, 0).await;
    assert!(matches!(err, Err(ClientError::Server { .. })), "{err:?}");
    assert_eq!(code(err), ErrorCode::UnknownObject);
    drop((agent, b1, b2));
    server.stop().await;
}
