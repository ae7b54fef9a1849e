//! The embedded store on fjall, Qun's default.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};

use crate::records::{
    AutoReplyRecord, BuyerTagsRecord, CsBuyerRecord, CsShopRecord, EntryRecord, FaqRecord,
    GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord, ObjectRecord,
    ProductRecord, ReportRecord, ScheduleRecord, SentRecord,
};
use crate::{
    BoxFuture, Due, DurableCallback, FeedbackDay, ReachUse, StorageError, Store, WriteOp, keys,
};

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct FjallConfig {
    /// Folder of the database; created when missing.
    pub path: PathBuf,
    /// fsync the journal at every group commit (default). Without it a
    /// commit survives a crash of the process but not of the machine.
    pub fsync: bool,
    /// Most submissions waiting for the writer; beyond it `submit` answers
    /// [`StorageError::Overloaded`].
    pub queue_capacity: usize,
    /// Most submissions folded into one batch (one fsync).
    pub max_batch: usize,
}

impl FjallConfig {
    /// Defaults for a store at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            fsync: true,
            queue_capacity: 65_536,
            max_batch: 4_096,
        }
    }
}

/// The embedded store.
///
/// Cheap to clone; all clones share one database and one writer thread.
#[derive(Debug, Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` once closed, so that closing releases the database (and its
    /// lock on the folder) even while handles to the store remain.
    tables: Mutex<Option<Tables>>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    poisoned: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Tables {
    db: Database,
    /// One per [`Table`], in the order of [`Table::ALL`] (its declaration
    /// order, so `table as usize` indexes it).
    keyspaces: Vec<Keyspace>,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables").finish_non_exhaustive()
    }
}

enum Job {
    Write(Vec<Put>, DurableCallback),
    Flush(DurableCallback),
}

impl FjallStore {
    /// Opens (or creates) the store and starts its writer thread.
    ///
    /// # Errors
    /// [`StorageError::Backend`] when the folder cannot be created, is locked
    /// by another running server, or holds a database fjall cannot recover.
    pub fn open(config: FjallConfig) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&config.path)
            .map_err(|e| StorageError::backend("create data dir", e))?;
        let db = Database::builder(&config.path)
            .open()
            .map_err(|e| StorageError::backend("open database", e))?;
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| StorageError::backend("open keyspace", e))
        };
        let tables = Tables {
            keyspaces: Table::ALL
                .iter()
                .map(|t| open(t.name()))
                .collect::<Result<_, _>>()?,
            db: db.clone(),
        };
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let poisoned = Arc::new(AtomicBool::new(false));
        let writer = {
            let tables = tables.clone();
            let poisoned = poisoned.clone();
            let max_batch = config.max_batch.max(1);
            let mode = if config.fsync {
                PersistMode::SyncAll
            } else {
                PersistMode::Buffer
            };
            std::thread::Builder::new()
                .name("qun-store-writer".into())
                .spawn(move || write_loop(&tables, &rx, max_batch, mode, &poisoned))
                .map_err(|e| StorageError::backend("start writer thread", e))?
        };
        tracing::info!(path = %config.path.display(), fsync = config.fsync, "embedded store open");
        Ok(Self {
            inner: Arc::new(Inner {
                tables: Mutex::new(Some(tables)),
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                poisoned,
            }),
        })
    }

    fn enqueue(&self, job: Job) -> Result<(), StorageError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        let jobs = lock(&self.inner.jobs);
        let Some(tx) = jobs.as_ref() else {
            return Err(StorageError::Closed);
        };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StorageError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(StorageError::Closed),
        }
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tables) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        let tables = lock(&self.inner.tables).clone();
        Box::pin(async move {
            let tables = tables.ok_or(StorageError::Closed)?;
            tokio::task::spawn_blocking(move || f(&tables))
                .await
                .map_err(|e| StorageError::backend("read task", e))?
        })
    }

    fn flush_job(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.enqueue(Job::Flush(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        Box::pin(async move {
            queued?;
            rx.await.unwrap_or(Err(StorageError::Closed))
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The writer thread: group commit. Blocks for the first job, then folds in
/// whatever else is already queued (up to `max_batch`), writes it as one
/// atomic batch, persists the journal once and reports every job in order.
fn write_loop(
    tables: &Tables,
    rx: &Receiver<Job>,
    max_batch: usize,
    mode: PersistMode,
    poisoned: &AtomicBool,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        jobs.push(first);
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let result = if poisoned.load(Ordering::Acquire) {
            Err(StorageError::Poisoned)
        } else {
            let started = Instant::now();
            let r = commit(tables, &mut jobs, mode);
            tracing::trace!(
                jobs = jobs.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "group commit"
            );
            r
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "store write failed; refusing all further writes");
            poisoned.store(true, Ordering::Release);
        }
        for job in jobs.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(StorageError::Poisoned),
            };
            match job {
                Job::Write(_, done) | Job::Flush(done) => done(r),
            }
        }
    }
    tracing::debug!("store writer stopped");
}

/// Defines [`Table`] from one list: each variant and the name of its
/// keyspace on disk.
macro_rules! tables {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// A keyspace of the store. Writes are prepared with it (without the
        /// keyspaces), and [`Tables::get`] finds its keyspace.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Table {
            $($(#[$doc])* $variant,)*
        }

        impl Table {
            /// Every table, in the order their keyspaces are held.
            const ALL: &'static [Table] = &[$(Table::$variant,)*];

            /// The keyspace's name on disk.
            fn name(self) -> &'static str {
                match self {
                    $(Table::$variant => $name,)*
                }
            }
        }
    };
}

