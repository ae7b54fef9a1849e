//! The clustered store on ScyllaDB (or Apache Cassandra 4.x), through the
//! `scylla` driver over CQL protocol v4.
//!
//! It keeps the embedded store's layout ([`crate::keys`]) in CQL tables
//! (`storage/cql/`) and the same promise: writes of one group become durable
//! in submission order, and a callback reports success only once the
//! cluster acknowledged the write at the configured consistency
//! (`LOCAL_QUORUM` by default).
//!
//! # How writes go
//! [`Store::submit`] turns the operations into CQL statements at once and
//! queues them. One writer task takes whatever has queued (group commit, as
//! in the embedded store) and writes it as one *round*:
//! - submissions of different groups go concurrently, those of one group one
//!   after another, so a later write of a group is never sent before an
//!   earlier one is acknowledged;
//! - consecutive submissions of one group are written as one batch (up to
//!   `max_batch_bytes`): an unlogged batch when all of it is in one
//!   partition, a logged batch (atomic) across partitions, or a single
//!   statement; a submission is never split between batches;
//! - every statement is idempotent, so a timeout or an unavailable replica
//!   is retried with backoff for up to `write_retry_window`;
//! - callbacks run in submission order after the round.
//!
//! A write that still fails after the window poisons the store, exactly as a
//! failed fsync poisons the embedded one: nothing later may land while it is
//! missing, so every later write is refused until the server restarts.
//!
//! # How reads go
//! Token-aware, shard-aware routing (the driver's default policy, preferring
//! `local_dc` when set), paged with `page_size` rows per page. Many callers
//! asking for the same page at once share one query when the store is
//! wrapped in [`crate::Coalescing`], which `qun serve` does.
//!
//! # Example
//! ```no_run
//! use qun_storage::scylla_store::{ScyllaConfig, ScyllaStore, Replication, migrate_with};
//! use qun_storage::{Store, StoreExt};
//!
//! # async fn run() -> Result<(), qun_storage::StorageError> {
//! let config = ScyllaConfig::new(vec!["127.0.0.1:9042".into()], "qun");
//! migrate_with(&config, &Replication::Simple { factor: 1 }).await?;
//! let store = ScyllaStore::connect(config).await?;
//! assert_eq!(store.last_seq(1).await?, 0);
//! # Ok(()) }
//! ```

mod schema;
pub(crate) mod statements;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::TryStreamExt as _;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::pager::QueryPager;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    PrepareError, RequestAttemptError,
};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::mpsc;

pub use schema::{
    MIGRATIONS, MigrateReport, Migration, Replication, SCHEMA_VERSION, check as check_schema,
    check_keyspace_name, create_keyspace, migrate, render, schema_version,
};
pub use scylla::statement::Consistency;

use self::statements::{Write, id64};
use self::writer::{CqlSink, Job, Writer};
use crate::records::{
    AutoReplyRecord, BuyerTagsRecord, CsBuyerRecord, CsShopRecord, EntryRecord, FaqRecord,
    GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord, ObjectRecord,
    ProductRecord, ReportRecord, ScheduleRecord, SentRecord,
};
use crate::stats::CommitStats;
use crate::{BoxFuture, Due, DurableCallback, FeedbackDay, ReachUse, StorageError, Store, WriteOp};

/// How the clustered store connects and writes.
#[derive(Debug, Clone)]
pub struct ScyllaConfig {
    /// Contact points, `host:port` (the driver discovers the rest).
    pub nodes: Vec<String>,
    /// The keyspace (see [`check_keyspace_name`]).
    pub keyspace: String,
    /// The local datacenter: requests go to its nodes first. Empty: none
    /// preferred (one datacenter).
    pub local_dc: String,
    /// Consistency of every read and write. `LOCAL_QUORUM` (default) makes
    /// an acknowledged write survive the loss of a minority of its replicas
    /// and lets reads see it.
    pub consistency: Consistency,
    /// Client-side timeout of one request.
    pub request_timeout: Duration,
    /// How long a failing write is retried before the store gives up and
    /// refuses writes until restarted.
    pub write_retry_window: Duration,
    /// Most submissions waiting for the writer; beyond it `submit` answers
    /// [`StorageError::Overloaded`].
    pub queue_capacity: usize,
    /// Most submissions written in one round.
    pub max_batch: usize,
    /// Most bytes of values in one CQL batch. Consecutive submissions of one
    /// group share a batch up to this size; keep it below the cluster's
    /// `batch_size_fail_threshold_in_kb` (50 KiB by default in Cassandra).
    pub max_batch_bytes: usize,
    /// Rows per page of a read.
    pub page_size: i32,
    /// User name, when the cluster requires authentication (empty: none).
    pub user: String,
    /// Password of `user`.
    pub password: String,
}

