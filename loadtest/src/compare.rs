//! `qun-loadtest compare`: one scenario against fresh servers of several
//! variants, run after run, interleaved.
//!
//! This machine is shared: the same build runs markedly faster at one hour
//! than at another (docs/benchmarks.md, "Machine"), so two builds or two
//! settings are only compared in runs that alternate. `compare` does that
//! by itself. For each round, for each variant, it
//!
//! 1. starts the variant's `qun serve` on a fresh data directory and free
//!    loopback ports, with the variant's environment (`QUN_WORKER_THREADS=1`,
//!    …; `QUN_BIN=PATH` picks another binary, such as an older build);
//! 2. waits for its `/metrics`, then runs this same binary's scenario against
//!    it with `--server-pid` and `--metrics-url` set, so every report carries
//!    the server's CPU and its own latency figures;
//! 3. stops the server (SIGTERM, then SIGKILL after its grace) and removes
//!    the data directory, or keeps it, and says where, when the run failed.
//!
//! The variants take turns at going first: round 1 runs them in the order
//! given, round 2 starts with the second, and so on ([`round_order`]). In a
//! fixed order the variant run first in each round did worse, whatever it
//! was: its maximum latency was the higher in every comparison, and its p99
//! often too (docs/benchmarks.md, "seventeenth stop").
//!
//! ```sh
//! qun-loadtest compare --rounds 3 \
//!     --variant "one=QUN_WORKER_THREADS=1" --variant "two=QUN_WORKER_THREADS=2" \
//!     -- fanout --groups 100 --members 50 --rate 60 --duration 15s
//! ```
//!
//! It ends with a table of every run, variant by variant (latency p50, p99
//! and max, messages lost, the scenario's rate: deliveries, joins, pages,
//! messages caught up or connections per second, the server's cores, the
//! load generator's (`clients`: what phones elsewhere would not take from
//! the server), the share of the run its busiest thread had work, `busiest`
//! (1.00: it never ran out, so what waits for it stands in a queue), and how
//! many frames each of its connections' writes carried, `f/write`)
//! and each variant's median p50 and p99; with `--json` it writes all the
//! reports in one file. Runs go over WebSocket, or over QUIC with
//! `--transport quic` (the server's development certificate pinned by the
//! hash it logs). Each run is bounded by `--timeout`, server start and stop
//! by [`SERVER_START`] and [`SERVER_STOP`].
//!
//! With `--floor`, each round of a fan-out comparison also runs the loopback
//! floor (`loadtest/examples/loopback_floor.rs`: the same writes and reads
//! with no protocol, no store and no server logic) with the fan-out's
//! groups, members, rate and duration. Its runs are the rows labelled
//! `floor`, and every variant's run shows its p99 as a multiple of the floor
//! of the same round (`× floor`): a figure that says how close Qun came to
//! what the machine allowed at that moment, comparable between a fast hour
//! and a slow one where the p99 alone is not. In the floor's rows, `server`
//! is its writing process and `clients` its reading processes, so the cores
//! Qun's server and its clients take can be set beside those of bare writes
//! and reads at the same rate.
//!
//! With `--contend PERCENT`, a [`Competitor`] takes that share of every core
//! for the whole comparison, so that a change can be tried on a slow machine
//! on purpose (`contention.rs`); the table's header says how much it had.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::contention::{Competitor, Contention};
use crate::{Cli, Scenario};

/// The longest a server may take to answer on `/metrics` after it starts.
pub(crate) const SERVER_START: Duration = Duration::from_secs(30);
/// The longest a server may take to exit after SIGTERM before it is killed
/// (its own shutdown grace is 10 s by default).
pub(crate) const SERVER_STOP: Duration = Duration::from_secs(20);

/// The rate each scenario reports, the first found shown as "per sec".
const PER_SEC: &[&str] = &[
    "deliveries_per_sec",
    "joins_per_sec",
    "pages_per_sec",
    "messages_caught_up_per_sec",
    "connections_per_sec",
];

/// Options the runs set themselves, refused among the scenario's arguments.
const SET_BY_COMPARE: &[&str] = &[
    "--url",
    "--data-dir",
    "--server-pid",
    "--metrics-url",
    "--json",
    "--cert-fingerprint",
];

/// Which of the server's listeners the runs use.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// WebSocket (`ws://`).
    Ws,
    /// QUIC (`quic://`), the server's development certificate pinned by
    /// the SHA-256 it logs at start.
    Quic,
}

