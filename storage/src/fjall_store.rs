//! The embedded store on fjall, Qun's default.

mod migrate;
mod partitions;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};

use crate::records::{
    AutoReplyRecord, BuyerTagsRecord, CsBuyerRecord, CsShopRecord, EntryRecord, FaqRecord,
    GroupRecord, JoinRequestRecord, MemberFlagsRecord, MemberRecord, MessageRecord, ObjectRecord,
    ProductRecord, ReportRecord, ScheduleRecord, SentRecord,
};
use crate::stats::CommitStats;
use crate::{
    BoxFuture, Due, DurableCallback, FeedbackDay, ReachUse, StorageError, Store, WriteOp, keys,
};
use partitions::{Homes, Placement};

/// The most partitions a data folder may have: far more than the cores of
/// any machine Qun runs on, each one a journal and a writer thread.
pub const MAX_PARTITIONS: usize = 64;

/// How the embedded store is opened.
#[derive(Debug, Clone)]
pub struct FjallConfig {
    /// Folder of the database; created when missing.
    pub path: PathBuf,
    /// fsync the journal at every group commit (default). Without it a
    /// commit survives a crash of the process but not of the machine.
    pub fsync: bool,
    /// Most submissions waiting for one partition's writer; beyond it
    /// `submit` answers [`StorageError::Overloaded`].
    pub queue_capacity: usize,
    /// Most submissions folded into one batch (one fsync).
    pub max_batch: usize,
    /// How long a busy writer lets a batch gather before committing it,
    /// counted from the batch's first submission (default 2 ms; zero: never
    /// wait). A writer that finds from [`WINDOW_FROM`] to fewer than
    /// [`WINDOW_UNTIL`] submissions waiting sleeps until the window ends or
    /// [`WINDOW_UNTIL`] are queued, so that a steady stream of small
    /// batches shares fewer fsyncs (each costs a core 40–50 µs of kernel
    /// time on the development machine, besides the disk's). An idle writer
    /// (fewer waiting) commits at once, and so does one with a queue deep
    /// enough to fill a batch already, or with a flush among those it took.
    pub commit_window: Duration,
    /// The nice value each writer thread asks for (Linux, -20 to 19; 0,
    /// the default: as started). A writer woken by its fsync's end waits
    /// for a core like any thread, and every send of its partition waits
    /// with it: on a saturated machine below 0 shortens that wait. Below 0
    /// needs `CAP_SYS_NICE` or a `RLIMIT_NICE` that allows it; refused, the
    /// writers run as started, and the first says so in a warning.
    pub writer_nice: i32,
    /// Partitions of a *new* data folder (1 to [`MAX_PARTITIONS`]): each is a database with
    /// its own journal and writer thread, and a shop with all its groups
    /// lives in one of them. Default: the number of cores. A folder keeps
    /// the count it was created with; this setting does not change it.
    pub partitions: usize,
}

impl FjallConfig {
    /// Defaults for a store at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            fsync: true,
            queue_capacity: 65_536,
            max_batch: 4_096,
            commit_window: Duration::from_millis(2),
            writer_nice: 0,
            partitions: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// The embedded store.
///
/// A data folder holds one or more partitions, each a fjall database with
/// its own journal and writer thread; all of one shop (its groups and
/// their history included) lives in one partition, so every batch stays
/// atomic while the cores share the writing. The partitions module explains
/// the layout.
///
/// Cheap to clone; all clones share the same databases and writer threads.
///
/// # Example
/// ```
/// use qun_storage::{FjallConfig, FjallStore, Store, StoreExt, WriteOp};
/// use qun_storage::records::GroupRecord;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let mut config = FjallConfig::new(dir.path());
/// config.partitions = 2; // fixed from now on for this folder
/// let store = FjallStore::open(config)?;
/// assert_eq!(store.partitions(), 2);
/// let group = GroupRecord { group_id: 1, shop_id: "shop-1".into(), ..Default::default() };
/// store.write(vec![WriteOp::PutGroup(group)]).await?;
/// assert!(store.load_group(1).await?.is_some());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    partitions: Vec<Partition>,
    homes: Homes,
    stats: Arc<CommitStats>,
    /// Set by the first failed write of any partition: from then on the
    /// store refuses every write, since what is on disk is uncertain.
    poisoned: Arc<AtomicBool>,
}

/// One database of the folder and its writer thread.
#[derive(Debug)]
struct Partition {
    /// `None` once closed, so that closing releases the database (and its
    /// lock on the folder) even while handles to the store remain.
    tables: Mutex<Option<Tables>>,
    jobs: Mutex<Option<Sender<Job>>>,
    /// Jobs queued and not yet taken by the writer: the queue's bound,
    /// counted by hand so that a submission split over partitions can
    /// reserve room in all of them before queueing any part.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    /// The queue length at which a writer sleeping out its commit window
    /// has enough: the submission that reaches it wakes the writer.
    batch_full: usize,
    /// The writer's thread, to wake it ([`Partition::batch_full`]).
    writer_thread: std::thread::Thread,
    writer: Mutex<Option<JoinHandle<()>>>,
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
    /// Puts to commit, the callback, and when they were submitted.
    Write(Vec<Put>, DurableCallback, Instant),
    Flush(DurableCallback),
}

/// fjall's defaults for one database, shared out among the partitions so
/// that a folder of many costs what one did.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
const CACHED_FILES: usize = 900;

