//! FAQ entries and pins against the real embedded store.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1;

use crate::tests::{NOW, agent, buyer, code, create, drain, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-b";

fn pin(seq: u64, faq: u64, pinned: bool, g: u64) -> v1::SetPin {
    let target = if faq > 0 {
        v1::pin::Target::FaqId(faq)
    } else {
        v1::pin::Target::MessageSeq(seq)
    };
    v1::SetPin {
        group_id: g,
        pin: Some(v1::Pin {
            target: Some(target),
        }),
        pinned,
    }
}

#[tokio::test]
async fn an_answer_becomes_an_faq_entry_and_pins_are_capped_and_kept() {
    let mut f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, watch) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    let q = f
        .groups
        .post(&b, text(g, "Is S size EU 34 or 36?"), NOW)
        .await
        .unwrap()
        .seq;
    let mut reply = text(g, "S is EU 34.");
    reply.reply_to = q;
    let ans = f.groups.post(&a, reply, NOW).await.unwrap().seq;

    let board = f
        .groups
        .promote_faq(
            &a,
            v1::PromoteFaq {
                group_id: g,
                question_seq: q,
                answer_seq: ans,
            },
            NOW,
        )
        .await
        .unwrap();
    let entry = &board.entries[0];
    assert_eq!(
        (entry.faq_id, entry.question.as_str(), entry.answer.as_str()),
        (1, "Is S size EU 34 or 36?", "S is EU 34.")
    );
    assert_eq!(
        (entry.asked_by.as_str(), entry.answered_by.as_str()),
        ("b1", "a1")
    );
    let board = f.groups.set_pin(&a, pin(0, 1, true, g), NOW).await.unwrap();
    assert_eq!(board.pins.len(), 1);
    // Pinning again changes nothing and posts nothing.
    f.groups.set_pin(&a, pin(0, 1, true, g), NOW).await.unwrap();
    let (pushed, _) = drain(&watch).await;
    let boards: Vec<_> = pushed
        .iter()
        .filter(|m| m.kind() == v1::MessageKind::Board)
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(
        boards,
        [
            "Agent a1 added an FAQ entry",
            "Agent a1 pinned an FAQ entry"
        ]
    );

    // Up to ten pins.
    for n in 0..9 {
        let seq = f
            .groups
            .post(&a, text(g, &format!("notice {n}")), NOW)
            .await
            .unwrap()
            .seq;
        f.groups
            .set_pin(&a, pin(seq, 0, true, g), NOW)
            .await
            .unwrap();
    }
    let extra = f
        .groups
        .post(&a, text(g, "one too many"), NOW)
        .await
        .unwrap()
        .seq;
    assert_eq!(
        code(f.groups.set_pin(&a, pin(extra, 0, true, g), NOW).await),
        ErrorCode::InvalidArgument
    );

    // Kept across a restart; removing the entry removes its pin.
    f.reopen(CoreConfig::default()).await;
    let board = f.groups.list_faq(&b, g).await.unwrap();
    assert_eq!((board.entries.len(), board.pins.len()), (1, 10));
    let board = f.groups.remove_faq(&a, g, 1, NOW).await.unwrap();
    assert_eq!((board.entries.len(), board.pins.len()), (0, 9));
    f.groups
        .set_pin(&a, pin(extra, 0, true, g), NOW)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_board_requests_are_refused_and_change_nothing() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    let q = f
        .groups
        .post(&b, text(g, "question"), NOW)
        .await
        .unwrap()
        .seq;
    let promote = |question_seq, answer_seq| v1::PromoteFaq {
        group_id: g,
        question_seq,
        answer_seq,
    };
    assert_eq!(
        code(f.groups.promote_faq(&a, promote(q, q), NOW).await),
        ErrorCode::InvalidArgument,
        "the answer must come after"
    );
    assert_eq!(
        code(f.groups.promote_faq(&a, promote(q, 99), NOW).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.promote_faq(&b, promote(q, q + 1), NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(
            f.groups
                .promote_faq(&agent("x", "other"), promote(q, q + 1), NOW)
                .await
        ),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(f.groups.set_pin(&a, pin(0, 7, true, g), NOW).await),
        ErrorCode::InvalidArgument,
        "no such entry"
    );
    assert_eq!(
        code(
            f.groups
                .set_pin(
                    &a,
                    v1::SetPin {
                        group_id: g,
                        pin: None,
                        pinned: true
                    },
                    NOW
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
    f.groups.recall(&b, g, q, NOW).await.unwrap();
    assert_eq!(
        code(f.groups.set_pin(&a, pin(q, 0, true, g), NOW).await),
        ErrorCode::InvalidArgument,
        "a recalled message is not pinned"
    );
    assert_eq!(
        code(f.groups.remove_faq(&a, g, 1, NOW).await),
        ErrorCode::InvalidArgument
    );
    let board = f.groups.list_faq(&a, g).await.unwrap();
    assert!(board.entries.is_empty() && board.pins.is_empty());
    assert_eq!(
        code(f.groups.list_faq(&buyer("outsider"), g).await),
        ErrorCode::NotMember
    );
}
