//! One connection: `Hello`, then requests and pushes, over any transport.
//!
//! [`serve`] does the WebSocket handshake; `crate::quic` sets up a QUIC
//! connection. Both hand a stream of [`Inbound`] frames and a [`FrameSink`]
//! to [`run`], the one session loop.
//!
//! Each connection is two tasks. The *reader* ([`run`]) decodes frames and
//! runs requests; the *writer* ([`write_loop`]) owns the sending side and
//! writes the two lanes of the connection's [`Outbox`]: answers to this
//! connection's requests (bounded; never dropped) and pushes from groups
//! (dropped as a whole when the phone falls behind, and reported as
//! `OutOfSync`).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::StreamExt as _;
use futures_util::future::OptionFuture;
use futures_util::stream::FuturesUnordered;
use qun_chat_core::{
    ChatError, ConnId, Identity, MAX_RESUME_CURSORS, NewGroup, NewMessage, Next, Outbox, Outgoing,
    Reply, Subscriber,
};
use qun_proto::v1::{self, client_frame, server_frame::Body};
use qun_proto::{ServerFrame, decode_client_frame, encode_server_frame};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument as _;

use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::request_kind::RequestKind;
use crate::server::Shared;
use crate::transport::{FrameSink, Inbound, Lane, close};
use crate::websocket;

/// The WebSocket path.
pub const WS_PATH: &str = "/ws";

/// Close code for a connection the server heard nothing from for
/// `idle_timeout_ms` (4000-4999 are for applications).
pub const IDLE_CLOSE_CODE: u16 = close::IDLE;

/// Milliseconds since the Unix epoch: the server's clock, read only here
/// and handed to chat-core.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The `conn` span of a connection: its id, peer, transport and (after
/// `Hello`) user.
///
/// At debug level: held for as long as the phone stays connected, a span
/// costs an idle connection 0.6 KB at 19,000 connections
/// (docs/benchmarks.md). The few info events of a connection name it
/// themselves (`conn`).
pub(crate) fn span(
    conn: ConnId,
    peer: std::net::SocketAddr,
    transport: &'static str,
) -> tracing::Span {
    tracing::debug_span!("conn", id = conn.0, %peer, transport, user = tracing::field::Empty)
}

/// Serves one accepted TCP connection (WebSocket) until it closes or the
/// server stops, holding its `permit` under `max_connections` meanwhile.
pub(crate) fn serve(
    stream: TcpStream,
    conn: ConnId,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    let hello_timeout = Duration::from_millis(shared.config.hello_timeout_ms);
    let handshake = websocket::accept(stream, WS_PATH, shared.config.max_frame_bytes);
    // Boxed: the handshake's future (with its request buffer) only lives
    // until the upgrade; inline it would stay in every connection's task.
    // Made here, so the task keeps a pointer to it rather than the socket
    // (and, as with `run`, the task holds no second copy of its arguments).
    let mut handshake = Box::pin(tokio::time::timeout(hello_timeout, handshake));
    async move {
        let metrics = &shared.metrics;
        let (reader, writer) = match handshake.as_mut().await {
            Ok(Ok(halves)) => halves,
            Ok(Err(e)) => {
                metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "websocket handshake failed");
                return;
            }
            Err(_) => {
                metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("websocket handshake timed out");
                return;
            }
        };
        drop(handshake);
        run(reader, writer, conn, shared).await;
        drop(permit);
    }
}

