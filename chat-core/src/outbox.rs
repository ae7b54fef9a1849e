//! A connection's queue of pushed frames, bounded by count and bytes, and
//! of its replies (answers to its own requests, and its close).
//!
//! Replies are a lane of their own: never dropped, taken before pushes
//! ([`Outbox::next`]), and bounded by [`MAX_REPLIES`], beyond which
//! [`Outbox::reply`] waits — the backpressure on a client that sends
//! requests without reading. (One queue per connection rather than a
//! channel beside it: a tokio channel allocates 32 slots up front, about
//! 1.5 KB for every idle connection.)
//!
//! Fan-out calls [`Outbox::push`], which never waits: when the queue is full
//! the whole queue is dropped and the connection is marked out of sync. The
//! connection's writer task reads with [`Outbox::next`] (or
//! [`Outbox::recv`]) and learns about the drop as [`Outgoing::OutOfSync`]. A
//! slow phone therefore costs its group nothing but one failed push, and its
//! memory stays within the bound.
//!
//! One task reads an outbox. It waits with its waker kept in the queue's
//! state, under the lock every push takes anyway, so handing a push over
//! costs one lock on each side and one wake-up (benches/outbox.rs); a second
//! reader waiting at once would take the first one's place.
//!
//! # Epochs: why a drop ends every subscription
//! Every subscription records the outbox's *epoch* when it was made
//! ([`Outbox::epoch`]) and pushes with [`Outbox::push_in`]. An overflow
//! starts a new epoch, so every subscription made before it is answered
//! [`Pushed::Stale`] from then on and its group forgets it. The client is
//! told once ([`Outgoing::OutOfSync`]) and resumes from the last seq it has;
//! nothing reaches it with a hole in the middle, and a connection that fell
//! behind costs the groups nothing until it does.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

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
    /// The queue was full: the frame and the queue were dropped, the
    /// connection is out of sync and every subscription of it has ended.
    Dropped,
    /// The subscription this push was for ended with an earlier drop.
    Stale,
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

/// Most replies queued before [`Outbox::reply`] waits.
pub const MAX_REPLIES: usize = 64;

/// What a connection's own requests produce, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An encoded answer.
    Frame(Bytes),
    /// A transport's keep-alive answer: a WebSocket pong carrying its
    /// ping's payload. Transports without one ignore it.
    Pong(Bytes),
    /// Send a close frame with this status and reason, then stop.
    Close {
        /// The close status.
        code: u16,
        /// Why.
        reason: String,
    },
    /// Nothing more: stop once the replies before this are written.
    End,
}

/// What the writer takes next: replies before pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A reply.
    Reply(Reply),
    /// A push, or the report of dropped pushes.
    Push(Outgoing),
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
    /// Wakes [`Outbox::push_when_room`] when the writer takes something.
    room: Notify,
    limits: OutboxLimits,
    /// The most bytes any outbox sharing this gauge has held.
    peak_gauge: Option<Arc<AtomicU64>>,
}

#[derive(Debug, Default)]
struct State {
    replies: VecDeque<Reply>,
    frames: VecDeque<Bytes>,
    bytes: usize,
    dropped: u64,
    epoch: u64,
    peak_bytes: usize,
    waiting_for_room: bool,
    closed: bool,
    /// The reader waiting for something to be queued.
    reader: Option<Waker>,
}

impl State {
    /// Drops everything queued, and the one frame that did not fit (or
    /// could not be given), and moves to the next epoch.
    fn drop_queue(&mut self) {
        self.dropped += self.frames.len() as u64 + 1;
        self.frames.clear();
        self.frames.shrink_to(64);
        self.bytes = 0;
        self.epoch += 1;
    }

    /// Why a push for a subscription of `epoch` cannot be queued at all.
    fn refuses(&self, epoch: u64) -> Option<Pushed> {
        if self.closed {
            Some(Pushed::Closed)
        } else if self.epoch != epoch {
            Some(Pushed::Stale)
        } else {
            None
        }
    }

    /// Whether `frames` more frames of `bytes` in total stay within `limits`.
    fn fits(&self, limits: OutboxLimits, frames: usize, bytes: usize) -> bool {
        self.frames.len() + frames <= limits.max_frames && self.bytes + bytes <= limits.max_bytes
    }

    /// Keeps `waker` to be woken by the next thing queued (a clone only
    /// when it is not the one already kept).
    fn wait(&mut self, waker: &Waker) {
        match &self.reader {
            Some(kept) if kept.will_wake(waker) => {}
            _ => self.reader = Some(waker.clone()),
        }
    }
}

/// Releases the state's lock, then wakes the reader if one waits: something
/// it may want was queued (or the outbox closed) under that lock.
fn wake_reader(mut s: std::sync::MutexGuard<'_, State>) {
    let reader = s.reader.take();
    drop(s);
    if let Some(reader) = reader {
        reader.wake();
    }
}

