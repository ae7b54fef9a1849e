//! How busy the machine, and the server, were during a measured phase.
//!
//! On one machine the load generator and the server share the cores. When
//! every core is busy, latency is mostly queueing for a core, whatever the
//! server does; a report that says so is read correctly. Both figures come
//! from `/proc` (Linux), read before and after the phase:
//!
//! - `machine_busy_percent`: the share of all cores' time not idle (nor
//!   waiting for I/O), from `/proc/stat`.
//! - `server_cores`: the server's CPU time over the wall time, from
//!   `/proc/PID/stat` (with `--server-pid`); 1.0 is one core kept busy.

use crate::report::Report;

/// One reading of the counters, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    /// All cores: (busy, total) ticks, and the number of cores.
    machine: Option<(u64, u64, u64)>,
    /// The server's user plus system ticks.
    server: Option<u64>,
}

/// Reads the counters now; what cannot be read is left out.
pub(crate) fn sample(server_pid: Option<u32>) -> Sample {
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_ticks(&s));
    let server = server_pid.and_then(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| process_ticks(&s))
    });
    Sample { machine, server }
}

/// Adds the figures for the phase between `before` and `after`.
pub(crate) fn report(r: &mut Report, before: Sample, after: Sample) {
    let (Some((busy0, total0, cores)), Some((busy1, total1, _))) = (before.machine, after.machine)
    else {
        return;
    };
    let total = total1.saturating_sub(total0);
    if total == 0 || cores == 0 {
        return;
    }
    let busy = busy1.saturating_sub(busy0);
    r.figures.insert(
        "machine_busy_percent".into(),
        100.0 * busy as f64 / total as f64,
    );
    if let (Some(s0), Some(s1)) = (before.server, after.server) {
        // The wall time, in ticks of one core.
        let wall = total as f64 / cores as f64;
        r.figures
            .insert("server_cores".into(), s1.saturating_sub(s0) as f64 / wall);
    }
}

/// (busy, total, cores) from the text of `/proc/stat`: its first line sums
/// every core's user, nice, system, idle, iowait, irq, softirq and steal
/// ticks; idle and iowait are not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64, u64)> {
    let mut lines = stat.lines();
    let first = lines.next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = first
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
        return None;
    };
    let total = user + nice + system + idle + iowait + irq + softirq + steal;
    let cores = lines
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u64;
    Some((total - idle - iowait, total, cores))
}

/// User plus system ticks from the text of `/proc/PID/stat`. The fields
/// are counted after the name's closing parenthesis: a name may hold
/// spaces.
fn process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime 14 and stime 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\n\
                    cpu0 50 2 25 400 20 2 1 0 0 0\n\
                    cpu1 50 3 25 400 20 1 1 0 0 0\n\
                    intr 12345\n";
        // total 1,000; busy = 1,000 - 800 - 40.
        assert_eq!(machine_ticks(stat), Some((160, 1000, 2)));
        assert_eq!(machine_ticks("intr 1\n"), None);
    }

    #[test]
    fn process_ticks_are_counted_after_the_name() {
        // A name with spaces and a parenthesis; utime 1234, stime 567.
        let stat = "4242 (qun (test) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 1234 567 0 0 20 0 4";
        assert_eq!(process_ticks(stat), Some(1801));
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn the_report_gets_the_phase_between_two_samples() {
        let before = Sample {
            machine: Some((100, 1000, 2)),
            server: Some(50),
        };
        let after = Sample {
            machine: Some((850, 2000, 2)),
            server: Some(450),
        };
        let mut r = Report::default();
        report(&mut r, before, after);
        // 750 of 1,000 ticks busy; 1,000 ticks over 2 cores is 500 of wall
        // time, in which the server used 400.
        assert_eq!(r.figures.get("machine_busy_percent"), Some(&75.0));
        assert_eq!(r.figures.get("server_cores"), Some(&0.8));
        // Nothing read, nothing reported.
        let mut empty = Report::default();
        report(&mut empty, Sample::default(), Sample::default());
        assert!(empty.figures.is_empty());
    }
}
