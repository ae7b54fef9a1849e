//! The reach quota and buyer feedback through the real server: frames over
//! WebSocket, the merchant HTTP API, placeholders for muted promotions.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, code, messages};
use qun_client::ClientError;
use qun_proto::{ErrorCode, v1};
use serde_json::json;

const SHOP: &str = "shop-1";
const DAY_MS: u64 = 86_400_000;

fn coupon(group_id: u64) -> v1::IssueCoupon {
    let now = common::now_secs() * 1000;
    v1::IssueCoupon {
        group_id,
        title: "10 off".into(),
        amount_minor: 1_000,
        quantity: 1_000,
        expires_at_ms: now + 3_600_000,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotions_over_the_quota_are_refused_with_the_time_to_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Quota", 0).await;
    for _ in 0..3 {
        agent.issue_coupon(coupon(g)).await.unwrap();
    }
    let refused = agent.issue_coupon(coupon(g)).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::QuotaExhausted), "{refused}");
    let ClientError::RateLimited { retry_after_ms, .. } = refused else {
        panic!("no retry time: {refused:?}");
    };
    assert!((1..=DAY_MS).contains(&retry_after_ms), "{retry_after_ms}");
    // Answers never take quota.
    agent
        .send(g, "The coupon is for orders over 100", None)
        .await
        .unwrap();

    let q = agent.reach_quota(g).await.unwrap();
    assert_eq!((q.used, q.limit, q.base), (3, 3, 3));
    let owner = server.token("boss", "owner", Some(SHOP));
    let (status, head, body) = server
        .http_full(
            "POST",
            &format!("/v1/groups/{g}/coupons"),
            Some(&owner),
            Some(json!({"title": "5 off", "amount_minor": 500, "quantity": 10, "expires_in_ms": 60000})),
        )
        .await;
    assert_eq!(
        (status, body["name"].as_str()),
        (429, Some("QUOTA_EXHAUSTED")),
        "{body}"
    );
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let (status, reach) = server
        .http_json("GET", &format!("/v1/groups/{g}/reach"), Some(&owner), None)
        .await;
    assert_eq!(status, 200, "{reach}");
    assert_eq!(
        (
            reach["used"].as_u64(),
            reach["limit"].as_u64(),
            reach["score"].as_f64()
        ),
        (Some(3), Some(3), Some(0.0))
    );
    let buyer = server.token("ann", "buyer", None);
    let (status, _) = server
        .http_json("GET", &format!("/v1/groups/{g}/reach"), Some(&buyer), None)
        .await;
    assert_eq!(status, 403);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_widens_after_buyers_respond_and_narrows_after_mutes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Good shop", 0).await;
    let c = agent.issue_coupon(coupon(g)).await.unwrap().seq;
    for i in 0..60 {
        let b = server.client(&format!("fan{i}"), "buyer", None).await;
        b.join(g).await.unwrap();
        b.claim_coupon(g, c).await.unwrap();
    }
    let q = agent.reach_quota(g).await.unwrap();
    assert_eq!((q.positive, q.limit), (60, 8), "{q:?}");
    for _ in 0..7 {
        agent.issue_coupon(coupon(g)).await.unwrap();
    }
    assert_eq!(
        code(agent.issue_coupon(coupon(g)).await),
        ErrorCode::QuotaExhausted,
        "8 a day now, not 3"
    );

    // Another shop whose buyers mute and report.
    let other = server.client("li", "agent", Some("shop-2")).await;
    let g2 = other.create_group("Spammy", 0).await.unwrap().group_id;
    let seq = other.send(g2, "BUY NOW", None).await.unwrap().seq;
    for i in 0..5 {
        let b = server.client(&format!("hater{i}"), "buyer", None).await;
        b.join(g2).await.unwrap();
        b.mute_promotions(g2, true).await.unwrap();
        b.report_message(g2, seq, "spam").await.unwrap();
    }
    let q = other.reach_quota(g2).await.unwrap();
    assert_eq!((q.negative, q.limit), (10, 1), "{q:?}");
    assert!(q.score_milli < 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muted_buyer_gets_placeholders_for_promotions_and_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Launch", 0).await;
    let mut quiet = server.client("quiet", "buyer", None).await;
    let mut keen = server.client("keen", "buyer", None).await;
    quiet.join(g).await.unwrap();
    keen.join(g).await.unwrap();
    quiet.mute_promotions(g, true).await.unwrap();

    agent.send(g, "Launch at 10:00", None).await.unwrap();
    let promo = agent.issue_coupon(coupon(g)).await.unwrap().seq;
    agent.send(g, "S is EU 34", None).await.unwrap();

    let kinds = |m: &[v1::ChatMessage]| m.iter().map(|m| (m.seq, m.kind())).collect::<Vec<_>>();
    let hidden = vec![
        (1, v1::MessageKind::Text),
        (promo, v1::MessageKind::Hidden),
        (3, v1::MessageKind::Text),
    ];
    assert_eq!(kinds(&messages(&mut quiet, 3).await), hidden);
    let seen = messages(&mut keen, 3).await;
    assert_eq!(seen[1].kind(), v1::MessageKind::Commerce);
    assert!(seen[1].commerce.is_some());
    assert_eq!(
        kinds(&quiet.history(g, 0, 10).await.unwrap().messages),
        hidden
    );

    // Also after a restart, from the store.
    drop((quiet, keen, agent));
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let quiet = server.client("quiet", "buyer", None).await;
    assert_eq!(
        kinds(&quiet.history(g, 0, 10).await.unwrap().messages),
        hidden
    );
    quiet.mute_promotions(g, false).await.unwrap();
    let page = quiet.history(g, 0, 10).await.unwrap();
    assert_eq!(page.messages[1].kind(), v1::MessageKind::Commerce);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_feedback_requests_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Errors", 0).await;
    let seq = agent.send(g, "hello", None).await.unwrap().seq;
    let b = server.client("ann", "buyer", None).await;
    assert_eq!(code(b.mute_promotions(g, true).await), ErrorCode::NotMember);
    b.join(g).await.unwrap();
    assert_eq!(
        code(b.report_message(g, seq, "").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(b.report_message(g, 99, "spam").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(b.open_card(g, 99).await), ErrorCode::InvalidArgument);
    assert_eq!(code(b.reach_quota(g).await), ErrorCode::ForbiddenRole);
    assert_eq!(code(b.open_card(999, 1).await), ErrorCode::UnknownGroup);
    let stranger = server.client("li", "agent", Some("shop-2")).await;
    assert_eq!(code(stranger.reach_quota(g).await), ErrorCode::WrongShop);
    let q = agent.reach_quota(g).await.unwrap();
    assert_eq!((q.positive, q.negative), (0, 0), "nothing was counted");
    b.ping().await.unwrap();
    server.stop().await;
}