impl ScyllaConfig {
    /// Defaults for `nodes` and `keyspace`.
    pub fn new(nodes: Vec<String>, keyspace: impl Into<String>) -> Self {
        Self {
            nodes,
            keyspace: keyspace.into(),
            local_dc: String::new(),
            consistency: Consistency::LocalQuorum,
            request_timeout: Duration::from_secs(5),
            write_retry_window: Duration::from_secs(10),
            queue_capacity: 65_536,
            max_batch: 1_024,
            max_batch_bytes: 32 * 1024,
            page_size: 1_000,
            user: String::new(),
            password: String::new(),
        }
    }
}

/// Parses a consistency level as written in configuration
/// (`local_quorum`, `quorum`, `each_quorum`, `all`, `local_one`, `one`).
///
/// # Errors
/// A message naming the accepted levels.
pub fn parse_consistency(s: &str) -> Result<Consistency, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "local_quorum" => Consistency::LocalQuorum,
        "quorum" => Consistency::Quorum,
        "each_quorum" => Consistency::EachQuorum,
        "all" => Consistency::All,
        "local_one" => Consistency::LocalOne,
        "one" => Consistency::One,
        other => {
            return Err(format!(
                "consistency {other:?}: use local_quorum, quorum, each_quorum, all, local_one or one"
            ));
        }
    })
}

/// Connects a driver session for `config` (no keyspace selected).
///
/// # Errors
/// [`StorageError::Unavailable`] when no contact point answers.
pub async fn session(config: &ScyllaConfig) -> Result<Session, StorageError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if !config.local_dc.is_empty() {
        policy = policy
            .prefer_datacenter(config.local_dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .request_timeout(Some(config.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(config.request_timeout)
        .default_execution_profile_handle(profile.into_handle())
        // Later submissions must win over earlier ones on the same row,
        // whichever coordinator receives them.
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()));
    if !config.user.is_empty() {
        builder = builder.user(&config.user, &config.password);
    }
    builder.build().await.map_err(connect_err)
}

/// Connects and runs [`schema::migrate`] on `config.keyspace`.
///
/// # Errors
/// As for [`session`] and [`schema::migrate`].
pub async fn migrate_with(
    config: &ScyllaConfig,
    replication: &Replication,
) -> Result<MigrateReport, StorageError> {
    check_keyspace_name(&config.keyspace)?;
    let session = session(config).await?;
    schema::migrate(&session, &config.keyspace, replication).await
}

/// Connects and fills the reply index (`replies`) of `config.keyspace`
/// from its messages once more; returns how many replies it indexed.
///
/// [`schema::migrate`] fills the index when it brings a keyspace to
/// version 10, but servers of an older version still running meanwhile
/// append replies without an index row: a recall would leave their quotes
/// as they were. Run this (`qun migrate --reindex-replies`) once the last
/// of them has stopped. It reads the whole `messages` table and writes
/// rows that are the same as any already there, so it can run at any
/// time, beside running servers, and again if cut short.
///
/// # Errors
/// As for [`session`]; [`StorageError::Schema`] when the keyspace is not
/// at this build's schema version (migrate first); the errors of reading
/// and writing the tables.
pub async fn reindex_replies_with(config: &ScyllaConfig) -> Result<u64, StorageError> {
    check_keyspace_name(&config.keyspace)?;
    let session = session(config).await?;
    schema::check(&session, &config.keyspace).await?;
    schema::index_replies(&session, &config.keyspace).await
}

/// Drops keyspace `ks` and everything in it. For test runs that made their
/// own keyspace; never used by the server.
///
/// # Errors
/// As for [`session`]; [`StorageError::Schema`] for a bad name.
pub async fn drop_keyspace(session: &Session, ks: &str) -> Result<(), StorageError> {
    check_keyspace_name(ks)?;
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await
        .map_err(|e| exec_err("drop keyspace", e))?;
    Ok(())
}

/// The clustered store. Cheap to clone; clones share one session and one
/// writer task.
#[derive(Debug, Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    session: Arc<Session>,
    reads: Reads,
    jobs: mpsc::Sender<Job>,
    /// Buckets known to be in `message_buckets`, per group: a message of
    /// any other bucket registers its bucket in the same batch.
    buckets: Arc<DashMap<u64, Vec<u64>>>,
    poisoned: Arc<AtomicBool>,
    closed: AtomicBool,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stats: Arc<CommitStats>,
}

