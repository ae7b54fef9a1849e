//! Qun's storage: what a group's history, members and metadata are kept in.
//!
//! This crate is the store behind chat-core. It knows records and keys, not
//! the wire protocol and not the rules of a chat.
//!
//! # Layout
//! - [`Store`]: the trait every backend implements. Writes are *submitted*
//!   (queued at once, in order) and reported durable later through a
//!   callback; reads are async.
//! - [`FjallStore`]: the embedded default on fjall. A writer thread turns
//!   whatever has queued up into one atomic batch and one journal fsync —
//!   group commit — so throughput grows with load while an idle server adds
//!   no waiting. The folder is split into partitions by shop, each with its
//!   own journal and writer, so the cores share the writing.
//! - [`scylla_store::ScyllaStore`]: the clustered store on ScyllaDB (or
//!   Cassandra 4.x), for deployments that outgrow one machine.
//! - [`Coalescing`]: wraps a store so that concurrent reads of the same
//!   history page share one query.
//! - [`records`] and [`keys`]: the schema and the key layout (partition
//!   `(group_id, bucket)`, clustering `seq`), the same for every backend.
//! - [`contract`]: the test suite every backend must pass.
//!
//! # The ordering promise
//! For writes of the same group, *submission order is durability order*: when
//! the callback of a submission reports success, every submission made
//! before it is durable too. chat-core relies on this to show messages in
//! seq order only after they are durable.
//!
//! # Example
//! ```
//! use qun_storage::{FjallStore, FjallConfig, Store, StoreExt, WriteOp, records::MessageRecord};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = FjallStore::open(FjallConfig::new(dir.path()))?;
//! let msg = MessageRecord { group_id: 1, seq: 1, text: "hi".into(), ..Default::default() };
//! store.write(vec![WriteOp::AppendMessage(msg)]).await?;
//! assert_eq!(store.last_seq(1).await?, 1);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;

mod coalesce;
pub mod contract;
mod error;
mod fjall_store;
pub mod keys;
pub mod records;
pub mod scylla_store;
pub mod stats;

pub use coalesce::{Coalescing, CoalescingStats};
pub use error::StorageError;
pub use fjall_store::{FjallConfig, FjallStore, MAX_PARTITIONS, WINDOW_FROM, WINDOW_UNTIL};

use records::{
    AutoReplyRecord, BuyerTagsRecord, CsBuyerRecord, CsShopRecord, EntryRecord, FaqRecord,
    GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord, ObjectRecord,
    ProductRecord, ReportRecord, ScheduleRecord, SentRecord,
};

/// A boxed future, so that [`Store`] can be used as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Point reads [`Store::load_buyer_tags_of`] keeps outstanding when a store
/// reads buyers one at a time.
pub const BUYER_TAG_READS_IN_FLIGHT: usize = 64;

/// Called once when a submission is durable (or has failed). It runs on a
/// store thread: keep it short and never block in it.
pub type DurableCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send + 'static>;

