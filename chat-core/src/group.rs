//! One group's state and the one place its seqs are assigned.
//!
//! A [`GroupCell`] holds a group behind a short, synchronous critical section.
//! Everything that must be atomic for a group happens inside it: admitting a
//! member against the cap, assigning the next seq and queuing the message's
//! write in the same order, and publishing durable messages to subscribers.
//! No lock is ever held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use qun_proto::v1::{self, server_frame::Body};
use qun_storage::records::{GroupRecord, MemberRecord, MessageRecord, QuoteRecord};

use crate::outbox::{Outbox, Pushed};
use crate::{ChatError, CoreStats, Identity, Role};

/// Identifies one connection (one device) for subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A connection that receives a group's messages.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The connection.
    pub conn: ConnId,
    /// Its user (so that leaving unsubscribes every device).
    pub user_id: String,
    /// Where its pushes go.
    pub outbox: Outbox,
}

/// The kinds of message, as stored.
pub(crate) const KIND_TEXT: u32 = v1::MessageKind::Text as u32;

/// Longest quoted snippet kept with a reply, in characters.
const QUOTE_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) role: Role,
}

/// A message that has a seq and is being written, not yet visible.
#[derive(Debug)]
struct Pending {
    seq: u64,
    message: Arc<v1::ChatMessage>,
    frame: Bytes,
}

/// A group held in memory.
#[derive(Debug)]
pub(crate) struct GroupCell {
    state: Mutex<GroupState>,
}

#[derive(Debug)]
pub(crate) struct GroupState {
    pub(crate) record: GroupRecord,
    pub(crate) members: HashMap<String, Member>,
    /// The seq the next message gets.
    next_seq: u64,
    /// The highest seq published to subscribers.
    visible_seq: u64,
    /// Sequenced, submitted to the store, not yet durable; ascending.
    pending: VecDeque<Pending>,
    /// The newest visible messages; ascending; at most `ring_capacity`.
    recent: VecDeque<Arc<v1::ChatMessage>>,
    ring_capacity: usize,
    subscribers: Vec<Subscriber>,
    /// A write of this group failed; it refuses writes until restart.
    failed: bool,
}