/// The prepared reads.
#[derive(Debug)]
struct Reads {
    group: PreparedStatement,
    members: PreparedStatement,
    user_groups: PreparedStatement,
    max_group_id: PreparedStatement,
    buckets: PreparedStatement,
    last_in_bucket: PreparedStatement,
    before_in_bucket: PreparedStatement,
    after_in_bucket: PreparedStatement,
    sent: PreparedStatement,
    replies: PreparedStatement,
    read_marks: PreparedStatement,
    objects: PreparedStatement,
    entries: PreparedStatement,
    due: PreparedStatement,
    product: PreparedStatement,
    cards: PreparedStatement,
    reach_use: PreparedStatement,
    feedback: PreparedStatement,
    promotion_mutes: PreparedStatement,
    reports: PreparedStatement,
    member_flags: PreparedStatement,
    faq: PreparedStatement,
    auto_replies: PreparedStatement,
    join_requests: PreparedStatement,
    buyer_tags: PreparedStatement,
    schedules: PreparedStatement,
    cs_shop: PreparedStatement,
    cs_buyer: PreparedStatement,
}

impl Reads {
    async fn prepare(session: &Session, ks: &str, page_size: i32) -> Result<Self, StorageError> {
        let p = |cql: String| async move {
            let mut s = session
                .prepare(cql)
                .await
                .map_err(|e| prepare_err("prepare read", e))?;
            s.set_is_idempotent(true);
            s.set_page_size(page_size.max(1));
            Ok::<_, StorageError>(s)
        };
        Ok(Self {
            group: p(format!("SELECT record FROM {ks}.groups WHERE group_id = ?")).await?,
            members: p(format!(
                "SELECT record FROM {ks}.members WHERE group_id = ?"
            ))
            .await?,
            user_groups: p(format!(
                "SELECT group_id FROM {ks}.user_groups WHERE user_id = ?"
            ))
            .await?,
            max_group_id: p(format!(
                "SELECT group_id FROM {ks}.group_ids WHERE shard = ? LIMIT 1"
            ))
            .await?,
            buckets: p(format!(
                "SELECT bucket FROM {ks}.message_buckets WHERE group_id = ?"
            ))
            .await?,
            last_in_bucket: p(format!(
                "SELECT seq FROM {ks}.messages WHERE group_id = ? AND bucket = ? \
                 ORDER BY seq DESC LIMIT 1"
            ))
            .await?,
            before_in_bucket: p(format!(
                "SELECT record FROM {ks}.messages WHERE group_id = ? AND bucket = ? AND seq < ? \
                 ORDER BY seq DESC LIMIT ?"
            ))
            .await?,
            after_in_bucket: p(format!(
                "SELECT record FROM {ks}.messages WHERE group_id = ? AND bucket = ? AND seq > ? \
                 ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            sent: p(format!(
                "SELECT seq, ts_ms FROM {ks}.sent \
                 WHERE group_id = ? AND sender_id = ? AND client_msg_id = ?"
            ))
            .await?,
            replies: p(format!(
                "SELECT reply_seq FROM {ks}.replies WHERE group_id = ? AND quoted_seq = ?"
            ))
            .await?,
            read_marks: p(format!(
                "SELECT user_id, seq FROM {ks}.read_marks WHERE group_id = ?"
            ))
            .await?,
            objects: p(format!(
                "SELECT record FROM {ks}.objects WHERE group_id = ?"
            ))
            .await?,
            entries: p(format!(
                "SELECT record FROM {ks}.entries WHERE group_id = ?"
            ))
            .await?,
            due: p(format!(
                "SELECT group_id, object_id, due_ms FROM {ks}.due WHERE shard = ?"
            ))
            .await?,
            product: p(format!(
                "SELECT record FROM {ks}.products WHERE shop_id = ? AND product_id = ?"
            ))
            .await?,
            cards: p(format!(
                "SELECT group_id FROM {ks}.cards WHERE shop_id = ? AND product_id = ?"
            ))
            .await?,
            reach_use: p(format!(
                "SELECT day, used FROM {ks}.reach_use WHERE group_id = ?"
            ))
            .await?,
            feedback: p(format!(
                "SELECT day, positive, negative FROM {ks}.shop_feedback WHERE shop_id = ?"
            ))
            .await?,
            promotion_mutes: p(format!(
                "SELECT user_id FROM {ks}.promotion_mutes WHERE group_id = ?"
            ))
            .await?,
            reports: p(format!(
                "SELECT record FROM {ks}.reports WHERE group_id = ?"
            ))
            .await?,
            member_flags: p(format!(
                "SELECT user_id, record FROM {ks}.member_flags WHERE group_id = ?"
            ))
            .await?,
            faq: p(format!("SELECT record FROM {ks}.faq WHERE group_id = ?")).await?,
            auto_replies: p(format!(
                "SELECT record FROM {ks}.auto_replies WHERE shop_id = ?"
            ))
            .await?,
            join_requests: p(format!(
                "SELECT record FROM {ks}.join_requests WHERE group_id = ?"
            ))
            .await?,
            buyer_tags: p(format!(
                "SELECT record FROM {ks}.buyer_tags WHERE shop_id = ? AND user_id = ?"
            ))
            .await?,
            // The whole table, paged: read once at start-up.
            schedules: p(format!("SELECT record FROM {ks}.schedules")).await?,
            cs_shop: p(format!(
                "SELECT record FROM {ks}.cs_shops WHERE shop_id = ?"
            ))
            .await?,
            cs_buyer: p(format!(
                "SELECT record FROM {ks}.cs_buyers WHERE shop_id = ? AND buyer_id = ?"
            ))
            .await?,
        })
    }
}

