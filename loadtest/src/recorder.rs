//! Where a worker's members record their latencies: one pair of histograms
//! per runtime thread, merged once the measured phase is over.
//!
//! A fan-out member records every delivery, hundreds of thousands a second
//! per machine. Kept per member (a growing `Vec` of raw samples each, or a
//! histogram each, tens of KiB), every record touched memory the thread had
//! not used since that member's previous delivery, 16 ms earlier: a cache
//! miss or two per delivery, on the same cores as the server being
//! measured. Per thread, the histograms stay in the thread's cache, and the
//! member's own state stays small.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use hdrhistogram::Histogram;

use crate::report::histogram;

/// Slots to spread threads over. A worker's runtime has a thread per core;
/// two threads that share a slot only share its lock.
const SLOTS: usize = 16;

/// Latency histograms shared by the members of one worker process.
pub(crate) struct Recorder {
    slots: Box<[Mutex<Slot>]>,
}

#[derive(Default)]
struct Slot {
    /// The whole operation, µs (`None` until first recorded).
    latency: Option<Histogram<u64>>,
    /// A part of it (see `WorkerResult::part_latency`), µs.
    part: Option<Histogram<u64>>,
}

impl Slot {
    fn record(h: &mut Option<Histogram<u64>>, us: u64) {
        let _ = h.get_or_insert_with(histogram).record(us.max(1));
    }
}

/// This thread's slot, given out in turn on first use.
fn slot_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    }
    SLOT.with(|s| *s)
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Recorder {
    fn with_slot(&self, f: impl FnOnce(&mut Slot)) {
        let mut slot = self.slots[slot_of_this_thread()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut slot);
    }

    /// Records an operation's latency, µs (0 counts as 1).
    pub(crate) fn latency(&self, us: u64) {
        self.with_slot(|s| Slot::record(&mut s.latency, us));
    }

    /// Records an operation's latency and that of its measured part
    /// (`WorkerResult::part_latency`), µs, under one lock.
    pub(crate) fn latency_and_part(&self, latency_us: u64, part_us: u64) {
        self.with_slot(|s| {
            Slot::record(&mut s.latency, latency_us);
            Slot::record(&mut s.part, part_us);
        });
    }

    /// Every thread's records, merged: (latency, part).
    pub(crate) fn merged(&self) -> (Histogram<u64>, Histogram<u64>) {
        let (mut latency, mut part) = (histogram(), histogram());
        for slot in &self.slots {
            let slot = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (into, from) in [(&mut latency, &slot.latency), (&mut part, &slot.part)] {
                if let Some(from) = from {
                    let _ = into.add(from);
                }
            }
        }
        (latency, part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_every_thread_are_merged() {
        let r = std::sync::Arc::new(Recorder::default());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 1..=100 {
                        r.latency_and_part(1_000 * (t + 1), i);
                    }
                    r.latency(0);
                    r.latency_and_part(1_000 * (t + 1), 0);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (latency, part) = r.merged();
        assert_eq!(latency.len(), 4 * 102);
        assert_eq!(part.len(), 4 * 101);
        assert_eq!(latency.min(), 1, "0 counts as 1");
        assert_eq!(part.min(), 1, "0 counts as 1");
        assert_eq!(latency.value_at_quantile(0.5), 2_000);
        assert!(latency.equivalent(latency.max(), 4_000));
        assert_eq!(part.max(), 100);
        assert_eq!(part.count_at(100), 4);
    }

    #[test]
    fn nothing_recorded_merges_to_empty_histograms() {
        let (latency, part) = Recorder::default().merged();
        assert!(latency.is_empty() && part.is_empty());
    }
}
