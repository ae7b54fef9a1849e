//! `qun`: the Qun server binary.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use qun_gateway::auth::TokenKey;
use qun_gateway::{Config, Listeners, Overrides};
use tokio_util::sync::CancellationToken;

/// Exit status for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "qun", version, about = "Qun: real-time group chat for shops")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (WebSocket, QUIC and HTTP listeners; embedded store
    /// unless --storage scylla).
    Serve {
        #[command(flatten)]
        common: CommonFlags,
        #[command(flatten)]
        storage: StorageFlags,
        /// WebSocket listen address [default: 127.0.0.1:7700].
        #[arg(long)]
        ws_listen: Option<String>,
        /// HTTP listen address for /healthz and /metrics [default: 127.0.0.1:7780].
        #[arg(long)]
        http_listen: Option<String>,
        /// QUIC listen address (UDP) [default: 127.0.0.1:7701].
        #[arg(long)]
        quic_listen: Option<String>,
    },
    /// Create or upgrade the cluster store's keyspace and tables
    /// (ScyllaDB or Cassandra 4.x). Safe to run again.
    Migrate {
        #[command(flatten)]
        common: CommonFlags,
        #[command(flatten)]
        storage: StorageFlags,
        /// Replication of a new keyspace: simple:N, or DC:N[,DC:N…]
        /// (NetworkTopologyStrategy) [default: simple:1].
        #[arg(long)]
        replication: Option<String>,
        /// Then fill the reply index from every stored message again: run
        /// once the last server older than schema version 10 has stopped,
        /// so that replies it appended can be scrubbed by a recall.
        #[arg(long)]
        reindex_replies: bool,
    },
    /// Print a token signed with the server's key.
    Token {
        #[command(flatten)]
        common: CommonFlags,
        /// User id.
        #[arg(long)]
        user: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// buyer, agent or owner.
        #[arg(long)]
        role: String,
        /// Shop id (agents and owners).
        #[arg(long)]
        shop: Option<String>,
        /// Lifetime, e.g. 24h, 30m, 7d.
        #[arg(long, default_value = "24h")]
        ttl: humantime::Duration,
    },
}

