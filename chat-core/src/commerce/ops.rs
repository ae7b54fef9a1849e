//! The commerce operations on [`Groups`], and the tick that resolves
//! deadlines and posts coalesced progress.
//!
//! Every operation follows the same pattern as posting a message: under the
//! group's lock it checks the caller, changes the object in memory, and
//! queues the writes (and the event, if the change is one clients must
//! see) as one atomic batch; if the batch cannot be queued, the change is
//! undone before the lock is released. The caller is answered once the
//! batch is durable.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use prost::Message as _;
use qun_proto::v1::{self, CommerceChange, CommerceResult, commerce_event};
use qun_storage::records::{EntryRecord, ProductRecord};
use qun_storage::{StorageError, WriteOp};
use tokio::sync::oneshot;

use super::coupon::Coupon;
use super::group_buy::GroupBuy;
use super::poll::Poll;
use super::product::{self, ProductSlot, check_currency, check_id, check_money, check_text};
use super::{Live, Object, summary};
use crate::group::{GroupCell, GroupState};
use crate::groups::{durable, durable_channel};
use crate::reach::Signal;
use crate::{ChatError, Groups, Identity, Role};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// The furthest a group-buy's or poll's deadline may be.
const MAX_DEADLINE_AHEAD_MS: u64 = 30 * DAY_MS;
/// The furthest a coupon's expiry may be.
const MAX_EXPIRY_AHEAD_MS: u64 = 90 * DAY_MS;

/// Who posts the events nobody in particular caused (deadlines, progress).
const SYSTEM_ID: &str = "qun";
const SYSTEM_NAME: &str = "Qun";

/// What one [`Groups::tick`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    /// Deadlines resolved (group-buys failed or closed, polls closed).
    pub deadlines_resolved: usize,
    /// Coalesced progress events posted.
    pub progress_posted: usize,
    /// Scheduled pushes fired and skipped.
    pub schedules: crate::ScheduleReport,
}

/// Commerce state that is not one group's: products, the objects with
/// progress to broadcast, and every pending deadline.
#[derive(Debug, Default)]
pub(crate) struct CommerceState {
    pub(crate) products: DashMap<String, ProductSlot>,
    /// `(group_id, object_id)` of objects with progress not yet broadcast.
    dirty: DashMap<(u64, u64), ()>,
    /// `(due_ms, group_id, object_id)`; entries of objects that closed
    /// earlier are skipped when they come due.
    deadlines: Mutex<BTreeSet<(u64, u64, u64)>>,
}

impl CommerceState {
    fn deadlines(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64, u64)>> {
        self.deadlines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a group loads: objects with progress left unbroadcast (a
    /// restart came between a join and its progress event) go on the list.
    pub(crate) fn note_restored(
        &self,
        group_id: u64,
        objects: &std::collections::HashMap<u64, Live>,
    ) {
        for (id, live) in objects {
            if live.dirty {
                self.dirty.insert((group_id, *id), ());
            }
        }
    }

    pub(crate) fn add_deadline(&self, due_ms: u64, group_id: u64, object_id: u64) {
        if due_ms > 0 {
            self.deadlines().insert((due_ms, group_id, object_id));
        }
    }

    /// Marks an object's progress for the next tick.
    fn mark_dirty(&self, live: &mut Live, group_id: u64, object_id: u64) {
        if !live.dirty {
            live.dirty = true;
            self.dirty.insert((group_id, object_id), ());
        }
    }
}

/// An event to post: who, what happened, and to what.
pub(crate) struct Event<'a> {
    pub(crate) author: Author<'a>,
    pub(crate) change: CommerceChange,
    pub(crate) object: commerce_event::Object,
}

/// The author of an event.
#[derive(Clone, Copy)]
pub(crate) struct Author<'a> {
    pub(crate) id: &'a str,
    pub(crate) name: &'a str,
    pub(crate) role: Role,
}

impl<'a> Author<'a> {
    pub(crate) fn of(who: &'a Identity) -> Self {
        Self {
            id: who.user_id(),
            name: who.display_name(),
            role: who.role(),
        }
    }

    fn system() -> Self {
        Self {
            id: SYSTEM_ID,
            name: SYSTEM_NAME,
            role: Role::System,
        }
    }
}

pub(crate) type Durable = oneshot::Receiver<Result<(), StorageError>>;

/// Staff of the group's shop.
pub(crate) fn staff_in(
    g: &GroupState,
    who: &Identity,
    action: &'static str,
) -> Result<(), ChatError> {
    if !who.role().is_staff() {
        return Err(ChatError::ForbiddenRole {
            role: who.role().as_str(),
            action,
        });
    }
    g.check_shop(who)
}

