//! Moderation through the real server: frames over WebSocket and the
//! merchant HTTP API.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TestServer, code, messages, next_event};
use qun_client::Event;
use qun_proto::{ErrorCode, v1};
use serde_json::json;

const SHOP: &str = "shop-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_mute_remove_and_recall_and_every_member_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Moderated", 0).await;
    let mut troll = server.client("troll", "buyer", None).await;
    let mut fan = server.client("fan", "buyer", None).await;
    troll.join(g).await.unwrap();
    fan.join(g).await.unwrap();

    let spam = troll.send(g, "cheap watches at …", None).await.unwrap().seq;
    agent.mute_member(g, "troll", 60_000).await.unwrap();
    assert_eq!(
        code(troll.send(g, "still here", None).await),
        ErrorCode::Muted
    );
    let recall = agent.recall(g, spam).await.unwrap().seq;
    let seen = messages(&mut fan, 2).await;
    assert_eq!(seen[0].seq, spam);
    assert_eq!(
        (seen[1].kind(), seen[1].recalls),
        (v1::MessageKind::Recall, spam)
    );
    assert_eq!(seen[1].seq, recall);
    let page = fan.history(g, 0, 10).await.unwrap();
    assert!(page.messages[0].recalled && page.messages[0].text.is_empty());

    // Removed with a ban: told, gone, and kept out.
    agent.remove_member(g, "troll", 3_600_000).await.unwrap();
    messages(&mut troll, 2).await; // its own message and the recall
    match next_event(&mut troll).await {
        Event::Removed { group_id } => assert_eq!(group_id, g),
        other => panic!("expected Removed, got {other:?}"),
    }
    assert_eq!(code(troll.join(g).await), ErrorCode::Banned);
    assert_eq!(code(troll.history(g, 0, 10).await), ErrorCode::NotMember);

    // Mute all: only staff post.
    agent.mute_all_buyers(g, true).await.unwrap();
    assert_eq!(code(fan.send(g, "hello?", None).await), ErrorCode::Muted);
    agent.send(g, "Flash sale at 10:00", None).await.unwrap();
    agent.mute_all_buyers(g, false).await.unwrap();
    let mine = fan.send(g, "hello!", None).await.unwrap().seq;
    // A buyer recalls their own message within two minutes.
    fan.recall(g, mine).await.unwrap();
    assert_eq!(code(fan.recall(g, 1).await), ErrorCode::ForbiddenRole);
    assert_eq!(
        code(fan.mute_member(g, "troll", 1_000).await),
        ErrorCode::ForbiddenRole
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recall_takes_the_quoted_text_out_of_the_replies_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Recalled quotes", 0).await;
    let mut fan = server.client("fan", "buyer", None).await;
    fan.join(g).await.unwrap();
    let oops = fan
        .send(g, "my address is 1 Long Road", None)
        .await
        .unwrap()
        .seq;
    let answer = agent
        .send(g, "thanks, shipping there", Some(oops))
        .await
        .unwrap()
        .seq;
    let pushed = messages(&mut fan, 2).await;
    assert_eq!(
        pushed[1].quote.as_ref().unwrap().text,
        "my address is 1 Long Road",
        "live, before the recall, the reply quotes it"
    );
    fan.recall(g, oops).await.unwrap();
    let recall = messages(&mut fan, 1).await;
    assert_eq!(recall[0].recalls, oops);
    let quoted = |page: &v1::HistoryPage| {
        let reply = page.messages.iter().find(|m| m.seq == answer).unwrap();
        assert_eq!(
            reply.text, "thanks, shipping there",
            "the reply itself stays"
        );
        reply.quote.clone().unwrap()
    };
    let q = quoted(&fan.history(g, 0, 10).await.unwrap());
    assert!(q.recalled && q.text.is_empty() && q.seq == oops, "{q:?}");
    // A reply to it now quotes it as recalled.
    let late = agent.send(g, "ok", Some(oops)).await.unwrap().seq;
    let page = fan.history(g, 0, 10).await.unwrap();
    let late = page.messages.iter().find(|m| m.seq == late).unwrap();
    assert!(late.quote.as_ref().unwrap().recalled, "{late:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_api_moderates_and_lists_reports() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("HTTP moderation", 0).await;
    let buyer = server.client("ann", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let seq = buyer.send(g, "rude words", None).await.unwrap().seq;
    let reporter = server.client("bo", "buyer", None).await;
    reporter.join(g).await.unwrap();
    reporter.report_message(g, seq, "rude").await.unwrap();
    let owner = server.token("boss", "owner", Some(SHOP));
    let call = |method: &'static str, path: String, body| {
        let server = &server;
        let owner = owner.clone();
        async move { server.http_json(method, &path, Some(&owner), body).await }
    };

    let (s, reports) = call("GET", format!("/v1/groups/{g}/reports"), None).await;
    assert_eq!(s, 200, "{reports}");
    assert_eq!(
        reports,
        json!([{"seq": seq, "reporter_id": "bo", "reason": "rude", "ts_ms": reports[0]["ts_ms"]}])
    );
    let (s, r) = call(
        "POST",
        format!("/v1/groups/{g}/messages/{seq}/recall"),
        None,
    )
    .await;
    assert_eq!((s, r["seq"].as_u64()), (200, Some(seq + 1)), "{r}");
    let (s, _) = call(
        "POST",
        format!("/v1/groups/{g}/members/ann/mute"),
        Some(json!({"duration_ms": 60000})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(code(buyer.send(g, "hi", None).await), ErrorCode::Muted);
    let (s, e) = call(
        "POST",
        format!("/v1/groups/{g}/members/ann/mute"),
        Some(json!({"duration_ms": 5})),
    )
    .await;
    assert_eq!((s, e["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let (s, _) = call(
        "POST",
        format!("/v1/groups/{g}/mute-all"),
        Some(json!({"muted": true})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(code(reporter.send(g, "hi", None).await), ErrorCode::Muted);
    let (s, _) = call(
        "POST",
        format!("/v1/groups/{g}/members/ann/remove"),
        Some(json!({"ban_ms": 60000})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(code(buyer.join(g).await), ErrorCode::Banned);
    // A buyer's token cannot use the merchant API to moderate.
    let buyer_token = server.token("bo", "buyer", None);
    let (s, e) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/mute-all"),
            Some(&buyer_token),
            Some(json!({"muted": false})),
        )
        .await;
    assert_eq!((s, e["name"].as_str()), (403, Some("FORBIDDEN_ROLE")));
    agent.ping().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_once_becomes_an_faq_entry_everyone_sees_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Sizes", 0).await;
    let asker = server.client("ann", "buyer", None).await;
    let mut later = server.client("bo", "buyer", None).await;
    asker.join(g).await.unwrap();
    later.join(g).await.unwrap();
    let q = asker
        .send(g, "Is S size EU 34 or 36?", None)
        .await
        .unwrap()
        .seq;
    let a = agent.send(g, "S is EU 34.", Some(q)).await.unwrap().seq;
    let board = agent.promote_faq(g, q, a).await.unwrap();
    let id = board.entries[0].faq_id;
    agent
        .set_pin(g, v1::pin::Target::FaqId(id), true)
        .await
        .unwrap();
    // Every member is told on the stream, and reads the same board.
    let pushed = messages(&mut later, 4).await;
    assert_eq!(
        pushed.iter().map(|m| m.kind()).collect::<Vec<_>>(),
        [
            v1::MessageKind::Text,
            v1::MessageKind::Text,
            v1::MessageKind::Board,
            v1::MessageKind::Board
        ]
    );
    let seen = later.list_faq(g).await.unwrap();
    assert_eq!(seen.entries[0].answer, "S is EU 34.");
    assert_eq!(seen.pins[0].target, Some(v1::pin::Target::FaqId(id)));
    assert_eq!(
        code(later.promote_faq(g, q, a).await),
        ErrorCode::ForbiddenRole
    );
    // The merchant API reads and edits the same board.
    let owner = server.token("boss", "owner", Some(SHOP));
    let (s, b) = server
        .http_json("GET", &format!("/v1/groups/{g}/faq"), Some(&owner), None)
        .await;
    assert_eq!(
        (s, b["entries"][0]["faq_id"].as_u64()),
        (200, Some(id)),
        "{b}"
    );
    let (s, b) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/pins"),
            Some(&owner),
            Some(json!({"message_seq": a})),
        )
        .await;
    assert_eq!(
        (s, b["pins"].as_array().map(Vec::len)),
        (200, Some(2)),
        "{b}"
    );
    let (s, e) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/pins"),
            Some(&owner),
            Some(json!({"message_seq": a, "faq_id": id})),
        )
        .await;
    assert_eq!((s, e["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let (s, b) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/faq/{id}/remove"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(
        (
            s,
            b["entries"].as_array().map(Vec::len),
            b["pins"].as_array().map(Vec::len)
        ),
        (200, Some(0), Some(1)),
        "{b}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_bot_answers_a_size_question_once_and_rules_are_managed_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let owner = server.token("boss", "owner", Some(SHOP));
    let (s, e) = server
        .http_json(
            "PUT",
            "/v1/auto-replies/size",
            Some(&owner),
            Some(json!({"pattern": "(S\\s*码", "answer": "x"})),
        )
        .await;
    assert_eq!(
        (s, e["name"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("pattern"), "{e}");
    let (s, rules) = server
        .http_json(
            "PUT",
            "/v1/auto-replies/size",
            Some(&owner),
            Some(json!({"keywords": ["欧码"], "pattern": "S\\s*码", "answer": "S 码相当于欧码 34。", "cooldown_ms": 60000})),
        )
        .await;
    assert_eq!(
        (s, rules[0]["rule_id"].as_str()),
        (200, Some("size")),
        "{rules}"
    );

    let (_agent, g) = server.agent_with_group("Bot", 0).await;
    let mut buyer = server.client("ann", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let q = buyer
        .send(g, "S码相当于欧码34还是36?", None)
        .await
        .unwrap()
        .seq;
    let pushed = messages(&mut buyer, 2).await;
    let bot = &pushed[1];
    assert_eq!(
        (bot.sender_id.as_str(), bot.reply_to, bot.text.as_str()),
        ("bot", q, "S 码相当于欧码 34。")
    );
    // A second asker within the cooldown is left for the agents.
    let other = server.client("bo", "buyer", None).await;
    other.join(g).await.unwrap();
    let second = other.send(g, "S 码是欧码多少?", None).await.unwrap().seq;
    let page = buyer.history(g, 0, 10).await.unwrap();
    assert_eq!(
        page.messages.last().unwrap().seq,
        second,
        "no second answer"
    );

    let agent = server.client("mei", "agent", Some(SHOP)).await;
    assert_eq!(agent.list_auto_replies().await.unwrap().rules.len(), 1);
    assert_eq!(
        code(buyer.list_auto_replies().await),
        ErrorCode::ForbiddenRole
    );
    let (s, left) = server
        .http_json("POST", "/v1/auto-replies/size/remove", Some(&owner), None)
        .await;
    assert_eq!((s, left.as_array().map(Vec::len)), (200, Some(0)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_group_admits_a_buyer_when_staff_approve() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("VIP lounge", 0).await;
    agent
        .set_join_policy(g, v1::JoinPolicy::Approval, "")
        .await
        .unwrap();
    let mut ann = server.client("ann", "buyer", None).await;
    assert_eq!(code(ann.join(g).await), ErrorCode::JoinPending);
    let pending = agent.list_join_requests(g).await.unwrap();
    assert_eq!(pending.requests[0].user_id, "ann");
    agent.decide_join(g, "ann", true).await.unwrap();
    match next_event(&mut ann).await {
        Event::JoinDecided { group_id, approved } => assert_eq!((group_id, approved), (g, true)),
        other => panic!("expected JoinDecided, got {other:?}"),
    }
    assert!(ann.join(g).await.unwrap().already_member);
    ann.send(g, "hello!", None).await.unwrap();

    // Over HTTP: a second buyer is rejected.
    let bo = server.client("bo", "buyer", None).await;
    assert_eq!(code(bo.join(g).await), ErrorCode::JoinPending);
    let owner = server.token("boss", "owner", Some(SHOP));
    let (s, r) = server
        .http_json(
            "GET",
            &format!("/v1/groups/{g}/join-requests"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(
        (
            s,
            r["policy"].as_str(),
            r["requests"][0]["user_id"].as_str()
        ),
        (200, Some("approval"), Some("bo")),
        "{r}"
    );
    let (s, r) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/join-requests/bo/decide"),
            Some(&owner),
            Some(json!({"approve": false})),
        )
        .await;
    assert_eq!(
        (s, r["requests"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{r}"
    );
    assert_eq!(code(bo.history(g, 0, 10).await), ErrorCode::NotMember);
    let (s, e) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/join-policy"),
            Some(&owner),
            Some(json!({"policy": "invite-only"})),
        )
        .await;
    assert_eq!((s, e["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_group_admits_buyers_the_shop_tagged_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (_agent, g) = server.agent_with_group("VIP only", 0).await;
    let owner = server.token("boss", "owner", Some(SHOP));
    let (s, r) = server
        .http_json(
            "POST",
            &format!("/v1/groups/{g}/join-policy"),
            Some(&owner),
            Some(json!({"policy": "threshold", "expression": "tier:vip"})),
        )
        .await;
    assert_eq!(
        (s, r["expression"].as_str()),
        (200, Some("tier:vip")),
        "{r}"
    );
    let ann = server.client("ann", "buyer", None).await;
    assert_eq!(code(ann.join(g).await), ErrorCode::NotEligible);
    let (s, t) = server
        .http_json(
            "PUT",
            "/v1/buyers/ann/tags",
            Some(&owner),
            Some(json!({"tags": ["orders:12", "spend:high", "last_purchase:2026-11"]})),
        )
        .await;
    assert_eq!((s, t["tier"].as_str()), (200, Some("vip")), "{t}");
    ann.join(g).await.unwrap();
    let (s, e) = server
        .http_json(
            "PUT",
            "/v1/buyers/ann/tags",
            Some(&owner),
            Some(json!({"tags": ["Not A Tag"]})),
        )
        .await;
    assert_eq!((s, e["name"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let buyer_token = server.token("bo", "buyer", None);
    let (s, _) = server
        .http_json("GET", "/v1/buyers/ann/tags", Some(&buyer_token), None)
        .await;
    assert_eq!(s, 403, "buyers do not read others' tags");
    server.stop().await;
}
