//! The server's own account of latency: its `qun_request_duration_seconds`,
//! `qun_store_durable_seconds` and `qun_fanout_wait_seconds` histograms
//! (and the count of sends that
//! cost a store read, `qun_sent_index_reads_total`, the runtime's
//! threads, `qun_runtime_workers`, and the frames and writes of the
//! connections' writers, `qun_frames_out_total` and
//! `qun_frame_batches_total`), read
//! from `/metrics` before and after the measured phase. End-to-end latency
//! (what members measure) includes the load generator, which shares this
//! machine's cores; the difference of the two scrapes is the server's share
//! alone, and the store's within it.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The request histogram's buckets in the exposition format.
const NAME: &str = "qun_request_duration_seconds_bucket";
/// The store's time-to-durability histogram's buckets.
const STORE: &str = "qun_store_durable_seconds_bucket";
/// The fan-out queue's wait histogram's buckets: from a commit (or a
/// group's previous turn) to the group's fan-out turn.
const FANOUT_WAIT: &str = "qun_fanout_wait_seconds_bucket";
/// The embedded store's group commits, by phase (`phase="write"` and
/// `phase="persist"`).
const COMMIT_PHASE: &str = "qun_store_commit_phase_seconds_bucket";
/// Sends whose client message id the server looked up in its store.
const SENT_INDEX_READS: &str = "qun_sent_index_reads_total";
/// Threads of the server's async runtime (its `worker_threads`).
const RUNTIME_WORKERS: &str = "qun_runtime_workers";
/// Frames the connections' writers wrote.
const FRAMES_OUT: &str = "qun_frames_out_total";
/// Writes they made, one per batch of frames.
const FRAME_BATCHES: &str = "qun_frame_batches_total";

/// One read of the server's `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scrape {
    /// Request latency.
    pub(crate) requests: Buckets,
    /// Submission to durable (absent from servers older than the metric).
    pub(crate) store: Option<Buckets>,
    /// Fan-out turns' wait on the queue (absent from servers older than
    /// the metric).
    pub(crate) fanout_wait: Option<Buckets>,
    /// The embedded store's commits: writing the batch, and persisting
    /// the journal (absent from the cluster store and older servers).
    pub(crate) commit_phases: Option<(Buckets, Buckets)>,
    /// Sends whose id was looked up in the store's index of earlier ids
    /// (absent from servers older than the counter).
    pub(crate) sent_index_reads: Option<u64>,
    /// Threads of the server's async runtime (absent from servers older
    /// than the gauge).
    pub(crate) runtime_workers: Option<u64>,
    /// Frames written to clients, and the writes that carried them
    /// (absent from servers older than the batch counter).
    pub(crate) frames_and_writes: Option<(u64, u64)>,
}

impl Scrape {
    /// Reads the histograms and counters out of a `/metrics` page.
    ///
    /// # Errors
    /// The page has no request histogram, or an unreadable bucket line.
    pub(crate) fn parse(page: &str) -> anyhow::Result<Self> {
        Ok(Self {
            requests: Buckets::parse(page)?,
            store: Buckets::parse_named(page, STORE)?,
            fanout_wait: Buckets::parse_named(page, FANOUT_WAIT)?,
            commit_phases: Buckets::parse_series(page, COMMIT_PHASE, "phase=\"write\"")?.zip(
                Buckets::parse_series(page, COMMIT_PHASE, "phase=\"persist\"")?,
            ),
            sent_index_reads: counter(page, SENT_INDEX_READS),
            runtime_workers: counter(page, RUNTIME_WORKERS),
            frames_and_writes: counter(page, FRAMES_OUT).zip(counter(page, FRAME_BATCHES)),
        })
    }
}