/// One way to run the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Variant {
    /// The name in the report.
    pub(crate) label: String,
    /// The `qun` binary.
    pub(crate) server: PathBuf,
    /// Environment set for the server, in order.
    pub(crate) env: Vec<(String, String)>,
}

impl Variant {
    /// Reads `LABEL` or `LABEL=NAME=VALUE NAME=VALUE …`. `QUN_BIN=PATH`
    /// replaces `default_server` instead of going into the environment.
    ///
    /// # Errors
    /// A label that is empty, starts with `.` or has anything but ASCII
    /// letters, digits, `-`, `_` and `.`; a setting that is not
    /// `NAME=VALUE` with a name; `QUN_BIN=` without a path.
    pub(crate) fn parse(spec: &str, default_server: &Path) -> anyhow::Result<Self> {
        let (label, settings) = spec.split_once('=').unwrap_or((spec, ""));
        // The label names the run's data directory too.
        let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if label.is_empty() || !label.chars().all(fits) || label.starts_with('.') {
            bail!(
                "variant {spec:?}: give it a label of letters, digits, '-', '_' or '.' first, \
                 as in \"one=QUN_WORKER_THREADS=1\""
            );
        }
        let mut variant = Self {
            label: label.to_string(),
            server: default_server.to_path_buf(),
            env: Vec::new(),
        };
        for setting in settings.split_whitespace() {
            match setting.split_once('=') {
                Some(("QUN_BIN", "")) => bail!("variant {label:?}: QUN_BIN= needs a path"),
                Some(("QUN_BIN", path)) => variant.server = path.into(),
                Some((name, value)) if !name.is_empty() => {
                    variant.env.push((name.to_string(), value.to_string()));
                }
                _ => bail!(
                    "variant {label:?}: {setting:?} is not NAME=VALUE (settings are separated \
                     by spaces)"
                ),
            }
        }
        Ok(variant)
    }
}

/// One run's outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Run {
    /// 1-based.
    pub(crate) round: u32,
    /// The variant's label.
    pub(crate) variant: String,
    /// The run's data directory: removed after a run that passed.
    pub(crate) data_dir: PathBuf,
    /// The scenario's report as it wrote it (`--json`).
    pub(crate) report: serde_json::Value,
}

/// The label of the loopback floor's runs (`--floor`).
pub(crate) const FLOOR: &str = "floor";

/// Connections per member process of the floor ([`Floor::workers`]),
/// whatever `--per-worker` gives the load generator: the floor's members
/// do far less per read, and with 1,250 a process its p99 at 100 × 50 rose
/// from 8–15 to 29–32 ms where the load generator's fell
/// (docs/benchmarks.md, "fifteenth stop"). The floor is the least the
/// machine allows, so it keeps what serves it best.
pub(crate) const FLOOR_PER_PROCESS: usize = 2_500;

/// The loopback floor run beside each round of a fan-out comparison: the
/// fan-out's pattern of writes with nothing of Qun in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Floor {
    /// The `loopback_floor` program.
    pub(crate) program: PathBuf,
    /// The fan-out's groups.
    pub(crate) groups: usize,
    /// The fan-out's members per group.
    pub(crate) members: usize,
    /// Frames a second per group: the fan-out's senders × their rate.
    pub(crate) rate: f64,
    /// The fan-out's duration in whole seconds, rounded up.
    pub(crate) duration_s: u64,
    /// Member processes: one per [`FLOOR_PER_PROCESS`] connections.
    pub(crate) workers: usize,
}

impl Floor {
    /// The floor of the fan-out `scenario` (its arguments after `--`), for
    /// a run that puts at most `per_worker` members in one process.
    ///
    /// # Errors
    /// The scenario is not a valid `fanout`, or posts as fast as acks allow
    /// (`--rate 0`): the floor has no acks to pace it.
    pub(crate) fn of_fanout(
        program: PathBuf,
        scenario: &[String],
        per_worker: usize,
    ) -> anyhow::Result<Self> {
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("qun-loadtest").chain(scenario.iter().map(String::as_str)),
        )
        .map_err(|e| anyhow::anyhow!("reading the scenario for --floor: {e}"))?;
        let Scenario::Fanout {
            groups,
            members,
            senders,
            rate,
            duration,
        } = cli.scenario
        else {
            bail!("--floor goes with a fanout scenario: the floor makes a fan-out's writes");
        };
        if rate <= 0.0 || senders == 0 {
            bail!("--floor needs the fan-out at a fixed --rate: the floor has no acks to pace it");
        }
        let duration: Duration = duration.into();
        let total = groups * members;
        Ok(Self {
            program,
            groups,
            members,
            rate: rate * senders as f64,
            duration_s: duration.as_secs() + u64::from(duration.subsec_nanos() > 0),
            workers: total.div_ceil(per_worker.max(1)).max(1),
        })
    }
}

