//! `qun`: the Qun server binary.

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
    /// Run the server (embedded store, WebSocket, QUIC and HTTP listeners).
    Serve {
        #[command(flatten)]
        common: CommonFlags,
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

fn load_config(
    common: &CommonFlags,
    ws_listen: Option<String>,
    http_listen: Option<String>,
    quic_listen: Option<String>,
) -> Result<Config, ExitCode> {
    let overrides = Overrides {
        data_dir: common.data_dir.clone(),
        ws_listen,
        http_listen,
        quic_listen,
    };
    Config::load(common.config.as_deref(), std::env::vars(), &overrides).map_err(|e| {
        eprintln!("qun: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve {
            common,
            ws_listen,
            http_listen,
            quic_listen,
        } => {
            let config = match load_config(&common, ws_listen, http_listen, quic_listen) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(serve(config))
        }
        Command::Token {
            common,
            user,
            name,
            role,
            shop,
            ttl,
        } => {
            let config = match load_config(&common, None, None, None) {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
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
        tokio::spawn(watch_signals(shutdown.clone()));
        qun_gateway::run(config, listeners, shutdown).await?;
        Ok(())
    })
}

/// The first SIGTERM or SIGINT shuts down gracefully; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
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
