//! `qun-cli` against the real server: the interface users and scripts rely on.

#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use qun_gateway::auth::TokenKey;
use qun_gateway::{Config, Listeners};
use tokio_util::sync::CancellationToken;

fn token(key: &TokenKey, user: &str, role: &str, shop: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let name = format!("Name {user}");
    key.issue(
        user,
        &name,
        role,
        shop,
        now,
        std::time::Duration::from_secs(600),
    )
}

async fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qun-cli"))
        .arg("--url")
        .arg(url)
        .arg("--token")
        .arg(token)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_join_send_reply_history_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let (url, shutdown, server) = start_server(dir.path(), "127.0.0.1:0").await;
    let agent = token(&key, "mei", "agent", Some("shop-1"));
    let buyer = token(&key, "ann", "buyer", None);

    let group = stdout(&cli(&url, &agent, &["group", "create", "--name", "Sneaker fans"]).await);
    let group = group.trim();
    assert!(
        group.parse::<u64>().is_ok(),
        "group create prints the id alone: {group:?}"
    );
    stdout(&cli(&url, &buyer, &["join", group]).await);

    let tail = tokio::spawn({
        let (url, buyer, group) = (url.clone(), buyer.clone(), group.to_string());
        async move { cli(&url, &buyer, &["tail", &group, "--json", "--count", "2"]).await }
    });
    // Give tail time to subscribe; it only prints messages sent after it joined,
    // so keep sending until it has seen two.
    let q = stdout(&cli(&url, &buyer, &["send", group, "Is S size EU 34 or 36?"]).await);
    let q = q.trim().to_string();
    assert_eq!(q, "1", "send prints the seq alone");
    let mut last = 1;
    while !tail.is_finished() && last < 50 {
        last = stdout(
            &cli(
                &url,
                &agent,
                &["send", group, "S is EU 34.", "--reply-to", &q],
            )
            .await,
        )
        .trim()
        .parse()
        .unwrap();
    }
    let tailed = tokio::time::timeout(std::time::Duration::from_secs(30), tail)
        .await
        .expect("tail did not finish")
        .unwrap();
    let tailed = stdout(&tailed);
    let lines: Vec<serde_json::Value> = tailed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[1]["seq"].as_u64().unwrap(),
        lines[0]["seq"].as_u64().unwrap() + 1
    );

    let history = stdout(
        &cli(
            &url,
            &buyer,
            &["history", group, "--json", "--limit", "2", "--before", "3"],
        )
        .await,
    );
    let page: Vec<serde_json::Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["seq"], 1);
    assert_eq!(page[0]["sender"], "ann");
    assert_eq!(page[0]["kind"], "text");
    assert_eq!(page[0]["text"], "Is S size EU 34 or 36?");
    assert!(page[0]["ts"].as_u64().unwrap() > 0);
    assert!(page[0].get("reply_to").is_none());
    assert_eq!(page[1]["reply_to"], 1);
    assert_eq!(
        page[1]["group"].as_u64().unwrap(),
        group.parse::<u64>().unwrap()
    );

    // Errors: non-zero exit with the server's code and message.
    let refused = cli(&url, &buyer, &["send", "999", "hi"]).await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("30") && err.contains("UNKNOWN_GROUP"), "{err}");
    let forbidden = cli(&url, &buyer, &["group", "create", "--name", "x"]).await;
    assert!(String::from_utf8_lossy(&forbidden.stderr).contains("FORBIDDEN_ROLE"));
    stdout(&cli(&url, &buyer, &["leave", group]).await);
    let gone = cli(&url, &buyer, &["history", group]).await;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOT_MEMBER"));

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// A real server started by a test.
struct Started {
    /// `ws://ADDR/ws`.
    url: String,
    /// `quic://ADDR`.
    quic: String,
    /// SHA-256 of its QUIC certificate.
    pin: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), qun_gateway::ServerError>>,
}

