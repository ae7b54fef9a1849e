#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

use super::*;
use crate::{FjallConfig, FjallStore, StoreExt};

/// A test double: the real embedded store behind a gate. Page reads wait
/// until the gate opens (so a test can hold a query in flight), are counted,
/// and fail with a timeout while `fail` is set. Everything else is the
/// embedded store's.
#[derive(Debug)]
struct GatedStoreDouble {
    real: FjallStore,
    gate: watch::Receiver<bool>,
    page_queries: AtomicU64,
    fail: AtomicBool,
}

impl GatedStoreDouble {
    async fn page(
        &self,
        read: BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>>,
    ) -> Result<Vec<MessageRecord>, StorageError> {
        self.page_queries.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open).await.unwrap();
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Timeout { op: "read" });
        }
        read.await
    }
}

impl Store for GatedStoreDouble {
    fn submit(&self, ops: Vec<WriteOp>, done: DurableCallback) -> Result<(), StorageError> {
        self.real.submit(ops, done)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.real.flush()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.real.close()
    }
    fn load_group(&self, g: u64) -> BoxFuture<'_, Result<Option<GroupRecord>, StorageError>> {
        self.real.load_group(g)
    }
    fn load_members(&self, g: u64) -> BoxFuture<'_, Result<Vec<MemberRecord>, StorageError>> {
        self.real.load_members(g)
    }
    fn groups_of_user(&self, u: &str) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.real.groups_of_user(u)
    }
    fn max_group_id(&self) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.real.max_group_id()
    }
    fn last_seq(&self, g: u64) -> BoxFuture<'_, Result<u64, StorageError>> {
        self.real.last_seq(g)
    }
    fn messages_before(
        &self,
        g: u64,
        before: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        Box::pin(self.page(self.real.messages_before(g, before, limit)))
    }
    fn messages_after(
        &self,
        g: u64,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<MessageRecord>, StorageError>> {
        Box::pin(self.page(self.real.messages_after(g, after, limit)))
    }
    fn find_sent<'a>(
        &'a self,
        g: u64,
        s: &'a str,
        c: &'a str,
    ) -> BoxFuture<'a, Result<Option<SentRecord>, StorageError>> {
        self.real.find_sent(g, s, c)
    }
    fn replies_to(&self, g: u64, seq: u64) -> BoxFuture<'_, Result<Vec<u64>, StorageError>> {
        self.real.replies_to(g, seq)
    }
    fn load_read_marks(&self, g: u64) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
        self.real.load_read_marks(g)
    }
    fn load_objects(&self, g: u64) -> BoxFuture<'_, Result<Vec<ObjectRecord>, StorageError>> {
        self.real.load_objects(g)
    }
    fn load_entries(&self, g: u64) -> BoxFuture<'_, Result<Vec<EntryRecord>, StorageError>> {
        self.real.load_entries(g)
    }
    fn due_objects(&self) -> BoxFuture<'_, Result<Vec<Due>, StorageError>> {
        self.real.due_objects()
    }
    fn load_product<'a>(
        &'a self,
        s: &'a str,
        p: &'a str,
    ) -> BoxFuture<'a, Result<Option<ProductRecord>, StorageError>> {
        self.real.load_product(s, p)
    }
    fn groups_with_card<'a>(
        &'a self,
        s: &'a str,
        p: &'a str,
    ) -> BoxFuture<'a, Result<Vec<u64>, StorageError>> {
        self.real.groups_with_card(s, p)
    }

    fn load_reach_use(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Option<ReachUse>, StorageError>> {
        self.real.load_reach_use(group_id)
    }

    fn load_feedback<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<FeedbackDay>, StorageError>> {
        self.real.load_feedback(shop_id)
    }

    fn load_promotion_mutes(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        self.real.load_promotion_mutes(group_id)
    }

    fn load_reports(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<ReportRecord>, StorageError>> {
        self.real.load_reports(group_id)
    }

    fn load_member_flags(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<(String, MemberFlagsRecord)>, StorageError>> {
        self.real.load_member_flags(group_id)
    }

    fn load_faq(&self, group_id: u64) -> BoxFuture<'_, Result<Vec<FaqRecord>, StorageError>> {
        self.real.load_faq(group_id)
    }

    fn load_auto_replies<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<AutoReplyRecord>, StorageError>> {
        self.real.load_auto_replies(shop_id)
    }

    fn load_join_requests(
        &self,
        group_id: u64,
    ) -> BoxFuture<'_, Result<Vec<JoinRequestRecord>, StorageError>> {
        self.real.load_join_requests(group_id)
    }

    fn load_buyer_tags<'a>(
        &'a self,
        shop_id: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BuyerTagsRecord>, StorageError>> {
        self.real.load_buyer_tags(shop_id, user_id)
    }

    fn load_cs_shop<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsShopRecord>, StorageError>> {
        self.real.load_cs_shop(shop_id)
    }

    fn load_cs_buyer<'a>(
        &'a self,
        shop_id: &'a str,
        buyer_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<CsBuyerRecord>, StorageError>> {
        self.real.load_cs_buyer(shop_id, buyer_id)
    }

    fn load_schedules(&self) -> BoxFuture<'_, Result<Vec<ScheduleRecord>, StorageError>> {
        self.real.load_schedules()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Coalescing<GatedStoreDouble>>,
    gate: watch::Sender<bool>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (gate, rx) = watch::channel(true);
    let real = FjallStore::open(FjallConfig::new(dir.path())).unwrap();
    Fixture {
        _dir: dir,
        store: Arc::new(Coalescing::new(GatedStoreDouble {
            real,
            gate: rx,
            page_queries: AtomicU64::new(0),
            fail: AtomicBool::new(false),
        })),
        gate,
    }
}

