//! What the store keeps, as protobuf-encoded records.
//!
//! These are the storage schema, not the wire protocol: field tags are never
//! reused, so a newer server reads what an older one wrote. Roles and kinds
//! are stored as the numbers chat-core assigns them (see `qun_chat_core::Role`).

/// A group's fixed facts. Key: `group_id` (8 bytes, big-endian).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct GroupRecord {
    /// The group's id, unique for the life of the store.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// The shop that owns the group.
    #[prost(string, tag = "2")]
    pub shop_id: String,
    /// Display name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// Most members the group admits.
    #[prost(uint32, tag = "4")]
    pub max_members: u32,
    /// When the group was created, ms since the Unix epoch.
    #[prost(uint64, tag = "5")]
    pub created_at_ms: u64,
    /// User id of the agent or owner who created it.
    #[prost(string, tag = "6")]
    pub created_by: String,
    /// Staff muted every buyer (only staff may post).
    #[prost(bool, tag = "7")]
    pub buyers_muted: bool,
    /// What staff pinned, oldest first.
    #[prost(message, repeated, tag = "8")]
    pub pins: Vec<PinRecord>,
    /// How buyers join, as the wire protocol numbers it (0: open).
    #[prost(uint32, tag = "9")]
    pub join_policy: u32,
    /// For a threshold policy: the tag expression a buyer must match.
    #[prost(string, tag = "10")]
    pub join_expression: String,
    /// For an exclusive customer-service session: its buyer (empty for a
    /// shop group).
    #[prost(string, tag = "11")]
    pub cs_buyer: String,
}

/// One pin of a group: a message or an FAQ entry (the other is 0).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct PinRecord {
    /// A pinned message's seq.
    #[prost(uint64, tag = "1")]
    pub message_seq: u64,
    /// A pinned FAQ entry's id.
    #[prost(uint64, tag = "2")]
    pub faq_id: u64,
}

/// One member of one group. Key: `group_id | user_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MemberRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// The member's user id (never contains a NUL byte).
    #[prost(string, tag = "2")]
    pub user_id: String,
    /// The member's display name when they joined.
    #[prost(string, tag = "3")]
    pub display_name: String,
    /// The member's role in the group, as chat-core numbers it.
    #[prost(uint32, tag = "4")]
    pub role: u32,
    /// When they joined, ms since the Unix epoch.
    #[prost(uint64, tag = "5")]
    pub joined_at_ms: u64,
}

/// The part of a quoted message kept with a reply.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct QuoteRecord {
    /// Seq of the quoted message.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Its sender.
    #[prost(string, tag = "2")]
    pub sender_id: String,
    /// Its sender's display name.
    #[prost(string, tag = "3")]
    pub sender_name: String,
    /// The start of its text; empty once the quoted message is recalled.
    #[prost(string, tag = "4")]
    pub text: String,
    /// The quoted message was recalled (撤回): `text` is gone.
    #[prost(bool, tag = "5")]
    pub recalled: bool,
}

/// One message of a group's stream. Key: `group_id | bucket | seq`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MessageRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// Gap-free per group from 1.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Sender's user id.
    #[prost(string, tag = "3")]
    pub sender_id: String,
    /// Sender's display name at the time of sending.
    #[prost(string, tag = "4")]
    pub sender_name: String,
    /// Sender's role, as chat-core numbers it.
    #[prost(uint32, tag = "5")]
    pub sender_role: u32,
    /// Message kind, as chat-core numbers it.
    #[prost(uint32, tag = "6")]
    pub kind: u32,
    /// The text.
    #[prost(string, tag = "7")]
    pub text: String,
    /// Seq of the message replied to, 0 when none.
    #[prost(uint64, tag = "8")]
    pub reply_to: u64,
    /// Server time at sequencing, ms since the Unix epoch.
    #[prost(uint64, tag = "9")]
    pub ts_ms: u64,
    /// The sender's own id for the message, if it gave one.
    #[prost(string, tag = "10")]
    pub client_msg_id: String,
    /// Snapshot of the quoted message when `reply_to` is set.
    #[prost(message, optional, tag = "11")]
    pub quote: Option<QuoteRecord>,
    /// The body of a non-text kind (a commerce event), encoded by chat-core;
    /// empty for text.
    #[prost(bytes = "vec", tag = "12")]
    pub body: Vec<u8>,
    /// The message was recalled (撤回): its text, quote and body are gone.
    #[prost(bool, tag = "13")]
    pub recalled: bool,
    /// For a recall event: the seq it recalled.
    #[prost(uint64, tag = "14")]
    pub recalls: u64,
    /// For a targeted push: the members it was pushed to (everyone else
    /// gets a placeholder). Empty: every member.
    #[prost(string, repeated, tag = "15")]
    pub audience: Vec<String>,
    /// For a targeted push: the tag expression that chose `audience`.
    #[prost(string, tag = "16")]
    pub audience_expr: String,
}

