//! The floor under `qun-loadtest fanout` on this machine: the same pattern of
//! writes over loopback, with no protocol, no store and no server logic.
//!
//! A fan-out run at 300k deliveries/s spends most of the machine in the
//! kernel: one `writev` per delivery on the server, one wake-up and read per
//! delivery in the load generator. This program does only that, so its
//! latency is the least any server could show here with its clients on the
//! same two cores:
//!
//! - the parent process is the "server": it accepts `groups × members`
//!   TCP connections, and for each group a task produces `rate` frames a
//!   second (the groups out of step, as the load generator's senders are).
//!   Each frame is built once as [`Bytes`] and queued to every member's
//!   bounded channel; each connection has its own writer task that writes
//!   what is queued (several frames in one write when more than one waits),
//!   as Qun's connection writers do.
//! - `--workers` child processes are the "members": each opens its share of
//!   the connections, reads, cuts fixed-size frames out of its buffer and
//!   records the time from the frame's creation (a Unix timestamp in the
//!   frame) to its read.
//!
//! ```sh
//! cargo run --release -p qun-loadtest --example loopback_floor -- \
//!     --groups 100 --members 50 --rate 60 --duration 10
//! ```
//!
//! It prints deliveries/s, the latency percentiles, frames lost (queued to a
//! full channel or not read), how busy the machine was and the cores this
//! process and the member processes used; `--json FILE`
//! writes the same as a report `qun-loadtest compare --floor` reads, which
//! runs this program beside each round of a fan-out comparison. Loopback only;
//! bounded in time; every process stops by itself.

use std::io::{BufRead, BufReader, IoSlice};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Bytes per frame: about the size of a Qun chat push on the wire.
const FRAME: usize = 72;
/// Frames a connection's queue holds before the producer counts a loss.
const QUEUE: usize = 256;
/// Frames written by one `writev` at most.
const BATCH: usize = 64;
/// How long the parent waits for the next member connection.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
struct Args {
    /// Groups; each gets its own producer.
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Members per group; each is one connection.
    #[arg(long, default_value_t = 50)]
    members: usize,
    /// Frames per second per group.
    #[arg(long, default_value_t = 60.0)]
    rate: f64,
    /// Seconds of producing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Member processes; the connections are split evenly.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Hand each frame from the reading task to a second task per
    /// connection over a bounded channel before it is timed, as the Rust
    /// client's reader hands events to the application (one more task
    /// wake-up per delivery).
    #[arg(long)]
    hop: bool,
    /// The members ask their kernel to delay its ACKs (`TCP_QUICKACK` off
    /// after every read), as `qun-loadtest --member-acks delayed` does: an
    /// ACK for every second frame instead of one per frame.
    #[arg(long)]
    delayed_acks: bool,
    /// Also write the figures as JSON to this file, shaped like a
    /// `qun-loadtest` report (`latency.p99_ms`, `counts.lost`,
    /// `figures.deliveries_per_sec`), as `qun-loadtest compare --floor`
    /// reads them.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: run as a member process connecting `--connections` to this
    /// address.
    #[arg(long, hide = true)]
    member_of: Option<SocketAddr>,
    /// Internal: connections of a member process.
    #[arg(long, hide = true, default_value_t = 0)]
    connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.member_of {
        Some(addr) => runtime.block_on(member_process(
            addr,
            args.connections,
            args.hop,
            args.delayed_acks,
        )),
        None => runtime.block_on(server_process(args)),
    }
}

