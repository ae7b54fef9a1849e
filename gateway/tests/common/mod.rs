//! The test server and helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qun_client::{Client, ClientError, ClientOptions, Event};
use qun_gateway::auth::{Claims, TokenKey};
use qun_gateway::{Config, Listeners};
use qun_proto::{ErrorCode, v1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub url: String,
    /// `quic://ADDR` of the same server.
    pub quic_url: String,
    /// SHA-256 of its (development) QUIC certificate.
    pub cert_sha256: String,
    pub http: SocketAddr,
    pub key: TokenKey,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), qun_gateway::ServerError>>,
}

/// A config tweak: no buyer rate limits, for tests about something else.
pub fn no_rate_limits(c: &mut Config) {
    c.buyer_send_rate = 0.0;
    c.group_buyer_rate = 0.0;
}

impl TestServer {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, |_| {}).await
    }

    pub async fn start_with(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            data_dir: data_dir.to_path_buf(),
            ws_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            quic_listen: "127.0.0.1:0".parse().unwrap(),
            // More partitions than this machine's cores, fixed, so that
            // every test's shops spread over several whatever runs it.
            store_partitions: 3,
            ..Config::default()
        };
        tweak(&mut config);
        let key = TokenKey::load_or_create(data_dir).unwrap();
        let listeners = Listeners::bind(&config).await.unwrap();
        let url = format!("ws://{}/ws", listeners.ws_addr().unwrap());
        let http = listeners.http_addr().unwrap();
        let quic_url = format!("quic://{}", listeners.quic_addr().unwrap());
        let cert_sha256 = listeners.quic_fingerprint().to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(qun_gateway::run(config, listeners, shutdown.clone()));
        Self {
            url,
            quic_url,
            cert_sha256,
            http,
            key,
            shutdown,
            task,
        }
    }

    pub fn token(&self, user: &str, role: &str, shop: Option<&str>) -> String {
        self.token_expiring(user, role, shop, now_secs() + 3600)
    }

    pub fn token_expiring(&self, user: &str, role: &str, shop: Option<&str>, exp: u64) -> String {
        self.key.sign(&Claims {
            sub: user.into(),
            name: format!("{role} {user}"),
            role: role.into(),
            shop: shop.map(Into::into),
            exp,
            iat: now_secs(),
        })
    }

    pub async fn client(&self, user: &str, role: &str, shop: Option<&str>) -> Client {
        Client::connect(&self.url, &self.token(user, role, shop))
            .await
            .unwrap()
    }

    pub async fn client_with(
        &self,
        user: &str,
        role: &str,
        shop: Option<&str>,
        options: ClientOptions,
    ) -> Client {
        Client::connect_with(&self.url, &self.token(user, role, shop), options)
            .await
            .unwrap()
    }

    /// A client over QUIC, pinning the server's certificate.
    pub async fn quic_client(&self, user: &str, role: &str, shop: Option<&str>) -> Client {
        Client::connect_with(
            &self.quic_url,
            &self.token(user, role, shop),
            self.quic_options(),
        )
        .await
        .unwrap()
    }

    /// Client options that pin this server's QUIC certificate.
    pub fn quic_options(&self) -> ClientOptions {
        ClientOptions {
            cert_sha256: Some(self.cert_sha256.clone()),
            ..ClientOptions::default()
        }
    }

    /// One metric's value from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let page = self.http_get("/metrics").await;
        page.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// An agent of shop-1 connected, with a new group of that shop.
    pub async fn agent_with_group(&self, name: &str, max_members: u32) -> (Client, u64) {
        let agent = self.client("mei", "agent", Some("shop-1")).await;
        let g = agent
            .create_group(name, max_members)
            .await
            .unwrap()
            .group_id;
        (agent, g)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// One HTTP request with an optional bearer token and JSON body;
    /// returns the status and the body parsed as JSON.
    pub async fn http_json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (status, _, json) = self.http_full(method, path, token, body).await;
        (status, json)
    }

    /// As [`TestServer::http_json`], with the response's header block too.
    pub async fn http_full(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, String, serde_json::Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {out:?}"));
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        (status, head.to_string(), json)
    }

    pub async fn http_get(&self, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The next `n` pushed messages (fails after 10 s of silence).
pub async fn messages(client: &mut Client, n: usize) -> Vec<v1::ChatMessage> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
            .await
            .expect("no push within 10 s")
            .expect("connection ended");
        match event {
            Event::Message(m) => out.push(m),
            other => panic!("unexpected event {other:?}"),
        }
    }
    out
}

pub async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(Duration::from_secs(10), client.next_event())
        .await
        .expect("no event within 10 s")
        .expect("connection ended")
}

pub fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    r.unwrap_err().code().expect("a server error code")
}
