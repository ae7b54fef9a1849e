//! One group's state and the one place its seqs are assigned.
//!
//! A [`GroupCell`] holds a group behind a short, synchronous critical section.
//! Everything that must be atomic for a group happens inside it: admitting a
//! member against the cap, assigning the next seq and queuing the message's
//! write in the same order, and publishing durable messages to subscribers.
//! No lock is ever held across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use qun_proto::v1::{self, server_frame::Body};
use qun_storage::ReachUse;
use qun_storage::records::{
    FaqRecord, GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord,
    QuoteRecord, ReportRecord,
};

use crate::commerce::Live;
use crate::outbox::{Outbox, Pushed};
use crate::rate::{Rate, TokenBucket};
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
    /// The outbox epoch when the request that subscribes began: a drop
    /// after that moment ends this subscription (see [`Outbox`]).
    pub epoch: u64,
    /// The newest seq pushed to it (set when it subscribes: older ones
    /// reach it by catch-up).
    delivered: u64,
}

impl Subscriber {
    /// A subscription for `conn`, in the outbox's current epoch. Make it at
    /// the start of the request, before any catch-up is pushed.
    pub fn new(conn: ConnId, user_id: impl Into<String>, outbox: Outbox) -> Self {
        let epoch = outbox.epoch();
        Self {
            conn,
            user_id: user_id.into(),
            outbox,
            epoch,
            delivered: 0,
        }
    }
}

/// The kinds of message, as stored.
pub(crate) const KIND_TEXT: u32 = v1::MessageKind::Text as u32;
pub(crate) const KIND_COMMERCE: u32 = v1::MessageKind::Commerce as u32;
pub(crate) const KIND_RECALL: u32 = v1::MessageKind::Recall as u32;
pub(crate) const KIND_BOARD: u32 = v1::MessageKind::Board as u32;

/// Longest quoted snippet kept with a reply, in characters.
const QUOTE_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) role: Role,
}

/// Who reads a message: decides whether they get it or its placeholder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Viewer<'a> {
    pub(crate) user_id: &'a str,
    /// Staff of the shop get every message.
    pub(crate) staff: bool,
    /// The member muted the group's promotions.
    pub(crate) promotions_muted: bool,
}

impl Viewer<'_> {
    /// Whether they get a message that is a promotion (or not), pushed to
    /// `audience` (or to everyone).
    fn gets(&self, promotion: bool, in_audience: impl FnOnce(&str) -> bool) -> bool {
        !promotion || self.staff || (!self.promotions_muted && in_audience(self.user_id))
    }

    /// What they see of a stored message.
    pub(crate) fn view_record(&self, mut r: MessageRecord) -> v1::ChatMessage {
        let audience = std::mem::take(&mut r.audience);
        let shown = self.gets(r.kind == KIND_COMMERCE, |u| {
            audience.is_empty() || audience.iter().any(|a| a == u)
        });
        let m = to_wire(r);
        if shown { m } else { hidden(&m) }
    }
}

/// The members a targeted push went to.
pub(crate) type Audience = Arc<HashSet<String>>;

/// A message with its push frame, encoded once.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub(crate) message: Arc<v1::ChatMessage>,
    pub(crate) frame: Bytes,
    /// For a promotion: the placeholder frame members who muted the
    /// group's promotions (or are outside its audience) get instead, also
    /// encoded once.
    pub(crate) hidden: Option<Bytes>,
    /// For a targeted push: who gets it.
    pub(crate) audience: Option<Audience>,
}

impl Encoded {
    /// Encodes the push frame of `record` once, then takes the message back
    /// out of the envelope: no copy of the message.
    pub(crate) fn new(mut record: MessageRecord) -> Self {
        let audience = std::mem::take(&mut record.audience);
        let mut e = Self::from_wire(to_wire(record));
        if !audience.is_empty() {
            e.audience = Some(Arc::new(audience.into_iter().collect()));
        }
        e
    }

