//! Scheduled pushes: a push (see `push`) that fires later, once or every
//! period ("every Monday at 09:00, the new arrivals").
//!
//! # Exactly once per occurrence
//! A schedule's record holds its next occurrence. When an occurrence fires,
//! the record moved on to the one after is written **in the same atomic
//! batch** as the message it posts (and its quota use). After a crash the
//! store holds either both — the occurrence fired and the schedule moved
//! on — or neither, and the occurrence fires at start-up. In memory, a
//! schedule is changed only under its group's lock, so a cancel and a fire
//! are ordered, and a cancelled schedule never fires.
//!
//! # Occurrences that cannot fire
//! An occurrence that finds the quota used up, its product gone, or no
//! buyer matching its audience is *skipped*: the schedule records why and
//! moves on. One the server was down for is fired late if it is at most
//! [`LATE_GRACE_MS`] late; older ones are skipped as `missed`, so a server
//! down for a week does not post a week of pushes at once. A repeat is a
//! fixed period after the first occurrence (no daylight-saving shifts;
//! China has none).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message as _;
use qun_proto::v1;
use qun_storage::WriteOp;
use qun_storage::records::ScheduleRecord;

use crate::commerce::{Author, staff_in};
use crate::group::GroupCell;
use crate::permissions::{Operation, require};
use crate::push::Push;
use crate::{ChatError, Groups, Identity, Role};

/// The shortest period between occurrences.
pub const MIN_PERIOD_MS: u64 = 60 * 60 * 1000;
/// The furthest ahead a first occurrence, and the longest period.
pub const MAX_AHEAD_MS: u64 = 366 * 24 * 60 * 60 * 1000;
/// How late an occurrence may fire after the server was down.
pub const LATE_GRACE_MS: u64 = 60 * 60 * 1000;
/// Schedules per group.
pub const MAX_SCHEDULES_PER_GROUP: usize = 20;

/// What an occurrence did, as `Schedule.last_outcome` says it.
pub(crate) mod outcome {
    pub(crate) const FIRED: &str = "fired";
    pub(crate) const QUOTA_EXHAUSTED: &str = "quota_exhausted";
    pub(crate) const UNKNOWN_PRODUCT: &str = "unknown_product";
    pub(crate) const NO_AUDIENCE: &str = "no_audience";
    pub(crate) const MISSED: &str = "missed";
    pub(crate) const INVALID: &str = "invalid";
}

/// Every schedule, and when each fires next.
#[derive(Debug, Default)]
pub(crate) struct ScheduleBook {
    inner: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    /// `(group_id, schedule_id) → record`.
    records: BTreeMap<(u64, u64), ScheduleRecord>,
    /// `(next_at_ms, group_id, schedule_id)`.
    due: BTreeSet<(u64, u64, u64)>,
    last_id: u64,
}

impl Book {
    fn put(&mut self, r: ScheduleRecord) {
        if let Some(old) = self.records.get(&(r.group_id, r.schedule_id)) {
            self.due
                .remove(&(old.next_at_ms, old.group_id, old.schedule_id));
        }
        if r.next_at_ms > 0 {
            self.due.insert((r.next_at_ms, r.group_id, r.schedule_id));
        }
        self.last_id = self.last_id.max(r.schedule_id);
        self.records.insert((r.group_id, r.schedule_id), r);
    }

    fn remove(&mut self, group_id: u64, schedule_id: u64) -> Option<ScheduleRecord> {
        let r = self.records.remove(&(group_id, schedule_id))?;
        self.due.remove(&(r.next_at_ms, group_id, schedule_id));
        Some(r)
    }

