//! The server on the cluster store.
//!
//! The failure paths run everywhere: they need no cluster, only a port
//! where none listens. The chat itself runs against a live ScyllaDB or
//! Cassandra cluster when `QUN_SCYLLA_NODES` names one
//! (docs/operations/scylla.md); otherwise it prints that it was skipped.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::{TestServer, no_rate_limits};
use qun_storage::scylla_store::{self, Replication, ScyllaConfig};

fn qun(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qun"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A local port with nothing listening on it.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

#[test]
fn cluster_settings_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let no_nodes = qun(&["serve", "--data-dir", data, "--storage", "scylla"], &[]);
    assert_eq!(no_nodes.status.code(), Some(64), "{}", stderr(&no_nodes));
    assert!(
        stderr(&no_nodes).contains("scylla_nodes"),
        "{}",
        stderr(&no_nodes)
    );

    let bad_store = qun(
        &["serve", "--data-dir", data, "--storage", "cassandra"],
        &[],
    );
    assert_eq!(bad_store.status.code(), Some(64));
    assert!(stderr(&bad_store).contains("embedded or scylla"));

    let embedded = qun(
        &["migrate", "--data-dir", data, "--storage", "embedded"],
        &[],
    );
    assert_eq!(embedded.status.code(), Some(64));
    assert!(
        stderr(&embedded).contains("needs no migration"),
        "{}",
        stderr(&embedded)
    );

    let bad_replication = qun(
        &[
            "migrate",
            "--scylla-nodes",
            "h:9042",
            "--replication",
            "dc1",
        ],
        &[],
    );
    assert_eq!(bad_replication.status.code(), Some(64));
    assert!(stderr(&bad_replication).contains("scylla_replication"));
}

#[test]
fn an_unreachable_cluster_stops_serve_and_migrate_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let nodes = closed_port();
    let quick = [("QUN_SCYLLA_REQUEST_TIMEOUT_MS", "1000")];
    let serve = qun(
        &[
            "serve",
            "--data-dir",
            data,
            "--storage",
            "scylla",
            "--scylla-nodes",
            &nodes,
            "--ws-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ],
        &quick,
    );
    assert_eq!(serve.status.code(), Some(1), "{}", stderr(&serve));
    assert!(
        stderr(&serve).contains("storage unavailable"),
        "{}",
        stderr(&serve)
    );
    let migrate = qun(&["migrate", "--scylla-nodes", &nodes], &quick);
    assert_eq!(migrate.status.code(), Some(1), "{}", stderr(&migrate));
    let err = stderr(&migrate);
    assert!(
        err.contains("migrating keyspace qun") && err.contains("storage unavailable"),
        "{err}"
    );
}

/// The chat, a restart and resume on a live cluster, through the real
/// server and client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_history_and_resume_survive_a_restart_on_a_live_cluster() {
    let nodes = match std::env::var("QUN_SCYLLA_NODES") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => {
            eprintln!(
                "skipped chat_history_and_resume_survive_a_restart_on_a_live_cluster: \
                 set QUN_SCYLLA_NODES=host:9042 to run it (docs/operations/scylla.md)"
            );
            return;
        }
    };
    let keyspace = format!("qun_gw_test_{}", std::process::id());
    let config = ScyllaConfig::new(
        nodes.split(',').map(|s| s.trim().to_string()).collect(),
        keyspace.clone(),
    );
    scylla_store::migrate_with(&config, &Replication::Simple { factor: 1 })
        .await
        .unwrap();
    let on_cluster = |c: &mut qun_gateway::Config| {
        no_rate_limits(c);
        c.storage = "scylla".into();
        c.scylla_nodes = nodes.clone();
        c.scylla_keyspace = keyspace.clone();
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), on_cluster).await;
    let (agent, g) = server.agent_with_group("On the cluster", 0).await;
    let buyer = server.client("ann", "buyer", None).await;
    buyer.join(g).await.unwrap();
    for n in 1..=40u64 {
        let who = if n % 2 == 0 { &agent } else { &buyer };
        assert_eq!(who.send(g, &format!("m{n}"), None).await.unwrap().seq, n);
    }
    let newest = buyer.history(g, 0, 50).await.unwrap();
    assert_eq!(newest.messages.len(), 40);
    drop((agent, buyer));
    server.stop().await;

    let server = TestServer::start_with(dir.path(), on_cluster).await;
    let buyer = server.client("ann", "buyer", None).await;
    assert_eq!(buyer.history(g, 0, 50).await.unwrap(), newest);
    assert!(buyer.join(g).await.unwrap().already_member);
    assert_eq!(buyer.send(g, "after restart", None).await.unwrap().seq, 41);
    assert!(server.metric("qun_store_page_queries_total").await > 0);
    // The send after the restart was made durable through the writer task.
    assert!(server.metric("qun_store_submissions_total").await > 0);
    assert!(server.metric("qun_store_durable_seconds_count").await > 0);
    server.stop().await;

    let admin = scylla_store::session(&config).await.unwrap();
    scylla_store::drop_keyspace(&admin, &keyspace)
        .await
        .unwrap();
}
