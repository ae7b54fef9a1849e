//! The server's configuration: one typed struct, read from a TOML file, then
//! `QUN_*` environment variables, then command-line flags (each overriding
//! the one before).
//!
//! `docs/qun.example.toml` lists every field with its default; a test keeps
//! it in step with [`Config::default`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most runtime worker threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

/// Longest `store_commit_window_us`: 10 ms, a fifth of the fan-out's
/// latency target, added to every send of a busy shop.
pub const MAX_STORE_COMMIT_WINDOW_US: u64 = 10_000;

/// Everything `qun serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Folder of the embedded store and the generated token key.
    pub data_dir: PathBuf,
    /// Address of the WebSocket listener (path `/ws`).
    pub ws_listen: SocketAddr,
    /// Address of the HTTP listener (`/healthz`, `/metrics`, merchant API).
    pub http_listen: SocketAddr,
    /// Address of the QUIC listener (UDP, ALPN `qun/1`).
    pub quic_listen: SocketAddr,
    /// PEM certificate chain for QUIC; empty: a self-signed development
    /// certificate in the data dir (created on first start).
    pub quic_cert: String,
    /// PEM private key of `quic_cert`.
    pub quic_key: String,
    /// Largest client frame accepted, in bytes. Larger frames are answered
    /// with `FRAME_TOO_LARGE` and the connection is closed.
    pub max_frame_bytes: usize,
    /// Most pushed frames queued for one connection before it is marked out
    /// of sync.
    pub outbox_max_frames: usize,
    /// Most pushed bytes queued for one connection before it is marked out
    /// of sync.
    pub outbox_max_bytes: usize,
    /// Requests of one connection waiting for durability at once; beyond it
    /// the server stops reading that connection until one completes.
    pub max_in_flight: usize,
    /// Most simultaneous connections; more are refused at the handshake.
    pub max_connections: usize,
    /// Milliseconds a new connection has to send its `Hello`.
    pub hello_timeout_ms: u64,
    /// Milliseconds shutdown waits for connections to close and the store
    /// to flush.
    pub shutdown_grace_ms: u64,
    /// Hint, in milliseconds, sent to clients on shutdown: reconnect after this.
    pub reconnect_hint_ms: u32,
    /// Hex-encoded HMAC-SHA256 key (at least 32 bytes) that signs tokens.
    /// Empty: use `<data_dir>/token.key`, generated on first start.
    pub token_key: String,
    /// fsync the store's journal at every group commit. Turning it off keeps
    /// data safe from a process crash but not from a power loss.
    pub fsync: bool,
    /// Partitions of a new embedded data folder, each with its own journal
    /// and writer thread (1 to 64; 0: one per core). A folder keeps the
    /// count it was created with.
    pub store_partitions: usize,
    /// How long, in microseconds, a busy store writer lets a group commit
    /// gather more sends before its fsync (embedded store; 0 to
    /// [`MAX_STORE_COMMIT_WINDOW_US`]; 0: never wait). Only a writer that
    /// finds several sends waiting waits; an idle one commits at once.
    pub store_commit_window_us: u64,
    /// The nice value of the embedded store's writer threads (Linux, -20 to
    /// 19; 0: as started). Below 0 (default -10) a writer woken by its fsync
    /// gets a core before the connections' work; it needs `CAP_SYS_NICE`
    /// or a `RLIMIT_NICE` that allows it, and without them the server
    /// logs a warning and runs on.
    pub store_writer_nice: i32,
    /// Threads that run connections, requests and fan-out (the async
    /// runtime's workers), 1 to [`MAX_WORKER_THREADS`]; 0: one per core.
    /// On a machine shared with other busy processes fewer than the cores
    /// can deliver sooner (docs/benchmarks.md, "ninth stop").
    pub worker_threads: usize,
    /// `max_members` of a group created without one.
    pub default_max_members: u32,
    /// Largest `max_members` a group may have.
    pub max_members_limit: u32,
    /// Newest messages kept in memory per group.
    pub recent_ring: usize,
    /// Largest gap (in messages) a `Resume` fills by push; a larger one is
    /// answered `gap_too_large` and the client pages history instead.
    pub resume_max_gap: u64,
    /// Client message ids remembered in memory per group for idempotent
    /// sends; older retries are found in the store's index.
    pub sent_window: usize,
    /// Messages per second one buyer may send, across groups and devices
    /// (0: unlimited). Staff are never limited.
    pub buyer_send_rate: f64,
    /// Messages a quiet buyer may send at once.
    pub buyer_send_burst: u32,
    /// Slow mode: messages per second all buyers of one group may send
    /// together (0: unlimited).
    pub group_buyer_rate: f64,
    /// Messages the buyers of a quiet group may send at once.
    pub group_buyer_burst: u32,
    /// Milliseconds without any frame from a client before the server closes
    /// its connection (close code 4000).
    pub idle_timeout_ms: u64,
    /// Least milliseconds between two progress events (joined count, poll
    /// tallies) of one group-buy or poll, however many buyers act.
    pub progress_interval_ms: u64,
    /// How often the server resolves commerce deadlines and posts pending
    /// progress, in milliseconds. A deadline resolves at most this late.
    pub commerce_tick_ms: u64,
    /// Promotions (cards, group-buys, coupons, polls) per group per day for
    /// a shop with a neutral score; buyer feedback scales it from a quarter
    /// (at least 1) to four times. 0 turns the reach quota off.
    pub reach_base_per_day: u32,
    /// Days of buyer feedback the shop's score looks at.
    pub reach_window_days: u64,
    /// Most pins (FAQ entries and messages) a group holds at once.
    pub max_pins: usize,
    /// Fan-out work a group gets per turn before other groups take theirs:
    /// subscribers visited plus frames queued. A group bigger than this is
    /// fanned out in turns, round robin with other groups, so one shop's
    /// flash sale cannot starve the rest. Small turns also keep a big
    /// group's own requests from waiting behind its fan-out.
    pub fanout_budget: usize,
    /// Where history lives: `embedded` (fjall in `data_dir`, the default) or
    /// `scylla` (a ScyllaDB or Cassandra 4.x cluster; see
    /// docs/operations/scylla.md).
    pub storage: String,
    /// Contact points of the cluster, `host:port[,host:port…]`.
    pub scylla_nodes: String,
    /// Keyspace of the cluster store (created by `qun migrate`).
    pub scylla_keyspace: String,
    /// The local datacenter: requests prefer its nodes and never fail over
    /// to another. Empty: no preference (one datacenter).
    pub scylla_dc: String,
    /// Consistency of reads and writes: `local_quorum` (default), `quorum`,
    /// `each_quorum`, `all`, `local_one` or `one`. Below a quorum an
    /// acknowledged message can be lost with one node.
    pub scylla_consistency: String,
    /// Client-side timeout of one CQL request, in milliseconds.
    pub scylla_request_timeout_ms: u64,
    /// How long a failing write is retried, in milliseconds, before the
    /// server refuses writes until restarted.
    pub scylla_write_retry_ms: u64,
    /// Replication `qun migrate` creates the keyspace with: `simple:N`, or
    /// `DC:N[,DC:N…]` for NetworkTopologyStrategy.
    pub scylla_replication: String,
    /// User name for a cluster with authentication (empty: none).
    pub scylla_user: String,
    /// Password of `scylla_user`.
    pub scylla_password: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./qun-data"),
            ws_listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7780)),
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 7701)),
            quic_cert: String::new(),
            quic_key: String::new(),
            max_frame_bytes: qun_proto::DEFAULT_MAX_FRAME_BYTES,
            outbox_max_frames: 1024,
            outbox_max_bytes: 512 * 1024,
            max_in_flight: 256,
            max_connections: 18_000,
            hello_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            reconnect_hint_ms: 1_000,
            token_key: String::new(),
            fsync: true,
            store_partitions: 0,
            store_commit_window_us: 2_000,
            store_writer_nice: -10,
            worker_threads: 0,
            default_max_members: 5_000,
            max_members_limit: 100_000,
            recent_ring: 256,
            resume_max_gap: 1_000,
            sent_window: 1_024,
            buyer_send_rate: 5.0,
            buyer_send_burst: 10,
            group_buyer_rate: 50.0,
            group_buyer_burst: 100,
            idle_timeout_ms: 90_000,
            progress_interval_ms: 250,
            commerce_tick_ms: 100,
            reach_base_per_day: 3,
            reach_window_days: 7,
            max_pins: 10,
            fanout_budget: 64,
            storage: "embedded".into(),
            scylla_nodes: String::new(),
            scylla_keyspace: "qun".into(),
            scylla_dc: String::new(),
            scylla_consistency: "local_quorum".into(),
            scylla_request_timeout_ms: 5_000,
            scylla_write_retry_ms: 10_000,
            scylla_replication: "simple:1".into(),
            scylla_user: String::new(),
            scylla_password: String::new(),
        }
    }
}