impl FjallStore {
    /// Opens (or creates) the store and starts one writer thread per
    /// partition.
    ///
    /// # Errors
    /// [`StorageError::Backend`] when the folder cannot be created, is locked
    /// by another running server, or holds a database fjall cannot recover;
    /// [`StorageError::Corrupt`] when its `partitions` file is damaged.
    pub fn open(config: FjallConfig) -> Result<Self, StorageError> {
        let folders = partitions::folders(&config.path, config.partitions)?;
        let homes = Homes::new(folders.len());
        let poisoned = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CommitStats::default());
        let mode = if config.fsync {
            PersistMode::SyncAll
        } else {
            PersistMode::Buffer
        };
        let mut opened = Vec::with_capacity(folders.len());
        for (index, folder) in folders.iter().enumerate() {
            let tables = open_tables(folder, folders.len())?;
            if folders.len() > 1 {
                for guard in tables.get(Table::Groups).iter() {
                    let key = guard.key().map_err(read_err)?;
                    homes.learn(be_u64(&key, 0..8, "groups")?, index);
                }
            }
            opened.push(tables);
        }
        let batching = Batching {
            max_batch: config.max_batch.max(1),
            window: config.commit_window,
        };
        let mut partitions = Vec::with_capacity(opened.len());
        for (index, tables) in opened.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let writer = {
                let tables = tables.clone();
                let queued = queued.clone();
                let poisoned = poisoned.clone();
                let stats = stats.clone();
                let nice = config.writer_nice;
                std::thread::Builder::new()
                    .name(format!("qun-store-writer-{index}"))
                    .spawn(move || {
                        set_writer_nice(index, nice);
                        write_loop(&tables, &rx, &queued, batching, mode, &poisoned, &stats);
                    })
                    .map_err(|e| StorageError::backend("start writer thread", e))?
            };
            partitions.push(Partition {
                tables: Mutex::new(Some(tables)),
                jobs: Mutex::new(Some(tx)),
                queued,
                capacity: config.queue_capacity.max(1),
                batch_full: batching.full(),
                writer_thread: writer.thread().clone(),
                writer: Mutex::new(Some(writer)),
            });
        }
        tracing::info!(
            path = %config.path.display(),
            fsync = config.fsync,
            partitions = partitions.len(),
            "embedded store open"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                partitions,
                homes,
                stats,
                poisoned,
            }),
        })
    }

    /// How many partitions the data folder has.
    pub fn partitions(&self) -> usize {
        self.inner.partitions.len()
    }

    /// What the writer threads have made durable so far, over every
    /// partition: group commits, submissions, keys, and each submission's
    /// time to durability. The server shows them at `/metrics`.
    pub fn commit_stats(&self) -> Arc<CommitStats> {
        self.inner.stats.clone()
    }

    /// Queues `parts` (partition, job) all or none: room is reserved in
    /// every partition named before any part is queued.
    fn enqueue(&self, parts: Vec<(usize, Job)>) -> Result<(), StorageError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        let partitions = &self.inner.partitions;
        // Partition indexes ascend in `parts`, so the locks are always
        // taken in the same order.
        let senders: Vec<_> = parts
            .iter()
            .map(|(p, _)| lock(&partitions[*p].jobs))
            .collect();
        if senders.iter().any(|s| s.is_none()) {
            return Err(StorageError::Closed);
        }
        // Bit n: part n's submission fills its partition's waiting batch (at
        // most MAX_PARTITIONS parts, one per partition: no allocation per
        // send).
        const _: () = assert!(MAX_PARTITIONS <= u64::BITS as usize);
        let mut fills = 0u64;
        for (n, (p, _)) in parts.iter().enumerate() {
            let partition = &partitions[*p];
            let reserved =
                partition
                    .queued
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                        (q < partition.capacity).then_some(q + 1)
                    });
            match reserved {
                Ok(before) => fills |= u64::from(before + 1 == partition.batch_full) << n,
                Err(_) => {
                    for (p, _) in &parts[..n] {
                        partitions[*p].queued.fetch_sub(1, Ordering::AcqRel);
                    }
                    return Err(StorageError::Overloaded);
                }
            }
        }
        for (n, (sender, (p, job))) in senders.iter().zip(parts).enumerate() {
            if let Some(tx) = sender.as_ref() {
                // The receiver lives until its sender is dropped under this
                // lock, so sending cannot fail here.
                let _ = tx.send(job);
                if fills & (1 << n) != 0 {
                    // A writer sleeping out its commit window has enough.
                    partitions[p].writer_thread.unpark();
                }
            }
        }
        Ok(())
    }

    fn tables(&self, partition: usize) -> Option<Tables> {
        lock(&self.inner.partitions[partition].tables).clone()
    }

    /// Runs `f` on the tables of `partition`, off the async threads.
    fn read_in<T: Send + 'static>(
        &self,
        partition: usize,
        f: impl FnOnce(&Tables) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        let tables = self.tables(partition);
        Box::pin(async move {
            let tables = tables.ok_or(StorageError::Closed)?;
            tokio::task::spawn_blocking(move || f(&tables))
                .await
                .map_err(|e| StorageError::backend("read task", e))?
        })
    }

    /// Reads in the partition that holds `group_id`'s rows.
    fn read_group<T: Send + 'static>(
        &self,
        group_id: u64,
        f: impl FnOnce(&Tables) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        self.read_in(self.inner.homes.of_group(group_id), f)
    }

    /// Reads in the partition that holds `shop_id`'s rows.
    fn read_shop<T: Send + 'static>(
        &self,
        shop_id: &str,
        f: impl FnOnce(&Tables) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        self.read_in(self.inner.homes.of_shop(shop_id), f)
    }

    /// Runs `f` on every partition, one after the other, and gathers what
    /// they return.
    fn read_every<T: Send + 'static>(
        &self,
        f: impl Fn(&Tables) -> Result<Vec<T>, StorageError> + Send + 'static,
    ) -> BoxFuture<'_, Result<Vec<T>, StorageError>> {
        let all: Option<Vec<Tables>> = (0..self.partitions()).map(|p| self.tables(p)).collect();
        Box::pin(async move {
            let all = all.ok_or(StorageError::Closed)?;
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                for tables in &all {
                    out.extend(f(tables)?);
                }
                Ok(out)
            })
            .await
            .map_err(|e| StorageError::backend("read task", e))?
        })
    }

    /// [`Self::read_every`], then sorted by `key` as one partition's
    /// listing would be.
    fn read_every_sorted<T: Send + 'static, K: Ord>(
        &self,
        f: impl Fn(&Tables) -> Result<Vec<T>, StorageError> + Send + 'static,
        key: impl Fn(&T) -> K + Send + 'static,
    ) -> BoxFuture<'_, Result<Vec<T>, StorageError>> {
        let all = self.read_every(f);
        Box::pin(async move {
            let mut all = all.await?;
            all.sort_by_key(key);
            Ok(all)
        })
    }

    /// The group ids that end the keys under `prefix` of an index table
    /// (`… | group_id`: a user's groups, a product's cards), from every
    /// partition, ascending.
    fn group_ids_under(
        &self,
        table: Table,
        prefix: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.read_every_sorted(
            move |t| {
                t.get(table)
                    .prefix(&prefix)
                    .map(|guard| {
                        u64_ending(&guard.key().map_err(read_err)?, prefix.len(), table.name())
                    })
                    .collect()
            },
            |id| *id,
        )
    }

    /// Waits until every submission made before the call is durable, in
    /// every partition.
    fn flush_all(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let callback = joint(
            self.partitions(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let queued = self.enqueue(
            (0..self.partitions())
                .map(|p| (p, Job::Flush(callback())))
                .collect(),
        );
        Box::pin(async move {
            queued?;
            rx.await.unwrap_or(Err(StorageError::Closed))
        })
    }
}

/// Opens the database of one partition and its keyspaces.
fn open_tables(folder: &std::path::Path, of: usize) -> Result<Tables, StorageError> {
    let of = of.max(1);
    let db = Database::builder(folder)
        .cache_size((CACHE_BYTES / of as u64).max(1024 * 1024))
        .max_cached_files(Some((CACHED_FILES / of).max(16)))
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
        db,
    };
    migrate::messages_to_seq_keys(&tables.db, tables.get(Table::Messages), folder)?;
    migrate::index_replies(
        &tables.db,
        tables.get(Table::Messages),
        tables.get(Table::Replies),
        folder,
    )?;
    Ok(tables)
}