/// Everything `compare` ran.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    /// Rounds asked for.
    pub(crate) rounds: u32,
    /// The listener every run used.
    pub(crate) transport: Transport,
    /// The variants as given; round r runs them from the r-th on, wrapping
    /// around ([`round_order`]).
    pub(crate) variants: Vec<Variant>,
    /// The scenario's arguments.
    pub(crate) scenario: Vec<String>,
    /// The loopback floor run in each round (`--floor`), whose runs are
    /// labelled [`FLOOR`].
    pub(crate) floor: Option<Floor>,
    /// Every run, in the order they ran.
    pub(crate) runs: Vec<Run>,
    /// The competitor beside every run (`--contend`), and the CPU it had.
    pub(crate) contention: Option<Contention>,
}

/// Checks the scenario's arguments: a scenario that talks to a server, and
/// none of the options each run sets itself.
///
/// # Errors
/// No scenario, `compare` or `worker` as the scenario, or an option from
/// [`SET_BY_COMPARE`].
pub(crate) fn check_scenario(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        None => bail!("name the scenario after `--`, as in `-- fanout --groups 100`"),
        Some("compare" | "worker") => bail!("compare runs a scenario, not {:?}", args[0]),
        Some(_) => {}
    }
    if let Some(taken) = args.iter().find(|a| {
        SET_BY_COMPARE
            .iter()
            .any(|o| a.as_str() == *o || a.starts_with(&format!("{o}=")))
    }) {
        bail!("compare sets {taken} for each run itself; leave it out of the scenario");
    }
    Ok(())
}

/// Runs every round and variant (and the floor, first in each round); the
/// failing run's error names its data directory, which is kept.
///
/// # Errors
/// A variant's binary or the floor's program is missing, a variant is
/// labelled `floor` beside `--floor`, the floor goes over QUIC, `--contend`
/// is out of its range or its threads cannot start, a server
/// does not start or exits early, or a run fails (its exit status or a
/// failed check).
pub(crate) async fn run(
    cli: &Cli,
    rounds: u32,
    transport: Transport,
    variants: Vec<Variant>,
    scenario: Vec<String>,
    floor: Option<Floor>,
    contend: Option<u8>,
) -> anyhow::Result<Comparison> {
    check_scenario(&scenario)?;
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if variants.is_empty() {
        bail!("give at least one --variant");
    }
    if let Some(floor) = &floor {
        if transport == Transport::Quic {
            bail!("the floor is TCP: compare it with WebSocket runs, not --transport quic");
        }
        if variants.iter().any(|v| v.label == FLOOR) {
            bail!("the label {FLOOR:?} is the floor's runs; give the variant another");
        }
        if !floor.program.is_file() {
            bail!(
                "no loopback floor at {} (build it with `cargo build --release -p \
                 qun-loadtest --example loopback_floor`, or pass --floor-program)",
                floor.program.display()
            );
        }
    }
    for v in &variants {
        if !v.server.is_file() {
            bail!(
                "variant {:?}: no qun binary at {} (build it with `cargo build --release -p \
                 qun-gateway`, or pass --server or QUN_BIN=PATH)",
                v.label,
                v.server.display()
            );
        }
    }
    let exe = std::env::current_exe().context("finding qun-loadtest's own binary")?;
    // Last of the checks, so that a refused comparison never starts it.
    let competitor = contend
        .map(|percent| {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            Competitor::start(percent, cores)
        })
        .transpose()?;
    let mut comparison = Comparison {
        rounds,
        transport,
        variants: variants.clone(),
        scenario: scenario.clone(),
        floor: floor.clone(),
        runs: Vec::new(),
        contention: None,
    };
    let total = rounds as usize * (variants.len() + usize::from(floor.is_some()));
    for round in 1..=rounds {
        if let Some(floor) = &floor {
            eprintln!(
                "qun-loadtest compare: run {} of {total}: round {round}, the loopback floor",
                comparison.runs.len() + 1
            );
            let run = floor_run(cli, round, floor)
                .await
                .with_context(|| format!("round {round}, the loopback floor"))?;
            comparison.runs.push(run);
        }
        for variant in round_order(variants.len(), round).map(|i| &variants[i]) {
            eprintln!(
                "qun-loadtest compare: run {} of {total}: round {round}, variant {}",
                comparison.runs.len() + 1,
                variant.label
            );
            let run = one_run(cli, &exe, round, transport, variant, &scenario)
                .await
                .with_context(|| format!("round {round}, variant {}", variant.label))?;
            comparison.runs.push(run);
        }
    }
    comparison.contention = competitor.map(Competitor::stop);
    Ok(comparison)
}