fn msg(group_id: u64, seq: u64) -> WriteOp {
    WriteOp::AppendMessage(MessageRecord {
        group_id,
        seq,
        text: format!("m{seq}"),
        ..Default::default()
    })
}

fn seqs(r: &[MessageRecord]) -> Vec<u64> {
    r.iter().map(|m| m.seq).collect()
}

impl Fixture {
    fn queries(&self) -> u64 {
        self.store.inner().page_queries.load(Ordering::SeqCst)
    }

    /// Starts `n` readers of one page while the gate is shut, and waits
    /// until they are all waiting.
    async fn readers(
        &self,
        n: usize,
        before: u64,
    ) -> Vec<tokio::task::JoinHandle<Result<Vec<MessageRecord>, StorageError>>> {
        let stats = self.store.stats();
        let seen = || stats.queries.load(Ordering::SeqCst) + stats.shared.load(Ordering::SeqCst);
        let start = seen();
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let s = self.store.clone();
                tokio::spawn(async move { s.messages_before(1, before, 10).await })
            })
            .collect();
        while seen() < start + n as u64 {
            tokio::task::yield_now().await;
        }
        handles
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_page_share_one_query() {
    let f = fixture();
    f.store
        .write((1..=30).map(|s| msg(1, s)).collect())
        .await
        .unwrap();
    f.gate.send(false).unwrap();
    let readers = f.readers(100, 31).await;
    f.gate.send(true).unwrap();
    for r in readers {
        assert_eq!(
            seqs(&r.await.unwrap().unwrap()),
            (21..=30).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        f.queries(),
        1,
        "100 readers of one page ran more than one query"
    );
    assert_eq!(f.store.stats().shared.load(Ordering::SeqCst), 99);

    // Finished flights are forgotten: a later reader queries again.
    f.store.messages_before(1, 31, 10).await.unwrap();
    assert_eq!(f.queries(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_pages_and_groups_are_not_shared() {
    let f = fixture();
    f.store
        .write((1..=5).flat_map(|s| [msg(1, s), msg(2, s)]).collect())
        .await
        .unwrap();
    let (a, b, c, d) = tokio::join!(
        f.store.messages_before(1, 6, 10),
        f.store.messages_before(2, 6, 10),
        f.store.messages_after(1, 0, 10),
        f.store.messages_before(1, 6, 2),
    );
    assert_eq!(seqs(&a.unwrap()), [1, 2, 3, 4, 5]);
    assert!(b.unwrap().iter().all(|m| m.group_id == 2));
    assert_eq!(seqs(&c.unwrap()), [1, 2, 3, 4, 5]);
    assert_eq!(seqs(&d.unwrap()), [4, 5]);
    assert_eq!(f.queries(), 4);
}

impl Fixture {
    /// With message 1 of group 1 stored, starts a reader of its newest
    /// page that waits behind the shut gate, makes `write` durable, then
    /// reads the same page again: that late reader must run a query of its
    /// own (two queries in all), whose page it returns.
    async fn read_after_a_durable(&self, write: WriteOp) -> Vec<MessageRecord> {
        self.store.write(vec![msg(1, 1)]).await.unwrap();
        self.gate.send(false).unwrap();
        let early = self.readers(1, u64::MAX).await;
        self.store.write(vec![write]).await.unwrap();
        let late = {
            let s = self.store.clone();
            tokio::spawn(async move { s.messages_before(1, u64::MAX, 10).await })
        };
        // Not a timed test: a bound on a hang, should the late reader join
        // the early query (and wait behind the shut gate).
        let own_query = async {
            while self.queries() < 2 {
                tokio::task::yield_now().await;
            }
        };
        let ran = tokio::time::timeout(std::time::Duration::from_secs(30), own_query).await;
        self.gate.send(true).unwrap();
        assert!(ran.is_ok(), "the late reader joined the query from before");
        let page = late.await.unwrap().unwrap();
        early.into_iter().next().unwrap().await.unwrap().unwrap();
        assert_eq!(self.queries(), 2, "the late reader must run its own query");
        page
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_joins_a_query_older_than_a_durable_message() {
    let f = fixture();
    // A message becomes durable while the first query waits.
    assert_eq!(seqs(&f.read_after_a_durable(msg(1, 2)).await), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_joins_a_query_older_than_a_durable_rewrite() {
    let f = fixture();
    // A recall (or a scrubbed quote) rewrites the message meanwhile.
    let rewritten = MessageRecord {
        group_id: 1,
        seq: 1,
        recalled: true,
        ..Default::default()
    };
    let page = f
        .read_after_a_durable(WriteOp::RewriteMessage(rewritten))
        .await;
    assert!(page[0].recalled, "{page:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reaches_every_waiter_and_is_not_remembered() {
    let f = fixture();
    f.store.write(vec![msg(1, 1)]).await.unwrap();
    f.store.inner().fail.store(true, Ordering::SeqCst);
    f.gate.send(false).unwrap();
    let readers = f.readers(5, 2).await;
    f.gate.send(true).unwrap();
    for r in readers {
        let e = r.await.unwrap().unwrap_err();
        assert!(matches!(e, StorageError::Timeout { .. }), "{e:?}");
    }
    f.store.inner().fail.store(false, Ordering::SeqCst);
    assert_eq!(seqs(&f.store.messages_before(1, 2, 10).await.unwrap()), [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_takes_over_when_the_first_caller_goes_away() {
    let f = fixture();
    f.store.write(vec![msg(1, 1)]).await.unwrap();
    f.gate.send(false).unwrap();
    let first = f.readers(1, 2).await.remove(0);
    let second = f.readers(1, 2).await.remove(0);
    assert_eq!(
        f.store.stats().shared.load(Ordering::SeqCst),
        1,
        "second joined first"
    );
    // The caller that started the query is cancelled (its phone hung up).
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    f.gate.send(true).unwrap();
    assert_eq!(seqs(&second.await.unwrap().unwrap()), [1]);
}

/// The wrapper changes nothing a backend promises: the whole contract holds
/// through it (here over the embedded store; over ScyllaDB in the live suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_passes_the_storage_contract() {
    struct Wrapped(tempfile::TempDir);
    impl crate::contract::Harness for Wrapped {
        async fn open(&mut self) -> Arc<dyn Store> {
            Arc::new(Coalescing::new(
                FjallStore::open(FjallConfig::new(self.0.path())).unwrap(),
            ))
        }
    }
    crate::contract::run_all(|| Wrapped(tempfile::tempdir().unwrap())).await;
}

/// The double does not override `Store::load_buyer_tags_of`, so it runs the
/// trait's provided version (point reads, several outstanding), which the
/// cluster store uses; it must find what the embedded store's one-pass
/// override finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_many_buyers_tags_one_by_one_finds_what_one_pass_finds() {
    let f = fixture();
    let users: Vec<String> = (0..3 * crate::BUYER_TAG_READS_IN_FLIGHT)
        .map(|i| format!("b{i:04}"))
        .collect();
    let tagged: Vec<BuyerTagsRecord> = users
        .iter()
        .step_by(5)
        .map(|u| BuyerTagsRecord {
            shop_id: "shop".into(),
            user_id: u.clone(),
            tags: vec!["vip".into()],
        })
        .collect();
    f.store
        .write(tagged.iter().cloned().map(WriteOp::PutBuyerTags).collect())
        .await
        .unwrap();
    let by_user = |mut r: Vec<BuyerTagsRecord>| {
        r.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        r
    };
    let provided = f.store.inner().load_buyer_tags_of("shop", &users).await;
    let one_pass = f
        .store
        .inner()
        .real
        .load_buyer_tags_of("shop", &users)
        .await;
    assert_eq!(by_user(provided.unwrap()), tagged);
    assert_eq!(by_user(one_pass.unwrap()), tagged);
}
