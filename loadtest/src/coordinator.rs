//! The coordinator: sets a scenario up through its own connections, starts
//! the worker processes that run the members, says "go", runs the senders,
//! and turns what the workers measured into a [`Report`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use posting::drive_window;
use qun_client::{Client, ClientOptions, proto};
use qun_gateway::auth::TokenKey;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::cpu;
use crate::report::{Latency, Report, histogram, merge};
use crate::scheduling::Scheduling;
use crate::server_metrics::{self, Buckets, Scrape};
use crate::spec::{CoordinatorLine, Task, WorkerLine, WorkerResult, WorkerSpec};
use crate::{Cli, HistoryMode, Scenario, now_us, random_u64, source_ip};

/// Messages a sender keeps in flight when posting as fast as acks allow.
const WINDOW: usize = 64;

/// Runs the scenario of `cli` and reports.
///
/// # Errors
/// A non-loopback server, a missing token key, a failed setup request, or a
/// worker that could not start.
pub(crate) async fn run(cli: &Cli) -> anyhow::Result<Report> {
    let server_ip = loopback_server(&cli.url).await?;
    let key_file = cli.data_dir.join("token.key");
    if !key_file.exists() {
        bail!(
            "no token key at {}: point --data-dir at the server's data directory",
            key_file.display()
        );
    }
    let key = TokenKey::load_or_create(&cli.data_dir)?;
    let run_id = format!("{:06x}", random_u64() & 0xff_ffff);
    let shop = format!("lt-shop-{run_id}");
    let options = ClientOptions {
        cert_sha256: cli.cert_fingerprint.clone(),
        insecure_dev_cert: cli.insecure_dev_cert,
        timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let staff = |name: &str| {
        key.issue(
            &format!("lt-{run_id}-{name}"),
            name,
            "agent",
            Some(&shop),
            now_us() / 1_000_000,
            Duration::from_secs(24 * 3600),
        )
    };
    let agent = Arc::new(
        Client::connect_with(&cli.url, &staff("agent"), options.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{}", crate::worker::with_remedy(&e)))
            .context("connecting the coordinator's agent")?,
    );
    let ctx = Ctx {
        cli,
        server_ip,
        run_id: run_id.clone(),
        options,
        first_failure: Arc::default(),
    };
    let transport = if cli.url.starts_with("quic://") {
        "quic"
    } else {
        "ws"
    };
    let mut report = match cli.scenario.clone() {
        Scenario::Connections { count, groups } => connections(&ctx, &agent, count, groups).await?,
        Scenario::Fanout {
            groups,
            members,
            senders,
            rate,
            duration,
        } => {
            let senders_tokens: Vec<Vec<String>> = (0..groups)
                .map(|g| (0..senders).map(|s| staff(&format!("s{g}-{s}"))).collect())
                .collect();
            fanout(
                &ctx,
                &agent,
                groups,
                members,
                senders_tokens,
                rate,
                duration.into(),
            )
            .await?
        }
        Scenario::FlashSale {
            members,
            slots,
            within,
        } => flash_sale(&ctx, &agent, members, slots, within.into()).await?,
        Scenario::History {
            clients,
            messages,
            mode,
            behind,
        } => history(&ctx, &agent, clients, messages, mode, behind).await?,
        Scenario::Worker { .. } | Scenario::Compare(_) => {
            bail!("worker and compare are not scenarios")
        }
    };
    transport.clone_into(&mut report.transport);
    report.first_failure = ctx.first_failure.get().cloned();
    report
        .params
        .insert("scheduling".into(), cli.scheduling.to_string());
    // Over QUIC there are no TCP ACKs to delay.
    let member_acks = match transport {
        "ws" => cli.member_acks.to_string(),
        _ => "none (not TCP)".to_string(),
    };
    report.params.insert("member_acks".into(), member_acks);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// What every scenario needs.
struct Ctx<'a> {
    cli: &'a Cli,
    server_ip: IpAddr,
    run_id: String,
    options: ClientOptions,
    /// Why the first member that could not connect or join failed, as
    /// its worker reported it (with what to do, when that is known).
    first_failure: Arc<OnceLock<String>>,
}

/// The server's address, refusing anything but loopback.
async fn loopback_server(url: &str) -> anyhow::Result<IpAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("quic://"))
        .context("the URL must be ws://… or quic://…")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addrs: Vec<_> = tokio::net::lookup_host(authority)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .collect();
    match addrs.first() {
        Some(a) if addrs.iter().all(|a| a.ip().is_loopback()) => Ok(a.ip()),
        _ => bail!(
            "{authority} is not a loopback address: qun-loadtest only targets 127.0.0.1 or ::1"
        ),
    }
}

