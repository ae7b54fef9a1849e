//! Qun's chat logic: shops, groups, members, messages and fan-out.
//!
//! chat-core is what a group *is*, with no sockets, no files and no clock:
//! the gateway hands it identities, requests and the current time, and it
//! answers with wire-ready values. It talks to storage only through the
//! [`qun_storage::Store`] trait. (The split follows quinn: `quinn-proto` holds
//! the state machine, `quinn` the I/O.)
//!
//! # Layout
//! - [`Groups`]: the sharded registry (a [`dashmap::DashMap`]) and every
//!   operation: create, join, leave, post, history.
//! - `group`: one group's state behind a short critical section — the one
//!   place its seqs are assigned.
//! - [`Outbox`]: a connection's bounded push queue; a full one drops and marks
//!   the connection out of sync instead of slowing the group.
//! - `delivery`: [`Groups::resume`] (catch-up, then live, on one queue) and
//!   [`Groups::fetch_range`].
//! - `read_state`: read marks, unread counts, a user's devices and groups.
//! - `commerce`: product cards, group-buys (拼团), coupons and polls —
//!   live objects changed under their group's lock, persisted, and
//!   broadcast as events on the group's stream; [`Groups::tick`] resolves
//!   their deadlines and posts coalesced progress.
//! - [`reach`]: the reach quota (promotions per group per day, scaled by
//!   the shop's buyer feedback); `feedback` applies it: muting promotions,
//!   reports, card opens, [`Groups::reach_quota`].
//! - `board`: FAQ entries and pins — staff answer once for everyone; every
//!   change is a BOARD message on the stream.
//! - `auto_reply`: the shop's bot answers questions that match a rule or an
//!   FAQ entry, once per cooldown per group.
//! - `screening`: join policies — open, on approval (staff decide pending
//!   requests), or by tags; [`segments`]: buyers' tags, tiers and tag
//!   expressions.
//! - `moderation`: muting and removing buyers, muting all buyers, recall
//!   (撤回) as a message on the stream.
//! - [`Rate`]: the token buckets of per-user and per-group (slow mode) limits.
//! - [`Identity`] and [`Role`]: who is acting; [`permissions`]: the role ×
//!   operation matrix every request is checked against first.
//! - [`ChatError`]: why something was refused, with its wire code.
//!
//! # The path of a message
//! [`Groups::post`] validates the text, then under the group's lock checks
//! membership, assigns the next seq and submits the write to the store — in
//! that order, so seq order is write order. When the store reports the write
//! durable, the message becomes visible (history, resume) and its frame,
//! encoded once into [`bytes::Bytes`], is pushed to subscribers' [`Outbox`]es
//! — all of them at once in a small group; in a big one, in turns shared
//! round robin with other groups ([`Groups::run_fan_out`]) — and the sender
//! is acknowledged.
//!
//! # Example
//! See [`Groups`].

mod auto_reply;
mod board;
mod commerce;
mod cs;
mod delivery;
mod devices;
mod error;
mod feedback;
mod group;
mod groups;
mod identity;
mod moderation;
mod outbox;
pub mod permissions;
mod push;
mod rate;
pub mod reach;
mod read_state;
mod schedule;
mod screening;
pub mod segments;

pub use auto_reply::MAX_RULES as MAX_AUTO_REPLY_RULES;
pub use commerce::{MAX_MONEY_MINOR, TickReport, state_name};
pub use cs::{
    DEFAULT_AGENT_CAP, DEFAULT_IDLE_CLOSE_MS, DEFAULT_PROACTIVE_BASE, PROACTIVE_MIN_SCORE,
};
pub use delivery::MAX_RESUME_CURSORS;
pub use error::ChatError;
pub use group::{ConnId, Subscriber};
pub use groups::{CoreConfig, CoreStats, Groups, NewGroup, NewMessage, PostTicket};
pub use identity::{Identity, IdentityError, Role};
pub use moderation::RECALL_WINDOW_MS;
pub use outbox::{Empty, MAX_REPLIES, Next, Outbox, OutboxLimits, Outgoing, Pushed, Reply};
pub use push::MAX_ANNOUNCEMENT_BYTES;
pub use rate::Rate;
pub use schedule::{
    LATE_GRACE_MS, MAX_AHEAD_MS, MAX_SCHEDULES_PER_GROUP, MIN_PERIOD_MS, ScheduleReport,
};

#[cfg(test)]
mod auto_reply_tests;
#[cfg(test)]
mod board_tests;
#[cfg(test)]
mod commerce_tests;
#[cfg(test)]
mod cs_tests;
#[cfg(test)]
mod fanout_tests;
#[cfg(test)]
mod moderation_tests;
#[cfg(test)]
mod push_tests;
#[cfg(test)]
mod reach_tests;
#[cfg(test)]
mod roles_tests;
#[cfg(test)]
mod screening_tests;
#[cfg(test)]
mod tests;