/// A live object of a group (a group-buy, coupon or poll). Key:
/// `group_id | object_id`. The store keeps `body` as chat-core encoded it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ObjectRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// Unique within the group.
    #[prost(uint64, tag = "2")]
    pub object_id: u64,
    /// The object's state, encoded by chat-core.
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
    /// When the object next changes by itself (a deadline), ms since the
    /// Unix epoch; 0 when never. Objects with one are listed by
    /// [`crate::Store::due_objects`].
    #[prost(uint64, tag = "4")]
    pub due_ms: u64,
}

/// One user's stake in an object: a group-buy participant, a coupon's
/// claims, a poll vote. Key: `group_id | object_id | user_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EntryRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// The object.
    #[prost(uint64, tag = "2")]
    pub object_id: u64,
    /// The user (never contains a NUL byte).
    #[prost(string, tag = "3")]
    pub user_id: String,
    /// What the object's kind makes of it (a time, a count, an option).
    #[prost(uint64, tag = "4")]
    pub value: u64,
}

/// A shop's product. Key: `shop_id | 0x00 | product_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ProductRecord {
    /// The shop (never contains a NUL byte).
    #[prost(string, tag = "1")]
    pub shop_id: String,
    /// The product (never contains a NUL byte).
    #[prost(string, tag = "2")]
    pub product_id: String,
    /// The product, encoded by chat-core.
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
}

/// Where a message with a client message id landed. Key: `sent_key`
/// (`group_id | sender_id | 0x00 | client_msg_id`), written in the same
/// atomic batch as the message itself.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct SentRecord {
    /// The seq the message was given.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Its server time.
    #[prost(uint64, tag = "2")]
    pub ts_ms: u64,
}

/// A buyer's report of a message. Key: `group_id | seq | reporter_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ReportRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// The message reported.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Who reported it (never contains a NUL byte).
    #[prost(string, tag = "3")]
    pub reporter_id: String,
    /// Why, in the reporter's words.
    #[prost(string, tag = "4")]
    pub reason: String,
    /// When, ms since the Unix epoch.
    #[prost(uint64, tag = "5")]
    pub ts_ms: u64,
}

/// A member's moderation state in a group. Key: `group_id | user_id`. Kept
/// apart from the membership so that a ban outlives the removal.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct MemberFlagsRecord {
    /// Muted (may not post) until, ms since the Unix epoch; 0: not muted.
    #[prost(uint64, tag = "1")]
    pub muted_until_ms: u64,
    /// May not join again until, ms since the Unix epoch; 0: not banned.
    #[prost(uint64, tag = "2")]
    pub banned_until_ms: u64,
}

/// A question and its answer made an FAQ entry of a group. Key:
/// `group_id | faq_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct FaqRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// Unique within the group, from 1.
    #[prost(uint64, tag = "2")]
    pub faq_id: u64,
    /// The question's text.
    #[prost(string, tag = "3")]
    pub question: String,
    /// The answer's text.
    #[prost(string, tag = "4")]
    pub answer: String,
    /// The question message's seq.
    #[prost(uint64, tag = "5")]
    pub question_seq: u64,
    /// The answer message's seq.
    #[prost(uint64, tag = "6")]
    pub answer_seq: u64,
    /// Who asked.
    #[prost(string, tag = "7")]
    pub asked_by: String,
    /// Who answered.
    #[prost(string, tag = "8")]
    pub answered_by: String,
    /// When it was made an entry, ms since the Unix epoch.
    #[prost(uint64, tag = "9")]
    pub created_at_ms: u64,
}

/// One auto-reply rule of a shop. Key: `shop_id | 0x00 | rule_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AutoReplyRecord {
    /// The shop.
    #[prost(string, tag = "1")]
    pub shop_id: String,
    /// The rule's id, chosen by the shop.
    #[prost(string, tag = "2")]
    pub rule_id: String,
    /// Words that must all appear in a question (case-insensitive).
    #[prost(string, repeated, tag = "3")]
    pub keywords: Vec<String>,
    /// A regular expression a question must match; empty: none.
    #[prost(string, tag = "4")]
    pub pattern: String,
    /// The answer the bot posts.
    #[prost(string, tag = "5")]
    pub answer: String,
    /// Least time between two answers of this rule in one group, ms.
    #[prost(uint64, tag = "6")]
    pub cooldown_ms: u64,
}