/// Calls `done` once every one of `parts` callbacks has: with the first
/// failure, or `Ok` when all are durable.
fn joint(parts: usize, done: DurableCallback) -> impl Fn() -> DurableCallback {
    struct Joint {
        remaining: AtomicUsize,
        failure: Mutex<Option<StorageError>>,
        done: Mutex<Option<DurableCallback>>,
    }
    let joint = Arc::new(Joint {
        remaining: AtomicUsize::new(parts),
        failure: Mutex::new(None),
        done: Mutex::new(Some(done)),
    });
    move || {
        let joint = joint.clone();
        Box::new(move |r| {
            if let Err(e) = r {
                lock(&joint.failure).get_or_insert(e);
            }
            if joint.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                let result = lock(&joint.failure).take().map_or(Ok(()), Err);
                if let Some(done) = lock(&joint.done).take() {
                    done(result);
                }
            }
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Asks for `nice` for the calling writer thread ([`FjallConfig::writer_nice`]);
/// a refusal is logged, and the writer runs as started.
fn set_writer_nice(partition: usize, nice: i32) {
    if nice == 0 {
        return;
    }
    // On Linux the nice value is the thread's: `None` is the caller.
    match rustix::process::setpriority_process(None, nice) {
        Ok(()) => tracing::debug!(partition, nice, "store writer's priority set"),
        // Every writer is refused alike: the first one says so.
        Err(e) if partition == 0 => tracing::warn!(
            nice,
            error = %e,
            "the store writers keep the priority they started with: a nice below 0 needs \
             CAP_SYS_NICE or a RLIMIT_NICE that allows it (systemd: LimitNICE=); \
             store_writer_nice = 0 stops asking"
        ),
        Err(e) => tracing::debug!(partition, nice, error = %e, "store writer's priority refused"),
    }
}

/// A busy writer waits for more submissions once it finds at least this
/// many waiting (see [`FjallConfig::commit_window`]).
pub const WINDOW_FROM: usize = 4;

/// A writer stops waiting once this many submissions are queued, and
/// does not wait at all if it finds this many.
pub const WINDOW_UNTIL: usize = 32;

/// How a partition's writer gathers its group commits.
#[derive(Debug, Clone, Copy)]
struct Batching {
    max_batch: usize,
    window: Duration,
}

impl Batching {
    /// The queue length at which a waiting batch has enough: the
    /// submission that reaches it wakes the writer, which then stops
    /// waiting (never more than a batch holds).
    fn full(&self) -> usize {
        WINDOW_UNTIL.min(self.max_batch)
    }

    /// Until when a batch that found `ready` submissions waiting, the first
    /// of them submitted at `first`, waits for more; `None`: commit now
    /// (an idle writer, a queue already deep, a flush waiting, or no window).
    fn window_end(&self, first: Option<Instant>, ready: usize) -> Option<Instant> {
        let busy = (WINDOW_FROM..self.full()).contains(&ready);
        if busy && !self.window.is_zero() {
            first.map(|at| at + self.window)
        } else {
            None
        }
    }
}

/// Takes into `jobs` whatever is already queued, up to `max_batch` in all.
fn drain(rx: &Receiver<Job>, jobs: &mut Vec<Job>, max_batch: usize) {
    while jobs.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
}

/// Gathers one group commit into `jobs`, from `first` and whatever is
/// queued behind it, waiting a little for more while busy
/// ([`FjallConfig::commit_window`]). `queued` counts the jobs sent and not
/// yet counted off by the writer, those taken here included; the calling
/// thread is unparked when it reaches [`Batching::full`].
fn gather(
    rx: &Receiver<Job>,
    first: Job,
    jobs: &mut Vec<Job>,
    queued: &AtomicUsize,
    batching: Batching,
) {
    let max_batch = batching.max_batch;
    jobs.push(first);
    drain(rx, jobs, max_batch);
    // The queue is in order, so the first job is the oldest. A flush is
    // waited on (a recall): a batch with one gets no window.
    let flush = jobs.iter().any(|job| matches!(job, Job::Flush(_)));
    let oldest = match jobs.first() {
        Some(Job::Write(_, _, at)) if !flush => Some(*at),
        _ => None,
    };
    let Some(end) = batching.window_end(oldest, jobs.len()) else {
        return;
    };
    // Parked rather than waiting on the channel: a writer blocked in `recv`
    // is woken by every submission, and those wake-ups cost more than the
    // fsyncs saved. Only the submission that fills the batch wakes it
    // (`FjallStore::enqueue`); a stray wake-up parks again.
    while queued.load(Ordering::Acquire) < batching.full() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::park_timeout(end - now);
    }
    drain(rx, jobs, max_batch);
}

/// The writer thread of one partition: group commit. Blocks for the first
/// job, then folds in whatever else is already queued (up to `max_batch`),
/// waiting a little for more while busy ([`FjallConfig::commit_window`]),
/// writes it as one atomic batch, persists the journal once and reports
/// every job in order.
fn write_loop(
    tables: &Tables,
    rx: &Receiver<Job>,
    queued: &AtomicUsize,
    batching: Batching,
    mode: PersistMode,
    poisoned: &AtomicBool,
    stats: &CommitStats,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batching.max_batch);
    while let Ok(first) = rx.recv() {
        gather(rx, first, &mut jobs, queued, batching);
        queued.fetch_sub(jobs.len(), Ordering::AcqRel);
        let result = if poisoned.load(Ordering::Acquire) {
            Err(StorageError::Poisoned)
        } else {
            commit(tables, &mut jobs, mode, stats).map(|writes| {
                let submitted = jobs.iter().filter_map(|job| match job {
                    Job::Write(_, _, at) => Some(*at),
                    Job::Flush(_) => None,
                });
                stats.committed(submitted, writes);
            })
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
                Job::Write(_, done, _) | Job::Flush(done) => done(r),
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
    /// `group_id | seq → MessageRecord`. Folders from before 2026-12-03
    /// kept them in `messages` under `group_id | bucket | seq`, and are
    /// moved here when opened (`migrate.rs`).
    Messages => "messages_v2",
    Sent => "sent",
    /// `group_id | quoted seq | reply seq → []`: the reply index. Folders
    /// from before 2026-12-03 have it built from their messages when
    /// opened (`migrate.rs`).
    Replies => "replies",
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
                if msg.reply_to != 0 {
                    out.insert(
                        Table::Replies,
                        keys::reply_key(msg.group_id, msg.reply_to, msg.seq),
                        [],
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
                    keys::shop_key(&p.shop_id, &p.product_id),
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
                let key = keys::shop_key(&t.shop_id, &t.user_id);
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
                    keys::shop_key(&r.shop_id, &r.rule_id),
                    r,
                );
            }
            WriteOp::RemoveAutoReply { shop_id, rule_id } => {
                out.remove(Table::AutoReplies, keys::shop_key(shop_id, rule_id));
            }
            WriteOp::PutFaq(f) => {
                out.record(Table::Faq, keys::object_key(f.group_id, f.faq_id), f);
            }
            WriteOp::PutCsShop(r) => {
                out.record(Table::CsShops, r.shop_id.as_bytes(), r);
            }
            WriteOp::PutCsBuyer(r) => {
                out.record(Table::CsBuyers, keys::shop_key(&r.shop_id, &r.buyer_id), r);
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

/// Writes the puts of `jobs` as one batch and persists the journal;
/// returns how many keys were written or removed. The time of each of the
/// two goes to `stats` (and to a trace event).
fn commit(
    tables: &Tables,
    jobs: &mut [Job],
    mode: PersistMode,
    stats: &CommitStats,
) -> Result<usize, StorageError> {
    let started = Instant::now();
    let mut batch = tables.db.batch();
    let mut writes = 0usize;
    for job in jobs.iter_mut() {
        let Job::Write(puts, _, _) = job else {
            continue;
        };
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
    let written = Instant::now();
    tables
        .db
        .persist(mode)
        .map_err(|e| StorageError::backend("persist journal", e))?;
    let (write, persist) = (written - started, written.elapsed());
    stats.phases(write, persist);
    tracing::trace!(
        jobs = jobs.len(),
        write_us = write.as_micros() as u64,
        persist_us = persist.as_micros() as u64,
        "group commit"
    );
    Ok(writes)
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

/// Decodes every value under `prefix` of a keyspace.
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

/// The big-endian `u64` of a key of `table` from byte `at` to its end (a
/// seq or a group id that ends the key); a key of another length is corrupt.
fn u64_ending(key: &[u8], at: usize, table: &'static str) -> Result<u64, StorageError> {
    key.get(at..)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::corrupt(table, "key length"))
}

impl Store for FjallStore {
    fn submit(&self, ops: Vec<WriteOp>, done: DurableCallback) -> Result<(), StorageError> {
        let homes = match self.inner.homes.settle(&ops) {
            Placement::One(home) => {
                let job = Job::Write(prepare(ops), done, Instant::now());
                return self.enqueue(vec![(home, job)]);
            }
            Placement::Each(homes) => homes,
        };
        // A submission that names several shops: one part per partition.
        let mut parts: Vec<Vec<WriteOp>> = (0..self.partitions()).map(|_| Vec::new()).collect();
        for (op, home) in ops.into_iter().zip(homes) {
            parts[home].push(op);
        }
        let parts: Vec<(usize, Vec<WriteOp>)> = parts
            .into_iter()
            .enumerate()
            .filter(|(_, ops)| !ops.is_empty())
            .collect();
        let callback = joint(parts.len(), done);
        let submitted = Instant::now();
        self.enqueue(
            parts
                .into_iter()
                .map(|(p, ops)| (p, Job::Write(prepare(ops), callback(), submitted)))
                .collect(),
        )
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.flush_all()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let flushed = match self.flush_all().await {
                Err(StorageError::Closed) => Ok(()),
                r => r,
            };
            // Dropping a sender ends its writer loop once the queue is empty.
            for partition in &self.inner.partitions {
                lock(&partition.jobs).take();
            }
            for partition in &self.inner.partitions {
                let writer = lock(&partition.writer).take();
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
                lock(&partition.tables).take();
            }
            flushed
        })
    }

    fn load_group(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<GroupRecord>, StorageError>> {
        self.read_group(group_id, move |t| {
            decode_one(t, Table::Groups, keys::group_key(group_id))
        })
    }

    fn load_members(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<MemberRecord>, StorageError>> {
        self.read_group(group_id, move |t| {
            decode_prefix(t, Table::Members, &keys::group_key(group_id))
        })
    }

    fn groups_of_user(&self, user_id: &str) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.group_ids_under(Table::UserGroups, keys::user_group_prefix(user_id))
    }

    fn max_group_id(&self) -> BoxFuture<'_, Result<u64, StorageError>> {
        let each = self.read_every(|t| match t.get(Table::Groups).last_key_value() {
            None => Ok(vec![]),
            Some(guard) => {
                let k = guard.key().map_err(read_err)?;
                Ok(vec![be_u64(&k, 0..8, "groups")?])
            }
        });
        Box::pin(async move { Ok(each.await?.into_iter().max().unwrap_or(0)) })
    }

    fn last_seq(&self, group_id: u64) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.read_group(group_id, move |t| {
            match t
                .get(Table::Messages)
                .prefix(keys::group_key(group_id))
                .next_back()
            {
                None => Ok(0),
                Some(guard) => u64_ending(&guard.key().map_err(read_err)?, 8, "messages"),
            }
        })
    }

    fn messages_before(
        &self,
        group_id: u64,
        before_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        self.read_group(group_id, move |t| {
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
        self.read_group(group_id, move |t| {
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
        self.read_group(group_id, move |t| decode_one(t, Table::Sent, key))
    }

    fn replies_to(&self, group_id: u64, seq: u64) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.read_group(group_id, move |t| {
            t.get(Table::Replies)
                .prefix(keys::message_key(group_id, seq))
                .map(|guard| u64_ending(&guard.key().map_err(read_err)?, 16, "replies"))
                .collect()
        })
    }

    fn load_read_marks(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
        self.read_group(group_id, move |t| {
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
        self.read_group(group_id, move |t| {
            decode_prefix(t, Table::Objects, &keys::group_key(group_id))
        })
    }

    fn load_entries(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<EntryRecord>, StorageError>> {
        self.read_group(group_id, move |t| {
            decode_prefix(t, Table::Entries, &keys::group_key(group_id))
        })
    }

    fn due_objects(&self) -> BoxFuture<'_, Result<Vec<Due>, StorageError>> {
        self.read_every_sorted(
            |t| {
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
            },
            |d| (d.group_id, d.object_id),
        )
    }

    fn load_product<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProductRecord>, StorageError>> {
        let key = keys::shop_key(shop_id, product_id);
        self.read_shop(shop_id, move |t| decode_one(t, Table::Products, key))
    }

    fn groups_with_card<'a>(
        &'a self,
        shop_id: &'a str,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, StorageError>> {
        self.group_ids_under(Table::Cards, keys::card_prefix(shop_id, product_id))
    }

    fn load_reach_use(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<ReachUse>, StorageError>> {
        self.read_group(group_id, move |t| {
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
        self.read_shop(shop_id, move |t| {
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
        self.read_group(group_id, move |t| {
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
        self.read_group(group_id, move |t| {
            decode_prefix(t, Table::Reports, &keys::group_key(group_id))
        })
    }

    fn load_faq(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<FaqRecord>, StorageError>> {
        self.read_group(group_id, move |t| {
            decode_prefix(t, Table::Faq, &keys::group_key(group_id))
        })
    }

    fn load_buyer_tags<'a>(
        &'a self,
        shop_id: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BuyerTagsRecord>, StorageError>> {
        let key = keys::shop_key(shop_id, user_id);
        self.read_shop(shop_id, move |t| decode_one(t, Table::BuyerTags, key))
    }

    /// One read task for all of them, in key order, instead of a task per
    /// buyer (about 5 µs each).
    fn load_buyer_tags_of<'a>(
        &'a self,
        shop_id: &'a str,
        user_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<BuyerTagsRecord>, StorageError>> {
        let mut keys: Vec<Vec<u8>> = user_ids
            .iter()
            .map(|user| keys::shop_key(shop_id, user))
            .collect();
        keys.sort_unstable();
        self.read_shop(shop_id, move |t| {
            let mut found = Vec::new();
            for key in keys {
                found.extend(decode_one(t, Table::BuyerTags, key)?);
            }
            Ok(found)
        })
    }

    fn load_cs_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsShopRecord>, StorageError>> {
        let key = shop_id.as_bytes().to_vec();
        self.read_shop(shop_id, move |t| decode_one(t, Table::CsShops, key))
    }

    fn load_cs_buyer<'a>(
        &'a self,
        shop_id: &'a str,
        buyer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsBuyerRecord>, StorageError>> {
        let key = keys::shop_key(shop_id, buyer_id);
        self.read_shop(shop_id, move |t| decode_one(t, Table::CsBuyers, key))
    }

    fn load_schedules(&self) -> BoxFuture<'_, Result<Vec<ScheduleRecord>, StorageError>> {
        self.read_every_sorted(
            move |t| decode_prefix(t, Table::Schedules, &[]),
            |s: &ScheduleRecord| (s.group_id, s.schedule_id),
        )
    }

    fn load_join_requests(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<JoinRequestRecord>, StorageError>> {
        self.read_group(group_id, move |t| {
            decode_prefix(t, Table::JoinRequests, &keys::group_key(group_id))
        })
    }

    fn load_auto_replies<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AutoReplyRecord>, StorageError>> {
        let prefix = keys::feedback_prefix(shop_id);
        self.read_shop(shop_id, move |t| {
            decode_prefix(t, Table::AutoReplies, &prefix)
        })
    }

    fn load_member_flags(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, MemberFlagsRecord)>, StorageError>> {
        self.read_group(group_id, move |t| {
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
    use crate::{StoreExt, contract};

    struct FjallHarness {
        dir: tempfile::TempDir,
        partitions: usize,
    }

    impl contract::Harness for FjallHarness {
        async fn open(&mut self) -> Arc<dyn Store> {
            Arc::new(open(self.dir.path(), self.partitions))
        }
    }

    fn open(path: &std::path::Path, partitions: usize) -> FjallStore {
        let mut config = FjallConfig::new(path);
        config.partitions = partitions;
        FjallStore::open(config).expect("open")
    }

    /// Fresh harnesses of stores with `partitions` partitions.
    fn fresh(partitions: usize) -> impl FnMut() -> FjallHarness {
        move || FjallHarness {
            dir: tempfile::tempdir().expect("tempdir"),
            partitions,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fjall_passes_the_storage_contract() {
        contract::run_all(fresh(1)).await;
    }

    /// Three partitions on any machine, so that shops really spread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitioned_fjall_passes_the_storage_contract() {
        contract::run_all(fresh(3)).await;
    }

    fn group(group_id: u64, shop_id: &str) -> WriteOp {
        WriteOp::PutGroup(GroupRecord {
            group_id,
            shop_id: shop_id.into(),
            ..Default::default()
        })
    }

    /// A shop that lives in `partition`.
    fn shop_in(store: &FjallStore, partition: usize) -> String {
        (0..)
            .map(|i| format!("shop-{i}"))
            .find(|s| store.inner.homes.of_shop(s) == partition)
            .unwrap()
    }

    /// The nice values of this process's threads named `name`, from
    /// `/proc/self/task/*/stat` (field 19).
    fn nices_of_threads(name: &str) -> Vec<i32> {
        let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
        tasks
            .filter_map(|task| {
                let path = task.ok()?.path();
                let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                if comm.trim_end() != name {
                    return None;
                }
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                // The fields after the command, which is in parentheses.
                let after = &stat[stat.rfind(')')? + 2..];
                after.split(' ').nth(16)?.parse().ok()
            })
            .collect()
    }

    /// Asking for a lower priority never needs a privilege, so the test
    /// passes anywhere; the server asks for a higher one the same way.
    #[tokio::test]
    async fn the_writer_thread_runs_at_the_nice_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FjallConfig::new(dir.path());
        config.partitions = 1;
        config.writer_nice = 7;
        let store = FjallStore::open(config).unwrap();
        // The writer has set it by the time it commits this.
        store.write(vec![group(1, "shop")]).await.unwrap();
        // Thread names are cut to 15 bytes; other tests' writers may run
        // beside this one, at 0.
        let nices = nices_of_threads("qun-store-write");
        assert!(nices.contains(&7), "{nices:?}");
        store.close().await.unwrap();
    }

    fn batching(window_ms: u64) -> Batching {
        Batching {
            max_batch: 4_096,
            window: Duration::from_millis(window_ms),
        }
    }

    #[test]
    fn only_a_busy_writer_waits_for_more_of_a_batch() {
        let at = Instant::now();
        let b = batching(2);
        let end = Some(at + Duration::from_millis(2));
        // Idle: a lone send (or up to three) commits at once.
        for ready in 1..WINDOW_FROM {
            assert_eq!(b.window_end(Some(at), ready), None, "{ready} ready");
        }
        // Busy: a few waiting wait for the window's end.
        for ready in WINDOW_FROM..WINDOW_UNTIL {
            assert_eq!(b.window_end(Some(at), ready), end, "{ready} ready");
        }
        // A queue deep enough fills a batch without waiting.
        assert_eq!(b.window_end(Some(at), WINDOW_UNTIL), None);
        assert_eq!(b.window_end(Some(at), 1_000), None);
        // No window, or a flush in the batch (no submission time): at once.
        assert_eq!(batching(0).window_end(Some(at), WINDOW_FROM), None);
        assert_eq!(b.window_end(None, WINDOW_FROM), None);
        // A batch capped below WINDOW_UNTIL never waits once full.
        let small = Batching {
            max_batch: WINDOW_FROM,
            window: Duration::from_millis(2),
        };
        assert_eq!(small.window_end(Some(at), WINDOW_FROM), None);
    }

    fn job() -> Job {
        Job::Write(Vec::new(), Box::new(|_| {}), Instant::now())
    }

    /// A batch that found a few waiting is not committed until enough
    /// have joined it: with a window far longer than the test, the batch
    /// can only hold all of them if it waited for the late ones.
    #[test]
    fn a_busy_batch_waits_until_enough_have_joined() {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let send = |n: usize| {
            for _ in 0..n {
                tx.send(job()).unwrap();
                queued.fetch_add(1, Ordering::AcqRel);
            }
        };
        send(WINDOW_FROM);
        let first = rx.recv().unwrap();
        std::thread::scope(|s| {
            let waiting = queued.clone();
            let gathering = s.spawn(move || {
                let mut jobs = Vec::new();
                gather(&rx, first, &mut jobs, &waiting, batching(600_000));
                jobs.len()
            });
            // Late, so that a writer that did not wait would have taken
            // the first ones alone (the pause is not what passes the test).
            std::thread::sleep(Duration::from_millis(20));
            send(WINDOW_UNTIL - WINDOW_FROM);
            // As `FjallStore::enqueue` does for the submission that fills it.
            gathering.thread().unpark();
            assert_eq!(gathering.join().unwrap(), WINDOW_UNTIL);
        });
    }

    /// A flush in the batch, or an idle writer, commits what it has.
    #[test]
    fn a_flush_or_an_idle_writer_does_not_wait() {
        let (tx, rx) = mpsc::channel();
        let queued = AtomicUsize::new(0);
        for _ in 0..WINDOW_FROM {
            tx.send(job()).unwrap();
        }
        tx.send(Job::Flush(Box::new(|_| {}))).unwrap();
        queued.store(WINDOW_FROM + 1, Ordering::Release);
        let mut jobs = Vec::new();
        let first = rx.recv().unwrap();
        gather(&rx, first, &mut jobs, &queued, batching(600_000));
        assert_eq!(jobs.len(), WINDOW_FROM + 1);

        tx.send(job()).unwrap();
        queued.store(1, Ordering::Release);
        jobs.clear();
        let first = rx.recv().unwrap();
        gather(&rx, first, &mut jobs, &queued, batching(600_000));
        assert_eq!(jobs.len(), 1);
    }

    /// Many senders at once through a store with a window: every write is
    /// durable and readable, and fewer commits than writes carried them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_gathered_by_the_window_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FjallConfig::new(dir.path());
        config.partitions = 1;
        config.commit_window = Duration::from_millis(5);
        let store = FjallStore::open(config).unwrap();
        store.write(vec![group(1, "shop")]).await.unwrap();
        let writes = (1..=400u64).map(|seq| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(vec![WriteOp::AppendMessage(MessageRecord {
                        group_id: 1,
                        seq,
                        text: format!("m{seq}"),
                        ..Default::default()
                    })])
                    .await
            })
        });
        for w in writes.collect::<Vec<_>>() {
            w.await.unwrap().unwrap();
        }
        let stored = store.messages_after(1, 0, 1_000).await.unwrap();
        assert_eq!(stored.len(), 400);
        assert!(
            stored
                .iter()
                .zip(1..)
                .all(|(m, seq)| m.seq == seq && m.text == format!("m{seq}"))
        );
        let stats = store.commit_stats();
        assert_eq!(stats.submissions(), 401);
        assert!(stats.commits() < 401, "{} commits", stats.commits());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_shop_and_its_groups_are_written_in_one_partition_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        let (a, b) = (shop_in(&store, 0), shop_in(&store, 1));
        store.write(vec![group(1, &a)]).await.unwrap();
        store
            .write(vec![
                group(2, &b),
                WriteOp::AppendMessage(MessageRecord {
                    group_id: 2,
                    seq: 1,
                    ..Default::default()
                }),
            ])
            .await
            .unwrap();
        let in_partition = |p: usize, table: Table, key: Vec<u8>| {
            let tables = store.tables(p).unwrap();
            tables.get(table).get(key).unwrap().is_some()
        };
        assert!(in_partition(0, Table::Groups, keys::group_key(1).to_vec()));
        assert!(!in_partition(1, Table::Groups, keys::group_key(1).to_vec()));
        assert!(in_partition(1, Table::Groups, keys::group_key(2).to_vec()));
        assert!(in_partition(
            1,
            Table::Messages,
            keys::message_key(2, 1).to_vec()
        ));
        assert!(!in_partition(
            0,
            Table::Messages,
            keys::message_key(2, 1).to_vec()
        ));
        store.close().await.unwrap();
        assert!(dir.path().join("p1").join("version").exists());
    }

    #[tokio::test]
    async fn a_folder_from_before_partitions_opens_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        old_root_database(dir.path())
            .persist(PersistMode::SyncAll)
            .unwrap();
        let store = open(dir.path(), 4);
        assert_eq!(store.partitions(), 1);
        let group = store.load_group(5).await.unwrap();
        assert_eq!(group.map(|g| g.shop_id).as_deref(), Some("old-shop"));
        store.close().await.unwrap();
        assert!(!dir.path().join("partitions").exists());
    }

    /// What versions before partitions wrote: one database at the folder's
    /// root, here with group 5 of `old-shop` in it.
    fn old_root_database(dir: &std::path::Path) -> Database {
        let db = Database::builder(dir).open().unwrap();
        let groups = db
            .keyspace("groups", KeyspaceCreateOptions::default)
            .unwrap();
        let record = GroupRecord {
            group_id: 5,
            shop_id: "old-shop".into(),
            ..Default::default()
        };
        groups
            .insert(keys::group_key(5), prost::Message::encode_to_vec(&record))
            .unwrap();
        db
    }

    /// Writes `messages` of group 5 the way stores before 2026-12-03 did:
    /// in the keyspace `messages`, under `group | bucket | seq`, with
    /// `bad_key` among them when given ([`old_root_database`]).
    fn old_message_layout(dir: &std::path::Path, seqs: &[u64], bad_key: Option<&[u8]>) {
        let db = old_root_database(dir);
        let old = db
            .keyspace(migrate::OLD_MESSAGES, KeyspaceCreateOptions::default)
            .unwrap();
        for &seq in seqs {
            let mut key = Vec::new();
            key.extend_from_slice(&5u64.to_be_bytes());
            key.extend_from_slice(&keys::bucket_of(seq).to_be_bytes());
            key.extend_from_slice(&seq.to_be_bytes());
            let msg = MessageRecord {
                group_id: 5,
                seq,
                text: format!("old {seq}"),
                // The second answers the first: a reply from before the
                // reply index.
                reply_to: u64::from(seq == 2),
                ..Default::default()
            };
            old.insert(key, prost::Message::encode_to_vec(&msg))
                .unwrap();
        }
        if let Some(key) = bad_key {
            old.insert(key, b"x").unwrap();
        }
        db.persist(PersistMode::SyncAll).unwrap();
    }

    #[tokio::test]
    async fn messages_in_the_old_key_layout_are_moved_when_the_folder_opens() {
        let dir = tempfile::tempdir().unwrap();
        // Across a bucket boundary, where the old key's middle part changes.
        let mut seqs = vec![1, 2, 3, keys::BUCKET_SIZE, keys::BUCKET_SIZE + 1];
        old_message_layout(dir.path(), &seqs, None);
        for _ in 0..2 {
            // Twice: the second open finds nothing left to move.
            let store = open(dir.path(), 2);
            let last = *seqs.last().unwrap();
            assert_eq!(store.last_seq(5).await.unwrap(), last);
            let all = store.messages_after(5, 0, 100).await.unwrap();
            let got: Vec<_> = all.iter().map(|m| m.seq).collect();
            assert_eq!(got, seqs, "every message, in seq order");
            assert_eq!(all[3].text, format!("old {}", keys::BUCKET_SIZE));
            let before = store.messages_before(5, keys::BUCKET_SIZE + 1, 2).await;
            let got: Vec<_> = before.unwrap().iter().map(|m| m.seq).collect();
            assert_eq!(got, [3, keys::BUCKET_SIZE]);
            assert_eq!(
                store.replies_to(5, 1).await.unwrap(),
                [2],
                "a reply from before the reply index is indexed at open"
            );
            // New messages go on after the moved ones.
            store
                .write(vec![WriteOp::AppendMessage(MessageRecord {
                    group_id: 5,
                    seq: last + 1,
                    ..Default::default()
                })])
                .await
                .unwrap();
            seqs.push(last + 1);
            store.close().await.unwrap();
        }
        let db = Database::builder(dir.path()).open().unwrap();
        assert!(
            !db.keyspace_exists(migrate::OLD_MESSAGES),
            "the old keyspace is deleted once moved"
        );
    }

    #[tokio::test]
    async fn a_reply_index_left_half_built_is_built_again_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1);
        let reply = |seq: u64| {
            WriteOp::AppendMessage(MessageRecord {
                group_id: 3,
                seq,
                reply_to: 1,
                ..Default::default()
            })
        };
        store.write(vec![reply(2), reply(3)]).await.unwrap();
        store.close().await.unwrap();
        // A crash in the middle of a build: one entry written, no mark.
        {
            let db = Database::builder(dir.path().join("p0")).open().unwrap();
            let replies = db
                .keyspace(Table::Replies.name(), KeyspaceCreateOptions::default)
                .unwrap();
            assert!(replies.contains_key(b"built").unwrap(), "the built index");
            assert!(replies.contains_key(keys::reply_key(3, 1, 3)).unwrap());
            replies.remove(keys::reply_key(3, 1, 3)).unwrap();
            replies.remove(b"built").unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let store = open(dir.path(), 1);
        assert_eq!(store.replies_to(3, 1).await.unwrap(), [2, 3]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn each_partition_moves_its_own_old_messages() {
        let dir = tempfile::tempdir().unwrap();
        // A partitioned folder from the day partitions came, before the key
        // changed: group 5 and its messages live in the second partition.
        std::fs::write(dir.path().join("partitions"), "2").unwrap();
        let seqs = [1, keys::BUCKET_SIZE + 7];
        old_message_layout(&dir.path().join("p1"), &seqs, None);
        let store = open(dir.path(), 2);
        assert_eq!(store.partitions(), 2);
        let got: Vec<_> = store
            .messages_after(5, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(got, seqs);
        store.close().await.unwrap();
        let db = Database::builder(dir.path().join("p1")).open().unwrap();
        assert!(!db.keyspace_exists(migrate::OLD_MESSAGES));
    }

    #[tokio::test]
    async fn a_damaged_old_message_key_fails_the_open_and_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        old_message_layout(dir.path(), &[1, 2], Some(&[0u8; 10]));
        let r = FjallStore::open(FjallConfig::new(dir.path()));
        assert!(
            matches!(
                r,
                Err(StorageError::Corrupt {
                    keyspace: "messages",
                    ..
                })
            ),
            "{r:?}"
        );
        let db = Database::builder(dir.path()).open().unwrap();
        assert!(db.keyspace_exists(migrate::OLD_MESSAGES));
        let old = db
            .keyspace(migrate::OLD_MESSAGES, KeyspaceCreateOptions::default)
            .unwrap();
        assert_eq!(
            old.iter().count(),
            3,
            "the old messages are all still there"
        );
    }

    #[tokio::test]
    async fn commit_stats_count_what_was_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        let (a, b) = (shop_in(&store, 0), shop_in(&store, 1));
        let stats = store.commit_stats();
        assert_eq!(
            (stats.commits(), stats.submissions(), stats.writes()),
            (0, 0, 0)
        );
        // A message with its client id (two keys) and the sender's read mark.
        store.write(vec![group(1, &a)]).await.unwrap();
        store
            .write(vec![
                WriteOp::AppendMessage(MessageRecord {
                    group_id: 1,
                    seq: 1,
                    sender_id: "u".into(),
                    client_msg_id: "c".into(),
                    ..Default::default()
                }),
                WriteOp::PutReadMark {
                    group_id: 1,
                    user_id: "u".into(),
                    seq: 1,
                },
            ])
            .await
            .unwrap();
        // One submission naming two shops: a part in each partition.
        let feedback = |shop: &str| WriteOp::PutFeedback {
            shop_id: shop.into(),
            day: 1,
            positive: 1,
            negative: 0,
        };
        store.write(vec![feedback(&a), feedback(&b)]).await.unwrap();
        // A flush carries no submission.
        store.flush().await.unwrap();
        assert_eq!(stats.submissions(), 4, "the group, the message, two parts");
        assert_eq!(stats.writes(), 1 + 3 + 2);
        // Each write waited for its own commit, and the two parts are in
        // two partitions, so two commits.
        assert_eq!(stats.commits(), 4);
        let observed = stats.durable_latency().count();
        assert_eq!(observed, 4, "one latency per submission");
        // Both phases of every commit, a flush's too.
        let phases = stats.write_phase().count();
        assert_eq!(phases, stats.persist_phase().count());
        assert!(phases >= stats.commits(), "{phases} commits timed");
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_submission_for_two_shops_is_reported_once_both_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        let (a, b) = (shop_in(&store, 0), shop_in(&store, 1));
        let feedback = |shop: &str| WriteOp::PutFeedback {
            shop_id: shop.into(),
            day: 1,
            positive: 2,
            negative: 3,
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let counted = calls.clone();
        store
            .submit(
                vec![feedback(&a), feedback(&b)],
                Box::new(move |r| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(r);
                }),
            )
            .unwrap();
        rx.await.unwrap().unwrap();
        store.flush().await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one callback for both parts"
        );
        let day = FeedbackDay {
            day: 1,
            positive: 2,
            negative: 3,
        };
        assert_eq!(store.load_feedback(&a).await.unwrap(), [day]);
        assert_eq!(store.load_feedback(&b).await.unwrap(), [day]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_full_partition_refuses_a_split_submission_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        let (a, b) = (shop_in(&store, 0), shop_in(&store, 1));
        // Fill partition 1's queue by hand, as a stalled writer would.
        let full = &store.inner.partitions[1];
        full.queued.store(full.capacity, Ordering::SeqCst);
        let feedback = |shop: &str| WriteOp::PutFeedback {
            shop_id: shop.into(),
            day: 1,
            positive: 1,
            negative: 0,
        };
        let r = store.submit(vec![feedback(&a), feedback(&b)], Box::new(|_| {}));
        assert!(matches!(r, Err(StorageError::Overloaded)), "{r:?}");
        assert_eq!(
            store.inner.partitions[0].queued.load(Ordering::SeqCst),
            0,
            "the part for partition 0 was not queued"
        );
        full.queued.store(0, Ordering::SeqCst);
        store.flush().await.unwrap();
        assert!(store.load_feedback(&a).await.unwrap().is_empty());
        store.close().await.unwrap();
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
        // Messages moved to a new keyspace with a new key (`migrate.rs`).
        assert_eq!(Table::Messages.name(), "messages_v2");
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
        store
            .tables(store.inner.homes.of_group(9))
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
