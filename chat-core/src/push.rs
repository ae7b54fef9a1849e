//! Pushes: promotions staff send on purpose — a product card or a broadcast
//! announcement — to the whole group or to a segment of it.
//!
//! A targeted push carries a tag expression (`vip AND size:s`, see
//! [`crate::segments`]). It is evaluated once, when the push is sent, over
//! the group's buyers and their tags in the shop; the buyers it matches are
//! stored with the message. Only they (and staff) get it; every other
//! member gets a HIDDEN placeholder at its seq — live, in history, in a
//! join's recent messages and on resume — so sequences stay gap-free and
//! nobody outside the segment learns what was pushed. Buyers who join
//! later, or whose tags change later, are not in a past push's audience.
//!
//! Every push takes one unit of the group's reach quota
//! ([`crate::reach`]), in the same batch as its message. A targeted push
//! that matches no buyer is refused before it takes anything.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use futures_util::StreamExt as _;
use prost::Message as _;
use qun_proto::v1::{self, CommerceChange, commerce_event, push_content};
use qun_storage::WriteOp;

use crate::commerce::{Author, Durable, Event, staff_in};
use crate::group::GroupCell;
use crate::permissions::{Operation, require};
use crate::segments::TagExpr;
use crate::{ChatError, Groups, Identity};

/// Longest announcement, in bytes.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 2_000;

/// Buyers whose tags one store call reads while resolving an audience:
/// large enough that a call's fixed cost is spread thin, small enough that
/// one call does not hold a read thread for long.
pub(crate) const TAG_READ_CHUNK: usize = 1024;

/// Store calls outstanding while resolving an audience (one per core here).
const TAG_CHUNKS_IN_FLIGHT: usize = 2;

/// A checked push: what it carries and to whom.
#[derive(Debug, Clone)]
pub(crate) struct Push {
    pub(crate) kind: PushKind,
    /// The expression as given, and parsed.
    pub(crate) audience: Option<(String, TagExpr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PushKind {
    /// A card of this product of the shop.
    Card(String),
    /// A broadcast announcement.
    Announcement(String),
}

impl Push {
    /// Checks what a client asked to push.
    ///
    /// # Errors
    /// `InvalidArgument`: no content, a malformed product id, an empty or
    /// oversized announcement, a malformed tag expression.
    pub(crate) fn parse(content: Option<&v1::PushContent>) -> Result<Self, ChatError> {
        let content = content
            .ok_or_else(|| invalid("content is required: a product_id or an announcement"))?;
        let kind = match &content.kind {
            Some(push_content::Kind::ProductId(id)) => {
                crate::commerce::check_id("product_id", id, 64)?;
                PushKind::Card(id.clone())
            }
            Some(push_content::Kind::Announcement(text)) => {
                let text = text.trim();
                if text.is_empty() || text.len() > MAX_ANNOUNCEMENT_BYTES {
                    return Err(invalid(format!(
                        "an announcement is 1 to {MAX_ANNOUNCEMENT_BYTES} bytes of text"
                    )));
                }
                PushKind::Announcement(text.to_string())
            }
            None => return Err(invalid("content needs a product_id or an announcement")),
        };
        let audience = match content.audience.trim() {
            "" => None,
            expr => Some((expr.to_string(), TagExpr::parse(expr)?)),
        };
        Ok(Self { kind, audience })
    }

    /// Back to the wire (as schedules store and list it).
    pub(crate) fn to_wire(&self) -> v1::PushContent {
        v1::PushContent {
            kind: Some(match &self.kind {
                PushKind::Card(id) => push_content::Kind::ProductId(id.clone()),
                PushKind::Announcement(t) => push_content::Kind::Announcement(t.clone()),
            }),
            audience: self
                .audience
                .as_ref()
                .map(|(e, _)| e.clone())
                .unwrap_or_default(),
        }
    }

    /// Encoded for a schedule's record.
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.to_wire().encode_to_vec()
    }
}

fn invalid(m: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(m.into())
}

/// A push on its way: its seq, how many buyers it targets (0: everyone),
/// the product shown (for a card) and its durability.
pub(crate) struct Posted {
    pub(crate) seq: u64,
    pub(crate) audience_size: u32,
    pub(crate) product: Option<v1::Product>,
    pub(crate) rx: Durable,
}

/// A push that is durable (see [`Posted`]).
pub(crate) struct Pushed {
    pub(crate) seq: u64,
    pub(crate) audience_size: u32,
    pub(crate) product: Option<v1::Product>,
}

impl Groups {
    /// Pushes a product card or an announcement to the group, or with an
    /// audience expression to the buyers it matches. Staff of the group's
    /// shop. Answered once the message is durable.
    ///
    /// # Errors
    /// `ForbiddenRole`, `UnknownGroup`, `WrongShop`, `InvalidArgument` (see
    /// `Push`), `UnknownProduct`, `NoAudience` (the expression matches no
    /// buyer of the group; nothing was pushed), `QuotaExhausted`, `Storage`.
    pub async fn push_promotion(
        &self,
        who: &Identity,
        req: v1::PushPromotion,
        now_ms: u64,
    ) -> Result<v1::PromotionPushed, ChatError> {
        require(who, Operation::PushPromotion)?;
        let push = Push::parse(req.content.as_ref())?;
        let cell = self.cell(req.group_id).await?;
        staff_in(&cell.lock(), who, "push a promotion")?;
        let pushed = self.push_now(&cell, Author::of(who), &push, now_ms).await?;
        Ok(v1::PromotionPushed {
            group_id: req.group_id,
            seq: pushed.seq,
            audience_size: pushed.audience_size,
        })
    }

