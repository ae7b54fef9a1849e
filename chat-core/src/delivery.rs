//! Catching a connection up: resume and forward paging.
//!
//! A phone that reconnects (or was told it is out of sync) sends, for each
//! group, the last seq it has. [`Groups::resume`] pushes exactly the
//! messages above it into the connection's outbox, in order, and subscribes
//! the connection so that live messages follow on the same queue. The
//! switch from catch-up to live happens under the group's lock, with the
//! last catch-up frames, so no message can fall between the two or come
//! twice.
//!
//! Catch-up is paced by the phone: [`Outbox::push_when_room`] waits for the
//! writer instead of overflowing, and messages older than the in-memory ring
//! are read from the store in pages. Only the final step, when what is left
//! fits in the outbox, is taken under the lock.

use std::sync::atomic::Ordering;

use qun_proto::v1;

use crate::group::{Encoded, GroupState, Subscriber};
use crate::groups::Groups;
use crate::outbox::Pushed;
use crate::{ChatError, Identity};

/// Messages read from the store per catch-up page.
const CATCH_UP_PAGE: usize = 200;

/// Most cursors in one `Resume`.
pub const MAX_RESUME_CURSORS: usize = 500;

impl Groups {
    /// Catches `sub` up on `group_id` from `last_seq` (the newest seq the
    /// client has) and subscribes it. The pushes carry every message above
    /// `last_seq` in order, then live traffic. When the gap is larger than
    /// `resume_max_gap` nothing old is pushed: the answer says
    /// `gap_too_large`, live messages follow `through_seq`, and the client
    /// pages the gap with [`Groups::fetch_range`].
    ///
    /// If the outbox overflows meanwhile (other groups' traffic), the
    /// subscription ends like every other one of the connection and the
    /// client, told out of sync, resumes again.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `InvalidArgument` when `last_seq` is
    /// beyond the group's newest message, `Storage`.
    pub async fn resume(
        &self,
        who: &Identity,
        group_id: u64,
        last_seq: u64,
        sub: Subscriber,
    ) -> Result<v1::GroupResumed, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ReadHistory)?;
        let cell = self.cell(group_id).await?;
        let max_gap = self.inner().config.resume_max_gap;
        let stats = &self.inner().stats;
        let mut cursor = last_seq;
        // Muting takes effect from the next resume or push; read it once.
        let viewer = cell.lock().viewer(who.user_id());
        {
            let mut g = cell.lock();
            g.member(who)?;
            if last_seq > g.visible_seq() {
                return Err(ChatError::InvalidArgument(format!(
                    "group {group_id} has no message {last_seq}; its newest is {}",
                    g.visible_seq()
                )));
            }
            // Re-subscribing: the old subscription stops now, and catch-up
            // starts from what the client says it has.
            g.unsubscribe(sub.conn);
        }
        stats.resumes.fetch_add(1, Ordering::Relaxed);
        loop {
            // Under the lock: either finish (the rest fits), or take the
            // next batch to push outside it.
            let batch = {
                let mut g = cell.lock();
                g.member(who)?;
                let through = g.visible_seq();
                if through - cursor > max_gap {
                    g.subscribe(sub);
                    stats.resume_gaps_too_large.fetch_add(1, Ordering::Relaxed);
                    return Ok(resumed(&g, who, through, true));
                }
                match g.ring_range(cursor, through) {
                    Some(rest) => {
                        let bytes = rest.iter().map(|e| e.frame_for(&viewer).len()).sum();
                        if sub.outbox.has_room(rest.len(), bytes) {
                            for e in &rest {
                                // A drop here ends `sub` (its epoch is
                                // stale); the client resumes again.
                                let _ = sub.outbox.push_in(sub.epoch, e.frame_for(&viewer).clone());
                            }
                            g.subscribe(sub);
                            stats
                                .catch_up_messages
                                .fetch_add(rest.len() as u64, Ordering::Relaxed);
                            return Ok(resumed(&g, who, through, false));
                        }
                        Batch::Ring(rest)
                    }
                    None => Batch::Store { through },
                }
            };
            let frames = match batch {
                Batch::Ring(rest) => rest,
                Batch::Store { through } => self
                    .inner()
                    .store
                    .messages_after(group_id, cursor, CATCH_UP_PAGE)
                    .await?
                    .into_iter()
                    // Durable but perhaps not yet published: not yet.
                    .filter(|m| m.seq <= through)
                    .map(Encoded::new)
                    .collect(),
            };
            if frames.first().is_none_or(|e| e.message.seq != cursor + 1) {
                return Err(ChatError::Storage(qun_storage::StorageError::Corrupt {
                    keyspace: "messages",
                    detail: format!("group {group_id} has a hole after seq {cursor}"),
                }));
            }
            for e in frames {
                match sub
                    .outbox
                    .push_when_room(sub.epoch, e.frame_for(&viewer).clone())
                    .await
                {
                    Pushed::Queued => {}
                    Pushed::Dropped | Pushed::Stale | Pushed::Closed => {
                        // Out of sync or gone: the client will resume from
                        // what it got.
                        return Ok(resumed(&cell.lock(), who, cursor, false));
                    }
                }
                cursor = e.message.seq;
                stats.catch_up_messages.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A page of messages with seq above `after_seq`, ascending: to fill a
    /// gap forwards. Members only.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `InvalidArgument` for a limit above the
    /// maximum, `Storage`.
    pub async fn fetch_range(
        &self,
        who: &Identity,
        group_id: u64,
        after_seq: u64,
        limit: u32,
    ) -> Result<v1::HistoryPage, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ReadHistory)?;
        let limit = self.page_limit(limit)?;
        let cell = self.cell(group_id).await?;
        let (from_ring, visible, viewer) = {
            let g = cell.lock();
            g.member(who)?;
            let visible = g.visible_seq();
            let through = visible.min(after_seq.saturating_add(limit as u64));
            (
                g.ring_range(after_seq, through),
                visible,
                g.viewer(who.user_id()),
            )
        };
        let messages: Vec<v1::ChatMessage> = match from_ring {
            Some(found) => found.iter().map(|e| e.view(&viewer)).collect(),
            None => self
                .inner()
                .store
                .messages_after(group_id, after_seq, limit)
                .await?
                .into_iter()
                .filter(|m| m.seq <= visible)
                .map(|r| viewer.view_record(r))
                .collect(),
        };
        let newest = messages.last().map_or(after_seq, |m| m.seq);
        Ok(v1::HistoryPage {
            group_id,
            has_more: newest < visible,
            messages,
        })
    }
}

/// The answer for one resumed group.
fn resumed(
    g: &GroupState,
    who: &Identity,
    through_seq: u64,
    gap_too_large: bool,
) -> v1::GroupResumed {
    v1::GroupResumed {
        group_id: g.id(),
        error: 0,
        through_seq,
        gap_too_large,
        last_read_seq: g.read_mark(who.user_id()),
        unread: g.unread(who.user_id()),
    }
}

enum Batch {
    /// Encoded frames copied from the ring (cheap: reference counts).
    Ring(Vec<Encoded>),
    /// Older than the ring: read a page from the store, up to `through`
    /// (the newest visible seq when the page was decided).
    Store { through: u64 },
}
