//! Fan-out over WebSocket and over QUIC, the same scenario on each.
//!
//! `cargo bench -p qun-gateway --bench fanout -- [ws|quic] [MEMBERS] [MESSAGES]`
//!
//! Starts the real server in this process (embedded store, fsync on, port
//! 0), puts MEMBERS buyers into one group over the chosen transport, and
//! has an agent post MESSAGES messages (64 in flight) as fast as acks allow.
//! Every member reads every message. Reports deliveries per second and the
//! latency from send to receipt (p50/p99/max). Client and server share
//! the machine, as they do in CI; `qun-loadtest` spreads clients over
//! processes.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use qun_client::{Client, ClientOptions, Event};
use qun_gateway::auth::TokenKey;
use qun_gateway::{Config, Listeners};
use tokio_util::sync::CancellationToken;

/// The allocator the `qun` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let transport = args.first().map_or("ws", String::as_str).to_string();
    let members: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let messages: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(&transport, members, messages));
}

async fn run(transport: &str, members: usize, messages: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ws_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        quic_listen: "127.0.0.1:0".parse().unwrap(),
        buyer_send_rate: 0.0,
        group_buyer_rate: 0.0,
        ..Config::default()
    };
    let key = TokenKey::load_or_create(dir.path()).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let ws = format!("ws://{}/ws", listeners.ws_addr().unwrap());
    let quic = format!("quic://{}", listeners.quic_addr().unwrap());
    let options = ClientOptions {
        cert_sha256: Some(listeners.quic_fingerprint().to_string()),
        event_buffer: messages + 16,
        ..ClientOptions::default()
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(qun_gateway::run(config, listeners, shutdown.clone()));
    let url = if transport == "quic" {
        quic
    } else {
        ws.clone()
    };
    let token = |user: &str, role: &str, shop: Option<&str>| {
        key.issue(
            user,
            user,
            role,
            shop,
            now_secs(),
            Duration::from_secs(3600),
        )
    };
    let agent = Client::connect(&ws, &token("agent", "agent", Some("shop-1")))
        .await
        .unwrap();
    let group = agent.create_group("Fan-out", 0).await.unwrap().group_id;

    eprintln!("connecting {members} members over {transport}...");
    let mut clients = Vec::with_capacity(members);
    for chunk in (0..members).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| {
                let (url, options) = (url.clone(), options.clone());
                let token = token(&format!("m{i}"), "buyer", None);
                tokio::spawn(async move {
                    let c = Client::connect_with(&url, &token, options).await.unwrap();
                    c.join(group).await.unwrap();
                    c
                })
            })
            .collect();
        for t in batch {
            clients.push(t.await.unwrap());
        }
        eprintln!("  {}/{members}", clients.len());
    }

    let start = Instant::now();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(messages);
                while latencies.len() < messages {
                    match c.next_event().await {
                        Some(Event::Message(m)) => {
                            let sent: u64 = m.text.parse().unwrap();
                            let now = u64::try_from(start.elapsed().as_micros()).unwrap();
                            latencies.push(now.saturating_sub(sent));
                        }
                        Some(Event::Closed { .. }) | None => panic!("connection closed"),
                        Some(_) => {}
                    }
                }
                latencies
            })
        })
        .collect();
    eprintln!("posting {messages} messages to {members} members...");
    let agent = Arc::new(agent);
    let sent = Instant::now();
    for chunk in (0..messages).collect::<Vec<_>>().chunks(64) {
        let posts: Vec<_> = chunk
            .iter()
            .map(|_| {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let at = start.elapsed().as_micros().to_string();
                    agent.send(group, &at, None).await.unwrap();
                })
            })
            .collect();
        for p in posts {
            p.await.unwrap();
        }
    }
    let mut all: Vec<u64> = Vec::with_capacity(members * messages);
    for r in readers {
        all.extend(r.await.unwrap());
    }
    let elapsed = sent.elapsed();
    all.sort_unstable();
    let at = |p: f64| Duration::from_micros(all[((all.len() - 1) as f64 * p) as usize]);
    println!(
        "fanout transport={transport} members={members} messages={messages} deliveries={} \
         elapsed={elapsed:.2?} deliveries_per_sec={:.0} latency p50={:.2?} p99={:.2?} max={:.2?}",
        all.len(),
        all.len() as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(1.0),
    );
    shutdown.cancel();
    let _ = server.await;
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