impl GroupCell {
    pub(crate) fn new(
        record: GroupRecord,
        members: impl IntoIterator<Item = MemberRecord>,
        recent: Vec<MessageRecord>,
        last_seq: u64,
        ring_capacity: usize,
    ) -> Self {
        let members = members
            .into_iter()
            .map(|m| {
                let role = Role::from_u32(m.role).unwrap_or(Role::Buyer);
                (m.user_id, Member { role })
            })
            .collect();
        let mut ring: VecDeque<_> = recent.into_iter().map(|r| Arc::new(to_wire(r))).collect();
        while ring.len() > ring_capacity {
            ring.pop_front();
        }
        Self {
            state: Mutex::new(GroupState {
                record,
                members,
                next_seq: last_seq + 1,
                visible_seq: last_seq,
                pending: VecDeque::new(),
                recent: ring,
                ring_capacity,
                subscribers: Vec::new(),
                failed: false,
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl GroupState {
    pub(crate) fn id(&self) -> u64 {
        self.record.group_id
    }

    pub(crate) fn info(&self) -> v1::GroupInfo {
        v1::GroupInfo {
            group_id: self.record.group_id,
            shop_id: self.record.shop_id.clone(),
            name: self.record.name.clone(),
            max_members: self.record.max_members,
            member_count: u32::try_from(self.members.len()).unwrap_or(u32::MAX),
            last_seq: self.visible_seq,
            created_at_ms: self.record.created_at_ms,
            created_by: self.record.created_by.clone(),
        }
    }

    pub(crate) fn visible_seq(&self) -> u64 {
        self.visible_seq
    }

    /// The caller's membership, or `NotMember`.
    pub(crate) fn member(&self, who: &Identity) -> Result<&Member, ChatError> {
        self.members
            .get(who.user_id())
            .ok_or(ChatError::NotMember(self.id()))
    }

    /// Staff may only act in their own shop's groups.
    pub(crate) fn check_shop(&self, who: &Identity) -> Result<(), ChatError> {
        if who.role().is_staff() && who.shop_id() != Some(self.record.shop_id.as_str()) {
            return Err(ChatError::WrongShop);
        }
        Ok(())
    }

    /// Admits `who` if the rules allow. Returns the record to persist, or
    /// `None` when already a member.
    pub(crate) fn admit(
        &mut self,
        who: &Identity,
        now_ms: u64,
    ) -> Result<Option<MemberRecord>, ChatError> {
        if self.members.contains_key(who.user_id()) {
            return Ok(None);
        }
        match who.role() {
            Role::Buyer | Role::Agent | Role::Owner => self.check_shop(who)?,
            Role::System => {
                return Err(ChatError::ForbiddenRole {
                    role: "system",
                    action: "join a group",
                });
            }
        }
        if self.members.len() >= self.record.max_members as usize {
            return Err(ChatError::GroupFull {
                group_id: self.id(),
                max_members: self.record.max_members,
            });
        }
        self.members
            .insert(who.user_id().to_string(), Member { role: who.role() });
        Ok(Some(MemberRecord {
            group_id: self.id(),
            user_id: who.user_id().to_string(),
            display_name: who.display_name().to_string(),
            role: who.role().to_u32(),
            joined_at_ms: now_ms,
        }))
    }

    /// Undoes [`GroupState::admit`] when its write could not be queued.
    pub(crate) fn unadmit(&mut self, user_id: &str) {
        self.members.remove(user_id);
    }

    /// Removes a member and every one of their connections' subscriptions.
    pub(crate) fn remove_member(&mut self, user_id: &str) -> bool {
        self.subscribers.retain(|s| s.user_id != user_id);
        self.members.remove(user_id).is_some()
    }

    /// Adds a subscription; a connection is subscribed at most once.
    pub(crate) fn subscribe(&mut self, sub: Subscriber) {
        if !self.subscribers.iter().any(|s| s.conn == sub.conn) {
            self.subscribers.push(sub);
        }
    }

    pub(crate) fn unsubscribe(&mut self, conn: ConnId) {
        if let Some(i) = self.subscribers.iter().position(|s| s.conn == conn) {
            self.subscribers.swap_remove(i);
        }
    }

    pub(crate) fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// The newest `n` visible messages if the ring holds them all.
    pub(crate) fn recent_tail(&self, n: usize) -> Option<Vec<v1::ChatMessage>> {
        self.recent_before(self.visible_seq + 1, n)
    }

    /// Up to `n` visible messages below `before`, if the ring can answer
    /// without missing any.
    pub(crate) fn recent_before(&self, before: u64, n: usize) -> Option<Vec<v1::ChatMessage>> {
        let before = before.min(self.visible_seq + 1);
        let want_from = before.saturating_sub(n as u64).max(1);
        if before <= 1 {
            return Some(Vec::new());
        }
        let ring_first = self.recent.front().map_or(self.visible_seq + 1, |m| m.seq);
        if ring_first > want_from {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|m| m.seq >= want_from && m.seq < before)
                .map(|m| (**m).clone())
                .collect(),
        )
    }

    /// A quote of message `seq` if it is in memory.
    pub(crate) fn quote_in_memory(&self, seq: u64) -> Option<QuoteRecord> {
        let find = |m: &Arc<v1::ChatMessage>| (m.seq == seq).then(|| quote_of(m));
        self.recent
            .iter()
            .rev()
            .find_map(find)
            .or_else(|| self.pending.iter().find_map(|p| find(&p.message)))
    }

    /// Whether `seq` names a message of this group (sequenced or visible).
    pub(crate) fn has_seq(&self, seq: u64) -> bool {
        seq >= 1 && seq < self.next_seq
    }

    pub(crate) fn refuse_if_failed(&self) -> Result<(), ChatError> {
        if self.failed {
            return Err(ChatError::Storage(qun_storage::StorageError::Poisoned));
        }
        Ok(())
    }

    /// Builds the next message. The caller must queue its write and then
    /// call [`GroupState::commit_sequenced`]; both happen under this lock.
    pub(crate) fn next_message(
        &self,
        who: &Identity,
        text: String,
        reply_to: u64,
        quote: Option<QuoteRecord>,
        client_msg_id: String,
        now_ms: u64,
    ) -> MessageRecord {
        MessageRecord {
            group_id: self.id(),
            seq: self.next_seq,
            sender_id: who.user_id().to_string(),
            sender_name: who.display_name().to_string(),
            sender_role: who.role().to_u32(),
            kind: KIND_TEXT,
            text,
            reply_to,
            ts_ms: now_ms,
            client_msg_id,
            quote,
        }
    }

    /// Records that `record`'s write is queued: its seq is taken, and its
    /// frame is encoded once, ready for publishing.
    pub(crate) fn commit_sequenced(&mut self, record: MessageRecord) {
        debug_assert_eq!(record.seq, self.next_seq);
        let seq = record.seq;
        // Encode the push frame once, then take the message back out of it
        // for the ring: no copy of the message on the hot path.
        let mut envelope = v1::ServerFrame {
            request_id: 0,
            body: Some(Body::Message(to_wire(record))),
        };
        let frame = qun_proto::encode_server_frame(&envelope);
        let Some(Body::Message(message)) = envelope.body.take() else {
            unreachable!("the envelope was built with a message body")
        };
        self.next_seq += 1;
        self.pending.push_back(Pending {
            seq,
            message: Arc::new(message),
            frame,
        });
    }

    /// The store reported `seq` durable, so it and everything before it is:
    /// fan out every pending message up to it, in seq order.
    pub(crate) fn publish_through(&mut self, seq: u64, stats: &CoreStats) {
        let mut queued = 0u64;
        let mut dropped = 0u64;
        while self.pending.front().is_some_and(|p| p.seq <= seq) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let mut closed = false;
            for sub in &self.subscribers {
                match sub.outbox.push(p.frame.clone()) {
                    Pushed::Queued => queued += 1,
                    Pushed::Dropped => dropped += 1,
                    Pushed::Closed => closed = true,
                }
            }
            if closed {
                self.subscribers.retain(|s| !s.outbox.is_closed());
            }
            self.visible_seq = p.seq;
            self.recent.push_back(p.message);
            if self.recent.len() > self.ring_capacity {
                self.recent.pop_front();
            }
        }
        stats.deliveries_queued.fetch_add(queued, Ordering::Relaxed);
        stats
            .deliveries_dropped
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// A write failed: nothing pending becomes visible, and the group
    /// refuses further writes.
    pub(crate) fn fail(&mut self) {
        self.failed = true;
        self.pending.clear();
    }
}

fn quote_of(m: &v1::ChatMessage) -> QuoteRecord {
    quote(m.seq, &m.sender_id, &m.sender_name, &m.text)
}

fn quote(seq: u64, sender_id: &str, sender_name: &str, text: &str) -> QuoteRecord {
    QuoteRecord {
        seq,
        sender_id: sender_id.to_string(),
        sender_name: sender_name.to_string(),
        text: text.chars().take(QUOTE_CHARS).collect(),
    }
}

/// A quote of a stored message.
pub(crate) fn quote_of_record(m: &MessageRecord) -> QuoteRecord {
    quote(m.seq, &m.sender_id, &m.sender_name, &m.text)
}

/// A stored message as it goes on the wire.
pub(crate) fn to_wire(r: MessageRecord) -> v1::ChatMessage {
    let sender_role = Role::from_u32(r.sender_role).map_or(v1::Role::Unspecified, Role::to_proto);
    let kind = i32::try_from(r.kind).unwrap_or(0);
    v1::ChatMessage {
        group_id: r.group_id,
        seq: r.seq,
        sender_id: r.sender_id,
        sender_name: r.sender_name,
        sender_role: sender_role as i32,
        kind,
        text: r.text,
        reply_to: r.reply_to,
        ts_ms: r.ts_ms,
        quote: r.quote.map(|q| v1::Quote {
            seq: q.seq,
            sender_id: q.sender_id,
            sender_name: q.sender_name,
            text: q.text,
        }),
    }
}
