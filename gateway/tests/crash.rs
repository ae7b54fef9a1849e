//! Crash durability: the real `qun` binary is killed with SIGKILL while
//! senders post, then restarted on the same data dir, again and again.
//!
//! After every cycle: every acknowledged message is in history at its seq,
//! seqs are gap-free, every message was posted once (retries of unacked
//! sends reuse their client message id), and no seq was ever shown to a
//! subscriber with two different contents.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qun_client::{Client, ClientOptions, Event};
use qun_gateway::auth::TokenKey;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

const SENDERS: usize = 3;

/// The `qun` binary running on a data dir, killed when dropped.
struct Qun {
    child: Child,
    url: String,
}

impl Qun {
    async fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qun"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--ws-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--quic-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("qun printed nothing in 30 s")
            .unwrap()
            .expect("qun exited before listening");
        let url = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("ws="))
            .unwrap_or_else(|| panic!("no ws= in {line:?}"))
            .to_string();
        Self { child, url }
    }

    /// SIGKILL: no shutdown, no flush.
    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn token(key: &TokenKey, user: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    key.issue(
        user,
        user,
        "agent",
        Some("shop-1"),
        now,
        Duration::from_secs(3600),
    )
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

/// What the test knows, across cycles.
#[derive(Default)]
struct Ledger {
    /// Acknowledged: text → seq.
    acked: HashMap<String, u64>,
    /// Sent but not acknowledged when the server died: (id, text).
    unacked: Vec<(String, String)>,
    /// Every message a subscriber was shown: seq → text.
    shown: BTreeMap<u64, String>,
}

impl Ledger {
    fn show(&mut self, seq: u64, text: String) {
        if let Some(before) = self.shown.insert(seq, text.clone()) {
            assert_eq!(before, text, "seq {seq} was shown with two contents");
        }
    }
}

/// One sender: retries what it has unacknowledged with the same ids, then
/// posts new messages until the connection dies.
async fn sender(url: String, token: String, g: u64, who: usize, ledger: Arc<Mutex<Ledger>>) {
    let Ok(client) = Client::connect(&url, &token).await else {
        return;
    };
    let mut next = ledger.lock().unwrap().acked.len() * SENDERS + who;
    loop {
        let retry = {
            let mut l = ledger.lock().unwrap();
            let mine = l
                .unacked
                .iter()
                .position(|(id, _)| id.starts_with(&format!("s{who}-")));
            mine.map(|i| l.unacked.swap_remove(i))
        };
        let (id, text) = retry.unwrap_or_else(|| {
            next += SENDERS;
            let id = format!("s{who}-{next}-{}", random_below(1 << 40));
            let text = format!("message {id}");
            (id, text)
        });
        match client.send_with_id(g, &text, None, &id).await {
            Ok(ack) => {
                let mut l = ledger.lock().unwrap();
                if let Some(seq) = l.acked.insert(text.clone(), ack.seq) {
                    assert_eq!(seq, ack.seq, "a retry of {id} got another seq");
                }
            }
            Err(_) => {
                ledger.lock().unwrap().unacked.push((id, text));
                return;
            }
        }
    }
}

/// The subscriber: resumes from where it was and records what it is shown.
async fn watcher(
    url: String,
    token: String,
    cursors: Vec<(u64, u64)>,
    ledger: Arc<Mutex<Ledger>>,
) -> Vec<(u64, u64)> {
    let options = ClientOptions {
        heartbeat: None,
        ..ClientOptions::default()
    };
    let Ok(mut client) = Client::connect_with(&url, &token, options).await else {
        return cursors;
    };
    if client.resume(&cursors).await.is_err() {
        return cursors;
    }
    while let Some(event) = client.next_event().await {
        match event {
            Event::Message(m) => ledger.lock().unwrap().show(m.seq, m.text),
            Event::Gap {
                group_id,
                after_seq,
                through_seq,
            } => {
                let mut after = after_seq;
                while after < through_seq {
                    let Ok(page) = client.fetch_range(group_id, after, 200).await else {
                        return client.cursors();
                    };
                    let Some(last) = page.messages.last().map(|m| m.seq) else {
                        break;
                    };
                    for m in page.messages {
                        ledger.lock().unwrap().show(m.seq, m.text);
                    }
                    after = last;
                }
            }
            Event::Closed { .. } => break,
            _ => {}
        }
    }
    client.cursors()
}

async fn crash_cycles(cycles: usize) {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut qun = Qun::start(dir.path()).await;
    let g = {
        let agent = Client::connect(&qun.url, &token(&key, "mei"))
            .await
            .unwrap();
        let g = agent.create_group("Crash", 0).await.unwrap().group_id;
        for who in 0..SENDERS {
            let c = Client::connect(&qun.url, &token(&key, &format!("a{who}")))
                .await
                .unwrap();
            c.join(g).await.unwrap();
        }
        let w = Client::connect(&qun.url, &token(&key, "watcher"))
            .await
            .unwrap();
        w.join(g).await.unwrap();
        g
    };
    let mut cursors = vec![(g, 0)];
    for cycle in 0..cycles {
        let watch = tokio::spawn(watcher(
            qun.url.clone(),
            token(&key, "watcher"),
            cursors.clone(),
            ledger.clone(),
        ));
        let senders: Vec<_> = (0..SENDERS)
            .map(|who| {
                tokio::spawn(sender(
                    qun.url.clone(),
                    token(&key, &format!("a{who}")),
                    g,
                    who,
                    ledger.clone(),
                ))
            })
            .collect();
        // Let them run, then kill at a random moment.
        tokio::time::sleep(Duration::from_millis(150 + random_below(400))).await;
        qun.kill().await;
        for s in senders {
            s.await.unwrap();
        }
        cursors = watch.await.unwrap();
        qun = Qun::start(dir.path()).await;
        check(&qun, &key, g, &ledger, cycle).await;
    }
    // A last round with nothing killed: every unacked send is retried and
    // acknowledged once.
    let senders: Vec<_> = (0..SENDERS)
        .map(|who| {
            let (url, token, ledger) = (
                qun.url.clone(),
                token(&key, &format!("a{who}")),
                ledger.clone(),
            );
            tokio::spawn(async move {
                let client = Client::connect(&url, &token).await.unwrap();
                let mine: Vec<_> = {
                    let mut l = ledger.lock().unwrap();
                    let (mine, rest) =
                        l.unacked.drain(..).partition(|(id, _): &(String, String)| {
                            id.starts_with(&format!("s{who}-"))
                        });
                    l.unacked = rest;
                    mine
                };
                for (id, text) in mine {
                    let ack = client.send_with_id(g, &text, None, &id).await.unwrap();
                    ledger.lock().unwrap().acked.insert(text, ack.seq);
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    check(&qun, &key, g, &ledger, cycles).await;
    let acked = ledger.lock().unwrap().acked.len();
    assert!(acked > 0, "nothing was ever acknowledged");
    qun.kill().await;
}

/// History against the ledger.
async fn check(qun: &Qun, key: &TokenKey, g: u64, ledger: &Arc<Mutex<Ledger>>, cycle: usize) {
    let reader = Client::connect(&qun.url, &token(key, "watcher"))
        .await
        .unwrap();
    let mut history = Vec::new();
    loop {
        let after = history
            .last()
            .map_or(0, |m: &qun_client::proto::ChatMessage| m.seq);
        let page = reader.fetch_range(g, after, 200).await.unwrap();
        let more = page.has_more;
        history.extend(page.messages);
        if !more {
            break;
        }
    }
    let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "cycle {cycle}: seqs are not gap-free"
    );
    let mut by_text = HashMap::new();
    for m in &history {
        assert!(
            by_text.insert(m.text.clone(), m.seq).is_none(),
            "cycle {cycle}: {:?} was posted twice",
            m.text
        );
    }
    let l = ledger.lock().unwrap();
    for (text, seq) in &l.acked {
        assert_eq!(
            by_text.get(text),
            Some(seq),
            "cycle {cycle}: acknowledged {text:?} is not in history at {seq}"
        );
    }
    for (seq, text) in &l.shown {
        let stored = history.get((*seq - 1) as usize).map(|m| &m.text);
        assert_eq!(
            stored,
            Some(text),
            "cycle {cycle}: seq {seq} was shown as {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    crash_cycles(3).await;
}

/// The long version: `cargo test -p qun-gateway --test crash -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 40 kill cycles"]
async fn acknowledged_messages_survive_sigkill_soak() {
    crash_cycles(40).await;
}
