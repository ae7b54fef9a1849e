//! Read coalescing: many callers asking for the same page of the same group
//! at once share one query.
//!
//! In a flash sale thousands of phones open the group together and page
//! back through the same recent history, or reconnect together and resume
//! from the same seq. [`Coalescing`] wraps any [`Store`] and lets the first
//! caller for a page run the query while the others wait for its answer.
//!
//! # Never staler than asked
//! A caller may join a query already in flight only if no message of that
//! group became durable, or was rewritten durably (a recall), since the
//! query was started. So a shared answer holds every message as it was
//! durable when the caller asked: exactly what it would have got from its
//! own query. The wrapper learns when messages become durable by watching
//! the callbacks of the writes passed through it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::OnceCell;

use crate::records::{
    AutoReplyRecord, BuyerTagsRecord, CsBuyerRecord, CsShopRecord, EntryRecord, FaqRecord,
    GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord, ObjectRecord,
    ProductRecord, ReportRecord, ScheduleRecord, SentRecord,
};
use crate::{BoxFuture, Due, DurableCallback, FeedbackDay, ReachUse, StorageError, Store, WriteOp};

/// Which page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Page {
    Before {
        group_id: u64,
        seq: u64,
        limit: usize,
    },
    After {
        group_id: u64,
        seq: u64,
        limit: usize,
    },
}

impl Page {
    fn group_id(&self) -> u64 {
        match self {
            Page::Before { group_id, .. } | Page::After { group_id, .. } => *group_id,
        }
    }
}

type Shared = Result<Arc<Vec<MessageRecord>>, Arc<StorageError>>;

/// One query in flight and the callers waiting for it.
#[derive(Debug)]
struct Flight {
    /// The group's durable-append count when the query was started.
    epoch: u64,
    answer: OnceCell<Shared>,
}

/// How many page reads went to the inner store, and how many were answered
/// by sharing another caller's query.
#[derive(Debug, Default)]
pub struct CoalescingStats {
    /// Page reads that ran a query.
    pub queries: AtomicU64,
    /// Page reads answered from a query another caller started.
    pub shared: AtomicU64,
}

/// A [`Store`] whose history page reads ([`Store::messages_before`],
/// [`Store::messages_after`]) are shared between concurrent callers. Every
/// other call goes straight to the inner store.
///
/// ```
/// use std::sync::Arc;
/// use qun_storage::{Coalescing, FjallConfig, FjallStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store: Arc<dyn Store> =
///     Arc::new(Coalescing::new(FjallStore::open(FjallConfig::new(dir.path()))?));
/// assert!(store.messages_before(1, u64::MAX, 50).await?.is_empty());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Coalescing<S> {
    inner: S,
    flights: DashMap<Page, Arc<Flight>>,
    /// Messages made durable per group through this wrapper.
    epochs: Arc<DashMap<u64, u64>>,
    stats: Arc<CoalescingStats>,
}

impl<S: Store> Coalescing<S> {
    /// Wraps `inner`. Every write must go through the wrapper (it learns of
    /// new messages from their callbacks).
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            flights: DashMap::new(),
            epochs: Arc::new(DashMap::new()),
            stats: Arc::new(CoalescingStats::default()),
        }
    }

    /// The counters, shared: they keep counting after this call.
    pub fn stats(&self) -> Arc<CoalescingStats> {
        self.stats.clone()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn epoch(&self, group_id: u64) -> u64 {
        self.epochs.get(&group_id).map_or(0, |e| *e)
    }

    async fn page<F>(&self, page: Page, query: F) -> Result<Vec<MessageRecord>, StorageError>
    where
        F: Future<Output = Result<Vec<MessageRecord>, StorageError>>,
    {
        let epoch = self.epoch(page.group_id());
        let flight = match self.flights.entry(page) {
            // Started after every message the caller must see: share it.
            Entry::Occupied(e) if e.get().epoch >= epoch => {
                self.stats.shared.fetch_add(1, Ordering::Relaxed);
                e.get().clone()
            }
            entry => {
                let fresh = Arc::new(Flight {
                    epoch,
                    answer: OnceCell::new(),
                });
                // A flight started before newer messages is replaced: later
                // callers must not get its older answer.
                entry.insert_entry(fresh.clone());
                self.stats.queries.fetch_add(1, Ordering::Relaxed);
                fresh
            }
        };
        // If the caller that started the query goes away, the next waiter
        // runs it (`OnceCell` hands the initialisation on).
        let answer = flight
            .answer
            .get_or_init(|| async { query.await.map(Arc::new).map_err(Arc::new) })
            .await
            .clone();
        self.flights
            .remove_if(&page, |_, f| Arc::ptr_eq(f, &flight));
        match answer {
            Ok(messages) => Ok(messages.as_ref().clone()),
            Err(e) => Err(e.duplicate()),
        }
    }
}

