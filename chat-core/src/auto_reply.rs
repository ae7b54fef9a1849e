//! Auto-reply: the shop's bot answers mechanical questions at once.
//!
//! A shop keeps rules — keywords that must all appear, a regular
//! expression, or both — with an answer. When a buyer's text message
//! matches a rule, or contains the question of one of the group's FAQ
//! entries, the bot (sender `bot`, role SYSTEM) answers in the group right
//! after it, quoting it: the answer is sequenced under the same lock, so it
//! follows the question with no other message between. Each rule and entry
//! answers at most once per cooldown per group, so a crowd asking the same
//! thing gets one answer, not a flood; a question nothing matches is left
//! for the agents.
//!
//! Regular expressions are compiled once, when the rule is saved, with size
//! limits (RE2 semantics: matching is linear in the text, never
//! backtracking), so a rule cannot make posting slow.

use std::sync::Arc;

use qun_proto::v1;
use qun_storage::WriteOp;
use qun_storage::records::{AutoReplyRecord, QuoteRecord};
use regex::{Regex, RegexBuilder};

use crate::group::{GroupCell, GroupState, KIND_TEXT};
use crate::groups::{Groups, durable_channel};
use crate::permissions::{Operation, require};
use crate::{ChatError, Identity, Role};

/// Most rules per shop.
pub const MAX_RULES: usize = 50;
/// Longest pattern, in bytes.
const MAX_PATTERN: usize = 500;
/// Compiled size limit of one pattern, in bytes.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Cooldown of a rule saved with 0, and of FAQ entries.
const DEFAULT_COOLDOWN_MS: u64 = 60_000;
/// Shortest FAQ question (normalized characters) that answers by itself;
/// shorter ones would match too much.
const MIN_FAQ_QUESTION: usize = 4;

/// The bot's user id and name.
pub(crate) const BOT_ID: &str = "bot";
const BOT_NAME: &str = "Shop assistant";

/// A rule ready to match (cloning shares the compiled pattern).
#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub(crate) record: AutoReplyRecord,
    keywords: Vec<String>,
    regex: Option<Regex>,
}

impl CompiledRule {
    /// Checks a rule and compiles its pattern.
    ///
    /// # Errors
    /// `InvalidArgument` naming what is wrong (a bad regular expression
    /// quotes the compiler's message).
    pub(crate) fn new(record: AutoReplyRecord) -> Result<Self, ChatError> {
        let bad = |m: String| Err(ChatError::InvalidArgument(m));
        let id_ok = (1..=64).contains(&record.rule_id.chars().count())
            && !record.rule_id.chars().any(char::is_control);
        if !id_ok {
            return bad("rule_id must be 1 to 64 characters without control characters".into());
        }
        if !(1..=1_000).contains(&record.answer.trim().chars().count()) {
            return bad("answer must be 1 to 1000 characters".into());
        }
        if record.keywords.len() > 10
            || record
                .keywords
                .iter()
                .any(|k| !(1..=50).contains(&k.trim().chars().count()))
        {
            return bad("at most 10 keywords of 1 to 50 characters".into());
        }
        if record.keywords.is_empty() && record.pattern.is_empty() {
            return bad("a rule needs keywords, a pattern, or both".into());
        }
        if record.pattern.len() > MAX_PATTERN {
            return bad(format!("pattern is longer than {MAX_PATTERN} bytes"));
        }
        if record.cooldown_ms > crate::reach::DAY_MS {
            return bad("cooldown_ms must be at most one day".into());
        }
        let regex = if record.pattern.is_empty() {
            None
        } else {
            Some(
                RegexBuilder::new(&record.pattern)
                    .case_insensitive(true)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| ChatError::InvalidArgument(format!("pattern: {e}")))?,
            )
        };
        let keywords = record
            .keywords
            .iter()
            .map(|k| k.trim().to_lowercase())
            .collect();
        Ok(Self {
            record,
            keywords,
            regex,
        })
    }

    fn matches(&self, lower: &str, text: &str) -> bool {
        self.keywords.iter().all(|k| lower.contains(k.as_str()))
            && self.regex.as_ref().is_none_or(|r| r.is_match(text))
    }

    fn cooldown_ms(&self) -> u64 {
        match self.record.cooldown_ms {
            0 => DEFAULT_COOLDOWN_MS,
            ms => ms,
        }
    }

    pub(crate) fn to_wire(&self) -> v1::AutoReplyRule {
        v1::AutoReplyRule {
            rule_id: self.record.rule_id.clone(),
            keywords: self.record.keywords.clone(),
            pattern: self.record.pattern.clone(),
            answer: self.record.answer.clone(),
            cooldown_ms: self.record.cooldown_ms,
        }
    }
}

