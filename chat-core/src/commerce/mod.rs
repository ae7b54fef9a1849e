//! Commerce in the chat: product cards, group-buys (拼团), coupons, polls.
//!
//! These are server-authoritative objects, not message blobs. Each lives in
//! its group's state (so it changes under the same short critical section
//! that assigns the group's seqs), is persisted with every change, and every
//! change clients must see is an event on the group's ordered stream: a
//! message of kind COMMERCE whose id — for a new object, the object's id —
//! is its seq. Resume and history therefore carry commerce like any message.
//!
//! - `group_buy`, `coupon`, `poll`: the pure state machines, time passed in.
//! - `product`: the shop's products and which groups hold their cards.
//! - `ops`: the operations on [`crate::Groups`], and [`crate::Groups::tick`],
//!   which resolves deadlines and posts coalesced progress.

pub(crate) mod coupon;
pub(crate) mod group_buy;
mod ops;
pub(crate) mod poll;
pub(crate) mod product;

use std::collections::HashMap;

use prost::Message as _;
use qun_proto::v1::{self, commerce_event};
use qun_storage::StorageError;
use qun_storage::records::{EntryRecord, ObjectRecord};

pub use ops::TickReport;
pub(crate) use ops::{Author, CommerceState, Durable, Event, staff_in};
pub(crate) use product::check_id;

use coupon::Coupon;
use group_buy::GroupBuy;
use poll::Poll;

/// The largest amount of money, in minor units (10^12: ten billion yuan).
pub const MAX_MONEY_MINOR: i64 = 1_000_000_000_000;

/// A live object of a group.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    GroupBuy(GroupBuy),
    Coupon(Coupon),
    Poll(Poll),
}

/// An object with its progress bookkeeping.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) object: Object,
    /// Progress not yet broadcast (a join, a leave, a vote).
    pub(crate) dirty: bool,
    /// When progress was last broadcast.
    pub(crate) progress_at_ms: u64,
}

impl Live {
    pub(crate) fn new(object: Object, now_ms: u64) -> Self {
        Self {
            object,
            dirty: false,
            progress_at_ms: now_ms,
        }
    }

    /// When it next changes by itself, 0 for never.
    pub(crate) fn due_ms(&self) -> u64 {
        match &self.object {
            Object::GroupBuy(g) => g.due_ms(),
            Object::Coupon(_) => 0,
            Object::Poll(p) => p.due_ms(),
        }
    }

    /// The object as an event body.
    pub(crate) fn to_event_object(&self) -> commerce_event::Object {
        match &self.object {
            Object::GroupBuy(g) => commerce_event::Object::GroupBuy(g.wire.clone()),
            Object::Coupon(c) => commerce_event::Object::Coupon(c.wire.clone()),
            Object::Poll(p) => commerce_event::Object::Poll(p.wire.clone()),
        }
    }

    /// The stored record of the object (its state without the entries).
    pub(crate) fn record(&self, group_id: u64, object_id: u64) -> ObjectRecord {
        let event = v1::CommerceEvent {
            change: 0,
            object: Some(self.to_event_object()),
        };
        ObjectRecord {
            group_id,
            object_id,
            body: event.encode_to_vec(),
            due_ms: self.due_ms(),
        }
    }

    /// Rebuilds an object from its record and its entries.
    pub(crate) fn restore(
        record: &ObjectRecord,
        entries: Vec<EntryRecord>,
        now_ms: u64,
    ) -> Result<Self, StorageError> {
        let event = v1::CommerceEvent::decode(&record.body[..])
            .map_err(|e| StorageError::corrupt("objects", e))?;
        let by_user = |map: fn(u64) -> u32| -> HashMap<String, u32> {
            entries
                .iter()
                .map(|e| (e.user_id.clone(), map(e.value)))
                .collect()
        };
        let stored = event.object.clone();
        let object = match event.object {
            Some(commerce_event::Object::GroupBuy(wire)) => {
                let participants = entries.iter().map(|e| (e.user_id.clone(), e.value));
                Object::GroupBuy(GroupBuy::restore(wire, participants.collect()))
            }
            Some(commerce_event::Object::Coupon(wire)) => {
                Object::Coupon(Coupon::restore(wire, by_user(saturate)))
            }
            Some(commerce_event::Object::Poll(wire)) => {
                Object::Poll(Poll::restore(wire, by_user(saturate)))
            }
            Some(commerce_event::Object::Product(_) | commerce_event::Object::Announcement(_))
            | None => {
                return Err(StorageError::corrupt("objects", "not a live object"));
            }
        };
        let mut live = Self::new(object, now_ms);
        // The record is written with every progress event, so it differs
        // from its entries only when progress was still to be broadcast.
        live.dirty = stored.as_ref() != Some(&live.to_event_object());
        Ok(live)
    }
}

fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Restores every object of a group from its records and entries.
pub(crate) fn restore_all(
    records: Vec<ObjectRecord>,
    entries: Vec<EntryRecord>,
    now_ms: u64,
) -> Result<HashMap<u64, Live>, StorageError> {
    let mut by_object: HashMap<u64, Vec<EntryRecord>> = HashMap::new();
    for e in entries {
        by_object.entry(e.object_id).or_default().push(e);
    }
    records
        .iter()
        .map(|r| {
            let entries = by_object.remove(&r.object_id).unwrap_or_default();
            Ok((r.object_id, Live::restore(r, entries, now_ms)?))
        })
        .collect()
}

/// `CNY 12.90`: money for the summary text of events.
pub(crate) fn money(minor: i64, currency: &str) -> String {
    format!("{currency} {}.{:02}", minor / 100, minor % 100)
}

/// The short text of an event, for clients that do not render commerce.
pub(crate) fn summary(change: v1::CommerceChange, object: &commerce_event::Object) -> String {
    use v1::CommerceChange as C;
    match object {
        commerce_event::Object::Product(p) => {
            let price = money(p.price_minor, &p.currency);
            let title = &p.title;
            match change {
                C::ProductUpdated => format!("[Product updated] {title}: {price}"),
                _ => format!("[Product] {title}: {price}"),
            }
        }
        commerce_event::Object::GroupBuy(g) => {
            let title = g.product.as_ref().map_or("", |p| p.title.as_str());
            let joined = format!("{}/{} joined", g.joined, g.target);
            match change {
                C::Created => format!(
                    "[Group-buy] {title}: {} with {} buyers, {} slots",
                    money(
                        g.price_minor,
                        g.product.as_ref().map_or("", |p| p.currency.as_str())
                    ),
                    g.target,
                    g.slots
                ),
                C::Progress => format!("[Group-buy] {title}: {joined}"),
                _ => format!(
                    "[Group-buy] {title}: {}, {joined}",
                    state_name(g.state()).replace('_', " ")
                ),
            }
        }
        commerce_event::Object::Coupon(c) => match change {
            C::Created => format!(
                "[Coupon] {}: {} off from {}",
                c.title,
                money(c.amount_minor, &c.currency),
                money(c.min_spend_minor, &c.currency)
            ),
            _ => format!("[Coupon] {}: all claimed", c.title),
        },
        commerce_event::Object::Poll(p) => match change {
            C::Created => format!("[Poll] {}", p.question),
            C::Progress => format!("[Poll] {}: {} voted", p.question, p.voters),
            _ => {
                let winner = p
                    .options
                    .iter()
                    .max_by_key(|o| o.votes)
                    .map_or("", |o| o.text.as_str());
                format!("[Poll closed] {}: {winner} leads", p.question)
            }
        },
        commerce_event::Object::Announcement(a) => format!("[Announcement] {}", a.text),
    }
}

/// The lowercase name of a group-buy state (`sold_out`), as the HTTP API
/// and the CLI print it.
pub fn state_name(state: v1::GroupBuyState) -> &'static str {
    match state {
        v1::GroupBuyState::Unspecified => "unspecified",
        v1::GroupBuyState::Open => "open",
        v1::GroupBuyState::Succeeded => "succeeded",
        v1::GroupBuyState::SoldOut => "sold_out",
        v1::GroupBuyState::Failed => "failed",
        v1::GroupBuyState::Cancelled => "cancelled",
    }
}