/// A buyer who is a member.
fn buyer_in(g: &GroupState, who: &Identity, action: &'static str) -> Result<(), ChatError> {
    if who.role() != Role::Buyer {
        return Err(ChatError::ForbiddenRole {
            role: who.role().as_str(),
            action,
        });
    }
    g.member(who)?;
    g.refuse_if_failed()
}

/// The shop of a staff caller.
fn staff_shop<'a>(who: &'a Identity, action: &'static str) -> Result<&'a str, ChatError> {
    who.shop_id()
        .filter(|_| who.role().is_staff())
        .ok_or(ChatError::ForbiddenRole {
            role: who.role().as_str(),
            action,
        })
}

fn unknown(group_id: u64, object_id: u64) -> ChatError {
    ChatError::UnknownObject {
        group_id,
        object_id,
    }
}

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(msg.into())
}

/// A deadline: in the future, after `after`, at most `max_ahead` from now.
fn check_deadline(
    what: &str,
    at: u64,
    after: u64,
    now_ms: u64,
    max_ahead: u64,
) -> Result<(), ChatError> {
    if at <= now_ms {
        return Err(invalid(format!("{what} {at} is in the past")));
    }
    if at <= after {
        return Err(invalid(format!("{what} must be after the start")));
    }
    if at > now_ms.saturating_add(max_ahead) {
        return Err(invalid(format!(
            "{what} is more than {} days ahead",
            max_ahead / DAY_MS
        )));
    }
    Ok(())
}

impl Live {
    /// The answer for `user_id`: the object and the caller's stake in it.
    fn answer(
        &self,
        user_id: &str,
        result: CommerceResult,
        seq: u64,
        now_ms: u64,
    ) -> v1::CommerceAnswer {
        let mut a = v1::CommerceAnswer {
            result: result as i32,
            seq,
            server_time_ms: now_ms,
            ..Default::default()
        };
        match &self.object {
            Object::GroupBuy(g) => {
                a.joined_by_you = g.has(user_id);
                a.object = Some(v1::commerce_answer::Object::GroupBuy(g.wire.clone()));
            }
            Object::Coupon(c) => {
                a.claimed_by_you = c.held_by(user_id);
                a.object = Some(v1::commerce_answer::Object::Coupon(c.wire.clone()));
            }
            Object::Poll(p) => {
                a.your_vote = p.vote_of(user_id);
                a.object = Some(v1::commerce_answer::Object::Poll(p.wire.clone()));
            }
        }
        a
    }
}

impl Groups {
    /// Under the group's lock: sequences a commerce event and queues it with
    /// `extra` writes as one batch. Returns its seq and its durability.
    fn post_event(
        &self,
        cell: &Arc<GroupCell>,
        g: &mut GroupState,
        event: Event<'_>,
        extra: Vec<WriteOp>,
        now_ms: u64,
    ) -> Result<(u64, Durable), ChatError> {
        self.post_event_to(cell, g, event, None, extra, now_ms)
    }

    /// As [`Groups::post_event`], for `audience` only when given: the
    /// expression and the members it matched (see `push`).
    pub(crate) fn post_event_to(
        &self,
        cell: &Arc<GroupCell>,
        g: &mut GroupState,
        event: Event<'_>,
        audience: Option<(&str, Vec<String>)>,
        extra: Vec<WriteOp>,
        now_ms: u64,
    ) -> Result<(u64, Durable), ChatError> {
        g.refuse_if_failed()?;
        let Event {
            author,
            change,
            object,
        } = event;
        let text = summary(change, &object);
        let body = v1::CommerceEvent {
            change: change as i32,
            object: Some(object),
        }
        .encode_to_vec();
        let mut record = g.next_event(author.id, author.name, author.role, text, body, now_ms);
        if let Some((expr, members)) = audience {
            record.audience_expr = expr.to_string();
            record.audience = members;
        }
        let seq = record.seq;
        let rx = self.submit_sequenced(cell, g, record, extra)?;
        self.inner()
            .stats
            .commerce_events
            .fetch_add(1, Ordering::Relaxed);
        Ok((seq, rx))
    }

    /// Queues writes that post no event.
    fn submit_plain(&self, ops: Vec<WriteOp>) -> Result<Durable, StorageError> {
        let (done, rx) = durable_channel();
        self.inner().store.submit(ops, done)?;
        Ok(rx)
    }

    pub(crate) fn commerce(&self) -> &CommerceState {
        &self.inner().commerce
    }

    /// Loads a product (and the groups with its card) into memory once.
    pub(crate) async fn load_product_slot(
        &self,
        shop_id: &str,
        product_id: &str,
    ) -> Result<String, ChatError> {
        let key = product::slot_key(shop_id, product_id);
        if self.commerce().products.contains_key(&key) {
            return Ok(key);
        }
        let store = &self.inner().store;
        let product = match store.load_product(shop_id, product_id).await? {
            Some(r) => Some(
                v1::Product::decode(&r.body[..])
                    .map_err(|e| StorageError::corrupt("products", e))?,
            ),
            None => None,
        };
        let groups = store
            .groups_with_card(shop_id, product_id)
            .await?
            .into_iter()
            .collect();
        self.commerce()
            .products
            .entry(key.clone())
            .or_insert(ProductSlot { product, groups });
        Ok(key)
    }