/// A shop's rules, ascending rule id.
#[derive(Debug, Default)]
pub(crate) struct ShopRules {
    pub(crate) rules: Vec<CompiledRule>,
}

/// Letters and digits, lower case: how FAQ questions are compared.
fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl Groups {
    /// Loads a shop's rules once (with its first group).
    pub(crate) async fn ensure_auto_replies(&self, shop_id: &str) -> Result<(), ChatError> {
        if self.inner().auto_replies.contains_key(shop_id) {
            return Ok(());
        }
        let mut rules = Vec::new();
        for record in self.inner().store.load_auto_replies(shop_id).await? {
            match CompiledRule::new(record) {
                Ok(r) => rules.push(r),
                // Saved by a build with other limits: skip, say so.
                Err(e) => tracing::warn!(shop_id, error = %e, "auto-reply rule skipped"),
            }
        }
        self.inner()
            .auto_replies
            .entry(shop_id.to_string())
            .or_insert_with(|| Arc::new(ShopRules { rules }));
        Ok(())
    }

    /// Under the group's lock, for a buyer's text: the answer the bot owes,
    /// if a rule or FAQ entry matches and is not cooling down. Marks it
    /// fired.
    pub(crate) fn auto_answer(
        &self,
        g: &mut GroupState,
        text: &str,
        now_ms: u64,
    ) -> Option<String> {
        let rules = self.inner().auto_replies.get(&g.record.shop_id)?.clone();
        if rules.rules.is_empty() && g.faq.is_empty() {
            return None;
        }
        let lower = text.to_lowercase();
        let mut found: Option<(String, u64, String)> = None;
        for r in &rules.rules {
            if r.matches(&lower, text) {
                found = Some((
                    format!("rule:{}", r.record.rule_id),
                    r.cooldown_ms(),
                    r.record.answer.clone(),
                ));
                break;
            }
        }
        if found.is_none() && !g.faq.is_empty() {
            let asked = normalize(text);
            found = g.faq.values().find_map(|f| {
                let q = normalize(&f.question);
                (q.chars().count() >= MIN_FAQ_QUESTION && asked.contains(&q)).then(|| {
                    (
                        format!("faq:{}", f.faq_id),
                        DEFAULT_COOLDOWN_MS,
                        f.answer.clone(),
                    )
                })
            });
        }
        let (key, cooldown, answer) = found?;
        if g.auto_replied
            .get(&key)
            .is_some_and(|last| now_ms.saturating_sub(*last) < cooldown)
        {
            return None;
        }
        g.auto_replied.insert(key, now_ms);
        Some(answer)
    }

    /// Under the group's lock, right after the question at `question_seq`:
    /// sequences the bot's answer, quoting it. A failure leaves the
    /// question standing.
    pub(crate) fn post_auto_answer(
        &self,
        cell: &Arc<GroupCell>,
        g: &mut GroupState,
        question_seq: u64,
        quote: QuoteRecord,
        answer: String,
        now_ms: u64,
    ) {
        let mut record = g.next_event(BOT_ID, BOT_NAME, Role::System, answer, Vec::new(), now_ms);
        record.kind = KIND_TEXT;
        record.reply_to = question_seq;
        record.quote = Some(quote);
        if let Err(e) = self.submit_sequenced(cell, g, record, Vec::new()) {
            tracing::warn!(group_id = g.id(), error = %e, "auto-reply not posted");
        }
    }

    /// Creates or replaces a rule of the caller's shop. Staff only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument` (a field out of range, a pattern
    /// that does not compile or is too large, more than 50 rules),
    /// `Storage`.
    pub async fn put_auto_reply(
        &self,
        who: &Identity,
        rule: v1::AutoReplyRule,
    ) -> Result<v1::AutoReplies, ChatError> {
        require(who, Operation::ManageAutoReply)?;
        let shop = who.shop_id().unwrap_or_default().to_string();
        let compiled = CompiledRule::new(AutoReplyRecord {
            shop_id: shop.clone(),
            rule_id: rule.rule_id,
            keywords: rule.keywords,
            pattern: rule.pattern,
            answer: rule.answer.trim().to_string(),
            cooldown_ms: rule.cooldown_ms,
        })?;
        self.ensure_auto_replies(&shop).await?;
        {
            let current = self.shop_rules(&shop);
            let replacing = current
                .rules
                .iter()
                .any(|r| r.record.rule_id == compiled.record.rule_id);
            if !replacing && current.rules.len() >= MAX_RULES {
                return Err(ChatError::InvalidArgument(format!(
                    "a shop has at most {MAX_RULES} rules; remove one first"
                )));
            }
        }
        self.write_rules(vec![WriteOp::PutAutoReply(compiled.record.clone())])
            .await?;
        let id = compiled.record.rule_id.clone();
        Ok(self.update_rules(&shop, |rules| {
            rules.retain(|r| r.record.rule_id != id);
            rules.push(compiled);
        }))
    }

    /// Removes a rule of the caller's shop. Staff only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument` (no such rule), `Storage`.
    pub async fn remove_auto_reply(
        &self,
        who: &Identity,
        rule_id: &str,
    ) -> Result<v1::AutoReplies, ChatError> {
        require(who, Operation::ManageAutoReply)?;
        let shop = who.shop_id().unwrap_or_default().to_string();
        self.ensure_auto_replies(&shop).await?;
        if !self
            .shop_rules(&shop)
            .rules
            .iter()
            .any(|r| r.record.rule_id == rule_id)
        {
            return Err(ChatError::InvalidArgument(format!("no rule {rule_id:?}")));
        }
        self.write_rules(vec![WriteOp::RemoveAutoReply {
            shop_id: shop.clone(),
            rule_id: rule_id.to_string(),
        }])
        .await?;
        Ok(self.update_rules(&shop, |rules| rules.retain(|r| r.record.rule_id != rule_id)))
    }

    /// The caller's shop's rules. Staff only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `Storage`.
    pub async fn list_auto_replies(&self, who: &Identity) -> Result<v1::AutoReplies, ChatError> {
        require(who, Operation::ManageAutoReply)?;
        let shop = who.shop_id().unwrap_or_default().to_string();
        self.ensure_auto_replies(&shop).await?;
        Ok(wire(&self.shop_rules(&shop)))
    }

    fn shop_rules(&self, shop: &str) -> Arc<ShopRules> {
        self.inner()
            .auto_replies
            .get(shop)
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    async fn write_rules(&self, ops: Vec<WriteOp>) -> Result<(), ChatError> {
        let (done, rx) = durable_channel();
        self.inner().store.submit(ops, done)?;
        crate::groups::durable(rx).await
    }

    /// Applies `change` to the shop's rules (a new list, swapped in).
    fn update_rules(
        &self,
        shop: &str,
        change: impl FnOnce(&mut Vec<CompiledRule>),
    ) -> v1::AutoReplies {
        let mut entry = self
            .inner()
            .auto_replies
            .entry(shop.to_string())
            .or_default();
        let mut rules: Vec<CompiledRule> = entry.rules.clone();
        change(&mut rules);
        rules.sort_by(|a, b| a.record.rule_id.cmp(&b.record.rule_id));
        let updated = Arc::new(ShopRules { rules });
        *entry = updated.clone();
        wire(&updated)
    }
}

fn wire(rules: &ShopRules) -> v1::AutoReplies {
    v1::AutoReplies {
        rules: rules.rules.iter().map(CompiledRule::to_wire).collect(),
    }
}
