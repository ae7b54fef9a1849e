//! The Rust client for Qun.
//!
//! [`Client`] speaks Qun's protocol over WebSocket (`ws://host:port/ws`) or
//! QUIC (`quic://host:port`, with [`ClientOptions::cert_sha256`]): it
//! connects, authenticates
//! with a token, sends requests and matches answers to them by request id,
//! and hands pushed messages to the caller as [`Event`]s, per group in seq
//! order. Tests, the load tester and `qun-cli` all use it.
//!
//! # Nothing lost, nothing doubled
//! - Every [`Client::send`] carries a fresh client message id, marked as a
//!   first attempt; retrying with the same id ([`Client::send_with_id`])
//!   after a timeout or a reconnect returns the original seq and posts
//!   nothing.
//! - [`Client::next_event`] passes every group's messages through a
//!   [`Sequencer`]: duplicates are dropped, and a jump in seqs is filled by
//!   fetching the missing range before going on.
//! - After `OutOfSync`, [`Client::next_event`] resumes every followed group
//!   by itself. After a reconnect, call [`Client::resume`] on the new client
//!   with [`Client::cursors`] of the old one.
//! - A gap larger than the server's cap is reported as [`Event::Gap`]; page
//!   it with [`Client::fetch_range`].
//!
//! # Who reads the socket
//! By default a task of the client's own reads the socket all the time and
//! hands each push over to the caller's task ([`Reading::Background`]). A
//! program that spends its life in [`Client::next_event`], such as a bot
//! or the load generator's members, can have the socket read in its own
//! task instead ([`Reading::OnDemand`]): one task and one wake-up per push
//! instead of two.
//!
//! # When to try again
//! [`ClientError::is_connection_error`] says whether a new connection may
//! succeed where this one failed. A server at its connection limit turns a
//! connection away before `Hello` with [`ClientError::ServerFull`]; wait
//! [`ClientError::retry_after`] (with some jitter, so that a crowd turned
//! away together does not come back together) or go to another server.
//!
//! # Example
//! ```no_run
//! # async fn f(token: &str) -> Result<(), qun_client::ClientError> {
//! let mut client = qun_client::Client::connect("ws://127.0.0.1:7700/ws", token).await?;
//! let joined = client.join(1).await?;
//! println!("{} recent messages", joined.recent.len());
//! let ack = client.send(1, "Is S size EU 34 or 36?", None).await?;
//! println!("posted as #{}", ack.seq);
//! while let Some(event) = client.next_event().await {
//!     if let qun_client::Event::Message(m) = event {
//!         println!("#{} {}: {}", m.seq, m.sender_name, m.text);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use qun_proto::v1::{self, client_frame, server_frame::Body};
use qun_proto::{ClientFrame, ErrorCode, ServerFrame, encode_client_frame};
use tokio::sync::{mpsc, oneshot};

pub use qun_proto::v1 as proto;

mod board;
mod commerce;
mod cs;
mod moderation;
mod push;
mod reach;
mod sequencer;
mod transport;
mod websocket;

pub use push::Push;
pub use sequencer::{Sequencer, Step};
use transport::{Frames, Incoming, Outbound};

/// The largest server frame the client accepts (a full history page of
/// 4 KiB messages fits easily).
const MAX_SERVER_FRAME: usize = 16 * 1024 * 1024;

/// Messages fetched per page when filling a gap.
const GAP_PAGE: u32 = 200;

/// How a [`Client`] behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Pushes buffered before the client stops reading the socket (and the
    /// server, in turn, sees a slow reader).
    pub event_buffer: usize,
    /// How long a request waits for its answer.
    pub timeout: Duration,
    /// Send a `Ping` this often, keeping the connection alive and the clock
    /// offset fresh; `None` to never ping on its own.
    pub heartbeat: Option<Duration>,
    /// Free text the server logs, e.g. "qun-ios/3.2.1".
    pub client_name: String,
    /// What to do with pushes when `event_buffer` is full because the
    /// caller is not calling [`Client::next_event`].
    pub full_buffer: FullBuffer,
    /// For `quic://` URLs: the SHA-256 of the server's certificate, in hex
    /// (as `qun serve` prints it). The connection is refused unless the
    /// server shows exactly that certificate.
    pub cert_sha256: Option<String>,
    /// For `quic://` URLs: accept any server certificate. For development
    /// against a self-signed certificate only: anyone on the path could
    /// pose as the server.
    pub insecure_dev_cert: bool,
    /// The local address to connect from (e.g. `127.0.0.2`), so that a
    /// load generator can spread connections over several source
    /// addresses and not run out of ephemeral ports. `None`: any.
    pub local_ip: Option<std::net::IpAddr>,
    /// Who reads the socket: a task of the client's own (the default) or
    /// the caller's task, on demand.
    pub reading: Reading,
    /// Over `ws://` on Linux: ask the kernel to delay its TCP
    /// acknowledgements of what the server sends (`TCP_QUICKACK` off, set
    /// again after every read, since the kernel leaves that mode whenever
    /// its delayed-ACK timer fires). A client that only reads, such as a
    /// buyer watching a group, otherwise acknowledges each small push as
    /// soon as it reads it; with this it acknowledges every second one, or
    /// within the kernel's delayed-ACK time (40 ms or more): half the ACK
    /// packets, for one `setsockopt` per read. Nothing the server sends
    /// waits for these ACKs (it writes with Nagle's algorithm off), and a
    /// client that sends soon after it reads is in this mode already. No
    /// effect over QUIC, nor on other systems. Off by default.
    pub delayed_acks: bool,
}