impl Outbox {
    /// An empty outbox with these bounds.
    pub fn new(limits: OutboxLimits) -> Self {
        Self::build(limits, None)
    }

    /// An empty outbox that also raises `peak_gauge` to the most bytes it
    /// ever holds (for a server-wide `/metrics` high-water mark).
    pub fn with_peak_gauge(limits: OutboxLimits, peak_gauge: Arc<AtomicU64>) -> Self {
        Self::build(limits, Some(peak_gauge))
    }

    fn build(limits: OutboxLimits, peak_gauge: Option<Arc<AtomicU64>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                room: Notify::new(),
                limits,
                peak_gauge,
            }),
        }
    }

    /// The current epoch. A subscription remembers it and pushes with
    /// [`Outbox::push_in`]; an overflow moves to the next epoch.
    pub fn epoch(&self) -> u64 {
        self.state().epoch
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a frame that belongs to no subscription (e.g. a read-state
    /// notice) without waiting; it can still overflow the queue.
    pub fn push(&self, frame: Bytes) -> Pushed {
        let epoch = self.epoch();
        self.push_in(epoch, frame)
    }

    /// Queues a frame of a subscription made in `epoch`, without waiting.
    /// A full queue is dropped whole ([`Pushed::Dropped`]); a subscription
    /// from before a drop gets [`Pushed::Stale`].
    pub fn push_in(&self, epoch: u64, frame: Bytes) -> Pushed {
        let mut s = self.state();
        if let Some(refused) = s.refuses(epoch) {
            return refused;
        }
        let outcome = if !s.fits(self.shared.limits, 1, frame.len()) {
            s.drop_queue();
            Pushed::Dropped
        } else {
            self.enqueue(&mut s, frame);
            Pushed::Queued
        };
        wake_reader(s);
        outcome
    }

    /// A subscription made in `epoch` fell so far behind that what it
    /// lacks is gone: the queue is dropped as if it had overflowed, so the
    /// client is told it is out of sync and resumes.
    pub(crate) fn fall_behind(&self, epoch: u64) {
        let mut s = self.state();
        if s.refuses(epoch).is_some() {
            return;
        }
        s.drop_queue();
        wake_reader(s);
    }

    fn enqueue(&self, s: &mut State, frame: Bytes) {
        s.bytes += frame.len();
        s.frames.push_back(frame);
        if s.bytes > s.peak_bytes {
            s.peak_bytes = s.bytes;
            if let Some(gauge) = &self.shared.peak_gauge {
                gauge.fetch_max(s.bytes as u64, Ordering::Relaxed);
            }
        }
    }

    /// Whether `frames` more frames of `bytes` in total fit now.
    pub fn has_room(&self, frames: usize, bytes: usize) -> bool {
        self.state().fits(self.shared.limits, frames, bytes)
    }

    /// Queues a frame of a subscription made in `epoch`, waiting until there
    /// is room instead of dropping: for catch-up, which a connection does on
    /// its own request, at the pace its phone reads. A frame larger than the
    /// byte bound is queued once the queue is empty.
    pub async fn push_when_room(&self, epoch: u64, frame: Bytes) -> Pushed {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            {
                let mut s = self.state();
                if let Some(refused) = s.refuses(epoch) {
                    return refused;
                }
                if s.fits(self.shared.limits, 1, frame.len()) || s.frames.is_empty() {
                    self.enqueue(&mut s, frame);
                    wake_reader(s);
                    return Pushed::Queued;
                }
                s.waiting_for_room = true;
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Waits for the next push to write (replies are left for
    /// [`Outbox::next`]); `None` once closed.
    pub async fn recv(&self) -> Option<Outgoing> {
        self.wait_for(Self::take_push).await
    }

    /// Waits until `take` finds something (`Some`) or the outbox is closed
    /// (`None`), keeping the reader's waker in the state between tries.
    async fn wait_for<T>(&self, take: fn(&Self, &mut State) -> Result<T, Empty>) -> Option<T> {
        poll_fn(|cx| {
            let mut s = self.state();
            match take(self, &mut s) {
                Ok(item) => Poll::Ready(Some(item)),
                Err(Empty::Closed) => Poll::Ready(None),
                Err(Empty::Now) => {
                    s.wait(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Queues a reply, waiting while [`MAX_REPLIES`] are queued; `false`
    /// once the outbox is closed (the writer is gone).
    pub async fn reply(&self, reply: Reply) -> bool {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            {
                let mut s = self.state();
                if s.closed {
                    return false;
                }
                if s.replies.len() < MAX_REPLIES {
                    s.replies.push_back(reply);
                    wake_reader(s);
                    return true;
                }
                s.waiting_for_room = true;
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Queues a reply if there is room now; `false` otherwise or once
    /// closed.
    pub fn try_reply(&self, reply: Reply) -> bool {
        let mut s = self.state();
        if s.closed || s.replies.len() >= MAX_REPLIES {
            return false;
        }
        s.replies.push_back(reply);
        wake_reader(s);
        true
    }

    /// Waits for the next thing to write, replies first; `None` once
    /// closed.
    pub async fn next(&self) -> Option<Next> {
        self.wait_for(Self::take_next).await
    }

    /// The next thing to write if there is one now, replies first.
    ///
    /// # Errors
    /// [`Empty::Now`] when nothing is queued, [`Empty::Closed`] once closed.
    pub fn try_next(&self) -> Result<Next, Empty> {
        self.take_next(&mut self.state())
    }

    /// [`Outbox::try_next`] under the lock already taken.
    fn take_next(&self, s: &mut State) -> Result<Next, Empty> {
        if !s.closed
            && let Some(reply) = s.replies.pop_front()
        {
            if s.replies.is_empty() {
                // Most connections are idle most of the time: an empty
                // lane holds no memory (docs/benchmarks.md,
                // "Connections"). Requests are rare enough that the
                // allocation on the next answer costs nothing that shows.
                s.replies = VecDeque::new();
            }
            if std::mem::take(&mut s.waiting_for_room) {
                self.shared.room.notify_waiters();
            }
            return Ok(Next::Reply(reply));
        }
        self.take_push(s).map(Next::Push)
    }

    /// The next push to write if there is one now (replies are left for
    /// [`Outbox::next`]).
    ///
    /// # Errors
    /// [`Empty::Now`] when nothing is queued, [`Empty::Closed`] once closed.
    pub fn try_recv(&self) -> Result<Outgoing, Empty> {
        self.take_push(&mut self.state())
    }

    /// [`Outbox::try_recv`] under the lock already taken.
    fn take_push(&self, s: &mut State) -> Result<Outgoing, Empty> {
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
                if std::mem::take(&mut s.waiting_for_room) {
                    self.shared.room.notify_waiters();
                }
                Ok(Outgoing::Frame(frame))
            }
            None => Err(Empty::Now),
        }
    }

    /// Closes the outbox: later pushes answer [`Pushed::Closed`], replies
    /// `false`, and `recv` and `next` return `None`. Queued frames and
    /// replies are discarded.
    pub fn close(&self) {
        let mut s = self.state();
        s.closed = true;
        s.frames.clear();
        s.replies.clear();
        s.bytes = 0;
        wake_reader(s);
        self.shared.room.notify_waiters();
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.state().bytes
    }

    /// The most bytes this outbox has held at once.
    pub fn peak_bytes(&self) -> usize {
        self.state().peak_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_come_before_pushes_are_never_dropped_and_wait_for_room() {
        let o = Outbox::new(OutboxLimits {
            max_frames: 2,
            max_bytes: 1_000,
        });
        o.push(frame(1));
        for n in 0..MAX_REPLIES {
            assert!(o.try_reply(Reply::Frame(frame(n + 10))));
        }
        assert!(!o.try_reply(Reply::End), "full");
        // A push overflow drops pushes, not replies.
        o.push(frame(2));
        o.push(frame(3));
        let waiting = {
            let o = o.clone();
            tokio::spawn(async move { o.reply(Reply::End).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits for room");
        assert_eq!(o.try_next(), Ok(Next::Reply(Reply::Frame(frame(10)))));
        assert!(waiting.await.unwrap(), "room made, queued");
        for n in 1..MAX_REPLIES {
            assert_eq!(o.try_next(), Ok(Next::Reply(Reply::Frame(frame(n + 10)))));
        }
        assert_eq!(o.try_next(), Ok(Next::Reply(Reply::End)));
        assert_eq!(
            o.try_next(),
            Ok(Next::Push(Outgoing::OutOfSync { dropped: 3 }))
        );
        assert_eq!(o.try_next(), Err(Empty::Now));
        o.close();
        assert!(!o.reply(Reply::End).await, "closed: the writer is gone");
        assert_eq!(o.next().await, None);
    }

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[tokio::test]
    async fn an_emptied_reply_lane_holds_no_memory() {
        let o = Outbox::new(OutboxLimits::default());
        assert!(o.reply(Reply::Frame(frame(1))).await);
        assert!(o.reply(Reply::Frame(frame(2))).await);
        assert_eq!(o.try_next(), Ok(Next::Reply(Reply::Frame(frame(1)))));
        assert!(o.state().replies.capacity() > 0, "one answer still queued");
        assert_eq!(o.try_next(), Ok(Next::Reply(Reply::Frame(frame(2)))));
        assert_eq!(o.state().replies.capacity(), 0);
        // And it still takes answers after.
        assert!(o.try_reply(Reply::End));
        assert_eq!(o.try_next(), Ok(Next::Reply(Reply::End)));
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
        let sub = o.epoch();
        assert_eq!(o.push_in(sub, frame(1)), Pushed::Queued);
        assert_eq!(o.push_in(sub, frame(1)), Pushed::Queued);
        assert_eq!(o.push_in(sub, frame(1)), Pushed::Dropped);
        // The subscription ended with the drop.
        assert_eq!(o.push_in(sub, frame(1)), Pushed::Stale);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.peak_bytes(), 2);
        // A subscription made after the drop flows, after the report.
        let resumed = o.epoch();
        assert_ne!(resumed, sub);
        assert_eq!(o.push_in(resumed, Bytes::from_static(b"x")), Pushed::Queued);
        assert_eq!(o.recv().await, Some(Outgoing::OutOfSync { dropped: 3 }));
        assert_eq!(
            o.recv().await,
            Some(Outgoing::Frame(Bytes::from_static(b"x")))
        );
    }

    #[tokio::test]
    async fn push_when_room_waits_for_the_writer_instead_of_dropping() {
        let o = Outbox::new(OutboxLimits {
            max_frames: 1,
            max_bytes: 1 << 20,
        });
        let epoch = o.epoch();
        assert_eq!(o.push_when_room(epoch, frame(1)).await, Pushed::Queued);
        let second = {
            let o = o.clone();
            tokio::spawn(async move { o.push_when_room(epoch, frame(2)).await })
        };
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "must wait while the queue is full");
        assert_eq!(o.recv().await, Some(Outgoing::Frame(frame(1))));
        assert_eq!(second.await.unwrap(), Pushed::Queued);
        assert_eq!(o.recv().await, Some(Outgoing::Frame(frame(2))));
    }

    #[tokio::test]
    async fn push_when_room_gives_up_when_the_subscription_ends() {
        let o = Outbox::new(OutboxLimits {
            max_frames: 1,
            max_bytes: 1 << 20,
        });
        let epoch = o.epoch();
        o.push_in(epoch, frame(1));
        let waiting = {
            let o = o.clone();
            tokio::spawn(async move { o.push_when_room(epoch, frame(2)).await })
        };
        tokio::task::yield_now().await;
        o.close();
        assert_eq!(waiting.await.unwrap(), Pushed::Closed);
    }

    #[test]
    fn peak_gauge_records_the_high_water_mark() {
        let gauge = Arc::new(AtomicU64::new(0));
        let o = Outbox::with_peak_gauge(OutboxLimits::default(), gauge.clone());
        o.push(frame(10));
        o.push(frame(5));
        assert_eq!(o.try_recv(), Ok(Outgoing::Frame(frame(10))));
        o.push(frame(1));
        assert_eq!(gauge.load(Ordering::Relaxed), 15);
        assert_eq!(o.peak_bytes(), 15);
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
    async fn a_waiting_writer_wakes_for_a_push_a_reply_a_drop_and_the_close() {
        let o = Outbox::new(OutboxLimits {
            max_frames: 1,
            max_bytes: 1 << 20,
        });
        let (tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
        let writer = {
            let o = o.clone();
            tokio::spawn(async move {
                while let Some(item) = o.next().await {
                    tx.send(item).unwrap();
                }
            })
        };
        // Each item must reach a writer that was waiting with nothing
        // queued: without its own wake-up it would wait for ever (bounded
        // here, so that a missing one fails instead of hanging).
        let mut next_taken = async || {
            tokio::time::timeout(std::time::Duration::from_secs(10), taken.recv())
                .await
                .expect("the waiting writer was woken")
                .unwrap()
        };
        assert_eq!(o.push(frame(1)), Pushed::Queued);
        assert_eq!(next_taken().await, Next::Push(Outgoing::Frame(frame(1))));
        assert!(o.try_reply(Reply::Frame(frame(2))));
        assert_eq!(next_taken().await, Next::Reply(Reply::Frame(frame(2))));
        assert!(o.reply(Reply::Frame(frame(3))).await);
        assert_eq!(next_taken().await, Next::Reply(Reply::Frame(frame(3))));
        let epoch = o.epoch();
        o.fall_behind(epoch);
        assert_eq!(
            next_taken().await,
            Next::Push(Outgoing::OutOfSync { dropped: 1 })
        );
        let epoch = o.epoch();
        assert_eq!(o.push_when_room(epoch, frame(4)).await, Pushed::Queued);
        assert_eq!(next_taken().await, Next::Push(Outgoing::Frame(frame(4))));
        o.close();
        tokio::time::timeout(std::time::Duration::from_secs(10), writer)
            .await
            .expect("the close woke the writer, which ended")
            .unwrap();
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
