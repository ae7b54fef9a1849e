//! How busy the machine, the server and the load generator were during a
//! measured phase.
//!
//! On one machine the load generator and the server share the cores. When
//! every core is busy, latency is mostly queueing for a core, whatever the
//! server does; a report that says so, and says who used the cores, is read
//! correctly. The figures come from `/proc` (Linux), read before and after
//! the phase:
//!
//! - `machine_busy_percent`: the share of all cores' time not idle (nor
//!   waiting for I/O), from `/proc/stat`.
//! - `machine_user_cores`, `machine_system_cores`, `machine_softirq_cores`:
//!   the same busy time split by where it went, in cores (1.0 is one core
//!   kept busy): programs, the kernel on their behalf (system calls), and
//!   interrupt work. Over loopback, most of the last is the kernel's
//!   receive path of every TCP segment, which runs outside any process.
//! - `server_cores` (with `server_user_cores` and `server_system_cores`):
//!   the server's CPU time over the wall time, from `/proc/PID/stat` (with
//!   `--server-pid`).
//! - `loadgen_cores`: the same for the load generator itself, this process
//!   and its worker processes together. What the members cost here is what
//!   phones on other machines would not take from the server.
//! - `server_wait_cores` and `loadgen_wait_cores`: how long their threads
//!   were ready to run but waited for a core, added up over the threads,
//!   over the wall time, from `/proc/PID/task/TID/schedstat`. On a machine
//!   with cores to spare it is near 0; each 0.1 is a tenth of a second per
//!   second of work that stood in line.
//! - `server_busiest_thread_runnable`: the share of the wall time the
//!   server's busiest thread was running or ready to run. At 1.0 that thread
//!   never ran out of work: whatever waits for it stands in a queue that
//!   never empties, however the work is ordered.
//! - `machine_tcp_segments_per_sec`: TCP segments sent on the machine, from
//!   `/proc/net/snmp` (`OutSegs`). Over loopback each one is sent and
//!   received here: the pushes, the requests and their answers, and the
//!   pure ACKs that acknowledge them. A fan-out report divides it by its
//!   deliveries (`tcp_segments_per_delivery`): 2 when every push is
//!   acknowledged on its own (`--member-acks immediate`), nearer 1.5 when
//!   the members delay their ACKs.

use std::time::Instant;

use crate::report::Report;

/// One reading of the counters: the machine's and processes' in clock
/// ticks, threads' in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    /// When it was read (for the threads' figures, which are in ns).
    at: Option<Instant>,
    machine: Option<MachineTicks>,
    /// The server's (user, system) ticks.
    server: Option<(u64, u64)>,
    /// Each load-generator process's user plus system ticks, by PID.
    loadgen: Vec<(u32, u64)>,
    /// Every thread of the server.
    server_threads: Vec<ThreadTimes>,
    /// Every thread of every load-generator process.
    loadgen_threads: Vec<ThreadTimes>,
    /// TCP segments the machine has sent (`OutSegs`).
    tcp_segments_out: Option<u64>,
}

/// One thread's time on a core and time ready to run but waiting for one,
/// in nanoseconds since it started (`/proc/PID/task/TID/schedstat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ThreadTimes {
    tid: u32,
    run_ns: u64,
    wait_ns: u64,
}

/// The `OutSegs` counter of `/proc/net/snmp`: the line of `Tcp:` names,
/// then the line of `Tcp:` values.
fn tcp_segments_out(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// All cores' ticks from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MachineTicks {
    /// User and nice.
    user: u64,
    system: u64,
    /// Hard and soft interrupts.
    softirq: u64,
    /// Busy in all: everything but idle and iowait (steal included).
    busy: u64,
    total: u64,
    cores: u64,
}

