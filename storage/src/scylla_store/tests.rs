//! Tests that need a cluster run only when `QUN_SCYLLA_NODES` names one
//! (`host:9042[,host:9042…]`); otherwise they print that they were skipped.
//! Each run makes its own keyspaces (`qun_test_<pid>_<n>`) and drops them.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::StoreExt as _;
use crate::contract;

fn live_nodes(test: &str) -> Option<Vec<String>> {
    match std::env::var("QUN_SCYLLA_NODES") {
        Ok(v) if !v.trim().is_empty() => Some(v.split(',').map(|s| s.trim().to_string()).collect()),
        _ => {
            eprintln!(
                "skipped {test}: set QUN_SCYLLA_NODES=host:9042 to run it against a live \
                 ScyllaDB or Cassandra cluster (docs/operations/scylla.md)"
            );
            None
        }
    }
}

fn replication() -> Replication {
    std::env::var("QUN_SCYLLA_REPLICATION")
        .ok()
        .map_or(Replication::Simple { factor: 1 }, |r| r.parse().unwrap())
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn test_keyspace() -> String {
    format!(
        "qun_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

struct ScyllaHarness {
    config: ScyllaConfig,
    created: Arc<Mutex<Vec<String>>>,
    migrated: bool,
    /// Wrap the store in `Coalescing`, as the server does.
    coalesced: bool,
}

impl contract::Harness for ScyllaHarness {
    async fn open(&mut self) -> Arc<dyn Store> {
        if !self.migrated {
            migrate_with(&self.config, &replication()).await.unwrap();
            self.created
                .lock()
                .unwrap()
                .push(self.config.keyspace.clone());
            self.migrated = true;
        }
        let store = ScyllaStore::connect(self.config.clone()).await.unwrap();
        if self.coalesced {
            Arc::new(crate::Coalescing::new(store))
        } else {
            Arc::new(store)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_passes_the_storage_contract() {
    let Some(nodes) = live_nodes("scylla_passes_the_storage_contract") else {
        return;
    };
    let created = Arc::new(Mutex::new(Vec::new()));
    for coalesced in [false, true] {
        contract::run_all(|| ScyllaHarness {
            config: ScyllaConfig::new(nodes.clone(), test_keyspace()),
            created: created.clone(),
            migrated: false,
            coalesced,
        })
        .await;
    }
    let admin = session(&ScyllaConfig::new(nodes.clone(), "qun"))
        .await
        .unwrap();
    let created = created.lock().unwrap().clone();
    for ks in created {
        drop_keyspace(&admin, &ks).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_serve_refuses_a_missing_schema() {
    let Some(nodes) = live_nodes("migrate_is_idempotent_and_serve_refuses_a_missing_schema") else {
        return;
    };
    let config = ScyllaConfig::new(nodes.clone(), test_keyspace());
    let refused = ScyllaStore::connect(config.clone()).await.unwrap_err();
    assert!(
        matches!(&refused, StorageError::Schema(m) if m.contains("qun migrate")),
        "{refused:?}"
    );
    let first = migrate_with(&config, &replication()).await.unwrap();
    assert_eq!((first.from, first.to), (0, SCHEMA_VERSION));
    assert_eq!(first.applied.len(), MIGRATIONS.len());
    let again = migrate_with(&config, &replication()).await.unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    let store = ScyllaStore::connect(config.clone()).await.unwrap();
    store.close().await.unwrap();
    let admin = session(&config).await.unwrap();
    drop_keyspace(&admin, &config.keyspace).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_to_the_reply_index_indexes_the_replies_already_stored() {
    let Some(nodes) =
        live_nodes("the_upgrade_to_the_reply_index_indexes_the_replies_already_stored")
    else {
        return;
    };
    let config = ScyllaConfig::new(nodes, test_keyspace());
    migrate_with(&config, &replication()).await.unwrap();
    let store = ScyllaStore::connect(config.clone()).await.unwrap();
    let message = |seq: u64, reply_to: u64| {
        WriteOp::AppendMessage(MessageRecord {
            group_id: 9,
            seq,
            reply_to,
            ..Default::default()
        })
    };
    store
        .write(vec![
            message(1, 0),
            message(2, 1),
            message(3, 0),
            message(4, 1),
        ])
        .await
        .unwrap();
    // As a keyspace from before version 10 has them: no index rows.
    let admin = session(&config).await.unwrap();
    admin
        .query_unpaged(format!("TRUNCATE {}.replies", config.keyspace), ())
        .await
        .unwrap();
    assert!(store.replies_to(9, 1).await.unwrap().is_empty());
    let indexed = schema::index_replies(&admin, &config.keyspace)
        .await
        .unwrap();
    assert_eq!(indexed, 2);
    assert_eq!(store.replies_to(9, 1).await.unwrap(), [2, 4]);
    // A reply appended by an older server after the migration (no index
    // row) is found once the index is filled again; the rows already
    // there stay as they are.
    store.write(vec![message(5, 3)]).await.unwrap();
    admin
        .query_unpaged(
            format!(
                "DELETE FROM {}.replies WHERE group_id = 9 AND quoted_seq = 3",
                config.keyspace
            ),
            (),
        )
        .await
        .unwrap();
    assert!(store.replies_to(9, 3).await.unwrap().is_empty());
    assert_eq!(reindex_replies_with(&config).await.unwrap(), 3);
    assert_eq!(store.replies_to(9, 3).await.unwrap(), [5]);
    assert_eq!(store.replies_to(9, 1).await.unwrap(), [2, 4]);
    store.close().await.unwrap();
    drop_keyspace(&admin, &config.keyspace).await.unwrap();
}

/// No cluster needed: nothing listens on the port, and the error says so as
/// a retryable `Unavailable`, not a panic or a hang.
#[tokio::test]
async fn an_unreachable_cluster_is_a_typed_retryable_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut config = ScyllaConfig::new(vec![format!("127.0.0.1:{port}")], "qun");
    config.request_timeout = Duration::from_secs(2);
    let e = ScyllaStore::connect(config).await.unwrap_err();
    assert!(
        matches!(e, StorageError::Unavailable { op: "connect", .. }),
        "{e:?}"
    );
    assert!(e.is_retryable());
}

#[tokio::test]
async fn a_bad_keyspace_name_is_refused_before_connecting() {
    let config = ScyllaConfig::new(vec!["127.0.0.1:1".into()], "Bad-Name");
    let e = ScyllaStore::connect(config).await.unwrap_err();
    assert!(matches!(e, StorageError::Schema(_)), "{e:?}");
}

#[test]
fn consistency_names() {
    assert_eq!(
        parse_consistency("LOCAL_QUORUM").unwrap(),
        Consistency::LocalQuorum
    );
    assert_eq!(parse_consistency("one").unwrap(), Consistency::One);
    assert!(
        parse_consistency("serial")
            .unwrap_err()
            .contains("local_quorum")
    );
}