/// The order in which round `round` (from 1) runs `count` variants: the
/// order given, rotated by one more each round, so that every variant goes
/// first as often as the others over a multiple of `count` rounds.
fn round_order(count: usize, round: u32) -> impl Iterator<Item = usize> {
    let start = (round.saturating_sub(1) as usize)
        .checked_rem(count)
        .unwrap_or(0);
    (0..count).map(move |i| (start + i) % count)
}

/// Starts the variant's server, runs the scenario against it, stops it.
async fn one_run(
    cli: &Cli,
    exe: &Path,
    round: u32,
    transport: Transport,
    variant: &Variant,
    scenario: &[String],
) -> anyhow::Result<Run> {
    let dir = std::env::temp_dir().join(format!(
        "qun-compare-{}-{round}-{}",
        std::process::id(),
        variant.label
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::File::create(dir.join("server.log")).context("creating server.log")?;
    let mut server = tokio::process::Command::new(&variant.server)
        .arg("serve")
        .arg("--data-dir")
        .arg(&dir)
        .envs(variant.env.iter().map(|(k, v)| (k, v)))
        // Last, so that a variant cannot move the server off loopback; the
        // kernel picks free ports, and the server says which.
        .env("QUN_WS_LISTEN", "127.0.0.1:0")
        .env("QUN_HTTP_LISTEN", "127.0.0.1:0")
        .env("QUN_QUIC_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("sharing server.log")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", variant.server.display()))?;
    let pid = server.id().context("the server exited at once")?;
    let outcome = async {
        let listening = wait_ready(&mut server, &dir).await?;
        let metrics = format!("http://{}/metrics", listening.http);
        let json = dir.join("report.json");
        let mut command = tokio::process::Command::new(exe);
        match transport {
            Transport::Ws => command.arg("--url").arg(&listening.ws),
            Transport::Quic => command
                .arg("--url")
                .arg(&listening.quic)
                .arg("--cert-fingerprint")
                .arg(&listening.cert_sha256),
        };
        let status = command
            .arg("--data-dir")
            .arg(&dir)
            .arg("--server-pid")
            .arg(pid.to_string())
            .arg("--metrics-url")
            .arg(&metrics)
            .arg("--json")
            .arg(&json)
            .arg("--scheduling")
            .arg(cli.scheduling.to_string())
            .arg("--member-acks")
            .arg(cli.member_acks.to_string())
            .arg("--per-worker")
            .arg(cli.per_worker.to_string())
            .arg("--sources")
            .arg(cli.sources.to_string())
            .arg("--timeout")
            .arg(cli.timeout.to_string())
            .args(scenario)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .context("running the scenario")?;
        let report = read_report(&json);
        match (status.success(), report) {
            (true, Some(report)) => Ok(report),
            (true, None) => bail!("the scenario wrote no report to {}", json.display()),
            (false, _) => bail!(
                "the scenario failed ({status}); the server's log and data are kept in {}",
                dir.display()
            ),
        }
    }
    .await;
    stop(&mut server, pid).await;
    let report = outcome?;
    // Only a run that passed is cleaned up; a failed one is kept to read.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run {
        round,
        variant: variant.label.clone(),
        data_dir: dir,
        report,
    })
}