    fn of_group(&self, group_id: u64) -> Vec<ScheduleRecord> {
        self.records
            .range((group_id, 0)..=(group_id, u64::MAX))
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl ScheduleBook {
    /// From every stored schedule.
    pub(crate) fn restore(records: Vec<ScheduleRecord>) -> Self {
        let mut book = Book::default();
        for r in records {
            book.put(r);
        }
        Self {
            inner: Mutex::new(book),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where a schedule goes after its occurrence at `at` was handled at
/// `now_ms`: the next occurrence after `now_ms` (0: none), and how many
/// occurrences up to `now_ms` were missed (too late to fire). Whether `at`
/// itself fires: it is the latest one due and at most the grace late.
pub(crate) fn advance(at: u64, every_ms: u64, now_ms: u64) -> (u64, u32, bool) {
    if every_ms == 0 {
        let fire = now_ms.saturating_sub(at) <= LATE_GRACE_MS;
        return (0, u32::from(!fire), fire);
    }
    // Occurrences at, at + every, … up to now: the latest may fire.
    let due = (now_ms.saturating_sub(at)) / every_ms + 1;
    let latest = at + (due - 1) * every_ms;
    let fire = now_ms - latest <= LATE_GRACE_MS;
    let missed = due - u64::from(fire);
    (
        latest + every_ms,
        u32::try_from(missed).unwrap_or(u32::MAX),
        fire,
    )
}

fn wire(r: &ScheduleRecord) -> v1::Schedule {
    v1::Schedule {
        schedule_id: r.schedule_id,
        group_id: r.group_id,
        content: v1::PushContent::decode(&r.content[..]).ok(),
        first_at_ms: r.first_at_ms,
        every_ms: r.every_ms,
        next_at_ms: r.next_at_ms,
        fired: r.fired,
        skipped: r.skipped,
        last_seq: r.last_seq,
        last_outcome: r.last_outcome.clone(),
        created_by: r.created_by.clone(),
    }
}

fn answer(group_id: u64, records: &[ScheduleRecord], created: u64) -> v1::Schedules {
    v1::Schedules {
        group_id,
        schedules: records.iter().map(wire).collect(),
        created,
    }
}

/// What one [`Groups::fire_schedules`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleReport {
    /// Occurrences that posted their push.
    pub fired: usize,
    /// Occurrences skipped (quota, product, audience, missed).
    pub skipped: usize,
}

impl Groups {
    /// Schedules a push. Staff of the group's shop; at most
    /// [`MAX_SCHEDULES_PER_GROUP`] per group. Answered with the group's
    /// schedules once the schedule is durable.
    ///
    /// # Errors
    /// `ForbiddenRole`, `UnknownGroup`, `WrongShop`, `InvalidArgument` (the
    /// content, a first occurrence not in the future or more than a year
    /// ahead, a period under an hour or over a year, too many schedules),
    /// `UnknownProduct`, `Storage`.
    pub async fn schedule_push(
        &self,
        who: &Identity,
        req: v1::SchedulePush,
        now_ms: u64,
    ) -> Result<v1::Schedules, ChatError> {
        require(who, Operation::ManageSchedules)?;
        let push = Push::parse(req.content.as_ref())?;
        if req.first_at_ms <= now_ms || req.first_at_ms - now_ms > MAX_AHEAD_MS {
            return Err(ChatError::InvalidArgument(
                "first_at_ms must be in the future, at most a year ahead".into(),
            ));
        }
        if req.every_ms != 0 && !(MIN_PERIOD_MS..=MAX_AHEAD_MS).contains(&req.every_ms) {
            return Err(ChatError::InvalidArgument(
                "every_ms is 0 (once) or from one hour to one year".into(),
            ));
        }
        let cell = self.cell(req.group_id).await?;
        let shop = {
            let g = cell.lock();
            staff_in(&g, who, "schedule pushes")?;
            g.record.shop_id.clone()
        };
        if let crate::push::PushKind::Card(product_id) = &push.kind {
            let key = self.load_product_slot(&shop, product_id).await?;
            if self
                .commerce()
                .products
                .get(&key)
                .is_none_or(|s| s.product.is_none())
            {
                return Err(ChatError::UnknownProduct(product_id.clone()));
            }
        }
        let (rx, created) = {
            let g = cell.lock();
            g.refuse_if_failed()?;
            let book = &self.inner().schedules;
            let mut b = book.lock();
            // Finished one-offs are kept to show how they went, until
            // their room is needed.
            let mine = b.of_group(req.group_id);
            let active = mine.iter().filter(|r| r.next_at_ms > 0).count();
            if active >= MAX_SCHEDULES_PER_GROUP {
                return Err(ChatError::InvalidArgument(format!(
                    "a group has at most {MAX_SCHEDULES_PER_GROUP} schedules; cancel one first"
                )));
            }
            let prune: Vec<u64> = mine
                .iter()
                .filter(|r| r.next_at_ms == 0)
                .take((mine.len() + 1).saturating_sub(MAX_SCHEDULES_PER_GROUP))
                .map(|r| r.schedule_id)
                .collect();
            let mut ops: Vec<WriteOp> = prune
                .iter()
                .map(|&schedule_id| WriteOp::RemoveSchedule {
                    group_id: req.group_id,
                    schedule_id,
                })
                .collect();
            // Ids grow with time and past every stored one.
            let id = (now_ms.saturating_mul(1000)).max(b.last_id + 1);
            let record = ScheduleRecord {
                group_id: req.group_id,
                schedule_id: id,
                content: push.encode(),
                first_at_ms: req.first_at_ms,
                every_ms: req.every_ms,
                next_at_ms: req.first_at_ms,
                created_by: who.user_id().to_string(),
                created_by_name: who.display_name().to_string(),
                created_by_role: who.role().to_u32(),
                ..Default::default()
            };
            ops.push(WriteOp::PutSchedule(record.clone()));
            let (done, rx) = crate::groups::durable_channel();
            self.inner().store.submit(ops, done)?;
            for schedule_id in prune {
                b.remove(req.group_id, schedule_id);
            }
            b.put(record);
            (rx, id)
        };
        crate::groups::durable(rx).await?;
        let records = self.inner().schedules.lock().of_group(req.group_id);
        Ok(answer(req.group_id, &records, created))
    }

    /// Cancels a schedule; it never fires again. Staff of the group's shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `UnknownGroup`, `WrongShop`, `UnknownObject` (no
    /// such schedule in this group), `Storage`.
    pub async fn cancel_schedule(
        &self,
        who: &Identity,
        group_id: u64,
        schedule_id: u64,
    ) -> Result<v1::Schedules, ChatError> {
        require(who, Operation::ManageSchedules)?;
        let cell = self.cell(group_id).await?;
        let rx = {
            let g = cell.lock();
            staff_in(&g, who, "schedule pushes")?;
            g.refuse_if_failed()?;
            let mut b = self.inner().schedules.lock();
            if !b.records.contains_key(&(group_id, schedule_id)) {
                return Err(ChatError::UnknownObject {
                    group_id,
                    object_id: schedule_id,
                });
            }
            let (done, rx) = crate::groups::durable_channel();
            self.inner().store.submit(
                vec![WriteOp::RemoveSchedule {
                    group_id,
                    schedule_id,
                }],
                done,
            )?;
            b.remove(group_id, schedule_id);
            rx
        };
        crate::groups::durable(rx).await?;
        let records = self.inner().schedules.lock().of_group(group_id);
        Ok(answer(group_id, &records, 0))
    }

    /// A group's schedules, oldest first. Staff of the group's shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `UnknownGroup`, `WrongShop`, `Storage`.
    pub async fn list_schedules(
        &self,
        who: &Identity,
        group_id: u64,
    ) -> Result<v1::Schedules, ChatError> {
        require(who, Operation::ManageSchedules)?;
        let cell = self.cell(group_id).await?;
        staff_in(&cell.lock(), who, "schedule pushes")?;
        let records = self.inner().schedules.lock().of_group(group_id);
        Ok(answer(group_id, &records, 0))
    }

    /// Fires every occurrence due by `now_ms`. Called by [`Groups::tick`];
    /// an occurrence that fails for a reason that may pass (storage) stays
    /// due and is tried on the next tick.
    pub async fn fire_schedules(&self, now_ms: u64) -> ScheduleReport {
        let mut report = ScheduleReport::default();
        let due: Vec<(u64, u64, u64)> = {
            let b = self.inner().schedules.lock();
            b.due
                .range(..=(now_ms, u64::MAX, u64::MAX))
                .copied()
                .collect()
        };
        for (at, group_id, schedule_id) in due {
            match self.fire_one(group_id, schedule_id, at, now_ms).await {
                Ok(Some(true)) => report.fired += 1,
                Ok(Some(false)) => report.skipped += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(group_id, schedule_id, error = %e, "scheduled push not fired; will retry");
                }
            }
        }
        report
    }

    /// Handles the occurrence of a schedule at `at`: `Some(true)` fired,
    /// `Some(false)` skipped, `None` when the schedule was cancelled or
    /// moved on meanwhile.
    async fn fire_one(
        &self,
        group_id: u64,
        schedule_id: u64,
        at: u64,
        now_ms: u64,
    ) -> Result<Option<bool>, ChatError> {
        let cell = self.cell(group_id).await?;
        let Some(record) = self.current(group_id, schedule_id, at) else {
            return Ok(None);
        };
        let (next_at, missed, fire) = advance(at, record.every_ms, now_ms);
        let moved = |outcome: &str, fired: bool, seq: u64| ScheduleRecord {
            next_at_ms: next_at,
            fired: record.fired + u32::from(fired),
            skipped: record
                .skipped
                .saturating_add(missed)
                .saturating_add(u32::from(!fired && fire)),
            last_seq: if fired { seq } else { record.last_seq },
            last_outcome: outcome.to_string(),
            ..record.clone()
        };
        let skip = |outcome: &str| -> Result<Option<bool>, ChatError> {
            let r = moved(outcome, false, 0);
            self.move_schedule(&cell, r, at)
                .map(|moved| moved.then_some(false))
        };
        if !fire {
            return skip(outcome::MISSED);
        }
        let push = match v1::PushContent::decode(&record.content[..]) {
            // Checked when scheduled; the rules (the tag pool) may have
            // changed since: skipped, not retried for ever.
            Ok(c) => match Push::parse(Some(&c)) {
                Ok(p) => p,
                Err(_) => return skip(outcome::INVALID),
            },
            Err(e) => {
                return Err(ChatError::Storage(qun_storage::StorageError::corrupt(
                    "schedules",
                    e,
                )));
            }
        };
        let author = Author {
            id: &record.created_by,
            name: &record.created_by_name,
            role: Role::from_u32(record.created_by_role).unwrap_or(Role::Agent),
        };
        let book = &self.inner().schedules;
        let posted = self
            .post_push(
                &cell,
                author,
                &push,
                |seq| {
                    // Under the group's lock: still this occurrence?
                    if self.current(group_id, schedule_id, at).is_none() {
                        return Err(ChatError::UnknownObject {
                            group_id,
                            object_id: schedule_id,
                        });
                    }
                    let r = moved(outcome::FIRED, true, seq);
                    Ok((vec![WriteOp::PutSchedule(r.clone())], r))
                },
                // Moved on in memory only once its batch is queued.
                |r| book.lock().put(r),
                now_ms,
            )
            .await;
        match posted {
            Ok(p) => {
                crate::groups::durable(p.rx).await?;
                Ok(Some(true))
            }
            Err(ChatError::UnknownObject { .. }) => Ok(None),
            Err(ChatError::QuotaExhausted { .. }) => skip(outcome::QUOTA_EXHAUSTED),
            Err(ChatError::UnknownProduct(_)) => skip(outcome::UNKNOWN_PRODUCT),
            Err(ChatError::NoAudience { .. }) => skip(outcome::NO_AUDIENCE),
            Err(e) => Err(e),
        }
    }

    /// The schedule if it still waits for its occurrence at `at`.
    fn current(&self, group_id: u64, schedule_id: u64, at: u64) -> Option<ScheduleRecord> {
        let b = self.inner().schedules.lock();
        b.records
            .get(&(group_id, schedule_id))
            .filter(|r| r.next_at_ms == at)
            .cloned()
    }

    /// Under the group's lock, writes a schedule moved on without posting;
    /// `false` when it was cancelled or moved on meanwhile.
    fn move_schedule(
        &self,
        cell: &Arc<GroupCell>,
        record: ScheduleRecord,
        at: u64,
    ) -> Result<bool, ChatError> {
        let g = cell.lock();
        g.refuse_if_failed()?;
        if self
            .current(record.group_id, record.schedule_id, at)
            .is_none()
        {
            return Ok(false);
        }
        let (done, _rx) = crate::groups::durable_channel();
        self.inner()
            .store
            .submit(vec![WriteOp::PutSchedule(record.clone())], done)?;
        self.inner().schedules.lock().put(record);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 60 * 60 * 1000;
    const WEEK: u64 = 7 * 24 * H;

    #[test]
    fn an_occurrence_on_time_fires_and_the_next_is_a_period_later() {
        assert_eq!(advance(1_000, WEEK, 1_000), (1_000 + WEEK, 0, true));
        assert_eq!(advance(1_000, WEEK, 1_000 + H), (1_000 + WEEK, 0, true));
        assert_eq!(advance(1_000, 0, 1_500), (0, 0, true), "a one-off ends");
    }

    #[test]
    fn occurrences_the_server_was_down_for_are_missed_but_the_latest_fires_if_recent() {
        // Down for 3 weeks and 30 minutes: 3 missed, the 4th fires late.
        let now = 1_000 + 3 * WEEK + H / 2;
        assert_eq!(advance(1_000, WEEK, now), (1_000 + 4 * WEEK, 3, true));
        // Down for 2 weeks and a day: all 3 due are missed.
        let now = 1_000 + 2 * WEEK + 24 * H;
        assert_eq!(advance(1_000, WEEK, now), (1_000 + 3 * WEEK, 3, false));
        assert_eq!(advance(1_000, 0, 1_000 + 2 * H), (0, 1, false));
    }
}
