//! A competitor for the machine's cores, for `qun-loadtest compare
//! --contend PERCENT`.
//!
//! This machine is a shared virtual machine: in its slowest minutes the
//! loopback floor's p99 for 100 × 50 at 300k deliveries/s climbs from 4–7 ms
//! to 25–46 ms, because something outside the guest takes the cores
//! (docs/benchmarks.md, "Machine"). Those minutes come when they come, so a
//! change cannot be tried in them on purpose. A [`Competitor`] makes a
//! stand-in that can: one thread per core, each busy for `percent` of every
//! [`PERIOD`] and asleep for the rest, at the default priority, so the
//! server and the load generator get less of the cores than they ask for,
//! as when other guests run. It is not the same thing (the scheduler here
//! shares a core with it fairly, while the host takes a whole virtual core
//! away at once), which is why every comparison under it runs the floor
//! beside it too (`--floor`): the floor shows how slow the machine it made
//! was.
//!
//! The competitor runs for the whole comparison, every round and the floor's
//! runs included, and stops with it; [`Competitor::stop`] says how much of
//! the cores it really had.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The cycle of a competing thread: busy for its share, then asleep.
pub(crate) const PERIOD: Duration = Duration::from_millis(10);

/// The largest share a competing thread may ask for: above it the cores
/// would be the competitor's and the runs would measure nothing else.
pub(crate) const MAX_PERCENT: u8 = 90;

/// Threads taking a share of every core until [`Competitor::stop`].
#[derive(Debug)]
pub(crate) struct Competitor {
    percent: u8,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Duration>>,
    started: Instant,
}

/// What a competitor asked for and what it got, in the comparison's report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Contention {
    /// The share of each [`PERIOD`] each thread asked to be busy.
    pub(crate) percent: u8,
    /// Its threads: one per core.
    pub(crate) threads: usize,
    /// The CPU its threads had, in cores over the comparison's time: at most
    /// `threads × percent / 100`, less when the runs took the cores first.
    pub(crate) cores: f64,
}

/// Why a competitor was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ContentionError {
    /// A share outside 1..=[`MAX_PERCENT`].
    #[error("--contend takes a share of each core from 1 to {MAX_PERCENT} (percent), not {0}")]
    Share(u8),
    /// The operating system refused a thread.
    #[error("starting a competing thread: {0}")]
    Spawn(#[source] std::io::Error),
}

impl Competitor {
    /// Starts `threads` competing threads (at least one), each busy
    /// `percent` of every [`PERIOD`].
    ///
    /// # Errors
    /// [`ContentionError::Share`] for a `percent` of 0 or over
    /// [`MAX_PERCENT`]; [`ContentionError::Spawn`] when a thread cannot be
    /// started (those already started are stopped).
    pub(crate) fn start(percent: u8, threads: usize) -> Result<Self, ContentionError> {
        if !(1..=MAX_PERCENT).contains(&percent) {
            return Err(ContentionError::Share(percent));
        }
        let busy = PERIOD * u32::from(percent) / 100;
        let mut competitor = Self {
            percent,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(threads),
            started: Instant::now(),
        };
        for i in 0..threads.max(1) {
            let stop = competitor.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("competitor-{i}"))
                .spawn(move || compete(busy, &stop))
                .map_err(ContentionError::Spawn)?;
            competitor.threads.push(thread);
        }
        Ok(competitor)
    }

    /// Stops the threads and says how much CPU they had.
    pub(crate) fn stop(mut self) -> Contention {
        let threads = self.threads.len();
        let cpu = self.halt();
        let wall = self.started.elapsed().as_secs_f64();
        Contention {
            percent: self.percent,
            threads,
            cores: if wall > 0.0 {
                cpu.as_secs_f64() / wall
            } else {
                0.0
            },
        }
    }

    /// Tells the threads to stop, waits for them, and adds up the CPU time
    /// they had; a second call finds none left.
    fn halt(&mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).filter_map(|t| t.join().ok()).sum()
    }
}

impl Drop for Competitor {
    /// A comparison that fails still stops its competitor.
    fn drop(&mut self) {
        self.halt();
    }
}

/// One competing thread: spins until `busy` of its own CPU time is spent
/// in this period, sleeps out the period, again until `stop`; returns the
/// CPU time it had in all.
///
/// The share is counted in CPU time, not wall time: a thread that waited
/// for the core meanwhile still takes its whole share when it gets it, as
/// work from outside does.
fn compete(busy: Duration, stop: &AtomicBool) -> Duration {
    let born = Instant::now();
    // Wall time since the thread began if the CPU clock cannot be read
    // (never on Linux): the share is then counted in wall time.
    let cpu = || thread_cpu().unwrap_or_else(|| born.elapsed());
    let start = cpu();
    while !stop.load(Ordering::Relaxed) {
        let period_start = Instant::now();
        let cpu_start = cpu();
        while cpu().saturating_sub(cpu_start) < busy {
            std::hint::spin_loop();
        }
        if let Some(rest) = PERIOD.checked_sub(period_start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    cpu().saturating_sub(start)
}

/// The CPU time the calling thread has had.
fn thread_cpu() -> Option<Duration> {
    let mut ts = uapi::c::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    uapi::clock_gettime(uapi::c::CLOCK_THREAD_CPUTIME_ID, &mut ts).ok()?;
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_outside_the_range_are_refused() {
        assert!(matches!(
            Competitor::start(0, 1),
            Err(ContentionError::Share(0))
        ));
        assert!(matches!(
            Competitor::start(MAX_PERCENT + 1, 1),
            Err(ContentionError::Share(_))
        ));
    }

    #[test]
    fn a_competitor_takes_cpu_and_stops() {
        let competitor = Competitor::start(50, 1).unwrap();
        // A few periods; the share itself is not asserted (this machine may
        // give the thread less), only that it ran, had CPU, and stopped.
        std::thread::sleep(PERIOD * 5);
        let contention = competitor.stop();
        assert_eq!(contention.percent, 50);
        assert_eq!(contention.threads, 1);
        assert!(contention.cores > 0.0, "{contention:?}");
        assert!(contention.cores <= 1.0, "{contention:?}");
    }
}
