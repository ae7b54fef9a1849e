//! Buyer feedback and the reach quota, on the registry.
//!
//! The rules are in [`crate::reach`] (pure); this module applies them to
//! groups: a promotion takes quota under its group's lock, in the same
//! batch as its event; buyers' actions count as signals for the group's
//! shop; muting promotions, reports and card opens are requests of their
//! own. Feedback is counted in memory and written by [`Groups::tick`], so a
//! crash loses at most one tick's worth of signals — they steer a quota,
//! they are not records anyone relies on.

use qun_proto::v1;
use qun_storage::records::ReportRecord;
use qun_storage::{FeedbackDay, ReachUse, WriteOp};

use crate::group::GroupState;
use crate::groups::{Groups, durable, durable_channel};
use crate::reach::{DAY_MS, ShopFeedback, Signal, utc_day};
use crate::{ChatError, Identity, Role};

/// Longest report reason, in characters.
const REASON_CHARS: usize = 500;

/// Most card opens remembered per group (to count each once); beyond it,
/// opens are no longer counted until the group is reloaded.
const OPENED_CAP: usize = 100_000;

impl Groups {
    /// Loads a shop's feedback into memory once (with its first group).
    pub(crate) async fn ensure_feedback(&self, shop_id: &str) -> Result<(), ChatError> {
        if self.inner().feedback.contains_key(shop_id) {
            return Ok(());
        }
        let days = self.inner().store.load_feedback(shop_id).await?;
        self.inner()
            .feedback
            .entry(shop_id.to_string())
            .or_insert_with(|| {
                ShopFeedback::from_days(days.into_iter().map(
                    |FeedbackDay {
                         day,
                         positive,
                         negative,
                     }| (day, positive, negative),
                ))
            });
        Ok(())
    }

    /// Counts one buyer signal for a shop.
    pub(crate) fn record_signal(&self, shop_id: &str, signal: Signal, now_ms: u64) {
        if let Some(mut f) = self.inner().feedback.get_mut(shop_id) {
            f.record(utc_day(now_ms), signal);
            drop(f);
            if !self.inner().feedback_dirty.contains_key(shop_id) {
                self.inner().feedback_dirty.insert(shop_id.to_string(), ());
            }
        }
    }

    /// The shop's signals in the window and its quota today.
    pub(crate) fn standing(&self, shop_id: &str, now_ms: u64) -> (u64, u64, f64, Option<u32>) {
        let policy = &self.inner().config.reach;
        let (positive, negative) = self
            .inner()
            .feedback
            .get(shop_id)
            .map_or((0, 0), |f| f.totals(utc_day(now_ms), policy.window_days));
        let score = policy.score(positive, negative);
        (positive, negative, score, policy.daily_limit(score))
    }

    /// Under the group's lock: takes one promotion from today's quota and
    /// returns its write, or `QuotaExhausted`. Undo with
    /// [`Groups::return_reach`] if the promotion is not posted after all.
    pub(crate) fn take_reach(&self, g: &mut GroupState, now_ms: u64) -> Result<WriteOp, ChatError> {
        let day = utc_day(now_ms);
        if g.reach.day != day {
            g.reach = ReachUse { day, used: 0 };
        }
        let (_, _, _, limit) = self.standing(&g.record.shop_id, now_ms);
        if let Some(limit) = limit
            && g.reach.used >= limit
        {
            return Err(ChatError::QuotaExhausted {
                limit,
                retry_after_ms: (day + 1) * DAY_MS - now_ms,
            });
        }
        g.reach.used += 1;
        g.last_promotion_ms = now_ms;
        Ok(WriteOp::PutReachUse {
            group_id: g.id(),
            day,
            used: g.reach.used,
        })
    }

    /// Gives back a unit taken by [`Groups::take_reach`].
    pub(crate) fn return_reach(&self, g: &mut GroupState) {
        g.reach.used = g.reach.used.saturating_sub(1);
    }

    /// Writes the feedback counted since the last call (one batch), and
    /// forgets days older than the window. Called by [`Groups::tick`]; it
    /// visits only the shops that heard from buyers since.
    pub(crate) fn flush_feedback(&self, now_ms: u64) {
        let today = utc_day(now_ms);
        let window = self.inner().config.reach.window_days;
        let dirty: Vec<String> = self
            .inner()
            .feedback_dirty
            .iter()
            .map(|e| e.key().clone())
            .collect();
        // (shop, day, positive, negative) of every day to write.
        let mut days = Vec::new();
        for shop_id in dirty {
            // Removed before taking the days: a signal counted in between
            // marks the shop again and is written now or on the next tick.
            self.inner().feedback_dirty.remove(&shop_id);
            let Some(mut shop) = self.inner().feedback.get_mut(&shop_id) else {
                continue;
            };
            for (day, positive, negative) in shop.take_dirty(today, window) {
                days.push((shop_id.clone(), day, positive, negative));
            }
        }
        if days.is_empty() {
            return;
        }
        let ops = days
            .iter()
            .map(|(shop_id, day, positive, negative)| WriteOp::PutFeedback {
                shop_id: shop_id.clone(),
                day: *day,
                positive: *positive,
                negative: *negative,
            })
            .collect();
        let (done, _rx) = durable_channel();
        if let Err(e) = self.inner().store.submit(ops, done) {
            tracing::warn!(error = %e, "buyer feedback not written this tick; trying again next tick");
            for (shop_id, day, _, _) in days {
                if let Some(mut shop) = self.inner().feedback.get_mut(&shop_id) {
                    shop.mark_dirty(day);
                }
                self.inner().feedback_dirty.insert(shop_id, ());
            }
        }
    }