/// Why a configuration was refused. The binary prints it and exits with 64.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file named by `--config` cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The merged settings do not form a valid configuration (bad TOML,
    /// unknown key, wrong type, bad address).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Settings given as flags; `None` leaves the earlier layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--ws-listen`.
    pub ws_listen: Option<String>,
    /// `--http-listen`.
    pub http_listen: Option<String>,
    /// `--quic-listen`.
    pub quic_listen: Option<String>,
    /// `--storage`.
    pub storage: Option<String>,
    /// `--scylla-nodes`.
    pub scylla_nodes: Option<String>,
    /// `--scylla-keyspace`.
    pub scylla_keyspace: Option<String>,
    /// `--scylla-dc`.
    pub scylla_dc: Option<String>,
    /// `--replication` (of `qun migrate`).
    pub scylla_replication: Option<String>,
}

impl Config {
    /// chat-core's settings from this configuration.
    pub fn core(&self) -> qun_chat_core::CoreConfig {
        let rate = |per_sec, burst| qun_chat_core::Rate { per_sec, burst };
        qun_chat_core::CoreConfig {
            default_max_members: self.default_max_members,
            max_members_limit: self.max_members_limit,
            recent_ring: self.recent_ring,
            resume_max_gap: self.resume_max_gap,
            sent_window: self.sent_window,
            buyer_send_rate: rate(self.buyer_send_rate, self.buyer_send_burst),
            group_buyer_rate: rate(self.group_buyer_rate, self.group_buyer_burst),
            progress_interval_ms: self.progress_interval_ms,
            reach: qun_chat_core::reach::ReachPolicy {
                base_per_day: self.reach_base_per_day,
                window_days: self.reach_window_days,
                ..Default::default()
            },
            max_pins: self.max_pins,
            fanout_budget: self.fanout_budget,
            // The server runs fan-out workers (`server::run`); the store's
            // writer only publishes and queues.
            fan_out_on_commit: false,
            ..qun_chat_core::CoreConfig::default()
        }
    }