/// Runs the loopback floor once, bounded by `--timeout`.
async fn floor_run(cli: &Cli, round: u32, floor: &Floor) -> anyhow::Result<Run> {
    let dir = std::env::temp_dir().join(format!(
        "qun-compare-{}-{round}-{FLOOR}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("report.json");
    let mut program = tokio::process::Command::new(&floor.program);
    for (option, value) in [
        ("--groups", floor.groups.to_string()),
        ("--members", floor.members.to_string()),
        ("--rate", floor.rate.to_string()),
        ("--duration", floor.duration_s.to_string()),
        ("--workers", floor.workers.to_string()),
    ] {
        program.arg(option).arg(value);
    }
    if cli.member_acks.delayed() {
        program.arg("--delayed-acks");
    }
    program
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let timeout: Duration = cli.timeout.into();
    let status = tokio::time::timeout(timeout, program.status())
        .await
        .map_err(|_| anyhow::anyhow!("the floor did not end within --timeout {}", cli.timeout))?
        .with_context(|| format!("running {}", floor.program.display()))?;
    let report = read_report(&json);
    // The floor keeps nothing else there: its output went to this one's.
    let _ = std::fs::remove_dir_all(&dir);
    let report = match (status.success(), report) {
        (true, Some(report)) => report,
        (true, None) => bail!("the floor wrote no report"),
        (false, _) => bail!("the floor failed ({status}); its output is above"),
    };
    Ok(Run {
        round,
        variant: FLOOR.to_string(),
        data_dir: dir,
        report,
    })
}

/// The report a run wrote with `--json`, if it wrote a whole one.
fn read_report(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits until the server has said where it listens and answers on its
/// `/metrics` there.
async fn wait_ready(server: &mut tokio::process::Child, dir: &Path) -> anyhow::Result<Listening> {
    let started = Instant::now();
    loop {
        if let Some(status) = server.try_wait().context("watching the server")? {
            bail!(
                "the server exited before it served ({status}): {}",
                log_tail(dir)
            );
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        if let Some(listening) = Listening::parse(&log) {
            let metrics = format!("http://{}/metrics", listening.http);
            if crate::server_metrics::scrape(&metrics).await.is_ok() {
                return Ok(listening);
            }
        }
        if started.elapsed() > SERVER_START {
            bail!(
                "the server did not say where it listens and answer on /metrics within \
                 {SERVER_START:?}: {}",
                log_tail(dir)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the server to stop, and kills it if it has not within
/// [`SERVER_STOP`].
async fn stop(server: &mut tokio::process::Child, pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = uapi::kill(pid, uapi::c::SIGTERM);
    }
    if tokio::time::timeout(SERVER_STOP, server.wait())
        .await
        .is_err()
    {
        let _ = server.kill().await;
    }
}

/// The last lines of a run's server log, for an error message.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    format!(
        "its log ({}) ends:\n{tail}",
        dir.join("server.log").display()
    )
}

/// Where a server listens, from the line `qun serve` prints once it has
/// bound its sockets: `qun listening ws=ws://… http=ADDR quic=quic://…
/// cert_sha256=HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listening {
    /// `ws://ADDR/ws`.
    ws: String,
    /// `ADDR` of `/metrics`.
    http: String,
    /// `quic://ADDR`.
    quic: String,
    /// The QUIC certificate's SHA-256, to pin.
    cert_sha256: String,
}

impl Listening {
    /// The first `qun listening` line of a log with every field, if any.
    fn parse(log: &str) -> Option<Self> {
        let line = log.lines().find(|l| l.starts_with("qun listening "))?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
        };
        let cert_sha256 = field("cert_sha256")?;
        if cert_sha256.len() != 64 || !cert_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            ws: field("ws")?,
            http: field("http")?,
            quic: field("quic")?,
            cert_sha256,
        })
    }
}

impl Comparison {
    /// Every run as a row, variant by variant, for people.
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "qun-loadtest compare: {} round(s) of {} variant(s) over {}, interleaved: {}\n",
            self.rounds,
            self.variants.len(),
            match self.transport {
                Transport::Ws => "ws",
                Transport::Quic => "quic",
            },
            self.scenario.join(" ")
        );
        if let Some(c) = &self.contention {
            out.push_str(&format!(
                "  beside a competitor: {} thread(s) busy {}% of every {} ms, {:.2} cores had\n",
                c.threads,
                c.percent,
                crate::contention::PERIOD.as_millis(),
                c.cores
            ));
        }
        out.push_str(&table_row(COLUMNS.map(|(name, _)| name.to_string())));
        // The floor's p99 of a round, which that round's runs are set against.
        let floor_p99 = |round: u32| {
            self.runs
                .iter()
                .find(|r| r.round == round && r.variant == FLOOR)
                .and_then(|r| r.report["latency"]["p99_ms"].as_f64())
                .filter(|p99| *p99 > 0.0)
        };
        for label in self.labels() {
            for run in self.runs.iter().filter(|r| r.variant == label) {
                let r = &run.report;
                let num = |v: &serde_json::Value, digits: usize| {
                    v.as_f64()
                        .map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
                };
                let per_sec = PER_SEC
                    .iter()
                    .map(|k| &r["figures"][*k])
                    .find(|v| !v.is_null())
                    .unwrap_or(&serde_json::Value::Null);
                let times_floor = match (r["latency"]["p99_ms"].as_f64(), floor_p99(run.round)) {
                    (Some(p99), Some(floor)) if label != FLOOR => format!("{:.2}", p99 / floor),
                    _ => "-".to_string(),
                };
                // The floor's writing and reading processes stand where
                // the server and the load generator do.
                let (server, clients) = if label == FLOOR {
                    ("producer_cores", "members_cores")
                } else {
                    ("server_cores", "loadgen_cores")
                };
                out.push_str(&table_row([
                    label.to_string(),
                    run.round.to_string(),
                    num(&r["latency"]["p50_ms"], 1),
                    num(&r["latency"]["p99_ms"], 1),
                    num(&r["latency"]["max_ms"], 1),
                    r["counts"]["lost"]
                        .as_u64()
                        .map_or_else(|| "-".to_string(), |n| n.to_string()),
                    num(per_sec, 0),
                    num(&r["figures"][server], 2),
                    num(&r["figures"][clients], 2),
                    // The share of the run its busiest thread had work
                    // (1.00: it never ran out; see cpu.rs).
                    num(&r["figures"]["server_busiest_thread_runnable"], 2),
                    // Frames per write of the server's connections: on a
                    // busy machine the writers batch (docs/benchmarks.md).
                    num(&r["figures"]["server_frames_per_write"], 2),
                    times_floor,
                ]));
            }
        }
        // The median of each variant's runs, the figure to compare by when
        // one run of a series was disturbed.
        for label in self.labels() {
            let runs = || self.runs.iter().filter(move |r| r.variant == label);
            let of = |key: &str| {
                median(
                    runs()
                        .filter_map(|r| r.report["latency"][key].as_f64())
                        .collect(),
                )
            };
            if let (Some(p50), Some(p99)) = (of("p50_ms"), of("p99_ms")) {
                out.push_str(&format!(
                    "  {label:<14} median of its runs: p50 {p50:.1} ms, p99 {p99:.1} ms"
                ));
                let ratios = runs()
                    .filter(|_| label != FLOOR)
                    .filter_map(|r| {
                        Some(r.report["latency"]["p99_ms"].as_f64()? / floor_p99(r.round)?)
                    })
                    .collect();
                if let Some(ratio) = median(ratios) {
                    out.push_str(&format!(", p99 {ratio:.2} × the floor"));
                }
                out.push('\n');
            }
        }
        out
    }

    /// The variants' labels in the order given, then the floor's.
    fn labels(&self) -> impl Iterator<Item = &str> {
        self.variants
            .iter()
            .map(|v| v.label.as_str())
            .chain(self.floor.is_some().then_some(FLOOR))
    }
}