    /// As [`Encoded::new`], from the wire message (pushed to everyone).
    pub(crate) fn from_wire(message: v1::ChatMessage) -> Self {
        let mut envelope = v1::ServerFrame {
            request_id: 0,
            body: Some(Body::Message(message)),
        };
        let frame = qun_proto::encode_server_frame(&envelope);
        let Some(Body::Message(message)) = envelope.body.take() else {
            unreachable!("the envelope was built with a message body")
        };
        let hidden = is_promotion(&message).then(|| {
            qun_proto::encode_server_frame(&v1::ServerFrame {
                request_id: 0,
                body: Some(Body::Message(hidden(&message))),
            })
        });
        Self {
            message: Arc::new(message),
            frame,
            hidden,
            audience: None,
        }
    }

    fn seq(&self) -> u64 {
        self.message.seq
    }

    /// Whether `viewer` gets this message (not its placeholder).
    pub(crate) fn shown_to(&self, viewer: &Viewer<'_>) -> bool {
        viewer.gets(self.hidden.is_some(), |u| {
            self.audience.as_ref().is_none_or(|a| a.contains(u))
        })
    }

    /// The frame for `viewer`: the message, or its placeholder.
    pub(crate) fn frame_for(&self, viewer: &Viewer<'_>) -> &Bytes {
        match &self.hidden {
            Some(h) if !self.shown_to(viewer) => h,
            _ => &self.frame,
        }
    }

    /// The message as `viewer` sees it.
    pub(crate) fn view(&self, viewer: &Viewer<'_>) -> v1::ChatMessage {
        if self.shown_to(viewer) {
            (*self.message).clone()
        } else {
            hidden(&self.message)
        }
    }
}

/// Whether a message is a promotion (what muting promotions hides).
pub(crate) fn is_promotion(m: &v1::ChatMessage) -> bool {
    m.kind == v1::MessageKind::Commerce as i32
}

/// The placeholder of a message a member does not get.
pub(crate) fn hidden(m: &v1::ChatMessage) -> v1::ChatMessage {
    v1::ChatMessage {
        group_id: m.group_id,
        seq: m.seq,
        kind: v1::MessageKind::Hidden as i32,
        ts_ms: m.ts_ms,
        ..Default::default()
    }
}

/// A message as it shows once recalled: who and when, nothing said.
pub(crate) fn recalled(m: &v1::ChatMessage) -> v1::ChatMessage {
    v1::ChatMessage {
        text: String::new(),
        quote: None,
        commerce: None,
        recalled: true,
        ..m.clone()
    }
}

/// Where a message with a client message id landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) seq: u64,
    pub(crate) ts_ms: u64,
}

/// The recent `(sender, client_msg_id) → seq` entries of a group.
///
/// It holds every message with an id whose seq is above `floor`, pending
/// or visible, so a retry is answered from memory when it is recent; below
/// the floor the store's index answers (see `Groups::submit_post`).
#[derive(Debug)]
pub(crate) struct SentWindow {
    /// `client_msg_id → [(sender, where it landed)]`: keyed by the id alone
    /// so that a lookup borrows `&str` and allocates nothing; ids are
    /// random per sender, so the list almost always has one entry.
    by_id: HashMap<String, Vec<(String, Sent)>>,
    /// `(seq, sender, client_msg_id)` in seq order, for forgetting.
    order: VecDeque<(u64, String, String)>,
    floor: u64,
    capacity: usize,
}

impl SentWindow {
    fn new(floor: u64, capacity: usize) -> Self {
        Self {
            by_id: HashMap::new(),
            order: VecDeque::new(),
            floor,
            capacity,
        }
    }

    pub(crate) fn get(&self, sender: &str, client_msg_id: &str) -> Option<Sent> {
        self.by_id
            .get(client_msg_id)?
            .iter()
            .find_map(|(s, sent)| (s == sender).then_some(*sent))
    }

    /// Every message with an id above this seq is in the window.
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    fn insert(&mut self, sender: &str, client_msg_id: &str, sent: Sent) {
        self.order
            .push_back((sent.seq, sender.to_string(), client_msg_id.to_string()));
        self.by_id
            .entry(client_msg_id.to_string())
            .or_default()
            .push((sender.to_string(), sent));
    }