    /// Mutes (or unmutes) the group's promotions for the caller: from now
    /// on they get COMMERCE messages as HIDDEN placeholders, live and in
    /// history, resume and paging. Muting counts against the shop. Members
    /// only.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `Storage`.
    pub async fn mute_promotions(
        &self,
        who: &Identity,
        group_id: u64,
        muted: bool,
        now_ms: u64,
    ) -> Result<v1::FeedbackAck, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::MutePromotions)?;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            g.member(who)?;
            if g.promotions_muted(who.user_id()) == muted {
                None
            } else {
                let (done, rx) = durable_channel();
                self.inner().store.submit(
                    vec![WriteOp::PutPromotionMute {
                        group_id,
                        user_id: who.user_id().to_string(),
                        muted,
                    }],
                    done,
                )?;
                g.set_promotions_muted(who.user_id(), muted);
                if muted && who.role() == Role::Buyer {
                    self.record_signal(&g.record.shop_id, Signal::PromotionsMuted, now_ms);
                }
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            durable(rx).await?;
        }
        Ok(v1::FeedbackAck { group_id })
    }

    /// Reports a message to the shop and the platform. A member's second
    /// report of the same message changes nothing. A buyer's report counts
    /// against the shop.
    ///
    /// # Errors
    /// `InvalidArgument` (no such message yet; a reason empty or over 500
    /// characters), `UnknownGroup`, `NotMember`, `Storage`.
    pub async fn report_message(
        &self,
        who: &Identity,
        req: v1::ReportMessage,
        now_ms: u64,
    ) -> Result<v1::FeedbackAck, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ReportMessage)?;
        let reason = req.reason.trim();
        let chars = reason.chars().count();
        if chars == 0 || chars > REASON_CHARS {
            return Err(ChatError::InvalidArgument(format!(
                "reason must be 1 to {REASON_CHARS} characters"
            )));
        }
        let group_id = req.group_id;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            g.member(who)?;
            if req.seq == 0 || req.seq > g.visible_seq() {
                return Err(ChatError::InvalidArgument(format!(
                    "group {group_id} has no message {}",
                    req.seq
                )));
            }
            let key = (req.seq, who.user_id().to_string());
            if g.reported.contains(&key) {
                None
            } else {
                let (done, rx) = durable_channel();
                self.inner().store.submit(
                    vec![WriteOp::PutReport(ReportRecord {
                        group_id,
                        seq: req.seq,
                        reporter_id: who.user_id().to_string(),
                        reason: reason.to_string(),
                        ts_ms: now_ms,
                    })],
                    done,
                )?;
                g.reported.insert(key);
                if who.role() == Role::Buyer {
                    self.record_signal(&g.record.shop_id, Signal::Reported, now_ms);
                }
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            durable(rx).await?;
        }
        Ok(v1::FeedbackAck { group_id })
    }

    /// The caller opened the product card posted at `seq`: a positive
    /// signal for the shop, counted once per member and card.
    ///
    /// # Errors
    /// `InvalidArgument` (no such message yet), `UnknownGroup`, `NotMember`.
    pub async fn open_card(
        &self,
        who: &Identity,
        group_id: u64,
        seq: u64,
        now_ms: u64,
    ) -> Result<v1::FeedbackAck, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::OpenCard)?;
        let cell = self.cell(group_id).await?;
        let mut g = cell.lock();
        g.member(who)?;
        if seq == 0 || seq > g.visible_seq() {
            return Err(ChatError::InvalidArgument(format!(
                "group {group_id} has no message {seq}"
            )));
        }
        if who.role() == Role::Buyer && g.opened.len() < OPENED_CAP {
            let key = (seq, who.user_id().to_string());
            if !g.opened.contains(&key) {
                g.opened.insert(key);
                self.record_signal(&g.record.shop_id, Signal::CardOpened, now_ms);
            }
        }
        Ok(v1::FeedbackAck { group_id })
    }

    /// Every report of the group's messages, by seq then reporter. Staff of
    /// the group's shop only.
    ///
    /// # Errors
    /// `UnknownGroup`, `ForbiddenRole`, `WrongShop`, `Storage`.
    pub async fn reports(
        &self,
        who: &Identity,
        group_id: u64,
    ) -> Result<Vec<ReportRecord>, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ViewReports)?;
        let cell = self.cell(group_id).await?;
        cell.lock().check_shop(who)?;
        Ok(self.inner().store.load_reports(group_id).await?)
    }

    /// The group's reach quota today. Staff of the group's shop only.
    ///
    /// # Errors
    /// `UnknownGroup`, `ForbiddenRole`, `WrongShop`.
    pub async fn reach_quota(
        &self,
        who: &Identity,
        group_id: u64,
        now_ms: u64,
    ) -> Result<v1::ReachQuota, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ViewReachQuota)?;
        let cell = self.cell(group_id).await?;
        let (shop, used) = {
            let g = cell.lock();
            g.check_shop(who)?;
            let day = utc_day(now_ms);
            let used = if g.reach.day == day { g.reach.used } else { 0 };
            (g.record.shop_id.clone(), used)
        };
        let (positive, negative, score, limit) = self.standing(&shop, now_ms);
        Ok(v1::ReachQuota {
            group_id,
            used,
            limit: limit.unwrap_or(0),
            resets_at_ms: (utc_day(now_ms) + 1) * DAY_MS,
            score_milli: (score * 1000.0).round() as i32,
            positive,
            negative,
            base: self.inner().config.reach.base_per_day,
        })
    }
}
