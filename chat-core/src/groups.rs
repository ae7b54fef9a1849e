//! The sharded registry of groups and the operations on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use qun_proto::v1;
use qun_storage::records::{GroupRecord, MemberRecord, MessageRecord, QuoteRecord};
use qun_storage::{StorageError, Store, StoreExt, WriteOp};
use tokio::sync::{OnceCell, oneshot};

use crate::commerce::{self, CommerceState};
use crate::devices::Devices;
use crate::group::{
    ConnId, GroupCell, GroupLimits, GroupState, Loaded, Sent, Subscriber, Viewer, quote_of_record,
};
use crate::rate::{Rate, UserRates};
use crate::schedule::ScheduleBook;
use crate::{ChatError, Identity, Role};

/// Bounds and defaults of chat-core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// `max_members` of a group created without one.
    pub default_max_members: u32,
    /// The largest `max_members` a group may ask for.
    pub max_members_limit: u32,
    /// Visible messages kept in memory per group (the recent ring).
    pub recent_ring: usize,
    /// Messages returned with a join.
    pub join_recent: usize,
    /// Most messages one history page may ask for.
    pub history_max: usize,
    /// The largest gap a resume fills by push; beyond it the client is told
    /// `gap_too_large` and pages history instead.
    pub resume_max_gap: u64,
    /// Client message ids remembered in memory per group (older retries are
    /// answered from the store's index).
    pub sent_window: usize,
    /// Per-user rate of buyers' messages.
    pub buyer_send_rate: Rate,
    /// Per-group rate of all buyers' messages together (slow mode).
    pub group_buyer_rate: Rate,
    /// The least time between two progress events of one group-buy or poll
    /// (coalescing: 250 ms is at most four a second, however many join).
    pub progress_interval_ms: u64,
    /// The reach quota: promotions per group per day, and how buyer
    /// feedback scales it (see [`crate::reach`]).
    pub reach: crate::reach::ReachPolicy,
    /// Most pins a group holds at once.
    pub max_pins: usize,
    /// Fan-out work one group gets per turn before others take theirs
    /// (subscribers visited plus frames queued; see `GroupState::fan_out`).
    /// A turn holds the group's lock, and every push in it wakes a
    /// connection's writer: small turns keep the group's own requests
    /// (a flash sale's joins) from waiting behind its fan-out.
    pub fanout_budget: usize,
    /// Whether the store's writer runs a message's first fan-out turn
    /// itself as the message becomes durable (`true`, the default: a small
    /// group's pushes are queued before the sender's ack, with no fan-out
    /// worker needed), or hands every turn to the fan-out workers
    /// ([`Groups::run_fan_out`]), as the server does. From the writer's
    /// thread each push wakes a connection's writer task across threads,
    /// and that slows the writer, so every group's commits and acks: handed
    /// over, the server's median send-until-durable at 100 groups × 50
    /// members and 300k deliveries/s went from 25–50 ms to under 5 ms
    /// (docs/benchmarks.md).
    pub fan_out_on_commit: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            default_max_members: 5_000,
            max_members_limit: 100_000,
            recent_ring: 256,
            join_recent: 50,
            history_max: 200,
            resume_max_gap: 1_000,
            sent_window: 1_024,
            buyer_send_rate: Rate {
                per_sec: 5.0,
                burst: 10,
            },
            group_buyer_rate: Rate {
                per_sec: 50.0,
                burst: 100,
            },
            progress_interval_ms: 250,
            reach: crate::reach::ReachPolicy::default(),
            max_pins: 10,
            fanout_budget: 64,
            fan_out_on_commit: true,
        }
    }
}

impl CoreConfig {
    pub(crate) fn group_limits(&self) -> GroupLimits {
        GroupLimits {
            ring_capacity: self.recent_ring,
            sent_window: self.sent_window,
            buyer_chatter: self.group_buyer_rate,
        }
    }
}

/// Counters for `/metrics`. Read with `load(Ordering::Relaxed)`.
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Messages made durable and published.
    pub messages_posted: AtomicU64,
    /// Frames queued into subscribers' outboxes.
    pub deliveries_queued: AtomicU64,
    /// Frames dropped because a subscriber was out of sync.
    pub deliveries_dropped: AtomicU64,
    /// Groups created.
    pub groups_created: AtomicU64,
    /// Sends answered with the original ack because they were retries.
    pub duplicate_sends: AtomicU64,
    /// Sends whose id was looked up in the store's index of earlier ids
    /// (not in the group's window, not marked a first attempt).
    pub sent_index_reads: AtomicU64,
    /// Buyers' messages refused by the per-user rate or slow mode.
    pub sends_rate_limited: AtomicU64,
    /// Group resumes served.
    pub resumes: AtomicU64,
    /// Messages pushed as catch-up by resumes.
    pub catch_up_messages: AtomicU64,
    /// Resumes whose gap was over the cap (`gap_too_large`).
    pub resume_gaps_too_large: AtomicU64,
    /// Commerce events posted (cards, creations, progress, state changes).
    pub commerce_events: AtomicU64,
    /// Buyers' commerce actions that changed something (joins, leaves,
    /// claims, votes).
    pub commerce_actions: AtomicU64,
    /// Coalesced progress events posted.
    pub progress_events: AtomicU64,
    /// Deadlines resolved.
    pub deadlines_resolved: AtomicU64,
    /// Fan-out turns taken from the queue (big groups' fan-out, cut up).
    pub fanout_turns: AtomicU64,
    /// How long each of those turns waited on the fan-out queue: from the
    /// group's going on it (a commit left subscribers to push to, or its
    /// previous turn did not finish) to the turn. Under load this is where
    /// a message waits between being durable and being pushed.
    pub fanout_wait: qun_storage::stats::LatencyHistogram,
    /// Occurrences of scheduled pushes that posted.
    pub scheduled_fired: AtomicU64,
    /// Occurrences of scheduled pushes skipped (quota, product, audience,
    /// missed while the server was down).
    pub scheduled_skipped: AtomicU64,
}