    fn remove(&mut self, sender: &str, client_msg_id: &str) {
        if let Some(senders) = self.by_id.get_mut(client_msg_id) {
            senders.retain(|(s, _)| s != sender);
            if senders.is_empty() {
                self.by_id.remove(client_msg_id);
            }
        }
    }

    /// Forgets the oldest entries beyond the capacity, but never one that is
    /// not yet durable (the store's index does not have it yet).
    fn trim(&mut self, visible_seq: u64) {
        while self.order.len() > self.capacity {
            match self.order.front() {
                Some((seq, _, _)) if *seq <= visible_seq => {}
                _ => break,
            }
            if let Some((seq, sender, id)) = self.order.pop_front() {
                self.remove(&sender, &id);
                self.floor = seq;
            }
        }
    }

    /// A failed write: pending entries (above `visible_seq`) never landed.
    fn forget_above(&mut self, visible_seq: u64) {
        while self
            .order
            .back()
            .is_some_and(|(seq, _, _)| *seq > visible_seq)
        {
            if let Some((_, sender, id)) = self.order.pop_back() {
                self.remove(&sender, &id);
            }
        }
    }
}

/// A group's subscriptions: a list, iterated for every message published,
/// and an index by connection, so that subscribing and unsubscribing cost
/// the same in a group of 20,000 as in a group of 20 (when a crowd
/// disconnects at once, a search of the list per connection would be
/// quadratic).
#[derive(Debug, Default)]
struct Subscribers {
    list: Vec<Subscriber>,
    at: HashMap<ConnId, usize>,
    /// Where the fan-out pass in progress goes on (see
    /// [`GroupState::fan_out`]); 0 between passes.
    cursor: usize,
    /// The newest visible seq when the pass in progress began.
    pass_through: u64,
    /// A subscription not yet visited by this pass was moved behind the
    /// cursor: the pass must run once more.
    reshuffled: bool,
}

impl Subscribers {
    /// Adds a subscription, replacing an earlier one of the same connection.
    fn insert(&mut self, sub: Subscriber) {
        self.remove(sub.conn);
        self.at.insert(sub.conn, self.list.len());
        self.list.push(sub);
    }

    fn remove(&mut self, conn: ConnId) {
        if let Some(i) = self.at.remove(&conn) {
            self.list.swap_remove(i);
            if let Some(moved) = self.list.get(i) {
                self.at.insert(moved.conn, i);
                // The last one, perhaps not yet visited, now sits where
                // the pass has already been.
                if i < self.cursor {
                    self.reshuffled = true;
                }
            }
        }
    }

    /// Keeps the subscriptions `keep` accepts (a rare, whole-list change).
    fn retain(&mut self, keep: impl FnMut(&Subscriber) -> bool) {
        self.list.retain(keep);
        self.at = self
            .list
            .iter()
            .enumerate()
            .map(|(i, s)| (s.conn, i))
            .collect();
        if self.cursor > 0 {
            self.reshuffled = true;
        }
        self.cursor = self.cursor.min(self.list.len());
    }