/// A buyer's pending request to join a group. Key: `group_id | user_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct JoinRequestRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// The buyer.
    #[prost(string, tag = "2")]
    pub user_id: String,
    /// Their display name when they asked.
    #[prost(string, tag = "3")]
    pub display_name: String,
    /// When they asked, ms since the Unix epoch.
    #[prost(uint64, tag = "4")]
    pub requested_at_ms: u64,
}

/// A buyer's tags in one shop. Key: `shop_id | 0x00 | user_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct BuyerTagsRecord {
    /// The shop.
    #[prost(string, tag = "1")]
    pub shop_id: String,
    /// The buyer.
    #[prost(string, tag = "2")]
    pub user_id: String,
    /// The tags, sorted.
    #[prost(string, repeated, tag = "3")]
    pub tags: Vec<String>,
}

/// A scheduled push of a group. Key: `group_id | schedule_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ScheduleRecord {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group_id: u64,
    /// Unique across the store.
    #[prost(uint64, tag = "2")]
    pub schedule_id: u64,
    /// What to push, encoded by chat-core.
    #[prost(bytes = "vec", tag = "3")]
    pub content: Vec<u8>,
    /// The first occurrence, ms since the Unix epoch.
    #[prost(uint64, tag = "4")]
    pub first_at_ms: u64,
    /// Between occurrences; 0 for a one-off.
    #[prost(uint64, tag = "5")]
    pub every_ms: u64,
    /// The next occurrence; 0 when none is left.
    #[prost(uint64, tag = "6")]
    pub next_at_ms: u64,
    /// Occurrences fired.
    #[prost(uint32, tag = "7")]
    pub fired: u32,
    /// Occurrences skipped.
    #[prost(uint32, tag = "8")]
    pub skipped: u32,
    /// The seq of the last message fired.
    #[prost(uint64, tag = "9")]
    pub last_seq: u64,
    /// What the last occurrence did.
    #[prost(string, tag = "10")]
    pub last_outcome: String,
    /// Who created it: user id, display name and role, as chat-core
    /// numbers it; occurrences are posted in their name.
    #[prost(string, tag = "11")]
    pub created_by: String,
    /// See `created_by`.
    #[prost(string, tag = "12")]
    pub created_by_name: String,
    /// See `created_by`.
    #[prost(uint32, tag = "13")]
    pub created_by_role: u32,
}

/// A shop's exclusive customer-service settings and proactive quota use.
/// Key: `shop_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CsShopRecord {
    /// The shop.
    #[prost(string, tag = "1")]
    pub shop_id: String,
    /// The lowest tier served, as chat-core names it (`new`, `regular`,
    /// `vip`).
    #[prost(string, tag = "2")]
    pub required_tier: String,
    /// Most open sessions per agent.
    #[prost(uint32, tag = "3")]
    pub agent_cap: u32,
    /// A session with no message for this long is closed.
    #[prost(uint64, tag = "4")]
    pub idle_close_ms: u64,
    /// Proactive openings per day at a neutral score.
    #[prost(uint32, tag = "5")]
    pub proactive_base: u32,
    /// The UTC day of `proactive_used`.
    #[prost(uint64, tag = "6")]
    pub proactive_day: u64,
    /// Proactive openings that day.
    #[prost(uint32, tag = "7")]
    pub proactive_used: u32,
}

/// One buyer to one shop's customer service. Key: `shop_id | 0x00 | buyer_id`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CsBuyerRecord {
    /// The shop.
    #[prost(string, tag = "1")]
    pub shop_id: String,
    /// The buyer.
    #[prost(string, tag = "2")]
    pub buyer_id: String,
    /// The session's group (0: none yet).
    #[prost(uint64, tag = "3")]
    pub session_id: u64,
    /// The buyer's exclusive agent ("" if none).
    #[prost(string, tag = "4")]
    pub assigned_agent: String,
    /// The buyer blocked proactive contact from the shop.
    #[prost(bool, tag = "5")]
    pub blocked: bool,
    /// Who handles the session now.
    #[prost(string, tag = "6")]
    pub agent_id: String,
    /// The session's state, as the wire numbers it.
    #[prost(uint32, tag = "7")]
    pub state: u32,
    /// The last message or opening, ms since the Unix epoch.
    #[prost(uint64, tag = "8")]
    pub last_activity_ms: u64,
    /// The session was opened by the agent.
    #[prost(bool, tag = "9")]
    pub proactive: bool,
}
