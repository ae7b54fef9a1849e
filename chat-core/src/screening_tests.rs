//! Join policies against the real embedded store.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1;

use crate::tests::{NOW, agent, buyer, code, create, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-s";

fn decide(g: u64, user: &str, approve: bool) -> v1::DecideJoin {
    v1::DecideJoin {
        group_id: g,
        user_id: user.into(),
        approve,
    }
}

#[tokio::test]
async fn an_approval_group_records_requests_and_staff_decide_them() {
    let mut f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    f.groups
        .set_join_policy(&a, g, v1::JoinPolicy::Approval, "")
        .await
        .unwrap();
    let ann = buyer("ann");
    let bo = buyer("bo");
    let (s, _o) = sub(2, &ann, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&ann, g, s, NOW).await),
        ErrorCode::JoinPending
    );
    let (s, _o) = sub(3, &ann, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&ann, g, s, NOW + 5).await),
        ErrorCode::JoinPending,
        "asking again changes nothing"
    );
    let (s, _o) = sub(4, &bo, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&bo, g, s, NOW + 1).await),
        ErrorCode::JoinPending
    );
    assert_eq!(
        code(f.groups.post(&ann, text(g, "hi"), NOW).await),
        ErrorCode::NotMember
    );
    // Staff join as always.
    let (s, _o) = sub(5, &agent("a2", SHOP), OutboxLimits::default());
    f.groups.join(&agent("a2", SHOP), g, s, NOW).await.unwrap();

    f.reopen(CoreConfig::default()).await;
    let pending = f.groups.list_join_requests(&a, g).await.unwrap();
    assert_eq!(
        pending
            .requests
            .iter()
            .map(|r| (r.user_id.as_str(), r.requested_at_ms))
            .collect::<Vec<_>>(),
        [("ann", NOW), ("bo", NOW + 1)],
        "kept across a restart, oldest first"
    );

    // ann's phone is connected: it is told.
    let (phone, outbox) = sub(6, &ann, OutboxLimits::default());
    f.groups.attach_device(&ann, phone.conn, outbox.clone());
    let left = f
        .groups
        .decide_join(&a, decide(g, "ann", true), NOW + 2)
        .await
        .unwrap();
    assert_eq!(left.requests.len(), 1);
    let Some(Outgoing::Frame(frame)) = outbox.recv().await else {
        panic!("no push")
    };
    assert!(matches!(
        qun_proto::decode_server_frame(&frame).unwrap().body,
        Some(v1::server_frame::Body::JoinDecided(v1::JoinDecided {
            approved: true,
            ..
        }))
    ));
    let joined = f.groups.join(&ann, g, phone, NOW + 3).await.unwrap();
    assert!(joined.already_member);
    f.groups
        .post(&ann, text(g, "thanks!"), NOW + 4)
        .await
        .unwrap();

    f.groups
        .decide_join(&a, decide(g, "bo", false), NOW + 5)
        .await
        .unwrap();
    assert_eq!(
        code(
            f.groups
                .decide_join(&a, decide(g, "bo", true), NOW + 6)
                .await
        ),
        ErrorCode::InvalidArgument,
        "already decided"
    );
    let (s, _o) = sub(7, &bo, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&bo, g, s, NOW + 7).await),
        ErrorCode::JoinPending,
        "a rejected buyer may ask again"
    );
    // Opened: buyers join directly.
    f.groups
        .set_join_policy(&a, g, v1::JoinPolicy::Open, "")
        .await
        .unwrap();
    let (s, _o) = sub(8, &buyer("cy"), OutboxLimits::default());
    f.groups.join(&buyer("cy"), g, s, NOW + 8).await.unwrap();
}

#[tokio::test]
async fn screening_requests_are_checked() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    assert_eq!(
        code(
            f.groups
                .set_join_policy(&b, g, v1::JoinPolicy::Approval, "")
                .await
        ),
        ErrorCode::ForbiddenRole
    );
    assert_eq!(
        code(
            f.groups
                .set_join_policy(&agent("x", "other"), g, v1::JoinPolicy::Approval, "")
                .await
        ),
        ErrorCode::WrongShop
    );
    assert_eq!(
        code(
            f.groups
                .decide_join(&a, decide(g, "nobody", true), NOW)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.list_join_requests(&b, g).await),
        ErrorCode::ForbiddenRole
    );
    // A banned buyer's request is refused as a ban, not recorded.
    let (s, _o) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    f.groups
        .remove_member(
            &a,
            v1::RemoveMember {
                group_id: g,
                user_id: "b1".into(),
                ban_ms: 60_000,
            },
            NOW,
        )
        .await
        .unwrap();
    f.groups
        .set_join_policy(&a, g, v1::JoinPolicy::Approval, "")
        .await
        .unwrap();
    let (s, _o) = sub(3, &b, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&b, g, s, NOW + 1).await),
        ErrorCode::Banned
    );
    assert!(
        f.groups
            .list_join_requests(&a, g)
            .await
            .unwrap()
            .requests
            .is_empty()
    );
}

#[tokio::test]
async fn a_threshold_group_admits_only_buyers_whose_tags_match() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    assert_eq!(
        code(
            f.groups
                .set_join_policy(&a, g, v1::JoinPolicy::Threshold, "vip AND")
                .await
        ),
        ErrorCode::InvalidArgument
    );
    let set = f
        .groups
        .set_join_policy(&a, g, v1::JoinPolicy::Threshold, "tier:vip OR size:s")
        .await
        .unwrap();
    assert_eq!(set.expression, "tier:vip OR size:s");
    let ann = buyer("ann");
    let (s, _o) = sub(2, &ann, OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&ann, g, s, NOW).await),
        ErrorCode::NotEligible
    );
    // The shop's systems say ann spends a lot: now she is a VIP.
    let tags = f
        .groups
        .tag_buyer(
            &a,
            "ann",
            vec!["spend:high".into(), "orders:7".into()],
            vec![],
            true,
        )
        .await
        .unwrap();
    assert_eq!((tags.tier.as_str(), tags.tags.len()), ("vip", 2));
    let (s, _o) = sub(3, &ann, OutboxLimits::default());
    f.groups.join(&ann, g, s, NOW).await.unwrap();
    // An agent tags bo by hand.
    let bo = buyer("bo");
    f.groups
        .tag_buyer(&a, "bo", vec!["size:s".into()], vec![], false)
        .await
        .unwrap();
    let (s, _o) = sub(4, &bo, OutboxLimits::default());
    f.groups.join(&bo, g, s, NOW).await.unwrap();
    // Tags are per shop: another shop's tags do not count.
    let other = agent("x1", "other-shop");
    f.groups
        .tag_buyer(&other, "cy", vec!["vip".into()], vec![], false)
        .await
        .unwrap();
    let (s, _o) = sub(5, &buyer("cy"), OutboxLimits::default());
    assert_eq!(
        code(f.groups.join(&buyer("cy"), g, s, NOW).await),
        ErrorCode::NotEligible
    );
    let read = f.groups.buyer_tags(&a, "bo").await.unwrap();
    assert_eq!(
        (read.tags, read.tier.as_str()),
        (vec!["size:s".to_string()], "new")
    );
    let removed = f
        .groups
        .tag_buyer(&a, "bo", vec![], vec!["size:s".into()], false)
        .await
        .unwrap();
    assert!(removed.tags.is_empty());
    assert_eq!(
        code(
            f.groups
                .tag_buyer(&a, "bo", vec!["VIP!".into()], vec![], false)
                .await
        ),
        ErrorCode::InvalidArgument
    );
}