    fn iter(&self) -> std::slice::Iter<'_, Subscriber> {
        self.list.iter()
    }

    fn len(&self) -> usize {
        self.list.len()
    }
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
    pending: VecDeque<Encoded>,
    /// The newest visible messages; ascending; at most `ring_capacity`.
    recent: VecDeque<Encoded>,
    ring_capacity: usize,
    subscribers: Subscribers,
    /// Recent client message ids, for idempotent sends.
    pub(crate) sent: SentWindow,
    /// Each member's read mark (absent: nothing read).
    read_marks: HashMap<String, u64>,
    /// Slow mode: all buyers of the group together.
    buyer_chatter: TokenBucket,
    /// A write of this group failed; it refuses writes until restart.
    failed: bool,
    /// Group-buys, coupons and polls, by object id.
    pub(crate) objects: HashMap<u64, Live>,
    /// Members who muted the group's promotions.
    promotion_mutes: HashSet<String>,
    /// Promotions posted on `reach.day` (UTC).
    pub(crate) reach: ReachUse,
    /// When the last promotion was posted (0: not since loading).
    pub(crate) last_promotion_ms: u64,
    /// The group is on the fan-out queue.
    pub(crate) fanout_queued: bool,
    /// `(seq, reporter)` of every report, so a report counts once.
    pub(crate) reported: HashSet<(u64, String)>,
    /// `(seq, member)` of cards opened since loading, so an open counts once.
    pub(crate) opened: HashSet<(u64, String)>,
    /// Members' mutes and bans.
    pub(crate) flags: HashMap<String, MemberFlagsRecord>,
    /// Seqs whose recall began, so a message is recalled once and a reply
    /// sequenced while its recall runs carries no quote text.
    pub(crate) recalled: HashSet<u64>,
    /// FAQ entries by id.
    pub(crate) faq: std::collections::BTreeMap<u64, FaqRecord>,
    /// When each auto-reply rule (`rule:ID`) or FAQ entry (`faq:ID`) last
    /// answered here, for its cooldown.
    pub(crate) auto_replied: HashMap<String, u64>,
    /// Buyers waiting for approval to join, by user.
    pub(crate) join_requests: std::collections::BTreeMap<String, JoinRequestRecord>,
}

/// What a group is loaded from.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) record: GroupRecord,
    pub(crate) members: Vec<MemberRecord>,
    pub(crate) read_marks: Vec<(String, u64)>,
    pub(crate) recent: Vec<MessageRecord>,
    pub(crate) last_seq: u64,
    pub(crate) objects: HashMap<u64, Live>,
    pub(crate) promotion_mutes: Vec<String>,
    pub(crate) reach: Option<ReachUse>,
    pub(crate) reports: Vec<ReportRecord>,
    pub(crate) member_flags: Vec<(String, MemberFlagsRecord)>,
    pub(crate) faq: Vec<FaqRecord>,
    pub(crate) join_requests: Vec<JoinRequestRecord>,
}

/// Per-group bounds from the core configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLimits {
    pub(crate) ring_capacity: usize,
    pub(crate) sent_window: usize,
    pub(crate) buyer_chatter: Rate,
}

impl GroupCell {
    pub(crate) fn new(loaded: Loaded, limits: GroupLimits, now_ms: u64) -> Self {
        let Loaded {
            record,
            members,
            read_marks,
            recent,
            last_seq,
            objects,
            promotion_mutes,
            reach,
            reports,
            member_flags,
            faq,
            join_requests,
        } = loaded;
        let members = members
            .into_iter()
            .map(|m| {
                let role = Role::from_u32(m.role).unwrap_or(Role::Buyer);
                (m.user_id, Member { role })
            })
            .collect();
        let mut ring: VecDeque<_> = recent.into_iter().map(Encoded::new).collect();
        while ring.len() > limits.ring_capacity {
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
                ring_capacity: limits.ring_capacity,
                subscribers: Subscribers::default(),
                // Everything already stored is in the store's index.
                sent: SentWindow::new(last_seq, limits.sent_window),
                read_marks: read_marks.into_iter().collect(),
                buyer_chatter: TokenBucket::full(limits.buyer_chatter, now_ms),
                failed: false,
                objects,
                promotion_mutes: promotion_mutes.into_iter().collect(),
                reach: reach.unwrap_or(ReachUse { day: 0, used: 0 }),
                last_promotion_ms: 0,
                fanout_queued: false,
                reported: reports
                    .into_iter()
                    .map(|r| (r.seq, r.reporter_id))
                    .collect(),
                opened: HashSet::new(),
                flags: member_flags.into_iter().collect(),
                recalled: HashSet::new(),
                faq: faq.into_iter().map(|f| (f.faq_id, f)).collect(),
                auto_replied: HashMap::new(),
                join_requests: join_requests
                    .into_iter()
                    .map(|r| (r.user_id.clone(), r))
                    .collect(),
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

    /// Staff of the group's shop (member or not), or a member: who may
    /// read the group's objects and board and recall in it.
    pub(crate) fn check_member_or_staff(&self, who: &Identity) -> Result<(), ChatError> {
        if who.role().is_staff() {
            self.check_shop(who)
        } else {
            self.member(who).map(drop)
        }
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
        self.check_not_banned(who.user_id(), now_ms)?;
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
        self.read_marks.remove(user_id);
        self.promotion_mutes.remove(user_id);
        self.members.remove(user_id).is_some()
    }

    /// The members who are buyers.
    pub(crate) fn buyer_ids(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.role == Role::Buyer)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How `user_id` sees this group's messages.
    pub(crate) fn viewer<'a>(&self, user_id: &'a str) -> Viewer<'a> {
        viewer_of(&self.members, &self.promotion_mutes, user_id)
    }

