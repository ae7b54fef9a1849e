//! The reach quota and buyer feedback against the real embedded store, with
//! time passed in: no test waits for midnight.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1;

use qun_storage::Store as _;

use crate::reach::DAY_MS;
use crate::tests::{Fixture, NOW, agent, buyer, code, create, drain, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-r";

fn coupon(group_id: u64, now_ms: u64) -> v1::IssueCoupon {
    v1::IssueCoupon {
        group_id,
        title: "10 off".into(),
        amount_minor: 1_000,
        quantity: 1_000,
        expires_at_ms: now_ms + DAY_MS,
        ..Default::default()
    }
}

/// A group of SHOP with an agent and `buyers` buyers (b0, b1, …).
async fn shop_group(f: &Fixture, buyers: usize) -> u64 {
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    for i in 0..buyers {
        let b = buyer(&format!("b{i}"));
        let (s, _) = sub(1_000 + i as u64, &b, OutboxLimits::default());
        f.groups.join(&b, g, s, NOW).await.unwrap();
    }
    g
}

async fn quota(f: &Fixture, g: u64, now_ms: u64) -> v1::ReachQuota {
    f.groups
        .reach_quota(&agent("a1", SHOP), g, now_ms)
        .await
        .unwrap()
}

#[tokio::test]
async fn promotions_stop_at_the_quota_and_start_again_the_next_day_also_after_a_restart() {
    let mut f = fixture().await;
    let g = shop_group(&f, 0).await;
    let a = agent("a1", SHOP);
    for n in 0..3 {
        f.groups
            .issue_coupon(&a, coupon(g, NOW + n), NOW + n)
            .await
            .unwrap();
    }
    let refused = f.groups.issue_coupon(&a, coupon(g, NOW + 5), NOW + 5).await;
    let e = refused.unwrap_err();
    assert_eq!(e.code(), ErrorCode::QuotaExhausted);
    let midnight = (NOW / DAY_MS + 1) * DAY_MS;
    assert_eq!(e.retry_after_ms(), Some(midnight - (NOW + 5)));
    let q = quota(&f, g, NOW + 6).await;
    assert_eq!((q.used, q.limit, q.base), (3, 3, 3));
    assert_eq!(q.resets_at_ms, midnight);
    // A card is a promotion too; a text answer never is.
    assert_eq!(
        code(
            f.groups
                .post_card(
                    &a,
                    v1::PostCard {
                        group_id: g,
                        product: Some(v1::Product {
                            product_id: "sku".into(),
                            title: "Shoe".into(),
                            price_minor: 100,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    NOW + 7
                )
                .await
        ),
        ErrorCode::QuotaExhausted
    );
    f.groups
        .post(&a, text(g, "S is EU 34"), NOW + 8)
        .await
        .unwrap();

    // The count survives a restart.
    f.reopen(CoreConfig::default()).await;
    assert_eq!(
        code(f.groups.issue_coupon(&a, coupon(g, NOW + 9), NOW + 9).await),
        ErrorCode::QuotaExhausted
    );
    // The next UTC day starts from zero.
    f.groups
        .issue_coupon(&a, coupon(g, midnight), midnight)
        .await
        .unwrap();
    assert_eq!(quota(&f, g, midnight + 1).await.used, 1);
}

#[tokio::test]
async fn quota_grows_with_positive_feedback_and_shrinks_with_mutes_and_reports() {
    let f = fixture().await;
    let g = shop_group(&f, 60).await;
    let a = agent("a1", SHOP);
    let start = quota(&f, g, NOW).await;
    assert_eq!((start.limit, start.score_milli), (3, 0));
    let c = f
        .groups
        .issue_coupon(&a, coupon(g, NOW), NOW)
        .await
        .unwrap()
        .seq;
    for i in 0..60 {
        f.groups
            .claim_coupon(&buyer(&format!("b{i}")), g, c, NOW + 1)
            .await
            .unwrap();
    }
    let grown = quota(&f, g, NOW + 2).await;
    assert_eq!((grown.positive, grown.negative), (60, 0));
    assert_eq!(grown.limit, 8, "score 0.75: 3 × 4^0.75 ≈ 8");

    // Another shop's feedback window: mutes and reports narrow it.
    let f2 = fixture().await;
    let g2 = shop_group(&f2, 10).await;
    let msg = f2
        .groups
        .post(&a, text(g2, "New arrivals!"), NOW)
        .await
        .unwrap()
        .seq;
    for i in 0..5 {
        let b = buyer(&format!("b{i}"));
        f2.groups.mute_promotions(&b, g2, true, NOW).await.unwrap();
        f2.groups
            .report_message(
                &b,
                v1::ReportMessage {
                    group_id: g2,
                    seq: msg,
                    reason: "spam".into(),
                },
                NOW,
            )
            .await
            .unwrap();
    }
    let shrunk = f2.groups.reach_quota(&a, g2, NOW + 1).await.unwrap();
    assert_eq!((shrunk.positive, shrunk.negative), (0, 10));
    assert_eq!(shrunk.limit, 1, "score −0.6");
    assert!(shrunk.score_milli < 0);
}

#[tokio::test]
async fn signals_count_once_and_feedback_survives_a_restart() {
    let mut f = fixture().await;
    let g = shop_group(&f, 2).await;
    let a = agent("a1", SHOP);
    let b = buyer("b0");
    let card = f
        .groups
        .issue_coupon(&a, coupon(g, NOW), NOW)
        .await
        .unwrap()
        .seq;
    for _ in 0..3 {
        f.groups.open_card(&b, g, card, NOW).await.unwrap();
        f.groups
            .report_message(
                &b,
                v1::ReportMessage {
                    group_id: g,
                    seq: card,
                    reason: "too many".into(),
                },
                NOW,
            )
            .await
            .unwrap();
        f.groups.mute_promotions(&b, g, true, NOW).await.unwrap();
    }
    // Staff opening their own card is not buyer feedback.
    f.groups.open_card(&a, g, card, NOW).await.unwrap();
    let q = quota(&f, g, NOW).await;
    assert_eq!(
        (q.positive, q.negative),
        (1, 2),
        "one open; one report, one mute"
    );
    // A buyer leaving within a day of a promotion counts against the shop.
    f.groups.leave(&buyer("b1"), g, NOW + 1_000).await.unwrap();
    assert_eq!(quota(&f, g, NOW + 1_001).await.negative, 3);

    f.groups.tick(NOW + 2_000).await; // writes the feedback
    f.reopen(CoreConfig::default()).await;
    let q = quota(&f, g, NOW + 3_000).await;
    assert_eq!((q.positive, q.negative), (1, 3));
    // Reports are kept: a second one after the restart still counts once.
    f.groups
        .report_message(
            &b,
            v1::ReportMessage {
                group_id: g,
                seq: card,
                reason: "again".into(),
            },
            NOW + 4_000,
        )
        .await
        .unwrap();
    assert_eq!(quota(&f, g, NOW + 4_001).await.negative, 3);
    // The window moves on: a week later all of it has aged out.
    assert_eq!(quota(&f, g, NOW + 8 * DAY_MS).await.negative, 0);
}

#[tokio::test]
async fn a_buyer_who_muted_promotions_gets_placeholders_live_in_history_and_on_resume() {
    let f = fixture().await;
    let g = shop_group(&f, 0).await;
    let a = agent("a1", SHOP);
    let muted = buyer("m1");
    let other = buyer("o1");
    let (s_m, out_m) = sub(11, &muted, OutboxLimits::default());
    let (s_o, out_o) = sub(12, &other, OutboxLimits::default());
    f.groups.join(&muted, g, s_m, NOW).await.unwrap();
    f.groups.join(&other, g, s_o, NOW).await.unwrap();
    f.groups
        .mute_promotions(&muted, g, true, NOW)
        .await
        .unwrap();

    f.groups.post(&a, text(g, "hello"), NOW).await.unwrap();
    let c = f
        .groups
        .issue_coupon(&a, coupon(g, NOW), NOW)
        .await
        .unwrap()
        .seq;
    f.groups.post(&a, text(g, "claim it!"), NOW).await.unwrap();

    let kinds = |msgs: &[v1::ChatMessage]| -> Vec<(u64, v1::MessageKind)> {
        msgs.iter().map(|m| (m.seq, m.kind())).collect()
    };
    let (live_m, _) = drain(&out_m).await;
    let (live_o, _) = drain(&out_o).await;
    let hidden = [
        (1, v1::MessageKind::Text),
        (c, v1::MessageKind::Hidden),
        (3, v1::MessageKind::Text),
    ];
    assert_eq!(kinds(&live_m), hidden, "live, muted");
    assert_eq!(live_m[1].text, "", "a placeholder carries nothing");
    assert!(live_m[1].commerce.is_none());
    assert_eq!(
        kinds(&live_o),
        [
            (1, v1::MessageKind::Text),
            (c, v1::MessageKind::Commerce),
            (3, v1::MessageKind::Text),
        ],
        "others see the promotion"
    );
    let page = f.groups.history(&muted, g, 0, 10).await.unwrap();
    assert_eq!(kinds(&page.messages), hidden, "history, muted");
    let range = f.groups.fetch_range(&muted, g, 0, 10).await.unwrap();
    assert_eq!(kinds(&range.messages), hidden, "fetch_range, muted");
    let (s_r, out_r) = sub(13, &muted, OutboxLimits::default());
    f.groups.resume(&muted, g, 0, s_r).await.unwrap();
    let (resumed, _) = drain(&out_r).await;
    assert_eq!(kinds(&resumed), hidden, "resume, muted");

    // Unmuted: promotions come back, in history too.
    f.groups
        .mute_promotions(&muted, g, false, NOW)
        .await
        .unwrap();
    let page = f.groups.history(&muted, g, 0, 10).await.unwrap();
    assert_eq!(page.messages[1].kind(), v1::MessageKind::Commerce);
}

#[tokio::test]
async fn bad_feedback_requests_are_refused_and_change_nothing() {
    let f = fixture().await;
    let g = shop_group(&f, 1).await;
    let b = buyer("b0");
    let outsider = buyer("x");
    let report = |seq: u64, reason: &str| v1::ReportMessage {
        group_id: g,
        seq,
        reason: reason.into(),
    };
    assert_eq!(
        code(f.groups.report_message(&b, report(99, "spam"), NOW).await),
        ErrorCode::InvalidArgument
    );
    f.groups
        .post(&agent("a1", SHOP), text(g, "hi"), NOW)
        .await
        .unwrap();
    assert_eq!(
        code(f.groups.report_message(&b, report(1, " "), NOW).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            f.groups
                .report_message(&b, report(1, &"x".repeat(501)), NOW)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(
            f.groups
                .report_message(&outsider, report(1, "spam"), NOW)
                .await
        ),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.mute_promotions(&outsider, g, true, NOW).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(f.groups.open_card(&b, g, 0, NOW).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.reach_quota(&b, g, NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(f.groups.reach_quota(&agent("z", "other"), g, NOW).await),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(f.groups.open_card(&b, 9_999, 1, NOW).await),
        ErrorCode::UnknownGroup
    );
    let q = quota(&f, g, NOW).await;
    assert_eq!((q.positive, q.negative), (0, 0), "nothing was counted");
    assert!(f.store.load_reports(g).await.unwrap().is_empty());
}
