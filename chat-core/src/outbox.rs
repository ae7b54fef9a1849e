//! A connection's queue of pushed frames, bounded by count and bytes.
//!
//! Fan-out calls [`Outbox::push`], which never waits: when the queue is full
//! the whole queue is dropped and the connection is marked out of sync. The
//! connection's writer task reads with [`Outbox::recv`] and learns about the
//! drop as [`Outgoing::OutOfSync`]. A slow phone therefore costs its group
//! nothing but one failed push, and its memory stays within the bound.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// The bounds of one outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most frames queued.
    pub max_frames: usize,
    /// Most bytes queued.
    pub max_bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_frames: 1024,
            max_bytes: 512 * 1024,
        }
    }
}

/// The outcome of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The frame is queued.
    Queued,
    /// The connection is out of sync; the frame (and the queue) was dropped.
    Dropped,
    /// The connection is gone.
    Closed,
}

/// What the writer task gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// An encoded frame to write.
    Frame(Bytes),
    /// This many pushes were dropped since the last report.
    OutOfSync {
        /// Count of dropped frames.
        dropped: u64,
    },
}

/// Why [`Outbox::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Empty {
    /// Nothing is queued now.
    Now,
    /// The outbox is closed.
    Closed,
}

/// A cheap-clone handle to one connection's push queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    notify: Notify,
    limits: OutboxLimits,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    dropped: u64,
    closed: bool,
}

impl Outbox {
    /// An empty outbox with these bounds.
    pub fn new(limits: OutboxLimits) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                notify: Notify::new(),
                limits,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a frame without waiting.
    pub fn push(&self, frame: Bytes) -> Pushed {
        let outcome = {
            let mut s = self.state();
            if s.closed {
                return Pushed::Closed;
            }
            if s.dropped > 0 {
                // Already out of sync and not yet told: keep dropping until
                // the writer has reported it, so the gap is one contiguous run.
                s.dropped += 1;
                return Pushed::Dropped;
            }
            let limits = self.shared.limits;
            if s.frames.len() >= limits.max_frames || s.bytes + frame.len() > limits.max_bytes {
                s.dropped = s.frames.len() as u64 + 1;
                s.frames.clear();
                s.frames.shrink_to(64);
                s.bytes = 0;
                Pushed::Dropped
            } else {
                s.bytes += frame.len();
                s.frames.push_back(frame);
                Pushed::Queued
            }
        };
        self.shared.notify.notify_one();
        outcome
    }

    /// Waits for the next thing to write; `None` once closed.
    pub async fn recv(&self) -> Option<Outgoing> {
        loop {
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(Empty::Closed) => return None,
                Err(Empty::Now) => self.shared.notify.notified().await,
            }
        }
    }

    /// The next thing to write if there is one now.
    ///
    /// # Errors
    /// [`Empty::Now`] when nothing is queued, [`Empty::Closed`] once closed.
    pub fn try_recv(&self) -> Result<Outgoing, Empty> {
        let mut s = self.state();
        if s.closed {
            return Err(Empty::Closed);
        }
        if s.dropped > 0 {
            let dropped = std::mem::take(&mut s.dropped);
            return Ok(Outgoing::OutOfSync { dropped });
        }
        match s.frames.pop_front() {
            Some(frame) => {
                s.bytes -= frame.len();
                Ok(Outgoing::Frame(frame))
            }
            None => Err(Empty::Now),
        }
    }

    /// Closes the outbox: later pushes answer [`Pushed::Closed`] and `recv`
    /// returns `None`. Queued frames are discarded.
    pub fn close(&self) {
        {
            let mut s = self.state();
            s.closed = true;
            s.frames.clear();
            s.bytes = 0;
        }
        self.shared.notify.notify_one();
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.state().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[tokio::test]
    async fn frames_come_out_in_order() {
        let o = Outbox::new(OutboxLimits::default());
        for i in 1..=3u8 {
            assert_eq!(o.push(Bytes::from(vec![i])), Pushed::Queued);
        }
        for i in 1..=3u8 {
            assert_eq!(o.recv().await, Some(Outgoing::Frame(Bytes::from(vec![i]))));
        }
    }

    #[tokio::test]
    async fn overflow_by_count_drops_the_queue_and_reports_once() {
        let o = Outbox::new(OutboxLimits {
            max_frames: 2,
            max_bytes: 1 << 20,
        });
        assert_eq!(o.push(frame(1)), Pushed::Queued);
        assert_eq!(o.push(frame(1)), Pushed::Queued);
        assert_eq!(o.push(frame(1)), Pushed::Dropped);
        assert_eq!(o.push(frame(1)), Pushed::Dropped);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.recv().await, Some(Outgoing::OutOfSync { dropped: 4 }));
        // After the report, pushes flow again.
        assert_eq!(o.push(Bytes::from_static(b"x")), Pushed::Queued);
        assert_eq!(
            o.recv().await,
            Some(Outgoing::Frame(Bytes::from_static(b"x")))
        );
    }

    #[tokio::test]
    async fn overflow_by_bytes() {
        let o = Outbox::new(OutboxLimits {
            max_frames: 100,
            max_bytes: 10,
        });
        assert_eq!(o.push(frame(6)), Pushed::Queued);
        assert_eq!(o.queued_bytes(), 6);
        assert_eq!(o.push(frame(6)), Pushed::Dropped);
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn closed_outbox_ends_the_writer() {
        let o = Outbox::new(OutboxLimits::default());
        o.push(frame(1));
        o.close();
        assert_eq!(o.push(frame(1)), Pushed::Closed);
        assert_eq!(o.recv().await, None);
    }

    #[tokio::test]
    async fn recv_wakes_on_push() {
        let o = Outbox::new(OutboxLimits::default());
        let reader = {
            let o = o.clone();
            tokio::spawn(async move { o.recv().await })
        };
        tokio::task::yield_now().await;
        o.push(Bytes::from_static(b"late"));
        assert_eq!(
            reader.await.unwrap(),
            Some(Outgoing::Frame(Bytes::from_static(b"late")))
        );
    }
}
