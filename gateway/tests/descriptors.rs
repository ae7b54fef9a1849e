//! The server under a low file descriptor limit: it says how many
//! connections the limit allows, admits that many, and refuses the next one
//! cleanly instead of failing on `EMFILE`.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qun_client::Client;
use qun_gateway::auth::TokenKey;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Command;

/// The server's hard limit: 256 kept in reserve leaves 44.
const LIMIT: u64 = 300;
/// Its soft limit at start, which it raises to the hard one.
const SOFT: u64 = 200;
const ADMITTED: usize = 44;

async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in {page}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_descriptor_limit_is_reported_and_enforced_at_the_door() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    // `ulimit` in a shell that then becomes the server: no unsafe code here.
    // The soft limit (200) would allow no connection at all; the server
    // raises it to the hard limit (300) first.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn {SOFT} && ulimit -Hn {LIMIT} && exec \"$0\" serve --data-dir \"$1\" \
             --ws-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --quic-listen 127.0.0.1:0"
        ))
        .arg(env!("CARGO_BIN_EXE_qun"))
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("qun exited before listening");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .to_string()
    };
    let (ws, http) = (field("ws="), field("http="));

    let page = http_get(&http, "/metrics").await;
    assert_eq!(metric(&page, "qun_fd_limit"), LIMIT);
    assert_eq!(metric(&page, "qun_connections_limit"), ADMITTED as u64);
    assert!(metric(&page, "qun_fds_open") > 0);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut clients = Vec::new();
    for n in 0..ADMITTED {
        let token = key.issue(
            &format!("b{n}"),
            "B",
            "buyer",
            None,
            now,
            Duration::from_secs(600),
        );
        clients.push(Client::connect(&ws, &token).await.unwrap());
    }
    let token = key.issue(
        "one-too-many",
        "B",
        "buyer",
        None,
        now,
        Duration::from_secs(600),
    );
    // Refused at the door with a reason the client can act on.
    match Client::connect(&ws, &token).await {
        Err(qun_client::ClientError::ServerFull {
            retry_after,
            detail,
            ..
        }) => {
            assert!(detail.contains("HTTP 503"), "{detail}");
            assert!(
                detail.contains(&format!("server full: all {ADMITTED} connections in use")),
                "{detail}"
            );
            let wait = retry_after.expect("a wait to retry after");
            assert!((3..=8).contains(&wait.as_secs()), "{wait:?}");
        }
        Err(e) => panic!("expected a full server, got {e}"),
        Ok(_) => panic!("a connection beyond the budget must be refused"),
    }
    // A storm of refused reconnects: each is counted, few are logged, and
    // the waits they are told are spread, so they do not all come back
    // together.
    const STORM: usize = 20;
    let mut waits = std::collections::BTreeSet::new();
    for _ in 1..STORM {
        match Client::connect(&ws, &token).await {
            Err(e @ qun_client::ClientError::ServerFull { .. }) => {
                let wait = e.retry_after().expect("a wait to retry after").as_secs();
                assert!((3..=8).contains(&wait), "{wait}");
                waits.insert(wait);
            }
            Err(e) => panic!("expected a full server, got {e}"),
            Ok(_) => panic!("a connection beyond the budget must be refused"),
        }
    }
    assert_eq!(
        waits.len(),
        6,
        "every wait from 3 to 8 s was told: {waits:?}"
    );
    let page = http_get(&http, "/metrics").await;
    assert_eq!(metric(&page, "qun_connections_refused_total"), STORM as u64);
    assert_eq!(metric(&page, "qun_connections_open"), ADMITTED as u64);
    // The admitted ones still work.
    clients[0].ping().await.unwrap();
    drop(clients);

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    assert!(
        stderr.contains(&format!("allows only {ADMITTED} connections")),
        "{stderr}"
    );
    assert!(stderr.contains("ulimit -Hn"), "{stderr}");
    let logged = stderr.matches("connection limit reached").count();
    assert!(
        (1..STORM).contains(&logged),
        "{logged} log lines for {STORM} refusals (at most one a second)"
    );
    assert!(
        !stderr.contains("cannot raise"),
        "raising the soft limit to the hard one must work: {stderr}"
    );
}
