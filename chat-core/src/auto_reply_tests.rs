//! The shop's bot against the real embedded store, time passed in by hand.
#![allow(clippy::unwrap_used)]

use qun_proto::ErrorCode;
use qun_proto::v1;

use crate::tests::{NOW, agent, buyer, code, create, drain, fixture, sub, text};
use crate::*;

const SHOP: &str = "shop-bot";

fn rule(id: &str, keywords: &[&str], pattern: &str, answer: &str) -> v1::AutoReplyRule {
    v1::AutoReplyRule {
        rule_id: id.into(),
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
        pattern: pattern.into(),
        answer: answer.into(),
        cooldown_ms: 60_000,
    }
}

#[tokio::test]
async fn the_bot_answers_a_known_question_once_within_its_cooldown() {
    let mut f = fixture().await;
    let a = agent("a1", SHOP);
    f.groups
        .put_auto_reply(
            &a,
            rule("size", &["欧码"], r"S\s*码", "S 码相当于欧码 34。"),
        )
        .await
        .unwrap();
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, watch) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();

    let q = f
        .groups
        .post(&b, text(g, "S码相当于欧码34还是36?"), NOW)
        .await
        .unwrap()
        .seq;
    let (msgs, _) = drain(&watch).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let bot = &msgs[1];
    assert_eq!(
        (
            bot.seq,
            bot.sender_id.as_str(),
            bot.sender_role(),
            bot.reply_to
        ),
        (q + 1, "bot", v1::Role::System, q)
    );
    assert_eq!(bot.text, "S 码相当于欧码 34。");
    assert_eq!(bot.quote.as_ref().unwrap().text, "S码相当于欧码34还是36?");

    // Within the cooldown a second asker gets no second answer; after it,
    // they do. Staff messages and unmatched questions get none.
    f.groups
        .post(&b, text(g, "s 码 = 欧码几?"), NOW + 10_000)
        .await
        .unwrap();
    f.groups
        .post(&a, text(g, "S码 欧码 34"), NOW + 70_000)
        .await
        .unwrap();
    f.groups
        .post(&b, text(g, "When does it ship?"), NOW + 70_000)
        .await
        .unwrap();
    assert!(
        drain(&watch).await.0.iter().all(|m| m.sender_id != "bot"),
        "no bot answer within the cooldown, to staff, or without a match"
    );
    f.groups
        .post(&b, text(g, "S 码是欧码多少"), NOW + 70_001)
        .await
        .unwrap();
    let later: Vec<_> = drain(&watch)
        .await
        .0
        .into_iter()
        .filter(|m| m.sender_id == "bot")
        .collect();
    assert_eq!(later.len(), 1);

    // Rules survive a restart.
    f.reopen(CoreConfig::default()).await;
    let listed = f.groups.list_auto_replies(&a).await.unwrap();
    assert_eq!(listed.rules[0].rule_id, "size");
}

#[tokio::test]
async fn an_faq_entry_answers_its_question_too() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    let g = create(&f.groups, &a, 0).await;
    let b = buyer("b1");
    let (s, watch) = sub(2, &b, OutboxLimits::default());
    f.groups.join(&b, g, s, NOW).await.unwrap();
    let q = f
        .groups
        .post(&b, text(g, "Do you ship to Macau?"), NOW)
        .await
        .unwrap()
        .seq;
    let ans = f
        .groups
        .post(&a, text(g, "Yes, in 3 days."), NOW)
        .await
        .unwrap()
        .seq;
    f.groups
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
    drain(&watch).await;
    f.groups
        .post(&buyer("b1"), text(g, "hi! do you ship to macau??"), NOW + 1)
        .await
        .unwrap();
    let bot: Vec<_> = drain(&watch)
        .await
        .0
        .into_iter()
        .filter(|m| m.sender_id == "bot")
        .collect();
    assert_eq!(bot.len(), 1);
    assert_eq!(bot[0].text, "Yes, in 3 days.");
}

#[tokio::test]
async fn bad_rules_are_refused_with_a_clear_error_and_nothing_is_kept() {
    let f = fixture().await;
    let a = agent("a1", SHOP);
    for (bad, needle) in [
        (rule("r", &[], "(unclosed", "x"), "pattern"),
        (rule("r", &[], &"a".repeat(501), "x"), "longer than"),
        (rule("r", &[], r"\w{1000}{1000}", "x"), "pattern"),
        (rule("r", &[], "", "x"), "keywords, a pattern"),
        (rule("", &["k"], "", "x"), "rule_id"),
        (rule("r", &["k"], "", " "), "answer"),
    ] {
        let e = f.groups.put_auto_reply(&a, bad).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(e.to_string().contains(needle), "{e}");
    }
    assert!(
        f.groups
            .list_auto_replies(&a)
            .await
            .unwrap()
            .rules
            .is_empty()
    );
    assert_eq!(
        code(f.groups.remove_auto_reply(&a, "nope").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(f.groups.list_auto_replies(&buyer("b")).await),
        ErrorCode::ForbiddenRole
    );
    for n in 0..MAX_AUTO_REPLY_RULES {
        f.groups
            .put_auto_reply(&a, rule(&format!("r{n:02}"), &["k"], "", "x"))
            .await
            .unwrap();
    }
    assert_eq!(
        code(
            f.groups
                .put_auto_reply(&a, rule("one-more", &["k"], "", "x"))
                .await
        ),
        ErrorCode::InvalidArgument
    );
    // Replacing an existing rule is fine at the cap; removing one frees it.
    f.groups
        .put_auto_reply(&a, rule("r00", &["k2"], "", "y"))
        .await
        .unwrap();
    let left = f.groups.remove_auto_reply(&a, "r01").await.unwrap();
    assert_eq!(left.rules.len(), MAX_AUTO_REPLY_RULES - 1);
}
