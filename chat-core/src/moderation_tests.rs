//! Moderation against the real embedded store, time passed in by hand.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1;

use crate::tests::{NOW, agent, buyer, code, create, drain, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-m";

fn mute(group_id: u64, user: &str, duration_ms: u64) -> v1::MuteMember {
    v1::MuteMember {
        group_id,
        user_id: user.into(),
        duration_ms,
    }
}

#[tokio::test]
async fn a_muted_buyer_cannot_post_until_the_mute_ends_and_it_survives_a_restart() {
    let mut f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    f.groups
        .mute_member(&a, mute(g, "b1", 60_000), NOW)
        .await
        .unwrap();
    let e = f
        .groups
        .post(&b, text(g, "hello?"), NOW + 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Muted);
    assert_eq!(e.retry_after_ms(), Some(59_999));
    f.groups
        .post(&a, text(g, "staff still post"), NOW + 2)
        .await
        .unwrap();
    f.reopen(CoreConfig::default()).await;
    assert_eq!(
        code(f.groups.post(&b, text(g, "again"), NOW + 3).await),
        ErrorCode::Muted
    );
    f.groups
        .post(&b, text(g, "free"), NOW + 60_000)
        .await
        .unwrap();
    f.groups
        .mute_member(&a, mute(g, "b1", 60_000), NOW + 60_001)
        .await
        .unwrap();
    f.groups
        .mute_member(&a, mute(g, "b1", 0), NOW + 60_002)
        .await
        .unwrap();
    f.groups
        .post(&b, text(g, "unmuted"), NOW + 60_003)
        .await
        .unwrap();
}

#[tokio::test]
async fn muting_all_buyers_leaves_only_staff_posting() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    f.groups.mute_all_buyers(&a, g, true).await.unwrap();
    let e = f.groups.post(&b, text(g, "hi"), NOW).await.unwrap_err();
    assert_eq!((e.code(), e.retry_after_ms()), (ErrorCode::Muted, Some(0)));
    f.groups
        .post(&a, text(g, "announcement"), NOW)
        .await
        .unwrap();
    f.groups.mute_all_buyers(&a, g, false).await.unwrap();
    f.groups.post(&b, text(g, "hi"), NOW).await.unwrap();
}

#[tokio::test]
async fn a_removed_buyer_is_told_loses_the_group_and_a_ban_keeps_them_out() {
    let mut f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, out) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    f.groups
        .remove_member(
            &a,
            v1::RemoveMember {
                group_id: g,
                user_id: "b1".into(),
                ban_ms: 3_600_000,
            },
            NOW,
        )
        .await
        .unwrap();
    let item = out.recv().await.unwrap();
    let Outgoing::Frame(frame) = item else {
        panic!("expected a frame")
    };
    assert!(matches!(
        qun_proto::decode_server_frame(&frame).unwrap().body,
        Some(v1::server_frame::Body::Left(v1::Left { group_id })) if group_id == g
    ));
    f.groups.post(&a, text(g, "after"), NOW).await.unwrap();
    assert!(drain(&out).await.0.is_empty(), "no more pushes");
    assert_eq!(
        code(f.groups.history(&b, g, 0, 10).await),
        ErrorCode::NotMember
    );
    f.reopen(CoreConfig::default()).await;
    let (s, _o) = sub(3, &b, OutboxLimits::default());
    let e = f.groups.join(&b, g, s, NOW + 1_000).await.unwrap_err();
    assert_eq!(
        (e.code(), e.retry_after_ms()),
        (ErrorCode::Banned, Some(3_599_000))
    );
    let (s, _o) = sub(4, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW + 3_600_000).await.unwrap();
}

