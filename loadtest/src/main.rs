//! `qun-loadtest`: drives a running Qun server on loopback with shop-group
//! workloads and reports what it measured.
//!
//! Scenarios: `connections` (idle connections and the server's memory per
//! connection), `fanout` (groups × members × senders: deliveries/s and
//! end-to-end latency, with lost, duplicate and out-of-order counts),
//! `flash-sale` (members pressing join on one group-buy: exactly K must
//! win), `history` (backfill and resume storms). `compare` runs one of them
//! against fresh servers of several variants, interleaved.
//!
//! Members run in worker processes (this binary, `worker` subcommand) of at
//! most `--per-worker` connections each, connecting from several loopback
//! source addresses, so no process nears the descriptor limit and the
//! ephemeral ports of one address do not run out. Every run is bounded by
//! `--timeout` and stops by itself. See docs/benchmarks.md.

/// mimalloc, as the server: each push a member reads is decoded into a
/// few small allocations, freed again at once.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod compare;
mod contention;
mod coordinator;
mod cpu;
mod recorder;
mod report;
mod scheduling;
mod server_metrics;
mod spec;
mod worker;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use qun_gateway::auth::TokenKey;
use scheduling::Scheduling;
use spec::MemberAcks;

#[derive(Parser, Debug)]
#[command(
    name = "qun-loadtest",
    version,
    about = "Load generator for Qun (loopback only)"
)]
pub(crate) struct Cli {
    /// The server: `ws://127.0.0.1:PORT/ws` or `quic://127.0.0.1:PORT`.
    #[arg(long, default_value = "ws://127.0.0.1:7700/ws", global = true)]
    url: String,
    /// The server's data directory, whose token key signs the test users'
    /// tokens (as `qun token` does).
    #[arg(long, default_value = "./qun-data", global = true)]
    data_dir: PathBuf,
    /// For quic://: the server certificate's SHA-256 (`cert_sha256=`).
    #[arg(long, global = true)]
    cert_fingerprint: Option<String>,
    /// For quic://: accept any certificate (development servers).
    #[arg(long, global = true)]
    insecure_dev_cert: bool,
    /// Also write the report as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// The server's PID, to read its memory (`/proc/PID/status`) and its
    /// CPU time (`/proc/PID/stat`: `server_cores` and its user and system
    /// parts in fan-out and flash-sale reports).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// The server's `/metrics` (`http://127.0.0.1:7780/metrics`): fan-out
    /// and flash-sale runs then also report the server's own request
    /// latency (`server_request_p50_ms` ≤ …), apart from the load
    /// generator's share, its store's time to durability
    /// (`server_store_durable_p99_ms` ≤ …), and how long groups waited on
    /// the fan-out queue for their turn (`server_fanout_wait_p99_ms` ≤ …).
    #[arg(long, global = true)]
    metrics_url: Option<String>,
    /// Most connections per worker process. More, smaller workers keep up
    /// with bursts better: a worker that falls behind adds its own queueing
    /// to the latency it measures (docs/benchmarks.md). At most about 19,000
    /// (a process's descriptor limit here is 20,000).
    #[arg(long, default_value_t = 1_250, global = true)]
    per_worker: usize,
    /// Loopback source addresses to spread connections over (127.0.0.2 …);
    /// 0 to let the OS choose.
    #[arg(long, default_value_t = 8, global = true)]
    sources: u8,
    /// Upper bound on the whole run; it stops by itself after this.
    #[arg(long, default_value = "10m", global = true)]
    timeout: humantime::Duration,
    /// How the load generator's threads are scheduled. `batch`
    /// (`SCHED_BATCH`): the same share of the CPU, but a member woken by a
    /// delivery does not preempt the server in the middle of its fan-out,
    /// as with the clients on other machines. `normal`: as any process
    /// (docs/benchmarks.md compares the two).
    #[arg(long, value_enum, default_value_t = Scheduling::Batch, global = true)]
    scheduling: Scheduling,
    /// How the members' kernels acknowledge the pushes they read over
    /// `ws://`. `delayed`: an ACK for every second push, as the members ask
    /// their kernel (`TCP_QUICKACK` off after each read). `immediate`: an
    /// ACK per push, Linux's default for a connection that only reads; over
    /// loopback each ACK costs the load generator's thread its whole path,
    /// the server socket's side included (docs/benchmarks.md compares the
    /// two).
    #[arg(long, value_enum, default_value_t = MemberAcks::Delayed, global = true)]
    member_acks: MemberAcks,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum Scenario {
    /// Open N idle authenticated connections joined to groups; report the
    /// connect rate, failures and the server's memory per connection.
    Connections {
        #[arg(long, default_value_t = 1_000)]
        count: usize,
        #[arg(long, default_value_t = 10)]
        groups: usize,
    },
    /// R groups × M members; S senders per group post for D (at a rate, or
    /// as fast as acks allow); every member reads every message.
    Fanout {
        #[arg(long, default_value_t = 100)]
        groups: usize,
        #[arg(long, default_value_t = 50)]
        members: usize,
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Messages per second per sender; 0: as fast as acks allow (64 in
        /// flight per sender). The senders' posts are spread evenly over
        /// each interval, not sent all at once.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
    /// One group of M members; a group-buy of K slots; every member presses
    /// join within T. Exactly K must join.
    FlashSale {
        #[arg(long, default_value_t = 2_000)]
        members: usize,
        #[arg(long, default_value_t = 500)]
        slots: u32,
        #[arg(long, default_value = "2s")]
        within: humantime::Duration,
    },
    /// C clients of one group of P messages: `backfill` pages the whole
    /// history at once (each must get every seq once); `resume` reconnects
    /// all at once and resumes from `behind` messages back.
    History {
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        #[arg(long, default_value_t = 1_000)]
        messages: usize,
        #[arg(long, default_value = "backfill")]
        mode: HistoryMode,
        #[arg(long, default_value_t = 200)]
        behind: u64,
    },
    /// Run a scenario (after `--`) against a fresh `qun serve` of each
    /// variant in turn, round after round, so that variants are compared in
    /// interleaved runs (each round starting with the next variant, since
    /// the one run first did worse); ends with a table of every run (`--json`: every
    /// report in one file). Each run's server gets its own data directory
    /// and free loopback ports; `--scheduling`, `--member-acks`,
    /// `--per-worker`, `--sources` and `--timeout` go to every run.
    Compare(CompareArgs),
    /// (internal) Run a share of the members; driven over stdin/stdout.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

/// The options of `compare` (see [`Scenario::Compare`]).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct CompareArgs {
    /// Runs of each variant, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The server's listener the runs use.
    #[arg(long, value_enum, default_value_t = compare::Transport::Ws)]
    transport: compare::Transport,
    /// `LABEL` or `LABEL=NAME=VALUE …`: the server's environment for
    /// this variant (`"one=QUN_WORKER_THREADS=1"`); `QUN_BIN=PATH` runs
    /// another `qun` binary (an older build). Repeat for each variant.
    #[arg(long = "variant", required = true)]
    variants: Vec<String>,
    /// The `qun` binary of variants without `QUN_BIN` (default: the
    /// `qun` next to this binary, as `cargo build` leaves it).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Also run the loopback floor (the same writes and reads with
    /// nothing of Qun in them) first in each round, with the fan-out's
    /// groups, members, rate and duration; each run's p99 is then also
    /// shown as a multiple of its round's floor. Fan-out at a fixed
    /// `--rate`, over WebSocket, only.
    #[arg(long)]
    floor: bool,
    /// The floor's program (default: `examples/loopback_floor` beside
    /// this binary, as `cargo build --release -p qun-loadtest --example
    /// loopback_floor` leaves it).
    #[arg(long, requires = "floor")]
    floor_program: Option<PathBuf>,
    /// Make the machine slower on purpose: for the whole comparison, one
    /// thread per core is busy PERCENT (1–90) of every 10 ms, at the
    /// default priority, a stand-in for the minutes when other guests take
    /// this machine's cores (see `contention.rs`). Best with `--floor`,
    /// whose runs show how slow the machine then was.
    #[arg(long, value_name = "PERCENT")]
    contend: Option<u8>,
    /// The scenario and its options, after `--`: `-- fanout --groups
    /// 100 --members 50 --rate 60 --duration 15s`.
    #[arg(last = true, required = true)]
    scenario: Vec<String>,
}

/// What the history scenario storms.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HistoryMode {
    /// Everyone pages the whole history backwards at once.
    Backfill,
    /// Everyone reconnects at once and resumes.
    Resume,
}

/// Microseconds since the Unix epoch (shared by processes on one machine).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A random u64.
pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// The token of member `i` of a run.
pub(crate) fn member_token(key: &TokenKey, run_id: &str, i: usize) -> String {
    let user = format!("lt-{run_id}-{i}");
    key.issue(
        &user,
        &user,
        "buyer",
        None,
        now_us() / 1_000_000,
        Duration::from_secs(24 * 3600),
    )
}

/// The loopback source address of worker `w` (`None`: let the OS choose).
pub(crate) fn source_ip(cli_sources: u8, server: IpAddr, w: usize) -> Option<IpAddr> {
    match server {
        IpAddr::V4(v4) if v4.is_loopback() && cli_sources > 0 => {
            let n = u8::try_from(w % usize::from(cli_sources)).unwrap_or(0);
            Some(IpAddr::from([127, 0, 0, 2 + n]))
        }
        _ => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any other thread exists, so that all of them, and the worker
    // processes, inherit it. A worker keeps what its coordinator gave it.
    // Not `compare` either: its servers must run as any process, and each
    // run it starts applies the policy to itself.
    if !matches!(cli.scenario, Scenario::Worker { .. } | Scenario::Compare(_))
        && let Err(e) = cli.scheduling.apply()
    {
        eprintln!("qun-loadtest: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qun-loadtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Scenario::Worker { spec } = &cli.scenario {
        return match runtime.block_on(worker::run(spec)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!(
                    "{}",
                    serde_json::to_string(&spec::WorkerLine::Error(format!("{e:#}")))
                        .unwrap_or_default()
                );
                ExitCode::FAILURE
            }
        };
    }
    if let Scenario::Compare(args) = &cli.scenario {
        return runtime.block_on(compare(&cli, args));
    }
    let timeout: Duration = cli.timeout.into();
    match runtime.block_on(async { tokio::time::timeout(timeout, coordinator::run(&cli)).await }) {
        Ok(Ok(report)) => {
            print!("{}", report.table());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                eprintln!("qun-loadtest: a check failed");
                ExitCode::from(3)
            }
        }
        Ok(Err(e)) => {
            eprintln!("qun-loadtest: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("qun-loadtest: stopped after --timeout {}", cli.timeout);
            ExitCode::FAILURE
        }
    }
}

/// `qun-loadtest compare`: every round and variant, then the table.
async fn compare(cli: &Cli, args: &CompareArgs) -> ExitCode {
    let CompareArgs {
        rounds,
        transport,
        variants,
        server,
        floor,
        floor_program,
        contend,
        scenario,
    } = args;
    let result = async {
        let exe = std::env::current_exe()?;
        let default_server = match server {
            Some(path) => path.clone(),
            None => exe.with_file_name("qun"),
        };
        let variants = variants
            .iter()
            .map(|v| compare::Variant::parse(v, &default_server))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let floor = if *floor {
            let program = floor_program
                .clone()
                .unwrap_or_else(|| exe.with_file_name("examples").join("loopback_floor"));
            Some(compare::Floor::of_fanout(
                program,
                scenario,
                compare::FLOOR_PER_PROCESS,
            )?)
        } else {
            None
        };
        let comparison = compare::run(
            cli,
            *rounds,
            *transport,
            variants,
            scenario.to_vec(),
            floor,
            *contend,
        )
        .await?;
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_vec_pretty(&comparison)?)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        }
        anyhow::Ok(comparison)
    }
    .await;
    match result {
        Ok(comparison) => {
            print!("{}", comparison.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qun-loadtest compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}