impl<S: Store> Store for Coalescing<S> {
    fn submit(&self, ops: Vec<WriteOp>, done: DurableCallback) -> Result<(), StorageError> {
        let mut groups: Vec<u64> = ops
            .iter()
            .filter_map(|op| match op {
                // New messages, and changed ones (a recall, a quote
                // scrubbed): either makes a page read before it stale.
                WriteOp::AppendMessage(m) | WriteOp::RewriteMessage(m) => Some(m.group_id),
                _ => None,
            })
            .collect();
        if groups.is_empty() {
            return self.inner.submit(ops, done);
        }
        groups.dedup();
        let epochs = self.epochs.clone();
        self.inner.submit(
            ops,
            Box::new(move |result| {
                if result.is_ok() {
                    // Before anyone can see the messages: a read asked after
                    // this cannot join a query started before it.
                    for g in groups {
                        *epochs.entry(g).or_insert(0) += 1;
                    }
                }
                done(result);
            }),
        )
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.flush()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.close()
    }

    fn load_group(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<GroupRecord>, StorageError>> {
        self.inner.load_group(group_id)
    }

    fn load_members(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<MemberRecord>, StorageError>> {
        self.inner.load_members(group_id)
    }

    fn groups_of_user(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.inner.groups_of_user(user_id)
    }

    fn max_group_id(&self) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.inner.max_group_id()
    }

    fn last_seq(&self, group_id: u64) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.inner.last_seq(group_id)
    }

    fn messages_before(
        &self,
        group_id: u64,
        before_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        let page = Page::Before {
            group_id,
            seq: before_seq,
            limit,
        };
        Box::pin(self.page(
            page,
            self.inner.messages_before(group_id, before_seq, limit),
        ))
    }

    fn messages_after(
        &self,
        group_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        let page = Page::After {
            group_id,
            seq: after_seq,
            limit,
        };
        Box::pin(self.page(page, self.inner.messages_after(group_id, after_seq, limit)))
    }

    fn find_sent<'a>(
        &'a self,
        group_id: u64,
        sender_id: &'a str,
        client_msg_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SentRecord>, StorageError>> {
        self.inner.find_sent(group_id, sender_id, client_msg_id)
    }

    fn replies_to(&self, group_id: u64, seq: u64) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.inner.replies_to(group_id, seq)
    }

    fn load_read_marks(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
        self.inner.load_read_marks(group_id)
    }

    fn load_objects(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ObjectRecord>, StorageError>> {
        self.inner.load_objects(group_id)
    }

    fn load_entries(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<EntryRecord>, StorageError>> {
        self.inner.load_entries(group_id)
    }

    fn due_objects(&self) -> BoxFuture<'_, Result<Vec<Due>, StorageError>> {
        self.inner.due_objects()
    }

    fn load_product<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProductRecord>, StorageError>> {
        self.inner.load_product(shop_id, product_id)
    }

    fn groups_with_card<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, StorageError>> {
        self.inner.groups_with_card(shop_id, product_id)
    }

    fn load_reach_use(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<ReachUse>, StorageError>> {
        self.inner.load_reach_use(group_id)
    }

    fn load_feedback<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FeedbackDay>, StorageError>> {
        self.inner.load_feedback(shop_id)
    }

    fn load_promotion_mutes(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        self.inner.load_promotion_mutes(group_id)
    }

    fn load_reports(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ReportRecord>, StorageError>> {
        self.inner.load_reports(group_id)
    }

    fn load_member_flags(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, MemberFlagsRecord)>, StorageError>> {
        self.inner.load_member_flags(group_id)
    }

    fn load_faq(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<FaqRecord>, StorageError>> {
        self.inner.load_faq(group_id)
    }

    fn load_auto_replies<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AutoReplyRecord>, StorageError>> {
        self.inner.load_auto_replies(shop_id)
    }

    fn load_join_requests(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<JoinRequestRecord>, StorageError>> {
        self.inner.load_join_requests(group_id)
    }

    fn load_buyer_tags<'a>(
        &'a self,
        shop_id: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BuyerTagsRecord>, StorageError>> {
        self.inner.load_buyer_tags(shop_id, user_id)
    }

    fn load_buyer_tags_of<'a>(
        &'a self,
        shop_id: &'a str,
        user_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<BuyerTagsRecord>, StorageError>> {
        self.inner.load_buyer_tags_of(shop_id, user_ids)
    }

    fn load_cs_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsShopRecord>, StorageError>> {
        self.inner.load_cs_shop(shop_id)
    }

    fn load_cs_buyer<'a>(
        &'a self,
        shop_id: &'a str,
        buyer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsBuyerRecord>, StorageError>> {
        self.inner.load_cs_buyer(shop_id, buyer_id)
    }

    fn load_schedules(&self) -> BoxFuture<'_, Result<Vec<ScheduleRecord>, StorageError>> {
        self.inner.load_schedules()
    }
}

#[cfg(test)]
mod tests;
