//! What one wake-up of a sleeping thread costs on this machine.
//!
//! Every delivery of a fan-out wakes a reader that was asleep in `epoll` or
//! `read`, and on a virtual machine a core with nothing to run halts to the
//! host: waking the thread on it is then a round trip through the hypervisor
//! (docs/benchmarks.md, "Machine"). This program measures that cost apart
//! from Qun, so the fan-out figures can be read against it.
//!
//! Two threads play ping-pong over a pair of pipes, one byte each way. The
//! *pinger* waits `--pause-us` between rounds (a busy wait, so its own core
//! stays awake), then writes and times until the answer arrives; the *ponger*
//! blocks in `read` and answers at once. Five placements are measured, each
//! for `--rounds` round trips:
//!
//! - `cross-core, pinger spins`: pinger on CPU 0, ponger on CPU 1, and the
//!   pinger polls for the answer without sleeping. A round trip is one
//!   wake-up of a thread whose core has been idle: a reader on another core;
//! - `cross-core`: the same, but the pinger sleeps in `read` for the answer,
//!   so its core goes idle too and a round trip is two such wake-ups;
//! - `cross-core, no pause`: the same without the pause between rounds;
//! - `same-core`: both on CPU 0, so a wake-up is a switch on a core that is
//!   already running;
//! - `unpinned`: wherever the scheduler puts them.
//!
//! ```sh
//! cargo run --release -p qun-loadtest --example wake_latency -- --rounds 20000 --pause-us 100
//! ```
//!
//! It prints p50, p99 and max per placement. Bounded by `--rounds`; it needs
//! at least two CPUs for the cross-core rows and skips them otherwise.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(about = "Round trip of one wake-up between two threads, pinned or not")]
struct Args {
    /// Round trips per placement.
    #[arg(long, default_value_t = 20_000)]
    rounds: u32,
    /// Microseconds the pinger waits between round trips, so the ponger's
    /// core can go idle.
    #[arg(long, default_value_t = 100)]
    pause_us: u64,
}

/// Where the two threads run: a CPU each, or `None` for anywhere.
#[derive(Debug, Clone, Copy)]
struct Placement {
    name: &'static str,
    pinger: Option<usize>,
    ponger: Option<usize>,
    pause: bool,
    /// The pinger polls for the answer instead of sleeping in `read`.
    spin: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placements = [
        Placement {
            name: "cross-core, pinger spins",
            pinger: Some(0),
            ponger: Some(1),
            pause: true,
            spin: true,
        },
        Placement {
            name: "cross-core",
            pinger: Some(0),
            ponger: Some(1),
            pause: true,
            spin: false,
        },
        Placement {
            name: "cross-core, no pause",
            pinger: Some(0),
            ponger: Some(1),
            pause: false,
            spin: false,
        },
        Placement {
            name: "same-core",
            pinger: Some(0),
            ponger: Some(0),
            pause: true,
            spin: false,
        },
        Placement {
            name: "unpinned",
            pinger: None,
            ponger: None,
            pause: true,
            spin: false,
        },
    ];
    println!(
        "{} round trips per placement, pause {} µs, {cpus} CPUs",
        args.rounds, args.pause_us
    );
    println!(
        "{:<26} {:>9} {:>9} {:>9}",
        "placement", "p50 µs", "p99 µs", "max µs"
    );
    for placement in placements {
        let needs_two = placement.pinger.max(placement.ponger).unwrap_or(0) >= 1;
        if needs_two && cpus < 2 {
            println!("{:<26} skipped: one CPU", placement.name);
            continue;
        }
        let pause = Duration::from_micros(if placement.pause { args.pause_us } else { 0 });
        let h = measure(placement, args.rounds, pause)
            .with_context(|| format!("measuring {}", placement.name))?;
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>9.1}",
            placement.name,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    Ok(())
}

/// Run `rounds` round trips in one placement; the histogram is in
/// nanoseconds.
fn measure(placement: Placement, rounds: u32, pause: Duration) -> Result<Histogram<u64>> {
    let (ping_read, ping_write) = pipe(0)?;
    // Non-blocking for a spinning pinger; the ponger's one-byte write into
    // an empty pipe never has to wait either way.
    let (pong_read, pong_write) = pipe(if placement.spin {
        uapi::c::O_NONBLOCK
    } else {
        0
    })?;
    let ponger = std::thread::spawn(move || -> Result<()> {
        pin(placement.ponger)?;
        let mut from = std::fs::File::from(ping_read);
        let mut to = std::fs::File::from(pong_write);
        let mut byte = [0u8; 1];
        // Ends when the pinger closes its end.
        while from.read(&mut byte).context("ponger read")? == 1 {
            to.write_all(&byte).context("ponger write")?;
        }
        Ok(())
    });
    pin(placement.pinger)?;
    let mut to = std::fs::File::from(ping_write);
    let mut from = std::fs::File::from(pong_read);
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let mut byte = [1u8; 1];
    // A few rounds first so both threads have run on their CPUs.
    for round in 0..rounds + 100 {
        let until = Instant::now() + pause;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        to.write_all(&byte).context("pinger write")?;
        if placement.spin {
            loop {
                match from.read(&mut byte) {
                    Ok(1) => break,
                    Ok(_) => bail!("the ponger closed its pipe"),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::hint::spin_loop();
                    }
                    Err(e) => return Err(e).context("pinger read"),
                }
            }
        } else {
            from.read_exact(&mut byte).context("pinger read")?;
        }
        if round >= 100 {
            h.saturating_record(start.elapsed().as_nanos() as u64);
        }
    }
    drop(to);
    ponger
        .join()
        .map_err(|_| anyhow::anyhow!("the ponger thread panicked"))??;
    // Back to every CPU for the next placement.
    pin(None)?;
    Ok(h)
}

/// A pipe, `(read end, write end)`, with `flags` besides close-on-exec.
fn pipe(flags: uapi::c::c_int) -> Result<(OwnedFd, OwnedFd)> {
    let (read, write) = uapi::pipe2(uapi::c::O_CLOEXEC | flags).context("pipe2")?;
    Ok((read.into(), write.into()))
}

/// Pin the calling thread to one CPU, or let it run on any.
fn pin(cpu: Option<usize>) -> Result<()> {
    let bits = usize::BITS as usize;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut mask = vec![0usize; cpus.max(cpu.map_or(0, |c| c + 1)).div_ceil(bits)];
    match cpu {
        Some(c) => mask[c / bits] |= 1 << (c % bits),
        None => {
            for c in 0..cpus {
                mask[c / bits] |= 1 << (c % bits);
            }
        }
    }
    uapi::sched_setaffinity(0, &mask).context("sched_setaffinity")?;
    Ok(())
}