/// Reads the counters now; what cannot be read is left out. `loadgen` are
/// the load generator's worker processes (this process is always read).
pub(crate) fn sample(server_pid: Option<u32>, loadgen: &[u32]) -> Sample {
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_ticks(&s));
    let server = server_pid.and_then(read_process_ticks);
    let pids: Vec<u32> = std::iter::once(std::process::id())
        .chain(loadgen.iter().copied())
        .collect();
    let loadgen = pids
        .iter()
        .filter_map(|&pid| read_process_ticks(pid).map(|(user, system)| (pid, user + system)))
        .collect();
    Sample {
        at: Some(Instant::now()),
        machine,
        server,
        loadgen,
        server_threads: server_pid.map(read_thread_times).unwrap_or_default(),
        loadgen_threads: pids.into_iter().flat_map(read_thread_times).collect(),
        tcp_segments_out: std::fs::read_to_string("/proc/net/snmp")
            .ok()
            .and_then(|s| tcp_segments_out(&s)),
    }
}

/// Adds the figures for the phase between `before` and `after`.
pub(crate) fn report(r: &mut Report, before: &Sample, after: &Sample) {
    let (Some(m0), Some(m1)) = (before.machine, after.machine) else {
        return;
    };
    let total = m1.total.saturating_sub(m0.total);
    if total == 0 || m0.cores == 0 {
        return;
    }
    // The wall time, in ticks of one core.
    let wall = total as f64 / m0.cores as f64;
    let cores = |t0: u64, t1: u64| t1.saturating_sub(t0) as f64 / wall;
    let busy = m1.busy.saturating_sub(m0.busy);
    r.figures.insert(
        "machine_busy_percent".into(),
        100.0 * busy as f64 / total as f64,
    );
    r.figures
        .insert("machine_user_cores".into(), cores(m0.user, m1.user));
    r.figures
        .insert("machine_system_cores".into(), cores(m0.system, m1.system));
    r.figures.insert(
        "machine_softirq_cores".into(),
        cores(m0.softirq, m1.softirq),
    );
    if let (Some((u0, s0)), Some((u1, s1))) = (before.server, after.server) {
        r.figures
            .insert("server_cores".into(), cores(u0 + s0, u1 + s1));
        r.figures.insert("server_user_cores".into(), cores(u0, u1));
        r.figures
            .insert("server_system_cores".into(), cores(s0, s1));
    }
    // Only the processes read both times: one that ended in between is
    // left out rather than counted from zero.
    let used: u64 = after
        .loadgen
        .iter()
        .filter_map(|(pid, t1)| {
            let (_, t0) = before.loadgen.iter().find(|(p, _)| p == pid)?;
            Some(t1.saturating_sub(*t0))
        })
        .sum();
    if !after.loadgen.is_empty() {
        r.figures.insert("loadgen_cores".into(), used as f64 / wall);
    }
    if let (Some(t0), Some(t1)) = (before.at, after.at) {
        let wall_ns = t1.saturating_duration_since(t0).as_nanos() as f64;
        if wall_ns > 0.0 {
            threads_report(r, wall_ns, before, after);
            if let (Some(s0), Some(s1)) = (before.tcp_segments_out, after.tcp_segments_out) {
                r.figures.insert(
                    "machine_tcp_segments_per_sec".into(),
                    s1.saturating_sub(s0) as f64 * 1e9 / wall_ns,
                );
            }
        }
    }
}

/// The threads' figures (see the module's docs) over `wall_ns`.
fn threads_report(r: &mut Report, wall_ns: f64, before: &Sample, after: &Sample) {
    // Each thread read both times, by what it did in between: (ran,
    // waited). A thread that started or ended in between is left out.
    let deltas = |b: &[ThreadTimes], a: &[ThreadTimes]| -> Vec<(u64, u64)> {
        a.iter()
            .filter_map(|t1| {
                let t0 = b.iter().find(|t| t.tid == t1.tid)?;
                Some((
                    t1.run_ns.saturating_sub(t0.run_ns),
                    t1.wait_ns.saturating_sub(t0.wait_ns),
                ))
            })
            .collect()
    };
    let server = deltas(&before.server_threads, &after.server_threads);
    if !server.is_empty() {
        let waited: u64 = server.iter().map(|(_, w)| w).sum();
        let busiest = server.iter().map(|(r, w)| r + w).max().unwrap_or(0);
        r.figures
            .insert("server_wait_cores".into(), waited as f64 / wall_ns);
        // Run and wait are sampled a moment apart: never above 1.
        r.figures.insert(
            "server_busiest_thread_runnable".into(),
            (busiest as f64 / wall_ns).min(1.0),
        );
    }
    let loadgen = deltas(&before.loadgen_threads, &after.loadgen_threads);
    if !loadgen.is_empty() {
        let waited: u64 = loadgen.iter().map(|(_, w)| w).sum();
        r.figures
            .insert("loadgen_wait_cores".into(), waited as f64 / wall_ns);
    }
}