    /// Whether a member muted the group's promotions.
    pub(crate) fn promotions_muted(&self, user_id: &str) -> bool {
        self.promotion_mutes.contains(user_id)
    }

    /// Mutes or unmutes a member's promotions; whether that changed anything.
    pub(crate) fn set_promotions_muted(&mut self, user_id: &str, muted: bool) -> bool {
        if muted {
            self.promotion_mutes.insert(user_id.to_string())
        } else {
            self.promotion_mutes.remove(user_id)
        }
    }

    /// Adds a subscription, replacing an earlier one of the same connection:
    /// from now on every message above the newest visible one reaches `sub`
    /// by push (the ones up to it are the caller's to send).
    pub(crate) fn subscribe(&mut self, mut sub: Subscriber) {
        sub.delivered = self.visible_seq;
        self.subscribers.insert(sub);
    }

    /// A member's read mark.
    pub(crate) fn read_mark(&self, user_id: &str) -> u64 {
        self.read_marks.get(user_id).copied().unwrap_or(0)
    }

    /// Visible messages above a member's read mark.
    pub(crate) fn unread(&self, user_id: &str) -> u64 {
        self.visible_seq.saturating_sub(self.read_mark(user_id))
    }

    /// Moves a read mark forwards to `seq` (never past the newest visible
    /// message). Returns the new mark when it moved.
    pub(crate) fn advance_read_mark(&mut self, user_id: &str, seq: u64) -> Option<u64> {
        let seq = seq.min(self.next_seq - 1);
        let mark = self.read_marks.entry(user_id.to_string()).or_insert(0);
        (seq > *mark).then(|| {
            *mark = seq;
            seq
        })
    }

    /// Slow mode: takes a token from the group's buyer-chatter bucket.
    pub(crate) fn take_buyer_chatter(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        self.buyer_chatter.take(rate, now_ms)
    }

