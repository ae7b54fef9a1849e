//! Pushes against the real server: a targeted push never reaches a buyer
//! outside its audience (live, on resume, in history, after a restart);
//! scheduled pushes fire once per occurrence, also across a restart; the
//! HTTP API and its errors.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, code, messages};
use qun_client::{Push, proto as v1};
use qun_proto::ErrorCode;
use serde_json::json;

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn kinds(m: &[v1::ChatMessage]) -> Vec<(u64, v1::MessageKind)> {
    m.iter().map(|m| (m.seq, m.kind())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_outside_the_expression_never_receives_the_targeted_card() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Runners", 0).await;
    agent
        .tag_buyer("vip", &["vip", "size:s"], &[])
        .await
        .unwrap();
    agent
        .tag_buyer("other", &["vip", "size:m"], &[])
        .await
        .unwrap();
    let mut vip = server.client("vip", "buyer", None).await;
    let mut other = server.client("other", "buyer", None).await;
    vip.join(g).await.unwrap();
    other.join(g).await.unwrap();
    let token = server.token("mei", "agent", Some("shop-1"));
    let (s, body) = server
        .http_json(
            "PUT",
            "/v1/products/sku-s",
            Some(&token),
            Some(json!({"title": "Runner, S only", "price_minor": 39_900})),
        )
        .await;
    assert_eq!(s, 200, "{body}");

    agent.send(g, "Hello runners", None).await.unwrap();
    let card = Push::Card("sku-s".into());
    let pushed = agent
        .push_promotion(g, &card, "vip AND size:s")
        .await
        .unwrap();
    assert_eq!(pushed.audience_size, 1);
    agent.send(g, "Questions welcome", None).await.unwrap();

    let seen = messages(&mut vip, 3).await;
    assert_eq!(seen[1].kind(), v1::MessageKind::Commerce);
    assert_eq!(seen[1].audience, "vip AND size:s");
    let hidden = vec![
        (1, v1::MessageKind::Text),
        (pushed.seq, v1::MessageKind::Hidden),
        (3, v1::MessageKind::Text),
    ];
    let live = messages(&mut other, 3).await;
    assert_eq!(kinds(&live), hidden, "live");
    assert!(live[1].commerce.is_none() && live[1].text.is_empty());

    // Resume from before the push on a new connection.
    drop(other);
    let mut other = server.client("other", "buyer", None).await;
    other.resume(&[(g, 0)]).await.unwrap();
    assert_eq!(kinds(&messages(&mut other, 3).await), hidden, "resume");
    assert_eq!(
        kinds(&other.history(g, 0, 10).await.unwrap().messages),
        hidden,
        "history"
    );
    // Quoting it is refused: the quote would show it.
    assert_eq!(
        code(other.send(g, "what card?", Some(pushed.seq)).await),
        ErrorCode::ReplyToUnknown
    );

    // After a restart, from the store.
    drop((vip, other, agent));
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let other = server.client("other", "buyer", None).await;
    assert_eq!(
        kinds(&other.history(g, 0, 10).await.unwrap().messages),
        hidden
    );
    let agent = server.client("mei", "agent", Some("shop-1")).await;
    let staff_view = agent.history(g, 0, 10).await.unwrap().messages;
    assert_eq!(
        staff_view[1].kind(),
        v1::MessageKind::Commerce,
        "staff see it"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_get_typed_errors_and_quota_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Errors", 0).await;
    let buyer = server.client("b1", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let news = Push::Announcement("New arrivals on Monday".into());
    for (push, audience, want) in [
        (&news, "nobody_has_this", ErrorCode::NotEligible),
        (&news, "vip AND (", ErrorCode::InvalidArgument),
        (&news, "shoe:99", ErrorCode::InvalidArgument),
        (
            &Push::Announcement(String::new()),
            "",
            ErrorCode::InvalidArgument,
        ),
        (&Push::Card("missing".into()), "", ErrorCode::UnknownProduct),
    ] {
        assert_eq!(
            code(agent.push_promotion(g, push, audience).await),
            want,
            "{push:?} to {audience:?}"
        );
    }
    assert_eq!(
        code(buyer.push_promotion(g, &news, "").await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(agent.push_promotion(999, &news, "").await),
        ErrorCode::UnknownGroup
    );
    for _ in 0..3 {
        agent.push_promotion(g, &news, "").await.unwrap();
    }
    assert_eq!(
        code(agent.push_promotion(g, &news, "").await),
        ErrorCode::QuotaExhausted
    );
    // The connection goes on after every refusal.
    assert_eq!(agent.tag_pool().await.unwrap().groups[0].name, "size");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_push_fires_once_and_not_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Weekly", 0).await;
    let mut buyer = server.client("b1", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let weekly = 7 * 24 * 3_600_000;
    let first = now_ms() + 300;
    let news = Push::Announcement("This week's new arrivals".into());
    let created = agent
        .schedule_push(g, &news, "", first, weekly)
        .await
        .unwrap();
    let id = created.created;
    // The server's tick fires it; the buyer gets it like any push.
    let got = messages(&mut buyer, 1).await;
    assert!(got[0].text.contains("new arrivals"), "{:?}", got[0].text);
    let listed = agent.list_schedules(g).await.unwrap().schedules;
    assert_eq!((listed[0].fired, listed[0].next_at_ms), (1, first + weekly));
    assert_eq!(listed[0].last_seq, got[0].seq);

    drop((agent, buyer));
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let agent = server.client("mei", "agent", Some("shop-1")).await;
    // The server ticks once before it serves: an occurrence that had not
    // been recorded as fired would have fired again by now.
    let page = agent.history(g, 0, 10).await.unwrap().messages;
    let fired = page
        .iter()
        .filter(|m| m.text.contains("new arrivals"))
        .count();
    assert_eq!(fired, 1, "one message for one occurrence");
    let s = agent.cancel_schedule(g, id).await.unwrap();
    assert!(s.schedules.is_empty());
    assert_eq!(
        code(agent.cancel_schedule(g, id).await),
        ErrorCode::UnknownObject
    );
    assert_eq!(
        code(agent.schedule_push(g, &news, "", now_ms() - 1, 0).await),
        ErrorCode::InvalidArgument
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_schedules_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Http", 0).await;
    agent.tag_buyer("b1", &["returning"], &[]).await.unwrap();
    let buyer = server.client("b1", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let token = server.token("mei", "agent", Some("shop-1"));
    let t = Some(token.as_str());

    let (s, body) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/pushes"),
            t,
            Some(json!({"announcement": "Returning buyers: 10% off", "audience": "tier:regular"})),
        )
        .await;
    assert_eq!(
        (s, body["audience_size"].as_u64()),
        (201, Some(1)),
        "{body}"
    );
    let (s, body) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/pushes"),
            t,
            Some(json!({"announcement": "x", "product_id": "y"})),
        )
        .await;
    assert_eq!((s, body["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let (s, body) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/pushes"),
            t,
            Some(json!({"announcement": "x", "audience": "tier:vip"})),
        )
        .await;
    assert_eq!((s, body["name"].as_str()), (403, Some("NOT_ELIGIBLE")));

    let first = now_ms() + 3_600_000;
    let (s, body) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/schedules"),
            t,
            Some(json!({"announcement": "Monday drop", "first_at_ms": first, "every_ms": 604_800_000u64})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let id = body["created"].as_u64().unwrap();
    assert_eq!(body["schedules"][0]["next_at_ms"].as_u64(), Some(first));
    assert_eq!(
        body["schedules"][0]["announcement"].as_str(),
        Some("Monday drop")
    );
    let (s, body) = server
        .http_json("GET", &format!("/v1/groups/{g}/schedules"), t, None)
        .await;
    assert_eq!((s, body["schedules"].as_array().unwrap().len()), (200, 1));
    let (s, body) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/schedules"),
            t,
            Some(json!({"announcement": "x", "first_at_ms": first, "every_ms": 1000})),
        )
        .await;
    assert_eq!((s, body["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    for bad in [
        json!({"first_at_ms": first}),
        json!({"announcement": "x", "first_at_ms": first, "colour": "red"}),
        json!({"announcement": "x"}),
    ] {
        let (s, _) = server
            .http_json(
                "POST",
                &format!("/v1/groups/{g}/schedules"),
                t,
                Some(bad.clone()),
            )
            .await;
        assert_eq!(s, 400, "{bad}");
    }
    let (s, body) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/schedules/{id}/cancel"),
            t,
            None,
        )
        .await;
    assert_eq!((s, body["schedules"].as_array().unwrap().len()), (200, 0));
    let (s, body) = server.http_json("GET", "/v1/tag-pool", t, None).await;
    assert_eq!(s, 200);
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .any(|g| g["tags"].as_array().unwrap().contains(&json!("size:s")))
    );
    let buyer_token = server.token("b1", "buyer", None);
    let (s, _) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/pushes"),
            Some(&buyer_token),
            Some(json!({"announcement": "x"})),
        )
        .await;
    assert_eq!(s, 403);
    server.stop().await;
}
