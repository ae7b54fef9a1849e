//! Prometheus metrics, rendered in the text exposition format at `/metrics`.
//!
//! Counters are plain atomics bumped on the paths that own them; the page is
//! rendered on request, reading chat-core's counters at the same time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use qun_chat_core::{CoreStats, Groups};
use qun_storage::stats::{BUCKET_BOUNDS_US, CommitStats, LatencyHistogram};

use crate::request_kind::RequestKind;

/// The gateway's own counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted (TCP).
    pub connections_accepted: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections refused (over `max_connections`, bad handshake).
    pub connections_refused: AtomicU64,
    /// Accept errors (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Client frames received.
    pub frames_in: AtomicU64,
    /// Frames written to clients: added to once per write of every
    /// connection, so on both cores at once.
    pub frames_out: StripedCounter,
    /// Writes of frames to clients: one per flush of a connection's writer,
    /// however many frames it held. `frames_out` over this is how many
    /// frames a write carries; a busy server's writers find more waiting.
    pub frame_batches: StripedCounter,
    /// Error frames sent.
    pub errors_sent: AtomicU64,
    /// Out-of-sync notices sent.
    pub out_of_sync_sent: AtomicU64,
    /// Connections closed for idleness.
    pub idle_closed: AtomicU64,
    /// QUIC connections set up.
    pub quic_connections: AtomicU64,
    /// The most bytes any one connection's outbox has held.
    pub outbox_peak_bytes: Arc<AtomicU64>,
    /// The process's file descriptor limit (soft, after raising it).
    pub fd_limit: u64,
    /// Connections admitted at most: `max_connections`, or fewer when the
    /// descriptor limit does not allow it.
    pub connections_limit: u64,
    /// Threads of the async runtime that serves connections
    /// (`worker_threads`, or one per core).
    pub runtime_workers: u64,
    /// History page reads of a coalescing store (the cluster store).
    pub page_reads: Option<Arc<qun_storage::CoalescingStats>>,
    /// Group commits of the store and each submission's time to durability.
    pub commits: Option<Arc<CommitStats>>,
    /// Time from a request frame read to its answer handed to the
    /// connection's writer, per kind of request
    /// (`qun_request_duration_seconds{request="…"}`).
    pub request_duration: RequestDurations,
}

/// A counter that many threads add to at once, each to a stripe of its own.
///
/// A plain atomic that every connection writer bumps after each write bounces
/// its cache line between the cores once per delivery. Here a thread adds to
/// one of [`StripedCounter::STRIPES`] counters, each on its own cache line,
/// and reading sums them (only `/metrics` reads).
#[derive(Debug, Default)]
pub struct StripedCounter([Stripe; StripedCounter::STRIPES]);

/// One cache line (two, on CPUs that fetch lines in pairs) per stripe.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl StripedCounter {
    /// Stripes: more than the cores of most servers, so threads rarely
    /// share one.
    pub const STRIPES: usize = 16;

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0[stripe_of_this_thread()].0.fetch_add(n, Relaxed);
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

/// This thread's stripe, handed out round-robin as threads first add.
fn stripe_of_this_thread() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static STRIPE: usize = (NEXT.fetch_add(1, Relaxed) % StripedCounter::STRIPES as u64) as usize;
    }
    STRIPE.with(|s| *s)
}

/// A latency histogram per kind of request.
#[derive(Debug)]
pub struct RequestDurations([LatencyHistogram; RequestKind::COUNT]);

impl Default for RequestDurations {
    fn default() -> Self {
        Self(std::array::from_fn(|_| LatencyHistogram::default()))
    }
}

impl RequestDurations {
    /// Records that a request of `kind` took `d`.
    pub fn observe(&self, kind: RequestKind, d: Duration) {
        self.0[kind.index()].observe(d);
    }

    /// The histogram of one kind.
    pub fn of(&self, kind: RequestKind) -> &LatencyHistogram {
        &self.0[kind.index()]
    }
}

/// Appends the `# HELP` and `# TYPE` lines of a histogram.
fn render_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
}