/// A request to create a group.
#[derive(Debug, Clone, Default)]
pub struct NewGroup {
    /// Display name, 1 to 64 characters.
    pub name: String,
    /// 0 for the default.
    pub max_members: u32,
    /// When set, must equal the caller's shop.
    pub shop_id: Option<String>,
}

/// A request to post a text message.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    /// The group.
    pub group_id: u64,
    /// UTF-8 text as received.
    pub text: Bytes,
    /// Seq quoted, 0 for none.
    pub reply_to: u64,
    /// The sender's own id for the message.
    pub client_msg_id: String,
    /// The sender made the id up for this send and never sent it before:
    /// it is checked only against the group's window of recent ids, not
    /// the store's index of every earlier one (see
    /// [`Groups::submit_post`]).
    pub first_attempt: bool,
}

/// A message that has its seq and is being written.
#[derive(Debug)]
#[must_use = "the message is acknowledged only once the ticket resolves"]
pub struct PostTicket {
    ack: v1::SendAck,
    rx: oneshot::Receiver<Result<(), StorageError>>,
}

impl PostTicket {
    /// A ticket for a message already durable.
    fn ready(ack: v1::SendAck) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        Self { ack, rx }
    }

    /// The seq the message was given.
    pub fn seq(&self) -> u64 {
        self.ack.seq
    }

    /// Waits until the message is durable and published; returns the ack.
    /// Dropping the ticket does not cancel the write or its publication.
    ///
    /// # Errors
    /// `Storage` when the write failed; the message was never shown.
    pub async fn durable(self) -> Result<v1::SendAck, ChatError> {
        durable(self.rx).await?;
        Ok(self.ack)
    }
}

/// All groups, sharded by id; a cheap-clone handle.
///
/// Each group is loaded from the store on first use and then lives in a
/// [`DashMap`] shard: different groups never contend, and nothing here takes
/// a global lock.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use qun_chat_core::{CoreConfig, Groups, Identity, NewGroup, NewMessage, Role};
/// use qun_storage::{FjallConfig, FjallStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = Arc::new(FjallStore::open(FjallConfig::new(dir.path()))?);
/// let groups = Groups::open(store, CoreConfig::default()).await?;
/// let agent = Identity::new("a1", "Mei (CS)", Role::Agent, Some("shop-7".into()))?;
/// let now_ms = 1_700_000_000_000;
/// let info = groups
///     .create_group(&agent, NewGroup { name: "Sneaker fans".into(), ..Default::default() }, now_ms)
///     .await?;
/// let welcome = NewMessage {
///     group_id: info.group_id,
///     text: "Welcome!".into(),
///     client_msg_id: "a1-0001".into(),
///     ..Default::default()
/// };
/// let ack = groups.post(&agent, welcome.clone(), now_ms).await?;
/// assert_eq!(ack.seq, 1);
/// // A retry (same client message id) posts nothing and gets the same seq.
/// let retry = groups.post(&agent, welcome, now_ms).await?;
/// assert_eq!((retry.seq, retry.duplicate), (1, true));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: CoreConfig,
    cells: DashMap<u64, Arc<OnceCell<Arc<GroupCell>>>>,
    next_group_id: AtomicU64,
    pub(crate) stats: Arc<CoreStats>,
    user_rates: UserRates,
    pub(crate) devices: Devices,
    pub(crate) commerce: CommerceState,
    /// Buyer feedback per shop, loaded with the shop's first group.
    pub(crate) feedback: DashMap<String, crate::reach::ShopFeedback>,
    /// Shops with feedback not yet written, so that a tick visits only them.
    pub(crate) feedback_dirty: DashMap<String, ()>,
    /// Each shop's auto-reply rules, compiled, loaded with its first group.
    pub(crate) auto_replies: DashMap<String, Arc<crate::auto_reply::ShopRules>>,
    /// Serializes tag edits of one buyer.
    pub(crate) tag_locks: crate::segments::TagLocks,
    /// Every scheduled push, and when each fires next.
    pub(crate) schedules: ScheduleBook,
    /// Exclusive customer service of the shops in use.
    pub(crate) cs: crate::cs::CsShops,
    /// Groups with fan-out work left, in turn order.
    pub(crate) fanout: Arc<FanoutQueue>,
}