    /// The visible messages with seq in `(after, through]`, encoded, if the
    /// ring holds all of them.
    pub(crate) fn ring_range(&self, after: u64, through: u64) -> Option<Vec<Encoded>> {
        if after >= through {
            return Some(Vec::new());
        }
        let first = self
            .recent
            .front()
            .map_or(self.visible_seq + 1, Encoded::seq);
        if first > after + 1 {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|e| e.seq() > after && e.seq() <= through)
                .cloned()
                .collect(),
        )
    }

    pub(crate) fn unsubscribe(&mut self, conn: ConnId) {
        self.subscribers.remove(conn);
    }

    pub(crate) fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// The newest `n` visible messages if the ring holds them all.
    pub(crate) fn recent_tail(
        &self,
        n: usize,
        viewer: &Viewer<'_>,
    ) -> Option<Vec<v1::ChatMessage>> {
        self.recent_before(self.visible_seq + 1, n, viewer)
    }

    /// Up to `n` visible messages below `before`, if the ring can answer
    /// without missing any.
    pub(crate) fn recent_before(
        &self,
        before: u64,
        n: usize,
        viewer: &Viewer<'_>,
    ) -> Option<Vec<v1::ChatMessage>> {
        let before = before.min(self.visible_seq + 1);
        let want_from = before.saturating_sub(n as u64).max(1);
        if before <= 1 {
            return Some(Vec::new());
        }
        self.ring_range(want_from - 1, before - 1)
            .map(|found| found.iter().map(|e| e.view(viewer)).collect())
    }

    /// A quote of message `seq` if it is in memory: `Some(None)` when
    /// `viewer` does not get that message (it cannot be quoted).
    pub(crate) fn quote_in_memory(
        &self,
        seq: u64,
        viewer: &Viewer<'_>,
    ) -> Option<Option<QuoteRecord>> {
        let find = |e: &Encoded| {
            (e.seq() == seq).then(|| e.shown_to(viewer).then(|| quote_of(&e.message)))
        };
        self.recent
            .iter()
            .rev()
            .find_map(find)
            .or_else(|| self.pending.iter().find_map(find))
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
            ..Default::default()
        }
    }

    /// The seq the next message will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Builds the next message as a commerce event (see
    /// [`GroupState::next_message`] for the rules).
    pub(crate) fn next_event(
        &self,
        sender_id: &str,
        sender_name: &str,
        sender_role: Role,
        text: String,
        body: Vec<u8>,
        now_ms: u64,
    ) -> MessageRecord {
        MessageRecord {
            group_id: self.id(),
            seq: self.next_seq,
            sender_id: sender_id.to_string(),
            sender_name: sender_name.to_string(),
            sender_role: sender_role.to_u32(),
            kind: KIND_COMMERCE,
            text,
            ts_ms: now_ms,
            body,
            ..Default::default()
        }
    }

    /// Records that `record`'s write is queued: its seq is taken, its id
    /// remembered, and its frame encoded once, ready for publishing.
    pub(crate) fn commit_sequenced(&mut self, record: MessageRecord) {
        debug_assert_eq!(record.seq, self.next_seq);
        if !record.client_msg_id.is_empty() {
            let sent = Sent {
                seq: record.seq,
                ts_ms: record.ts_ms,
            };
            self.sent
                .insert(&record.sender_id, &record.client_msg_id, sent);
        }
        self.next_seq += 1;
        self.pending.push_back(Encoded::new(record));
    }

    /// The store reported `seq` durable, so it and everything before it is:
    /// every pending message up to it becomes visible (history, resume,
    /// the ring) in seq order. Pushing them to subscribers is
    /// [`GroupState::fan_out`]'s work.
    pub(crate) fn publish_through(&mut self, seq: u64) {
        while self.pending.front().is_some_and(|p| p.seq() <= seq) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            self.visible_seq = p.seq();
            if p.message.kind == v1::MessageKind::Recall as i32 {
                self.show_recalled(p.message.recalls);
            }
            self.recent.push_back(p);
            if self.recent.len() > self.ring_capacity {
                self.recent.pop_front();
            }
        }
        self.sent.trim(self.visible_seq);
    }

    /// Pushes visible messages to subscribers that lack them, spending at
    /// most about `budget` (one unit per subscriber visited and per frame
    /// queued), and says whether every subscriber is now up to date.
    ///
    /// This is how one group's fan-out is cut into turns, so that a flash
    /// sale's group of 19,000 phones does not hold the store's writer, or
    /// a fan-out worker, while other groups' messages wait: the writer
    /// runs one turn when a write becomes durable, and a group with work
    /// left goes on [`crate::groups`]'s fan-out queue, where the workers
    /// take groups in turn (round robin).
    ///
    /// Each subscriber remembers the newest seq it was given, so whatever
    /// changes between turns — new messages, subscriptions coming and
    /// going — every subscriber gets every message once, in order: a pass
    /// over the list ends only when nothing moved behind its cursor and no
    /// message became visible since it began. One that fell so far behind
    /// that the ring no longer holds what it lacks is out of sync and
    /// resumes from the store, like a phone that stopped reading.
    pub(crate) fn fan_out(&mut self, budget: usize, stats: &CoreStats) -> bool {
        let through = self.visible_seq;
        let first = self.recent.front().map_or(through + 1, Encoded::seq);
        let (mut queued, mut dropped, mut spent) = (0u64, 0u64, 0usize);
        let mut ended = false;
        let subs = &mut self.subscribers;
        if subs.cursor == 0 {
            subs.pass_through = through;
        }
        let done = loop {
            if subs.cursor >= subs.list.len() {
                subs.cursor = 0;
                if !subs.reshuffled && subs.pass_through >= through {
                    break true;
                }
                subs.reshuffled = false;
                subs.pass_through = through;
            }
            if spent >= budget {
                break false;
            }
            let sub = &mut subs.list[subs.cursor];
            subs.cursor += 1;
            spent += 1;
            if sub.delivered >= through {
                continue;
            }
            if sub.delivered + 1 < first {
                // What it lacks left the ring: out of sync, it resumes.
                sub.outbox.fall_behind(sub.epoch);
                dropped += 1;
                ended = true;
                continue;
            }
            // Looked up only if a promotion needs it: it alone has a
            // placeholder to choose.
            let mut viewer = None;
            let from = (sub.delivered + 1 - first) as usize;
            for e in self.recent.range(from..) {
                let frame = if e.hidden.is_some() {
                    let v = viewer.get_or_insert_with(|| {
                        viewer_of(&self.members, &self.promotion_mutes, &sub.user_id)
                    });
                    e.frame_for(v)
                } else {
                    &e.frame
                };
                spent += 1;
                match sub.outbox.push_in(sub.epoch, frame.clone()) {
                    Pushed::Queued => queued += 1,
                    Pushed::Dropped => {
                        dropped += 1;
                        ended = true;
                        break;
                    }
                    Pushed::Stale | Pushed::Closed => {
                        ended = true;
                        break;
                    }
                }
            }
            sub.delivered = through;
        };
        if ended {
            // Out of sync or gone: those subscriptions end here; the
            // client resumes from the last seq it has.
            subs.retain(|s| !s.outbox.is_closed() && s.outbox.epoch() == s.epoch);
        }
        stats.deliveries_queued.fetch_add(queued, Ordering::Relaxed);
        stats
            .deliveries_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        done && !ended
    }

    /// A recall became visible: the ring shows the message as recalled too,
    /// and the replies that quote it without their quote's text.
    fn show_recalled(&mut self, seq: u64) {
        for e in self.recent.iter_mut() {
            let shown = if e.seq() == seq {
                recalled(&e.message)
            } else if e
                .message
                .quote
                .as_ref()
                .is_some_and(|q| q.seq == seq && !q.recalled)
            {
                with_quote_scrubbed(&e.message)
            } else {
                continue;
            };
            let audience = e.audience.take();
            *e = Encoded::from_wire(shown);
            e.audience = audience;
        }
    }

    /// How `who` is screened on joining: the group's policy for a buyer who
    /// is not yet a member, `Open` for everyone else (staff, members).
    pub(crate) fn screening_for(&self, who: &Identity) -> v1::JoinPolicy {
        if who.role() != Role::Buyer || self.members.contains_key(who.user_id()) {
            return v1::JoinPolicy::Open;
        }
        i32::try_from(self.record.join_policy)
            .ok()
            .and_then(|p| v1::JoinPolicy::try_from(p).ok())
            .unwrap_or(v1::JoinPolicy::Open)
    }

    /// `Banned` while a ban of `user_id` lasts.
    pub(crate) fn check_not_banned(&self, user_id: &str, now_ms: u64) -> Result<(), ChatError> {
        match self.flags.get(user_id) {
            Some(f) if f.banned_until_ms > now_ms => Err(ChatError::Banned {
                retry_after_ms: f.banned_until_ms - now_ms,
            }),
            _ => Ok(()),
        }
    }

    /// Whether a buyer may post now, or why not.
    pub(crate) fn check_not_muted(&self, who: &Identity, now_ms: u64) -> Result<(), ChatError> {
        if who.role() != Role::Buyer {
            return Ok(());
        }
        if let Some(f) = self.flags.get(who.user_id())
            && f.muted_until_ms > now_ms
        {
            return Err(ChatError::Muted {
                retry_after_ms: f.muted_until_ms - now_ms,
            });
        }
        if self.record.buyers_muted {
            return Err(ChatError::Muted { retry_after_ms: 0 });
        }
        Ok(())
    }

    /// Queues `frame` to every connection of `user_id` subscribed here.
    pub(crate) fn push_to_user(&self, user_id: &str, frame: &Bytes) {
        for sub in self.subscribers.iter().filter(|s| s.user_id == user_id) {
            let _ = sub.outbox.push_in(sub.epoch, frame.clone());
        }
    }

    /// A write failed: nothing pending becomes visible, and the group
    /// refuses further writes.
    pub(crate) fn fail(&mut self) {
        self.failed = true;
        self.pending.clear();
        self.sent.forget_above(self.visible_seq);
    }
}