/// Appends the series of `h` to a text exposition page, with `label`
/// (`request="send_message"`, or empty for none): its buckets cumulative,
/// as Prometheus expects (`_bucket{le="0.005"}` counts everything up to
/// 5 ms), then `_sum` in seconds and `_count`.
fn render_series(out: &mut String, h: &LatencyHistogram, name: &str, label: &str) {
    let (lead, own) = if label.is_empty() {
        (String::new(), String::new())
    } else {
        (format!("{label},"), format!("{{{label}}}"))
    };
    let mut cumulative = 0;
    let mut counts = h.counts();
    for (bound, n) in BUCKET_BOUNDS_US.iter().zip(counts.by_ref()) {
        cumulative += n;
        let le = *bound as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{lead}le=\"{le}\"}} {cumulative}");
    }
    cumulative += counts.sum::<u64>();
    let _ = writeln!(out, "{name}_bucket{{{lead}le=\"+Inf\"}} {cumulative}");
    let sum = h.sum_us() as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{own} {sum}\n{name}_count{own} {cumulative}");
}

/// Appends `h` as a histogram without labels.
fn render_histogram(out: &mut String, h: &LatencyHistogram, name: &str, help: &str) {
    render_header(out, name, help);
    render_series(out, h, name, "");
}

impl Metrics {
    /// Counts one write of a connection's writer that carried `frames`
    /// frames; a flush with nothing fed is no write.
    pub fn count_write(&self, frames: u64) {
        if frames > 0 {
            self.frames_out.add(frames);
            self.frame_batches.add(1);
        }
    }