impl ScyllaStore {
    /// Connects, checks that the keyspace has this build's schema, prepares
    /// every statement and starts the writer task. Call it inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// [`StorageError::Unavailable`] when the cluster cannot be reached,
    /// [`StorageError::Schema`] when the keyspace is missing or at another
    /// schema version (the message says to run `qun migrate`).
    pub async fn connect(config: ScyllaConfig) -> Result<Self, StorageError> {
        check_keyspace_name(&config.keyspace)?;
        let session = Arc::new(session(&config).await?);
        schema::check(&session, &config.keyspace).await?;
        let reads = Reads::prepare(&session, &config.keyspace, config.page_size).await?;
        let mut writes = Vec::with_capacity(Write::ALL.len());
        for w in Write::ALL {
            let mut s = session
                .prepare(w.cql(&config.keyspace))
                .await
                .map_err(|e| prepare_err("prepare write", e))?;
            s.set_is_idempotent(true);
            writes.push(s);
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let poisoned = Arc::new(AtomicBool::new(false));
        let buckets = Arc::new(DashMap::new());
        let stats = Arc::new(CommitStats::default());
        let writer = tokio::spawn(
            Writer {
                sink: CqlSink {
                    session: session.clone(),
                    writes,
                },
                max_batch: config.max_batch.max(1),
                max_batch_bytes: config.max_batch_bytes.max(1),
                retry_window: config.write_retry_window,
                poisoned: poisoned.clone(),
                buckets: buckets.clone(),
                stats: stats.clone(),
            }
            .run(rx),
        );
        tracing::info!(
            nodes = ?config.nodes,
            keyspace = %config.keyspace,
            consistency = ?config.consistency,
            "scylla store connected"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                reads,
                jobs: tx,
                buckets,
                poisoned,
                closed: AtomicBool::new(false),
                writer: Mutex::new(Some(writer)),
                stats,
            }),
        })
    }

    /// What the writer task has made durable so far: rounds, submissions,
    /// statements, and each submission's time to durability (from
    /// [`Store::submit`] to the cluster's acknowledgement of its batch).
    /// The server shows them at `/metrics`.
    pub fn commit_stats(&self) -> Arc<CommitStats> {
        self.inner.stats.clone()
    }

    fn enqueue(&self, job: Job) -> Result<(), StorageError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        self.inner.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StorageError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => StorageError::Closed,
        })
    }

    /// Whether `bucket` of `group_id` still has to be registered. It counts
    /// as registered only once a write of it was acknowledged (the writer
    /// records it), so a refused or failed submission never leaves a bucket
    /// unlisted; until then every message of it registers it again, which
    /// is idempotent.
    fn new_bucket(&self, group_id: u64, bucket: u64) -> bool {
        self.inner
            .buckets
            .get(&group_id)
            .is_none_or(|known| !known.contains(&bucket))
    }

    /// Every row of `statement` with `values`, paged.
    async fn rows<T>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<T>, StorageError>
    where
        T: for<'f, 'm> DeserializeRow<'f, 'm> + 'static,
    {
        let pager: QueryPager = self
            .inner
            .session
            .execute_iter(statement.clone(), values)
            .await
            .map_err(|e| pager_err(op, e))?;
        pager
            .rows_stream::<T>()
            .map_err(|e| StorageError::backend(op, e))?
            .try_collect()
            .await
            .map_err(|e| row_err(op, e))
    }

    /// Decodes the `record` blob of every row.
    async fn records<T: prost::Message + Default>(
        &self,
        table: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<T>, StorageError> {
        let rows: Vec<(Vec<u8>,)> = self.rows(table, statement, values).await?;
        rows.iter()
            .map(|(b,)| T::decode(&b[..]).map_err(|e| StorageError::corrupt(table, e)))
            .collect()
    }

    async fn known_buckets(&self, group_id: i64) -> Result<Vec<u64>, StorageError> {
        let rows: Vec<(i64,)> = self
            .rows("message_buckets", &self.inner.reads.buckets, (group_id,))
            .await?;
        rows.into_iter()
            .map(|(b,)| unsigned("message_buckets", b))
            .collect()
    }
}