/// The value of the unlabelled counter `name` on a `/metrics` page.
fn counter(page: &str, name: &str) -> Option<u64> {
    page.lines().find_map(|line| {
        let (n, value) = line.split_once(' ')?;
        if n == name {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Cumulative bucket counts: (upper bound in seconds, requests at most that
/// long), ascending, the last bound infinite.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Buckets(Vec<(f64, u64)>);

impl Buckets {
    /// Parses the histogram out of a `/metrics` page.
    ///
    /// # Errors
    /// The page has no `qun_request_duration_seconds` histogram.
    pub(crate) fn parse(page: &str) -> anyhow::Result<Self> {
        if let Some(b) = Self::parse_named(page, NAME)? {
            return Ok(b);
        }
        // The server shows a kind of request once it has seen one: a
        // server that has answered nothing yet has the histogram, empty.
        if page.contains("# TYPE qun_request_duration_seconds histogram") {
            return Ok(Self(Vec::new()));
        }
        bail!("the server's /metrics has no qun_request_duration_seconds histogram")
    }

    /// Parses the histogram whose bucket lines start with `name`, if the
    /// page has it. Series with other labels (the server's
    /// `request="send_message"`) are added up bucket by bucket: the result
    /// is over every series.
    ///
    /// # Errors
    /// A bucket line that does not read as one.
    fn parse_named(page: &str, name: &str) -> anyhow::Result<Option<Self>> {
        Self::parse_series(page, name, "")
    }

    /// As [`Buckets::parse_named`], over the series whose labels include
    /// `label` (`phase="persist"`) only; every series for an empty one.
    ///
    /// # Errors
    /// A bucket line that does not read as one.
    fn parse_series(page: &str, name: &str, label: &str) -> anyhow::Result<Option<Self>> {
        let mut out: Vec<(f64, u64)> = Vec::new();
        for line in page.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !label.is_empty() && !rest.split(['{', ',', '}']).any(|l| l == label) {
                continue;
            }
            let parsed = rest
                .strip_prefix('{')
                .and_then(|r| r.split_once("} "))
                .and_then(|(labels, n)| {
                    let le = labels
                        .split(',')
                        .find_map(|l| l.strip_prefix("le=\""))?
                        .strip_suffix('"')?;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le, n.trim().parse::<u64>().ok()?))
                });
            match parsed {
                Some((le, n)) => match out.iter_mut().find(|(bound, _)| *bound == le) {
                    Some((_, total)) => *total += n,
                    None => out.push((le, n)),
                },
                None => bail!("unreadable metrics line: {line}"),
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok((!out.is_empty()).then_some(Self(out)))
    }

    /// What was observed since `before` (same buckets).
    pub(crate) fn since(&self, before: &Self) -> Self {
        let then = |le: f64| {
            before
                .0
                .iter()
                .find(|&&(bound, _)| bound == le)
                .map_or(0, |&(_, n)| n)
        };
        Self(
            self.0
                .iter()
                .map(|&(le, now)| (le, now.saturating_sub(then(le))))
                .collect(),
        )
    }

    /// Requests counted.
    pub(crate) fn count(&self) -> u64 {
        self.0.last().map_or(0, |&(_, n)| n)
    }

    /// The smallest bucket bound that at least a fraction `q` of the
    /// requests stayed within, in milliseconds (`None`: no requests, or
    /// beyond the last finite bound).
    pub(crate) fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil() as u64;
        self.0
            .iter()
            .find(|&&(_, n)| n >= want)
            .map(|&(le, _)| le * 1000.0)
            .filter(|ms| ms.is_finite())
    }
}

/// Reads the histograms from `url` (`http://127.0.0.1:PORT/metrics`).
///
/// # Errors
/// Not an `http://` URL of a loopback address, the server cannot be
/// reached, or its page has no request histogram.
pub(crate) async fn scrape(url: &str) -> anyhow::Result<Scrape> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--metrics-url must be http://…, not {url}"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, "metrics"));
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("--metrics-url needs an IP:PORT, not {authority}"))?;
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address: qun-loadtest only targets 127.0.0.1 or ::1");
    }
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} for /{path}"))?;
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await?;
    let body = page.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Scrape::parse(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(counts: [u64; 4]) -> String {
        format!(
            "# TYPE qun_request_duration_seconds histogram\n\
             {NAME}{{le=\"0.001\"}} {}\n{NAME}{{le=\"0.01\"}} {}\n\
             {NAME}{{le=\"0.1\"}} {}\n{NAME}{{le=\"+Inf\"}} {}\n\
             qun_request_duration_seconds_count {}\n",
            counts[0], counts[1], counts[2], counts[3], counts[3]
        )
    }

    #[test]
    fn quantiles_come_from_the_difference_of_two_scrapes() {
        let before = Buckets::parse(&page([100, 100, 100, 100])).unwrap();
        let after = Buckets::parse(&page([190, 199, 200, 200])).unwrap();
        let run = after.since(&before);
        assert_eq!(run.count(), 100);
        assert_eq!(run.quantile_bound_ms(0.5), Some(1.0));
        assert_eq!(run.quantile_bound_ms(0.95), Some(10.0));
        assert_eq!(run.quantile_bound_ms(0.999), Some(100.0));
        let slow = Buckets::parse(&page([0, 0, 0, 5])).unwrap();
        assert_eq!(slow.quantile_bound_ms(0.5), None, "beyond the last bound");
    }

    #[test]
    fn frames_and_writes_are_read_only_together() {
        let both = format!(
            "{}qun_frames_out_total 30\nqun_frame_batches_total 12\n",
            page([1, 1, 1, 1])
        );
        assert_eq!(
            Scrape::parse(&both).unwrap().frames_and_writes,
            Some((30, 12))
        );
        // A server from before the batch counter: no ratio to make.
        let older = format!("{}qun_frames_out_total 30\n", page([1, 1, 1, 1]));
        assert_eq!(Scrape::parse(&older).unwrap().frames_and_writes, None);
    }

    #[test]
    fn the_sent_index_reads_are_read_when_the_server_counts_them() {
        let with = format!(
            "{}# TYPE qun_sent_index_reads_total counter\nqun_sent_index_reads_total 42\n\
             qun_sent_index_reads_total_other 7\n",
            page([1, 1, 1, 1])
        );
        assert_eq!(Scrape::parse(&with).unwrap().sent_index_reads, Some(42));
        let without = page([1, 1, 1, 1]);
        assert_eq!(Scrape::parse(&without).unwrap().sent_index_reads, None);
    }

    #[test]
    fn series_of_each_request_kind_are_added_up() {
        let page = format!(
            "{NAME}{{request=\"send_message\",le=\"0.001\"}} 3\n\
             {NAME}{{request=\"send_message\",le=\"+Inf\"}} 4\n\
             {NAME}{{request=\"join_group\",le=\"0.001\"}} 0\n\
             {NAME}{{request=\"join_group\",le=\"+Inf\"}} 2\n"
        );
        let b = Buckets::parse(&page).unwrap();
        assert_eq!(b.count(), 6);
        assert_eq!(b.quantile_bound_ms(0.5), Some(1.0));
        assert_eq!(
            b.quantile_bound_ms(0.9),
            None,
            "beyond the last finite bound"
        );
    }

    #[test]
    fn the_store_histogram_is_read_when_the_page_has_it() {
        let requests_only = Scrape::parse(&page([1, 2, 3, 4])).unwrap();
        assert_eq!(requests_only.store, None, "an older server has none");
        let both = format!(
            "{}{STORE}{{le=\"0.005\"}} 7\n{STORE}{{le=\"+Inf\"}} 9\n",
            page([1, 2, 3, 4])
        );
        let scraped = Scrape::parse(&both).unwrap();
        assert_eq!(scraped.requests.count(), 4);
        let store = scraped.store.unwrap();
        assert_eq!(store.count(), 9);
        assert_eq!(store.quantile_bound_ms(0.5), Some(5.0));
    }

    #[test]
    fn the_fanout_wait_histogram_is_read_apart_from_the_others() {
        let older = Scrape::parse(&page([1, 2, 3, 4])).unwrap();
        assert_eq!(older.fanout_wait, None, "an older server has none");
        let page = format!(
            "{}{FANOUT_WAIT}{{le=\"0.001\"}} 3\n{FANOUT_WAIT}{{le=\"0.025\"}} 10\n\
             {FANOUT_WAIT}{{le=\"+Inf\"}} 10\n{STORE}{{le=\"+Inf\"}} 2\n",
            page([1, 2, 3, 4])
        );
        let scraped = Scrape::parse(&page).unwrap();
        let wait = scraped.fanout_wait.unwrap();
        assert_eq!(wait.count(), 10);
        assert_eq!(wait.quantile_bound_ms(0.3), Some(1.0));
        assert_eq!(wait.quantile_bound_ms(0.99), Some(25.0));
        // Neither mixed into the requests nor into the store.
        assert_eq!(scraped.requests.count(), 4);
        assert_eq!(scraped.store.unwrap().count(), 2);
    }

    #[test]
    fn the_commit_phases_are_read_each_on_its_own() {
        let older = Scrape::parse(&page([1, 2, 3, 4])).unwrap();
        assert_eq!(
            older.commit_phases, None,
            "a cluster or older server has none"
        );
        let page = format!(
            "{}{COMMIT_PHASE}{{phase=\"write\",le=\"0.001\"}} 9\n\
             {COMMIT_PHASE}{{phase=\"write\",le=\"+Inf\"}} 10\n\
             {COMMIT_PHASE}{{phase=\"persist\",le=\"0.001\"}} 2\n\
             {COMMIT_PHASE}{{phase=\"persist\",le=\"0.25\"}} 9\n\
             {COMMIT_PHASE}{{phase=\"persist\",le=\"+Inf\"}} 10\n",
            page([1, 2, 3, 4])
        );
        let (write, persist) = Scrape::parse(&page).unwrap().commit_phases.unwrap();
        assert_eq!((write.count(), persist.count()), (10, 10));
        assert_eq!(write.quantile_bound_ms(0.5), Some(1.0));
        assert_eq!(persist.quantile_bound_ms(0.5), Some(250.0));
        assert_eq!(persist.quantile_bound_ms(0.2), Some(1.0));
    }

    #[test]
    fn a_server_that_answered_nothing_yet_has_an_empty_histogram() {
        let fresh = "# HELP qun_request_duration_seconds t\n\
                     # TYPE qun_request_duration_seconds histogram\n";
        let before = Buckets::parse(fresh).unwrap();
        assert_eq!(before.count(), 0);
        let after = Buckets::parse(&page([5, 6, 7, 8])).unwrap();
        let run = after.since(&before);
        assert_eq!(run.count(), 8);
        assert_eq!(run.quantile_bound_ms(0.5), Some(1.0));
    }

    #[test]
    fn a_page_without_the_histogram_is_an_error() {
        assert!(Buckets::parse("qun_connections_open 3\n").is_err());
        assert!(Buckets::parse(&format!("{NAME}{{le=\"x\"}} 1\n")).is_err());
    }
}
