//! Reach quota: how many promotions a group may get per day, widened or
//! narrowed by how the shop's buyers respond.
//!
//! Unlimited merchant pushes turned shop groups into spam; a fixed cap
//! starves the merchants buyers like. So each promotion (a product card, a
//! group-buy, a coupon, a poll) takes one unit of its group's daily quota,
//! and the quota is the configured base scaled by the shop's **score**, a
//! number in [-1, 1] computed from buyer feedback over a rolling window:
//!
//! ```text
//! P = positive signals in the window      N = negative signals × negative_weight
//! score = (P − N) / (P + N + prior)
//! limit = clamp(round(base × max_factor^score), 1, base × max_factor)
//! ```
//!
//! With the defaults (base 3, window 7 days, negative weight 3, prior 20,
//! max factor 4): a new shop has score 0 and 3 promotions a day; 60
//! positive signals and none negative give score 0.75 and 8 a day; 10 mutes
//! or reports and nothing positive give score −0.6 and 1 a day. The prior
//! keeps a handful of signals from swinging the quota; the weight makes
//! one mute outweigh one coupon claim. Answers to buyers never take quota.
//!
//! Positive signals: a card opened, a group-buy joined, a coupon claimed, a
//! poll voted in, a buyer's reply. Negative: a buyer muting the group's
//! promotions, leaving within 24 hours of a promotion, reporting a message.

use std::collections::BTreeMap;

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

/// The UTC day of a time, as days since the Unix epoch.
pub fn utc_day(now_ms: u64) -> u64 {
    now_ms / DAY_MS
}

/// The rules of the reach quota.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReachPolicy {
    /// Promotions per group per day for a shop with score 0. 0 turns the
    /// quota off (unlimited).
    pub base_per_day: u32,
    /// Days of feedback the score looks at, today included.
    pub window_days: u64,
    /// How many positive signals one negative signal weighs.
    pub negative_weight: u64,
    /// Signals of weight zero added to the denominator, so that a few
    /// signals cannot swing the score.
    pub prior: u64,
    /// The quota ranges from `base / max_factor` (at least 1) to
    /// `base × max_factor`.
    pub max_factor: u32,
}

impl Default for ReachPolicy {
    fn default() -> Self {
        Self {
            base_per_day: 3,
            window_days: 7,
            negative_weight: 3,
            prior: 20,
            max_factor: 4,
        }
    }
}

impl ReachPolicy {
    /// The score for `positive` and `negative` signals, in [-1, 1].
    pub fn score(&self, positive: u64, negative: u64) -> f64 {
        let p = positive as f64;
        let n = negative.saturating_mul(self.negative_weight) as f64;
        let d = p + n + self.prior as f64;
        if d == 0.0 { 0.0 } else { (p - n) / d }
    }

    /// Promotions per group per day at `score`; `None` when the quota is off.
    pub fn daily_limit(&self, score: f64) -> Option<u32> {
        if self.base_per_day == 0 {
            return None;
        }
        let factor = f64::from(self.max_factor.max(1));
        let max = self.base_per_day.saturating_mul(self.max_factor.max(1));
        let raw = (f64::from(self.base_per_day) * factor.powf(score.clamp(-1.0, 1.0))).round();
        Some((raw as u32).clamp(1, max))
    }
}

/// Something a buyer did that says how they take a shop's promotions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// Opened a product card.
    CardOpened,
    /// Joined a group-buy.
    GroupBuyJoined,
    /// Claimed a coupon.
    CouponClaimed,
    /// Voted in a poll.
    PollVoted,
    /// Replied to a message.
    Replied,
    /// Muted the group's promotions.
    PromotionsMuted,
    /// Left within 24 hours of a promotion.
    LeftAfterPromotion,
    /// Reported a message.
    Reported,
    /// Blocked the shop's proactive customer service.
    ContactBlocked,
    /// Bought something (reported by the shop's systems).
    Purchased,
}

impl Signal {
    /// Whether it counts for (true) or against the shop.
    pub fn is_positive(self) -> bool {
        matches!(
            self,
            Signal::CardOpened
                | Signal::GroupBuyJoined
                | Signal::CouponClaimed
                | Signal::PollVoted
                | Signal::Replied
                | Signal::Purchased
        )
    }
}