/// How `user_id` sees a group with these members and promotion mutes.
fn viewer_of<'a>(
    members: &HashMap<String, Member>,
    promotion_mutes: &HashSet<String>,
    user_id: &'a str,
) -> Viewer<'a> {
    Viewer {
        user_id,
        staff: members.get(user_id).is_some_and(|m| m.role != Role::Buyer),
        promotions_muted: promotion_mutes.contains(user_id),
    }
}

fn quote_of(m: &v1::ChatMessage) -> QuoteRecord {
    quote(m.seq, &m.sender_id, &m.sender_name, &m.text, m.recalled)
}

fn quote(seq: u64, sender_id: &str, sender_name: &str, text: &str, recalled: bool) -> QuoteRecord {
    QuoteRecord {
        seq,
        sender_id: sender_id.to_string(),
        sender_name: sender_name.to_string(),
        // A recalled message's text is already gone.
        text: text.chars().take(QUOTE_CHARS).collect(),
        recalled,
    }
}

/// A quote of a stored message.
pub(crate) fn quote_of_record(m: &MessageRecord) -> QuoteRecord {
    quote(m.seq, &m.sender_id, &m.sender_name, &m.text, m.recalled)
}

/// A quote of a recalled message: who and which, nothing of what it said.
pub(crate) fn scrubbed(q: &mut QuoteRecord) {
    q.text = String::new();
    q.recalled = true;
}

