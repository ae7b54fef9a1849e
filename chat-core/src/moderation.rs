//! Moderation: muting and removing buyers, muting every buyer, and recall
//! (撤回).
//!
//! Staff of the group's shop moderate its buyers (never other staff). A
//! member recalls their own text message within [`RECALL_WINDOW_MS`];
//! staff recall any text message of their shop's groups. A recall is a
//! message of its own on the group's stream (kind RECALL, naming the seq),
//! written in the same batch as the original's rewrite, so live clients,
//! history, resume and paging all show the original as recalled. Replies
//! that quote it keep who they answered but lose the quote's text, in the
//! store (found through its reply index) and in the group's ring.

use qun_proto::v1::{self, server_frame::Body};
use qun_storage::WriteOp;
use qun_storage::records::{MemberFlagsRecord, MessageRecord};

use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::group::{GroupCell, GroupState, KIND_RECALL, KIND_TEXT, scrubbed};
use crate::groups::{Groups, durable, durable_channel};
use crate::permissions::{Operation, require};
use crate::reach::DAY_MS;
use crate::{ChatError, Identity, Role};

/// Replies rewritten per submission when a recall scrubs their quotes:
/// a message quoted thousands of times is rewritten in batches that stay
/// well within a cluster's batch limit.
const SCRUB_BATCH: usize = 256;

/// Replies read at once while a recall looks for their quotes.
const READS_IN_FLIGHT: usize = 16;

/// How long after sending a member may recall their own message.
pub const RECALL_WINDOW_MS: u64 = 2 * 60 * 1000;

/// Longest mute.
const MAX_MUTE_MS: u64 = 30 * DAY_MS;

/// Longest ban after a removal.
const MAX_BAN_MS: u64 = 365 * DAY_MS;

/// Staff of the group's shop (the role was checked by `require`), or
/// `WrongShop`.
fn staff_of(g: &GroupState, who: &Identity) -> Result<(), ChatError> {
    g.check_shop(who)
}

/// A buyer who is a member: the target of a mute or a removal.
fn buyer_member(g: &GroupState, user_id: &str) -> Result<(), ChatError> {
    match g.members.get(user_id) {
        None => Err(ChatError::InvalidArgument(format!(
            "{user_id:?} is not a member of group {}",
            g.id()
        ))),
        Some(m) if m.role != Role::Buyer => Err(ChatError::InvalidArgument(
            "only buyers can be muted or removed".into(),
        )),
        Some(_) => Ok(()),
    }
}

fn moderated(group_id: u64, seq: u64) -> v1::Moderated {
    v1::Moderated { group_id, seq }
}

