//! qun-loadtest against the real server, at toy sizes: the tool starts its
//! workers, measures, checks, and refuses what it must refuse.
#![allow(clippy::unwrap_used)]

use std::process::Output;

use qun_gateway::{Config, Listeners};
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    metrics: String,
    quic: String,
    pin: String,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), qun_gateway::ServerError>>,
}

async fn server() -> Server {
    server_with(|_| {}).await
}

/// A server on ephemeral loopback ports, its configuration changed by
/// `set` first.
async fn server_with(set: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    qun_gateway::auth::TokenKey::load_or_create(dir.path()).unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ws_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    set(&mut config);
    let listeners = Listeners::bind(&config).await.unwrap();
    let url = format!("ws://{}/ws", listeners.ws_addr().unwrap());
    let metrics = format!("http://{}/metrics", listeners.http_addr().unwrap());
    let quic = format!("quic://{}", listeners.quic_addr().unwrap());
    let pin = listeners.quic_fingerprint().to_string();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(qun_gateway::run(config, listeners, shutdown.clone()));
    Server {
        url,
        metrics,
        quic,
        pin,
        dir,
        shutdown,
        task,
    }
}

async fn loadtest(s: &Server, url: &str, args: &[&str]) -> (Output, serde_json::Value) {
    let json = s.dir.path().join("report.json");
    let _ = std::fs::remove_file(&json);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_qun-loadtest"))
        .arg("--url")
        .arg(url)
        .arg("--data-dir")
        .arg(s.dir.path())
        .arg("--json")
        .arg(&json)
        .args(["--timeout", "60s", "--per-worker", "4", "--sources", "2"])
        .args(args)
        .output()
        .await
        .unwrap();
    let report = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, report)
}