pub(crate) fn durable_channel() -> (
    qun_storage::DurableCallback,
    oneshot::Receiver<Result<(), StorageError>>,
) {
    let (tx, rx) = oneshot::channel();
    (
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        rx,
    )
}

pub(crate) async fn durable(
    rx: oneshot::Receiver<Result<(), StorageError>>,
) -> Result<(), ChatError> {
    rx.await
        .unwrap_or(Err(StorageError::Closed))
        .map_err(ChatError::from)
}

impl Groups {
    /// Opens the registry over a store. Groups load lazily on first use;
    /// the deadlines of every live object are read now, so the first
    /// [`Groups::tick`] resolves those that passed while the server was down.
    ///
    /// # Errors
    /// [`StorageError`] when the store cannot be read.
    pub async fn open(store: Arc<dyn Store>, config: CoreConfig) -> Result<Self, StorageError> {
        let max = store.max_group_id().await?;
        let commerce = CommerceState::default();
        for due in store.due_objects().await? {
            commerce.add_deadline(due.due_ms, due.group_id, due.object_id);
        }
        let schedules = ScheduleBook::restore(store.load_schedules().await?);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                user_rates: UserRates::new(config.buyer_send_rate),
                config,
                cells: DashMap::new(),
                next_group_id: AtomicU64::new(max + 1),
                stats: Arc::new(CoreStats::default()),
                devices: Devices::default(),
                commerce,
                feedback: DashMap::new(),
                feedback_dirty: DashMap::new(),
                auto_replies: DashMap::new(),
                tag_locks: Default::default(),
                schedules,
                cs: Default::default(),
                fanout: Arc::default(),
            }),
        })
    }

    /// Runs one fan-out turn for the group at the head of the fan-out
    /// queue, which goes to the back if it still has work; `false` when
    /// the queue is empty. See [`Groups::run_fan_out`].
    pub fn fan_out_turn(&self) -> bool {
        let Some((cell, queued_at)) = self.inner.fanout.pop() else {
            return false;
        };
        let stats = &self.inner.stats;
        stats.fanout_turns.fetch_add(1, Ordering::Relaxed);
        stats.fanout_wait.observe(queued_at.elapsed());
        let mut g = cell.lock();
        if g.fan_out(self.inner.config.fanout_budget, stats) {
            g.fanout_queued = false;
        } else {
            drop(g);
            self.inner.fanout.push(cell);
        }
        true
    }

    /// Works the fan-out queue until `stop` completes: groups whose
    /// fan-out did not fit in one turn (a flash sale's crowd) take turns,
    /// round robin, so one shop's big group cannot starve the others.
    /// Run one per core.
    pub async fn run_fan_out(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let ready = self.inner.fanout.ready.notified();
            if self.fan_out_turn() {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                () = &mut stop => return,
                () = ready => {}
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<CoreStats> {
        self.inner.stats.clone()
    }

    /// Groups held in memory now.
    pub fn loaded_groups(&self) -> usize {
        self.inner.cells.len()
    }

    /// The store behind the registry.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Forgets per-user rate buckets that have refilled (call now and then,
    /// e.g. every minute); returns how many users are still being limited.
    pub fn forget_idle_senders(&self, now_ms: u64) -> usize {
        self.inner.user_rates.forget_idle(now_ms)
    }

    /// A group if it is in memory; never loads.
    pub(crate) fn loaded_cell(&self, group_id: u64) -> Option<Arc<GroupCell>> {
        self.inner
            .cells
            .get(&group_id)
            .and_then(|c| c.get().cloned())
    }

    pub(crate) async fn cell(&self, group_id: u64) -> Result<Arc<GroupCell>, ChatError> {
        if let Some(cell) = self.loaded_cell(group_id) {
            return Ok(cell);
        }
        if group_id == 0 || group_id >= self.inner.next_group_id.load(Ordering::Acquire) {
            return Err(ChatError::UnknownGroup(group_id));
        }
        // One load per group, however many requests arrive at once.
        let once = self.inner.cells.entry(group_id).or_default().clone();
        let loaded = once.get_or_try_init(|| self.load(group_id)).await.cloned();
        if loaded.is_err() {
            self.inner
                .cells
                .remove_if(&group_id, |_, c| c.get().is_none());
        }
        loaded
    }

    async fn load(&self, group_id: u64) -> Result<Arc<GroupCell>, ChatError> {
        let store = &self.inner.store;
        let record = store
            .load_group(group_id)
            .await?
            .ok_or(ChatError::UnknownGroup(group_id))?;
        let members = store.load_members(group_id).await?;
        let read_marks = store.load_read_marks(group_id).await?;
        let last_seq = store.last_seq(group_id).await?;
        let warm = self
            .inner
            .config
            .join_recent
            .min(self.inner.config.recent_ring);
        let recent = store.messages_before(group_id, last_seq + 1, warm).await?;
        let objects = commerce::restore_all(
            store.load_objects(group_id).await?,
            store.load_entries(group_id).await?,
            0,
        )?;
        self.ensure_feedback(&record.shop_id).await?;
        self.ensure_auto_replies(&record.shop_id).await?;
        let promotion_mutes = store.load_promotion_mutes(group_id).await?;
        let reach = store.load_reach_use(group_id).await?;
        let reports = store.load_reports(group_id).await?;
        let member_flags = store.load_member_flags(group_id).await?;
        let faq = store.load_faq(group_id).await?;
        let join_requests = store.load_join_requests(group_id).await?;
        self.inner.commerce.note_restored(group_id, &objects);
        tracing::debug!(
            group_id,
            members = members.len(),
            last_seq,
            objects = objects.len(),
            "group loaded"
        );
        let loaded = Loaded {
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
        };
        Ok(Arc::new(GroupCell::new(
            loaded,
            self.inner.config.group_limits(),
            0,
        )))
    }

    /// Creates a group for the caller's shop; the caller becomes its first
    /// member. Agents and owners only.
    ///
    /// # Errors
    /// `ForbiddenRole` for buyers, `WrongShop` when `shop_id` names another
    /// shop, `InvalidArgument` for a bad name or `max_members`, `Storage`
    /// when it could not be made durable.
    pub async fn create_group(
        &self,
        who: &Identity,
        req: NewGroup,
        now_ms: u64,
    ) -> Result<v1::GroupInfo, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::CreateGroup)?;
        let Some(shop) = who.shop_id().filter(|_| who.role().is_staff()) else {
            return Err(ChatError::ForbiddenRole {
                role: who.role().as_str(),
                action: "create a group",
            });
        };
        if req
            .shop_id
            .as_deref()
            .is_some_and(|s| !s.is_empty() && s != shop)
        {
            return Err(ChatError::WrongShop);
        }
        let name = req.name.trim();
        let chars = name.chars().count();
        if chars == 0 || chars > 64 || name.chars().any(char::is_control) {
            return Err(ChatError::InvalidArgument(
                "group name must be 1 to 64 characters without control characters".into(),
            ));
        }
        let cfg = &self.inner.config;
        let max_members = match req.max_members {
            0 => cfg.default_max_members,
            n if (2..=cfg.max_members_limit).contains(&n) => n,
            n => {
                return Err(ChatError::InvalidArgument(format!(
                    "max_members {n} is outside 2..={}",
                    cfg.max_members_limit
                )));
            }
        };
        self.ensure_feedback(shop).await?;
        self.ensure_auto_replies(shop).await?;
        let group_id = self.next_group_id();
        let record = GroupRecord {
            group_id,
            shop_id: shop.to_string(),
            name: name.to_string(),
            max_members,
            created_at_ms: now_ms,
            created_by: who.user_id().to_string(),
            buyers_muted: false,
            pins: Vec::new(),
            join_policy: 0,
            join_expression: String::new(),
            cs_buyer: String::new(),
        };
        let creator = MemberRecord {
            group_id,
            user_id: who.user_id().to_string(),
            display_name: who.display_name().to_string(),
            role: who.role().to_u32(),
            joined_at_ms: now_ms,
        };
        self.inner
            .store
            .write(vec![
                WriteOp::PutGroup(record.clone()),
                WriteOp::PutMember(creator.clone()),
            ])
            .await?;
        let info = self.install_group(record, vec![creator], now_ms);
        self.inner
            .stats
            .groups_created
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(group_id, shop, "group created");
        Ok(info)
    }

    /// A fresh group id.
    pub(crate) fn next_group_id(&self) -> u64 {
        self.inner.next_group_id.fetch_add(1, Ordering::AcqRel)
    }

    /// Holds a new group in memory (its records are the caller's to
    /// write); returns its info.
    pub(crate) fn install_group(
        &self,
        record: GroupRecord,
        members: Vec<MemberRecord>,
        now_ms: u64,
    ) -> v1::GroupInfo {
        let group_id = record.group_id;
        let loaded = Loaded {
            record,
            members,
            read_marks: Vec::new(),
            recent: Vec::new(),
            last_seq: 0,
            objects: Default::default(),
            promotion_mutes: Vec::new(),
            reach: None,
            reports: Vec::new(),
            member_flags: Vec::new(),
            faq: Vec::new(),
            join_requests: Vec::new(),
        };
        let cell = Arc::new(GroupCell::new(
            loaded,
            self.inner.config.group_limits(),
            now_ms,
        ));
        let info = cell.lock().info();
        self.inner
            .cells
            .insert(group_id, Arc::new(OnceCell::new_with(Some(cell))));
        info
    }

    /// Makes `who` a member if they are not one: their record and a read
    /// mark at the newest message, queued as one batch. `None` when they
    /// already were.
    ///
    /// # Errors
    /// As `GroupState::admit` (`GroupFull`, `WrongShop`, `Banned`), or the
    /// store's refusal (then nothing changed).
    pub(crate) fn admit_member(
        &self,
        cell: &Arc<GroupCell>,
        who: &Identity,
        now_ms: u64,
    ) -> Result<Option<oneshot::Receiver<Result<(), StorageError>>>, ChatError> {
        let mut g = cell.lock();
        let Some(record) = g.admit(who, now_ms)? else {
            return Ok(None);
        };
        // What was posted before joining does not count as unread.
        let read_to = g.visible_seq();
        let ops = vec![
            WriteOp::PutMember(record),
            WriteOp::PutReadMark {
                group_id: g.id(),
                user_id: who.user_id().to_string(),
                seq: read_to,
            },
        ];
        let (done, rx) = durable_channel();
        if let Err(e) = self.inner.store.submit(ops, done) {
            g.unadmit(who.user_id());
            return Err(e.into());
        }
        g.advance_read_mark(who.user_id(), read_to);
        Ok(Some(rx))
    }

    /// Makes the caller a member (if not already) and subscribes `sub` to
    /// the group's messages. Returns the group, the newest messages and the
    /// caller's role; every message after those is pushed to `sub`.
    ///
    /// # Errors
    /// `UnknownGroup`, `WrongShop` for staff of another shop, `GroupFull`,
    /// `ForbiddenRole` for the system identity, `Storage`.
    pub async fn join(
        &self,
        who: &Identity,
        group_id: u64,
        sub: Subscriber,
        now_ms: u64,
    ) -> Result<v1::Joined, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::JoinGroup)?;
        let cell = self.cell(group_id).await?;
        // A customer-service session admits its own buyer and the shop's
        // staff, nobody else.
        {
            let g = cell.lock();
            if !g.record.cs_buyer.is_empty()
                && who.role() == Role::Buyer
                && g.record.cs_buyer != who.user_id()
            {
                return Err(ChatError::NotMember(group_id));
            }
        }
        // A group that admits by tags checks the buyer's; one that admits
        // on approval records the request instead, and says so. Members
        // and staff pass (one look at the policy, under one short lock).
        let screening = cell.lock().screening_for(who);
        match screening {
            v1::JoinPolicy::Open => {}
            v1::JoinPolicy::Threshold => self.check_threshold(&cell, who).await?,
            v1::JoinPolicy::Approval => {
                if let Some(rx) = self.request_to_join(&cell, who, now_ms)? {
                    durable(rx).await?;
                    return Err(ChatError::JoinPending);
                }
            }
        }
        let admitted = self.admit_member(&cell, who, now_ms)?;
        let already_member = admitted.is_none();
        if let Some(rx) = admitted
            && let Err(e) = durable(rx).await
        {
            cell.lock().unadmit(who.user_id());
            return Err(e);
        }
        let join_recent = self.inner.config.join_recent;
        let (info, role, recent, visible, last_read_seq, unread, viewer) = {
            let mut g = cell.lock();
            let role = g.member(who)?.role;
            g.subscribe(sub);
            let viewer = g.viewer(who.user_id());
            (
                g.info(),
                role,
                g.recent_tail(join_recent, &viewer),
                g.visible_seq(),
                g.read_mark(who.user_id()),
                g.unread(who.user_id()),
                viewer,
            )
        };
        // Messages up to `visible` come from memory or the store; everything
        // above it reaches `sub` by push. Nothing is missed or doubled.
        let recent = match recent {
            Some(r) => r,
            None => {
                self.stored_before(group_id, visible + 1, join_recent, &viewer)
                    .await?
            }
        };
        Ok(v1::Joined {
            group: Some(info),
            recent,
            role: role.to_proto() as i32,
            already_member,
            last_read_seq,
            unread,
        })
    }

    /// Ends the caller's membership and every subscription of theirs.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `Storage`.
    pub async fn leave(&self, who: &Identity, group_id: u64, now_ms: u64) -> Result<(), ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::LeaveGroup)?;
        let cell = self.cell(group_id).await?;
        let rx = {
            let mut g = cell.lock();
            g.member(who)?;
            // Leaving soon after a promotion says the promotions drove the
            // buyer away.
            if who.role() == crate::Role::Buyer
                && g.last_promotion_ms > 0
                && now_ms.saturating_sub(g.last_promotion_ms) < crate::reach::DAY_MS
            {
                self.record_signal(
                    &g.record.shop_id,
                    crate::reach::Signal::LeftAfterPromotion,
                    now_ms,
                );
            }
            let (done, rx) = durable_channel();
            self.inner.store.submit(
                vec![WriteOp::RemoveMember {
                    group_id,
                    user_id: who.user_id().to_string(),
                }],
                done,
            )?;
            g.remove_member(who.user_id());
            rx
        };
        durable(rx).await
    }

    /// Stops pushing the group's messages to one connection.
    pub fn unsubscribe(&self, conn: ConnId, group_id: u64) {
        if let Some(cell) = self.loaded_cell(group_id) {
            cell.lock().unsubscribe(conn);
        }
    }

    /// Connections subscribed to a loaded group (0 when not loaded).
    pub fn subscriber_count(&self, group_id: u64) -> usize {
        self.loaded_cell(group_id)
            .map_or(0, |c| c.lock().subscriber_count())
    }

    /// Posts a text message. Returns once the message is durable and has
    /// been handed to every subscriber, in seq order.
    ///
    /// # Errors
    /// As for [`Groups::submit_post`] and [`PostTicket::durable`].
    pub async fn post(
        &self,
        who: &Identity,
        msg: NewMessage,
        now_ms: u64,
    ) -> Result<v1::SendAck, ChatError> {
        self.submit_post(who, msg, now_ms).await?.durable().await
    }

    /// Validates a message, gives it the group's next seq and queues its
    /// write; returns a ticket that resolves once it is durable and
    /// published. A connection awaits the submissions of its requests one by
    /// one (so its messages keep their order) but may wait for many tickets
    /// at once (so one phone's messages share group commits).
    ///
    /// # Idempotence
    /// `client_msg_id` is required. A message from the same sender to the
    /// same group with an id already used is a retry: its ticket carries the
    /// original seq and time with `duplicate` set, and nothing is posted.
    /// Recent ids are answered from memory, older ones from the store's
    /// index, so this holds across restarts. A retry is answered before any
    /// rate limit applies. A send marked `first_attempt` skips the store's
    /// index (one read, once the group's window no longer reaches back to
    /// its first message): its id is new by the sender's word.
    ///
    /// # Errors
    /// `TextEmpty`, `TextTooLong`, `TextNotUtf8`, `InvalidArgument` (a
    /// missing or over-long `client_msg_id`), `UnknownGroup`, `NotMember`,
    /// `ReplyToUnknown`, `RateLimited` and `SlowMode` (buyers only),
    /// `Storage` (the write could not be queued; no seq was used).
    pub async fn submit_post(
        &self,
        who: &Identity,
        msg: NewMessage,
        now_ms: u64,
    ) -> Result<PostTicket, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::SendMessage)?;
        let text = validate_text(&msg.text)?;
        let client_msg_id = msg.client_msg_id;
        let first_attempt = msg.first_attempt;
        if client_msg_id.is_empty()
            || client_msg_id.len() > 64
            || client_msg_id.chars().any(char::is_control)
        {
            return Err(ChatError::InvalidArgument(
                "client_msg_id must be 1 to 64 bytes without control characters".into(),
            ));
        }
        let group_id = msg.group_id;
        let cell = self.cell(group_id).await?;
        let quote = if msg.reply_to == 0 {
            None
        } else {
            Some(self.quote(&cell, who, group_id, msg.reply_to).await?)
        };
        let ack = |seq, ts_ms, duplicate| v1::SendAck {
            group_id,
            seq,
            ts_ms,
            client_msg_id: client_msg_id.clone(),
            duplicate,
        };
        // The store's index answers for every seq at or below
        // `checked_through` (it was visible, so durable with its index entry,
        // when the index was read); the window holds every id above its
        // floor. Together they cover every message while the floor stays at
        // or below `checked_through` — see `SentWindow`.
        let mut checked_through = 0;
        loop {
            let (floor, visible) = {
                let g = cell.lock();
                g.member(who)?;
                if let Some(sent) = g.sent.get(who.user_id(), &client_msg_id) {
                    return self.retry_ticket(&g, ack(sent.seq, sent.ts_ms, true), sent);
                }
                (g.sent.floor(), g.visible_seq())
            };
            if first_attempt || floor <= checked_through {
                break;
            }
            self.inner
                .stats
                .sent_index_reads
                .fetch_add(1, Ordering::Relaxed);
            if let Some(found) = self
                .inner
                .store
                .find_sent(group_id, who.user_id(), &client_msg_id)
                .await?
            {
                self.inner
                    .stats
                    .duplicate_sends
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(PostTicket::ready(ack(found.seq, found.ts_ms, true)));
            }
            checked_through = visible;
        }
        let buyer = who.role() == Role::Buyer;
        if buyer && let Err(retry_after_ms) = self.inner.user_rates.take(who.user_id(), now_ms) {
            self.inner
                .stats
                .sends_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return Err(ChatError::RateLimited { retry_after_ms });
        }
        let mut g = cell.lock();
        let refused = (|| {
            g.member(who)?;
            g.refuse_if_failed()?;
            if let Some(sent) = g.sent.get(who.user_id(), &client_msg_id) {
                // The same id arrived on another connection meanwhile.
                return Ok(Some(sent));
            }
            if !first_attempt && g.sent.floor() > checked_through {
                // More than a whole window of messages was published while
                // the index was read: refuse rather than risk posting a
                // retry twice. The client retries with the same id. (A
                // first attempt has no earlier copy to miss.)
                return Err(ChatError::Storage(StorageError::Overloaded));
            }
            // After the retry check: a retry of a message posted before
            // the mute still gets its original ack.
            g.check_not_muted(who, now_ms)?;
            if buyer {
                let rate = self.inner.config.group_buyer_rate;
                g.take_buyer_chatter(rate, now_ms)
                    .map_err(|retry_after_ms| ChatError::SlowMode { retry_after_ms })?;
            }
            Ok(None)
        })();
        match refused {
            Ok(None) => {}
            Ok(Some(sent)) => {
                if buyer {
                    self.inner.user_rates.give_back(who.user_id());
                }
                return self.retry_ticket(&g, ack(sent.seq, sent.ts_ms, true), sent);
            }
            Err(e) => {
                if buyer {
                    self.inner.user_rates.give_back(who.user_id());
                }
                if matches!(e, ChatError::SlowMode { .. }) {
                    self.inner
                        .stats
                        .sends_rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        }
        // The shop's bot answers a buyer's question that matches a rule or
        // an FAQ entry, right after it (decided before the text moves).
        let auto = if buyer {
            self.auto_answer(&mut g, &text, now_ms)
        } else {
            None
        };
        // The quote was taken before the lock: a recall of the quoted
        // message may have begun since, and then the quote has no text.
        let quote = quote.map(|mut q| {
            if g.recalled.contains(&q.seq) {
                crate::group::scrubbed(&mut q);
            }
            q
        });
        let record = g.next_message(
            who,
            text,
            msg.reply_to,
            quote,
            client_msg_id.clone(),
            now_ms,
        );
        let seq = record.seq;
        let auto = auto.map(|answer| (answer, quote_of_record(&record)));
        // Sending a message means having read up to it.
        let read_mark = WriteOp::PutReadMark {
            group_id,
            user_id: who.user_id().to_string(),
            seq,
        };
        let rx = match self.submit_sequenced(&cell, &mut g, record, vec![read_mark]) {
            Ok(rx) => rx,
            Err(e) => {
                if buyer {
                    self.inner.user_rates.give_back(who.user_id());
                }
                return Err(e.into());
            }
        };
        g.advance_read_mark(who.user_id(), seq);
        if buyer && msg.reply_to > 0 {
            // A buyer answering in the group is engaged with it.
            self.record_signal(&g.record.shop_id, crate::reach::Signal::Replied, now_ms);
        }
        if let Some((answer, quote)) = auto {
            self.post_auto_answer(&cell, &mut g, seq, quote, answer, now_ms);
        }
        let session = (!g.record.cs_buyer.is_empty())
            .then(|| (g.record.shop_id.clone(), g.record.cs_buyer.clone()));
        drop(g);
        if let Some((shop, buyer)) = session {
            // Off this request's path: the session's bookkeeping (keep it
            // open, reopen it, count a reply) follows the message.
            let (groups, who) = (self.clone(), who.clone());
            tokio::spawn(async move {
                if let Err(e) = groups.cs_on_message(&shop, &buyer, &who, now_ms).await {
                    tracing::warn!(group_id, error = %e, "customer-service session not updated");
                }
            });
        }
        Ok(PostTicket {
            ack: ack(seq, now_ms, false),
            rx,
        })
    }

    /// Under the group's lock (`g` is `cell`'s state): queues `record`, the
    /// group's next message, with `extra` writes as one atomic batch, and
    /// takes its seq. The receiver resolves once the batch is durable and
    /// the message published to every subscriber, in seq order; only then
    /// does anyone see it.
    ///
    /// # Errors
    /// The store's refusal; then nothing was queued and no seq was taken.
    pub(crate) fn submit_sequenced(
        &self,
        cell: &Arc<GroupCell>,
        g: &mut GroupState,
        record: MessageRecord,
        extra: Vec<WriteOp>,
    ) -> Result<oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        let seq = record.seq;
        let (tx, rx) = oneshot::channel();
        let publisher = cell.clone();
        let stats = self.inner.stats.clone();
        let fanout = self.inner.fanout.clone();
        // Zero: no turn here, the fan-out workers take it all.
        let budget = if self.inner.config.fan_out_on_commit {
            self.inner.config.fanout_budget
        } else {
            0
        };
        let done: qun_storage::DurableCallback = Box::new(move |result| {
            let mut g = publisher.lock();
            let outcome = match result {
                Ok(()) => {
                    g.publish_through(seq);
                    // One turn here, on the store's writer (unless handed
                    // over); the rest of a big group's fan-out waits its
                    // turn on the queue.
                    let done = budget > 0 && g.fan_out(budget, &stats);
                    if !done && !g.fanout_queued {
                        g.fanout_queued = true;
                        fanout.push(publisher.clone());
                    }
                    stats.messages_posted.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    g.fail();
                    Err(e)
                }
            };
            drop(g);
            let _ = tx.send(outcome);
        });
        let mut ops = Vec::with_capacity(1 + extra.len());
        ops.push(WriteOp::AppendMessage(record.clone()));
        ops.extend(extra);
        self.inner.store.submit(ops, done)?;
        g.commit_sequenced(record);
        Ok(rx)
    }

    /// The ticket of a retry whose original is in the group's window: ready
    /// at once when the original is visible, else once it is durable (an
    /// empty submission resolves after every earlier one).
    fn retry_ticket(
        &self,
        g: &crate::group::GroupState,
        ack: v1::SendAck,
        sent: Sent,
    ) -> Result<PostTicket, ChatError> {
        self.inner
            .stats
            .duplicate_sends
            .fetch_add(1, Ordering::Relaxed);
        if sent.seq <= g.visible_seq() {
            return Ok(PostTicket::ready(ack));
        }
        let (done, rx) = durable_channel();
        self.inner.store.submit(Vec::new(), done)?;
        Ok(PostTicket { ack, rx })
    }

    async fn quote(
        &self,
        cell: &GroupCell,
        who: &Identity,
        group_id: u64,
        seq: u64,
    ) -> Result<QuoteRecord, ChatError> {
        // A message the sender does not get (a promotion they muted, a
        // targeted push outside their audience) cannot be quoted: the quote
        // would show it to everyone.
        let viewer = {
            let g = cell.lock();
            g.member(who)?;
            if !g.has_seq(seq) {
                return Err(ChatError::ReplyToUnknown { group_id, seq });
            }
            let viewer = g.viewer(who.user_id());
            match g.quote_in_memory(seq, &viewer) {
                Some(Some(q)) => return Ok(q),
                Some(None) => return Err(ChatError::ReplyToUnknown { group_id, seq }),
                None => viewer,
            }
        };
        let found = self
            .inner
            .store
            .messages_after(group_id, seq - 1, 1)
            .await?;
        match found.into_iter().next() {
            Some(m) if m.seq == seq => {
                let quote = quote_of_record(&m);
                match viewer.view_record(m).kind == v1::MessageKind::Hidden as i32 {
                    true => Err(ChatError::ReplyToUnknown { group_id, seq }),
                    false => Ok(quote),
                }
            }
            _ => Err(ChatError::ReplyToUnknown { group_id, seq }),
        }
    }

    /// A page of history below `before_seq` (0: from the newest). Members only.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `InvalidArgument` for a limit above the
    /// maximum, `Storage`.
    pub async fn history(
        &self,
        who: &Identity,
        group_id: u64,
        before_seq: u64,
        limit: u32,
    ) -> Result<v1::HistoryPage, ChatError> {
        crate::permissions::require(who, crate::permissions::Operation::ReadHistory)?;
        let limit = self.page_limit(limit)?;
        let before = if before_seq == 0 {
            u64::MAX
        } else {
            before_seq
        };
        let cell = self.cell(group_id).await?;
        let (from_ring, visible, viewer) = {
            let g = cell.lock();
            g.member(who)?;
            let viewer = g.viewer(who.user_id());
            (
                g.recent_before(before, limit, &viewer),
                g.visible_seq(),
                viewer,
            )
        };
        let messages = match from_ring {
            Some(m) => m,
            None => {
                self.stored_before(group_id, before.min(visible + 1), limit, &viewer)
                    .await?
            }
        };
        let has_more = messages.first().is_some_and(|m| m.seq > 1);
        Ok(v1::HistoryPage {
            group_id,
            messages,
            has_more,
        })
    }

    /// A page size as asked (0: the default), within the maximum.
    pub(crate) fn page_limit(&self, limit: u32) -> Result<usize, ChatError> {
        let max = self.inner.config.history_max;
        match limit as usize {
            0 => Ok(self.inner.config.join_recent),
            n if n <= max => Ok(n),
            n => Err(ChatError::InvalidArgument(format!(
                "limit {n} is above {max}"
            ))),
        }
    }

    /// A page of stored messages as `viewer` sees them.
    async fn stored_before(
        &self,
        group_id: u64,
        before: u64,
        limit: usize,
        viewer: &Viewer<'_>,
    ) -> Result<Vec<v1::ChatMessage>, ChatError> {
        let stored = self
            .inner
            .store
            .messages_before(group_id, before, limit)
            .await?;
        Ok(stored.into_iter().map(|r| viewer.view_record(r)).collect())
    }
}