#[tokio::test]
async fn recall_is_an_event_and_history_shows_the_message_recalled() {
    let mut f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let other = buyer("b2");
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    let (s, watch) = sub(3, &other, OutboxLimits::default());
    f.groups.join(&other, g, s, NOW).await.unwrap();
    let mine = f
        .groups
        .post(&b, text(g, "oops, my phone number"), NOW)
        .await
        .unwrap()
        .seq;
    let theirs = f.groups.post(&other, text(g, "hi"), NOW).await.unwrap().seq;

    assert_eq!(
        code(f.groups.recall(&b, g, theirs, NOW + 1).await),
        ErrorCode::ForbiddenRole,
        "a buyer recalls only their own"
    );
    assert_eq!(
        code(
            f.groups
                .recall(&b, g, mine, NOW + RECALL_WINDOW_MS + 1)
                .await
        ),
        ErrorCode::InvalidArgument,
        "two minutes have passed"
    );
    let done = f.groups.recall(&b, g, mine, NOW + 1_000).await.unwrap();
    assert_eq!(done.seq, theirs + 1);
    assert_eq!(
        code(f.groups.recall(&a, g, mine, NOW + 2_000).await),
        ErrorCode::InvalidArgument,
        "already recalled"
    );
    let (pushed, _) = drain(&watch).await;
    let recall = pushed.last().unwrap();
    assert_eq!(
        (recall.kind(), recall.recalls, recall.sender_id.as_str()),
        (v1::MessageKind::Recall, mine, "b1")
    );
    let page = f.groups.history(&other, g, 0, 10).await.unwrap();
    let original = &page.messages[0];
    assert!(
        original.recalled && original.text.is_empty(),
        "{original:?}"
    );
    assert_eq!(page.messages[1].text, "hi");

    // Staff recall any message, any time; the store keeps it recalled.
    f.groups
        .recall(&a, g, theirs, NOW + 10 * RECALL_WINDOW_MS)
        .await
        .unwrap();
    f.reopen(CoreConfig::default()).await;
    let page = f.groups.history(&other, g, 0, 10).await.unwrap();
    assert!(page.messages[0].recalled && page.messages[1].recalled);
    let range = f.groups.fetch_range(&other, g, 0, 10).await.unwrap();
    assert!(range.messages[1].recalled && range.messages[1].text.is_empty());
    assert_eq!(
        code(f.groups.recall(&a, g, 99, NOW).await),
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn only_staff_of_the_shop_moderate_and_only_buyers_are_moderated() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    let stranger = agent("x1", "other-shop");
    assert_eq!(
        code(f.groups.mute_member(&b, mute(g, "b1", 60_000), NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(
            f.groups
                .mute_member(&stranger, mute(g, "b1", 60_000), NOW)
                .await
        ),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(f.groups.mute_member(&a, mute(g, "a1", 60_000), NOW).await),
        ErrorCode::InvalidArgument,
        "staff are not muted"
    );
    assert_eq!(
        code(
            f.groups
                .mute_member(&a, mute(g, "nobody", 60_000), NOW)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.mute_member(&a, mute(g, "b1", 10), NOW).await),
        ErrorCode::InvalidArgument,
        "too short"
    );
    assert_eq!(
        code(f.groups.mute_all_buyers(&b, g, true).await),
        ErrorCode::ForbiddenRole
    );
    let remove = |ban_ms| v1::RemoveMember {
        group_id: g,
        user_id: "b1".into(),
        ban_ms,
    };
    assert_eq!(
        code(f.groups.remove_member(&b, remove(0), NOW).await),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(
            f.groups
                .remove_member(&a, remove(400 * 86_400_000), NOW)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    // Nothing changed: b1 is a member and can post.
    f.groups.post(&b, text(g, "still here"), NOW).await.unwrap();
}

/// Whether the message `seq` of `page` quotes `quoted` with its text gone.
fn quote_scrubbed(page: &v1::HistoryPage, seq: u64, quoted: u64) -> bool {
    let m = page.messages.iter().find(|m| m.seq == seq).unwrap();
    let q = m.quote.as_ref().unwrap();
    q.seq == quoted && q.recalled && q.text.is_empty() && q.sender_id == "b1"
}

#[tokio::test]
async fn a_recall_takes_the_quoted_text_out_of_every_reply_in_memory_and_stored() {
    // A ring of four: the first reply is only in the store by the time of
    // the recall, the last one also in the ring.
    let mut f = crate::tests::fixture_with(CoreConfig {
        recent_ring: 4,
        ..CoreConfig::default()
    })
    .await;
    crate::tests::spawn_fan_out(&f.groups);
    let (a, b, g) = group_with_buyer(&f).await;
    let post = async |who: &Identity, reply_to: u64, s: &str| {
        let m = NewMessage {
            reply_to,
            ..text(g, s)
        };
        f.groups.post(who, m, NOW).await.unwrap().seq
    };
    let secret = post(&b, 0, "call me on 138 0000 0000").await;
    let other = post(&b, 0, "S or M?").await;
    let old_reply = post(&a, secret, "we will call you").await;
    for n in 0..6 {
        post(&a, 0, &format!("filler {n}")).await;
    }
    let unrelated = post(&a, other, "M fits EU 36").await;
    let new_reply = post(&a, secret, "noted").await;
    let page = f.groups.history(&b, g, 0, 50).await.unwrap();
    assert!(
        !quote_scrubbed(&page, old_reply, secret),
        "before the recall the quote has its text"
    );

    f.groups.recall(&b, g, secret, NOW + 1_000).await.unwrap();
    let check = |page: &v1::HistoryPage| {
        assert!(quote_scrubbed(page, old_reply, secret), "{page:?}");
        assert!(quote_scrubbed(page, new_reply, secret), "{page:?}");
        let kept = page.messages.iter().find(|m| m.seq == unrelated).unwrap();
        assert_eq!(kept.quote.as_ref().unwrap().text, "S or M?");
        assert!(!kept.quote.as_ref().unwrap().recalled);
        assert!(
            page.messages.iter().all(|m| !m.text.contains("138")
                && m.quote.as_ref().is_none_or(|q| !q.text.contains("138"))),
            "{page:?}"
        );
    };
    // The newest page, from the ring: the reply there lost its text too.
    let newest = f.groups.history(&b, g, 0, 2).await.unwrap();
    assert_eq!(newest.messages[0].seq, new_reply, "{newest:?}");
    assert!(quote_scrubbed(&newest, new_reply, secret), "{newest:?}");
    // Older pages come from the store, where the replies were rewritten.
    check(&f.groups.history(&b, g, 0, 50).await.unwrap());
    check(&f.groups.fetch_range(&b, g, 0, 50).await.unwrap());
    // A reply made after the recall quotes it as recalled.
    let late = post(&a, secret, "sorry, it was recalled").await;
    let page = f.groups.history(&b, g, 0, 50).await.unwrap();
    assert!(quote_scrubbed(&page, late, secret), "{page:?}");
    // And all of it from the store alone.
    f.reopen(CoreConfig::default()).await;
    let page = f.groups.history(&b, g, 0, 50).await.unwrap();
    check(&page);
    assert!(quote_scrubbed(&page, late, secret), "{page:?}");
}

#[tokio::test]
async fn a_reply_recalled_first_stays_recalled_when_what_it_quotes_is_recalled() {
    let f = fixture().await;
    let (a, b, g) = group_with_buyer(&f).await;
    let question = f.groups.post(&b, text(g, "question"), NOW).await.unwrap();
    let wrong = NewMessage {
        reply_to: question.seq,
        ..text(g, "a wrong answer")
    };
    let answer = f.groups.post(&a, wrong, NOW).await.unwrap().seq;
    f.groups.recall(&a, g, answer, NOW + 1).await.unwrap();
    f.groups.recall(&b, g, question.seq, NOW + 2).await.unwrap();
    let page = f.groups.history(&b, g, 0, 50).await.unwrap();
    let m = page.messages.iter().find(|m| m.seq == answer).unwrap();
    assert!(
        m.recalled && m.text.is_empty() && m.quote.is_none(),
        "{m:?}"
    );
}

/// A group of [`SHOP`] made by agent `a1`, with buyer `b1` joined.
async fn group_with_buyer(f: &crate::tests::Fixture) -> (Identity, Identity, u64) {
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    (a, b, g)
}