/// The session of one connection, whatever its transport: reads frames
/// from `source`, runs them, and writes answers and pushes to `sink` until
/// the client leaves, a fatal error, or shutdown.
pub(crate) fn run(
    mut source: impl Stream<Item = Inbound> + Unpin + Send,
    sink: impl FrameSink,
    conn: ConnId,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send {
    // Set up here, outside the future: what is only needed to start (the
    // sink, moved to the writer) then takes no room in the connection's
    // task for as long as the phone stays connected.
    shared
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let outbox = Outbox::with_peak_gauge(
        shared.outbox_limits,
        shared.metrics.outbox_peak_bytes.clone(),
    );
    let mut writer = tokio::spawn(write_loop(sink, outbox.clone(), shared.clone(), conn));
    let mut session = Session {
        conn,
        shared,
        outbox,
        identity: None,
        subscribed: Arc::default(),
    };
    async move {
        let close = session.read_loop(&mut source).await;
        let shared = session.shared.clone();
        let subscribed = std::mem::take(&mut *lock(&session.subscribed));
        for group_id in subscribed {
            shared.groups.unsubscribe(conn, group_id);
        }
        if let Some(who) = &session.identity {
            shared.groups.detach_device(who, conn);
        }
        // The writer stops once the replies before this one are written.
        let last = match close {
            Some((code, reason)) => Reply::Close { code, reason },
            None => Reply::End,
        };
        let outbox = session.outbox.clone();
        outbox.reply(last).await;
        drop(session);
        // The writer ends once the answers are written and the close is sent.
        // A phone that stopped reading would keep it (and the socket) forever.
        if tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
            tracing::debug!("writer did not finish in time; stopped");
        }
        outbox.close();
        shared
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        tracing::debug!("connection closed");
    }
}

/// An answer that waits for something (durability, a catch-up), already
/// encoded when it resolves: the reader holds a few bytes per request in
/// flight, not an answer body.
type Pending = futures_util::future::BoxFuture<'static, Bytes>;

/// A waiting answer with its request's kind and the time it was read, for
/// `qun_request_duration_seconds`.
struct Timed {
    answer: Pending,
    kind: RequestKind,
    read_at: Instant,
}

impl Future for Timed {
    type Output = (Bytes, RequestKind, Instant);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (kind, read_at) = (self.kind, self.read_at);
        self.answer
            .as_mut()
            .poll(cx)
            .map(|frame| (frame, kind, read_at))
    }
}

/// Encodes the answer to request `request_id`, counting refusals.
fn encode_answer(
    metrics: &Metrics,
    conn: ConnId,
    request_id: u64,
    answer: Result<Body, RequestError>,
) -> Bytes {
    let frame = match answer {
        Ok(body) => ServerFrame {
            request_id,
            body: Some(body),
        },
        Err(e) => {
            metrics.errors_sent.fetch_add(1, Ordering::Relaxed);
            e.to_frame(request_id, conn)
        }
    };
    encode_server_frame(&frame)
}

struct Session {
    conn: ConnId,
    shared: Arc<Shared>,
    outbox: Outbox,
    identity: Option<Identity>,
    /// Groups this connection may be subscribed to, to unsubscribe at the
    /// end. Shared with in-flight resumes.
    subscribed: Arc<Mutex<Vec<u64>>>,
}

