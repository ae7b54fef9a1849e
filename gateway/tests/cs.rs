//! Exclusive customer service against the real server: routing to the
//! assigned agent, fallback to the pool, the queue, transfer, proactive
//! contact and its quota, blocks, privacy, and resume with no gap.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, code, messages, next_event};
use qun_client::{Client, Event, proto as v1};
use qun_proto::ErrorCode;
use serde_json::json;

const SHOP: &str = "shop-1";

/// Agent mei's HTTP token, and the shop set up: every tier served, `cap`
/// sessions per agent, proactive base 1, buyers b1…b4 tagged vip, b1's
/// exclusive agent mei.
async fn setup(server: &TestServer, cap: u32) -> String {
    let token = server.token("mei", "agent", Some(SHOP));
    let (s, body) = server
        .http_json(
            "PUT",
            "/v1/cs/config",
            Some(&token),
            Some(json!({"required_tier": "regular", "agent_cap": cap, "idle_close_ms": 1_800_000, "proactive_base": 1})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for b in ["b1", "b2", "b3", "b4"] {
        let (s, _) = server
            .http_json(
                "PUT",
                &format!("/v1/buyers/{b}/tags"),
                Some(&token),
                Some(json!({"tags": ["vip"]})),
            )
            .await;
        assert_eq!(s, 200);
    }
    let (s, body) = server
        .http_json(
            "PUT",
            "/v1/cs/buyers/b1",
            Some(&token),
            Some(json!({"assigned_agent": "mei"})),
        )
        .await;
    assert_eq!((s, body["assigned_agent"].as_str()), (200, Some("mei")));
    token
}

async fn agent(server: &TestServer, id: &str, presence: v1::Presence) -> Client {
    let c = server.client(id, "agent", Some(SHOP)).await;
    c.set_presence(presence).await.unwrap();
    c
}

/// The next CsSession push.
async fn session_push(c: &mut Client) -> v1::CsSession {
    loop {
        if let Event::CsSession(s) = next_event(c).await {
            return s;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_to_the_assigned_agent_fallback_to_the_pool_and_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    setup(&server, 1).await;
    let mut mei = agent(&server, "mei", v1::Presence::Online).await;
    let mut lin = agent(&server, "lin", v1::Presence::Online).await;
    let b1 = server.client("b1", "buyer", None).await;
    let s1 = b1.cs_open(SHOP).await.unwrap();
    assert_eq!(
        (s1.state(), s1.agent_id.as_str()),
        (v1::CsState::Open, "mei")
    );
    let got = session_push(&mut mei).await;
    assert_eq!(got.session_id, s1.session_id);
    assert_eq!(got.context.unwrap().tier, "vip");

    // b2 has no agent of their own: lin, the one with room.
    let b2 = server.client("b2", "buyer", None).await;
    assert_eq!(b2.cs_open(SHOP).await.unwrap().agent_id, "lin");
    session_push(&mut lin).await;
    // Everyone at the cap: b3 and b4 wait, in order.
    let mut b3 = server.client("b3", "buyer", None).await;
    let b4 = server.client("b4", "buyer", None).await;
    let q3 = b3.cs_open(SHOP).await.unwrap();
    let q4 = b4.cs_open(SHOP).await.unwrap();
    assert_eq!(
        (q3.state(), q3.queue_position, q4.queue_position),
        (v1::CsState::Queued, 1, 2)
    );
    let staff_view = lin.cs_queue("").await.unwrap();
    assert_eq!(staff_view.waiting.len(), 2);
    assert_eq!(staff_view.agents.len(), 2);
    // Mei closes b1's session: b3 is served, b4 moves up.
    mei.cs_close(s1.session_id).await.unwrap();
    let served = session_push(&mut b3).await;
    assert_eq!(
        (served.state(), served.agent_id.as_str()),
        (v1::CsState::Open, "mei")
    );
    assert_eq!(
        b4.cs_queue(SHOP).await.unwrap().waiting[0].queue_position,
        1
    );

    // Mei away: b1 opens again and goes to the pool... which is full, so
    // b1 queues; mei, the assigned agent, is told nothing yet.
    mei.set_presence(v1::Presence::Away).await.unwrap();
    let again = b1.cs_open(SHOP).await.unwrap();
    assert_eq!(again.session_id, s1.session_id, "one conversation");
    assert_eq!(again.state(), v1::CsState::Queued);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assigned_agent_is_told_when_the_pool_takes_their_buyer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    setup(&server, 5).await;
    let mut mei = agent(&server, "mei", v1::Presence::Busy).await;
    let mut lin = agent(&server, "lin", v1::Presence::Online).await;
    let b1 = server.client("b1", "buyer", None).await;
    let s = b1.cs_open(SHOP).await.unwrap();
    assert_eq!(s.agent_id, "lin");
    assert_eq!(session_push(&mut lin).await.buyer_id, "b1");
    let told = session_push(&mut mei).await;
    assert_eq!(
        (told.buyer_id.as_str(), told.agent_id.as_str()),
        ("b1", "lin")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_keeps_one_sequence_and_resume_after_reconnect_has_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    setup(&server, 5).await;
    let mei = agent(&server, "mei", v1::Presence::Online).await;
    let mut lin = agent(&server, "lin", v1::Presence::Online).await;
    let mut b1 = server.client("b1", "buyer", None).await;
    let s = b1.cs_open(SHOP).await.unwrap();
    let g = s.session_id;
    b1.join(g).await.unwrap();
    b1.send(g, "Is the S back?", None).await.unwrap();
    mei.send(g, "Checking with the warehouse.", None)
        .await
        .unwrap();
    assert_eq!(messages(&mut b1, 2).await.len(), 2);
    let moved = mei
        .cs_transfer(g, "lin", "warehouse says Friday")
        .await
        .unwrap();
    assert_eq!(moved.agent_id, "lin");
    let handed = session_push(&mut lin).await;
    assert_eq!(handed.context.unwrap().note, "warehouse says Friday");
    lin.send(g, "It is back on Friday.", None).await.unwrap();

    // The buyer's phone drops; two more answers; it resumes from its cursor.
    let cursors = b1.cursors();
    drop(b1);
    lin.send(g, "Shall I hold one?", None).await.unwrap();
    lin.send(g, "Size S, black.", None).await.unwrap();
    let mut b1 = server.client("b1", "buyer", None).await;
    b1.resume(&cursors).await.unwrap();
    let caught_up = messages(&mut b1, 4).await;
    let seqs: Vec<u64> = caught_up.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        [3, 4, 5, 6],
        "the transfer line and three answers, no gap"
    );
    assert!(caught_up[0].text.contains("is here to help you now"));
    let all = b1.history(g, 0, 20).await.unwrap().messages;
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_cannot_read_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    setup(&server, 5).await;
    let _mei = agent(&server, "mei", v1::Presence::Online).await;
    let b1 = server.client("b1", "buyer", None).await;
    let g = b1.cs_open(SHOP).await.unwrap().session_id;
    b1.send(g, "my address is …", None).await.unwrap();
    let b2 = server.client("b2", "buyer", None).await;
    assert_eq!(code(b2.join(g).await), ErrorCode::NotMember);
    assert_eq!(code(b2.history(g, 0, 10).await), ErrorCode::NotMember);
    assert_eq!(code(b2.cs_close(g).await), ErrorCode::NotMember);
    let other_shop = server.client("zed", "agent", Some("shop-2")).await;
    assert_eq!(code(other_shop.join(g).await), ErrorCode::WrongShop);
    // Another agent and the owner of the shop can.
    let owner = server.client("boss", "owner", Some(SHOP)).await;
    owner.join(g).await.unwrap();
    assert_eq!(owner.history(g, 0, 10).await.unwrap().messages.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_quota_runs_out_and_comes_back_and_a_block_stops_contact() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = setup(&server, 5).await;
    for b in ["b2", "b3"] {
        let (s, _) = server
            .http_json(
                "PUT",
                &format!("/v1/cs/buyers/{b}"),
                Some(&token),
                Some(json!({"assigned_agent": "mei"})),
            )
            .await;
        assert_eq!(s, 200);
    }
    let mei = agent(&server, "mei", v1::Presence::Online).await;
    let mut b1 = server.client("b1", "buyer", None).await;
    let s = mei.cs_contact("b1").await.unwrap();
    assert!(s.proactive);
    assert_eq!(session_push(&mut b1).await.session_id, s.session_id);
    // Base 1 a day: the second is over the quota.
    assert_eq!(code(mei.cs_contact("b2").await), ErrorCode::QuotaExhausted);
    // Purchases widen it.
    for _ in 0..60 {
        let (s, _) = server
            .http_json("POST", "/v1/cs/buyers/b1/purchases", Some(&token), None)
            .await;
        assert_eq!(s, 201);
    }
    mei.cs_contact("b2").await.unwrap();

    // b3 blocks the shop: no proactive contact until they unblock.
    let b3 = server.client("b3", "buyer", None).await;
    b3.cs_block(SHOP, true).await.unwrap();
    assert_eq!(code(mei.cs_contact("b3").await), ErrorCode::ContactBlocked);
    let (s, body) = server
        .http_json("GET", "/v1/cs/buyers/b3", Some(&token), None)
        .await;
    assert_eq!((s, body["blocked"].as_bool()), (200, Some(true)));
    b3.cs_block(SHOP, false).await.unwrap();
    mei.cs_contact("b3").await.unwrap();
    // Not mei's buyer: refused.
    assert_eq!(code(mei.cs_contact("b4").await), ErrorCode::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_customer_service_requests_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = setup(&server, 5).await;
    let (s, body) = server
        .http_json(
            "PUT",
            "/v1/cs/config",
            Some(&token),
            Some(json!({"required_tier": "gold", "agent_cap": 5, "idle_close_ms": 60_000, "proactive_base": 1})),
        )
        .await;
    assert_eq!((s, body["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let buyer_token = server.token("b1", "buyer", None);
    let (s, _) = server
        .http_json("GET", "/v1/cs/config", Some(&buyer_token), None)
        .await;
    assert_eq!(s, 403);
    // A buyer below the shop's tier, a buyer setting presence, an agent
    // blocking, a session id that is a shop group.
    let newbie = server.client("newbie", "buyer", None).await;
    assert_eq!(code(newbie.cs_open(SHOP).await), ErrorCode::NotEligible);
    assert_eq!(
        code(newbie.set_presence(v1::Presence::Online).await),
        ErrorCode::ForbiddenRole
    );
    let mei = agent(&server, "mei", v1::Presence::Online).await;
    assert_eq!(
        code(mei.cs_block(SHOP, true).await),
        ErrorCode::ForbiddenRole
    );
    let group = mei.create_group("Fans", 0).await.unwrap().group_id;
    assert_eq!(code(mei.cs_close(group).await), ErrorCode::InvalidArgument);
    assert_eq!(code(mei.cs_close(9_999).await), ErrorCode::UnknownGroup);
    // No shop, another shop's queue, a note too long, a malformed buyer id.
    let b1 = server.client("b1", "buyer", None).await;
    assert_eq!(code(b1.cs_open("").await), ErrorCode::InvalidArgument);
    assert_eq!(code(mei.cs_queue("shop-2").await), ErrorCode::WrongShop);
    let session = b1.cs_open(SHOP).await.unwrap().session_id;
    let _lin = agent(&server, "lin", v1::Presence::Online).await;
    assert_eq!(
        code(mei.cs_transfer(session, "lin", &"x".repeat(501)).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(mei.cs_contact("").await), ErrorCode::InvalidArgument);
    // After every refusal the connections go on.
    assert_eq!(
        mei.cs_transfer(session, "lin", "ok")
            .await
            .unwrap()
            .agent_id,
        "lin"
    );
    server.stop().await;
}