/// A reply's wire message once the message it quotes is recalled.
pub(crate) fn with_quote_scrubbed(m: &v1::ChatMessage) -> v1::ChatMessage {
    let mut m = m.clone();
    if let Some(q) = &mut m.quote {
        q.text = String::new();
        q.recalled = true;
    }
    m
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
            recalled: q.recalled,
        }),
        // chat-core wrote the body; one that does not decode is shown as
        // its summary text alone.
        commerce: if r.body.is_empty() {
            None
        } else {
            prost::Message::decode(&r.body[..]).ok()
        },
        recalled: r.recalled,
        recalls: r.recalls,
        audience: r.audience_expr,
    }
}

#[cfg(test)]
mod subscriber_tests {
    use super::*;
    use crate::OutboxLimits;

    fn sub(conn: u64, user: &str) -> Subscriber {
        Subscriber::new(ConnId(conn), user, Outbox::new(OutboxLimits::default()))
    }

    /// The connections subscribed, after checking the index points at them.
    fn conns(s: &Subscribers) -> Vec<u64> {
        assert_eq!(s.at.len(), s.list.len());
        for (conn, i) in &s.at {
            assert_eq!(s.list[*i].conn, *conn);
        }
        let mut c: Vec<u64> = s.iter().map(|s| s.conn.0).collect();
        c.sort_unstable();
        c
    }

    #[test]
    fn the_index_follows_every_change() {
        let mut s = Subscribers::default();
        for c in 1..=5 {
            s.insert(sub(c, if c % 2 == 0 { "even" } else { "odd" }));
        }
        s.insert(sub(3, "odd")); // again: replaced, not doubled
        assert_eq!(conns(&s), [1, 2, 3, 4, 5]);
        s.remove(ConnId(1)); // moves the last one into its place
        s.remove(ConnId(9)); // unknown: nothing
        assert_eq!(conns(&s), [2, 3, 4, 5]);
        s.retain(|x| x.user_id != "even");
        assert_eq!(conns(&s), [3, 5]);
        for c in [3, 5] {
            s.remove(ConnId(c));
        }
        assert_eq!(conns(&s), [0u64; 0]);
        assert_eq!(s.len(), 0);
    }
}