/// Microseconds since the Unix epoch, comparable between processes.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The parent: accepts the members, produces, and reports.
async fn server_process(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.groups > 0 && args.members > 0 && args.workers > 0);
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let total = args.groups * args.members;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for w in 0..args.workers {
        let n = total / args.workers + usize::from(w < total % args.workers);
        children.push(
            Command::new(&exe)
                .arg("--member-of")
                .arg(addr.to_string())
                .arg("--connections")
                .arg(n.to_string())
                .args(args.hop.then_some("--hop"))
                .args(args.delayed_acks.then_some("--delayed-acks"))
                .stdout(Stdio::piped())
                .spawn()?,
        );
    }

    // Connection k belongs to group k % groups.
    let mut queues: Vec<Vec<mpsc::Sender<Bytes>>> = vec![Vec::new(); args.groups];
    let mut writers = Vec::with_capacity(total);
    for k in 0..total {
        // A member process that cannot connect (it exits with its error)
        // must not leave this one waiting for ever.
        let (stream, _) = tokio::time::timeout(CONNECT_WITHIN, listener.accept())
            .await
            .map_err(|_| {
                anyhow::anyhow!("only {k} of {total} connected within {CONNECT_WITHIN:?}")
            })??;
        stream.set_nodelay(true)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        queues[k % args.groups].push(tx);
        writers.push(tokio::spawn(connection_writer(stream, rx)));
        if (k + 1) % 1000 == 0 {
            eprintln!("loopback_floor: {} of {total} connected", k + 1);
        }
    }
    eprintln!("loopback_floor: producing for {} s", args.duration);

    let member_pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();
    let cpu_before = cpu_sample(&member_pids);
    let sampled = Instant::now();
    let started = sampled + Duration::from_millis(100);
    let until = started + Duration::from_secs(args.duration);
    let producers: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(g, members)| {
            // Out of step: group g starts g / groups of an interval late.
            let phase = Duration::from_secs_f64(g as f64 / args.groups as f64 / args.rate);
            tokio::spawn(produce(members, started + phase, until, args.rate))
        })
        .collect();
    // A bar over the producing time (hidden when stderr is not a terminal).
    let bar = indicatif::ProgressBar::new(args.duration * 10);
    let ticking = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                bar.inc(1);
            }
        })
    };
    let (mut produced, mut dropped) = (0u64, 0u64);
    for p in producers {
        let (n, d) = p.await?;
        produced += n;
        dropped += d;
    }
    let cpu_after = cpu_sample(&member_pids);
    let wall = sampled.elapsed().as_secs_f64();
    ticking.abort();
    bar.finish_and_clear();
    for w in writers {
        w.await??;
    }

    let mut latency = Histogram::<u64>::new(3)?;
    let mut received = 0u64;
    for child in children {
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "a member process failed");
        let line = BufReader::new(&out.stdout[..])
            .lines()
            .next()
            .transpose()?
            .unwrap_or_default();
        let (n, h) = line.split_once(' ').unwrap_or(("0", ""));
        received += n.parse::<u64>()?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(h)?;
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..])?;
        latency.add(h)?;
    }

    let deliveries = produced * args.members as u64;
    let secs = args.duration as f64;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let cpu = cpu_before.zip(cpu_after).map(|(a, b)| Usage {
        busy: (b.busy - a.busy) as f64 / (b.total - a.total).max(1) as f64,
        own: (b.own - a.own) as f64 / 100.0 / wall,
        members: b.members.saturating_sub(a.members) as f64 / 100.0 / wall,
    });
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "scenario": "floor",
            "params": {
                "groups": args.groups,
                "members": args.members,
                "rate": args.rate,
                "duration_s": args.duration,
                "workers": args.workers,
                "hop": args.hop,
                "delayed_acks": args.delayed_acks,
            },
            "latency": {
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "p999_ms": ms(0.999),
                "max_ms": latency.max() as f64 / 1000.0,
            },
            "counts": {
                "expected": deliveries,
                "received": received,
                "dropped": dropped,
                "lost": deliveries.saturating_sub(received),
            },
            "figures": {
                "deliveries_per_sec": received as f64 / secs,
                "machine_busy": cpu.map(|c| c.busy),
                "producer_cores": cpu.map(|c| c.own),
                "members_cores": cpu.map(|c| c.members),
            },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    println!(
        "groups {} × members {} at {} frames/s per group, {} s",
        args.groups, args.members, args.rate, args.duration
    );
    println!(
        "deliveries/s {:.0}  received {received} of {}  dropped at a full queue {dropped}",
        received as f64 / secs,
        deliveries - dropped,
    );
    println!(
        "latency ms: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1000.0,
    );
    if let Some(c) = cpu {
        println!(
            "machine busy {:.0}%  this process {:.2} cores  member processes {:.2} cores",
            100.0 * c.busy,
            c.own,
            c.members
        );
    }
    Ok(())
}

/// One group's producer: a frame every `1 / rate` s from `first` until
/// `until`, queued to every member. Returns (frames, queue-full drops).
async fn produce(
    members: Vec<mpsc::Sender<Bytes>>,
    first: Instant,
    until: Instant,
    rate: f64,
) -> (u64, u64) {
    let (mut n, mut dropped) = (0u64, 0u64);
    loop {
        let at = first + Duration::from_secs_f64(n as f64 / rate);
        if at >= until {
            return (n, dropped);
        }
        tokio::time::sleep_until(at.into()).await;
        let mut frame = BytesMut::with_capacity(FRAME);
        frame.put_u64_le(now_us());
        frame.put_u64_le(n);
        frame.resize(FRAME, 0);
        let frame = frame.freeze();
        for m in &members {
            if m.try_send(frame.clone()).is_err() {
                dropped += 1;
            }
        }
        n += 1;
    }
}