    /// Creates or updates one of the caller's shop's products. An update
    /// that changes anything gets the next version and is pushed to every
    /// group holding a card of the product (a PRODUCT_UPDATED event), so
    /// every card shows it in place. Agents and owners only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `WrongShop` (the product names another shop),
    /// `InvalidArgument` (a field out of range; the message names it),
    /// `Storage`.
    pub async fn put_product(
        &self,
        who: &Identity,
        mut product: v1::Product,
        now_ms: u64,
    ) -> Result<v1::Product, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::PutProduct)?;
        let shop = staff_shop(who, "manage products")?;
        if !product.shop_id.is_empty() && product.shop_id != shop {
            return Err(ChatError::WrongShop);
        }
        product::validate(&mut product)?;
        shop.clone_into(&mut product.shop_id);
        let key = self.load_product_slot(shop, &product.product_id).await?;
        let (rx, groups) = {
            let mut slot = self.commerce().products.entry(key).or_default();
            if let Some(old) = &slot.product {
                if product::same_content(old, &product) {
                    return Ok(old.clone());
                }
                product.version = old.version + 1;
            } else {
                product.version = 1;
            }
            product.updated_at_ms = now_ms;
            let rx = self.submit_plain(vec![WriteOp::PutProduct(ProductRecord {
                shop_id: shop.to_string(),
                product_id: product.product_id.clone(),
                body: product.encode_to_vec(),
            })])?;
            let had = slot.product.replace(product.clone()).is_some();
            (
                rx,
                if had {
                    slot.groups.clone()
                } else {
                    BTreeSet::new()
                },
            )
        };
        durable(rx).await?;
        for group_id in groups {
            if let Err(e) = self
                .post_product_update(who, group_id, &product, now_ms)
                .await
            {
                tracing::warn!(group_id, product_id = %product.product_id, error = %e, "card update not posted");
            }
        }
        Ok(product)
    }

    async fn post_product_update(
        &self,
        who: &Identity,
        group_id: u64,
        product: &v1::Product,
        now_ms: u64,
    ) -> Result<(), ChatError> {
        let cell = self.cell(group_id).await?;
        let (_, rx) = {
            let mut g = cell.lock();
            self.post_event(
                &cell,
                &mut g,
                Event {
                    author: Author::of(who),
                    change: CommerceChange::ProductUpdated,
                    object: commerce_event::Object::Product(product.clone()),
                },
                Vec::new(),
                now_ms,
            )?
        };
        durable(rx).await
    }

    /// One of the caller's shop's products. Agents and owners only.
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument` (a malformed id), `UnknownProduct`,
    /// `Storage`.
    pub async fn product(
        &self,
        who: &Identity,
        product_id: &str,
    ) -> Result<v1::Product, ChatError> {
        let shop = staff_shop(who, "read products")?;
        check_id("product_id", product_id, 64)?;
        let key = self.load_product_slot(shop, product_id).await?;
        self.commerce()
            .products
            .get(&key)
            .and_then(|s| s.product.clone())
            .ok_or_else(|| ChatError::UnknownProduct(product_id.to_string()))
    }

    /// Posts a product card. With `product`, the product is first created
    /// or updated from it (see [`Groups::put_product`]); otherwise
    /// `product_id` names one the shop has. Staff of the group's shop only.
    ///
    /// # Errors
    /// `UnknownGroup`, `ForbiddenRole`, `WrongShop`, `InvalidArgument`,
    /// `UnknownProduct`, `Storage`. Nothing changes on an error found before
    /// the product update.
    pub async fn post_card(
        &self,
        who: &Identity,
        req: v1::PostCard,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::PostCard)?;
        let group_id = req.group_id;
        let cell = self.cell(group_id).await?;
        staff_in(&cell.lock(), who, "post a product card")?;
        staff_shop(who, "post a product card")?;
        let product_id = match req.product {
            Some(p) => self.put_product(who, p, now_ms).await?.product_id,
            None => {
                check_id("product_id", &req.product_id, 64)?;
                req.product_id
            }
        };
        let push = crate::push::Push {
            kind: crate::push::PushKind::Card(product_id),
            audience: None,
        };
        let pushed = self.push_now(&cell, Author::of(who), &push, now_ms).await?;
        Ok(v1::CommerceAnswer {
            seq: pushed.seq,
            object: pushed.product.map(v1::commerce_answer::Object::Product),
            server_time_ms: now_ms,
            ..Default::default()
        })
    }

    /// Creates a live object under the group's lock: its id is the seq of
    /// the CREATED event, written with it in one batch.
    async fn create_object(
        &self,
        who: &Identity,
        group_id: u64,
        action: &'static str,
        make: impl FnOnce(u64) -> Object,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        let cell = self.cell(group_id).await?;
        let (answer, rx) = {
            let mut g = cell.lock();
            staff_in(&g, who, action)?;
            let id = g.next_seq();
            let live = Live::new(make(id), now_ms);
            let reach = self.take_reach(&mut g, now_ms)?;
            let extra = vec![WriteOp::PutObject(live.record(group_id, id)), reach];
            let posted = self.post_event(
                &cell,
                &mut g,
                Event {
                    author: Author::of(who),
                    change: CommerceChange::Created,
                    object: live.to_event_object(),
                },
                extra,
                now_ms,
            );
            let (seq, rx) = match posted {
                Ok(p) => p,
                Err(e) => {
                    self.return_reach(&mut g);
                    return Err(e);
                }
            };
            debug_assert_eq!(seq, id);
            self.commerce().add_deadline(live.due_ms(), group_id, id);
            let answer = live.answer(who.user_id(), CommerceResult::Unspecified, seq, now_ms);
            g.objects.insert(id, live);
            (answer, rx)
        };
        durable(rx).await?;
        Ok(answer)
    }

    /// Starts a group-buy (拼团) of one of the shop's products. Staff of the
    /// group's shop only. Its id is the seq of its CREATED event.
    ///
    /// # Errors
    /// `InvalidArgument` (price, target, slots or times out of range; a
    /// deadline in the past), `UnknownGroup`, `ForbiddenRole`, `WrongShop`,
    /// `UnknownProduct`, `Storage`.
    pub async fn start_group_buy(
        &self,
        who: &Identity,
        req: v1::StartGroupBuy,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::StartGroupBuy)?;
        check_id("product_id", &req.product_id, 64)?;
        check_money("price_minor", req.price_minor, 1)?;
        if !(2..=100_000).contains(&req.target) {
            return Err(invalid(format!(
                "target {} is outside 2..=100000",
                req.target
            )));
        }
        if !(req.target..=1_000_000).contains(&req.slots) {
            return Err(invalid(format!(
                "slots {} is outside target..=1000000 ({}..=1000000)",
                req.slots, req.target
            )));
        }
        let starts_at_ms = if req.starts_at_ms == 0 {
            now_ms
        } else {
            req.starts_at_ms
        };
        check_deadline(
            "deadline_ms",
            req.deadline_ms,
            starts_at_ms,
            now_ms,
            MAX_DEADLINE_AHEAD_MS,
        )?;
        let shop = staff_shop(who, "start a group-buy")?;
        {
            let cell = self.cell(req.group_id).await?;
            staff_in(&cell.lock(), who, "start a group-buy")?;
        }
        let key = self.load_product_slot(shop, &req.product_id).await?;
        let product = self
            .commerce()
            .products
            .get(&key)
            .and_then(|s| s.product.clone())
            .ok_or_else(|| ChatError::UnknownProduct(req.product_id.clone()))?;
        let group_id = req.group_id;
        let started_by = who.user_id().to_string();
        self.create_object(
            who,
            group_id,
            "start a group-buy",
            |id| {
                Object::GroupBuy(GroupBuy::new(v1::GroupBuy {
                    group_buy_id: id,
                    group_id,
                    product: Some(product),
                    price_minor: req.price_minor,
                    target: req.target,
                    slots: req.slots,
                    joined: 0,
                    starts_at_ms,
                    deadline_ms: req.deadline_ms,
                    state: v1::GroupBuyState::Open as i32,
                    closed: false,
                    started_by,
                    changed_at_ms: now_ms,
                }))
            },
            now_ms,
        )
        .await
    }

    /// Issues a coupon into a group. Staff of the group's shop only.
    ///
    /// # Errors
    /// `InvalidArgument` (a field out of range, an expiry in the past),
    /// `UnknownGroup`, `ForbiddenRole`, `WrongShop`, `Storage`.
    pub async fn issue_coupon(
        &self,
        who: &Identity,
        mut req: v1::IssueCoupon,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::IssueCoupon)?;
        check_text("title", &mut req.title, 64)?;
        check_money("amount_minor", req.amount_minor, 1)?;
        check_money("min_spend_minor", req.min_spend_minor, 0)?;
        check_currency(&mut req.currency)?;
        if !(1..=10_000_000).contains(&req.quantity) {
            return Err(invalid(format!(
                "quantity {} is outside 1..=10000000",
                req.quantity
            )));
        }
        let per_buyer_limit = if req.per_buyer_limit == 0 {
            1
        } else {
            req.per_buyer_limit
        };
        if per_buyer_limit > 100 {
            return Err(invalid(format!(
                "per_buyer_limit {per_buyer_limit} is above 100"
            )));
        }
        check_deadline(
            "expires_at_ms",
            req.expires_at_ms,
            now_ms,
            now_ms,
            MAX_EXPIRY_AHEAD_MS,
        )?;
        let group_id = req.group_id;
        let issued_by = who.user_id().to_string();
        self.create_object(
            who,
            group_id,
            "issue a coupon",
            |id| {
                Object::Coupon(Coupon::new(v1::Coupon {
                    coupon_id: id,
                    group_id,
                    title: req.title,
                    amount_minor: req.amount_minor,
                    min_spend_minor: req.min_spend_minor,
                    currency: req.currency,
                    quantity: req.quantity,
                    claimed: 0,
                    per_buyer_limit,
                    expires_at_ms: req.expires_at_ms,
                    issued_by,
                    issued_at_ms: now_ms,
                }))
            },
            now_ms,
        )
        .await
    }

    /// Opens a poll. Staff of the group's shop only.
    ///
    /// # Errors
    /// `InvalidArgument` (question or options out of range, a deadline in
    /// the past), `UnknownGroup`, `ForbiddenRole`, `WrongShop`, `Storage`.
    pub async fn open_poll(
        &self,
        who: &Identity,
        mut req: v1::OpenPoll,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::OpenPoll)?;
        check_text("question", &mut req.question, 200)?;
        if !(2..=10).contains(&req.options.len()) {
            return Err(invalid(format!(
                "a poll has 2 to 10 options, not {}",
                req.options.len()
            )));
        }
        for option in &mut req.options {
            check_text("option", option, 100)?;
        }
        check_deadline(
            "deadline_ms",
            req.deadline_ms,
            now_ms,
            now_ms,
            MAX_DEADLINE_AHEAD_MS,
        )?;
        let group_id = req.group_id;
        let opened_by = who.user_id().to_string();
        self.create_object(
            who,
            group_id,
            "open a poll",
            |id| {
                Object::Poll(Poll::new(v1::Poll {
                    poll_id: id,
                    group_id,
                    question: req.question,
                    options: req
                        .options
                        .into_iter()
                        .map(|text| v1::PollOption { text, votes: 0 })
                        .collect(),
                    deadline_ms: req.deadline_ms,
                    votes_final: req.votes_final,
                    closed: false,
                    voters: 0,
                    opened_by,
                    opened_at_ms: now_ms,
                }))
            },
            now_ms,
        )
        .await
    }

    /// A buyer acts on an object: `act` changes it in memory and says what
    /// to write; the writes (and a STATE event when `act` reports one) are
    /// queued under the lock, or the change is undone.
    async fn buyer_action(
        &self,
        who: &Identity,
        group_id: u64,
        object_id: u64,
        action: &'static str,
        now_ms: u64,
        act: impl FnOnce(&mut Live) -> Result<Acted, ChatError>,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        let cell = self.cell(group_id).await?;
        let (answer, rx) = {
            let mut g = cell.lock();
            buyer_in(&g, who, action)?;
            let live = g
                .objects
                .get_mut(&object_id)
                .ok_or_else(|| unknown(group_id, object_id))?;
            let acted = act(live)?;
            let Some(write) = acted.write else {
                return Ok(live.answer(who.user_id(), acted.result, 0, now_ms));
            };
            let state_change = if acted.state_changed {
                live.dirty = false;
                live.progress_at_ms = now_ms;
                Some((live.to_event_object(), live.record(group_id, object_id)))
            } else {
                self.commerce().mark_dirty(live, group_id, object_id);
                None
            };
            let submitted = match state_change {
                Some((object, record)) => self.post_event(
                    &cell,
                    &mut g,
                    Event {
                        author: Author::system(),
                        change: CommerceChange::State,
                        object,
                    },
                    vec![write, WriteOp::PutObject(record)],
                    now_ms,
                ),
                None => self
                    .submit_plain(vec![write])
                    .map(|rx| (0, rx))
                    .map_err(ChatError::from),
            };
            let live = g
                .objects
                .get_mut(&object_id)
                .ok_or_else(|| unknown(group_id, object_id))?;
            match submitted {
                Ok((seq, rx)) => {
                    let answer = live.answer(who.user_id(), acted.result, seq, now_ms);
                    let signal = match acted.result {
                        CommerceResult::Joined => Some(Signal::GroupBuyJoined),
                        CommerceResult::Claimed => Some(Signal::CouponClaimed),
                        CommerceResult::Voted => Some(Signal::PollVoted),
                        _ => None,
                    };
                    if let Some(signal) = signal {
                        self.record_signal(&g.record.shop_id, signal, now_ms);
                    }
                    (answer, rx)
                }
                Err(e) => {
                    (acted.undo)(live);
                    return Err(e);
                }
            }
        };
        durable(rx).await?;
        self.inner()
            .stats
            .commerce_actions
            .fetch_add(1, Ordering::Relaxed);
        Ok(answer)
    }

    /// Joins a group-buy. Buyers who are members only. Idempotent: a second
    /// join answers `ALREADY_JOINED`; `SOLD_OUT`, `CLOSED` and
    /// `NOT_STARTED` are results, not errors. No slot is ever oversold: the
    /// check and the taking happen under the group's lock. Answered once
    /// the participation is durable; the group sees the count in coalesced
    /// progress events, and a join that reaches the target or takes the
    /// last slot posts the state change at once.
    ///
    /// # Errors
    /// `UnknownGroup`, `ForbiddenRole` (staff), `NotMember`,
    /// `UnknownObject` (no such group-buy), `Storage`.
    pub async fn join_group_buy(
        &self,
        who: &Identity,
        group_id: u64,
        group_buy_id: u64,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::JoinGroupBuy)?;
        let user = who.user_id().to_string();
        self.buyer_action(
            who,
            group_id,
            group_buy_id,
            "join a group-buy",
            now_ms,
            |live| {
                let Object::GroupBuy(gb) = &mut live.object else {
                    return Err(unknown(group_id, group_buy_id));
                };
                let joined = gb.join(&user, now_ms);
                let Some(before) = joined.before else {
                    return Ok(Acted::nothing(joined.result));
                };
                Ok(Acted {
                    result: joined.result,
                    write: Some(WriteOp::PutEntry(EntryRecord {
                        group_id,
                        object_id: group_buy_id,
                        user_id: user.clone(),
                        value: now_ms,
                    })),
                    state_changed: joined.transition.is_some(),
                    undo: Box::new(move |live| {
                        if let Object::GroupBuy(gb) = &mut live.object {
                            gb.undo_join(&user, before);
                        }
                    }),
                })
            },
        )
        .await
    }

    /// Leaves a group-buy while it is OPEN (short of its target).
    ///
    /// # Errors
    /// As for [`Groups::join_group_buy`].
    pub async fn leave_group_buy(
        &self,
        who: &Identity,
        group_id: u64,
        group_buy_id: u64,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::JoinGroupBuy)?;
        let user = who.user_id().to_string();
        self.buyer_action(
            who,
            group_id,
            group_buy_id,
            "leave a group-buy",
            now_ms,
            |live| {
                let Object::GroupBuy(gb) = &mut live.object else {
                    return Err(unknown(group_id, group_buy_id));
                };
                let joined_at = gb.joined_at(&user).unwrap_or(now_ms);
                let result = gb.leave(&user, now_ms);
                if result != CommerceResult::Left {
                    return Ok(Acted::nothing(result));
                }
                Ok(Acted {
                    result,
                    write: Some(WriteOp::RemoveEntry {
                        group_id,
                        object_id: group_buy_id,
                        user_id: user.clone(),
                    }),
                    state_changed: false,
                    undo: Box::new(move |live| {
                        if let Object::GroupBuy(gb) = &mut live.object {
                            gb.undo_leave(&user, joined_at);
                        }
                    }),
                })
            },
        )
        .await
    }

    /// Claims one coupon. Buyers who are members only. `EXHAUSTED`,
    /// `EXPIRED` and `LIMIT_REACHED` are results; the claim that takes the
    /// last coupon posts a STATE event once.
    ///
    /// # Errors
    /// `UnknownGroup`, `ForbiddenRole`, `NotMember`, `UnknownObject`,
    /// `Storage`.
    pub async fn claim_coupon(
        &self,
        who: &Identity,
        group_id: u64,
        coupon_id: u64,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ClaimCoupon)?;
        let user = who.user_id().to_string();
        self.buyer_action(who, group_id, coupon_id, "claim a coupon", now_ms, |live| {
            let Object::Coupon(c) = &mut live.object else {
                return Err(unknown(group_id, coupon_id));
            };
            let claimed = c.claim(&user, now_ms);
            if claimed.result != CommerceResult::Claimed {
                return Ok(Acted::nothing(claimed.result));
            }
            Ok(Acted {
                result: claimed.result,
                write: Some(WriteOp::PutEntry(EntryRecord {
                    group_id,
                    object_id: coupon_id,
                    user_id: user.clone(),
                    value: u64::from(claimed.held),
                })),
                state_changed: claimed.exhausted_now,
                undo: Box::new(move |live| {
                    if let Object::Coupon(c) = &mut live.object {
                        c.undo_claim(&user);
                    }
                }),
            })
        })
        .await
    }

    /// Votes in a poll, or changes one's vote (unless votes are final).
    /// Buyers who are members only; tallies reach the group in coalesced
    /// progress events.
    ///
    /// # Errors
    /// `InvalidArgument` (no such option), `UnknownGroup`, `ForbiddenRole`,
    /// `NotMember`, `UnknownObject`, `Storage`.
    pub async fn vote(
        &self,
        who: &Identity,
        group_id: u64,
        poll_id: u64,
        option: u32,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::Vote)?;
        let user = who.user_id().to_string();
        self.buyer_action(who, group_id, poll_id, "vote", now_ms, |live| {
            let Object::Poll(p) = &mut live.object else {
                return Err(unknown(group_id, poll_id));
            };
            if option as usize >= p.wire.options.len() {
                return Err(invalid(format!(
                    "option {option} is outside 0..{}",
                    p.wire.options.len()
                )));
            }
            let voted = p.vote(&user, option, now_ms);
            let Some(before) = voted.before else {
                return Ok(Acted::nothing(voted.result));
            };
            Ok(Acted {
                result: voted.result,
                write: Some(WriteOp::PutEntry(EntryRecord {
                    group_id,
                    object_id: poll_id,
                    user_id: user.clone(),
                    value: u64::from(option),
                })),
                state_changed: false,
                undo: Box::new(move |live| {
                    if let Object::Poll(p) = &mut live.object {
                        p.set(&user, before);
                    }
                }),
            })
        })
        .await
    }

    /// A commerce object's current state with the caller's stake. Members
    /// and the shop's staff.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `WrongShop`, `UnknownObject`, `Storage`.
    pub async fn commerce_object(
        &self,
        who: &Identity,
        group_id: u64,
        object_id: u64,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ViewCommerce)?;
        let cell = self.cell(group_id).await?;
        let g = cell.lock();
        g.check_member_or_staff(who)?;
        let live = g
            .objects
            .get(&object_id)
            .ok_or_else(|| unknown(group_id, object_id))?;
        Ok(live.answer(who.user_id(), CommerceResult::Unspecified, 0, now_ms))
    }

    /// Ends an object early: a group-buy that is not closed is cancelled, a
    /// poll closes with its final result. Staff of the group's shop only.
    /// Ending what is already closed changes nothing and answers `CLOSED`
    /// (group-buys) or `VOTE_CLOSED` (polls).
    ///
    /// # Errors
    /// `InvalidArgument` (a coupon: coupons end at their expiry),
    /// `UnknownGroup`, `ForbiddenRole`, `WrongShop`, `UnknownObject`,
    /// `Storage`.
    pub async fn end_commerce(
        &self,
        who: &Identity,
        group_id: u64,
        object_id: u64,
        now_ms: u64,
    ) -> Result<v1::CommerceAnswer, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::EndCommerce)?;
        let cell = self.cell(group_id).await?;
        let (answer, rx) = {
            let mut g = cell.lock();
            staff_in(&g, who, "end a group-buy or poll")?;
            let live = g
                .objects
                .get_mut(&object_id)
                .ok_or_else(|| unknown(group_id, object_id))?;
            let (ended, refused) = match &mut live.object {
                Object::GroupBuy(gb) => (gb.cancel(now_ms).is_some(), CommerceResult::Closed),
                Object::Poll(p) => (p.close(now_ms, true), CommerceResult::VoteClosed),
                Object::Coupon(_) => {
                    return Err(invalid(
                        "coupons end at their expiry and cannot be ended early",
                    ));
                }
            };
            if !ended {
                return Ok(live.answer(who.user_id(), refused, 0, now_ms));
            }
            let (seq, rx) = self.post_closing(&cell, &mut g, object_id, Author::of(who), now_ms)?;
            let live = g
                .objects
                .get(&object_id)
                .ok_or_else(|| unknown(group_id, object_id))?;
            (
                live.answer(who.user_id(), CommerceResult::Unspecified, seq, now_ms),
                rx,
            )
        };
        durable(rx).await?;
        Ok(answer)
    }

    /// Resolves deadlines that have come and posts coalesced progress. The
    /// gateway calls it a few times a second and once at start-up (so a
    /// deadline that passed while the server was down resolves then). Time
    /// is passed in, so a test drives objects through their deadlines
    /// without sleeping.
    pub async fn tick(&self, now_ms: u64) -> TickReport {
        let mut report = TickReport::default();
        let due: Vec<(u64, u64, u64)> = {
            let mut deadlines = self.commerce().deadlines();
            let mut due = Vec::new();
            while let Some(&first) = deadlines.first() {
                if first.0 > now_ms {
                    break;
                }
                deadlines.pop_first();
                due.push(first);
            }
            due
        };
        for (due_ms, group_id, object_id) in due {
            match self.resolve_deadline(group_id, object_id, now_ms).await {
                Ok(true) => report.deadlines_resolved += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(group_id, object_id, error = %e, "deadline not resolved; will retry");
                    self.commerce().add_deadline(due_ms, group_id, object_id);
                }
            }
        }
        let dirty: Vec<(u64, u64)> = self.commerce().dirty.iter().map(|e| *e.key()).collect();
        for (group_id, object_id) in dirty {
            if self.post_progress(group_id, object_id, now_ms) {
                report.progress_posted += 1;
            }
        }
        self.flush_feedback(now_ms);
        report.schedules = self.fire_schedules(now_ms).await;
        self.cs_tick(now_ms).await;
        let stats = &self.inner().stats;
        stats
            .deadlines_resolved
            .fetch_add(report.deadlines_resolved as u64, Ordering::Relaxed);
        stats
            .progress_events
            .fetch_add(report.progress_posted as u64, Ordering::Relaxed);
        stats
            .scheduled_fired
            .fetch_add(report.schedules.fired as u64, Ordering::Relaxed);
        stats
            .scheduled_skipped
            .fetch_add(report.schedules.skipped as u64, Ordering::Relaxed);
        report
    }

    async fn resolve_deadline(
        &self,
        group_id: u64,
        object_id: u64,
        now_ms: u64,
    ) -> Result<bool, ChatError> {
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            let Some(live) = g.objects.get_mut(&object_id) else {
                return Ok(false);
            };
            let changed = match &mut live.object {
                Object::GroupBuy(gb) => gb.expire(now_ms).is_some(),
                Object::Poll(p) => p.close(now_ms, false),
                Object::Coupon(_) => false,
            };
            if !changed {
                // Ended earlier, or a stale entry: re-add a real deadline.
                self.commerce()
                    .add_deadline(live.due_ms(), group_id, object_id);
                return Ok(false);
            }
            self.post_closing(&cell, &mut g, object_id, Author::system(), now_ms)?
                .1
        };
        durable(rx).await?;
        Ok(true)
    }

    /// Under the group's lock, after `object_id` was just closed (ended
    /// early or at its deadline): posts its STATE event with its record.
    /// If the batch cannot be queued, the object is reopened, so nothing
    /// changed.
    fn post_closing(
        &self,
        cell: &Arc<GroupCell>,
        g: &mut GroupState,
        object_id: u64,
        author: Author<'_>,
        now_ms: u64,
    ) -> Result<(u64, Durable), ChatError> {
        let group_id = g.id();
        let live = g
            .objects
            .get_mut(&object_id)
            .ok_or_else(|| unknown(group_id, object_id))?;
        live.dirty = false;
        let event = Event {
            author,
            change: CommerceChange::State,
            object: live.to_event_object(),
        };
        let record = live.record(group_id, object_id);
        let posted = self.post_event(cell, g, event, vec![WriteOp::PutObject(record)], now_ms);
        if posted.is_err()
            && let Some(live) = g.objects.get_mut(&object_id)
        {
            reopen(live);
        }
        posted
    }

    /// Posts one object's progress if its interval has passed; `true` when
    /// an event was posted.
    fn post_progress(&self, group_id: u64, object_id: u64, now_ms: u64) -> bool {
        let commerce = self.commerce();
        let Some(cell) = self.loaded_cell(group_id) else {
            commerce.dirty.remove(&(group_id, object_id));
            return false;
        };
        let mut g = cell.lock();
        let interval = self.inner().config.progress_interval_ms;
        let Some(live) = g.objects.get_mut(&object_id) else {
            commerce.dirty.remove(&(group_id, object_id));
            return false;
        };
        if live.dirty && now_ms < live.progress_at_ms.saturating_add(interval) {
            return false;
        }
        commerce.dirty.remove(&(group_id, object_id));
        if !live.dirty {
            return false;
        }
        live.dirty = false;
        live.progress_at_ms = now_ms;
        let object = live.to_event_object();
        // The record follows each broadcast, so a restart can tell whether
        // progress was left unbroadcast (see `Live::restore`).
        let record = live.record(group_id, object_id);
        match self.post_event(
            &cell,
            &mut g,
            Event {
                author: Author::system(),
                change: CommerceChange::Progress,
                object,
            },
            vec![WriteOp::PutObject(record)],
            now_ms,
        ) {
            // Published when durable; nobody waits for it.
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(group_id, object_id, error = %e, "progress not posted");
                false
            }
        }
    }
}

/// Puts an object that a failed write was closing back to open.
fn reopen(live: &mut Live) {
    match &mut live.object {
        Object::GroupBuy(gb) => gb.reopen(),
        Object::Poll(p) => p.wire.closed = false,
        Object::Coupon(_) => {}
    }
}

/// What a buyer's action changed.
struct Acted {
    result: CommerceResult,
    /// The entry write; `None` when nothing changed.
    write: Option<WriteOp>,
    /// The object's state changed (broadcast now, not as progress).
    state_changed: bool,
    undo: Box<dyn FnOnce(&mut Live) + Send>,
}

impl Acted {
    fn nothing(result: CommerceResult) -> Self {
        Self {
            result,
            write: None,
            state_changed: false,
            undo: Box::new(|_| {}),
        }
    }
}