/// Runs `qun-loadtest` as [`loadtest`] does and returns its report, after
/// checking that the run passed.
async fn passing(s: &Server, url: &str, args: &[&str]) -> serde_json::Value {
    let (out, report) = loadtest(s, url, args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    report
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_flash_sale_measure_and_check() {
    let s = server().await;
    // 2 groups × 5 members over 3 worker processes (4 connections each).
    // The server runs in this test's process.
    let pid = std::process::id().to_string();
    let r = passing(
        &s,
        &s.url,
        &[
            "--server-pid",
            &pid,
            "--metrics-url",
            &s.metrics,
            "fanout",
            "--groups",
            "2",
            "--members",
            "5",
            "--duration",
            "1s",
            "--rate",
            "20",
        ],
    )
    .await;
    let posted = r["counts"]["messages_posted"].as_u64().unwrap();
    assert!(posted > 0, "{r}");
    assert_eq!(
        r["counts"]["deliveries"], r["counts"]["deliveries_expected"],
        "{r}"
    );
    assert_eq!(r["counts"]["deliveries"].as_u64().unwrap(), posted * 5);
    assert_eq!(r["checks"]["nothing_lost"], true);
    // The server's fan-out queue, from /metrics: each message posted in the
    // phase left its group with members to push to, so there was at least
    // one turn, and each turn's wait was observed.
    let turns = r["counts"]["server_fanout_turns"].as_u64().unwrap();
    assert!(turns >= 1, "{r}");
    let wait_p99 = r["figures"]["server_fanout_wait_p99_ms_at_most"].as_f64();
    assert!(wait_p99.unwrap() > 0.0, "{r}");
    // Its writers: every delivery was written in the phase (and the acks),
    // in at least one write, each of one frame or more.
    let writes = r["counts"]["server_writes"].as_u64().unwrap();
    assert!(writes >= 1, "{r}");
    let per_write = r["figures"]["server_frames_per_write"].as_f64().unwrap();
    assert!(per_write >= 1.0, "{r}");
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    // By default the load generator runs under SCHED_BATCH, and every
    // worker said it inherited it (or the run would have failed).
    assert_eq!(r["params"]["scheduling"], "batch", "{r}");
    // And its members delay their ACKs (a test of the client option itself
    // is in the client library). Every push, request and answer went out
    // in a segment of its own or shared one, and the ACKs came on top.
    assert_eq!(r["params"]["member_acks"], "delayed", "{r}");
    let segments = r["figures"]["tcp_segments_per_delivery"].as_f64();
    assert!(segments.unwrap() > 0.0, "{r}");
    // The part after the server sequenced each message: one sample per
    // delivery, and (to the server's millisecond) no longer than the whole.
    let after = &r["after_sequencing_latency"];
    assert_eq!(after["count"], r["counts"]["deliveries"], "{r}");
    assert!(
        after["max_ms"].as_f64().unwrap() <= r["latency"]["max_ms"].as_f64().unwrap() + 1.0,
        "{r}"
    );
    // How busy the machine and the server were while posting.
    let busy = r["figures"]["machine_busy_percent"].as_f64().unwrap();
    assert!(busy > 0.0 && busy <= 100.0, "{r}");
    assert!(r["figures"]["server_cores"].as_f64().unwrap() >= 0.0, "{r}");
    // Who used the cores: the split of the machine's busy time adds up to
    // no more than all of it, and the load generator (this test's
    // coordinator and its three workers) is counted on its own.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let split: f64 = ["user", "system", "softirq"]
        .iter()
        .map(|k| r["figures"][format!("machine_{k}_cores")].as_f64().unwrap())
        .sum();
    assert!(split <= busy / 100.0 * cores + 1e-9, "{r}");
    let loadgen = r["figures"]["loadgen_cores"].as_f64().unwrap();
    assert!((0.0..=cores).contains(&loadgen), "{r}");
    let server_parts = r["figures"]["server_user_cores"].as_f64().unwrap()
        + r["figures"]["server_system_cores"].as_f64().unwrap();
    let server = r["figures"]["server_cores"].as_f64().unwrap();
    assert!((server_parts - server).abs() < 1e-9, "{r}");
    // How long their threads waited for a core (schedstat): never less
    // than none; and the server's busiest thread ran (its runtime thread
    // wrote every delivery) for a share of the phase no bigger than all.
    for k in ["server_wait_cores", "loadgen_wait_cores"] {
        assert!(r["figures"][k].as_f64().unwrap() >= 0.0, "{k}: {r}");
    }
    let busiest = r["figures"]["server_busiest_thread_runnable"]
        .as_f64()
        .unwrap();
    assert!(busiest > 0.0 && busiest <= 1.0, "{r}");

    let r = passing(
        &s,
        &s.url,
        &[
            "--metrics-url",
            &s.metrics,
            "flash-sale",
            "--members",
            "12",
            "--slots",
            "5",
            "--within",
            "200ms",
        ],
    )
    .await;
    assert_eq!(r["counts"]["group_buy_joined"], 5, "{r}");
    assert_eq!(r["counts"]["sold_out"], 7, "{r}");
    assert_eq!(r["checks"]["exactly_slots_joined"], true);
    // The winners' latency apart: exactly the five who joined.
    assert_eq!(r["winners_latency"]["count"], 5, "{r}");
    assert_eq!(r["latency"]["count"], 12, "{r}");
    // The server's own view, from /metrics: every join it answered, and
    // the store's time to durability of at least the five winners' writes.
    assert!(
        r["counts"]["server_requests"].as_u64().unwrap() >= 12,
        "{r}"
    );
    assert!(
        r["counts"]["server_store_submissions"].as_u64().unwrap() >= 5,
        "{r}"
    );
    let store_p99 = r["figures"]["server_store_durable_p99_ms_at_most"].as_f64();
    assert!(store_p99.unwrap() > 0.0, "{r}");
    // Its group commits, with the batch's write and the journal's fsync
    // timed apart.
    let commits = r["counts"]["server_store_commits"].as_u64().unwrap();
    assert!(commits >= 1, "{r}");
    for phase in ["write", "persist"] {
        let p99 = r["figures"][format!("server_store_{phase}_p99_ms_at_most")].as_f64();
        assert!(p99.unwrap() > 0.0, "{phase}: {r}");
    }
    // Joins send no message, so no client message id was looked up.
    assert_eq!(r["counts"]["server_sent_index_reads"], 0, "{r}");
    // The server runs on this test's runtime: two worker threads.
    assert_eq!(r["params"]["server_worker_threads"], "2", "{r}");

    // The same over QUIC, with the certificate pinned.
    let r = passing(
        &s,
        &s.quic,
        &[
            "--cert-fingerprint",
            &s.pin,
            "history",
            "--clients",
            "6",
            "--messages",
            "60",
            "--mode",
            "resume",
            "--behind",
            "20",
        ],
    )
    .await;
    assert_eq!(r["transport"], "quic");
    assert_eq!(r["params"]["member_acks"], "none (not TCP)", "{r}");
    assert_eq!(r["checks"]["nothing_lost"], true, "{r}");
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_a_history_backfill() {
    let s = server().await;
    let pid = std::process::id().to_string();
    // 10 idle connections over 3 worker processes, 2 groups; the server's
    // memory is read from this test's process.
    let r = passing(
        &s,
        &s.url,
        &[
            "--server-pid",
            &pid,
            "--scheduling",
            "normal",
            "--member-acks",
            "immediate",
            "connections",
            "--count",
            "10",
            "--groups",
            "2",
        ],
    )
    .await;
    assert_eq!(r["counts"]["connected"], 10, "{r}");
    assert_eq!(r["counts"]["failed"], 0, "{r}");
    assert_eq!(r["checks"]["all_connected"], true, "{r}");
    assert!(r.get("first_failure").is_none(), "nobody failed: {r}");
    assert_eq!(r["params"]["scheduling"], "normal", "{r}");
    assert_eq!(r["params"]["member_acks"], "immediate", "{r}");
    assert!(
        r["figures"]["server_rss_mib"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(r["figures"]["connections_per_sec"].as_f64().unwrap() > 0.0);

    // 5 clients page back through 120 messages, 50 a page: each reads
    // every seq once, over at least three pages.
    let r = passing(
        &s,
        &s.url,
        &["history", "--clients", "5", "--messages", "120"],
    )
    .await;
    assert_eq!(r["scenario"], "history backfill", "{r}");
    assert_eq!(r["counts"]["lost"], 0, "{r}");
    assert_eq!(r["counts"]["duplicates"], 0, "{r}");
    assert_eq!(r["checks"]["nothing_lost"], true, "{r}");
    assert_eq!(r["checks"]["no_duplicates"], true, "{r}");
    assert!(r["latency"]["count"].as_u64().unwrap() >= 5 * 3, "{r}");
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_turned_away_are_counted_and_the_first_reason_is_told() {
    // Room for the coordinator's agent and two members, not five.
    let s = server_with(|c| c.max_connections = 3).await;
    let (out, r) = loadtest(&s, &s.url, &["connections", "--count", "5"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "a check failed: {}",
        stderr(&out)
    );
    assert_eq!(r["counts"]["connected"], 2, "{r}");
    assert_eq!(r["counts"]["failed"], 3, "{r}");
    assert_eq!(r["checks"]["all_connected"], false, "{r}");
    let why = r["first_failure"].as_str().unwrap();
    assert!(why.contains("HTTP 503"), "{why}");
    assert!(why.contains("QUN_MAX_CONNECTIONS"), "what to do: {why}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("first failure"), "{table}");
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn only_loopback_targets_and_a_real_token_key() {
    let s = server().await;
    let (out, _) = loadtest(
        &s,
        "ws://192.0.2.1:7700/ws",
        &["connections", "--count", "1"],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    let empty = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_qun-loadtest"))
        .args(["--url", &s.url, "--data-dir"])
        .arg(empty.path())
        .args(["connections", "--count", "1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token key"), "{}", stderr(&out));
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

/// The `qun` binary `compare` starts: the one `cargo test --workspace`
/// builds for the gateway's own tests, next to `qun-loadtest`. Testing this
/// package alone may not have built it, so then it is built here.
fn qun_binary() -> std::path::PathBuf {
    let loadtest = std::path::Path::new(env!("CARGO_BIN_EXE_qun-loadtest"));
    let qun = loadtest.with_file_name("qun");
    if !qun.is_file() {
        let release = loadtest.parent().is_some_and(|d| d.ends_with("release"));
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "qun-gateway", "--bin", "qun"])
            .args(release.then_some("--release"))
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p qun-gateway failed");
    }
    assert!(qun.is_file(), "no {} after building it", qun.display());
    qun
}

/// The loopback floor `compare --floor` runs by default, built now: a
/// test of one target does not build the package's examples, so the one
/// there may be missing or older than this source.
fn floor_program() -> std::path::PathBuf {
    let loadtest = std::path::Path::new(env!("CARGO_BIN_EXE_qun-loadtest"));
    let release = loadtest.parent().is_some_and(|d| d.ends_with("release"));
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-p", "qun-loadtest", "--example", "loopback_floor"])
        .args(release.then_some("--release"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cargo build --example loopback_floor failed"
    );
    let floor = loadtest.with_file_name("examples").join("loopback_floor");
    assert!(floor.is_file(), "no {} after building it", floor.display());
    floor
}

/// Directories in `dir` whose name starts with `qun-compare-`.
fn compare_dirs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qun-compare-"))
        })
        .collect()
}

/// Runs `qun-loadtest compare` against the real `qun` with the runs' data
/// directories under `tmp` (as TMPDIR) and the small-run options; returns
/// its output and the comparison it wrote (`Null` if none).
fn compare(tmp: &std::path::Path, args: &[&str], scenario: &[&str]) -> (Output, serde_json::Value) {
    let json = tmp.join("comparison.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qun-loadtest"))
        .env("TMPDIR", tmp)
        .args(["--per-worker", "4", "--sources", "2", "--timeout", "60s"])
        .arg("--json")
        .arg(&json)
        .arg("compare")
        .arg("--server")
        .arg(qun_binary())
        .args(args)
        .arg("--")
        .args(scenario)
        .output()
        .unwrap();
    let comparison = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, comparison)
}

/// Runs a `compare` that must be refused before any run: it fails, writes
/// no report and leaves no run's directory. Returns its stderr.
fn compare_refused(tmp: &std::path::Path, args: &[&str], scenario: &[&str]) -> String {
    let (out, c) = compare(tmp, args, scenario);
    assert!(!out.status.success());
    assert_eq!(c, serde_json::Value::Null);
    assert_eq!(compare_dirs(tmp), Vec::<std::path::PathBuf>::new());
    stderr(&out)
}

#[test]
fn compare_runs_each_variant_on_its_own_fresh_server_in_turn() {
    // Each run's data directory goes under this TMPDIR, to look in.
    let tmp = tempfile::tempdir().unwrap();
    let (out, c) = compare(
        tmp.path(),
        &[
            "--rounds",
            "2",
            "--variant",
            "a",
            "--variant",
            "b=QUN_WORKER_THREADS=1 QUN_OUTBOX_MAX_FRAMES=512",
        ],
        &[
            "fanout",
            "--groups",
            "1",
            "--members",
            "3",
            "--rate",
            "10",
            "--duration",
            "1s",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let runs = c["runs"].as_array().unwrap();
    let order: Vec<(u64, &str)> = runs
        .iter()
        .map(|r| (r["round"].as_u64().unwrap(), r["variant"].as_str().unwrap()))
        .collect();
    // Interleaved, and the second round starts with the second variant:
    // the run going first in a round does worse, so the variants take turns.
    assert_eq!(
        order,
        [(1, "a"), (1, "b"), (2, "b"), (2, "a")],
        "interleaved, in turns"
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    for run in runs {
        let r = &run["report"];
        assert_eq!(r["scenario"], "fanout", "{r}");
        assert_eq!(r["checks"]["nothing_lost"], true, "{r}");
        assert!(r["counts"]["deliveries"].as_u64().unwrap() > 0, "{r}");
        // The server's own figures came with it: compare passed
        // --metrics-url and --server-pid to every run.
        assert!(r["counts"]["server_requests"].as_u64().unwrap() > 0, "{r}");
        assert!(r["figures"]["server_cores"].as_f64().is_some(), "{r}");
        // Each variant's environment reached its server, and only its own.
        let threads = match run["variant"].as_str().unwrap() {
            "b" => 1,
            _ => cores,
        };
        assert_eq!(
            r["params"]["server_worker_threads"],
            threads.to_string(),
            "{run}"
        );
    }
    // Every run that passed cleaned up after itself.
    assert_eq!(compare_dirs(tmp.path()), Vec::<std::path::PathBuf>::new());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("2 round(s) of 2 variant(s)"), "{table}");
    let b: Vec<&str> = table.lines().filter(|l| l.starts_with("  b ")).collect();
    assert_eq!(b.len(), 3, "two runs and the median: {table}");
    assert!(b[2].contains("median of its runs"), "{table}");
}

#[test]
fn compare_runs_the_loopback_floor_first_in_each_round_and_sets_runs_against_it() {
    let tmp = tempfile::tempdir().unwrap();
    let floor = floor_program();
    let fanout = [
        "fanout",
        "--groups",
        "2",
        "--members",
        "3",
        "--senders",
        "2",
        "--rate",
        "5",
        "--duration",
        "1s",
    ];
    let (out, c) = compare(
        tmp.path(),
        &[
            "--rounds",
            "1",
            "--variant",
            "a",
            "--floor",
            "--floor-program",
            floor.to_str().unwrap(),
            "--contend",
            "10",
        ],
        &fanout,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The competitor ran beside the runs, one thread per core, and had CPU.
    assert_eq!(c["contention"]["percent"], 10, "{c}");
    assert!(c["contention"]["threads"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["contention"]["cores"].as_f64().unwrap() > 0.0, "{c}");
    let order: Vec<&str> = c["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["floor", "a"], "{c}");
    // The floor took the fan-out's shape: 2 senders × 5 a second per group.
    assert_eq!(c["floor"]["rate"], 10.0, "{c}");
    let r = &c["runs"][0]["report"];
    assert_eq!(r["scenario"], "floor", "{r}");
    assert_eq!(r["params"]["groups"], 2, "{r}");
    assert_eq!(r["params"]["members"], 3, "{r}");
    // Its members delay their ACKs as the load generator's do by default.
    assert_eq!(r["params"]["delayed_acks"], true, "{r}");
    // About 10 frames a second to 2 × 3 members for 1 s, every one read.
    let received = r["counts"]["received"].as_u64().unwrap();
    assert!((30..=90).contains(&received), "{r}");
    assert_eq!(r["counts"]["lost"], 0, "{r}");
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{r}");
    // The cores of its writing process and of its member processes, which
    // the table sets beside the server's and the load generator's.
    for cores in ["producer_cores", "members_cores"] {
        let used = r["figures"][cores].as_f64();
        assert!(used.is_some_and(|c| c >= 0.0), "{cores}: {r}");
    }
    assert_eq!(compare_dirs(tmp.path()), Vec::<std::path::PathBuf>::new());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("× floor"), "{table}");
    assert!(table.contains("beside a competitor:"), "{table}");
    let a: Vec<&str> = table.lines().filter(|l| l.starts_with("  a ")).collect();
    assert!(
        a[0].trim_end().ends_with(|c: char| c.is_ascii_digit()),
        "a's run has its multiple of the floor: {table}"
    );
    assert!(a[1].contains("× the floor"), "{table}");
    // The floor's row has its processes' cores under "server" and "clients".
    let floor_row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("  floor "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(
        floor_row[7].parse::<f64>().is_ok() && floor_row[8].parse::<f64>().is_ok(),
        "{table}"
    );

    // A floor that is not there is refused before any server starts.
    let tmp = tempfile::tempdir().unwrap();
    let e = compare_refused(
        tmp.path(),
        &[
            "--variant",
            "a",
            "--floor",
            "--floor-program",
            "/nonexistent/loopback_floor",
        ],
        &fanout,
    );
    assert!(
        e.contains("no loopback floor at /nonexistent/loopback_floor"),
        "{e}"
    );

    // A competitor that would leave the runs no core is refused, before
    // any server starts.
    let e = compare_refused(tmp.path(), &["--variant", "a", "--contend", "95"], &fanout);
    assert!(
        e.contains("--contend takes a share of each core from 1 to 90"),
        "{e}"
    );
}

#[test]
fn compare_runs_over_quic_with_the_servers_certificate_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, c) = compare(
        tmp.path(),
        &["--transport", "quic", "--rounds", "1", "--variant", "only"],
        &["history", "--clients", "3", "--messages", "40"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(c["transport"], "quic", "{c}");
    let r = &c["runs"][0]["report"];
    assert_eq!(r["transport"], "quic", "{r}");
    assert_eq!(r["checks"]["nothing_lost"], true, "{r}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("over quic"));
}

#[test]
fn compare_names_the_variant_whose_server_would_not_start_and_keeps_its_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, c) = compare(
        tmp.path(),
        &[
            "--rounds",
            "1",
            "--variant",
            "huge=QUN_WORKER_THREADS=100000",
        ],
        &["fanout", "--duration", "1s"],
    );
    assert!(!out.status.success());
    assert_eq!(c, serde_json::Value::Null, "no comparison is written");
    let e = stderr(&out);
    assert!(e.contains("variant huge"), "{e}");
    assert!(e.contains("worker_threads must be"), "{e}");
    let kept = compare_dirs(tmp.path());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        e.contains(&kept[0].join("server.log").display().to_string()),
        "{e}"
    );
    // Options a run sets itself are refused before any server starts.
    let (out, _) = compare(
        tmp.path(),
        &["--rounds", "1", "--variant", "a"],
        &["fanout", "--url", "ws://127.0.0.1:1/ws"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("sets --url"), "{}", stderr(&out));
    assert_eq!(compare_dirs(tmp.path()).len(), 1, "no new run started");
}
