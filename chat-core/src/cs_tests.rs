//! Exclusive customer service against the real embedded store, with time
//! passed in: routing, the queue, transfer, proactive contact and its
//! quota, privacy, idle close and reopening.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1::{self, CsState, Presence, server_frame::Body};

use crate::reach::DAY_MS;
use crate::tests::{Fixture, NOW, agent, buyer, code, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-cs";

/// A connected agent (or buyer): its pushes arrive in `outbox`.
struct Conn {
    who: Identity,
    outbox: Outbox,
}

fn connect(f: &Fixture, who: Identity, conn: u64) -> Conn {
    let (_, outbox) = sub(conn, &who, OutboxLimits::default());
    f.groups.attach_device(&who, ConnId(conn), outbox.clone());
    Conn { who, outbox }
}

/// CsSession pushes queued for a connection now.
fn sessions(c: &Conn) -> Vec<v1::CsSession> {
    let mut out = Vec::new();
    while let Ok(item) = c.outbox.try_recv() {
        if let Outgoing::Frame(b) = item
            && let Some(Body::CsSession(s)) = qun_proto::decode_server_frame(&b).unwrap().body
        {
            out.push(s);
        }
    }
    out
}

async fn online(f: &Fixture, c: &Conn, p: Presence) {
    f.groups.set_presence(&c.who, p, NOW).await.unwrap();
}

async fn open(f: &Fixture, b: &str, now: u64) -> Result<v1::CsSession, ChatError> {
    f.groups
        .cs_open(
            &buyer(b),
            v1::CsOpen {
                shop_id: SHOP.into(),
                ..Default::default()
            },
            now,
        )
        .await
}

/// A shop serving every tier with `cap` sessions per agent, its buyers
/// b1…b4 tagged vip, b1's assigned agent `mei`.
async fn shop(f: &Fixture, cap: u32) {
    let owner = agent("mei", SHOP);
    f.groups
        .set_cs_config(&owner, "regular", cap, 30 * 60_000, 2, NOW)
        .await
        .unwrap();
    for b in ["b1", "b2", "b3", "b4"] {
        f.groups
            .tag_buyer(&owner, b, vec!["vip".into()], vec![], false)
            .await
            .unwrap();
    }
    f.groups.assign_cs_agent(&owner, "b1", "mei").await.unwrap();
}

#[tokio::test]
async fn a_buyer_reaches_their_assigned_agent_else_the_least_loaded_and_the_assigned_is_told() {
    let f = fixture().await;
    shop(&f, 5).await;
    let mei = connect(&f, agent("mei", SHOP), 1);
    let lin = connect(&f, agent("lin", SHOP), 2);
    online(&f, &mei, Presence::Online).await;
    online(&f, &lin, Presence::Online).await;
    // b1 is in one of the shop's groups and one of another shop's.
    let ours = crate::tests::create(&f.groups, &agent("mei", SHOP), 0).await;
    let theirs = crate::tests::create(&f.groups, &agent("zed", "shop-other"), 0).await;
    for (n, g) in [ours, theirs].into_iter().enumerate() {
        let (s, _) = sub(70 + n as u64, &buyer("b1"), OutboxLimits::default());
        f.groups.join(&buyer("b1"), g, s, NOW).await.unwrap();
    }
    let s = open(&f, "b1", NOW).await.unwrap();
    assert_eq!((s.state(), s.agent_id.as_str()), (CsState::Open, "mei"));
    let pushed = sessions(&mei);
    assert_eq!(pushed.len(), 1);
    let context = pushed[0].context.as_ref().unwrap();
    let groups: Vec<u64> = context.groups.iter().map(|g| g.group_id).collect();
    assert_eq!(
        groups,
        [ours],
        "the shop's groups only, not the session itself"
    );
    assert_eq!(
        (context.tier.as_str(), context.tags.clone()),
        ("vip", vec!["vip".to_string()])
    );

    // b2 has no agent of their own: the least loaded takes it.
    assert_eq!(open(&f, "b2", NOW).await.unwrap().agent_id, "lin");
    f.groups
        .cs_close(&buyer("b1"), s.session_id, NOW)
        .await
        .unwrap();
    sessions(&mei);
    // Mei is busy: b1 goes to lin, and mei is told.
    online(&f, &mei, Presence::Busy).await;
    let again = open(&f, "b1", NOW).await.unwrap();
    assert_eq!(again.agent_id, "lin");
    assert_eq!(
        again.session_id, s.session_id,
        "one conversation per buyer and shop"
    );
    let told = sessions(&mei);
    assert_eq!(told.len(), 1);
    assert_eq!(
        (told[0].buyer_id.as_str(), told[0].agent_id.as_str()),
        ("b1", "lin")
    );
    // Tier below the shop's: refused.
    f.groups
        .tag_buyer(&agent("mei", SHOP), "b3", vec![], vec!["vip".into()], false)
        .await
        .unwrap();
    assert_eq!(code(open(&f, "b3", NOW).await), ErrorCode::NotEligible);
}

#[tokio::test]
async fn when_every_agent_is_at_the_cap_buyers_queue_and_are_served_in_order() {
    let f = fixture().await;
    shop(&f, 1).await;
    let lin = connect(&f, agent("lin", SHOP), 2);
    let b3 = connect(&f, buyer("b3"), 13);
    online(&f, &lin, Presence::Online).await;
    let first = open(&f, "b2", NOW).await.unwrap();
    assert_eq!(first.agent_id, "lin");
    let second = open(&f, "b3", NOW).await.unwrap();
    assert_eq!(
        (second.state(), second.queue_position),
        (CsState::Queued, 1)
    );
    let third = open(&f, "b4", NOW).await.unwrap();
    assert_eq!(third.queue_position, 2);
    assert_eq!(
        open(&f, "b4", NOW).await.unwrap().queue_position,
        2,
        "asking again keeps the place"
    );
    let q = f.groups.cs_queue(&lin.who, SHOP, NOW).await.unwrap();
    let waiting: Vec<_> = q.waiting.iter().map(|s| s.buyer_id.as_str()).collect();
    assert_eq!(waiting, ["b3", "b4"]);
    assert_eq!((q.agents[0].sessions, q.agents[0].cap), (1, 1));
    assert_eq!(
        f.groups
            .cs_queue(&buyer("b4"), SHOP, NOW)
            .await
            .unwrap()
            .waiting[0]
            .queue_position,
        2
    );

    // Lin closes the first: b3 is served, b4 moves up.
    f.groups
        .cs_close(&lin.who, first.session_id, NOW)
        .await
        .unwrap();
    let b3_now = sessions(&b3);
    assert_eq!(b3_now.last().unwrap().agent_id, "lin");
    let q = f.groups.cs_queue(&buyer("b4"), SHOP, NOW).await.unwrap();
    assert_eq!(q.waiting[0].queue_position, 1);
}

#[tokio::test]
async fn a_transfer_keeps_one_conversation_and_hands_over_the_note() {
    let f = fixture().await;
    shop(&f, 5).await;
    let mei = connect(&f, agent("mei", SHOP), 1);
    let lin = connect(&f, agent("lin", SHOP), 2);
    online(&f, &mei, Presence::Online).await;
    let s = open(&f, "b1", NOW).await.unwrap();
    let g = s.session_id;
    f.groups
        .post(&buyer("b1"), text(g, "Is the S sold out?"), NOW)
        .await
        .unwrap();
    f.groups
        .post(&mei.who, text(g, "Let me check."), NOW)
        .await
        .unwrap();
    online(&f, &lin, Presence::Online).await;
    sessions(&lin);
    let moved = f
        .groups
        .cs_transfer(
            &mei.who,
            v1::CsTransfer {
                session_id: g,
                to_agent: "lin".into(),
                note: "wants S, check the warehouse".into(),
            },
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(moved.agent_id, "lin");
    let handed = sessions(&lin);
    assert_eq!(
        handed[0].context.as_ref().unwrap().note,
        "wants S, check the warehouse"
    );
    f.groups
        .post(&lin.who, text(g, "S is back on Friday."), NOW)
        .await
        .unwrap();
    let page = f.groups.history(&buyer("b1"), g, 0, 10).await.unwrap();
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "one sequence across the transfer");
    assert!(page.messages[2].text.contains("is here to help you now"));
    // Transferring to nobody available is refused.
    assert_eq!(
        code(
            f.groups
                .cs_transfer(
                    &lin.who,
                    v1::CsTransfer {
                        session_id: g,
                        to_agent: "ghost".into(),
                        note: String::new(),
                    },
                    NOW,
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn only_the_buyer_and_the_shops_staff_can_read_a_session() {
    let f = fixture().await;
    shop(&f, 5).await;
    let mei = connect(&f, agent("mei", SHOP), 1);
    online(&f, &mei, Presence::Online).await;
    let s = open(&f, "b1", NOW).await.unwrap();
    f.groups
        .post(&buyer("b1"), text(s.session_id, "private"), NOW)
        .await
        .unwrap();
    let other = buyer("b2");
    let (sub2, _) = sub(50, &other, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&other, s.session_id, sub2, NOW).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.history(&other, s.session_id, 0, 10).await),
        ErrorCode::NotMember
    );
    let stranger = agent("x", "another-shop");
    let (sub3, _) = sub(51, &stranger, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&stranger, s.session_id, sub3, NOW).await),
        ErrorCode::WrongShop
    );
    // Another agent of the shop may read it.
    let (sub4, _) = sub(52, &agent("lin", SHOP), OutboxLimits::default());
    f.groups
        .join(&agent("lin", SHOP), s.session_id, sub4, NOW)
        .await
        .unwrap();
}

#[tokio::test]
async fn proactive_contact_takes_quota_respects_blocks_and_follows_feedback() {
    let f = fixture().await;
    shop(&f, 5).await;
    let mei = connect(&f, agent("mei", SHOP), 1);
    let b1 = connect(&f, buyer("b1"), 11);
    online(&f, &mei, Presence::Online).await;
    for b in ["b2", "b3"] {
        f.groups.assign_cs_agent(&mei.who, b, "mei").await.unwrap();
    }
    let proactive = |b: &str, now: u64| {
        f.groups.cs_open(
            &mei.who,
            v1::CsOpen {
                buyer_id: b.into(),
                ..Default::default()
            },
            now,
        )
    };
    let s = proactive("b1", NOW).await.unwrap();
    assert!(s.proactive && s.context.is_some());
    assert_eq!(
        sessions(&b1)[0].session_id,
        s.session_id,
        "the buyer is told"
    );
    proactive("b2", NOW).await.unwrap();
    // Base 2 a day at a neutral score: the third is over.
    let e = proactive("b3", NOW).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::QuotaExhausted);
    // Restored the next day.
    proactive("b3", NOW + DAY_MS).await.unwrap();
    assert_eq!(
        code(proactive("b4", NOW + DAY_MS).await),
        ErrorCode::InvalidArgument,
        "only the buyer's assigned agent"
    );

    // b4 blocks the shop: no proactive contact.
    f.groups
        .assign_cs_agent(&mei.who, "b4", "mei")
        .await
        .unwrap();
    f.groups
        .cs_block(&buyer("b4"), SHOP, true, NOW)
        .await
        .unwrap();
    assert_eq!(
        code(proactive("b4", NOW + 2 * DAY_MS).await),
        ErrorCode::ContactBlocked
    );
    f.groups
        .cs_block(&buyer("b4"), SHOP, false, NOW)
        .await
        .unwrap();

    // Blocks and reports push the score below the threshold: off, until
    // purchases bring it back.
    let day3 = NOW + 3 * DAY_MS;
    for n in 0..6 {
        let b = format!("x{n}");
        f.groups
            .cs_block(&buyer(&b), SHOP, true, day3)
            .await
            .unwrap();
    }
    assert_eq!(code(proactive("b4", day3).await), ErrorCode::ProactiveOff);
    for _ in 0..60 {
        f.groups
            .record_purchase(&mei.who, "b1", day3)
            .await
            .unwrap();
    }
    proactive("b4", day3).await.unwrap();
}