/// A shop's feedback, per day.
#[derive(Debug, Default, Clone)]
pub struct ShopFeedback {
    /// `day → (positive, negative)`.
    days: BTreeMap<u64, (u64, u64)>,
    /// Days changed since they were last written.
    dirty: Vec<u64>,
}

impl ShopFeedback {
    /// From stored days.
    pub fn from_days(days: impl IntoIterator<Item = (u64, u64, u64)>) -> Self {
        Self {
            days: days.into_iter().map(|(d, p, n)| (d, (p, n))).collect(),
            dirty: Vec::new(),
        }
    }

    /// Counts one signal on `day`.
    pub fn record(&mut self, day: u64, signal: Signal) {
        let entry = self.days.entry(day).or_default();
        if signal.is_positive() {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
        self.mark_dirty(day);
    }

    /// Marks `day` to be written again (its write could not be queued).
    pub fn mark_dirty(&mut self, day: u64) {
        if !self.dirty.contains(&day) {
            self.dirty.push(day);
        }
    }

    /// Positive and negative signals in the `window_days` ending `today`.
    pub fn totals(&self, today: u64, window_days: u64) -> (u64, u64) {
        let from = today.saturating_sub(window_days.saturating_sub(1));
        self.days
            .range(from..=today)
            .fold((0, 0), |(p, n), (_, (dp, dn))| (p + dp, n + dn))
    }

    /// The days changed since the last call, with their counts, to write;
    /// and forgets days older than the window.
    pub fn take_dirty(&mut self, today: u64, window_days: u64) -> Vec<(u64, u64, u64)> {
        let out = self
            .dirty
            .drain(..)
            .filter_map(|d| self.days.get(&d).map(|(p, n)| (d, *p, *n)))
            .collect();
        let keep_from = today.saturating_sub(window_days.saturating_sub(1));
        self.days.retain(|d, _| *d >= keep_from);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(p: &ReachPolicy, positive: u64, negative: u64) -> u32 {
        p.daily_limit(p.score(positive, negative)).unwrap()
    }

    #[test]
    fn the_documented_examples_hold() {
        let p = ReachPolicy::default();
        assert_eq!(p.score(0, 0), 0.0);
        assert_eq!(limit(&p, 0, 0), 3, "a new shop gets the base");
        assert!((p.score(60, 0) - 0.75).abs() < 1e-9);
        assert_eq!(limit(&p, 60, 0), 8);
        assert!((p.score(0, 10) + 0.6).abs() < 1e-9);
        assert_eq!(limit(&p, 0, 10), 1);
    }

    #[test]
    fn the_limit_moves_with_feedback_and_stays_within_bounds() {
        let p = ReachPolicy::default();
        let mut last = 0;
        for positive in [0, 5, 20, 50, 200, 10_000] {
            let l = limit(&p, positive, 0);
            assert!(l >= last, "more positive feedback never narrows reach");
            last = l;
        }
        assert_eq!(last, 12, "at most base × max_factor");
        assert!(
            limit(&p, 100, 30) < limit(&p, 100, 0),
            "negatives narrow it"
        );
        assert_eq!(limit(&p, 0, 1_000_000), 1, "never below one a day");
        let off = ReachPolicy {
            base_per_day: 0,
            ..p
        };
        assert_eq!(off.daily_limit(0.5), None);
    }

    #[test]
    fn feedback_counts_per_day_within_the_window() {
        let mut f = ShopFeedback::default();
        f.record(10, Signal::CouponClaimed);
        f.record(10, Signal::Reported);
        f.record(13, Signal::GroupBuyJoined);
        f.record(16, Signal::PromotionsMuted);
        assert_eq!(f.totals(16, 7), (2, 2));
        assert_eq!(f.totals(17, 7), (1, 1), "day 10 left the window");
        let mut written = f.take_dirty(17, 7);
        written.sort_unstable();
        assert_eq!(written, [(10, 1, 1), (13, 1, 0), (16, 0, 1)]);
        assert!(f.take_dirty(17, 7).is_empty(), "written once");
        assert_eq!(f.totals(16, 7), (1, 1), "day 10 was forgotten");
        let stored = ShopFeedback::from_days([(16, 4, 0), (15, 1, 2)]);
        assert_eq!(stored.totals(16, 7), (5, 2));
    }
}