tables! {
    Groups => "groups",
    Members => "members",
    UserGroups => "user_groups",
    Messages => "messages",
    Sent => "sent",
    ReadMarks => "read_marks",
    Objects => "objects",
    Entries => "entries",
    /// `group_id | object_id → due_ms` of objects with a deadline.
    Due => "due",
    Products => "products",
    Cards => "cards",
    /// `group_id → day | used`.
    Reach => "reach",
    /// `shop_id | 0x00 | day → positive | negative`.
    Feedback => "feedback",
    /// `group_id | user_id → []`.
    PromotionMutes => "promotion_mutes",
    Reports => "reports",
    /// `group_id | user_id → MemberFlagsRecord`.
    MemberFlags => "member_flags",
    /// `group_id | faq_id → FaqRecord`.
    Faq => "faq",
    /// `shop_id | 0x00 | rule_id → AutoReplyRecord`.
    AutoReplies => "auto_replies",
    /// `group_id | user_id → JoinRequestRecord`.
    JoinRequests => "join_requests",
    /// `shop_id | 0x00 | user_id → BuyerTagsRecord`.
    BuyerTags => "buyer_tags",
    /// `group_id | schedule_id → ScheduleRecord`.
    Schedules => "schedules",
    /// `shop_id → CsShopRecord`.
    CsShops => "cs_shops",
    /// `shop_id | 0x00 | buyer_id → CsBuyerRecord`.
    CsBuyers => "cs_buyers",
}

impl Tables {
    fn get(&self, table: Table) -> &Keyspace {
        &self.keyspaces[table as usize]
    }
}

/// One key written (`Some` value) or removed (`None`), built on the
/// submitting thread: the writer thread only moves it into the batch, so
/// it neither encodes nor allocates nor frees the records
/// (docs/benchmarks.md, "Flame graphs").
struct Put {
    table: Table,
    key: Slice,
    value: Option<Slice>,
}

/// The puts of a submission, with a buffer to encode records in.
struct Prepared {
    puts: Vec<Put>,
    scratch: Vec<u8>,
}

impl Prepared {
    fn insert(&mut self, table: Table, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.puts.push(Put {
            table,
            key: Slice::new(key.as_ref()),
            value: Some(Slice::new(value.as_ref())),
        });
    }

    /// Inserts `record` encoded: one allocation, the value itself.
    fn record(&mut self, table: Table, key: impl AsRef<[u8]>, record: &impl prost::Message) {
        self.scratch.clear();
        let value = match record.encode(&mut self.scratch) {
            Ok(()) => Slice::new(&self.scratch),
            // A Vec always has room; kept total anyway.
            Err(_) => Slice::from(record.encode_to_vec()),
        };
        self.puts.push(Put {
            table,
            key: Slice::new(key.as_ref()),
            value: Some(value),
        });
    }

