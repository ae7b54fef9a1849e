//! The role × operation matrix, cell by cell, against the real store: every
//! operation is asked for as a buyer, an agent, an owner and the system, in
//! a group where everything but the role is in order. A permitted cell must
//! succeed; a refused one must answer FORBIDDEN_ROLE and nothing else.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1;

use crate::permissions::{Operation, permits};
use crate::reach::ReachPolicy;
use crate::tests::{Fixture, NOW, agent, buyer, create, fixture_with, sub, text};
use crate::*;

const SHOP: &str = "shop-r";

/// A group with everything an operation may need: the actor a member, a
/// buyer `target` with a message, a product, a card, a group-buy, a coupon
/// and a poll.
struct Stage {
    f: Fixture,
    g: u64,
    target_msg: u64,
    answer_msg: u64,
    card: u64,
    group_buy: u64,
    coupon: u64,
    poll: u64,
}

fn product() -> v1::Product {
    v1::Product {
        product_id: "sku-1".into(),
        title: "Shoe".into(),
        price_minor: 100,
        ..Default::default()
    }
}

async fn stage(actor: &Identity) -> Stage {
    let config = CoreConfig {
        reach: ReachPolicy {
            base_per_day: 0,
            ..ReachPolicy::default()
        },
        ..CoreConfig::default()
    };
    let f = fixture_with(config).await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let target = buyer("target");
    for (n, who) in [&target, actor].into_iter().enumerate() {
        if who.role() != Role::System {
            let (s, _) = sub(100 + n as u64, who, OutboxLimits::default());
            f.groups.join(who, g, s, NOW).await.unwrap();
        }
    }
    let target_msg = f
        .groups
        .post(&target, text(g, "hello"), NOW)
        .await
        .unwrap()
        .seq;
    let answer_msg = f
        .groups
        .post(&a, text(g, "welcome"), NOW)
        .await
        .unwrap()
        .seq;
    let card = f
        .groups
        .post_card(
            &a,
            v1::PostCard {
                group_id: g,
                product: Some(product()),
                ..Default::default()
            },
            NOW,
        )
        .await
        .unwrap()
        .seq;
    let later = NOW + 3_600_000;
    let group_buy = f
        .groups
        .start_group_buy(
            &a,
            v1::StartGroupBuy {
                group_id: g,
                product_id: "sku-1".into(),
                price_minor: 90,
                target: 2,
                slots: 10,
                starts_at_ms: 0,
                deadline_ms: later,
            },
            NOW,
        )
        .await
        .unwrap()
        .seq;
    let coupon = f
        .groups
        .issue_coupon(
            &a,
            v1::IssueCoupon {
                group_id: g,
                title: "5 off".into(),
                amount_minor: 5,
                quantity: 10,
                expires_at_ms: later,
                ..Default::default()
            },
            NOW,
        )
        .await
        .unwrap()
        .seq;
    let poll = f
        .groups
        .open_poll(
            &a,
            v1::OpenPoll {
                group_id: g,
                question: "Colour?".into(),
                options: vec!["red".into(), "blue".into()],
                deadline_ms: later,
                votes_final: false,
            },
            NOW,
        )
        .await
        .unwrap()
        .seq;
    Stage {
        f,
        g,
        target_msg,
        answer_msg,
        card,
        group_buy,
        coupon,
        poll,
    }
}