fn unsigned(table: &'static str, v: i64) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(|_| StorageError::corrupt(table, format!("negative value {v}")))
}

/// A u64 bound to a CQL bigint, clamped: for range ends such as
/// `before_seq = u64::MAX`.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_value(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// Maps a driver error to a storage error that says whether to retry.
pub(crate) fn exec_err(op: &'static str, e: ExecutionError) -> StorageError {
    match &e {
        ExecutionError::RequestTimeout(_) => StorageError::Timeout { op },
        ExecutionError::EmptyPlan | ExecutionError::ConnectionPoolError(_) => {
            StorageError::Unavailable {
                op,
                detail: e.to_string(),
            }
        }
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => match db {
                DbError::ReadTimeout { .. } | DbError::WriteTimeout { .. } => {
                    StorageError::Timeout { op }
                }
                DbError::Unavailable { .. } | DbError::IsBootstrapping => {
                    StorageError::Unavailable {
                        op,
                        detail: e.to_string(),
                    }
                }
                DbError::Overloaded | DbError::RateLimitReached { .. } => StorageError::Overloaded,
                _ => StorageError::backend(op, e),
            },
            RequestAttemptError::BrokenConnectionError(_)
            | RequestAttemptError::UnableToAllocStreamId => StorageError::Unavailable {
                op,
                detail: e.to_string(),
            },
            _ => StorageError::backend(op, e),
        },
        _ => StorageError::backend(op, e),
    }
}