/// Every thread of process `pid` that can be read.
fn read_thread_times(pid: u32) -> Vec<ThreadTimes> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let tid = task.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let (run_ns, wait_ns) = thread_times(&text)?;
            Some(ThreadTimes {
                tid,
                run_ns,
                wait_ns,
            })
        })
        .collect()
}

/// (ns on a core, ns runnable but waiting) from the text of
/// `/proc/PID/task/TID/schedstat`: those two, then the count of times it
/// got a core.
fn thread_times(schedstat: &str) -> Option<(u64, u64)> {
    let mut fields = schedstat.split_whitespace();
    let run = fields.next()?.parse().ok()?;
    let wait = fields.next()?.parse().ok()?;
    Some((run, wait))
}

/// The first line of `/proc/stat`, which sums every core's user, nice,
/// system, idle, iowait, irq, softirq and steal ticks; and the number of
/// cores. Idle and iowait are not busy.
fn machine_ticks(stat: &str) -> Option<MachineTicks> {
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
    Some(MachineTicks {
        user: user + nice,
        system,
        softirq: irq + softirq,
        busy: total - idle - iowait,
        total,
        cores,
    })
}

/// (user, system) ticks of process `pid`, if it can be read.
fn read_process_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    process_ticks(&stat)
}

/// (user, system) ticks from the text of `/proc/PID/stat`. The fields are
/// counted after the name's closing parenthesis: a name may hold spaces.
fn process_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime 14 and stime 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
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
        assert_eq!(
            machine_ticks(stat),
            Some(MachineTicks {
                user: 105,
                system: 50,
                softirq: 5,
                busy: 160,
                total: 1000,
                cores: 2,
            })
        );
        assert_eq!(machine_ticks("intr 1\n"), None);
    }

    #[test]
    fn process_ticks_are_counted_after_the_name() {
        // A name with spaces and a parenthesis; utime 1234, stime 567.
        let stat = "4242 (qun (test) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 1234 567 0 0 20 0 4";
        assert_eq!(process_ticks(stat), Some((1234, 567)));
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn thread_times_are_the_first_two_fields() {
        assert_eq!(
            thread_times("918832000 160293000 7923\n"),
            Some((918_832_000, 160_293_000))
        );
        assert_eq!(thread_times("12"), None);
        assert_eq!(thread_times("x y z"), None);
    }

    #[test]
    fn this_process_threads_are_read() {
        let threads = read_thread_times(std::process::id());
        // The test's own thread among them (`/proc/thread-self` links to
        // `PID/task/TID`), and time run by the process's threads: a thread
        // just started may not have had its first run counted yet.
        let link = std::fs::read_link("/proc/thread-self").expect("thread-self");
        let me: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
        assert!(threads.iter().any(|t| t.tid == me), "{threads:?}");
        assert!(
            threads.iter().map(|t| t.run_ns).sum::<u64>() > 0,
            "{threads:?}"
        );
        assert!(read_thread_times(u32::MAX).is_empty());
    }

    fn thread(tid: u32, run_ns: u64, wait_ns: u64) -> ThreadTimes {
        ThreadTimes {
            tid,
            run_ns,
            wait_ns,
        }
    }

    #[test]
    fn waits_are_added_up_over_the_threads_read_both_times() {
        let t0 = Instant::now();
        let before = Sample {
            at: Some(t0),
            server_threads: vec![thread(10, 0, 0), thread(11, 100, 50), thread(12, 5, 5)],
            loadgen_threads: vec![thread(20, 0, 0), thread(21, 0, 0)],
            ..Sample::default()
        };
        let after = Sample {
            at: Some(t0 + std::time::Duration::from_nanos(1_000)),
            // Thread 10 ran 800 ns and waited 300: runnable all the wall
            // time, and more, as two reads a moment apart can say. Thread
            // 12 ended; thread 13 started.
            server_threads: vec![thread(10, 800, 300), thread(11, 200, 150), thread(13, 1, 1)],
            loadgen_threads: vec![thread(20, 250, 750), thread(21, 250, 700)],
            ..Sample::default()
        };
        let mut r = Report::default();
        threads_report(&mut r, 1_000.0, &before, &after);
        let f = |k: &str| r.figures.get(k).copied();
        assert_eq!(f("server_wait_cores"), Some(0.4));
        assert_eq!(f("server_busiest_thread_runnable"), Some(1.0));
        assert_eq!(f("loadgen_wait_cores"), Some(1.45));
        // Through `report`, which needs the machine's ticks first.
        let mut none = Report::default();
        report(&mut none, &before, &after);
        assert!(none.figures.is_empty());
    }

    fn machine(user: u64, system: u64, softirq: u64, busy: u64, total: u64) -> MachineTicks {
        MachineTicks {
            user,
            system,
            softirq,
            busy,
            total,
            cores: 2,
        }
    }

    #[test]
    fn tcp_segments_out_are_found_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin ActiveOpens InSegs OutSegs RetransSegs\n\
                    Tcp: 1 200 17 4242 5151 3\n\
                    Udp: InDatagrams OutDatagrams\nUdp: 9 8\n";
        assert_eq!(tcp_segments_out(snmp), Some(5151));
        assert_eq!(tcp_segments_out("Tcp: InSegs\nTcp: 4\n"), None);
        assert_eq!(tcp_segments_out("Ip: 1\n"), None);
    }

    #[test]
    fn segments_per_second_come_from_the_two_readings() {
        let t0 = Instant::now();
        let before = Sample {
            at: Some(t0),
            machine: Some(machine(0, 0, 0, 0, 1000)),
            tcp_segments_out: Some(1_000),
            ..Sample::default()
        };
        let after = Sample {
            at: Some(t0 + std::time::Duration::from_millis(500)),
            machine: Some(machine(0, 0, 0, 0, 2000)),
            tcp_segments_out: Some(301_000),
            ..Sample::default()
        };
        let mut r = Report::default();
        report(&mut r, &before, &after);
        assert_eq!(
            r.figures.get("machine_tcp_segments_per_sec").copied(),
            Some(600_000.0)
        );
    }

    #[test]
    fn the_report_gets_the_phase_between_two_samples() {
        let before = Sample {
            machine: Some(machine(50, 40, 10, 100, 1000)),
            server: Some((20, 30)),
            loadgen: vec![(1, 10), (2, 5), (3, 7)],
            ..Sample::default()
        };
        let after = Sample {
            machine: Some(machine(350, 290, 210, 850, 2000)),
            server: Some((120, 330)),
            // Process 3 ended during the phase; process 4 was not there
            // before it.
            loadgen: vec![(1, 60), (2, 105), (4, 900)],
            ..Sample::default()
        };
        let mut r = Report::default();
        report(&mut r, &before, &after);
        // 750 of 1,000 ticks busy; 1,000 ticks over 2 cores is 500 of wall
        // time, in which the server used 400 (100 user, 300 system).
        let f = |k: &str| r.figures.get(k).copied();
        assert_eq!(f("machine_busy_percent"), Some(75.0));
        assert_eq!(f("machine_user_cores"), Some(0.6));
        assert_eq!(f("machine_system_cores"), Some(0.5));
        assert_eq!(f("machine_softirq_cores"), Some(0.4));
        assert_eq!(f("server_cores"), Some(0.8));
        assert_eq!(f("server_user_cores"), Some(0.2));
        assert_eq!(f("server_system_cores"), Some(0.6));
        // Processes 1 and 2 only: 50 + 100 ticks.
        assert_eq!(f("loadgen_cores"), Some(0.3));
        // Nothing read, nothing reported.
        let mut empty = Report::default();
        report(&mut empty, &Sample::default(), &Sample::default());
        assert!(empty.figures.is_empty());
    }
}