    fn remove(&mut self, table: Table, key: impl AsRef<[u8]>) {
        self.puts.push(Put {
            table,
            key: Slice::new(key.as_ref()),
            value: None,
        });
    }
}

/// Builds the keys and values of `ops` (on the caller's thread) and drops
/// the records there.
fn prepare(ops: Vec<WriteOp>) -> Vec<Put> {
    let mut out = Prepared {
        puts: Vec::with_capacity(ops.len() * 2),
        scratch: Vec::new(),
    };
    for op in &ops {
        match op {
            WriteOp::PutGroup(g) => {
                out.record(Table::Groups, keys::group_key(g.group_id), g);
            }
            WriteOp::PutMember(m) => {
                out.record(Table::Members, keys::member_key(m.group_id, &m.user_id), m);
                out.insert(
                    Table::UserGroups,
                    keys::user_group_key(&m.user_id, m.group_id),
                    [],
                );
            }
            WriteOp::RemoveMember { group_id, user_id } => {
                out.remove(Table::Members, keys::member_key(*group_id, user_id));
                out.remove(Table::UserGroups, keys::user_group_key(user_id, *group_id));
                out.remove(Table::ReadMarks, keys::member_key(*group_id, user_id));
                out.remove(Table::PromotionMutes, keys::member_key(*group_id, user_id));
            }
            WriteOp::AppendMessage(msg) => {
                out.record(
                    Table::Messages,
                    keys::message_key(msg.group_id, msg.seq),
                    msg,
                );
                if !msg.client_msg_id.is_empty() {
                    let sent = SentRecord {
                        seq: msg.seq,
                        ts_ms: msg.ts_ms,
                    };
                    out.record(
                        Table::Sent,
                        keys::sent_key(msg.group_id, &msg.sender_id, &msg.client_msg_id),
                        &sent,
                    );
                }
            }
            WriteOp::PutReadMark {
                group_id,
                user_id,
                seq,
            } => {
                out.insert(
                    Table::ReadMarks,
                    keys::member_key(*group_id, user_id),
                    seq.to_be_bytes(),
                );
            }
            WriteOp::PutObject(o) => {
                let key = keys::object_key(o.group_id, o.object_id);
                out.record(Table::Objects, key, o);
                if o.due_ms > 0 {
                    out.insert(Table::Due, key, o.due_ms.to_be_bytes());
                } else {
                    out.remove(Table::Due, key);
                }
            }
            WriteOp::PutEntry(e) => {
                out.record(
                    Table::Entries,
                    keys::entry_key(e.group_id, e.object_id, &e.user_id),
                    e,
                );
            }
            WriteOp::RemoveEntry {
                group_id,
                object_id,
                user_id,
            } => {
                out.remove(
                    Table::Entries,
                    keys::entry_key(*group_id, *object_id, user_id),
                );
            }
            WriteOp::PutProduct(p) => {
                out.record(
                    Table::Products,
                    keys::product_key(&p.shop_id, &p.product_id),
                    p,
                );
            }
            WriteOp::PutCard {
                shop_id,
                product_id,
                group_id,
            } => {
                out.insert(
                    Table::Cards,
                    keys::card_key(shop_id, product_id, *group_id),
                    [],
                );
            }
            WriteOp::PutReachUse {
                group_id,
                day,
                used,
            } => {
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&day.to_be_bytes());
                v[8..].copy_from_slice(&u64::from(*used).to_be_bytes());
                out.insert(Table::Reach, keys::group_key(*group_id), v);
            }
            WriteOp::PutFeedback {
                shop_id,
                day,
                positive,
                negative,
            } => {
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&positive.to_be_bytes());
                v[8..].copy_from_slice(&negative.to_be_bytes());
                out.insert(Table::Feedback, keys::feedback_key(shop_id, *day), v);
            }
            WriteOp::PutPromotionMute {
                group_id,
                user_id,
                muted,
            } => {
                let key = keys::member_key(*group_id, user_id);
                if *muted {
                    out.insert(Table::PromotionMutes, key, []);
                } else {
                    out.remove(Table::PromotionMutes, key);
                }
            }
            WriteOp::PutBuyerTags(t) => {
                let key = keys::product_key(&t.shop_id, &t.user_id);
                if t.tags.is_empty() {
                    out.remove(Table::BuyerTags, key);
                } else {
                    out.record(Table::BuyerTags, key, t);
                }
            }
            WriteOp::PutJoinRequest(r) => {
                out.record(
                    Table::JoinRequests,
                    keys::member_key(r.group_id, &r.user_id),
                    r,
                );
            }
            WriteOp::RemoveJoinRequest { group_id, user_id } => {
                out.remove(Table::JoinRequests, keys::member_key(*group_id, user_id));
            }
            WriteOp::PutAutoReply(r) => {
                out.record(
                    Table::AutoReplies,
                    keys::product_key(&r.shop_id, &r.rule_id),
                    r,
                );
            }
            WriteOp::RemoveAutoReply { shop_id, rule_id } => {
                out.remove(Table::AutoReplies, keys::product_key(shop_id, rule_id));
            }
            WriteOp::PutFaq(f) => {
                out.record(Table::Faq, keys::object_key(f.group_id, f.faq_id), f);
            }
            WriteOp::PutCsShop(r) => {
                out.record(Table::CsShops, r.shop_id.as_bytes(), r);
            }
            WriteOp::PutCsBuyer(r) => {
                out.record(
                    Table::CsBuyers,
                    keys::product_key(&r.shop_id, &r.buyer_id),
                    r,
                );
            }
            WriteOp::PutSchedule(r) => {
                out.record(
                    Table::Schedules,
                    keys::object_key(r.group_id, r.schedule_id),
                    r,
                );
            }
            WriteOp::RemoveSchedule {
                group_id,
                schedule_id,
            } => {
                out.remove(Table::Schedules, keys::object_key(*group_id, *schedule_id));
            }
            WriteOp::RemoveFaq { group_id, faq_id } => {
                out.remove(Table::Faq, keys::object_key(*group_id, *faq_id));
            }
            WriteOp::RewriteMessage(msg) => {
                out.record(
                    Table::Messages,
                    keys::message_key(msg.group_id, msg.seq),
                    msg,
                );
            }
            WriteOp::PutMemberFlags {
                group_id,
                user_id,
                flags,
            } => {
                let key = keys::member_key(*group_id, user_id);
                if *flags == MemberFlagsRecord::default() {
                    out.remove(Table::MemberFlags, key);
                } else {
                    out.record(Table::MemberFlags, key, flags);
                }
            }
            WriteOp::PutReport(r) => {
                out.record(
                    Table::Reports,
                    keys::report_key(r.group_id, r.seq, &r.reporter_id),
                    r,
                );
            }
        }
    }
    out.puts
}