    /// The names of every field, as used in the file and (upper-cased, with
    /// the `QUN_` prefix) in the environment.
    pub fn field_names() -> Vec<String> {
        match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Loads the file (if any), applies `QUN_*` variables from `env`, then
    /// the flags, and checks the result.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key or value that is wrong.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        }
        let fields = Self::field_names();
        for (key, value) in env {
            let Some(name) = key.strip_prefix("QUN_").map(str::to_ascii_lowercase) else {
                continue;
            };
            if fields.contains(&name) {
                table.insert(name, env_value(&value));
            }
        }
        let mut set = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                table.insert(name.to_string(), toml::Value::String(v));
            }
        };
        set(
            "data_dir",
            flags.data_dir.as_ref().map(|p| p.display().to_string()),
        );
        set("ws_listen", flags.ws_listen.clone());
        set("http_listen", flags.http_listen.clone());
        set("quic_listen", flags.quic_listen.clone());
        set("storage", flags.storage.clone());
        set("scylla_nodes", flags.scylla_nodes.clone());
        set("scylla_keyspace", flags.scylla_keyspace.clone());
        set("scylla_dc", flags.scylla_dc.clone());
        set("scylla_replication", flags.scylla_replication.clone());
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(1024..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return bad(format!(
                "max_frame_bytes {} is outside 1024..=16777216",
                self.max_frame_bytes
            ));
        }
        if self.outbox_max_frames == 0 || self.outbox_max_bytes < self.max_frame_bytes {
            return bad(
                "outbox_max_frames must be > 0 and outbox_max_bytes >= max_frame_bytes".into(),
            );
        }
        if self.max_in_flight == 0 || self.max_connections == 0 {
            return bad("max_in_flight and max_connections must be > 0".into());
        }
        if self.default_max_members < 2 || self.default_max_members > self.max_members_limit {
            return bad("default_max_members must be between 2 and max_members_limit".into());
        }
        if self.store_commit_window_us > MAX_STORE_COMMIT_WINDOW_US {
            return bad(format!(
                "store_commit_window_us must be 0 (never wait) to {MAX_STORE_COMMIT_WINDOW_US}"
            ));
        }
        if !(-20..=19).contains(&self.store_writer_nice) {
            return bad(
                "store_writer_nice must be -20 to 19 (0: leave the writers as started)".into(),
            );
        }
        if self.store_partitions > qun_storage::MAX_PARTITIONS {
            return bad(format!(
                "store_partitions must be 0 (one per core) to {}",
                qun_storage::MAX_PARTITIONS
            ));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return bad(format!(
                "worker_threads must be 0 (one per core) to {MAX_WORKER_THREADS}"
            ));
        }
        if self.recent_ring < 50 {
            return bad("recent_ring must be at least 50 (a join returns the latest 50)".into());
        }
        if self.resume_max_gap == 0 || self.sent_window == 0 {
            return bad("resume_max_gap and sent_window must be > 0".into());
        }
        for (name, rate, burst) in [
            ("buyer_send", self.buyer_send_rate, self.buyer_send_burst),
            ("group_buyer", self.group_buyer_rate, self.group_buyer_burst),
        ] {
            if !rate.is_finite() || rate < 0.0 || (rate > 0.0 && burst == 0) {
                return bad(format!(
                    "{name}_rate must be >= 0 (0: unlimited) and {name}_burst >= 1 when limited"
                ));
            }
        }
        if !(10..=10_000).contains(&self.commerce_tick_ms)
            || self.progress_interval_ms < self.commerce_tick_ms
        {
            return bad(
                "commerce_tick_ms must be 10..=10000 and progress_interval_ms at least as long"
                    .into(),
            );
        }
        if self.quic_cert.is_empty() != self.quic_key.is_empty() {
            return bad("quic_cert and quic_key go together: set both or neither".into());
        }
        if self.idle_timeout_ms < 1_000 {
            return bad("idle_timeout_ms must be at least 1000".into());
        }
        if !(1..=100).contains(&self.max_pins) {
            return bad("max_pins must be 1..=100".into());
        }
        if !(16..=1_000_000).contains(&self.fanout_budget) {
            return bad("fanout_budget must be 16..=1000000".into());
        }
        if !(1..=90).contains(&self.reach_window_days) || self.reach_base_per_day > 1_000 {
            return bad(
                "reach_window_days must be 1..=90 and reach_base_per_day at most 1000".into(),
            );
        }
        self.check_storage()?;
        if !self.token_key.is_empty() {
            crate::auth::TokenKey::from_hex(&self.token_key)
                .map_err(|e| ConfigError::Invalid(format!("token_key: {e}")))?;
        }
        Ok(())
    }
}