fn validate_text(text: &[u8]) -> Result<String, ChatError> {
    if text.len() > qun_proto::MAX_TEXT_BYTES {
        return Err(ChatError::TextTooLong {
            len: text.len(),
            max: qun_proto::MAX_TEXT_BYTES,
        });
    }
    let text = std::str::from_utf8(text).map_err(|_| ChatError::TextNotUtf8)?;
    if text.trim().is_empty() {
        return Err(ChatError::TextEmpty);
    }
    Ok(text.to_string())
}

/// Groups with fan-out work left (see `GroupState::fan_out`), in the order
/// they get their next turn.
///
/// Lock-free: every commit that leaves subscribers to push to, and every
/// turn, goes through it, for every shop on the server. A group is on it
/// at most once (`fanout_queued`), so it holds at most one entry per group.
#[derive(Debug, Default)]
pub(crate) struct FanoutQueue {
    /// Each group with when it was queued ([`CoreStats::fanout_wait`]).
    groups: crossbeam_queue::SegQueue<(Arc<GroupCell>, std::time::Instant)>,
    /// Told when a group is queued.
    ready: tokio::sync::Notify,
}

impl FanoutQueue {
    fn push(&self, cell: Arc<GroupCell>) {
        self.groups.push((cell, std::time::Instant::now()));
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<(Arc<GroupCell>, std::time::Instant)> {
        self.groups.pop()
    }
}