    /// Renders every metric.
    pub fn render(&self, groups: &Groups) -> String {
        let core: Arc<CoreStats> = groups.stats();
        let mut out = String::with_capacity(2048);
        let mut put = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        put(
            "qun_connections_accepted_total",
            "counter",
            "TCP connections accepted.",
            self.connections_accepted.load(Relaxed),
        );
        put(
            "qun_connections_open",
            "gauge",
            "Connections open now.",
            self.connections_open.load(Relaxed),
        );
        put(
            "qun_connections_limit",
            "gauge",
            "Connections admitted at most (max_connections, lowered to fit the descriptor limit).",
            self.connections_limit,
        );
        put(
            "qun_runtime_workers",
            "gauge",
            "Threads of the async runtime serving connections, requests and fan-out (worker_threads).",
            self.runtime_workers,
        );
        put(
            "qun_fd_limit",
            "gauge",
            "The process's file descriptor limit.",
            self.fd_limit,
        );
        put(
            "qun_fds_open",
            "gauge",
            "File descriptors open now.",
            crate::descriptors::open_now(),
        );
        put(
            "qun_quic_connections_total",
            "counter",
            "QUIC connections set up (handshake and streams done).",
            self.quic_connections.load(Relaxed),
        );
        put(
            "qun_connections_refused_total",
            "counter",
            "Connections refused (limit or bad handshake).",
            self.connections_refused.load(Relaxed),
        );
        put(
            "qun_accept_errors_total",
            "counter",
            "Errors accepting connections (e.g. file descriptor limit).",
            self.accept_errors.load(Relaxed),
        );
        put(
            "qun_frames_in_total",
            "counter",
            "Client frames received.",
            self.frames_in.load(Relaxed),
        );
        put(
            "qun_frames_out_total",
            "counter",
            "Frames written to clients.",
            self.frames_out.get(),
        );
        put(
            "qun_frame_batches_total",
            "counter",
            "Writes of frames to clients, one per flush of a connection's writer (frames out / batches = frames per write).",
            self.frame_batches.get(),
        );
        put(
            "qun_error_frames_total",
            "counter",
            "Error frames sent to clients.",
            self.errors_sent.load(Relaxed),
        );
        put(
            "qun_out_of_sync_total",
            "counter",
            "Out-of-sync notices sent to slow connections.",
            self.out_of_sync_sent.load(Relaxed),
        );
        put(
            "qun_messages_posted_total",
            "counter",
            "Messages made durable and published.",
            core.messages_posted.load(Relaxed),
        );
        put(
            "qun_deliveries_total",
            "counter",
            "Message frames queued to subscribers.",
            core.deliveries_queued.load(Relaxed),
        );
        put(
            "qun_deliveries_dropped_total",
            "counter",
            "Message frames dropped for out-of-sync subscribers.",
            core.deliveries_dropped.load(Relaxed),
        );
        put(
            "qun_groups_created_total",
            "counter",
            "Groups created.",
            core.groups_created.load(Relaxed),
        );
        put(
            "qun_idle_closed_total",
            "counter",
            "Connections closed after idle_timeout_ms without a frame.",
            self.idle_closed.load(Relaxed),
        );
        put(
            "qun_outbox_peak_bytes",
            "gauge",
            "The most bytes any one connection's push queue has held (bounded by outbox_max_bytes).",
            self.outbox_peak_bytes.load(Relaxed),
        );
        put(
            "qun_duplicate_sends_total",
            "counter",
            "Sends answered with the original ack because they were retries.",
            core.duplicate_sends.load(Relaxed),
        );
        put(
            "qun_sent_index_reads_total",
            "counter",
            "Sends whose client message id was looked up in the store's index of earlier ids.",
            core.sent_index_reads.load(Relaxed),
        );
        put(
            "qun_sends_rate_limited_total",
            "counter",
            "Buyer messages refused by the per-user rate or slow mode.",
            core.sends_rate_limited.load(Relaxed),
        );
        put(
            "qun_resumes_total",
            "counter",
            "Group resumes served.",
            core.resumes.load(Relaxed),
        );
        put(
            "qun_catch_up_messages_total",
            "counter",
            "Messages pushed as catch-up by resumes.",
            core.catch_up_messages.load(Relaxed),
        );
        put(
            "qun_resume_gaps_too_large_total",
            "counter",
            "Resumes whose gap exceeded resume_max_gap.",
            core.resume_gaps_too_large.load(Relaxed),
        );
        put(
            "qun_commerce_events_total",
            "counter",
            "Commerce events posted (cards, new objects, progress, state changes).",
            core.commerce_events.load(Relaxed),
        );
        put(
            "qun_commerce_actions_total",
            "counter",
            "Buyers' joins, leaves, claims and votes that changed something.",
            core.commerce_actions.load(Relaxed),
        );
        put(
            "qun_commerce_progress_events_total",
            "counter",
            "Coalesced progress events posted.",
            core.progress_events.load(Relaxed),
        );
        put(
            "qun_commerce_deadlines_resolved_total",
            "counter",
            "Group-buy and poll deadlines resolved.",
            core.deadlines_resolved.load(Relaxed),
        );
        put(
            "qun_fanout_turns_total",
            "counter",
            "Fan-out turns of groups too big for one turn (see fanout_budget).",
            core.fanout_turns.load(Relaxed),
        );
        put(
            "qun_scheduled_pushes_fired_total",
            "counter",
            "Occurrences of scheduled pushes that posted their push.",
            core.scheduled_fired.load(Relaxed),
        );
        put(
            "qun_scheduled_pushes_skipped_total",
            "counter",
            "Occurrences of scheduled pushes skipped (quota, product, audience, missed).",
            core.scheduled_skipped.load(Relaxed),
        );
        if let Some(pages) = &self.page_reads {
            put(
                "qun_store_page_queries_total",
                "counter",
                "History page reads sent to the cluster store.",
                pages.queries.load(Relaxed),
            );
            put(
                "qun_store_page_reads_shared_total",
                "counter",
                "History page reads answered by sharing a query already in flight.",
                pages.shared.load(Relaxed),
            );
        }
        put(
            "qun_groups_loaded",
            "gauge",
            "Groups held in memory.",
            groups.loaded_groups() as u64,
        );
        if let Some(commits) = &self.commits {
            put(
                "qun_store_commits_total",
                "counter",
                "Group commits of the store (embedded: one atomic batch and one journal fsync; cluster: one round of batches).",
                commits.commits(),
            );
            put(
                "qun_store_submissions_total",
                "counter",
                "Submissions the store made durable (embedded: a part per partition when one names several shops).",
                commits.submissions(),
            );
            put(
                "qun_store_writes_total",
                "counter",
                "Keys the embedded store wrote or removed; statements the cluster store wrote.",
                commits.writes(),
            );
        }
        let name = "qun_request_duration_seconds";
        render_header(
            &mut out,
            name,
            "Time from a request frame read to its answer handed to the connection's writer, \
             per kind of request, each shown once it has been seen (sends: once durable; Hello \
             not counted).",
        );
        for &kind in RequestKind::ALL {
            let h = self.request_duration.of(kind);
            if h.count() > 0 {
                let label = format!("request=\"{}\"", kind.name());
                render_series(&mut out, h, name, &label);
            }
        }
        render_histogram(
            &mut out,
            &core.fanout_wait,
            "qun_fanout_wait_seconds",
            "Time a group waited on the fan-out queue for its turn, from a commit that left \
             subscribers to push to (or its previous turn) to the turn.",
        );
        if let Some(commits) = &self.commits {
            render_histogram(
                &mut out,
                commits.durable_latency(),
                "qun_store_durable_seconds",
                "Time from a submission to the store until it is durable (embedded: the journal \
                 synced; cluster: its batch acknowledged), queueing behind other commits included.",
            );
            // The embedded store's commits only: the cluster store has no
            // such phases, and leaves them empty.
            if commits.persist_phase().count() > 0 {
                let name = "qun_store_commit_phase_seconds";
                render_header(
                    &mut out,
                    name,
                    "Time each group commit of the embedded store spent in each phase: write (the \
                     batch into the memtables and the journal, waiting for the store's locks \
                     included) and persist (the journal's fsync).",
                );
                render_series(&mut out, commits.write_phase(), name, "phase=\"write\"");
                render_series(&mut out, commits.persist_phase(), name, "phase=\"persist\"");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_striped_counter_sums_what_every_thread_added() {
        let c = StripedCounter::default();
        std::thread::scope(|s| {
            for t in 0..(2 * StripedCounter::STRIPES as u64 + 3) {
                let c = &c;
                s.spawn(move || {
                    for _ in 0..1_000 {
                        c.add(t + 1);
                    }
                });
            }
        });
        let threads = 2 * StripedCounter::STRIPES as u64 + 3;
        assert_eq!(c.get(), 1_000 * threads * (threads + 1) / 2);
        assert!(
            c.0.iter().filter(|s| s.0.load(Relaxed) > 0).count() > 1,
            "the threads were spread over stripes"
        );
    }

    #[test]
    fn the_histogram_renders_cumulative_buckets_a_sum_and_a_count() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(27));
        h.observe(Duration::from_secs(3));
        let mut page = String::new();
        render_histogram(&mut page, &h, "t", "help");
        assert!(page.contains("# TYPE t histogram"), "{page}");
        assert!(page.contains("t_bucket{le=\"0.001\"} 0\n"), "{page}");
        assert!(page.contains("t_bucket{le=\"0.0025\"} 0\n"), "{page}");
        assert!(page.contains("t_bucket{le=\"0.005\"} 2\n"), "{page}");
        // Between 25 and 30 ms: told apart from anything up to 50.
        assert!(page.contains("t_bucket{le=\"0.025\"} 2\n"), "{page}");
        assert!(page.contains("t_bucket{le=\"0.03\"} 3\n"), "{page}");
        assert!(page.contains("t_bucket{le=\"2.5\"} 3\n"), "{page}");
        assert!(page.contains("t_bucket{le=\"+Inf\"} 4\n"), "{page}");
        assert!(page.contains("t_sum 3.035\n"), "{page}");
        assert!(page.contains("t_count 4\n"), "{page}");
    }

    #[test]
    fn each_kind_of_request_is_its_own_series() {
        let d = RequestDurations::default();
        d.observe(RequestKind::SendMessage, Duration::from_millis(2));
        d.observe(RequestKind::SendMessage, Duration::from_millis(40));
        d.observe(RequestKind::JoinGroupBuy, Duration::from_millis(7));
        assert_eq!(d.of(RequestKind::SendMessage).count(), 2);
        assert_eq!(d.of(RequestKind::JoinGroupBuy).count(), 1);
        assert_eq!(d.of(RequestKind::Vote).count(), 0);
        let mut page = String::new();
        render_series(
            &mut page,
            d.of(RequestKind::SendMessage),
            "t",
            "request=\"send_message\"",
        );
        assert!(
            page.contains("t_bucket{request=\"send_message\",le=\"0.0025\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains("t_bucket{request=\"send_message\",le=\"+Inf\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("t_sum{request=\"send_message\"} 0.042\n"),
            "{page}"
        );
        assert!(
            page.contains("t_count{request=\"send_message\"} 2\n"),
            "{page}"
        );
    }
}
