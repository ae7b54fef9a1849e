//! The Rust client for Qun.
//!
//! [`Client`] speaks Qun's WebSocket protocol: it connects, authenticates
//! with a token, sends requests and matches answers to them by request id,
//! and hands pushed messages to the caller as [`Event`]s in the order the
//! server sent them. Tests, the load tester and `qun-cli` all use it.
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use qun_proto::v1::{self, client_frame, server_frame::Body};
use qun_proto::{ClientFrame, ErrorCode, ServerFrame, decode_server_frame, encode_client_frame};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use qun_proto::v1 as proto;

/// The largest server frame the client accepts (a full history page of
/// 4 KiB messages fits easily).
const MAX_SERVER_FRAME: usize = 16 * 1024 * 1024;

/// Pushes buffered before the client stops reading the socket.
const EVENT_BUFFER: usize = 4096;

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
    /// The server answered with an error frame.
    #[error("server error {code} ({name}): {message}", name = code_name(*.code))]
    Server {
        /// The numeric [`ErrorCode`].
        code: i32,
        /// The server's message.
        message: String,
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
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::try_from(*code).ok(),
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
    /// An error frame not tied to a request (e.g. a malformed frame).
    Error {
        /// The numeric code.
        code: i32,
        /// The message.
        message: String,
    },
    /// The server closed the WebSocket.
    Closed {
        /// The close code (1001 on shutdown), if one was sent.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// A connected, authenticated client.
#[derive(Debug)]
pub struct Client {
    out: mpsc::Sender<Message>,
    waiters: Waiters,
    events: mpsc::Receiver<Event>,
    next_id: AtomicU64,
    welcome: v1::Welcome,
    timeout: Duration,
}

impl Client {
    /// Connects to `url` (e.g. `ws://127.0.0.1:7700/ws`) and authenticates
    /// with `token`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the socket or handshake fails,
    /// [`ClientError::Server`] when the token is refused.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        let mut client = Self::connect_unauthenticated(url).await?;
        let body = client
            .request(client_frame::Body::Hello(v1::Hello {
                protocol_version: qun_proto::PROTOCOL_VERSION,
                token: token.to_string(),
                client_name: format!("qun-client/{}", env!("CARGO_PKG_VERSION")),
            }))
            .await?;
        match body {
            Body::Welcome(w) => {
                client.welcome = w;
                Ok(client)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Connects without sending `Hello`: for tests of what the server does
    /// with unauthenticated connections.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub async fn connect_unauthenticated(url: &str) -> Result<Self, ClientError> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_SERVER_FRAME))
            .max_frame_size(Some(MAX_SERVER_FRAME));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .map_err(|e| ClientError::Connect {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(256);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_BUFFER);
        let waiters: Waiters = Arc::default();
        tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let reader_waiters = waiters.clone();
        tokio::spawn(async move {
            let closed = loop {
                let msg = match stream.next().await {
                    Some(Ok(m)) => m,
                    Some(Err(_)) | None => break None,
                };
                let bytes = match msg {
                    Message::Binary(b) => b,
                    Message::Close(frame) => {
                        break frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    }
                    _ => continue,
                };
                let Ok(frame) = decode_server_frame(&bytes) else {
                    continue;
                };
                if frame.request_id != 0 {
                    let waiter = lock(&reader_waiters).remove(&frame.request_id);
                    if let Some(w) = waiter {
                        let _ = w.send(frame);
                        continue;
                    }
                }
                let event = match frame.body {
                    Some(Body::Message(m)) => Event::Message(m),
                    Some(Body::OutOfSync(o)) => Event::OutOfSync { dropped: o.dropped },
                    Some(Body::GoingAway(g)) => Event::GoingAway {
                        reason: g.reason,
                        reconnect_after_ms: g.reconnect_after_ms,
                    },
                    Some(Body::Error(e)) => Event::Error {
                        code: e.code,
                        message: e.message,
                    },
                    _ => continue,
                };
                // Waiting here when the caller does not read is deliberate:
                // the socket then backs up like a slow phone's.
                if ev_tx.send(event).await.is_err() {
                    break None;
                }
            };
            lock(&reader_waiters).clear();
            let (code, reason) = closed.map_or((None, String::new()), |(c, r)| (Some(c), r));
            let _ = ev_tx.send(Event::Closed { code, reason }).await;
        });
        Ok(Self {
            out: out_tx,
            waiters,
            events: ev_rx,
            next_id: AtomicU64::new(1),
            welcome: v1::Welcome::default(),
            timeout: Duration::from_secs(30),
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
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(request_id, tx);
        let frame = ClientFrame {
            request_id,
            body: Some(body),
        };
        if self
            .out
            .send(Message::Binary(encode_client_frame(&frame)))
            .await
            .is_err()
        {
            lock(&self.waiters).remove(&request_id);
            return Err(ClientError::Closed);
        }
        let answer = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(_)) => return Err(ClientError::Closed),
            Err(_) => {
                lock(&self.waiters).remove(&request_id);
                return Err(ClientError::Timeout(self.timeout));
            }
        };
        match answer.body {
            Some(Body::Error(e)) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }),
            Some(body) => Ok(body),
            None => Err(ClientError::Protocol("answer without a body".into())),
        }
    }

    /// Sends raw bytes as one binary WebSocket message (for protocol tests).
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn send_raw(&self, bytes: Bytes) -> Result<(), ClientError> {
        self.out
            .send(Message::Binary(bytes))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends a text WebSocket message (which the server refuses; for tests).
    ///
    /// # Errors
    /// [`ClientError::Closed`].
    pub async fn send_text_frame(&self, text: &str) -> Result<(), ClientError> {
        self.out
            .send(Message::text(text))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next push, in the order the server sent them; `None` after
    /// [`Event::Closed`] has been returned.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
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
            Body::Joined(j) => Ok(j),
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
            Body::Left(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Posts a text message; returns once it is durable, with its seq.
    ///
    /// # Errors
    /// [`ClientError`]; codes include `NOT_MEMBER`, `TEXT_TOO_LONG`,
    /// `REPLY_TO_UNKNOWN`.
    pub async fn send(
        &self,
        group_id: u64,
        text: &str,
        reply_to: Option<u64>,
    ) -> Result<v1::SendAck, ClientError> {
        self.send_message(v1::SendMessage {
            group_id,
            text: Bytes::copy_from_slice(text.as_bytes()),
            reply_to: reply_to.unwrap_or(0),
            client_msg_id: String::new(),
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
    pub async fn ping(&self) -> Result<u64, ClientError> {
        match self
            .request(client_frame::Body::Ping(v1::Ping { client_time_ms: 0 }))
            .await?
        {
            Body::Pong(p) => Ok(p.server_time_ms),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(body: &Body) -> ClientError {
    ClientError::Protocol(format!("unexpected answer {body:?}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
