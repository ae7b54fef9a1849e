//! What one small write to a loopback TCP socket costs the writing thread.
//!
//! At 300k deliveries/s most of the server's core is the kernel's TCP send
//! path, and on loopback that path also does the receiving socket's work
//! (docs/benchmarks.md, "twelfth stop"). This program measures it apart from
//! Qun: one thread writes a 72-byte frame (about a chat push) to each of
//! `--connections` loopback connections in turn, `--rounds` times, with a
//! short pause between rounds; a second thread waits in `epoll` and drains
//! them, so each write wakes a reader as a push does. It prints the writing
//! thread's CPU time (user and system) per write, for each way of writing:
//!
//! - `writev`: the frame as two slices, an 8-byte header and the payload,
//!   as the server's connection writer writes a frame without copying it;
//! - `write`: the frame as one slice (Rust's `TcpStream::write`, a `send`).
//!
//! `--congestion NAME` sets the writing sockets' congestion control
//! (`TCP_CONGESTION`: one of `/proc/sys/net/ipv4/tcp_available_congestion_control`).
//!
//! ```sh
//! cargo run --release -p qun-loadtest --example write_cost -- --congestion cubic
//! ```
//!
//! Loopback only; bounded by `--rounds`.

use std::io::{IoSlice, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use uapi::c;

/// Bytes per frame: about the size of a Qun chat push on the wire.
const FRAME: usize = 72;
/// The header's share of it, written as its own slice by `writev`.
const HEADER: usize = 8;

#[derive(Debug, Parser)]
#[command(about = "CPU time of one small write to a loopback TCP socket")]
struct Args {
    /// Connections written to in turn.
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Writes to each connection, per way of writing.
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// The writing sockets' congestion control; the host's default if unset.
    #[arg(long)]
    congestion: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.rounds == 0 {
        bail!("--connections and --rounds must be at least 1");
    }
    println!(
        "{} writes of {FRAME} bytes per way, {} connections, congestion control {}",
        args.connections * args.rounds,
        args.connections,
        args.congestion.as_deref().unwrap_or("(the host's default)")
    );
    for way in ["writev", "write"] {
        let per_write = measure(&args, way).with_context(|| format!("measuring {way}"))?;
        println!(
            "{way:<8} {:.2} µs of CPU per write",
            per_write.as_secs_f64() * 1e6
        );
    }
    Ok(())
}

/// Opens the connections, drains them on a second thread, and returns the
/// writing thread's CPU time per write made the way `way` says.
fn measure(args: &Args, way: &str) -> Result<Duration> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let (mut writers, mut readers) = (Vec::new(), Vec::new());
    for k in 0..args.connections {
        let reader = TcpStream::connect(addr)
            .with_context(|| format!("connection {k} of {}", args.connections))?;
        let (writer, _) = listener.accept()?;
        writer.set_nodelay(true)?;
        if let Some(name) = &args.congestion {
            uapi::setsockopt(
                writer.as_raw_fd(),
                c::IPPROTO_TCP,
                c::TCP_CONGESTION,
                name.as_bytes(),
            )
            .with_context(|| format!("congestion control {name}"))?;
        }
        reader.set_nonblocking(true)?;
        writers.push(writer);
        readers.push(reader);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || drain(readers, &stop))
    };
    let frame = [7u8; FRAME];
    let pause = Duration::from_micros(20);
    let started = thread_cpu()?;
    for _ in 0..args.rounds {
        for w in &mut writers {
            let written = match way {
                "writev" => w.write_vectored(&[
                    IoSlice::new(&frame[..HEADER]),
                    IoSlice::new(&frame[HEADER..]),
                ])?,
                _ => w.write(&frame)?,
            };
            if written != FRAME {
                bail!("a short write ({written} of {FRAME} bytes): the reader fell behind");
            }
        }
        std::thread::sleep(pause);
    }
    let spent = thread_cpu()?.saturating_sub(started);
    stop.store(true, Ordering::Relaxed);
    drain
        .join()
        .map_err(|_| anyhow::anyhow!("the draining thread panicked"))??;
    let writes = u32::try_from(args.connections * args.rounds).unwrap_or(u32::MAX);
    Ok(spent / writes)
}

/// Reads every connection that has data, waiting in `epoll` between, until
/// `stop`.
fn drain(readers: Vec<TcpStream>, stop: &AtomicBool) -> Result<()> {
    let epoll = uapi::epoll_create1(0)?;
    for (k, r) in readers.iter().enumerate() {
        let event = c::epoll_event {
            events: c::EPOLLIN as u32,
            u64: k as u64,
        };
        uapi::epoll_ctl(epoll.raw(), c::EPOLL_CTL_ADD, r.as_raw_fd(), Some(&event))?;
    }
    let mut events = vec![c::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = uapi::epoll_wait(epoll.raw(), &mut events, 10)?;
        for e in &events[..n] {
            let mut r = &readers[e.u64 as usize];
            // Whatever is there; an empty socket says WouldBlock.
            let _ = r.read(&mut buf);
        }
    }
    Ok(())
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Result<Duration> {
    let mut t = c::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    uapi::clock_gettime(c::CLOCK_THREAD_CPUTIME_ID, &mut t)?;
    Ok(Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    ))
}