fn commit(tables: &Tables, jobs: &mut [Job], mode: PersistMode) -> Result<(), StorageError> {
    let mut batch = tables.db.batch();
    let mut writes = 0usize;
    for job in jobs.iter_mut() {
        let Job::Write(puts, _) = job else { continue };
        for put in puts.drain(..) {
            writes += 1;
            let keyspace = tables.get(put.table);
            match put.value {
                Some(value) => batch.insert(keyspace, put.key, value),
                None => batch.remove(keyspace, put.key),
            }
        }
    }
    if writes > 0 {
        batch
            .commit()
            .map_err(|e| StorageError::backend("commit batch", e))?;
    }
    tables
        .db
        .persist(mode)
        .map_err(|e| StorageError::backend("persist journal", e))
}

fn decode<T: prost::Message + Default>(
    keyspace: &'static str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    T::decode(bytes).map_err(|e| StorageError::corrupt(keyspace, e))
}

fn decode_messages(
    guards: impl Iterator<Item = fjall::Guard>,
) -> Result<Vec<MessageRecord>, StorageError> {
    guards
        .map(|guard| {
            let (_, v) = guard.into_inner().map_err(read_err)?;
            decode("messages", &v)
        })
        .collect()
}

/// Decodes every value under `prefix` of a keyspace.
/// The record at `key`, if there is one.
fn decode_one<T: prost::Message + Default>(
    tables: &Tables,
    table: Table,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>, StorageError> {
    tables
        .get(table)
        .get(key)
        .map_err(read_err)?
        .map(|v| decode(table.name(), &v))
        .transpose()
}

fn decode_prefix<T: prost::Message + Default>(
    tables: &Tables,
    table: Table,
    prefix: &[u8],
) -> Result<Vec<T>, StorageError> {
    tables
        .get(table)
        .prefix(prefix)
        .map(|guard| {
            let (_, v) = guard.into_inner().map_err(read_err)?;
            decode(table.name(), &v)
        })
        .collect()
}

/// The big-endian u64 at `range` of `bytes`.
fn be_u64(
    bytes: &[u8],
    range: std::ops::Range<usize>,
    what: &'static str,
) -> Result<u64, StorageError> {
    bytes
        .get(range)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::corrupt(what, "key or value length"))
}