impl Groups {
    /// Mutes a buyer for `duration_ms` (1 s to 30 days), or unmutes them
    /// with 0. Staff of the group's shop only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (not a buyer member,
    /// a duration out of range), `UnknownGroup`, `Storage`.
    pub async fn mute_member(
        &self,
        who: &Identity,
        req: v1::MuteMember,
        now_ms: u64,
    ) -> Result<v1::Moderated, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::MuteMember)?;
        if req.duration_ms != 0 && !(1_000..=MAX_MUTE_MS).contains(&req.duration_ms) {
            return Err(ChatError::InvalidArgument(
                "duration_ms must be 0 (unmute) or 1000 to 30 days".into(),
            ));
        }
        let group_id = req.group_id;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            staff_of(&g, who)?;
            buyer_member(&g, &req.user_id)?;
            let mut flags = g.flags.get(&req.user_id).copied().unwrap_or_default();
            flags.muted_until_ms = if req.duration_ms == 0 {
                0
            } else {
                now_ms + req.duration_ms
            };
            let rx = self.submit_flags(group_id, &req.user_id, flags)?;
            g.flags.insert(req.user_id.clone(), flags);
            rx
        };
        durable(rx).await?;
        Ok(moderated(group_id, 0))
    }

    /// Mutes (or unmutes) every buyer of the group: only staff post
    /// meanwhile. Staff of the group's shop only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `UnknownGroup`, `Storage`.
    pub async fn mute_all_buyers(
        &self,
        who: &Identity,
        group_id: u64,
        muted: bool,
    ) -> Result<v1::Moderated, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::MuteAllBuyers)?;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            staff_of(&g, who)?;
            let mut record = g.record.clone();
            record.buyers_muted = muted;
            let (done, rx) = durable_channel();
            self.inner()
                .store
                .submit(vec![WriteOp::PutGroup(record.clone())], done)?;
            g.record = record;
            rx
        };
        durable(rx).await?;
        Ok(moderated(group_id, 0))
    }

    /// Removes a buyer: their membership, read mark and subscriptions end,
    /// and each of their connections subscribed here gets `Left`. With
    /// `ban_ms` (up to 365 days) they cannot join again until it passes.
    /// Staff of the group's shop only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop`, `InvalidArgument` (not a buyer member,
    /// a ban too long), `UnknownGroup`, `Storage`.
    pub async fn remove_member(
        &self,
        who: &Identity,
        req: v1::RemoveMember,
        now_ms: u64,
    ) -> Result<v1::Moderated, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::RemoveMember)?;
        if req.ban_ms > MAX_BAN_MS {
            return Err(ChatError::InvalidArgument(
                "ban_ms must be at most 365 days".into(),
            ));
        }
        let group_id = req.group_id;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            staff_of(&g, who)?;
            buyer_member(&g, &req.user_id)?;
            let mut ops = vec![WriteOp::RemoveMember {
                group_id,
                user_id: req.user_id.clone(),
            }];
            let mut flags = g.flags.get(&req.user_id).copied().unwrap_or_default();
            if req.ban_ms > 0 {
                flags.banned_until_ms = now_ms + req.ban_ms;
                ops.push(WriteOp::PutMemberFlags {
                    group_id,
                    user_id: req.user_id.clone(),
                    flags,
                });
            }
            let (done, rx) = durable_channel();
            self.inner().store.submit(ops, done)?;
            let left = qun_proto::encode_server_frame(&v1::ServerFrame {
                request_id: 0,
                body: Some(Body::Left(v1::Left { group_id })),
            });
            g.push_to_user(&req.user_id, &left);
            g.remove_member(&req.user_id);
            if req.ban_ms > 0 {
                g.flags.insert(req.user_id.clone(), flags);
            }
            rx
        };
        durable(rx).await?;
        tracing::info!(group_id, user = %req.user_id, by = who.user_id(), ban_ms = req.ban_ms, "member removed");
        Ok(moderated(group_id, 0))
    }

    /// Recalls (撤回) a text message: its author within
    /// [`RECALL_WINDOW_MS`] of sending, or staff of the shop at any time.
    /// Posts a RECALL message naming it, in one batch with the original's
    /// rewrite; returns the RECALL message's seq. The replies that quote it
    /// lose the quote's text first (`Groups::scrub_quotes_of`), and replies
    /// sequenced while the recall runs are made without it.
    ///
    /// # Errors
    /// `InvalidArgument` (no such visible message, not a text message,
    /// already recalled, the window passed), `ForbiddenRole` (a buyer
    /// recalling another's message), `WrongShop`, `NotMember` (a buyer who
    /// is not a member), `UnknownGroup`, `Storage`.
    pub async fn recall(
        &self,
        who: &Identity,
        group_id: u64,
        seq: u64,
        now_ms: u64,
    ) -> Result<v1::Moderated, ChatError> {
        // The least a recall needs; recalling another's is checked below.
        require(who, Operation::RecallOwn)?;
        let invalid = |m: String| Err(ChatError::InvalidArgument(m));
        let cell = self.cell(group_id).await?;
        {
            let g = cell.lock();
            // Staff of the shop moderate without being members (the
            // merchant API acts as the owner).
            g.check_member_or_staff(who)?;
            if seq == 0 || seq > g.visible_seq() {
                return invalid(format!("group {group_id} has no message {seq} yet"));
            }
        }
        // Visible means durable: the stored record is the whole message
        // (recalls are rare; one point read, outside the lock).
        let original = match self
            .inner()
            .store
            .messages_after(group_id, seq - 1, 1)
            .await?
            .pop()
        {
            Some(r) if r.seq == seq => r,
            _ => return invalid(format!("group {group_id} has no message {seq}")),
        };
        if original.kind != KIND_TEXT {
            return invalid("only text messages can be recalled".into());
        }
        let own = original.sender_id == who.user_id();
        require(
            who,
            if own {
                Operation::RecallOwn
            } else {
                Operation::RecallAny
            },
        )?;
        // Staff may recall any message at any time; a buyer only their own,
        // within the window.
        if !who.role().is_staff() && now_ms.saturating_sub(original.ts_ms) > RECALL_WINDOW_MS {
            return invalid("messages can be recalled within 2 minutes of sending".into());
        }
        {
            let mut g = cell.lock();
            g.refuse_if_failed()?;
            // From here on a reply to it is sequenced without the quote's
            // text (`post`), so none is missed while its replies are found.
            if original.recalled || !g.recalled.insert(seq) {
                return invalid(format!("message {seq} was already recalled"));
            }
        }
        let undo = |e: ChatError| {
            cell.lock().recalled.remove(&seq);
            Err(e)
        };
        let scrubbed = match self.scrub_quotes_of(&cell, group_id, seq).await {
            Ok(n) => n,
            Err(e) => return undo(e),
        };
        let (seq_posted, rx) = {
            let mut g = cell.lock();
            if let Err(e) = g.refuse_if_failed() {
                drop(g);
                return undo(e);
            }
            let rewrite = MessageRecord {
                text: String::new(),
                quote: None,
                body: Vec::new(),
                recalled: true,
                ..original
            };
            let mut record = g.next_event(
                who.user_id(),
                who.display_name(),
                who.role(),
                String::new(),
                Vec::new(),
                now_ms,
            );
            record.kind = KIND_RECALL;
            record.recalls = seq;
            let posted = record.seq;
            let mut extra = vec![WriteOp::RewriteMessage(rewrite)];
            // A recalled message does not stay pinned.
            let pinned_before = g.record.pins.clone();
            if g.record.pins.iter().any(|p| p.message_seq == seq) {
                g.record.pins.retain(|p| p.message_seq != seq);
                extra.push(WriteOp::PutGroup(g.record.clone()));
            }
            match self.submit_sequenced(&cell, &mut g, record, extra) {
                Ok(rx) => (posted, rx),
                Err(e) => {
                    g.recalled.remove(&seq);
                    g.record.pins = pinned_before;
                    return Err(e.into());
                }
            }
        };
        durable(rx).await?;
        tracing::info!(
            group_id,
            seq,
            by = who.user_id(),
            replies_scrubbed = scrubbed,
            "message recalled"
        );
        Ok(moderated(group_id, seq_posted))
    }

    /// Rewrites every stored reply that quotes message `seq` without the
    /// quote's text, [`SCRUB_BATCH`] replies per submission, and waits until
    /// they are durable. Called once `seq` is in the group's `recalled`
    /// set, so every reply sequenced before that is in the store's reply
    /// index once the store is flushed, and every one after it was made
    /// without the text. A reply recalled itself meanwhile is left to its
    /// own recall, which takes its quote away whole. Returns how many
    /// replies it rewrote.
    ///
    /// # Errors
    /// `Storage`: some replies may then be rewritten already; a retry of
    /// the recall does the rest.
    async fn scrub_quotes_of(
        &self,
        cell: &GroupCell,
        group_id: u64,
        seq: u64,
    ) -> Result<usize, ChatError> {
        let store = &self.inner().store;
        store.flush().await?;
        let mut rewritten = 0;
        let replies = store.replies_to(group_id, seq).await?;
        for chunk in replies.chunks(SCRUB_BATCH) {
            let read: Vec<Option<MessageRecord>> = futures_util::stream::iter(chunk.to_vec())
                .map(|reply| {
                    let store = store.clone();
                    async move {
                        let found = store.messages_after(group_id, reply - 1, 1).await?;
                        Ok::<_, ChatError>(found.into_iter().find(|m| m.seq == reply))
                    }
                })
                .buffered(READS_IN_FLIGHT)
                .try_collect()
                .await?;
            let ops: Vec<WriteOp> = {
                let g = cell.lock();
                read.into_iter()
                    .flatten()
                    .filter(|m| !g.recalled.contains(&m.seq))
                    .filter_map(|mut m| {
                        let q = m.quote.as_mut().filter(|q| q.seq == seq && !q.recalled)?;
                        scrubbed(q);
                        Some(WriteOp::RewriteMessage(m))
                    })
                    .collect()
            };
            if !ops.is_empty() {
                rewritten += ops.len();
                let (done, rx) = durable_channel();
                store.submit(ops, done)?;
                durable(rx).await?;
            }
        }
        Ok(rewritten)
    }

    fn submit_flags(
        &self,
        group_id: u64,
        user_id: &str,
        flags: MemberFlagsRecord,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), qun_storage::StorageError>>, ChatError>
    {
        let (done, rx) = durable_channel();
        self.inner().store.submit(
            vec![WriteOp::PutMemberFlags {
                group_id,
                user_id: user_id.to_string(),
                flags,
            }],
            done,
        )?;
        Ok(rx)
    }
}