impl Config {
    fn check_storage(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        match self.storage.as_str() {
            "embedded" => {}
            "scylla" => {
                self.scylla()?;
            }
            other => return bad(format!("storage {other:?}: use embedded or scylla")),
        }
        qun_storage::scylla_store::parse_consistency(&self.scylla_consistency)
            .map_err(|e| ConfigError::Invalid(format!("scylla_consistency: {e}")))?;
        self.replication()?;
        if self.scylla_request_timeout_ms == 0 {
            return bad("scylla_request_timeout_ms must be > 0".into());
        }
        Ok(())
    }

    /// Whether history lives in a ScyllaDB/Cassandra cluster.
    pub fn uses_scylla(&self) -> bool {
        self.storage == "scylla"
    }

    /// The cluster store's settings.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] without `scylla_nodes`, or with a bad
    /// keyspace name or consistency.
    pub fn scylla(&self) -> Result<qun_storage::scylla_store::ScyllaConfig, ConfigError> {
        use qun_storage::scylla_store::{ScyllaConfig, check_keyspace_name, parse_consistency};
        let nodes: Vec<String> = self
            .scylla_nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        if nodes.is_empty() {
            return Err(ConfigError::Invalid(
                "storage = scylla needs scylla_nodes (--scylla-nodes host:9042[,host:9042…])"
                    .into(),
            ));
        }
        check_keyspace_name(&self.scylla_keyspace)
            .map_err(|e| ConfigError::Invalid(format!("scylla_keyspace: {e}")))?;
        let mut c = ScyllaConfig::new(nodes, self.scylla_keyspace.clone());
        c.local_dc = self.scylla_dc.clone();
        c.consistency = parse_consistency(&self.scylla_consistency)
            .map_err(|e| ConfigError::Invalid(format!("scylla_consistency: {e}")))?;
        c.request_timeout = std::time::Duration::from_millis(self.scylla_request_timeout_ms);
        c.write_retry_window = std::time::Duration::from_millis(self.scylla_write_retry_ms);
        c.user = self.scylla_user.clone();
        c.password = self.scylla_password.clone();
        Ok(c)
    }