/// Asks for `op` as `who`; `Ok(())` when it was done.
async fn attempt(s: &Stage, who: &Identity, op: Operation) -> Result<(), ChatError> {
    let (groups, g) = (&s.f.groups, s.g);
    let now = NOW + 1;
    match op {
        Operation::CreateGroup => groups
            .create_group(
                who,
                NewGroup {
                    name: "Another".into(),
                    ..Default::default()
                },
                now,
            )
            .await
            .map(drop),
        Operation::JoinGroup => {
            let (sub, _) = sub(900, who, OutboxLimits::default());
            groups.join(who, g, sub, now).await.map(drop)
        }
        Operation::LeaveGroup => groups.leave(who, g, now).await,
        Operation::SendMessage => groups.post(who, text(g, "hi"), now).await.map(drop),
        Operation::ReadHistory => groups.history(who, g, 0, 10).await.map(drop),
        Operation::MarkRead => groups.mark_read(who, ConnId(901), g, 1).await.map(drop),
        Operation::PutProduct => groups.put_product(who, product(), now).await.map(drop),
        Operation::PostCard => groups
            .post_card(
                who,
                v1::PostCard {
                    group_id: g,
                    product_id: "sku-1".into(),
                    ..Default::default()
                },
                now,
            )
            .await
            .map(drop),
        Operation::StartGroupBuy => groups
            .start_group_buy(
                who,
                v1::StartGroupBuy {
                    group_id: g,
                    product_id: "sku-1".into(),
                    price_minor: 90,
                    target: 2,
                    slots: 10,
                    starts_at_ms: 0,
                    deadline_ms: NOW + 3_600_000,
                },
                now,
            )
            .await
            .map(drop),
        Operation::JoinGroupBuy => groups
            .join_group_buy(who, g, s.group_buy, now)
            .await
            .map(drop),
        Operation::IssueCoupon => groups
            .issue_coupon(
                who,
                v1::IssueCoupon {
                    group_id: g,
                    title: "more".into(),
                    amount_minor: 5,
                    quantity: 10,
                    expires_at_ms: NOW + 3_600_000,
                    ..Default::default()
                },
                now,
            )
            .await
            .map(drop),
        Operation::ClaimCoupon => groups.claim_coupon(who, g, s.coupon, now).await.map(drop),
        Operation::OpenPoll => groups
            .open_poll(
                who,
                v1::OpenPoll {
                    group_id: g,
                    question: "Size?".into(),
                    options: vec!["S".into(), "M".into()],
                    deadline_ms: NOW + 3_600_000,
                    votes_final: false,
                },
                now,
            )
            .await
            .map(drop),
        Operation::Vote => groups.vote(who, g, s.poll, 1, now).await.map(drop),
        Operation::EndCommerce => groups.end_commerce(who, g, s.poll, now).await.map(drop),
        Operation::ViewCommerce => groups
            .commerce_object(who, g, s.coupon, now)
            .await
            .map(drop),
        Operation::MutePromotions => groups.mute_promotions(who, g, true, now).await.map(drop),
        Operation::ReportMessage => groups
            .report_message(
                who,
                v1::ReportMessage {
                    group_id: g,
                    seq: s.target_msg,
                    reason: "spam".into(),
                },
                now,
            )
            .await
            .map(drop),
        Operation::OpenCard => groups.open_card(who, g, s.card, now).await.map(drop),
        Operation::ViewReachQuota => groups.reach_quota(who, g, now).await.map(drop),
        Operation::ViewReports => groups.reports(who, g).await.map(drop),
        Operation::MuteMember => groups
            .mute_member(
                who,
                v1::MuteMember {
                    group_id: g,
                    user_id: "target".into(),
                    duration_ms: 60_000,
                },
                now,
            )
            .await
            .map(drop),
        Operation::MuteAllBuyers => groups.mute_all_buyers(who, g, true).await.map(drop),
        Operation::RemoveMember => groups
            .remove_member(
                who,
                v1::RemoveMember {
                    group_id: g,
                    user_id: "target".into(),
                    ban_ms: 0,
                },
                now,
            )
            .await
            .map(drop),
        Operation::RecallOwn => {
            // Its own message, if it can post one at all.
            let seq = match groups.post(who, text(g, "oops"), now).await {
                Ok(ack) => ack.seq,
                Err(_) => s.target_msg,
            };
            groups.recall(who, g, seq, now + 1).await.map(drop)
        }
        Operation::RecallAny => groups.recall(who, g, s.target_msg, now).await.map(drop),
        Operation::EditFaq => groups
            .promote_faq(
                who,
                v1::PromoteFaq {
                    group_id: g,
                    question_seq: s.target_msg,
                    answer_seq: s.answer_msg,
                },
                now,
            )
            .await
            .map(drop),
        Operation::Pin => groups
            .set_pin(
                who,
                v1::SetPin {
                    group_id: g,
                    pin: Some(v1::Pin {
                        target: Some(v1::pin::Target::MessageSeq(s.answer_msg)),
                    }),
                    pinned: true,
                },
                now,
            )
            .await
            .map(drop),
        Operation::ReadBoard => groups.list_faq(who, g).await.map(drop),
        Operation::SetJoinPolicy => groups
            .set_join_policy(who, g, v1::JoinPolicy::Approval, "")
            .await
            .map(drop),
        Operation::DecideJoin => groups.list_join_requests(who, g).await.map(drop),
        Operation::ManageTags => groups
            .tag_buyer(who, "target", vec!["vip".into()], vec![], false)
            .await
            .map(drop),
        Operation::PushPromotion => groups
            .push_promotion(
                who,
                v1::PushPromotion {
                    group_id: g,
                    content: Some(v1::PushContent {
                        kind: Some(v1::push_content::Kind::Announcement("New in".into())),
                        audience: String::new(),
                    }),
                },
                now,
            )
            .await
            .map(drop),
        Operation::ManageSchedules => groups
            .schedule_push(
                who,
                v1::SchedulePush {
                    group_id: g,
                    content: Some(v1::PushContent {
                        kind: Some(v1::push_content::Kind::ProductId("sku-1".into())),
                        audience: String::new(),
                    }),
                    first_at_ms: now + 60_000,
                    every_ms: 0,
                },
                now,
            )
            .await
            .map(drop),
        Operation::ReadTagPool => groups.tag_pool(who).map(drop),
        Operation::CsSession => groups.cs_queue(who, SHOP, now).await.map(drop),
        Operation::SetPresence => groups
            .set_presence(who, v1::Presence::Online, now)
            .await
            .map(drop),
        Operation::CsBlock => groups.cs_block(who, SHOP, true, now).await.map(drop),
        Operation::ManageCs => groups.cs_config(who).await.map(drop),
        Operation::CsTransfer => {
            // The target buyer's session, handled by a1; a3 is free.
            let a1 = agent("a1", SHOP);
            let a3 = agent("a3", SHOP);
            groups
                .set_cs_config(&a1, "new", 5, 600_000, 10, now)
                .await
                .unwrap();
            for (n, staff) in [&a1, &a3].into_iter().enumerate() {
                let (_, outbox) = sub(900 + n as u64, staff, OutboxLimits::default());
                groups.attach_device(staff, ConnId(900 + n as u64), outbox);
            }
            groups
                .set_presence(&a1, v1::Presence::Online, now)
                .await
                .unwrap();
            let opened = groups
                .cs_open(
                    &buyer("target"),
                    v1::CsOpen {
                        shop_id: SHOP.into(),
                        ..Default::default()
                    },
                    now,
                )
                .await
                .unwrap();
            assert_eq!(opened.agent_id, "a1");
            groups
                .set_presence(&a3, v1::Presence::Online, now)
                .await
                .unwrap();
            groups
                .cs_transfer(
                    who,
                    v1::CsTransfer {
                        session_id: opened.session_id,
                        to_agent: "a3".into(),
                        note: "size question".into(),
                    },
                    now,
                )
                .await
                .map(drop)
        }
        Operation::ManageAutoReply => groups
            .put_auto_reply(
                who,
                v1::AutoReplyRule {
                    rule_id: "size".into(),
                    keywords: vec!["size".into()],
                    answer: "See the size chart.".into(),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cell_of_the_matrix_is_enforced() {
    let system = Identity::new("platform", "Qun", Role::System, None).unwrap();
    let actors = [
        buyer("b1"),
        agent("a2", SHOP),
        Identity::new("o1", "Owner", Role::Owner, Some(SHOP.into())).unwrap(),
        system,
    ];
    // Each actor's cells on a task of its own: every cell has a store of
    // its own, and opening one is mostly the filesystem's time.
    let tasks: Vec<_> = actors
        .into_iter()
        .map(|who| {
            tokio::spawn(async move {
                for op in Operation::ALL {
                    let s = stage(&who).await;
                    let r = attempt(&s, &who, op).await;
                    if permits(who.role(), op) {
                        assert!(
                            r.is_ok(),
                            "{:?} may {:?} but got {:?}",
                            who.role(),
                            op.name(),
                            r
                        );
                    } else {
                        let code = r.as_ref().map_err(ChatError::code);
                        assert_eq!(
                            code,
                            Err(ErrorCode::ForbiddenRole),
                            "{:?} may not {:?}",
                            who.role(),
                            op.name()
                        );
                    }
                }
                Operation::ALL.len()
            })
        })
        .collect();
    let mut checked = 0;
    for task in tasks {
        checked += task.await.unwrap();
    }
    assert_eq!(checked, Operation::ALL.len() * 4);
}