    /// Posts `push` now, in `author`'s name, and waits until it is
    /// durable.
    ///
    /// # Errors
    /// As [`Groups::post_push`].
    pub(crate) async fn push_now(
        &self,
        cell: &Arc<GroupCell>,
        author: Author<'_>,
        push: &Push,
        now_ms: u64,
    ) -> Result<Pushed, ChatError> {
        let posted = self
            .post_push(
                cell,
                author,
                push,
                |_| Ok((Vec::new(), ())),
                |()| {},
                now_ms,
            )
            .await?;
        crate::groups::durable(posted.rx).await?;
        Ok(Pushed {
            seq: posted.seq,
            audience_size: posted.audience_size,
            product: posted.product,
        })
    }

    /// Posts `push` in `author`'s name. Under the group's lock, `extra` is
    /// asked for more writes of the same batch given the seq the push will
    /// get (a schedule's next occurrence; its error stops the push), with
    /// a value that `posted` is handed once the batch is queued.
    ///
    /// # Errors
    /// As [`Groups::push_promotion`] after the role checks, and `extra`'s.
    pub(crate) async fn post_push<T>(
        &self,
        cell: &Arc<GroupCell>,
        author: Author<'_>,
        push: &Push,
        extra: impl FnOnce(u64) -> Result<(Vec<WriteOp>, T), ChatError>,
        posted: impl FnOnce(T),
        now_ms: u64,
    ) -> Result<Posted, ChatError> {
        let (group_id, shop) = {
            let g = cell.lock();
            (g.id(), g.record.shop_id.clone())
        };
        let audience = match &push.audience {
            None => None,
            Some((text, expr)) => {
                let members = self.audience_of(cell, &shop, expr).await?;
                if members.is_empty() {
                    return Err(ChatError::NoAudience {
                        expression: text.clone(),
                    });
                }
                Some((text.as_str(), members))
            }
        };
        let audience_size = audience.as_ref().map_or(0, |(_, m)| m.len() as u32);
        // A card shows the product as it is now; the group is noted as
        // holding a card of it, so later updates reach the card.
        let (object, card) = match &push.kind {
            PushKind::Card(product_id) => {
                let key = self.load_product_slot(&shop, product_id).await?;
                let (product, new_card) = {
                    let mut slot = self.commerce().products.entry(key.clone()).or_default();
                    let p = slot
                        .product
                        .clone()
                        .ok_or_else(|| ChatError::UnknownProduct(product_id.clone()))?;
                    (p, slot.groups.insert(group_id))
                };
                (
                    commerce_event::Object::Product(product),
                    Some((key, product_id, new_card)),
                )
            }
            PushKind::Announcement(text) => (
                commerce_event::Object::Announcement(v1::Announcement { text: text.clone() }),
                None,
            ),
        };
        let product = match &object {
            commerce_event::Object::Product(p) => Some(p.clone()),
            _ => None,
        };
        let result = {
            let mut g = cell.lock();
            (|| {
                let (mut ops, handed) = extra(g.next_seq())?;
                if let Some((_, product_id, true)) = &card {
                    ops.push(WriteOp::PutCard {
                        shop_id: shop.clone(),
                        product_id: (*product_id).clone(),
                        group_id,
                    });
                }
                ops.push(self.take_reach(&mut g, now_ms)?);
                let event = Event {
                    author,
                    change: CommerceChange::Created,
                    object,
                };
                match self.post_event_to(cell, &mut g, event, audience, ops, now_ms) {
                    Ok((seq, rx)) => {
                        posted(handed);
                        Ok((seq, rx))
                    }
                    Err(e) => {
                        self.return_reach(&mut g);
                        Err(e)
                    }
                }
            })()
        };
        match result {
            Ok((seq, rx)) => Ok(Posted {
                seq,
                audience_size,
                product,
                rx,
            }),
            Err(e) => {
                if let Some((key, _, true)) = card
                    && let Some(mut slot) = self.commerce().products.get_mut(&key)
                {
                    slot.groups.remove(&group_id);
                }
                Err(e)
            }
        }
    }

    /// The buyers of the group whose tags in `shop` match `expr`, sorted.
    ///
    /// The tags are read [`TAG_READ_CHUNK`] buyers per store call. A buyer
    /// without tags matches when `expr` matches no tags (`NOT vip`).
    async fn audience_of(
        &self,
        cell: &Arc<GroupCell>,
        shop: &str,
        expr: &TagExpr,
    ) -> Result<Vec<String>, ChatError> {
        let buyers = cell.lock().buyer_ids();
        let untagged_match = expr.matches(&BTreeSet::new());
        let store = &self.inner().store;
        // A refill loop rather than `buffer_unordered`: its closure over
        // borrowed chunks makes the request's future lose `Send` (rustc:
        // "implementation of `FnOnce` is not general enough").
        let mut chunks = buyers.chunks(TAG_READ_CHUNK);
        let mut reads = futures_util::stream::FuturesUnordered::new();
        let mut matched = Vec::new();
        loop {
            while reads.len() < TAG_CHUNKS_IN_FLIGHT {
                let Some(chunk) = chunks.next() else { break };
                reads.push(async move { (chunk, store.load_buyer_tags_of(shop, chunk).await) });
            }
            let Some((chunk, records)) = reads.next().await else {
                break;
            };
            // Who of the chunk has tags: only needed when the untagged match.
            let mut tagged = HashSet::new();
            for record in records? {
                let tags: BTreeSet<String> = record.tags.into_iter().collect();
                if expr.matches(&tags) {
                    matched.push(record.user_id.clone());
                }
                if untagged_match {
                    tagged.insert(record.user_id);
                }
            }
            if untagged_match {
                matched.extend(chunk.iter().filter(|u| !tagged.contains(*u)).cloned());
            }
        }
        matched.sort_unstable();
        Ok(matched)
    }
}