pub(crate) fn pager_err(op: &'static str, e: PagerExecutionError) -> StorageError {
    match e {
        PagerExecutionError::NextPageError(NextPageError::RequestFailure(r)) => {
            exec_err(op, r.into_execution_error())
        }
        other => StorageError::backend(op, other),
    }
}

pub(crate) fn row_err(op: &'static str, e: NextRowError) -> StorageError {
    match e {
        NextRowError::NextPageError(NextPageError::RequestFailure(r)) => {
            exec_err(op, r.into_execution_error())
        }
        NextRowError::RowDeserializationError(d) => StorageError::corrupt(op, d),
        other => StorageError::backend(op, other),
    }
}

pub(crate) fn prepare_err(op: &'static str, e: PrepareError) -> StorageError {
    match e {
        PrepareError::ConnectionPoolError(_) => StorageError::Unavailable {
            op,
            detail: e.to_string(),
        },
        other => StorageError::backend(op, other),
    }
}

fn connect_err(e: NewSessionError) -> StorageError {
    StorageError::Unavailable {
        op: "connect",
        detail: e.to_string(),
    }
}

impl Store for ScyllaStore {
    fn submit(&self, ops: Vec<WriteOp>, done: DurableCallback) -> Result<(), StorageError> {
        let mut out = Vec::with_capacity(ops.len() * 2);
        for op in &ops {
            statements::statements(op, |g, b| self.new_bucket(g, b), &mut out)?;
        }
        self.enqueue(Job::Write {
            lane: statements::lane(&ops),
            statements: out,
            done,
            submitted: std::time::Instant::now(),
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.enqueue(Job::Flush(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        Box::pin(async move {
            queued?;
            rx.await.unwrap_or(Err(StorageError::Closed))
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let flushed = match self.flush().await {
                Err(StorageError::Closed) => Ok(()),
                r => r,
            };
            self.inner.closed.store(true, Ordering::Release);
            // The writer stops after what is queued; `send` waits for room.
            let _ = self.inner.jobs.send(Job::Stop).await;
            let writer = self
                .inner
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(handle) = writer {
                handle
                    .await
                    .map_err(|e| StorageError::backend("join writer", e))?;
            }
            flushed
        })
    }

    fn load_group(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<GroupRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let mut found: Vec<GroupRecord> = self
                .records("groups", &self.inner.reads.group, (id,))
                .await?;
            Ok(found.pop())
        })
    }

    fn load_members(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<MemberRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            self.records("members", &self.inner.reads.members, (id,))
                .await
        })
    }

    fn groups_of_user(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        let user_id = user_id.to_string();
        Box::pin(async move {
            let rows: Vec<(i64,)> = self
                .rows("user_groups", &self.inner.reads.user_groups, (user_id,))
                .await?;
            rows.into_iter()
                .map(|(g,)| unsigned("user_groups", g))
                .collect()
        })
    }