/// A connection's writer: waits for a frame, takes whatever else is queued,
/// writes them in one `writev`, and closes the socket when the producer is
/// done.
async fn connection_writer(
    mut stream: TcpStream,
    mut rx: mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    let mut batch: Vec<Bytes> = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut skip = 0usize;
        let len: usize = batch.iter().map(Bytes::len).sum();
        while skip < len {
            let mut slices = Vec::with_capacity(batch.len());
            let mut offset = skip;
            for b in &batch {
                if offset >= b.len() {
                    offset -= b.len();
                    continue;
                }
                slices.push(IoSlice::new(&b[offset..]));
                offset = 0;
            }
            skip += stream.write_vectored(&slices).await?;
        }
        batch.clear();
    }
    stream.shutdown().await
}

/// A member process: opens `connections`, reads until each is closed, and
/// prints `RECEIVED BASE64_HISTOGRAM` on one line.
async fn member_process(
    addr: SocketAddr,
    connections: usize,
    hop: bool,
    delayed_acks: bool,
) -> anyhow::Result<()> {
    let mut readers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        readers.push(if hop {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(read_frames(stream, Some(tx), delayed_acks));
            tokio::spawn(time_frames(rx))
        } else {
            tokio::spawn(read_frames(stream, None, delayed_acks))
        });
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let mut received = 0u64;
    for r in readers {
        let samples = r.await??;
        received += samples.len() as u64;
        for us in samples {
            latency.record(us.max(1))?;
        }
    }
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(&latency, &mut bytes)?;
    println!(
        "{received} {}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    Ok(())
}

/// Reads frames until the server closes; returns each one's latency in µs,
/// or with `hop`, sends each frame's timestamp there and returns nothing.
/// With `delayed_acks`, quick-ACK mode is turned off before the first read
/// and after every one (the kernel turns it back on whenever its
/// delayed-ACK timer fires).
async fn read_frames(
    mut stream: TcpStream,
    hop: Option<mpsc::Sender<u64>>,
    delayed_acks: bool,
) -> std::io::Result<Vec<u64>> {
    let delay_acks = |stream: &TcpStream| {
        if delayed_acks {
            let _ = socket2::SockRef::from(stream).set_tcp_quickack(false);
        }
    };
    delay_acks(&stream);
    let mut samples = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut filled = 0usize;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(samples);
        }
        filled += n;
        delay_acks(&stream);
        let now = now_us();
        let whole = filled / FRAME * FRAME;
        for frame in buf[..whole].chunks_exact(FRAME) {
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&frame[..8]);
            let sent = u64::from_le_bytes(sent);
            match &hop {
                Some(tx) => {
                    if tx.send(sent).await.is_err() {
                        return Ok(samples);
                    }
                }
                None => samples.push(now.saturating_sub(sent)),
            }
        }
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
}

/// The second task of `--hop`: times each frame as it arrives.
async fn time_frames(mut rx: mpsc::Receiver<u64>) -> std::io::Result<Vec<u64>> {
    let mut samples = Vec::new();
    while let Some(sent) = rx.recv().await {
        samples.push(now_us().saturating_sub(sent));
    }
    Ok(samples)
}

/// CPU counters from `/proc`, in clock ticks.
#[derive(Clone, Copy)]
struct Cpu {
    busy: u64,
    total: u64,
    /// This process's user and system time.
    own: u64,
    /// The member processes' user and system time, added up.
    members: u64,
}

/// What the producing phase used: the machine's busy share, and this
/// process's and the member processes' cores.
#[derive(Clone, Copy)]
struct Usage {
    busy: f64,
    own: f64,
    members: f64,
}

/// The machine's counters, this process's and `members`' (a member process
/// that cannot be read counts as 0 both times).
fn cpu_sample(members: &[u32]) -> Option<Cpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some(Cpu {
        busy: total - idle,
        total,
        own: process_ticks("self")?,
        members: members
            .iter()
            .filter_map(|pid| process_ticks(&pid.to_string()))
            .sum(),
    })
}

/// User plus system ticks of `/proc/WHO/stat`.
fn process_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after_name.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}