/// One write. A submission's writes become durable together (atomically).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WriteOp {
    /// Create or replace a group's record.
    PutGroup(GroupRecord),
    /// Add or replace a member (and the user → group index entry).
    PutMember(MemberRecord),
    /// Remove a member (and the index entry, and their read mark).
    RemoveMember {
        /// The group.
        group_id: u64,
        /// The member.
        user_id: String,
    },
    /// Append one message at its seq. When it has a `client_msg_id`, the
    /// sent index entry ([`Store::find_sent`]) is written with it, atomically;
    /// when it is a reply (`reply_to` set), so is the reply index entry
    /// ([`Store::replies_to`]).
    AppendMessage(MessageRecord),
    /// Set a member's read mark (the seq they have read up to).
    PutReadMark {
        /// The group.
        group_id: u64,
        /// The member.
        user_id: String,
        /// Read up to and including this seq.
        seq: u64,
    },
    /// Create or replace a live object. Its `due_ms` (0: none) replaces the
    /// one listed by [`Store::due_objects`].
    PutObject(ObjectRecord),
    /// Create or replace one user's entry in an object.
    PutEntry(EntryRecord),
    /// Remove one user's entry in an object.
    RemoveEntry {
        /// The group.
        group_id: u64,
        /// The object.
        object_id: u64,
        /// The user.
        user_id: String,
    },
    /// Create or replace a shop's product.
    PutProduct(ProductRecord),
    /// Record that a group has a card of a product
    /// ([`Store::groups_with_card`]).
    PutCard {
        /// The shop.
        shop_id: String,
        /// The product.
        product_id: String,
        /// The group.
        group_id: u64,
    },
    /// Set how many promotions a group has posted on one day
    /// ([`Store::load_reach_use`]).
    PutReachUse {
        /// The group.
        group_id: u64,
        /// The day (UTC), as days since the Unix epoch.
        day: u64,
        /// Promotions posted that day.
        used: u32,
    },
    /// Set a shop's buyer feedback of one day ([`Store::load_feedback`]).
    PutFeedback {
        /// The shop.
        shop_id: String,
        /// The day (UTC), as days since the Unix epoch.
        day: u64,
        /// Positive signals that day.
        positive: u64,
        /// Negative signals that day.
        negative: u64,
    },
    /// A member mutes (or unmutes) a group's promotions
    /// ([`Store::load_promotion_mutes`]); removed with the member.
    PutPromotionMute {
        /// The group.
        group_id: u64,
        /// The member.
        user_id: String,
        /// Muted (true) or not.
        muted: bool,
    },
    /// Keep a buyer's report of a message ([`Store::load_reports`]).
    PutReport(ReportRecord),
    /// Replace a message already stored at its seq (a recall clears it).
    /// Unlike [`WriteOp::AppendMessage`] it writes nothing else.
    RewriteMessage(MessageRecord),
    /// Set a buyer's tags in a shop ([`Store::load_buyer_tags`]); no tags
    /// removes the record.
    PutBuyerTags(BuyerTagsRecord),
    /// Record a buyer's pending request to join ([`Store::load_join_requests`]).
    PutJoinRequest(JoinRequestRecord),
    /// Forget a request (decided, or the buyer joined).
    RemoveJoinRequest {
        /// The group.
        group_id: u64,
        /// The buyer.
        user_id: String,
    },
    /// Create or replace a shop's auto-reply rule ([`Store::load_auto_replies`]).
    PutAutoReply(AutoReplyRecord),
    /// Remove a shop's auto-reply rule.
    RemoveAutoReply {
        /// The shop.
        shop_id: String,
        /// The rule.
        rule_id: String,
    },
    /// Create or replace an FAQ entry ([`Store::load_faq`]).
    PutFaq(FaqRecord),
    /// Remove an FAQ entry.
    RemoveFaq {
        /// The group.
        group_id: u64,
        /// The entry.
        faq_id: u64,
    },
    /// Create or replace a shop's customer-service settings
    /// ([`Store::load_cs_shop`]).
    PutCsShop(CsShopRecord),
    /// Create or replace a buyer's customer-service record
    /// ([`Store::load_cs_buyer`]).
    PutCsBuyer(CsBuyerRecord),
    /// Create or replace a scheduled push ([`Store::load_schedules`]).
    PutSchedule(ScheduleRecord),
    /// Remove a scheduled push.
    RemoveSchedule {
        /// The group.
        group_id: u64,
        /// The schedule.
        schedule_id: u64,
    },
    /// Set a member's moderation flags ([`Store::load_member_flags`]); all
    /// zero removes them. Not removed with the member: a ban outlives it.
    PutMemberFlags {
        /// The group.
        group_id: u64,
        /// The member.
        user_id: String,
        /// The flags.
        flags: MemberFlagsRecord,
    },
}