#[tokio::test]
async fn an_idle_session_closes_and_the_buyers_next_message_reopens_it() {
    let f = fixture().await;
    shop(&f, 5).await;
    let mei = connect(&f, agent("mei", SHOP), 1);
    let b1 = connect(&f, buyer("b1"), 11);
    online(&f, &mei, Presence::Online).await;
    let s = open(&f, "b1", NOW).await.unwrap();
    sessions(&b1);
    let later = NOW + 31 * 60_000;
    f.groups.tick(later).await;
    assert_eq!(sessions(&b1).last().unwrap().state(), CsState::Closed);
    let q = f.groups.cs_queue(&mei.who, SHOP, later).await.unwrap();
    assert_eq!(q.agents[0].sessions, 0);
    f.groups
        .post(&buyer("b1"), text(s.session_id, "me again"), later)
        .await
        .unwrap();
    // The reopening follows the message; wait for its push.
    let reopened = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if let Some(s) = sessions(&b1).pop() {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (reopened.state(), reopened.agent_id.as_str()),
        (CsState::Open, "mei")
    );
    assert_eq!(reopened.session_id, s.session_id);
}

#[tokio::test]
async fn after_a_restart_an_idle_open_session_is_routed_again_on_opening() {
    let mut f = fixture().await;
    shop(&f, 5).await;
    let mei = connect(&f, agent("mei", SHOP), 1);
    online(&f, &mei, Presence::Online).await;
    let s = open(&f, "b2", NOW).await.unwrap();
    assert_eq!(s.agent_id, "mei");
    f.reopen(CoreConfig::default()).await;
    // Mei never comes back; lin is online an hour later.
    let lin = connect(&f, agent("lin", SHOP), 2);
    online(&f, &lin, Presence::Online).await;
    let later = NOW + 60 * 60_000;
    let again = open(&f, "b2", later).await.unwrap();
    assert_eq!(
        (again.session_id, again.agent_id.as_str()),
        (s.session_id, "lin")
    );
    // Within the idle limit, the session stays with its agent.
    let soon = open(&f, "b2", later + 1_000).await.unwrap();
    assert_eq!(soon.agent_id, "lin");
}