/// Starts the real server on `ws_listen` in `dir`; returns its URL.
async fn start_server(
    dir: &std::path::Path,
    ws_listen: &str,
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), qun_gateway::ServerError>>,
) {
    let s = start(dir, ws_listen).await;
    (s.url, s.shutdown, s.server)
}

/// Starts the real server on `ws_listen` in `dir` (QUIC and HTTP on port 0).
async fn start(dir: &std::path::Path, ws_listen: &str) -> Started {
    let config = Config {
        data_dir: dir.to_path_buf(),
        ws_listen: ws_listen.parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        // The commerce test posts four promotions in one group.
        reach_base_per_day: 10,
        ..Config::default()
    };
    let listeners = Listeners::bind(&config).await.unwrap();
    let url = format!("ws://{}/ws", listeners.ws_addr().unwrap());
    let quic = format!("quic://{}", listeners.quic_addr().unwrap());
    let pin = listeners.quic_fingerprint().to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(qun_gateway::run(config, listeners, shutdown.clone()));
    Started {
        url,
        quic,
        pin,
        shutdown,
        server,
    }
}

/// A free loopback port below the kernel's ephemeral range, for a server
/// that is stopped and started again on the same port.
///
/// A port from the ephemeral range (what binding port 0 gives) can be
/// taken while the server is down: by the source port of a parallel test's
/// connection, by another server binding port 0, or by the retrying client
/// itself connecting to its own port (a TCP self-connect). Any of these
/// made the restart fail with "Address already in use" now and then.
fn port_to_restart_on() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let floor = 10_000u16.min(ephemeral_low.saturating_sub(1));
    let span = ephemeral_low.saturating_sub(floor).max(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let start = floor + (nanos % u32::from(span)) as u16;
    (start..ephemeral_low)
        .chain(floor..start)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_is_idempotent_and_retries_until_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let agent = token(&key, "mei", "agent", Some("shop-1"));
    // A port nothing listens on yet: the send must wait for the server.
    let addr = format!("127.0.0.1:{}", port_to_restart_on());
    let (url, shutdown, server) = start_server(dir.path(), &addr).await;
    let group = stdout(&cli(&url, &agent, &["group", "create", "--name", "Retry"]).await);
    let group = group.trim().to_string();
    shutdown.cancel();
    server.await.unwrap().unwrap();

    let send = tokio::spawn({
        let (url, agent, group) = (url.clone(), agent.clone(), group.clone());
        async move {
            let args = [
                "send",
                &group,
                "restock at 8",
                "--client-msg-id",
                "m-1",
                "--retries",
                "30",
            ];
            cli(&url, &agent, &args).await
        }
    });
    // The CLI is failing to connect and retrying meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_, shutdown, server) = start_server(dir.path(), &addr).await;
    let out = send.await.unwrap();
    let seq = stdout(&out);
    assert_eq!(seq.trim(), "1");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("retrying"),
        "the CLI said it retried"
    );
    // The same id again: the original seq, nothing posted.
    let again = stdout(
        &cli(
            &url,
            &agent,
            &["send", &group, "restock at 8", "--client-msg-id", "m-1"],
        )
        .await,
    );
    assert_eq!(again.trim(), "1");
    stdout(&cli(&url, &agent, &["send", &group, "second"]).await);
    stdout(&cli(&url, &agent, &["send", &group, "third"]).await);

    // tail --from resumes from a seq: 2 and 3 from history, then live.
    let tail = tokio::spawn({
        let (url, agent, group) = (url.clone(), agent.clone(), group.clone());
        async move {
            cli(
                &url,
                &agent,
                &["tail", &group, "--from", "2", "--json", "--count", "3"],
            )
            .await
        }
    });
    let mut printed = None;
    for n in 0..100 {
        if tail.is_finished() {
            printed = Some(tail.await.unwrap());
            break;
        }
        stdout(&cli(&url, &agent, &["send", &group, &format!("live {n}")]).await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let printed = stdout(&printed.expect("tail never printed three messages"));
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4]);
    assert_eq!(lines[0]["text"], "second");
    assert_eq!(lines[2]["text"], "live 0");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_group_buy_coupon_and_poll_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let (url, shutdown, server) = start_server(dir.path(), "127.0.0.1:0").await;
    let agent = token(&key, "mei", "agent", Some("shop-1"));
    let fans: Vec<String> = (1..=3)
        .map(|i| token(&key, &format!("fan{i}"), "buyer", None))
        .collect();
    let group = stdout(&cli(&url, &agent, &["group", "create", "--name", "Launch"]).await)
        .trim()
        .to_string();
    for fan in &fans {
        stdout(&cli(&url, fan, &["join", &group]).await);
    }
    let seq = stdout(
        &cli(
            &url,
            &agent,
            &[
                "card",
                "post",
                &group,
                "--product",
                "sku-1",
                "--title",
                "Phone X",
                "--price",
                "599900",
                "--member-price",
                "579900",
                "--stock",
                "500",
            ],
        )
        .await,
    );
    assert!(seq.trim().parse::<u64>().is_ok(), "{seq:?}");
    let id = stdout(
        &cli(
            &url,
            &agent,
            &[
                "groupbuy",
                "start",
                &group,
                "--product",
                "sku-1",
                "--price",
                "499900",
                "--target",
                "2",
                "--slots",
                "2",
                "--ends-in",
                "10m",
            ],
        )
        .await,
    );
    let id = id.trim();
    assert!(id.parse::<u64>().is_ok(), "the id alone: {id:?}");
    let join_args = ["groupbuy", "join", group.as_str(), id];
    let join = |fan: usize| cli(&url, &fans[fan], &join_args);
    assert_eq!(stdout(&join(0).await), "joined\n");
    assert_eq!(stdout(&join(0).await), "already-joined\n");
    assert_eq!(stdout(&join(1).await), "joined\n");
    assert_eq!(stdout(&join(2).await), "sold-out\n");
    let shown = stdout(&cli(&url, &agent, &["groupbuy", "show", &group, id, "--json"]).await);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["state"], "sold_out");
    assert_eq!(
        (shown["joined"].as_u64(), shown["slots"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(shown["deadline_ms"].as_u64().unwrap() > shown["server_time_ms"].as_u64().unwrap());

    // A buyer posting a card: a clear error and a failing exit.
    let refused = cli(
        &url,
        &fans[0],
        &[
            "card",
            "post",
            &group,
            "--product",
            "x",
            "--title",
            "x",
            "--price",
            "1",
        ],
    )
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("FORBIDDEN_ROLE"));
    let negative = cli(
        &url,
        &agent,
        &[
            "card",
            "post",
            &group,
            "--product",
            "x",
            "--title",
            "x",
            "--price",
            "-5",
        ],
    )
    .await;
    assert!(String::from_utf8_lossy(&negative.stderr).contains("INVALID_ARGUMENT"));

    let coupon = stdout(
        &cli(
            &url,
            &agent,
            &[
                "coupon",
                "issue",
                &group,
                "--title",
                "20 off",
                "--amount",
                "2000",
                "--quantity",
                "1",
                "--expires-in",
                "1h",
            ],
        )
        .await,
    );
    let coupon = coupon.trim();
    let claim_args = ["coupon", "claim", group.as_str(), coupon];
    let claim = |fan: usize| cli(&url, &fans[fan], &claim_args);
    assert_eq!(stdout(&claim(0).await), "claimed\n");
    assert_eq!(stdout(&claim(0).await), "limit-reached\n");
    assert_eq!(stdout(&claim(1).await), "exhausted\n");

    let poll = stdout(
        &cli(
            &url,
            &agent,
            &[
                "poll",
                "open",
                &group,
                "--question",
                "Next colour?",
                "--option",
                "red",
                "--option",
                "blue",
                "--ends-in",
                "1d",
            ],
        )
        .await,
    );
    let poll = poll.trim();
    assert_eq!(
        stdout(&cli(&url, &fans[0], &["poll", "vote", &group, poll, "1"]).await),
        "voted\n"
    );
    let tally = stdout(&cli(&url, &agent, &["poll", "show", &group, poll, "--json"]).await);
    let tally: serde_json::Value = serde_json::from_str(&tally).unwrap();
    assert_eq!(tally["options"][1]["votes"], 1);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_quic_with_a_pinned_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let Started {
        quic,
        pin,
        shutdown,
        server,
        ..
    } = start(dir.path(), "127.0.0.1:0").await;
    let agent = token(&key, "mei", "agent", Some("shop-1"));
    let over_quic = |args: &[&str]| {
        let mut all = vec!["--cert-fingerprint", pin.as_str()];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(String::from).collect();
        let quic = quic.clone();
        let agent = agent.clone();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            cli(&quic, &agent, &args).await
        }
    };
    let group = stdout(&over_quic(&["group", "create", "--name", "Over QUIC"]).await);
    let group = group.trim();
    let seq = stdout(&over_quic(&["send", group, "hello over quic"]).await);
    assert_eq!(seq.trim(), "1");
    let page = stdout(&over_quic(&["history", group, "--json"]).await);
    assert!(page.contains("hello over quic"), "{page}");
    // Without a pin, a clear refusal that says what to pass.
    let unpinned = cli(&quic, &agent, &["history", group]).await;
    assert!(!unpinned.status.success());
    assert!(
        String::from_utf8_lossy(&unpinned.stderr).contains("--cert-fingerprint"),
        "{}",
        String::from_utf8_lossy(&unpinned.stderr)
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// A running server in a temporary folder and an agent of shop-1: where
/// most tests of a merchant feature start.
struct Shop {
    _dir: tempfile::TempDir,
    key: TokenKey,
    url: String,
    agent: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), qun_gateway::ServerError>>,
}

impl Shop {
    async fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = TokenKey::load_or_create(dir.path()).unwrap();
        let (url, shutdown, server) = start_server(dir.path(), "127.0.0.1:0").await;
        let agent = token(&key, "mei", "agent", Some("shop-1"));
        Self {
            _dir: dir,
            key,
            url,
            agent,
            shutdown,
            server,
        }
    }

    fn buyer(&self, user: &str) -> String {
        token(&self.key, user, "buyer", None)
    }

    /// `qun-cli` as `token`, which must succeed: its stdout, trimmed.
    async fn ok(&self, token: &str, args: &[&str]) -> String {
        stdout(&cli(&self.url, token, args).await)
            .trim()
            .to_string()
    }

    /// `qun-cli` as `token`, which must fail: its stderr.
    async fn refused(&self, token: &str, args: &[&str]) -> String {
        let out = cli(&self.url, token, args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A new group of shop-1, created by the agent.
    async fn group(&self, name: &str) -> String {
        self.ok(&self.agent, &["group", "create", "--name", name])
            .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_report_and_muted_promotions_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, fan) = (shop.agent.clone(), shop.buyer("fan"));
    let group = shop.group("Quiet").await;
    shop.ok(&fan, &["join", &group]).await;
    assert_eq!(
        shop.ok(&fan, &["promotions", "mute", &group]).await,
        "muted"
    );
    let card = shop
        .ok(
            &agent,
            &[
                "card",
                "post",
                &group,
                "--product",
                "sku-1",
                "--title",
                "Phone",
                "--price",
                "100",
            ],
        )
        .await;
    shop.ok(&agent, &["send", &group, "Ask me anything"]).await;
    let history = shop.ok(&fan, &["history", &group, "--json"]).await;
    let kinds: Vec<String> = history
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
        .collect();
    assert_eq!(kinds, ["\"hidden\"", "\"text\""], "{history}");
    assert_eq!(
        shop.ok(&fan, &["report", &group, &card, "--reason", "spam"])
            .await,
        "reported"
    );
    let quota = shop.ok(&agent, &["quota", "show", &group, "--json"]).await;
    let q: serde_json::Value = serde_json::from_str(&quota).unwrap();
    assert_eq!(
        (
            q["used"].as_u64(),
            q["negative"].as_u64(),
            q["base"].as_u64()
        ),
        (Some(1), Some(2), Some(10)),
        "one card; a mute and a report: {q}"
    );
    let refused = shop.refused(&fan, &["quota", "show", &group]).await;
    assert!(refused.contains("FORBIDDEN_ROLE"), "{refused}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_recall_and_remove_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, troll) = (shop.agent.clone(), shop.buyer("troll"));
    let group = shop.group("Calm").await;
    shop.ok(&troll, &["join", &group]).await;
    let spam = shop.ok(&troll, &["send", &group, "spam spam"]).await;
    let recall = shop.ok(&agent, &["recall", &group, &spam]).await;
    assert!(recall.parse::<u64>().is_ok(), "{recall:?}");
    assert_eq!(
        shop.ok(&agent, &["mute", &group, "troll", "--for", "10m"])
            .await,
        "muted"
    );
    let refused = shop
        .refused(&troll, &["send", &group, "more spam", "--retries", "0"])
        .await;
    assert!(refused.contains("MUTED"), "{refused}");
    let history = shop.ok(&agent, &["history", &group]).await;
    assert!(history.contains("(recalled)"), "{history}");
    assert!(history.contains(&format!("recalled #{spam}")), "{history}");
    assert_eq!(
        shop.ok(&agent, &["remove", &group, "troll", "--ban", "1d"])
            .await,
        "removed"
    );
    assert!(
        shop.refused(&troll, &["join", &group])
            .await
            .contains("BANNED")
    );
    assert_eq!(shop.ok(&agent, &["mute-all", &group]).await, "buyers muted");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faq_and_pins_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, fan) = (shop.agent.clone(), shop.buyer("fan"));
    let group = shop.group("Sizes").await;
    shop.ok(&fan, &["join", &group]).await;
    let q = shop.ok(&fan, &["send", &group, "S = EU 34?"]).await;
    let a = shop
        .ok(&agent, &["send", &group, "Yes, EU 34.", "--reply-to", &q])
        .await;
    let promoted = shop.ok(&agent, &["faq", "promote", &group, &q, &a]).await;
    assert!(
        promoted.contains("FAQ 1: Q: S = EU 34? / A: Yes, EU 34."),
        "{promoted}"
    );
    shop.ok(&agent, &["pin", &group, "--faq", "1"]).await;
    let listed = shop.ok(&fan, &["faq", "list", &group, "--json"]).await;
    let board: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(board["pins"], serde_json::json!([{"faq_id": 1}]), "{board}");
    assert_eq!(board["entries"][0]["answer"], "Yes, EU 34.");
    let refused = shop.refused(&fan, &["pin", &group, "--message", &a]).await;
    assert!(refused.contains("FORBIDDEN_ROLE"), "{refused}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoreply_rules_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, fan) = (shop.agent.clone(), shop.buyer("fan"));
    let set = shop
        .ok(
            &agent,
            &[
                "autoreply",
                "set",
                "ship",
                "--keyword",
                "ship",
                "--keyword",
                "macau",
                "--answer",
                "Yes, in 3 days.",
                "--cooldown",
                "1m",
            ],
        )
        .await;
    assert!(
        set.contains("ship: keywords [\"ship\", \"macau\"]"),
        "{set}"
    );
    let group = shop.group("Ship").await;
    shop.ok(&fan, &["join", &group]).await;
    shop.ok(&fan, &["send", &group, "Do you ship to Macau?"])
        .await;
    let history = shop.ok(&fan, &["history", &group]).await;
    assert!(history.contains("Shop assistant (bot)"), "{history}");
    assert!(history.contains("Yes, in 3 days."), "{history}");
    let bad = shop
        .refused(
            &agent,
            &["autoreply", "set", "x", "--pattern", "(", "--answer", "y"],
        )
        .await;
    assert!(bad.contains("INVALID_ARGUMENT"), "{bad}");
    let left = shop.ok(&agent, &["autoreply", "remove", "ship"]).await;
    assert!(left.is_empty(), "{left}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, fan) = (shop.agent.clone(), shop.buyer("fan"));
    let group = shop.group("VIP").await;
    assert_eq!(
        shop.ok(&agent, &["policy", &group, "approval"]).await,
        "approval"
    );
    let pending = shop.refused(&fan, &["join", &group]).await;
    assert!(pending.contains("JOIN_PENDING"), "{pending}");
    let listed = shop.ok(&agent, &["requests", &group]).await;
    assert!(listed.starts_with("fan ("), "{listed}");
    assert_eq!(
        shop.ok(&agent, &["approve", &group, "fan"]).await,
        "approved"
    );
    shop.ok(&fan, &["send", &group, "in!"]).await;
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_a_threshold_group_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, fan) = (shop.agent.clone(), shop.buyer("fan"));
    let group = shop.group("Small sizes").await;
    shop.ok(&agent, &["policy", &group, "threshold", "--expr", "size:s"])
        .await;
    let refused = shop.refused(&fan, &["join", &group]).await;
    assert!(refused.contains("NOT_ELIGIBLE"), "{refused}");
    assert_eq!(
        shop.ok(
            &agent,
            &["tag", "fan", "--add", "size:s", "--add", "orders:2"]
        )
        .await,
        "fan [orders:2 size:s] tier regular"
    );
    shop.ok(&fan, &["join", &group]).await;
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_pushes_schedules_and_the_tag_pool_from_the_command_line() {
    let shop = Shop::open().await;
    let (agent, vip, fan) = (shop.agent.clone(), shop.buyer("vip"), shop.buyer("fan"));
    let group = shop.group("Drops").await;
    shop.ok(&vip, &["join", &group]).await;
    shop.ok(&fan, &["join", &group]).await;
    shop.ok(&agent, &["tag", "vip", "--add", "vip"]).await;
    assert_eq!(
        shop.ok(
            &agent,
            &["push", &group, "--text", "VIP preview", "--tags", "vip"]
        )
        .await,
        "1 to 1 buyers"
    );
    let fan_sees = shop.ok(&fan, &["history", &group]).await;
    assert!(
        fan_sees.contains("#1 (a promotion not shown to you)"),
        "{fan_sees}"
    );
    assert!(!fan_sees.contains("VIP preview"), "{fan_sees}");
    let vip_sees = shop.ok(&vip, &["history", &group]).await;
    assert!(
        vip_sees.contains("[Announcement] VIP preview"),
        "{vip_sees}"
    );
    let refused = shop
        .refused(
            &agent,
            &["push", &group, "--text", "x", "--tags", "size:xl"],
        )
        .await;
    assert!(refused.contains("NOT_ELIGIBLE"), "{refused}");

    let id = shop
        .ok(
            &agent,
            &[
                "schedule",
                "add",
                &group,
                "--text",
                "Monday drop",
                "--in",
                "1h",
                "--every",
                "7d",
            ],
        )
        .await;
    let listed = shop.ok(&agent, &["schedule", "list", &group]).await;
    assert!(
        listed.starts_with(&format!("{id} announcement \"Monday drop\" to everyone")),
        "{listed}"
    );
    assert!(listed.contains("every 604800000 ms; fired 0"), "{listed}");
    let refused = shop
        .refused(
            &agent,
            &[
                "schedule", "add", &group, "--text", "x", "--in", "1h", "--every", "1m",
            ],
        )
        .await;
    assert!(refused.contains("INVALID_ARGUMENT"), "{refused}");
    assert_eq!(
        shop.ok(&agent, &["schedule", "cancel", &group, &id]).await,
        "cancelled"
    );
    assert_eq!(shop.ok(&agent, &["schedule", "list", &group]).await, "");

    let pool = shop.ok(&fan, &["tag-pool"]).await;
    assert!(pool.starts_with("size: size:xxs size:xs size:s"), "{pool}");
    shop.stop().await;
}

/// `qun-cli` as `token` left running: its stdout, line by line.
fn spawn_cli(
    url: &str,
    token: &str,
    args: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_qun-cli"))
        .arg("--url")
        .arg(url)
        .arg("--token")
        .arg(token)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .expect("no line within 10 s")
        .unwrap()
        .expect("the command ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_customer_service_from_the_command_line() {
    let shop = Shop::open().await;
    let (mei, fan) = (shop.agent.clone(), shop.buyer("fan"));
    let lin = token(&shop.key, "lin", "agent", Some("shop-1"));
    shop.ok(&mei, &["tag", "fan", "--add", "vip"]).await;
    let refused = shop
        .refused(&shop.buyer("newbie"), &["cs", "open", "shop-1"])
        .await;
    assert!(refused.contains("NOT_ELIGIBLE"), "{refused}");

    // Mei goes online and watches for sessions.
    let (mut mei_console, mut mei_out) = spawn_cli(
        &shop.url,
        &mei,
        &["cs", "presence", "online", "--count", "2"],
    );
    assert_eq!(next_line(&mut mei_out).await, "online");
    let opened = shop.ok(&fan, &["cs", "open", "shop-1"]).await;
    let session = opened
        .strip_prefix("session ")
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .to_string();
    assert_eq!(
        opened,
        format!("session {session} of fan with shop-1: open with mei")
    );
    let assigned = next_line(&mut mei_out).await;
    assert!(
        assigned.contains("open with mei [tier vip; tags vip;"),
        "{assigned}"
    );
    assert_eq!(
        shop.ok(&fan, &["cs", "send", &session, "Is S back?"]).await,
        "1"
    );
    assert_eq!(
        shop.ok(
            &mei,
            &["cs", "tail", &session, "--from", "1", "--count", "1"]
        )
        .await,
        "#1 Name fan (fan): Is S back?"
    );

    // Lin comes online; mei hands the session over with a note.
    let (mut lin_console, mut lin_out) = spawn_cli(
        &shop.url,
        &lin,
        &["cs", "presence", "online", "--count", "2"],
    );
    assert_eq!(next_line(&mut lin_out).await, "online");
    let moved = shop
        .ok(
            &mei,
            &["cs", "transfer", &session, "lin", "--note", "wants S"],
        )
        .await;
    assert!(moved.ends_with("open with lin"), "{moved}");
    assert!(next_line(&mut lin_out).await.contains("note: wants S"));
    assert!(next_line(&mut mei_out).await.contains("open with lin"));
    mei_console.wait().await.unwrap();
    let queue = shop.ok(&mei, &["cs", "queue"]).await;
    assert!(queue.contains("agent lin online: 1/5 sessions"), "{queue}");
    assert!(
        shop.ok(&fan, &["cs", "close", &session])
            .await
            .ends_with("closed")
    );
    assert!(next_line(&mut lin_out).await.contains(": closed"));
    lin_console.wait().await.unwrap();
    assert_eq!(shop.ok(&fan, &["cs", "block", "shop-1"]).await, "blocked");
    let refused = shop.refused(&mei, &["cs", "open", "--buyer", "fan"]).await;
    assert!(
        refused.contains("INVALID_ARGUMENT"),
        "not mei's buyer: {refused}"
    );
    shop.stop().await;
}