/// The user id of a `group_id | user_id` key.
fn member_user(key: &[u8], keyspace: &'static str) -> Result<String, StorageError> {
    key.get(8..)
        .and_then(|u| std::str::from_utf8(u).ok())
        .map(str::to_string)
        .ok_or_else(|| StorageError::corrupt(keyspace, "key"))
}

fn read_err(e: fjall::Error) -> StorageError {
    StorageError::backend("read", e)
}

impl Store for FjallStore {
    fn submit(&self, ops: Vec<WriteOp>, done: DurableCallback) -> Result<(), StorageError> {
        self.enqueue(Job::Write(prepare(ops), done))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.flush_job()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let flushed = match self.flush_job().await {
                Err(StorageError::Closed) => Ok(()),
                r => r,
            };
            // Dropping the sender ends the writer loop once the queue is empty.
            lock(&self.inner.jobs).take();
            let writer = lock(&self.inner.writer).take();
            if let Some(handle) = writer {
                tokio::task::spawn_blocking(move || handle.join())
                    .await
                    .map_err(|e| StorageError::backend("join writer", e))?
                    .map_err(|_| {
                        StorageError::backend(
                            "join writer",
                            std::io::Error::other("writer thread panicked"),
                        )
                    })?;
            }
            lock(&self.inner.tables).take();
            flushed
        })
    }

    fn load_group(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<GroupRecord>, StorageError>> {
        self.read(move |t| decode_one(t, Table::Groups, keys::group_key(group_id)))
    }

    fn load_members(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<MemberRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::Members, &keys::group_key(group_id)))
    }

    fn groups_of_user(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        let prefix = keys::user_group_prefix(user_id);
        self.read(move |t| {
            t.get(Table::UserGroups)
                .prefix(&prefix)
                .map(|guard| {
                    let k = guard.key().map_err(read_err)?;
                    let id: [u8; 8] = k
                        .get(prefix.len()..)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| StorageError::corrupt("user_groups", "key length"))?;
                    Ok(u64::from_be_bytes(id))
                })
                .collect()
        })
    }

    fn max_group_id(&self) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.read(|t| match t.get(Table::Groups).last_key_value() {
            None => Ok(0),
            Some(guard) => {
                let k = guard.key().map_err(read_err)?;
                let id: [u8; 8] = k[..]
                    .try_into()
                    .map_err(|_| StorageError::corrupt("groups", "key length"))?;
                Ok(u64::from_be_bytes(id))
            }
        })
    }

    fn last_seq(&self, group_id: u64) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.read(move |t| {
            match t
                .get(Table::Messages)
                .prefix(keys::group_key(group_id))
                .next_back()
            {
                None => Ok(0),
                Some(guard) => {
                    let k = guard.key().map_err(read_err)?;
                    let seq: [u8; 8] = k
                        .get(16..24)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| StorageError::corrupt("messages", "key length"))?;
                    Ok(u64::from_be_bytes(seq))
                }
            }
        })
    }

    fn messages_before(
        &self,
        group_id: u64,
        before_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        self.read(move |t| {
            if before_seq <= 1 || limit == 0 {
                return Ok(Vec::new());
            }
            let from = keys::message_key(group_id, 0);
            let to = keys::message_key(group_id, before_seq);
            let mut out =
                decode_messages(t.get(Table::Messages).range(from..to).rev().take(limit))?;
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
        self.read(move |t| {
            let Some(first) = after_seq.checked_add(1) else {
                return Ok(Vec::new());
            };
            let from = keys::message_key(group_id, first);
            let to = keys::message_key(group_id, u64::MAX);
            decode_messages(t.get(Table::Messages).range(from..=to).take(limit))
        })
    }

    fn find_sent<'a>(
        &'a self,
        group_id: u64,
        sender_id: &'a str,
        client_msg_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SentRecord>, StorageError>> {
        let key = keys::sent_key(group_id, sender_id, client_msg_id);
        self.read(move |t| decode_one(t, Table::Sent, key))
    }

    fn load_read_marks(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
        self.read(move |t| {
            t.get(Table::ReadMarks)
                .prefix(keys::group_key(group_id))
                .map(|guard| {
                    let (k, v) = guard.into_inner().map_err(read_err)?;
                    let seq: [u8; 8] = v[..]
                        .try_into()
                        .map_err(|_| StorageError::corrupt("read_marks", "value length"))?;
                    Ok((member_user(&k, "read_marks")?, u64::from_be_bytes(seq)))
                })
                .collect()
        })
    }

    fn load_objects(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ObjectRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::Objects, &keys::group_key(group_id)))
    }

    fn load_entries(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<EntryRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::Entries, &keys::group_key(group_id)))
    }

    fn due_objects(&self) -> BoxFuture<'_, Result<Vec<Due>, StorageError>> {
        self.read(|t| {
            t.get(Table::Due)
                .iter()
                .map(|guard| {
                    let (k, v) = guard.into_inner().map_err(read_err)?;
                    Ok(Due {
                        group_id: be_u64(&k, 0..8, "due")?,
                        object_id: be_u64(&k, 8..16, "due")?,
                        due_ms: be_u64(&v, 0..8, "due")?,
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
        let key = keys::product_key(shop_id, product_id);
        self.read(move |t| decode_one(t, Table::Products, key))
    }

    fn groups_with_card<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, StorageError>> {
        let prefix = keys::card_prefix(shop_id, product_id);
        self.read(move |t| {
            t.get(Table::Cards)
                .prefix(&prefix)
                .map(|guard| {
                    let k = guard.key().map_err(read_err)?;
                    be_u64(&k, prefix.len()..prefix.len() + 8, "cards")
                })
                .collect()
        })
    }

    fn load_reach_use(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<ReachUse>, StorageError>> {
        self.read(move |t| {
            t.get(Table::Reach)
                .get(keys::group_key(group_id))
                .map_err(read_err)?
                .map(|v| {
                    Ok(ReachUse {
                        day: be_u64(&v, 0..8, "reach")?,
                        used: u32::try_from(be_u64(&v, 8..16, "reach")?)
                            .map_err(|_| StorageError::corrupt("reach", "count"))?,
                    })
                })
                .transpose()
        })
    }

    fn load_feedback<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FeedbackDay>, StorageError>> {
        let prefix = keys::feedback_prefix(shop_id);
        self.read(move |t| {
            t.get(Table::Feedback)
                .prefix(&prefix)
                .map(|guard| {
                    let (k, v) = guard.into_inner().map_err(read_err)?;
                    Ok(FeedbackDay {
                        day: be_u64(&k, prefix.len()..prefix.len() + 8, "feedback")?,
                        positive: be_u64(&v, 0..8, "feedback")?,
                        negative: be_u64(&v, 8..16, "feedback")?,
                    })
                })
                .collect()
        })
    }

    fn load_promotion_mutes(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        self.read(move |t| {
            t.get(Table::PromotionMutes)
                .prefix(keys::group_key(group_id))
                .map(|guard| {
                    let k = guard.key().map_err(read_err)?;
                    member_user(&k, "promotion_mutes")
                })
                .collect()
        })
    }

    fn load_reports(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ReportRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::Reports, &keys::group_key(group_id)))
    }

    fn load_faq(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<FaqRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::Faq, &keys::group_key(group_id)))
    }

    fn load_buyer_tags<'a>(
        &'a self,
        shop_id: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BuyerTagsRecord>, StorageError>> {
        let key = keys::product_key(shop_id, user_id);
        self.read(move |t| decode_one(t, Table::BuyerTags, key))
    }

    fn load_cs_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsShopRecord>, StorageError>> {
        let key = shop_id.as_bytes().to_vec();
        self.read(move |t| decode_one(t, Table::CsShops, key))
    }

    fn load_cs_buyer<'a>(
        &'a self,
        shop_id: &'a str,
        buyer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsBuyerRecord>, StorageError>> {
        let key = keys::product_key(shop_id, buyer_id);
        self.read(move |t| decode_one(t, Table::CsBuyers, key))
    }

    fn load_schedules(&self) -> BoxFuture<'_, Result<Vec<ScheduleRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::Schedules, &[]))
    }

    fn load_join_requests(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<JoinRequestRecord>, StorageError>> {
        self.read(move |t| decode_prefix(t, Table::JoinRequests, &keys::group_key(group_id)))
    }

    fn load_auto_replies<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AutoReplyRecord>, StorageError>> {
        let prefix = keys::feedback_prefix(shop_id);
        self.read(move |t| decode_prefix(t, Table::AutoReplies, &prefix))
    }

    fn load_member_flags(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, MemberFlagsRecord)>, StorageError>> {
        self.read(move |t| {
            t.get(Table::MemberFlags)
                .prefix(keys::group_key(group_id))
                .map(|guard| {
                    let (k, v) = guard.into_inner().map_err(read_err)?;
                    Ok((
                        member_user(&k, "member_flags")?,
                        decode("member_flags", &v)?,
                    ))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;

    struct FjallHarness {
        dir: tempfile::TempDir,
    }

    impl contract::Harness for FjallHarness {
        async fn open(&mut self) -> Arc<dyn Store> {
            Arc::new(FjallStore::open(FjallConfig::new(self.dir.path())).expect("open"))
        }
    }

    fn harness() -> FjallHarness {
        FjallHarness {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fjall_passes_the_storage_contract() {
        contract::run_all(harness).await;
    }

    #[tokio::test]
    async fn closed_store_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(FjallConfig::new(dir.path())).unwrap();
        store.close().await.unwrap();
        let r = store.submit(vec![], Box::new(|_| {}));
        assert!(matches!(r, Err(StorageError::Closed)), "{r:?}");
    }

    #[test]
    fn each_table_has_its_own_keyspace_under_its_old_name() {
        let names: std::collections::HashSet<_> = Table::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names.len(), Table::ALL.len(), "names are unique");
        for (i, t) in Table::ALL.iter().enumerate() {
            assert_eq!(*t as usize, i, "{t:?} indexes its own keyspace");
        }
        // Data folders written before the list existed must still open.
        assert_eq!(Table::ReadMarks.name(), "read_marks");
        assert_eq!(Table::CsBuyers.name(), "cs_buyers");
    }

    #[tokio::test]
    async fn a_second_open_of_a_live_store_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _store = FjallStore::open(FjallConfig::new(dir.path())).unwrap();
        let second = FjallStore::open(FjallConfig::new(dir.path()));
        assert!(
            matches!(second, Err(StorageError::Backend { .. })),
            "{second:?}"
        );
    }

    #[tokio::test]
    async fn corrupt_record_is_reported_not_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(FjallConfig::new(dir.path())).unwrap();
        lock(&store.inner.tables)
            .as_ref()
            .unwrap()
            .get(Table::Groups)
            .insert(keys::group_key(9), b"\xff\xff\xff".to_vec())
            .unwrap();
        let r = store.load_group(9).await;
        assert!(
            matches!(
                r,
                Err(StorageError::Corrupt {
                    keyspace: "groups",
                    ..
                })
            ),
            "{r:?}"
        );
    }
}