#[derive(clap::Args, Debug)]
struct CommonFlags {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./qun-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct StorageFlags {
    /// Where history lives: embedded or scylla [default: embedded].
    #[arg(long)]
    storage: Option<String>,
    /// Cluster contact points, host:port[,host:port…].
    #[arg(long)]
    scylla_nodes: Option<String>,
    /// Cluster keyspace [default: qun].
    #[arg(long)]
    scylla_keyspace: Option<String>,
    /// The local datacenter of the cluster.
    #[arg(long)]
    scylla_dc: Option<String>,
}

impl StorageFlags {
    fn into_overrides(self, common: &CommonFlags) -> Overrides {
        Overrides {
            data_dir: common.data_dir.clone(),
            storage: self.storage,
            scylla_nodes: self.scylla_nodes,
            scylla_keyspace: self.scylla_keyspace,
            scylla_dc: self.scylla_dc,
            ..Overrides::default()
        }
    }
}

fn load_config(common: &CommonFlags, overrides: &Overrides) -> Result<Config, ExitCode> {
    Config::load(common.config.as_deref(), std::env::vars(), overrides).map_err(|e| {
        eprintln!("qun: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// mimalloc instead of the system allocator. The store's writer threads
/// allocate and free millions of small memtable nodes; with glibc's malloc
/// the store sustained 117k-126k durable appends/s over 3M appends, with
/// mimalloc 167k-168k (with a worse p99 in short bursts), and an idle
/// connection costs a little less
/// (docs/benchmarks.md, "Embedded store").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option `purge_delay` (`mi_option_purge_delay` in its
/// `mimalloc.h`, which the Rust bindings do not name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long, in ms, mimalloc keeps memory freed before it hands it back to
/// the system: mimalloc 2's default, where mimalloc 3's is 1 s.
///
/// The delay is not a timer: what has been free that long is handed back
/// when the allocator next does its upkeep, during later allocations. A
/// server that goes idle after a burst does none, so with 1 s it kept what
/// a storm of connects had freed (handshakes, `Hello` and join answers) for
/// as long as it stayed idle: 3,610-3,940 bytes of RSS per idle connection
/// at 19,000, against 3,190-3,560 with 10 ms; the embedded store's appends
/// and fan-out did not measurably change (docs/benchmarks.md,
/// "Connections").
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Whether the operator chose a purge delay with mimalloc's own variable
/// (`MIMALLOC_PURGE_DELAY`, or its older name `MIMALLOC_RESET_DELAY`;
/// docs/configuration.md), which mimalloc read at start.
fn purge_delay_chosen_by_operator() -> bool {
    ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the operator
/// chose one.
fn set_purge_delay() {
    if purge_delay_chosen_by_operator() {
        return;
    }
    // SAFETY: `mi_option_set` stores a number for an option mimalloc has
    // (`purge_delay` is read again at each purge); it takes no pointer and
    // has no other precondition. It runs before the server starts a thread.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
    }
}

/// The log filter without `RUST_LOG`: Qun's own events at info; the
/// storage engine's only from warn, as it logs a few lines for every
/// keyspace of every partition at each start.
const DEFAULT_LOG: &str = "info,fjall=warn,lsm_tree=warn";

fn main() -> ExitCode {
    set_purge_delay();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald would keep
        // the escape codes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve {
            common,
            storage,
            ws_listen,
            http_listen,
            quic_listen,
        } => {
            let overrides = Overrides {
                ws_listen,
                http_listen,
                quic_listen,
                ..storage.into_overrides(&common)
            };
            let config = match load_config(&common, &overrides) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(serve(config))
        }
        Command::Migrate {
            common,
            storage,
            replication,
            reindex_replies,
        } => {
            let mut overrides = Overrides {
                scylla_replication: replication,
                ..storage.into_overrides(&common)
            };
            // Only the cluster store has a schema to migrate.
            overrides.storage.get_or_insert_with(|| "scylla".into());
            let config = match load_config(&common, &overrides) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if !config.uses_scylla() {
                eprintln!(
                    "qun: the embedded store needs no migration; migrate is for --storage scylla"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            report(migrate(&config, reindex_replies))
        }
        Command::Token {
            common,
            user,
            name,
            role,
            shop,
            ttl,
        } => {
            let overrides = Overrides {
                data_dir: common.data_dir.clone(),
                ..Overrides::default()
            };
            let config = match load_config(&common, &overrides) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(token(&config, user, name, role, shop, ttl.into()))
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qun: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        // Handlers first: a supervisor may signal as soon as it reads the
        // line below, and that must still be a graceful shutdown.
        let signals = install_signals();
        // One line on stdout with the bound addresses, for scripts and tests
        // that listen on port 0 (logs go to stderr).
        println!(
            "qun listening ws=ws://{}{} http={} quic=quic://{} cert_sha256={}",
            listeners.ws_addr()?,
            qun_gateway::WS_PATH,
            listeners.http_addr()?,
            listeners.quic_addr()?,
            listeners.quic_fingerprint()
        );
        let shutdown = CancellationToken::new();
        if let Some(signals) = signals {
            tokio::spawn(watch_signals(signals, shutdown.clone()));
        }
        qun_gateway::run(config, listeners, shutdown).await?;
        Ok(())
    })
}

fn migrate(config: &Config, reindex_replies: bool) -> anyhow::Result<()> {
    let scylla = config.scylla()?;
    let replication = config.replication()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime
        .block_on(qun_storage::scylla_store::migrate_with(
            &scylla,
            &replication,
        ))
        .with_context(|| format!("migrating keyspace {}", scylla.keyspace))?;
    if report.applied.is_empty() {
        println!(
            "keyspace {} is up to date at schema version {}",
            scylla.keyspace, report.to
        );
    } else {
        println!(
            "keyspace {} migrated from schema version {} to {} (applied {:?}; replication of a new keyspace: {replication})",
            scylla.keyspace, report.from, report.to, report.applied
        );
    }
    if reindex_replies {
        let indexed = runtime
            .block_on(qun_storage::scylla_store::reindex_replies_with(&scylla))
            .with_context(|| format!("indexing the replies of keyspace {}", scylla.keyspace))?;
        println!("keyspace {}: {indexed} replies indexed", scylla.keyspace);
    }
    Ok(())
}

/// SIGTERM and SIGINT, caught from now on; `None` (logged) if they cannot be.
fn install_signals() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::error!("cannot install signal handlers");
            None
        }
    }
}

/// The first SIGTERM or SIGINT shuts down gracefully; a second one exits at once.
async fn watch_signals(
    (mut term, mut int): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    shutdown: CancellationToken,
) {
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received; shutting down gracefully (send another to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal; exiting immediately");
    std::process::exit(130);
}

fn token(
    config: &Config,
    user: String,
    name: String,
    role: String,
    shop: Option<String>,
    ttl: Duration,
) -> anyhow::Result<()> {
    let key = if config.token_key.is_empty() {
        TokenKey::load_or_create(&config.data_dir)?
    } else {
        TokenKey::from_hex(&config.token_key)?
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let token = key.issue(&user, &name, &role, shop.as_deref(), now, ttl);
    // Refuse to print a token the server would refuse.
    key.verify(&token, now)
        .context("these claims would not be accepted")?;
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mimalloc's current purge delay.
    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: as in `set_purge_delay`: a read of a number option.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)
        }
    }

    #[test]
    fn the_purge_delay_is_set_unless_the_operator_chose_one() {
        if purge_delay_chosen_by_operator() {
            let theirs = purge_delay();
            set_purge_delay();
            assert_eq!(purge_delay(), theirs, "the operator's is kept");
            return;
        }
        // mimalloc 3's default for `purge_delay` and no other option: the
        // number 15 names it. A mimalloc with other options or defaults
        // fails here, and the constant must be checked against its header.
        assert_eq!(purge_delay(), 1_000);
        set_purge_delay();
        assert_eq!(purge_delay(), PURGE_DELAY_MS);
    }
}