/// Notes that the connection may be subscribed to `group_id` (a list, not a
/// set: a phone is in a few groups, and an empty list holds no memory).
fn subscribe(subscribed: &Mutex<Vec<u64>>, group_id: u64) {
    let mut groups = lock(subscribed);
    if !groups.contains(&group_id) {
        groups.push(group_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Session {
    /// Reads until the peer leaves, a fatal error, or shutdown. Returns the
    /// close frame to send, if any.
    ///
    /// This future is the whole of an idle connection's reader task, so it
    /// is kept small (docs/benchmarks.md, "Connections"): one timer serves
    /// both the Hello deadline and the idle timeout, answers are encoded
    /// before they wait for room in the outbox, and handling a frame is
    /// boxed.
    async fn read_loop(
        &mut self,
        source: &mut (impl Stream<Item = Inbound> + Unpin),
    ) -> Option<(u16, String)> {
        let shared = self.shared.clone();
        // Made when a request first waits, and dropped when none does:
        // a `FuturesUnordered` allocates its queue up front.
        let mut in_flight: Option<FuturesUnordered<Timed>> = None;
        let idle_timeout = || Duration::from_millis(shared.config.idle_timeout_ms);
        let hello_by =
            tokio::time::Instant::now() + Duration::from_millis(shared.config.hello_timeout_ms);
        // Until Hello: the Hello deadline (or the idle timeout, if that
        // comes first). After: the idle timeout.
        let deadline =
            tokio::time::sleep_until(hello_by.min(tokio::time::Instant::now() + idle_timeout()));
        tokio::pin!(deadline);
        let close = loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => break Some(self.going_away()),
                () = &mut deadline => {
                    if self.identity.is_none() && tokio::time::Instant::now() >= hello_by {
                        break Some((close::POLICY, "no Hello in time".into()));
                    }
                    shared.metrics.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("idle timeout");
                    break Some((IDLE_CLOSE_CODE, "idle timeout".into()));
                }
                Some(Some((frame, kind, read_at))) = OptionFuture::from(in_flight.as_mut().map(|f| f.next())),
                    if in_flight.is_some() =>
                {
                    if in_flight.as_ref().is_some_and(FuturesUnordered::is_empty) {
                        in_flight = None;
                    }
                    if !self.reply(Reply::Frame(frame)).await {
                        break None;
                    }
                    shared.metrics.request_duration.observe(kind, read_at.elapsed());
                }
                incoming = source.next(),
                    if in_flight.as_ref().map_or(0, FuturesUnordered::len) < shared.config.max_in_flight =>
                {
                    let Some(incoming) = incoming else { break None };
                    // Boxed: handling a frame (Hello, any request) takes
                    // a future as big as the biggest request's; inline it
                    // would make every idle connection's task that big.
                    let step = Box::pin(self.on_message(incoming, Instant::now())).await;
                    let idle_by = tokio::time::Instant::now() + idle_timeout();
                    deadline.as_mut().reset(if self.identity.is_none() {
                        idle_by.min(hello_by)
                    } else {
                        idle_by
                    });
                    match step {
                        Step::Continue => {}
                        Step::Wait(answer, kind, read_at) => in_flight
                            .get_or_insert_with(FuturesUnordered::new)
                            .push(Timed { answer, kind, read_at }),
                        Step::Close(code, reason) => break Some((code, reason)),
                        Step::Gone => break None,
                    }
                }
            }
        };
        // Acknowledge what was accepted before stopping: those messages are
        // being made durable and the sender is owed its ack.
        let mut in_flight = in_flight.unwrap_or_default();
        while let Some((frame, _, _)) = in_flight.next().await {
            if !self.reply(Reply::Frame(frame)).await {
                break;
            }
        }
        close
    }

    /// Tells the client the server is going away (if its outbox has room)
    /// and returns the close to send.
    fn going_away(&self) -> (u16, String) {
        let hint = self.shared.config.reconnect_hint_ms;
        let reason = format!("server shutting down; reconnect in {hint} ms");
        let frame = ServerFrame {
            request_id: 0,
            body: Some(Body::GoingAway(v1::GoingAway {
                reason: reason.clone(),
                reconnect_after_ms: hint,
            })),
        };
        let _ = self
            .outbox
            .try_reply(Reply::Frame(encode_server_frame(&frame)));
        (close::GOING_AWAY, reason)
    }

    /// Queues a reply, waiting for room; `false` when the writer is gone.
    ///
    /// Boxed: the outbox's wait is a few hundred bytes, and inline it would
    /// sit in every idle connection's task.
    async fn reply(&self, reply: Reply) -> bool {
        Box::pin(self.outbox.reply(reply)).await
    }

    /// Sends an answer; resolves to `false` when the writer is gone.
    ///
    /// The answer is encoded before the returned future waits for room in
    /// the outbox, so only the encoded bytes are held meanwhile, not the
    /// (large) answer body.
    fn answer(
        &self,
        request_id: u64,
        answer: Result<Body, RequestError>,
    ) -> impl Future<Output = bool> + Send + '_ {
        let frame = encode_answer(&self.shared.metrics, self.conn, request_id, answer);
        self.outbox.reply(Reply::Frame(frame))
    }

    /// Handles one inbound item, read at `read_at`.
    async fn on_message(&mut self, incoming: Inbound, read_at: Instant) -> Step {
        let bytes = match incoming {
            Inbound::Frame(b) => b,
            Inbound::Text => return self.refuse(0, RequestError::TextFrame).await,
            Inbound::Closed => return Step::Gone,
            Inbound::Ignore => return Step::Continue,
            Inbound::Ping(payload) => {
                return if self.reply(Reply::Pong(payload)).await {
                    Step::Continue
                } else {
                    Step::Gone
                };
            }
            Inbound::Protocol(why) => {
                tracing::debug!(why, "transport protocol broken");
                return Step::Close(close::PROTOCOL, why.into());
            }
            Inbound::TooLarge { size, max } => {
                let e = RequestError::FrameTooLarge { size, max };
                self.answer(0, Err(e)).await;
                return Step::Close(close::TOO_LARGE, "frame too large".into());
            }
            Inbound::Failed(e) => {
                tracing::debug!(error = %e, "read failed");
                return Step::Gone;
            }
        };
        self.shared
            .metrics
            .frames_in
            .fetch_add(1, Ordering::Relaxed);
        let frame = match decode_client_frame(&bytes) {
            Ok(f) => f,
            Err(e) => return self.refuse(0, e.into()).await,
        };
        let request_id = frame.request_id;
        let Some(body) = frame.body else {
            return self
                .refuse(
                    request_id,
                    RequestError::Decode(qun_proto::DecodeError::EmptyBody),
                )
                .await;
        };
        let Some(who) = self.identity.clone() else {
            return self.hello(request_id, body).await;
        };
        let kind = RequestKind::of(&body);
        let span = tracing::debug_span!("req", id = request_id, kind = kind.name());
        match self.dispatch(&who, request_id, body).instrument(span).await {
            Dispatched::Done(result) => {
                if self.answer(request_id, result).await {
                    let took = read_at.elapsed();
                    self.shared.metrics.request_duration.observe(kind, took);
                    Step::Continue
                } else {
                    Step::Gone
                }
            }
            Dispatched::Wait(fut) => Step::Wait(fut, kind, read_at),
        }
    }

    async fn dispatch(
        &mut self,
        who: &Identity,
        request_id: u64,
        body: client_frame::Body,
    ) -> Dispatched {
        let groups = &self.shared.groups;
        let result = match body {
            client_frame::Body::Hello(_) => Err(RequestError::AlreadyAuthenticated),
            client_frame::Body::Ping(p) => Ok(Body::Pong(v1::Pong {
                client_time_ms: p.client_time_ms,
                server_time_ms: now_ms(),
            })),
            client_frame::Body::CreateGroup(c) => self.create_group(who, c).await,
            client_frame::Body::JoinGroup(j) => self.join(who, j.group_id).await,
            client_frame::Body::LeaveGroup(l) => self.leave(who, l.group_id).await,
            client_frame::Body::FetchHistory(h) => self
                .shared
                .groups
                .history(who, h.group_id, h.before_seq, h.limit)
                .await
                .map(Body::HistoryPage)
                .map_err(RequestError::from),
            client_frame::Body::Resume(r) => return self.resume(who, request_id, r),
            client_frame::Body::FetchRange(r) => self
                .shared
                .groups
                .fetch_range(who, r.group_id, r.after_seq, r.limit)
                .await
                .map(Body::HistoryPage)
                .map_err(RequestError::from),
            client_frame::Body::MarkRead(m) => self
                .shared
                .groups
                .mark_read(who, self.conn, m.group_id, m.seq)
                .await
                .map(Body::ReadMarked)
                .map_err(RequestError::from),
            client_frame::Body::ListMyGroups(_) => self
                .shared
                .groups
                .my_groups(who)
                .await
                .map(Body::MyGroups)
                .map_err(RequestError::from),
            client_frame::Body::PostCard(c) => commerce(groups.post_card(who, c, now_ms()).await),
            client_frame::Body::StartGroupBuy(s) => {
                commerce(groups.start_group_buy(who, s, now_ms()).await)
            }
            client_frame::Body::JoinGroupBuy(j) => commerce(
                groups
                    .join_group_buy(who, j.group_id, j.group_buy_id, now_ms())
                    .await,
            ),
            client_frame::Body::LeaveGroupBuy(l) => commerce(
                groups
                    .leave_group_buy(who, l.group_id, l.group_buy_id, now_ms())
                    .await,
            ),
            client_frame::Body::IssueCoupon(c) => {
                commerce(groups.issue_coupon(who, c, now_ms()).await)
            }
            client_frame::Body::ClaimCoupon(c) => commerce(
                groups
                    .claim_coupon(who, c.group_id, c.coupon_id, now_ms())
                    .await,
            ),
            client_frame::Body::OpenPoll(p) => commerce(groups.open_poll(who, p, now_ms()).await),
            client_frame::Body::Vote(v) => commerce(
                groups
                    .vote(who, v.group_id, v.poll_id, v.option, now_ms())
                    .await,
            ),
            client_frame::Body::GetCommerce(g) => commerce(
                groups
                    .commerce_object(who, g.group_id, g.object_id, now_ms())
                    .await,
            ),
            client_frame::Body::EndCommerce(e) => commerce(
                groups
                    .end_commerce(who, e.group_id, e.object_id, now_ms())
                    .await,
            ),
            client_frame::Body::MutePromotions(m) => groups
                .mute_promotions(who, m.group_id, m.muted, now_ms())
                .await
                .map(Body::FeedbackAck)
                .map_err(RequestError::from),
            client_frame::Body::ReportMessage(r) => groups
                .report_message(who, r, now_ms())
                .await
                .map(Body::FeedbackAck)
                .map_err(RequestError::from),
            client_frame::Body::OpenCard(o) => groups
                .open_card(who, o.group_id, o.seq, now_ms())
                .await
                .map(Body::FeedbackAck)
                .map_err(RequestError::from),
            client_frame::Body::MuteMember(m) => groups
                .mute_member(who, m, now_ms())
                .await
                .map(Body::Moderated)
                .map_err(RequestError::from),
            client_frame::Body::MuteAllBuyers(m) => groups
                .mute_all_buyers(who, m.group_id, m.muted)
                .await
                .map(Body::Moderated)
                .map_err(RequestError::from),
            client_frame::Body::RemoveMember(r) => groups
                .remove_member(who, r, now_ms())
                .await
                .map(Body::Moderated)
                .map_err(RequestError::from),
            client_frame::Body::RecallMessage(r) => groups
                .recall(who, r.group_id, r.seq, now_ms())
                .await
                .map(Body::Moderated)
                .map_err(RequestError::from),
            client_frame::Body::PromoteFaq(p) => groups
                .promote_faq(who, p, now_ms())
                .await
                .map(Body::FaqBoard)
                .map_err(RequestError::from),
            client_frame::Body::RemoveFaq(r) => groups
                .remove_faq(who, r.group_id, r.faq_id, now_ms())
                .await
                .map(Body::FaqBoard)
                .map_err(RequestError::from),
            client_frame::Body::SetPin(p) => groups
                .set_pin(who, p, now_ms())
                .await
                .map(Body::FaqBoard)
                .map_err(RequestError::from),
            client_frame::Body::ListFaq(l) => groups
                .list_faq(who, l.group_id)
                .await
                .map(Body::FaqBoard)
                .map_err(RequestError::from),
            client_frame::Body::PutAutoReply(p) => groups
                .put_auto_reply(who, p.rule.unwrap_or_default())
                .await
                .map(Body::AutoReplies)
                .map_err(RequestError::from),
            client_frame::Body::RemoveAutoReply(r) => groups
                .remove_auto_reply(who, &r.rule_id)
                .await
                .map(Body::AutoReplies)
                .map_err(RequestError::from),
            client_frame::Body::ListAutoReplies(_) => groups
                .list_auto_replies(who)
                .await
                .map(Body::AutoReplies)
                .map_err(RequestError::from),
            client_frame::Body::SetJoinPolicy(p) => groups
                .set_join_policy(who, p.group_id, p.policy(), &p.expression)
                .await
                .map(Body::JoinRequests)
                .map_err(RequestError::from),
            client_frame::Body::ListJoinRequests(l) => groups
                .list_join_requests(who, l.group_id)
                .await
                .map(Body::JoinRequests)
                .map_err(RequestError::from),
            client_frame::Body::DecideJoin(d) => groups
                .decide_join(who, d, now_ms())
                .await
                .map(Body::JoinRequests)
                .map_err(RequestError::from),
            client_frame::Body::TagBuyer(t) => groups
                .tag_buyer(who, &t.user_id, t.add, t.remove, false)
                .await
                .map(Body::BuyerTags)
                .map_err(RequestError::from),
            client_frame::Body::GetBuyerTags(t) => groups
                .buyer_tags(who, &t.user_id)
                .await
                .map(Body::BuyerTags)
                .map_err(RequestError::from),
            client_frame::Body::PushPromotion(p) => groups
                .push_promotion(who, p, now_ms())
                .await
                .map(Body::PromotionPushed)
                .map_err(RequestError::from),
            client_frame::Body::SchedulePush(p) => groups
                .schedule_push(who, p, now_ms())
                .await
                .map(Body::Schedules)
                .map_err(RequestError::from),
            client_frame::Body::CancelSchedule(c) => groups
                .cancel_schedule(who, c.group_id, c.schedule_id)
                .await
                .map(Body::Schedules)
                .map_err(RequestError::from),
            client_frame::Body::ListSchedules(l) => groups
                .list_schedules(who, l.group_id)
                .await
                .map(Body::Schedules)
                .map_err(RequestError::from),
            client_frame::Body::GetTagPool(_) => groups
                .tag_pool(who)
                .map(Body::TagPool)
                .map_err(RequestError::from),
            client_frame::Body::CsOpen(o) => groups
                .cs_open(who, o, now_ms())
                .await
                .map(Body::CsSession)
                .map_err(RequestError::from),
            client_frame::Body::CsTransfer(t) => groups
                .cs_transfer(who, t, now_ms())
                .await
                .map(Body::CsSession)
                .map_err(RequestError::from),
            client_frame::Body::CsClose(c) => groups
                .cs_close(who, c.session_id, now_ms())
                .await
                .map(Body::CsSession)
                .map_err(RequestError::from),
            client_frame::Body::CsQueue(q) => groups
                .cs_queue(who, &q.shop_id, now_ms())
                .await
                .map(Body::CsQueueState)
                .map_err(RequestError::from),
            client_frame::Body::SetPresence(p) => groups
                .set_presence(who, p.presence(), now_ms())
                .await
                .map(Body::CsQueueState)
                .map_err(RequestError::from),
            client_frame::Body::CsBlock(b) => groups
                .cs_block(who, &b.shop_id, b.blocked, now_ms())
                .await
                .map(Body::CsBlocked)
                .map_err(RequestError::from),
            client_frame::Body::GetReachQuota(q) => groups
                .reach_quota(who, q.group_id, now_ms())
                .await
                .map(Body::ReachQuota)
                .map_err(RequestError::from),
            client_frame::Body::SendMessage(m) => {
                let msg = NewMessage {
                    group_id: m.group_id,
                    text: m.text,
                    reply_to: m.reply_to,
                    client_msg_id: m.client_msg_id,
                    first_attempt: m.first_attempt,
                };
                match self.shared.groups.submit_post(who, msg, now_ms()).await {
                    // The seq is taken; wait for durability without holding
                    // up this connection's next request.
                    Ok(ticket) => {
                        let shared = self.shared.clone();
                        let conn = self.conn;
                        return Dispatched::Wait(Box::pin(
                            async move {
                                let answer = ticket
                                    .durable()
                                    .await
                                    .map(Body::SendAck)
                                    .map_err(RequestError::from);
                                encode_answer(&shared.metrics, conn, request_id, answer)
                            }
                            .in_current_span(),
                        ));
                    }
                    Err(e) => Err(e.into()),
                }
            }
        };
        Dispatched::Done(result)
    }

    async fn refuse(&self, request_id: u64, e: RequestError) -> Step {
        let fatal = self.identity.is_none();
        if !self.answer(request_id, Err(e)).await {
            return Step::Gone;
        }
        if fatal {
            Step::Close(close::POLICY, "send Hello first".into())
        } else {
            Step::Continue
        }
    }

    async fn hello(&mut self, request_id: u64, body: client_frame::Body) -> Step {
        let client_frame::Body::Hello(hello) = body else {
            return self
                .refuse(request_id, RequestError::NotAuthenticated)
                .await;
        };
        if hello.protocol_version != qun_proto::PROTOCOL_VERSION {
            let e = RequestError::UnsupportedVersion(hello.protocol_version);
            self.answer(request_id, Err(e)).await;
            return Step::Close(close::PROTOCOL, "unsupported protocol version".into());
        }
        let who = match self.shared.key.verify(&hello.token, now_ms() / 1000) {
            Ok(who) => who,
            Err(e) => {
                tracing::info!(conn = self.conn.0, error = %e, "token refused");
                self.answer(request_id, Err(e.into())).await;
                return Step::Close(close::POLICY, "token refused".into());
            }
        };
        tracing::Span::current().record("user", who.user_id());
        tracing::info!(
            conn = self.conn.0,
            user = who.user_id(),
            role = who.role().as_str(),
            client = %hello.client_name,
            "authenticated"
        );
        let welcome = v1::Welcome {
            protocol_version: qun_proto::PROTOCOL_VERSION,
            user_id: who.user_id().to_string(),
            display_name: who.display_name().to_string(),
            role: who.role().to_proto() as i32,
            shop_id: who.shop_id().unwrap_or_default().to_string(),
            server_time_ms: now_ms(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            max_frame_bytes: u32::try_from(self.shared.config.max_frame_bytes).unwrap_or(u32::MAX),
            idle_timeout_ms: u32::try_from(self.shared.config.idle_timeout_ms).unwrap_or(u32::MAX),
            resume_max_gap: u32::try_from(self.shared.config.resume_max_gap).unwrap_or(u32::MAX),
        };
        self.shared
            .groups
            .attach_device(&who, self.conn, self.outbox.clone());
        self.identity = Some(who);
        if self.answer(request_id, Ok(Body::Welcome(welcome))).await {
            Step::Continue
        } else {
            Step::Gone
        }
    }

    async fn create_group(&self, who: &Identity, c: v1::CreateGroup) -> Result<Body, RequestError> {
        let req = NewGroup {
            name: c.name,
            max_members: c.max_members,
            shop_id: (!c.shop_id.is_empty()).then_some(c.shop_id),
        };
        let info = self.shared.groups.create_group(who, req, now_ms()).await?;
        Ok(Body::GroupCreated(v1::GroupCreated { group: Some(info) }))
    }

    async fn join(&mut self, who: &Identity, group_id: u64) -> Result<Body, RequestError> {
        let sub = Subscriber::new(self.conn, who.user_id(), self.outbox.clone());
        subscribe(&self.subscribed, group_id);
        let joined = self
            .shared
            .groups
            .join(who, group_id, sub, now_ms())
            .await?;
        Ok(Body::Joined(joined))
    }

    async fn leave(&mut self, who: &Identity, group_id: u64) -> Result<Body, RequestError> {
        self.shared.groups.leave(who, group_id, now_ms()).await?;
        lock(&self.subscribed).retain(|&g| g != group_id);
        Ok(Body::Left(v1::Left { group_id }))
    }

    /// Catches up every group named, one after the other, without holding
    /// up this connection's other requests: catch-up goes at the pace the
    /// phone reads. Every subscription is made in the outbox epoch of this
    /// moment, so a drop during the catch-up ends them all (and the client,
    /// told out of sync, resumes again).
    fn resume(&self, who: &Identity, request_id: u64, r: v1::Resume) -> Dispatched {
        let mut seen = HashSet::new();
        if r.cursors.len() > MAX_RESUME_CURSORS
            || !r.cursors.iter().all(|c| seen.insert(c.group_id))
        {
            return Dispatched::Done(Err(RequestError::Chat(ChatError::InvalidArgument(
                format!("Resume takes at most {MAX_RESUME_CURSORS} cursors, each group once"),
            ))));
        }
        let groups = self.shared.groups.clone();
        let who = who.clone();
        let subscribed = self.subscribed.clone();
        let conn = self.conn;
        let outbox = self.outbox.clone();
        let shared = self.shared.clone();
        Dispatched::Wait(Box::pin(
            async move {
                let mut answers = Vec::with_capacity(r.cursors.len());
                for cursor in r.cursors {
                    let sub = Subscriber::new(conn, who.user_id(), outbox.clone());
                    subscribe(&subscribed, cursor.group_id);
                    let answer = match groups
                        .resume(&who, cursor.group_id, cursor.last_seq, sub)
                        .await
                    {
                        Ok(done) => done,
                        Err(e) => {
                            tracing::debug!(group_id = cursor.group_id, error = %e, "resume refused");
                            v1::GroupResumed {
                                group_id: cursor.group_id,
                                error: e.code() as i32,
                                ..Default::default()
                            }
                        }
                    };
                    answers.push(answer);
                }
                let answer = Ok(Body::Resumed(v1::Resumed { groups: answers }));
                encode_answer(&shared.metrics, conn, request_id, answer)
            }
            .in_current_span(),
        ))
    }
}

/// A commerce answer as a frame body.
fn commerce(answer: Result<v1::CommerceAnswer, ChatError>) -> Result<Body, RequestError> {
    answer
        .map(|a| Body::Commerce(Box::new(a)))
        .map_err(RequestError::from)
}

// One per request, moved once: not worth a box for the answer.
#[allow(clippy::large_enum_variant)]
enum Dispatched {
    Done(Result<Body, RequestError>),
    Wait(Pending),
}

enum Step {
    Continue,
    /// An answer that waits, its request's kind, and when it was read.
    Wait(Pending, RequestKind, Instant),
    Close(u16, String),
    Gone,
}

/// The writer task: answers first, then pushes; batches whatever is ready
/// into one flush.
///
/// A plain function returning the loop: an `async fn` would keep a second
/// copy of its arguments for as long as the connection lives.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep a second copy of its arguments"
)]
fn write_loop(
    mut sink: impl FrameSink,
    outbox: Outbox,
    shared: Arc<Shared>,
    conn: ConnId,
) -> impl Future<Output = ()> + Send {
    async move {
        let metrics = &shared.metrics;
        'writing: while let Some(first) = outbox.next().await {
            let mut next = Some(first);
            let mut written = 0u64;
            // Write everything already waiting, then flush once.
            while let Some(item) = next.take() {
                let (lane, frame) = match item {
                    Next::Reply(Reply::Frame(b)) => (Lane::Answer, b),
                    Next::Push(Outgoing::Frame(b)) => (Lane::Push, b),
                    Next::Push(Outgoing::OutOfSync { dropped }) => {
                        metrics.out_of_sync_sent.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            conn = conn.0,
                            dropped,
                            "connection fell behind; pushes dropped, told out of sync"
                        );
                        let frame = ServerFrame {
                            request_id: 0,
                            body: Some(Body::OutOfSync(v1::OutOfSync { dropped })),
                        };
                        (Lane::Push, encode_server_frame(&frame))
                    }
                    Next::Reply(Reply::Pong(payload)) => {
                        if sink.pong(payload).await.is_err() {
                            outbox.close();
                            return;
                        }
                        next = outbox.try_next().ok();
                        continue;
                    }
                    Next::Reply(Reply::Close { code, reason }) => {
                        metrics.count_write(written);
                        // Boxed, as the shutdown below: once per connection,
                        // and inline they would make every writer task bigger.
                        Box::pin(sink.close(code, reason)).await;
                        outbox.close();
                        return;
                    }
                    Next::Reply(Reply::End) => {
                        metrics.count_write(written);
                        let _ = sink.flush().await;
                        break 'writing;
                    }
                };
                if sink.feed(lane, frame).await.is_err() {
                    // The socket is gone: replies stop waiting for it.
                    outbox.close();
                    return;
                }
                written += 1;
                if written >= 64 {
                    break;
                }
                next = outbox.try_next().ok();
            }
            metrics.count_write(written);
            if sink.flush().await.is_err() {
                outbox.close();
                return;
            }
        }
        outbox.close();
        Box::pin(sink.shutdown()).await;
    }
}
