//! Latency histograms and the report: a table on stdout and JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::Serialize;

/// A histogram of latencies in microseconds, 1 µs to 10 minutes.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

/// A histogram as a base64 string for a worker's result line.
pub(crate) fn encode(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    if V2Serializer::new().serialize(h, &mut bytes).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Adds a worker's encoded histogram into `into`.
pub(crate) fn merge(into: &mut Histogram<u64>, encoded: &str) -> anyhow::Result<()> {
    if encoded.is_empty() {
        return Ok(());
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
    let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..])?;
    into.add(h)?;
    Ok(())
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    /// Samples.
    pub(crate) count: u64,
    /// Median.
    pub(crate) p50_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// 99.9th percentile.
    pub(crate) p999_ms: f64,
    /// Largest.
    pub(crate) max_ms: f64,
}

impl Latency {
    /// From a histogram in µs.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    /// The scenario and its parameters.
    pub(crate) scenario: String,
    /// `ws` or `quic`.
    pub(crate) transport: String,
    /// Parameters as given.
    pub(crate) params: BTreeMap<String, String>,
    /// Figures, by name (`deliveries_per_sec`, `rss_per_connection_bytes`…).
    pub(crate) figures: BTreeMap<String, f64>,
    /// Latency of the measured operation.
    pub(crate) latency: Option<Latency>,
    /// Latency of a part of the operation, by name: a flash sale's
    /// `winners_latency` (the joins that won a slot, the ones that wait
    /// for durability), a fan-out's `after_sequencing_latency` (from the
    /// server's sequencing of a message to the member, to the
    /// millisecond: the rest of `latency` is the sender's side).
    #[serde(flatten)]
    pub(crate) parts: BTreeMap<String, Latency>,
    /// Counts by name (answers, errors).
    pub(crate) counts: BTreeMap<String, u64>,
    /// Checks that must hold (exactly K joined, nothing lost…).
    pub(crate) checks: BTreeMap<String, bool>,
    /// Why the first member that could not connect or join failed, when
    /// one did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_failure: Option<String>,
    /// How long the measured phase took.
    pub(crate) elapsed_ms: f64,
}

impl Report {
    /// Whether every check held.
    pub(crate) fn passed(&self) -> bool {
        self.checks.values().all(|ok| *ok)
    }

    /// The report as a table for people.
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "qun-loadtest {} over {} ({:.2?})\n",
            self.scenario,
            self.transport,
            Duration::from_secs_f64(self.elapsed_ms / 1000.0)
        );
        let row = |out: &mut String, k: &str, v: String| {
            out.push_str(&format!("  {k:<32} {v}\n"));
        };
        for (k, v) in &self.params {
            row(&mut out, k, v.clone());
        }
        for (k, v) in &self.figures {
            // Cores are fractions of two or so: a tenth is too coarse to
            // tell the processes sharing a machine apart.
            let shown = if k.ends_with("_cores") {
                format!("{v:.2}")
            } else {
                format!("{v:.1}")
            };
            row(&mut out, k, shown);
        }
        let percentiles = |l: &Latency| {
            format!(
                "p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
            )
        };
        if let Some(l) = &self.latency {
            row(&mut out, "latency (ms)", percentiles(l));
        }
        for (k, l) in &self.parts {
            row(
                &mut out,
                &format!("{} (ms)", k.replace('_', " ")),
                percentiles(l),
            );
        }
        for (k, v) in &self.counts {
            row(&mut out, k, v.to_string());
        }
        for (k, ok) in &self.checks {
            row(&mut out, k, if *ok { "ok".into() } else { "FAILED".into() });
        }
        if let Some(why) = &self.first_failure {
            row(&mut out, "first failure", why.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_through_a_worker_line() {
        let mut h = histogram();
        for us in [100, 200, 300, 40_000] {
            h.record(us).unwrap();
        }
        let mut total = histogram();
        merge(&mut total, &encode(&h)).unwrap();
        merge(&mut total, &encode(&h)).unwrap();
        assert_eq!(total.len(), 8);
        let l = Latency::of(&total);
        assert!((39.9..=40.1).contains(&l.max_ms), "{l:?}");
        assert!((0.19..=0.21).contains(&l.p50_ms), "{l:?}");
    }

    #[test]
    fn a_failed_check_fails_the_report() {
        let mut r = Report {
            scenario: "flash-sale".into(),
            transport: "ws".into(),
            params: BTreeMap::new(),
            figures: BTreeMap::new(),
            latency: None,
            parts: BTreeMap::new(),
            counts: BTreeMap::new(),
            checks: BTreeMap::from([("exactly_slots_joined".into(), true)]),
            first_failure: None,
            elapsed_ms: 1.0,
        };
        assert!(r.passed());
        r.figures.insert("server_cores".into(), 0.456);
        r.figures.insert("deliveries_per_sec".into(), 1234.56);
        let table = r.table();
        assert!(table.contains(" 0.46\n"), "{table}");
        assert!(table.contains(" 1234.6\n"), "{table}");
        r.checks.insert("nothing_lost".into(), false);
        assert!(!r.passed());
        assert!(r.table().contains("FAILED"));
    }
}