/// The table's columns: each one's header and width.
const COLUMNS: [(&str, usize); 12] = [
    ("variant", 14),
    ("round", 5),
    ("p50 ms", 10),
    ("p99 ms", 10),
    ("max ms", 10),
    ("lost", 6),
    ("per sec", 12),
    ("server", 8),
    ("clients", 8),
    ("busiest", 8),
    ("f/write", 8),
    ("× floor", 8),
];

/// One line of the table, each cell in its column's width: the first
/// aligned left, the others right.
fn table_row(cells: [String; COLUMNS.len()]) -> String {
    let mut line = String::from(" ");
    for (i, (cell, (_, width))) in cells.iter().zip(COLUMNS).enumerate() {
        line.push(' ');
        if i == 0 {
            line.push_str(&format!("{cell:<width$}"));
        } else {
            line.push_str(&format!("{cell:>width$}"));
        }
    }
    line.push('\n');
    line
}

/// The middle value (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_goes_first_in_turn() {
        let order = |round| round_order(3, round).collect::<Vec<_>>();
        assert_eq!(order(1), [0, 1, 2]);
        assert_eq!(order(2), [1, 2, 0]);
        assert_eq!(order(3), [2, 0, 1]);
        assert_eq!(order(4), [0, 1, 2]);
        assert_eq!(round_order(1, 7).collect::<Vec<_>>(), [0]);
        assert_eq!(round_order(0, 2).count(), 0);
    }

    #[test]
    fn a_variant_is_a_label_and_settings() {
        let qun = Path::new("/opt/qun");
        let v = Variant::parse("one=QUN_WORKER_THREADS=1 QUN_FSYNC=false", qun).unwrap();
        assert_eq!(v.label, "one");
        assert_eq!(v.server, qun);
        assert_eq!(
            v.env,
            [
                ("QUN_WORKER_THREADS".to_string(), "1".to_string()),
                ("QUN_FSYNC".to_string(), "false".to_string())
            ]
        );
        let bare = Variant::parse("default", qun).unwrap();
        assert_eq!((bare.label.as_str(), bare.env.len()), ("default", 0));
        let older = Variant::parse("before=QUN_BIN=/tmp/qun-old", qun).unwrap();
        assert_eq!(older.server, Path::new("/tmp/qun-old"));
        assert!(older.env.is_empty(), "QUN_BIN picks the binary only");
    }

    #[test]
    fn a_variant_needs_a_plain_label_and_whole_settings() {
        let qun = Path::new("/opt/qun");
        for bad in [
            "",
            "=QUN_WORKER_THREADS=1",
            "one two",
            "one=QUN_FSYNC",
            "one==1",
            "../up",
            "a/b=QUN_FSYNC=false",
            "one=QUN_BIN=",
        ] {
            let e = Variant::parse(bad, qun).unwrap_err().to_string();
            assert!(e.contains("variant"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_table_has_every_run_and_each_variants_median() {
        let run = |round, variant: &str, p50: f64, p99: f64| Run {
            round,
            variant: variant.into(),
            data_dir: PathBuf::new(),
            report: serde_json::json!({
                "latency": {"p50_ms": p50, "p99_ms": p99, "max_ms": p99 + 1.0},
                "counts": {"lost": 0},
                "figures": if variant == FLOOR {
                    serde_json::json!({
                        "deliveries_per_sec": 297_000.4,
                        "producer_cores": 0.806,
                        "members_cores": 0.712,
                    })
                } else {
                    serde_json::json!({
                        "deliveries_per_sec": 297_000.4,
                        "server_cores": 0.951,
                        "loadgen_cores": 0.874,
                        "server_busiest_thread_runnable": 0.987,
                        "server_frames_per_write": 2.594,
                    })
                },
            }),
        };
        let variant = |label: &str| Variant {
            label: label.into(),
            server: PathBuf::from("/opt/qun"),
            env: Vec::new(),
        };
        let c = Comparison {
            rounds: 3,
            transport: Transport::Ws,
            variants: vec![variant("one"), variant("two")],
            scenario: vec!["fanout".into()],
            floor: None,
            runs: vec![
                run(1, "one", 40.0, 130.0),
                run(1, "two", 60.0, 200.0),
                run(2, "one", 44.0, 110.0),
                run(2, "two", 62.0, 210.0),
                run(3, "one", 42.0, 500.0),
                run(3, "two", 64.0, 190.0),
            ],
            contention: None,
        };
        let table = c.table();
        assert!(
            table.contains("3 round(s) of 2 variant(s) over ws"),
            "{table}"
        );
        // Variant by variant: the three runs of "one" before those of "two".
        let rows: Vec<&str> = table.lines().filter(|l| l.contains("297000")).collect();
        assert_eq!(rows.len(), 6, "{table}");
        assert!(
            rows[..3].iter().all(|r| r.trim_start().starts_with("one")),
            "{table}"
        );
        let columns = |row: &str| {
            row.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            columns(rows[0]),
            [
                "one", "1", "40.0", "130.0", "131.0", "0", "297000", "0.95", "0.87", "0.99",
                "2.59", "-"
            ],
            "{table}"
        );
        // One disturbed run (p99 500) does not move the median.
        assert!(
            table.contains("one            median of its runs: p50 42.0 ms, p99 130.0 ms"),
            "{table}"
        );
        assert!(table.contains("p50 62.0 ms, p99 200.0 ms"), "{table}");
        assert!(
            !table.contains("× the floor"),
            "no floor, no ratio: {table}"
        );
        assert!(!table.contains("competitor"), "{table}");
        let mut contended = c.clone();
        contended.contention = Some(Contention {
            percent: 50,
            threads: 2,
            cores: 0.874,
        });
        assert!(
            contended.table().contains(
                "beside a competitor: 2 thread(s) busy 50% of every 10 ms, 0.87 cores had"
            ),
            "{}",
            contended.table()
        );
        assert_eq!(median(vec![3.0, 1.0]), Some(2.0));
        assert_eq!(median(Vec::new()), None);

        // With the floor: its rows come last, and each run's p99 is set
        // against the floor of its own round, not another's.
        let mut c = c;
        c.floor = Some(
            Floor::of_fanout(
                PathBuf::from("/opt/floor"),
                &["fanout".into(), "--rate".into(), "60".into()],
                2_500,
            )
            .unwrap(),
        );
        c.runs.extend([
            run(1, FLOOR, 10.0, 65.0),
            run(2, FLOOR, 9.0, 55.0),
            run(3, FLOOR, 30.0, 250.0),
        ]);
        let table = c.table();
        let rows: Vec<&str> = table.lines().filter(|l| l.contains("297000")).collect();
        assert_eq!(rows.len(), 9, "{table}");
        assert!(
            rows[6..]
                .iter()
                .all(|r| r.trim_start().starts_with("floor")),
            "{table}"
        );
        // 130 / 65, 110 / 55, 500 / 250: "one" was twice the floor in every round.
        assert!(rows[0].trim_end().ends_with("2.00"), "{table}");
        assert!(rows[2].trim_end().ends_with("2.00"), "{table}");
        assert!(rows[3].trim_end().ends_with("3.08"), "200 / 65: {table}");
        // The floor's writer and readers in the server's and clients'
        // columns; it has no threads' or writes' figures, nor a ratio to
        // itself.
        assert_eq!(
            columns(rows[6]),
            [
                "floor", "1", "10.0", "65.0", "66.0", "0", "297000", "0.81", "0.71", "-", "-", "-"
            ],
            "{table}"
        );
        assert!(
            table.contains(
                "one            median of its runs: p50 42.0 ms, p99 130.0 ms, p99 2.00 × the floor"
            ),
            "{table}"
        );
        assert!(
            table.contains("floor          median of its runs: p50 10.0 ms, p99 65.0 ms\n"),
            "{table}"
        );
    }

    #[test]
    fn the_floor_takes_the_fanouts_shape() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let floor = Floor::of_fanout(
            PathBuf::from("/opt/floor"),
            &args(&[
                "fanout",
                "--groups",
                "1",
                "--members",
                "5000",
                "--senders",
                "3",
                "--rate",
                "20",
                "--duration",
                "15500ms",
            ]),
            2_000,
        )
        .unwrap();
        assert_eq!(
            floor,
            Floor {
                program: PathBuf::from("/opt/floor"),
                groups: 1,
                members: 5_000,
                rate: 60.0,
                duration_s: 16,
                workers: 3,
            }
        );
        // The fan-out's defaults, as the fan-out itself would take them.
        let floor =
            Floor::of_fanout(PathBuf::new(), &args(&["fanout", "--rate", "60"]), 2_500).unwrap();
        assert_eq!(
            (floor.groups, floor.members, floor.duration_s, floor.workers),
            (100, 50, 10, 2)
        );
        for (bad, says) in [
            (args(&["fanout"]), "fixed --rate"),
            (
                args(&["fanout", "--rate", "60", "--senders", "0"]),
                "fixed --rate",
            ),
            (
                args(&["flash-sale", "--members", "10"]),
                "goes with a fanout",
            ),
            (args(&["fanout", "--rate", "fast"]), "reading the scenario"),
        ] {
            let e = Floor::of_fanout(PathBuf::new(), &bad, 2_500)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_addresses_and_certificate_are_read_from_the_server_log() {
        let hex = "f2ebf29e194b8a1ad4ff65097465b1fe39dcd9f44b28d23b93273f2972b7b5e3";
        let line = format!(
            "qun listening ws=ws://127.0.0.1:41001/ws http=127.0.0.1:41002 \
             quic=quic://127.0.0.1:41003 cert_sha256={hex}"
        );
        let log = format!("created a certificate\n{line}\nmore");
        let l = Listening::parse(&log).unwrap();
        assert_eq!(l.cert_sha256, hex);
        assert_eq!(l.ws, "ws://127.0.0.1:41001/ws");
        assert_eq!(l.http, "127.0.0.1:41002");
        assert_eq!(l.quic, "quic://127.0.0.1:41003");
        assert_eq!(Listening::parse("qun listening ws=…"), None);
        let short = line.replace(hex, "abc");
        assert_eq!(Listening::parse(&short), None, "not a whole hash");
    }

    #[test]
    fn the_scenario_must_be_one_and_leave_the_server_options_alone() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_scenario(&args(&["fanout", "--groups", "2"])).unwrap();
        for (bad, says) in [
            (args(&[]), "name the scenario"),
            (args(&["compare"]), "not \"compare\""),
            (args(&["worker", "--spec", "x"]), "not \"worker\""),
            (args(&["fanout", "--url", "ws://127.0.0.1:1/ws"]), "--url"),
            (args(&["fanout", "--json=out.json"]), "--json=out.json"),
        ] {
            let e = check_scenario(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