    fn max_group_id(&self) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            let rows: Vec<(i64,)> = self
                .rows(
                    "group_ids",
                    &self.inner.reads.max_group_id,
                    (statements::SINGLE_SHARD,),
                )
                .await?;
            rows.first().map_or(Ok(0), |(g,)| unsigned("group_ids", *g))
        })
    }

    fn last_seq(&self, group_id: u64) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            for bucket in statements::buckets_down_from(&self.known_buckets(id).await?, u64::MAX) {
                let rows: Vec<(i64,)> = self
                    .rows(
                        "messages",
                        &self.inner.reads.last_in_bucket,
                        (id, clamp(bucket)),
                    )
                    .await?;
                if let Some((seq,)) = rows.first() {
                    return unsigned("messages", *seq);
                }
            }
            Ok(0)
        })
    }

    fn messages_before(
        &self,
        group_id: u64,
        before_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        Box::pin(async move {
            if before_seq <= 1 || limit == 0 {
                return Ok(Vec::new());
            }
            let id = id64("group id", group_id)?;
            let known = self.known_buckets(id).await?;
            let mut out: Vec<MessageRecord> = Vec::new();
            for bucket in statements::buckets_down_from(&known, before_seq - 1) {
                let want = limit - out.len();
                let page: Vec<MessageRecord> = self
                    .records(
                        "messages",
                        &self.inner.reads.before_in_bucket,
                        (id, clamp(bucket), clamp(before_seq), limit_value(want)),
                    )
                    .await?;
                out.extend(page);
                if out.len() >= limit {
                    break;
                }
            }
            out.reverse();
            Ok(out)
        })
    }

    fn messages_after(
        &self,
        group_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        Box::pin(async move {
            let Some(first) = after_seq.checked_add(1) else {
                return Ok(Vec::new());
            };
            if limit == 0 || first > i64::MAX as u64 {
                return Ok(Vec::new());
            }
            let id = id64("group id", group_id)?;
            let known = self.known_buckets(id).await?;
            let mut out: Vec<MessageRecord> = Vec::new();
            for bucket in statements::buckets_up_from(&known, first) {
                let want = limit - out.len();
                let page: Vec<MessageRecord> = self
                    .records(
                        "messages",
                        &self.inner.reads.after_in_bucket,
                        (id, clamp(bucket), clamp(after_seq), limit_value(want)),
                    )
                    .await?;
                out.extend(page);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn find_sent<'a>(
        &'a self,
        group_id: u64,
        sender_id: &'a str,
        client_msg_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SentRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let rows: Vec<(i64, i64)> = self
                .rows(
                    "sent",
                    &self.inner.reads.sent,
                    (id, sender_id, client_msg_id),
                )
                .await?;
            rows.first()
                .map(|(seq, ts)| {
                    Ok(SentRecord {
                        seq: unsigned("sent", *seq)?,
                        ts_ms: unsigned("sent", *ts)?,
                    })
                })
                .transpose()
        })
    }

    fn load_read_marks(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let rows: Vec<(String, i64)> = self
                .rows("read_marks", &self.inner.reads.read_marks, (id,))
                .await?;
            rows.into_iter()
                .map(|(u, s)| Ok((u, unsigned("read_marks", s)?)))
                .collect()
        })
    }

    fn load_objects(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ObjectRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            self.records("objects", &self.inner.reads.objects, (id,))
                .await
        })
    }

    fn load_entries(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<EntryRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            self.records("entries", &self.inner.reads.entries, (id,))
                .await
        })
    }

    fn due_objects(&self) -> BoxFuture<'_, Result<Vec<Due>, StorageError>> {
        Box::pin(async move {
            let rows: Vec<(i64, i64, i64)> = self
                .rows("due", &self.inner.reads.due, (statements::SINGLE_SHARD,))
                .await?;
            rows.into_iter()
                .map(|(g, o, d)| {
                    Ok(Due {
                        group_id: unsigned("due", g)?,
                        object_id: unsigned("due", o)?,
                        due_ms: unsigned("due", d)?,
                    })
                })
                .collect()
        })
    }

    fn load_product<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProductRecord>, StorageError>> {
        Box::pin(async move {
            let mut found: Vec<ProductRecord> = self
                .records("products", &self.inner.reads.product, (shop_id, product_id))
                .await?;
            Ok(found.pop())
        })
    }

    fn replies_to(&self, group_id: u64, seq: u64) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let quoted = id64("seq", seq)?;
            let rows: Vec<(i64,)> = self
                .rows("replies", &self.inner.reads.replies, (id, quoted))
                .await?;
            rows.into_iter()
                .map(|(r,)| unsigned("replies", r))
                .collect()
        })
    }

    fn groups_with_card<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, StorageError>> {
        Box::pin(async move {
            let rows: Vec<(i64,)> = self
                .rows("cards", &self.inner.reads.cards, (shop_id, product_id))
                .await?;
            rows.into_iter().map(|(g,)| unsigned("cards", g)).collect()
        })
    }

    fn load_reach_use(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<ReachUse>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let rows: Vec<(i64, i32)> = self
                .rows("reach_use", &self.inner.reads.reach_use, (id,))
                .await?;
            rows.first()
                .map(|(day, used)| {
                    Ok(ReachUse {
                        day: unsigned("reach_use", *day)?,
                        used: u32::try_from(*used)
                            .map_err(|_| StorageError::corrupt("reach_use", "negative count"))?,
                    })
                })
                .transpose()
        })
    }

    fn load_feedback<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FeedbackDay>, StorageError>> {
        Box::pin(async move {
            let rows: Vec<(i64, i64, i64)> = self
                .rows("shop_feedback", &self.inner.reads.feedback, (shop_id,))
                .await?;
            rows.into_iter()
                .map(|(d, p, n)| {
                    Ok(FeedbackDay {
                        day: unsigned("shop_feedback", d)?,
                        positive: unsigned("shop_feedback", p)?,
                        negative: unsigned("shop_feedback", n)?,
                    })
                })
                .collect()
        })
    }

    fn load_promotion_mutes(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let rows: Vec<(String,)> = self
                .rows("promotion_mutes", &self.inner.reads.promotion_mutes, (id,))
                .await?;
            Ok(rows.into_iter().map(|(u,)| u).collect())
        })
    }

    fn load_reports(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ReportRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            self.records("reports", &self.inner.reads.reports, (id,))
                .await
        })
    }

    fn load_faq(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<FaqRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            self.records("faq", &self.inner.reads.faq, (id,)).await
        })
    }

    // `load_buyer_tags_of` keeps the provided version on purpose: one
    // partition per (shop, buyer) means `user_id IN (…)` would be a
    // multi-partition read, which makes one coordinator wait for every
    // replica involved and answer at the pace of the slowest. Point reads,
    // `BUYER_TAG_READS_IN_FLIGHT` at a time, go token-aware straight to a
    // replica of each partition and spread over the cluster.
    fn load_buyer_tags<'a>(
        &'a self,
        shop_id: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BuyerTagsRecord>, StorageError>> {
        Box::pin(async move {
            let mut found: Vec<BuyerTagsRecord> = self
                .records(
                    "buyer_tags",
                    &self.inner.reads.buyer_tags,
                    (shop_id, user_id),
                )
                .await?;
            Ok(found.pop())
        })
    }

    fn load_cs_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsShopRecord>, StorageError>> {
        Box::pin(async move {
            let mut found: Vec<CsShopRecord> = self
                .records("cs_shops", &self.inner.reads.cs_shop, (shop_id,))
                .await?;
            Ok(found.pop())
        })
    }

    fn load_cs_buyer<'a>(
        &'a self,
        shop_id: &'a str,
        buyer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsBuyerRecord>, StorageError>> {
        Box::pin(async move {
            let mut found: Vec<CsBuyerRecord> = self
                .records("cs_buyers", &self.inner.reads.cs_buyer, (shop_id, buyer_id))
                .await?;
            Ok(found.pop())
        })
    }

    fn load_schedules(&self) -> BoxFuture<'_, Result<Vec<ScheduleRecord>, StorageError>> {
        Box::pin(async move {
            let mut all: Vec<ScheduleRecord> = self
                .records("schedules", &self.inner.reads.schedules, ())
                .await?;
            // Token order from the cluster; the trait promises id order.
            all.sort_unstable_by_key(|r| (r.group_id, r.schedule_id));
            Ok(all)
        })
    }

    fn load_join_requests(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<JoinRequestRecord>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            self.records("join_requests", &self.inner.reads.join_requests, (id,))
                .await
        })
    }

    fn load_auto_replies<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AutoReplyRecord>, StorageError>> {
        Box::pin(async move {
            self.records("auto_replies", &self.inner.reads.auto_replies, (shop_id,))
                .await
        })
    }

    fn load_member_flags(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, MemberFlagsRecord)>, StorageError>> {
        Box::pin(async move {
            let id = id64("group id", group_id)?;
            let rows: Vec<(String, Vec<u8>)> = self
                .rows("member_flags", &self.inner.reads.member_flags, (id,))
                .await?;
            rows.into_iter()
                .map(|(u, b)| {
                    <MemberFlagsRecord as prost::Message>::decode(&b[..])
                        .map(|f| (u, f))
                        .map_err(|e| StorageError::corrupt("member_flags", e))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests;