/// The progress of a measured phase, on stderr: a bar that fills over the
/// phase's length when it is bounded in time, else a spinner with the time
/// so far. Like the connecting bar, it is hidden when stderr is not a
/// terminal, and cleared when dropped.
struct Phase {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Phase {
    /// How often a phase's display moves.
    const TICK: Duration = Duration::from_millis(200);

    /// A phase that lasts `length`.
    fn timed(what: &str, length: Duration) -> Self {
        let bar = ProgressBar::new(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:40} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{what} for {length:?}"));
        let started = Instant::now();
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                shown.set_position(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
                tokio::time::sleep(Self::TICK).await;
            }
        });
        Self {
            bar,
            ticker: Some(ticker),
        }
    }

    /// A phase that ends when its work does.
    fn open_ended(what: &str) -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Self::TICK);
        Self { bar, ticker: None }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

/// The server's resident memory, from `/proc/PID/status`, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The worker processes of one run.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(usize, WorkerLine)>,
    total: usize,
    /// The policy every worker must report it runs under.
    scheduling: Scheduling,
    /// [`Ctx::first_failure`].
    first_failure: Arc<OnceLock<String>>,
}

impl Workers {
    /// Starts enough workers for `total` members, each with `task`.
    fn spawn(ctx: &Ctx<'_>, total: usize, task: &Task) -> anyhow::Result<Self> {
        let per = ctx.cli.per_worker.max(1);
        let exe = std::env::current_exe().context("finding qun-loadtest's own binary")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for (w, first) in (0..total).step_by(per).enumerate() {
            let spec = WorkerSpec {
                url: ctx.cli.url.clone(),
                data_dir: ctx.cli.data_dir.clone(),
                cert_sha256: ctx.options.cert_sha256.clone(),
                insecure_dev_cert: ctx.options.insecure_dev_cert,
                source_ip: source_ip(ctx.cli.sources, ctx.server_ip, w),
                member_acks: ctx.cli.member_acks,
                run_id: ctx.run_id.clone(),
                first,
                count: per.min(total - first),
                task: task.clone(),
            };
            let mut child = tokio::process::Command::new(&exe)
                .args(["worker", "--spec", &serde_json::to_string(&spec)?])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("worker {w} has no pipes");
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut out = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = out.next_line().await {
                    if let Ok(l) = serde_json::from_str::<WorkerLine>(&line) {
                        let _ = tx.send((w, l));
                    }
                }
            });
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Self {
            children,
            stdins,
            lines,
            total,
            scheduling: ctx.cli.scheduling,
            first_failure: ctx.first_failure.clone(),
        })
    }

    /// Waits until every worker is set up, showing progress. Returns the
    /// connected and failed counts and how long it took.
    async fn ready(&mut self) -> anyhow::Result<(usize, usize, Duration)> {
        let started = Instant::now();
        let bar = ProgressBar::new(self.total as u64);
        bar.set_style(
            ProgressStyle::with_template("connecting {bar:40} {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut progress = vec![0usize; self.children.len()];
        let mut ready = 0;
        let (mut connected, mut failed) = (0, 0);
        while ready < self.children.len() {
            let Some((w, line)) = self.lines.recv().await else {
                bail!("a worker exited during setup");
            };
            match line {
                WorkerLine::Progress(n) => progress[w] = n,
                WorkerLine::Ready {
                    connected: c,
                    failed: f,
                    scheduling,
                    first_failure,
                } => {
                    if let Some(why) = first_failure {
                        let _ = self.first_failure.set(why);
                    }
                    // The policy is inherited, not set by the worker: a
                    // difference means the report would describe another
                    // setup than the one measured.
                    if scheduling != Some(self.scheduling) {
                        bail!(
                            "worker {w} runs under scheduling {}, not {} (--scheduling)",
                            scheduling.map_or("unknown".to_string(), |s| s.to_string()),
                            self.scheduling
                        );
                    }
                    ready += 1;
                    connected += c;
                    failed += f;
                }
                WorkerLine::Error(e) => bail!("worker {w}: {e}"),
                WorkerLine::Result(_) => {}
            }
            bar.set_position(progress.iter().sum::<usize>() as u64);
        }
        bar.finish_and_clear();
        Ok((connected, failed, started.elapsed()))
    }

    /// The worker processes' PIDs, for their CPU time.
    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    async fn say(&mut self, line: &CoordinatorLine) -> anyhow::Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        for stdin in &mut self.stdins {
            stdin.write_all(text.as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Collects every worker's result.
    async fn results(&mut self) -> anyhow::Result<Vec<WorkerResult>> {
        let mut out = Vec::new();
        while out.len() < self.children.len() {
            match self.lines.recv().await {
                Some((_, WorkerLine::Result(r))) => out.push(r),
                Some((w, WorkerLine::Error(e))) => bail!("worker {w}: {e}"),
                Some(_) => {}
                None => bail!("a worker exited before reporting"),
            }
        }
        Ok(out)
    }

    /// Tells every worker to stop and waits for them.
    async fn stop(mut self) {
        let _ = self.say(&CoordinatorLine::Stop).await;
        drop(self.stdins);
        for mut c in self.children {
            if tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

/// The workers' results folded together.
struct Totals {
    ops: u64,
    lost: u64,
    duplicates: u64,
    gaps: u64,
    counts: BTreeMap<String, u64>,
    latency: Latency,
    /// A part of the operation (`WorkerResult::part_latency`), if the
    /// scenario measures one.
    part_latency: Option<Latency>,
}

fn fold(results: &[WorkerResult]) -> anyhow::Result<Totals> {
    let mut h = histogram();
    let mut part = histogram();
    let mut counts = BTreeMap::new();
    let (mut ops, mut lost, mut duplicates, mut gaps) = (0, 0, 0, 0);
    for r in results {
        merge(&mut h, &r.latency)?;
        merge(&mut part, &r.part_latency)?;
        ops += r.ops;
        lost += r.lost;
        duplicates += r.duplicates;
        gaps += r.gaps;
        for (k, v) in &r.results {
            *counts.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.errors {
            *counts.entry(format!("error: {k}")).or_default() += v;
        }
    }
    Ok(Totals {
        ops,
        lost,
        duplicates,
        gaps,
        counts,
        latency: Latency::of(&h),
        part_latency: (!part.is_empty()).then(|| Latency::of(&part)),
    })
}

/// The server's histograms, when `--metrics-url` was given.
async fn server_requests(ctx: &Ctx<'_>) -> anyhow::Result<Option<Scrape>> {
    match &ctx.cli.metrics_url {
        Some(url) => Ok(Some(server_metrics::scrape(url).await?)),
        None => Ok(None),
    }
}

/// Adds the server's own request latency over the measured phase, its
/// store's time to durability within it, and the fan-out queue's wait
/// (bucket bounds: "at most"), to a report.
fn add_server_share(r: &mut Report, before: Option<Scrape>, after: Option<Scrape>) {
    let (Some(before), Some(after)) = (before, after) else {
        return;
    };
    let run = after.requests.since(&before.requests);
    r.counts.insert("server_requests".into(), run.count());
    // Histograms an older server lacks are left out.
    let since = |after: &Option<Buckets>, before: &Option<Buckets>| {
        Some(after.as_ref()?.since(before.as_ref()?))
    };
    let store = since(&after.store, &before.store);
    if let Some(store) = &store {
        r.counts
            .insert("server_store_submissions".into(), store.count());
    }
    let fanout_wait = since(&after.fanout_wait, &before.fanout_wait);
    // The embedded store's commits, phase by phase: a slow disk shows in
    // the persist phase, a store stalled by its own flushes in the write.
    let commit_phases = after
        .commit_phases
        .as_ref()
        .zip(before.commit_phases.as_ref())
        .map(|((w, p), (w0, p0))| (w.since(w0), p.since(p0)));
    if let Some((write, _)) = &commit_phases {
        r.counts
            .insert("server_store_commits".into(), write.count());
    }
    if let Some(wait) = &fanout_wait {
        r.counts.insert("server_fanout_turns".into(), wait.count());
    }
    if let (Some(after), Some(before)) = (after.sent_index_reads, before.sent_index_reads) {
        // Sends that cost a store read to rule out a retry; the Rust
        // client's first attempts cost none.
        r.counts.insert(
            "server_sent_index_reads".into(),
            after.saturating_sub(before),
        );
    }
    if let (Some((frames, writes)), Some((frames_before, writes_before))) =
        (after.frames_and_writes, before.frames_and_writes)
    {
        // Frames per write: under load a connection's writer finds several
        // waiting and writes them with one system call.
        let writes = writes.saturating_sub(writes_before);
        r.counts.insert("server_writes".into(), writes);
        if writes > 0 {
            r.figures.insert(
                "server_frames_per_write".into(),
                frames.saturating_sub(frames_before) as f64 / writes as f64,
            );
        }
    }
    if let Some(workers) = after.runtime_workers {
        // How the server was set up is part of what was measured.
        r.params
            .insert("server_worker_threads".into(), workers.to_string());
    }
    for (what, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
        if let Some(ms) = run.quantile_bound_ms(q) {
            r.figures
                .insert(format!("server_request_{what}_ms_at_most"), ms);
        }
        if let Some(ms) = store.as_ref().and_then(|s| s.quantile_bound_ms(q)) {
            r.figures
                .insert(format!("server_store_durable_{what}_ms_at_most"), ms);
        }
        if let Some(ms) = fanout_wait.as_ref().and_then(|w| w.quantile_bound_ms(q)) {
            r.figures
                .insert(format!("server_fanout_wait_{what}_ms_at_most"), ms);
        }
        if let Some((write, persist)) = &commit_phases {
            for (phase, h) in [("write", write), ("persist", persist)] {
                if let Some(ms) = h.quantile_bound_ms(q) {
                    r.figures
                        .insert(format!("server_store_{phase}_{what}_ms_at_most"), ms);
                }
            }
        }
    }
}

fn report(scenario: &str, params: &[(&str, String)]) -> Report {
    Report {
        scenario: scenario.into(),
        transport: String::new(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect(),
        figures: BTreeMap::new(),
        latency: None,
        parts: BTreeMap::new(),
        counts: BTreeMap::new(),
        checks: BTreeMap::new(),
        first_failure: None,
        elapsed_ms: 0.0,
    }
}

async fn create_groups(
    agent: &Arc<Client>,
    n: usize,
    max_members: usize,
) -> anyhow::Result<Vec<u64>> {
    let max = u32::try_from(max_members.clamp(2, 100_000)).unwrap_or(100_000);
    let mut groups = Vec::with_capacity(n);
    for g in 0..n {
        let info = agent
            .create_group(&format!("load {g}"), max)
            .await
            .context("creating a group")?;
        groups.push(info.group_id);
    }
    Ok(groups)
}

async fn connections(
    ctx: &Ctx<'_>,
    agent: &Arc<Client>,
    count: usize,
    groups: usize,
) -> anyhow::Result<Report> {
    let groups = create_groups(agent, groups.max(1), count / groups.max(1) + 10).await?;
    let before = ctx.cli.server_pid.and_then(rss_bytes);
    let mut workers = Workers::spawn(ctx, count, &Task::Idle { groups })?;
    let (connected, failed, took) = workers.ready().await?;
    let after = ctx.cli.server_pid.and_then(rss_bytes);
    workers.say(&CoordinatorLine::Go).await?;
    workers.results().await?;
    workers.stop().await;
    let mut r = report("connections", &[("count", count.to_string())]);
    r.elapsed_ms = took.as_secs_f64() * 1000.0;
    r.figures.insert(
        "connections_per_sec".into(),
        connected as f64 / took.as_secs_f64(),
    );
    if let (Some(b), Some(a)) = (before, after) {
        r.figures
            .insert("server_rss_mib".into(), a as f64 / 1048576.0);
        let per = a.saturating_sub(b) as f64 / connected.max(1) as f64;
        r.figures
            .insert("server_rss_per_connection_bytes".into(), per);
    }
    r.counts.insert("connected".into(), connected as u64);
    r.counts.insert("failed".into(), failed as u64);
    r.checks.insert("all_connected".into(), failed == 0);
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    ctx: &Ctx<'_>,
    agent: &Arc<Client>,
    groups: usize,
    members: usize,
    sender_tokens: Vec<Vec<String>>,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Report> {
    let senders_per_group = sender_tokens.first().map_or(0, Vec::len);
    let group_ids = create_groups(agent, groups, members + senders_per_group + 10).await?;
    // Senders: staff of the shop (never rate-limited), each on its own
    // connection, joined to its group.
    let mut senders = Vec::new();
    for (g, tokens) in group_ids.iter().zip(sender_tokens) {
        for token in tokens {
            let c = Client::connect_with(&ctx.cli.url, &token, ctx.options.clone()).await?;
            c.join(*g).await?;
            senders.push((*g, Arc::new(c)));
        }
    }
    let total = groups * members;
    let mut workers = Workers::spawn(
        ctx,
        total,
        &Task::Fanout {
            groups: group_ids.clone(),
        },
    )?;
    let (connected, failed, _) = workers.ready().await?;
    let server_before = server_requests(ctx).await?;
    workers.say(&CoordinatorLine::Go).await?;
    let started = Instant::now();
    let cpu_before = cpu::sample(ctx.cli.server_pid, &workers.pids());
    eprintln!("posting for {duration:?}...");
    let phase = Phase::timed("posting", duration);
    let count = senders.len();
    let posting: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(k, (g, c))| {
            let phase = phase_of(k, count, rate);
            tokio::spawn(
                async move { (g, drive_window(c, g, rate, phase, duration, WINDOW).await) },
            )
        })
        .collect();
    let mut ends: BTreeMap<u64, u64> = BTreeMap::new();
    let mut posted = 0u64;
    let mut send_errors = 0u64;
    for p in posting {
        let (g, (sent, last, errors)) = p.await?;
        posted += sent;
        send_errors += errors;
        let e = ends.entry(g).or_default();
        *e = (*e).max(last);
    }
    let posting_took = started.elapsed();
    let cpu_after = cpu::sample(ctx.cli.server_pid, &workers.pids());
    drop(phase);
    workers.say(&CoordinatorLine::End(ends.clone())).await?;
    let draining = Phase::open_ended("members reading the last messages");
    let results = workers.results().await?;
    drop(draining);
    let took = started.elapsed();
    let server_after = server_requests(ctx).await?;
    workers.stop().await;
    let t = fold(&results)?;
    // Each member of group g must receive every message of g.
    let expected: u64 = group_ids
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let members_of_g = (0..total).filter(|i| i % groups == gi).count() as u64;
            ends.get(g).copied().unwrap_or(0) * members_of_g
        })
        .sum();
    let mut r = report(
        "fanout",
        &[
            ("groups", groups.to_string()),
            ("members", members.to_string()),
            ("senders_per_group", senders_per_group.to_string()),
            (
                "rate_per_sender",
                if rate > 0.0 {
                    rate.to_string()
                } else {
                    "max".into()
                },
            ),
            ("duration", format!("{duration:?}")),
        ],
    );
    r.elapsed_ms = took.as_secs_f64() * 1000.0;
    r.figures.insert(
        "messages_per_sec".into(),
        posted as f64 / posting_took.as_secs_f64(),
    );
    r.figures.insert(
        "deliveries_per_sec".into(),
        t.ops as f64 / took.as_secs_f64(),
    );
    r.latency = Some(t.latency);
    if let Some(l) = t.part_latency {
        r.parts.insert("after_sequencing_latency".into(), l);
    }
    r.counts = t.counts;
    r.counts
        .insert("members_connected".into(), connected as u64);
    r.counts.insert("members_failed".into(), failed as u64);
    r.counts.insert("messages_posted".into(), posted);
    r.counts.insert("send_errors".into(), send_errors);
    r.counts.insert("deliveries".into(), t.ops);
    r.counts.insert("deliveries_expected".into(), expected);
    r.counts.insert("lost".into(), t.lost);
    r.counts.insert("duplicates_dropped".into(), t.duplicates);
    r.counts.insert("gaps_filled".into(), t.gaps);
    r.checks.insert("all_members_connected".into(), failed == 0);
    r.checks
        .insert("nothing_lost".into(), t.lost == 0 && t.ops >= expected);
    add_server_share(&mut r, server_before, server_after);
    cpu::report(&mut r, &cpu_before, &cpu_after);
    if let (Some(segments), Some(deliveries)) = (
        r.figures.get("machine_tcp_segments_per_sec").copied(),
        r.figures.get("deliveries_per_sec").copied(),
    ) && deliveries > 0.0
    {
        r.figures
            .insert("tcp_segments_per_delivery".into(), segments / deliveries);
    }
    Ok(r)
}

async fn flash_sale(
    ctx: &Ctx<'_>,
    agent: &Arc<Client>,
    members: usize,
    slots: u32,
    within: Duration,
) -> anyhow::Result<Report> {
    let group = create_groups(agent, 1, members + 10).await?[0];
    agent
        .post_card(proto::PostCard {
            group_id: group,
            product_id: "lt-phone".into(),
            product: Some(proto::Product {
                product_id: "lt-phone".into(),
                title: "Load-test phone".into(),
                price_minor: 599_900,
                ..Default::default()
            }),
        })
        .await?;
    let group_buy = agent
        .start_group_buy(proto::StartGroupBuy {
            group_id: group,
            product_id: "lt-phone".into(),
            price_minor: 499_900,
            target: 2,
            slots: slots.max(2),
            starts_at_ms: 0,
            deadline_ms: now_us() / 1000 + 3_600_000,
        })
        .await?
        .seq;
    let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
    let task = Task::FlashSale {
        group,
        group_buy,
        within_ms,
    };
    let mut workers = Workers::spawn(ctx, members, &task)?;
    let (connected, failed, _) = workers.ready().await?;
    let server_before = server_requests(ctx).await?;
    eprintln!("{connected} members joining within {within:?}...");
    workers.say(&CoordinatorLine::Go).await?;
    let started = Instant::now();
    let cpu_before = cpu::sample(ctx.cli.server_pid, &workers.pids());
    let joining = Phase::open_ended("joining");
    let results = workers.results().await?;
    drop(joining);
    let took = started.elapsed();
    let cpu_after = cpu::sample(ctx.cli.server_pid, &workers.pids());
    let server_after = server_requests(ctx).await?;
    workers.stop().await;
    let t = fold(&results)?;
    let shown = agent.commerce_object(group, group_buy).await?;
    let joined = match shown.object {
        Some(proto::commerce_answer::Object::GroupBuy(g)) => g.joined,
        _ => 0,
    };
    let mut r = report(
        "flash-sale",
        &[
            ("members", members.to_string()),
            ("slots", slots.to_string()),
            ("within", format!("{within:?}")),
        ],
    );
    r.elapsed_ms = took.as_secs_f64() * 1000.0;
    r.figures
        .insert("joins_per_sec".into(), t.ops as f64 / took.as_secs_f64());
    r.latency = Some(t.latency);
    if let Some(l) = t.part_latency {
        r.parts.insert("winners_latency".into(), l);
    }
    r.counts = t.counts;
    r.counts
        .insert("members_connected".into(), connected as u64);
    r.counts.insert("members_failed".into(), failed as u64);
    r.counts
        .insert("group_buy_joined".into(), u64::from(joined));
    let expect = u32::try_from(connected)
        .unwrap_or(u32::MAX)
        .min(slots.max(2));
    r.checks
        .insert("exactly_slots_joined".into(), joined == expect);
    r.checks.insert(
        "winners_match_answers".into(),
        r.counts.get("joined").copied().unwrap_or(0) == u64::from(joined),
    );
    add_server_share(&mut r, server_before, server_after);
    cpu::report(&mut r, &cpu_before, &cpu_after);
    Ok(r)
}

async fn history(
    ctx: &Ctx<'_>,
    agent: &Arc<Client>,
    clients: usize,
    messages: usize,
    mode: HistoryMode,
    behind: u64,
) -> anyhow::Result<Report> {
    let group = create_groups(agent, 1, clients + 10).await?[0];
    eprintln!("posting {messages} messages of history...");
    let posting = Phase::open_ended("posting history");
    let (_, last_seq, _) = drive_count(agent.clone(), group, messages as u64).await;
    drop(posting);
    let task = match mode {
        HistoryMode::Backfill => Task::Backfill {
            group,
            page: 50,
            last_seq,
        },
        HistoryMode::Resume => Task::ResumeStorm {
            group,
            last_seq,
            behind,
        },
    };
    let mut workers = Workers::spawn(ctx, clients, &task)?;
    let (connected, failed, _) = workers.ready().await?;
    workers.say(&CoordinatorLine::Go).await?;
    let started = Instant::now();
    let storm = Phase::open_ended(match mode {
        HistoryMode::Backfill => "paging back",
        HistoryMode::Resume => "resuming",
    });
    let results = workers.results().await?;
    drop(storm);
    let took = started.elapsed();
    workers.stop().await;
    let t = fold(&results)?;
    let name = match mode {
        HistoryMode::Backfill => "history backfill",
        HistoryMode::Resume => "history resume",
    };
    let mut r = report(
        name,
        &[
            ("clients", clients.to_string()),
            ("messages", messages.to_string()),
            ("behind", behind.to_string()),
        ],
    );
    r.elapsed_ms = took.as_secs_f64() * 1000.0;
    let unit = if mode == HistoryMode::Backfill {
        "pages_per_sec"
    } else {
        "messages_caught_up_per_sec"
    };
    r.figures
        .insert(unit.into(), t.ops as f64 / took.as_secs_f64());
    r.latency = Some(t.latency);
    r.counts = t.counts;
    r.counts
        .insert("clients_connected".into(), connected as u64);
    r.counts.insert("clients_failed".into(), failed as u64);
    r.counts.insert("lost".into(), t.lost);
    r.checks.insert("nothing_lost".into(), t.lost == 0);
    if mode == HistoryMode::Backfill {
        // A seq on two pages: the pages overlap.
        r.counts.insert("duplicates".into(), t.duplicates);
        r.checks.insert("no_duplicates".into(), t.duplicates == 0);
    }
    r.checks.insert("all_clients_connected".into(), failed == 0);
    Ok(r)
}

/// When sender `k` of `count`, each posting `rate` messages a second,
/// posts its first message: the senders take turns evenly over one
/// interval, as independent phones would, instead of all posting at the
/// same instant (which turns a steady rate into bursts of `count`).
fn phase_of(k: usize, count: usize, rate: f64) -> Duration {
    if rate <= 0.0 || count == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(k as f64 / count as f64 / rate)
}

/// Posts exactly `n` messages with `WINDOW` in flight; returns (posted,
/// last seq, errors).
async fn drive_count(client: Arc<Client>, group: u64, n: u64) -> (u64, u64, u64) {
    posting::post_n(client, group, n, WINDOW).await
}

/// Keeping a window of sends in flight, from the task that paces them.
///
/// The sends are futures polled by that one task, not tasks of their own:
/// an ack wakes the task that also sleeps until the next send is due, so a
/// send costs one task and no spawn (the coordinator paces thousands a
/// second on the cores the server and the members share).
mod posting {
    use std::future::Future;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures_util::StreamExt as _;
    use futures_util::stream::FuturesUnordered;
    use qun_client::Client;
    use qun_client::proto::SendAck;

    use crate::now_us;

    /// Posts for `duration` at `rate` per second (0: as fast as acks allow,
    /// `window` in flight). Returns (posted, last seq, errors).
    pub(super) async fn drive_window(
        client: Arc<Client>,
        group: u64,
        rate: f64,
        phase: Duration,
        duration: Duration,
        window: usize,
    ) -> (u64, u64, u64) {
        let started = Instant::now() + phase;
        tokio::time::sleep_until(started.into()).await;
        let mut in_flight = FuturesUnordered::new();
        let mut tally = Tally::default();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            if rate > 0.0 {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                let sleep = tokio::time::sleep_until(due.into());
                tokio::pin!(sleep);
                // Acks are taken while waiting for the next send's time.
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        Some(r) = in_flight.next(), if !in_flight.is_empty() => tally.add(r),
                    }
                }
            }
            tally.settle(&mut in_flight, window.saturating_sub(1)).await;
            in_flight.push(send_now(&client, group));
            sent += 1;
        }
        tally.settle(&mut in_flight, 0).await;
        tally.into_parts()
    }

    /// Posts exactly `n` messages, `window` in flight.
    pub(super) async fn post_n(
        client: Arc<Client>,
        group: u64,
        n: u64,
        window: usize,
    ) -> (u64, u64, u64) {
        let mut in_flight = FuturesUnordered::new();
        let mut tally = Tally::default();
        for _ in 0..n {
            tally.settle(&mut in_flight, window.saturating_sub(1)).await;
            in_flight.push(send_now(&client, group));
        }
        tally.settle(&mut in_flight, 0).await;
        tally.into_parts()
    }

    /// One send whose text is the time it is first polled, when it goes
    /// out (µs since the epoch): the members measure from it.
    fn send_now(
        client: &Arc<Client>,
        group: u64,
    ) -> impl Future<Output = Result<SendAck, qun_client::ClientError>> + use<> {
        let c = client.clone();
        async move { c.send(group, &now_us().to_string(), None).await }
    }

    /// Sends acked, the newest seq, sends failed.
    #[derive(Default)]
    struct Tally {
        posted: u64,
        last: u64,
        errors: u64,
    }

    impl Tally {
        fn add(&mut self, r: Result<SendAck, qun_client::ClientError>) {
            match r {
                Ok(ack) => {
                    self.posted += 1;
                    self.last = self.last.max(ack.seq);
                }
                Err(_) => self.errors += 1,
            }
        }

        /// Counts sends of `in_flight` as they end until at most
        /// `at_most` are left.
        async fn settle<F>(&mut self, in_flight: &mut FuturesUnordered<F>, at_most: usize)
        where
            F: Future<Output = Result<SendAck, qun_client::ClientError>>,
        {
            while in_flight.len() > at_most {
                if let Some(r) = in_flight.next().await {
                    self.add(r);
                }
            }
        }

        fn into_parts(self) -> (u64, u64, u64) {
            (self.posted, self.last, self.errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_take_turns_over_one_interval() {
        // Four senders at 10 msg/s: one every 25 ms, the first at once.
        let phases: Vec<Duration> = (0..4).map(|k| phase_of(k, 4, 10.0)).collect();
        assert_eq!(phases, [0, 25, 50, 75].map(Duration::from_millis).to_vec());
        // As fast as acks allow: no pacing, so no phase.
        assert_eq!(phase_of(3, 4, 0.0), Duration::ZERO);
    }
}