    /// The replication `qun migrate` creates the keyspace with.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when `scylla_replication` does not parse.
    pub fn replication(&self) -> Result<qun_storage::scylla_store::Replication, ConfigError> {
        self.scylla_replication
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("scylla_replication: {e}")))
    }
}

/// An environment value as TOML: numbers and booleans as such, anything
/// else as a string.
fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)),
            ) => v,
            _ => toml::Value::String(raw.to_string()),
        },
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_interface() {
        let c = Config::load(None, [], &Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.ws_listen.to_string(), "127.0.0.1:7700");
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:7780");
        assert_eq!(c.quic_listen.to_string(), "127.0.0.1:7701");
        assert_eq!(c.data_dir, PathBuf::from("./qun-data"));
        assert_eq!(c.max_frame_bytes, 64 * 1024);
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qun.toml");
        std::fs::write(
            &file,
            "ws_listen = \"127.0.0.1:1000\"\nhttp_listen = \"127.0.0.1:1001\"\nrecent_ring = 60\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("QUN_WS_LISTEN", "127.0.0.1:2000"),
                ("QUN_FSYNC", "false"),
                ("QUN_TOKEN", "ignored"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.ws_listen.port(), 2000, "env overrides the file");
        assert_eq!(c.http_listen.port(), 1001);
        assert_eq!(c.recent_ring, 60);
        assert!(!c.fsync);
        let c = Config::load(
            Some(&file),
            env(&[("QUN_WS_LISTEN", "127.0.0.1:2000")]),
            &Overrides {
                ws_listen: Some("127.0.0.1:3000".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.ws_listen.port(), 3000, "flags override env");
    }

    #[test]
    fn bad_config_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qun.toml");
        for (text, needle) in [
            ("nonsense = 1", "unknown field"),
            ("ws_listen = \"not an address\"", "address"),
            ("max_frame_bytes = 10", "max_frame_bytes"),
            ("token_key = \"abc\"", "token_key"),
            ("this is not toml", "qun.toml"),
            ("storage = \"cassandra\"", "embedded or scylla"),
            ("storage = \"scylla\"", "scylla_nodes"),
            (
                "storage = \"scylla\"\nscylla_nodes = \"h:9042\"\nscylla_keyspace = \"Qun\"",
                "scylla_keyspace",
            ),
            ("scylla_consistency = \"serial\"", "scylla_consistency"),
            ("scylla_replication = \"dc1\"", "scylla_replication"),
            ("store_partitions = 65", "store_partitions"),
            ("store_commit_window_us = 10001", "store_commit_window_us"),
            ("store_writer_nice = -21", "store_writer_nice"),
            ("store_writer_nice = 20", "store_writer_nice"),
            ("worker_threads = 257", "worker_threads"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = Config::load(Some(&file), [], &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(needle), "{text:?} gave {err}");
        }
        let err = Config::load(
            Some(&dir.path().join("missing.toml")),
            [],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        let err = Config::load(
            None,
            env(&[("QUN_MAX_IN_FLIGHT", "zero")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_in_flight"), "{err}");
    }

    #[test]
    fn example_config_lists_every_field_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/qun.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            Config::default(),
            "docs/qun.example.toml disagrees with Config::default()"
        );
        for field in Config::field_names() {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{field} ="))),
                "docs/qun.example.toml does not list {field}"
            );
        }
    }

    #[test]
    fn a_quic_certificate_needs_its_key() {
        let e = Config::load(
            None,
            env(&[("QUN_QUIC_CERT", "/etc/qun/cert.pem")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("quic_key"), "{e}");
    }
}