/// Who reads a [`Client`]'s socket.
///
/// ```no_run
/// # async fn run() -> Result<(), qun_client::ClientError> {
/// use qun_client::{Client, ClientOptions, Event, Reading};
///
/// // A bot that follows many groups: every push is read and decoded in the
/// // task that calls `next_event`, with no hand-over between tasks.
/// let options = ClientOptions { reading: Reading::OnDemand, ..ClientOptions::default() };
/// let mut client = Client::connect_with("ws://127.0.0.1:7700/ws", "TOKEN", options).await?;
/// while let Some(event) = client.next_event().await {
///     if let Event::Message(m) = event {
///         println!("{}: {}", m.sender_name, m.text);
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reading {
    /// A task of the client's own reads the socket all the time: answers
    /// reach requests whatever the caller is doing, and pushes wait in a
    /// buffer of [`ClientOptions::event_buffer`] for [`Client::next_event`]
    /// ([`ClientOptions::full_buffer`] says what happens when it is full).
    /// Each push is handed from that task to the caller's.
    #[default]
    Background,
    /// No task: the socket is read in the caller's task, and only while
    /// [`Client::next_event`] or a request is waiting. A push is read,
    /// decoded and returned by the same `next_event` call, which costs the
    /// least CPU per push (the load generator reads this way). A request
    /// reads until its own answer comes, keeping the pushes it reads on
    /// the way, in order, for `next_event`: up to `event_buffer` of them,
    /// then it counts the rest in an `OutOfSync`, after which `next_event`
    /// resumes (as [`FullBuffer::DropAndResume`]). A caller that stops
    /// calling `next_event` and makes no request stops reading: the socket
    /// backs up and the server treats the connection as a slow phone (it
    /// drops pushes beyond its queue and says `OutOfSync`). `full_buffer`
    /// does not apply.
    OnDemand,
}

/// What a [`Client`] does when its event buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullBuffer {
    /// Keep reading the socket, drop pushes and report `OutOfSync` (after
    /// which [`Client::next_event`] resumes): answers to requests always get
    /// through, even to a caller that never reads events (the default).
    DropAndResume,
    /// Stop reading the socket until the caller reads events, like a phone
    /// whose app is frozen. Requests wait behind unread pushes. For tests
    /// of slow readers.
    Backpressure,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            event_buffer: 4096,
            timeout: Duration::from_secs(30),
            heartbeat: Some(Duration::from_secs(30)),
            client_name: format!("qun-client/{}", env!("CARGO_PKG_VERSION")),
            full_buffer: FullBuffer::DropAndResume,
            cert_sha256: None,
            insecure_dev_cert: false,
            local_ip: None,
            reading: Reading::Background,
            delayed_acks: false,
        }
    }
}

/// A fresh client message id: 128 random bits, hex.
///
/// # Panics
/// Never in practice: only if the operating system has no randomness.
pub fn new_client_msg_id() -> String {
    let mut bytes = [0u8; 16];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What went wrong on the client side, or what the server refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection could not be made (refused, bad URL, handshake).
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why.
        detail: String,
    },
    /// The server is at its connection limit and turned this connection
    /// away before anything was sent: WebSocket answers the upgrade with
    /// HTTP 503, QUIC refuses the handshake (`CONNECTION_REFUSED`).
    /// Connect again after [`ClientError::retry_after`], to this server or
    /// another; a load test should start the server with a larger
    /// `max_connections`.
    #[error("cannot connect to {url}: the server is full ({detail})")]
    ServerFull {
        /// The URL tried.
        url: String,
        /// How long the server asked the client to wait (WebSocket's
        /// `Retry-After`); `None` when it did not say (QUIC).
        retry_after: Option<Duration>,
        /// What the server said, if anything.
        detail: String,
    },
    /// The server answered with an error frame.
    #[error("server error {code} ({name}): {message}", name = code_name(*.code))]
    Server {
        /// The numeric [`ErrorCode`].
        code: i32,
        /// The server's message.
        message: String,
    },
    /// The server refused a message under a rate limit (`RATE_LIMITED` or
    /// `SLOW_MODE`); nothing was posted. Retry after the wait.
    #[error("server error {code} ({name}): {message}; retry in {retry_after_ms} ms", name = code_name(*.code))]
    RateLimited {
        /// The numeric [`ErrorCode`].
        code: i32,
        /// The server's message.
        message: String,
        /// How long to wait.
        retry_after_ms: u64,
    },
    /// The connection closed before the answer came.
    #[error("connection closed")]
    Closed,
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local socket operation failed (e.g. [`Client::rebind`]).
    #[error("local socket: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// Whether retrying the same request on a new connection may succeed:
    /// the connection failed, closed, timed out or found the server full
    /// (not a refusal of the request). Wait [`ClientError::retry_after`]
    /// first when it says.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::ServerFull { .. }
                | ClientError::Closed
                | ClientError::Timeout(_)
        )
    }

    /// How long the server asked the client to wait before trying again:
    /// a rate limit's wait, or a full server's `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::RateLimited { retry_after_ms, .. } => {
                Some(Duration::from_millis(*retry_after_ms))
            }
            ClientError::ServerFull { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::RateLimited { code, .. } => {
                ErrorCode::try_from(*code).ok()
            }
            _ => None,
        }
    }
}