/// A group's promotions on its latest day, as [`Store::load_reach_use`]
/// returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReachUse {
    /// The day (UTC), as days since the Unix epoch.
    pub day: u64,
    /// Promotions posted that day.
    pub used: u32,
}

/// One day of a shop's buyer feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackDay {
    /// The day (UTC), as days since the Unix epoch.
    pub day: u64,
    /// Positive signals that day.
    pub positive: u64,
    /// Negative signals that day.
    pub negative: u64,
}

/// An object's deadline, as listed by [`Store::due_objects`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The group.
    pub group_id: u64,
    /// The object.
    pub object_id: u64,
    /// When it comes due, ms since the Unix epoch.
    pub due_ms: u64,
}

/// A storage backend.
///
/// Implementations must keep the ordering promise described in the crate
/// docs and must call every [`DurableCallback`] exactly once, never from
/// inside [`Store::submit`] itself.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Queues `ops` to be written atomically; `done` is called once they are
    /// durable or have failed.
    ///
    /// Returns at once. Calls made in some order become durable in that order.
    ///
    /// # Errors
    /// [`StorageError::Overloaded`] when the queue is full,
    /// [`StorageError::Poisoned`] after an earlier write failed,
    /// [`StorageError::Closed`] after [`Store::close`]. On error nothing was
    /// queued and `done` is dropped without being called.
    fn submit(&self, ops: Vec<WriteOp>, done: DurableCallback) -> Result<(), StorageError>;

    /// Waits until every submission made before this call is durable.
    ///
    /// # Errors
    /// As for [`Store::submit`], and [`StorageError::Backend`] on I/O failure.
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>>;

    /// Flushes, then stops accepting writes and releases the backend.
    ///
    /// # Errors
    /// As for [`Store::flush`].
    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>>;

    /// Reads a group's record.
    ///
    /// # Errors
    /// [`StorageError::Backend`] on I/O failure, [`StorageError::Corrupt`]
    /// when the record does not decode.
    fn load_group(&self, group_id: u64)
    -> BoxFuture<'_, Result<Option<GroupRecord>, StorageError>>;

    /// Reads every member of a group.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_members(&self, group_id: u64)
    -> BoxFuture<'_, Result<Vec<MemberRecord>, StorageError>>;

    /// The ids of the groups a user is a member of, ascending.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn groups_of_user(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<u64>, StorageError>>;

    /// The highest group id ever stored, 0 when none.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn max_group_id(&self) -> BoxFuture<'_, Result<u64, StorageError>>;

    /// The highest message seq of a group, 0 when it has none.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn last_seq(&self, group_id: u64) -> BoxFuture<'_, Result<u64, StorageError>>;

    /// Up to `limit` messages with seq strictly below `before_seq`, the
    /// newest of them, returned in ascending seq.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn messages_before(
        &self,
        group_id: u64,
        before_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>>;

    /// Up to `limit` messages with seq strictly above `after_seq`, ascending.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn messages_after(
        &self,
        group_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>>;

    /// Where the message `sender_id` posted to `group_id` with
    /// `client_msg_id` landed, if it was ever made durable.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn find_sent<'a>(
        &'a self,
        group_id: u64,
        sender_id: &'a str,
        client_msg_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SentRecord>, StorageError>>;

    /// The seqs of a group's replies to message `seq` (messages appended
    /// with `reply_to = seq`, carrying a quote of it), ascending: what a
    /// recall of `seq` has to scrub.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn replies_to(&self, group_id: u64, seq: u64) -> BoxFuture<'_, Result<Vec<u64>, StorageError>>;

    /// Every read mark of a group's members, as `(user_id, seq)`.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_read_marks(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>>;

    /// Every live object of a group, ascending object id.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_objects(&self, group_id: u64)
    -> BoxFuture<'_, Result<Vec<ObjectRecord>, StorageError>>;

    /// Every entry of every object of a group, by object then user.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_entries(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<EntryRecord>, StorageError>>;

    /// Every object with a `due_ms`, so that deadlines which passed while
    /// the server was down are resolved at start-up.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn due_objects(&self) -> BoxFuture<'_, Result<Vec<Due>, StorageError>>;

    /// A shop's product.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_product<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProductRecord>, StorageError>>;

    /// The groups that have a card of a product, ascending.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn groups_with_card<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, StorageError>>;

    /// A group's promotion count of the last day one was written.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_reach_use(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<ReachUse>, StorageError>>;

    /// A shop's buyer feedback, one entry per day written, ascending.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_feedback<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FeedbackDay>, StorageError>>;

    /// The members of a group who muted its promotions, ascending.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_promotion_mutes(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;

    /// Every report of a group's messages, by seq then reporter.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_reports(&self, group_id: u64)
    -> BoxFuture<'_, Result<Vec<ReportRecord>, StorageError>>;

    /// Every member flag of a group (mutes, bans), by user.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_member_flags(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, MemberFlagsRecord)>, StorageError>>;

    /// A group's FAQ entries, ascending id.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_faq(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<FaqRecord>, StorageError>>;

    /// A shop's auto-reply rules, ascending rule id.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_auto_replies<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AutoReplyRecord>, StorageError>>;

    /// A group's pending join requests, by user.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_join_requests(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<JoinRequestRecord>, StorageError>>;

    /// A buyer's tags in a shop.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_buyer_tags<'a>(
        &'a self,
        shop_id: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BuyerTagsRecord>, StorageError>>;

    /// The tags of many buyers of one shop in one call: a record for each
    /// of `user_ids` (distinct, as a group's members are) that has tags, in
    /// no particular order. A buyer without tags is left out, as
    /// [`Store::load_buyer_tags`] returns `None` for them.
    ///
    /// A targeted push reads the tags of every buyer of its group this way.
    /// This provided version reads them one at a time with
    /// [`BUYER_TAG_READS_IN_FLIGHT`] reads outstanding; a store that can
    /// read many keys in one pass overrides it.
    ///
    /// # Errors
    /// As for [`Store::load_group`]; the first read that fails fails the
    /// call.
    fn load_buyer_tags_of<'a>(
        &'a self,
        shop_id: &'a str,
        user_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<BuyerTagsRecord>, StorageError>> {
        use futures_util::StreamExt as _;
        // A refill loop rather than `buffer_unordered`: a closure mapping
        // borrowed ids to futures inside a boxed `Send` future trips rustc
        // ("implementation of `FnOnce` is not general enough").
        Box::pin(async move {
            let mut users = user_ids.iter();
            let mut reads = futures_util::stream::FuturesUnordered::new();
            let mut found = Vec::new();
            loop {
                while reads.len() < BUYER_TAG_READS_IN_FLIGHT {
                    let Some(user) = users.next() else { break };
                    reads.push(self.load_buyer_tags(shop_id, user));
                }
                match reads.next().await {
                    Some(read) => found.extend(read?),
                    None => return Ok(found),
                }
            }
        })
    }

    /// Every scheduled push of every group, ascending group and schedule
    /// id: read once at start-up.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_schedules(&self) -> BoxFuture<'_, Result<Vec<ScheduleRecord>, StorageError>>;

    /// A shop's customer-service settings.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_cs_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsShopRecord>, StorageError>>;

    /// A buyer's customer-service record with a shop.
    ///
    /// # Errors
    /// As for [`Store::load_group`].
    fn load_cs_buyer<'a>(
        &'a self,
        shop_id: &'a str,
        buyer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsBuyerRecord>, StorageError>>;
}

/// Convenience for callers that simply want to wait for durability.
pub trait StoreExt: Store {
    /// Submits `ops` and waits until they are durable.
    ///
    /// # Errors
    /// Whatever [`Store::submit`] or the write itself reports.
    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<(), StorageError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let submitted = self.submit(
            ops,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        Box::pin(async move {
            submitted?;
            rx.await.unwrap_or(Err(StorageError::Closed))
        })
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