/// The name of a numeric error code, e.g. `UNKNOWN_GROUP`.
pub fn code_name(code: i32) -> String {
    ErrorCode::try_from(code).map_or_else(
        |_| format!("CODE_{code}"),
        |c| {
            c.as_str_name()
                .trim_start_matches("ERROR_CODE_")
                .to_string()
        },
    )
}

/// Something the server pushed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
// Messages are nearly every event: boxing them would cost an allocation
// each to save a few hundred bytes on the rare other kinds.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A message of a group this connection joined.
    Message(v1::ChatMessage),
    /// The server dropped pushes because this client fell behind.
    OutOfSync {
        /// How many.
        dropped: u64,
    },
    /// The server is shutting down.
    GoingAway {
        /// Why.
        reason: String,
        /// Reconnect after this many milliseconds.
        reconnect_after_ms: u32,
    },
    /// Another device of this user moved its read mark.
    ReadState(v1::ReadState),
    /// Staff removed this user from a group: its messages stop here.
    Removed {
        /// The group.
        group_id: u64,
    },
    /// A customer-service session changed: assigned, queued (or moved up
    /// the queue), transferred or closed. See [`Client::cs_open`].
    CsSession(v1::CsSession),
    /// Staff decided this user's request to join a group that admits on
    /// approval; when approved, [`Client::join`] now subscribes.
    JoinDecided {
        /// The group.
        group_id: u64,
        /// Approved (a member now) or rejected.
        approved: bool,
    },
    /// The server could not catch this group up by push (the gap was over
    /// its cap): messages `after_seq + 1 ..= through_seq` were skipped and
    /// live messages go on after `through_seq`. Page the gap with
    /// [`Client::fetch_range`] if it is wanted.
    Gap {
        /// The group.
        group_id: u64,
        /// The newest seq the client had.
        after_seq: u64,
        /// The newest seq skipped.
        through_seq: u64,
    },
    /// An error frame not tied to a request (e.g. a malformed frame).
    Error {
        /// The numeric code.
        code: i32,
        /// The message.
        message: String,
    },
    /// The connection ended (WebSocket close, or QUIC connection close with
    /// the same codes).
    Closed {
        /// The close code (1001 on shutdown), if one was sent.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// The sending side of a connection, shared with the heartbeat task.
#[derive(Debug)]
struct Link {
    out: mpsc::Sender<Outbound>,
    waiters: Waiters,
    /// The socket's incoming side when it is read on demand
    /// ([`Reading::OnDemand`]); `None` when the reader task has it.
    inbox: Option<Arc<Inbox>>,
    next_id: AtomicU64,
    /// Server clock minus local clock, in ms, from the last pong.
    clock_offset: AtomicI64,
    has_offset: AtomicBool,
}

impl Link {
    /// Sends a request; the receiver gets its answer.
    async fn send(
        &self,
        body: client_frame::Body,
    ) -> Result<(u64, oneshot::Receiver<ServerFrame>), ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(request_id, tx);
        let frame = ClientFrame {
            request_id,
            body: Some(body),
        };
        if self
            .out
            .send(Outbound::Frame(encode_client_frame(&frame)))
            .await
            .is_err()
        {
            lock(&self.waiters).remove(&request_id);
            return Err(ClientError::Closed);
        }
        Ok((request_id, rx))
    }

    fn forget(&self, request_id: u64) {
        lock(&self.waiters).remove(&request_id);
    }

    /// Waits up to `timeout` for the answer to request `request_id`; when
    /// the socket is read on demand, reads it meanwhile.
    async fn answer(
        &self,
        request_id: u64,
        rx: oneshot::Receiver<ServerFrame>,
        timeout: Duration,
    ) -> Result<ServerFrame, ClientError> {
        let wait = async {
            let Some(inbox) = &self.inbox else {
                return rx.await.map_err(|_| ClientError::Closed);
            };
            tokio::pin!(rx);
            loop {
                tokio::select! {
                    biased;
                    answer = &mut rx => return answer.map_err(|_| ClientError::Closed),
                    () = inbox.read_and_keep(&self.waiters) => {
                        if inbox.ended() {
                            return Err(ClientError::Closed);
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(answer) => answer,
            Err(_) => {
                self.forget(request_id);
                Err(ClientError::Timeout(timeout))
            }
        }
    }

    async fn ping(&self, timeout: Duration) -> Result<u64, ClientError> {
        let sent = now_ms();
        let (id, rx) = self
            .send(client_frame::Body::Ping(v1::Ping {
                client_time_ms: u64::try_from(sent).unwrap_or(0),
            }))
            .await?;
        let frame = self.answer(id, rx, timeout).await?;
        match answer_body(frame)? {
            Body::Pong(p) => {
                let received = now_ms();
                let server = i64::try_from(p.server_time_ms).unwrap_or(i64::MAX);
                self.clock_offset
                    .store(server - (sent + received) / 2, Ordering::Relaxed);
                self.has_offset.store(true, Ordering::Relaxed);
                Ok(p.server_time_ms)
            }
            other => Err(unexpected(&other)),
        }
    }
}

/// The reader task of [`Reading::Background`]: reads the socket until it
/// ends, hands answers to their requests and pushes to `events`.
async fn read_in_background(
    mut stream: Frames,
    waiters: Waiters,
    events: mpsc::Sender<Event>,
    full_buffer: FullBuffer,
) {
    let mut dropped = 0u64;
    let closed = loop {
        let next = if dropped > 0 {
            // Report the drop as soon as the caller makes room.
            tokio::select! {
                permit = events.reserve() => {
                    let Ok(permit) = permit else { break None };
                    permit.send(Event::OutOfSync { dropped });
                    dropped = 0;
                    continue;
                }
                next = stream.next() => next,
            }
        } else {
            stream.next().await
        };
        let frame = match next {
            Some(Incoming::Frame(frame)) => frame,
            Some(Incoming::Closed(how)) => break how,
            None => break None,
        };
        let Some(event) = route(frame, &waiters) else {
            continue;
        };
        match full_buffer {
            // The socket backs up like a stalled phone's; answers wait
            // behind the pushes.
            FullBuffer::Backpressure => {
                if events.send(event).await.is_err() {
                    break None;
                }
            }
            // Keep reading so answers always get through; drop pushes the
            // caller has no room for and say so, as the server does, so
            // that `next_event` resumes.
            FullBuffer::DropAndResume => {
                if dropped > 0 {
                    dropped += 1;
                    continue;
                }
                match events.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => dropped = 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => break None,
                }
            }
        }
    };
    lock(&waiters).clear();
    let _ = events.send(closed_event(closed)).await;
}

/// The incoming side of a connection read on demand ([`Reading::OnDemand`]):
/// whoever waits (`next_event`, or a request for its answer) reads it, one
/// at a time, holding `incoming`.
struct Inbox {
    /// An async lock whose uncontended lock and unlock are one atomic
    /// operation each: `next_event` takes it for every push. (tokio's
    /// `Mutex`, a semaphore, also locked its list of waiters at every
    /// unlock.)
    incoming: futures_util::lock::Mutex<Frames>,
    /// Pushes a request read while it waited for its answer, in order, for
    /// `next_event`. Only a holder of `incoming` adds to it, so whoever
    /// holds `incoming` next finds them before anything still unread.
    /// Bounded by `limit`, as [`FullBuffer::DropAndResume`]: beyond it,
    /// pushes are counted in an `OutOfSync` at the back instead.
    kept: Mutex<VecDeque<Event>>,
    limit: usize,
    /// The connection's end has been read (and `Event::Closed` made).
    ended: AtomicBool,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("ended", &self.ended())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    fn new(incoming: Frames, limit: usize) -> Self {
        Self {
            incoming: futures_util::lock::Mutex::new(incoming),
            kept: Mutex::new(VecDeque::new()),
            limit: limit.max(1),
            ended: AtomicBool::new(false),
        }
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Reads one item off the socket: an answer goes to its waiter, a push
    /// is kept for `next_event` before `incoming` is let go, so that pushes
    /// read by requests waiting at once stay in the order they came.
    /// Cancel-safe: an item is either taken whole or left in the stream.
    async fn read_and_keep(&self, waiters: &Waiters) {
        let mut incoming = self.hold().await;
        if let Some(event) = self.read_held(&mut incoming, waiters).await {
            self.keep(event);
        }
    }

    /// Takes `incoming`: at once when no one else holds it (the common
    /// case, one reader), which skips the async lock's wait queue.
    async fn hold(&self) -> futures_util::lock::MutexGuard<'_, Frames> {
        match self.incoming.try_lock() {
            Some(held) => held,
            None => self.incoming.lock().await,
        }
    }

    /// Reads one item with `incoming` held: an answer goes to its waiter
    /// (`None`); a push, or the connection's end (once), is returned.
    async fn read_held(&self, incoming: &mut Frames, waiters: &Waiters) -> Option<Event> {
        if self.ended() {
            return None;
        }
        match incoming.next().await {
            Some(Incoming::Frame(frame)) => route(frame, waiters),
            end => {
                // No answer is coming any more: waiting requests get
                // `Closed`.
                lock(waiters).clear();
                self.ended.store(true, Ordering::Release);
                Some(closed_event(match end {
                    Some(Incoming::Closed(how)) => how,
                    _ => None,
                }))
            }
        }
    }

    /// Keeps a push read by a request for `next_event`; beyond `limit`,
    /// only counts it, in an `OutOfSync` after which `next_event` resumes
    /// (the connection's end is always kept).
    fn keep(&self, event: Event) {
        let mut kept = lock(&self.kept);
        if kept.len() < self.limit || matches!(event, Event::Closed { .. }) {
            kept.push_back(event);
        } else if let Some(Event::OutOfSync { dropped }) = kept.back_mut() {
            *dropped += 1;
        } else {
            kept.push_back(Event::OutOfSync { dropped: 1 });
        }
    }

    /// The next push: a kept one first, else one read now. `None` once the
    /// connection's end has been returned. A request of another task
    /// waiting meanwhile gets its answer from this read.
    async fn next(&self, waiters: &Waiters) -> Option<Event> {
        let mut incoming = self.hold().await;
        loop {
            if let Some(event) = lock(&self.kept).pop_front() {
                return Some(event);
            }
            if self.ended() {
                return None;
            }
            if let Some(event) = self.read_held(&mut incoming, waiters).await {
                return Some(event);
            }
        }
    }
}

/// One frame from the server: an answer is handed to the request waiting
/// for it (`None`); a push becomes its event; anything else is `None`.
fn route(frame: Box<ServerFrame>, waiters: &Waiters) -> Option<Event> {
    if frame.request_id != 0 {
        let waiter = lock(waiters).remove(&frame.request_id);
        if let Some(w) = waiter {
            let _ = w.send(*frame);
            return None;
        }
    }
    Some(match frame.body? {
        Body::Message(m) => Event::Message(m),
        Body::OutOfSync(o) => Event::OutOfSync { dropped: o.dropped },
        Body::ReadState(r) => Event::ReadState(r),
        Body::Left(l) => Event::Removed {
            group_id: l.group_id,
        },
        Body::JoinDecided(d) => Event::JoinDecided {
            group_id: d.group_id,
            approved: d.approved,
        },
        Body::CsSession(s) => Event::CsSession(s),
        Body::GoingAway(g) => Event::GoingAway {
            reason: g.reason,
            reconnect_after_ms: g.reconnect_after_ms,
        },
        Body::Error(e) => Event::Error {
            code: e.code,
            message: e.message,
        },
        _ => return None,
    })
}

/// The last event of a connection, from how the server closed it.
fn closed_event(how: Option<(u16, String)>) -> Event {
    let (code, reason) = how.map_or((None, String::new()), |(c, r)| (Some(c), r));
    Event::Closed { code, reason }
}

fn answer_body(frame: ServerFrame) -> Result<Body, ClientError> {
    match frame.body {
        Some(Body::Error(e)) if e.retry_after_ms > 0 => Err(ClientError::RateLimited {
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }),
        Some(Body::Error(e)) => Err(ClientError::Server {
            code: e.code,
            message: e.message,
        }),
        Some(body) => Ok(body),
        None => Err(ClientError::Protocol("answer without a body".into())),
    }
}

/// A connected, authenticated client.
#[derive(Debug)]
pub struct Client {
    link: Arc<Link>,
    /// Pushes from the reader task ([`Reading::Background`]); `None` when
    /// the socket is read on demand (`link.inbox`).
    events: Option<mpsc::Receiver<Event>>,
    /// Pushes read off the channel while waiting for an answer, not yet
    /// through the sequencer.
    held: VecDeque<Event>,
    /// Events ready for the caller, in order.
    ready: VecDeque<Event>,
    sequencer: Mutex<Sequencer>,
    welcome: v1::Welcome,
    timeout: Duration,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    /// The QUIC endpoint, for [`Client::rebind`].
    quic: Option<quinn::Endpoint>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Client {
    /// Connects to `url` (e.g. `ws://127.0.0.1:7700/ws`) and authenticates
    /// with `token`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the socket or handshake fails,
    /// [`ClientError::ServerFull`] when the server is at its connection
    /// limit, [`ClientError::Server`] when the token is refused.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, token, ClientOptions::default()).await
    }

    /// Connects with the given options.
    ///
    /// # Errors
    /// As for [`Client::connect`].
    pub async fn connect_with(
        url: &str,
        token: &str,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let mut client = Self::open(url, &options).await?;
        let body = client
            .request(client_frame::Body::Hello(v1::Hello {
                protocol_version: qun_proto::PROTOCOL_VERSION,
                token: token.to_string(),
                client_name: options.client_name.clone(),
            }))
            .await?;
        match body {
            Body::Welcome(w) => {
                client.welcome = w;
                if let Some(every) = options.heartbeat {
                    let link = client.link.clone();
                    let timeout = client.timeout;
                    client.heartbeat = Some(tokio::spawn(async move {
                        let mut tick = tokio::time::interval(every);
                        tick.tick().await;
                        loop {
                            tick.tick().await;
                            if matches!(link.ping(timeout).await, Err(ClientError::Closed)) {
                                return;
                            }
                        }
                    }));
                }
                Ok(client)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Connects without sending `Hello`: for tests of what the server does
    /// with unauthenticated connections.
    ///
    /// # Errors
    /// [`ClientError::Connect`] or [`ClientError::ServerFull`].
    pub async fn connect_unauthenticated(url: &str) -> Result<Self, ClientError> {
        Self::open(url, &ClientOptions::default()).await
    }

    async fn open(url: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        let transport::Opened {
            out: out_tx,
            incoming: stream,
            quic,
        } = transport::open(url, options).await?;
        let waiters: Waiters = Arc::default();
        let (events, inbox) = match options.reading {
            Reading::Background => {
                let (ev_tx, ev_rx) = mpsc::channel(options.event_buffer.max(1));
                tokio::spawn(read_in_background(
                    stream,
                    waiters.clone(),
                    ev_tx,
                    options.full_buffer,
                ));
                (Some(ev_rx), None)
            }
            Reading::OnDemand => (
                None,
                Some(Arc::new(Inbox::new(stream, options.event_buffer))),
            ),
        };
        Ok(Self {
            link: Arc::new(Link {
                out: out_tx,
                waiters,
                inbox,
                next_id: AtomicU64::new(1),
                clock_offset: AtomicI64::new(0),
                has_offset: AtomicBool::new(false),
            }),
            events,
            held: VecDeque::new(),
            ready: VecDeque::new(),
            sequencer: Mutex::default(),
            welcome: v1::Welcome::default(),
            timeout: options.timeout,
            heartbeat: None,
            quic,
        })
    }

    /// What the server said on `Hello`: who this connection is, server time.
    pub fn welcome(&self) -> &v1::Welcome {
        &self.welcome
    }

    /// Sets how long a request waits for its answer (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends any request and waits for its answer.
    ///
    /// # Errors
    /// [`ClientError::Server`] for an error frame, [`ClientError::Closed`],
    /// [`ClientError::Timeout`].
    pub async fn request(&self, body: client_frame::Body) -> Result<Body, ClientError> {
        let (request_id, rx) = self.link.send(body).await?;
        answer_body(self.link.answer(request_id, rx, self.timeout).await?)
    }

    /// Like [`Client::request`], but keeps reading pushes while it waits
    /// (holding them for [`Client::next_event`]), so that a full event
    /// buffer can never stand between the client and its answer. (Read on
    /// demand, every request does this.)
    async fn request_reading(&mut self, body: client_frame::Body) -> Result<Body, ClientError> {
        let Some(events) = self.events.as_mut() else {
            return self.request(body).await;
        };
        let (request_id, rx) = self.link.send(body).await?;
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        tokio::pin!(rx);
        let mut events_open = true;
        loop {
            tokio::select! {
                answer = &mut rx => {
                    return match answer {
                        Ok(frame) => answer_body(frame),
                        Err(_) => Err(ClientError::Closed),
                    };
                }
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => self.held.push_back(ev),
                    None => events_open = false,
                },
                () = &mut deadline => {
                    self.link.forget(request_id);
                    return Err(ClientError::Timeout(self.timeout));
                }
            }
        }
    }

    /// Moves a QUIC connection to a new local UDP socket (a new port), as
    /// a phone's address changes when it leaves Wi-Fi for cellular. The
    /// connection carries on: no new handshake, no new `Hello`, the same
    /// subscriptions. Returns the new local address.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] on a WebSocket connection,
    /// [`ClientError::Io`] when no socket can be bound.
    pub fn rebind(&self) -> Result<std::net::SocketAddr, ClientError> {
        let endpoint = self
            .quic
            .as_ref()
            .ok_or_else(|| ClientError::Protocol("rebind needs a quic:// connection".into()))?;
        let old = endpoint.local_addr()?;
        let socket = std::net::UdpSocket::bind((old.ip(), 0))?;
        let new = socket.local_addr()?;
        endpoint.rebind(socket)?;
        Ok(new)
    }

    /// Sends raw bytes as one frame: a binary WebSocket message, or one
    /// length-prefixed QUIC frame (for protocol tests).
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn send_raw(&self, bytes: Bytes) -> Result<(), ClientError> {
        self.link
            .out
            .send(Outbound::Frame(bytes))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends a text WebSocket message (which the server refuses; for
    /// tests). Over QUIC there is no such thing and nothing is sent.
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn send_text_frame(&self, text: &str) -> Result<(), ClientError> {
        self.link
            .out
            .send(Outbound::Text(text.to_string()))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next push; `None` after [`Event::Closed`] has been returned.
    ///
    /// Messages come per group in seq order, each once: duplicates are
    /// dropped and a jump is filled by fetching the missing range first.
    /// On `OutOfSync` every followed group is resumed before the event is
    /// returned, so the messages that follow it continue where the client
    /// was. Read on demand ([`Reading::OnDemand`]), this is what reads the
    /// socket.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Some(ev);
            }
            let ev = match self.held.pop_front() {
                Some(ev) => ev,
                // Without the reader task's channel, the socket is read here.
                None => match &mut self.events {
                    Some(events) => events.recv().await?,
                    None => self.link.inbox.as_ref()?.next(&self.link.waiters).await?,
                },
            };
            // A message is looked at where it is and returned whole: taken
            // apart and rebuilt, its 248 bytes were copied twice more, into
            // this future's state, at every push.
            if let Event::Message(m) = &ev {
                let (group_id, seq) = (m.group_id, m.seq);
                let step = lock(&self.sequencer).observe(group_id, seq);
                match step {
                    Step::Deliver => return Some(ev),
                    Step::Duplicate => {}
                    Step::Gap { after, before } => {
                        // Kept boxed while the gap is fetched, so that this
                        // future holds a pointer across the wait, not an
                        // event.
                        let ev = Box::new(ev);
                        self.fill_gap(group_id, after, before).await;
                        lock(&self.sequencer).track(group_id, seq);
                        self.ready.push_back(*ev);
                    }
                }
                continue;
            }
            match ev {
                Event::OutOfSync { dropped } => {
                    let cursors = self.cursors();
                    if !cursors.is_empty()
                        && let Err(e) = self.resume(&cursors).await
                    {
                        self.ready.push_back(Event::Error {
                            code: e.code().map_or(0, |c| c as i32),
                            message: format!("resume after out-of-sync failed: {e}"),
                        });
                    }
                    self.ready.push_front(Event::OutOfSync { dropped });
                }
                other => return Some(other),
            }
        }
    }

    /// Fetches `after + 1 ..= before - 1` of a group into the ready queue;
    /// what cannot be fetched is reported as [`Event::Gap`].
    async fn fill_gap(&mut self, group_id: u64, after: u64, before: u64) {
        let mut cursor = after;
        while cursor + 1 < before {
            let page = self
                .request_reading(client_frame::Body::FetchRange(v1::FetchRange {
                    group_id,
                    after_seq: cursor,
                    limit: GAP_PAGE,
                }))
                .await;
            let messages = match page {
                Ok(Body::HistoryPage(p)) => p.messages,
                _ => Vec::new(),
            };
            let before_len = self.ready.len();
            for m in messages {
                if m.seq <= cursor {
                    continue;
                }
                if m.seq != cursor + 1 || m.seq >= before {
                    break;
                }
                cursor = m.seq;
                self.ready.push_back(Event::Message(m));
            }
            if self.ready.len() == before_len {
                break;
            }
        }
        if cursor + 1 < before {
            self.ready.push_back(Event::Gap {
                group_id,
                after_seq: cursor,
                through_seq: before - 1,
            });
        }
        lock(&self.sequencer).track(group_id, before - 1);
    }

    /// Where this client stands in every group it follows: `(group, seq)`.
    /// Save it, and after reconnecting hand it to [`Client::resume`].
    pub fn cursors(&self) -> Vec<(u64, u64)> {
        lock(&self.sequencer).cursors()
    }

    /// Duplicates dropped and gaps filled by this client's sequencer so far.
    /// With a correct server both stay 0.
    pub fn sequencer_stats(&self) -> (u64, u64) {
        let s = lock(&self.sequencer);
        (s.duplicates_dropped(), s.gaps_seen())
    }

    /// Catches up on groups from `(group, last_seq)` cursors and follows
    /// them live: the missing messages then live ones arrive as events, in
    /// order. Returns the server's answer per group; a group the server
    /// refused (e.g. `NOT_MEMBER`) is no longer followed, and one whose gap
    /// was over the cap is reported with an [`Event::Gap`].
    ///
    /// # Errors
    /// [`ClientError`] when the request as a whole fails; codes include
    /// `INVALID_ARGUMENT` (over 500 cursors, a group twice).
    pub async fn resume(
        &mut self,
        cursors: &[(u64, u64)],
    ) -> Result<Vec<v1::GroupResumed>, ClientError> {
        {
            let mut seq = lock(&self.sequencer);
            for &(group_id, last_seq) in cursors {
                seq.reset(group_id, last_seq);
            }
        }
        let body = client_frame::Body::Resume(v1::Resume {
            cursors: cursors
                .iter()
                .map(|&(group_id, last_seq)| v1::GroupCursor { group_id, last_seq })
                .collect(),
        });
        let groups = match self.request_reading(body).await? {
            Body::Resumed(r) => r.groups,
            other => return Err(unexpected(&other)),
        };
        for (g, &(_, last_seq)) in groups.iter().zip(cursors) {
            if g.error != 0 {
                lock(&self.sequencer).forget(g.group_id);
            } else if g.gap_too_large {
                // Live messages continue after through_seq. Anything held
                // from below it is a duplicate of what the caller will page.
                lock(&self.sequencer).track(g.group_id, g.through_seq);
                self.ready.push_back(Event::Gap {
                    group_id: g.group_id,
                    after_seq: last_seq,
                    through_seq: g.through_seq,
                });
            }
        }
        Ok(groups)
    }

    /// A page of messages above `after_seq`, ascending (forwards paging).
    ///
    /// # Errors
    /// [`ClientError`]; codes include `NOT_MEMBER`, `INVALID_ARGUMENT`.
    pub async fn fetch_range(
        &self,
        group_id: u64,
        after_seq: u64,
        limit: u32,
    ) -> Result<v1::HistoryPage, ClientError> {
        match self
            .request(client_frame::Body::FetchRange(v1::FetchRange {
                group_id,
                after_seq,
                limit,
            }))
            .await?
        {
            Body::HistoryPage(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// Marks a group read up to `seq`; the caller's other devices are told.
    ///
    /// # Errors
    /// [`ClientError`]; codes include `NOT_MEMBER`, `UNKNOWN_GROUP`.
    pub async fn mark_read(&self, group_id: u64, seq: u64) -> Result<v1::ReadMarked, ClientError> {
        match self
            .request(client_frame::Body::MarkRead(v1::MarkRead { group_id, seq }))
            .await?
        {
            Body::ReadMarked(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// The caller's groups with their unread counts.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn my_groups(&self) -> Result<Vec<v1::MyGroup>, ClientError> {
        match self
            .request(client_frame::Body::ListMyGroups(v1::ListMyGroups {}))
            .await?
        {
            Body::MyGroups(g) => Ok(g.groups),
            other => Err(unexpected(&other)),
        }
    }

    /// Server clock minus this machine's clock, in ms, from the last pong
    /// (`None` before the first). Render countdowns with
    /// [`Client::server_now_ms`].
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.link
            .has_offset
            .load(Ordering::Relaxed)
            .then(|| self.link.clock_offset.load(Ordering::Relaxed))
    }

    /// The server's clock now, as well as this client knows it.
    pub fn server_now_ms(&self) -> i64 {
        now_ms() + self.clock_offset_ms().unwrap_or(0)
    }

    /// Creates a group for the caller's shop (agents and owners).
    ///
    /// # Errors
    /// [`ClientError`]; the server's codes include `FORBIDDEN_ROLE`,
    /// `WRONG_SHOP`, `INVALID_ARGUMENT`.
    pub async fn create_group(
        &self,
        name: &str,
        max_members: u32,
    ) -> Result<v1::GroupInfo, ClientError> {
        match self
            .request(client_frame::Body::CreateGroup(v1::CreateGroup {
                name: name.to_string(),
                max_members,
                shop_id: String::new(),
            }))
            .await?
        {
            Body::GroupCreated(c) => c
                .group
                .ok_or_else(|| ClientError::Protocol("GroupCreated without group".into())),
            other => Err(unexpected(&other)),
        }
    }

    /// Joins a group (or re-subscribes to one already joined).
    ///
    /// # Errors
    /// [`ClientError`]; codes include `UNKNOWN_GROUP`, `GROUP_FULL`, `WRONG_SHOP`.
    pub async fn join(&self, group_id: u64) -> Result<v1::Joined, ClientError> {
        match self
            .request(client_frame::Body::JoinGroup(v1::JoinGroup { group_id }))
            .await?
        {
            Body::Joined(j) => {
                // Pushes follow the newest message of `recent` (or last_seq).
                let newest = j
                    .recent
                    .last()
                    .map(|m| m.seq)
                    .or_else(|| j.group.as_ref().map(|g| g.last_seq))
                    .unwrap_or(0);
                lock(&self.sequencer).track(group_id, newest);
                Ok(j)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Leaves a group.
    ///
    /// # Errors
    /// [`ClientError`]; codes include `UNKNOWN_GROUP`, `NOT_MEMBER`.
    pub async fn leave(&self, group_id: u64) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::LeaveGroup(v1::LeaveGroup { group_id }))
            .await?
        {
            Body::Left(_) => {
                lock(&self.sequencer).forget(group_id);
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Posts a text message with a fresh client message id; returns once it
    /// is durable, with its seq.
    ///
    /// # Errors
    /// [`ClientError`]; codes include `NOT_MEMBER`, `TEXT_TOO_LONG`,
    /// `REPLY_TO_UNKNOWN`, `RATE_LIMITED` and `SLOW_MODE` (see
    /// [`ClientError::RateLimited`] and its `retry_after_ms`).
    pub async fn send(
        &self,
        group_id: u64,
        text: &str,
        reply_to: Option<u64>,
    ) -> Result<v1::SendAck, ClientError> {
        // A fresh id, sent once: a first attempt, which the server need not
        // look up among every earlier id of the group.
        self.send_message(v1::SendMessage {
            group_id,
            text: Bytes::copy_from_slice(text.as_bytes()),
            reply_to: reply_to.unwrap_or(0),
            client_msg_id: new_client_msg_id(),
            first_attempt: true,
        })
        .await
    }

    /// Posts a text message with the caller's client message id. Sending
    /// again with the same id (on this or a new connection, even after a
    /// server restart) returns the original ack with `duplicate` set. The
    /// id may have been sent before, so the server checks it against every
    /// earlier message (`first_attempt` is false).
    ///
    /// # Errors
    /// As for [`Client::send`].
    pub async fn send_with_id(
        &self,
        group_id: u64,
        text: &str,
        reply_to: Option<u64>,
        client_msg_id: &str,
    ) -> Result<v1::SendAck, ClientError> {
        self.send_message(v1::SendMessage {
            group_id,
            text: Bytes::copy_from_slice(text.as_bytes()),
            reply_to: reply_to.unwrap_or(0),
            client_msg_id: client_msg_id.to_string(),
            first_attempt: false,
        })
        .await
    }

    /// Posts a message given as a raw protocol value (any bytes as text).
    ///
    /// # Errors
    /// As for [`Client::send`].
    pub async fn send_message(&self, msg: v1::SendMessage) -> Result<v1::SendAck, ClientError> {
        match self.request(client_frame::Body::SendMessage(msg)).await? {
            Body::SendAck(a) => Ok(a),
            other => Err(unexpected(&other)),
        }
    }

    /// A page of history: messages below `before_seq` (0: the newest), ascending.
    ///
    /// # Errors
    /// [`ClientError`]; codes include `NOT_MEMBER`, `INVALID_ARGUMENT`.
    pub async fn history(
        &self,
        group_id: u64,
        before_seq: u64,
        limit: u32,
    ) -> Result<v1::HistoryPage, ClientError> {
        match self
            .request(client_frame::Body::FetchHistory(v1::FetchHistory {
                group_id,
                before_seq,
                limit,
            }))
            .await?
        {
            Body::HistoryPage(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// Round trip to the server; returns its clock (ms since the epoch).
    ///
    /// # Errors
    /// [`ClientError`].
    /// Also updates [`Client::clock_offset_ms`].
    pub async fn ping(&self) -> Result<u64, ClientError> {
        self.link.ping(self.timeout).await
    }
}

fn unexpected(body: &Body) -> ClientError {
    ClientError::Protocol(format!("unexpected answer {body:?}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
