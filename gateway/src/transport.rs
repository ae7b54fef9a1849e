//! What a connection needs from its transport, so that one session loop
//! (`crate::connection`) serves WebSocket and QUIC alike and chat-core never
//! knows which one it talks to.
//!
//! A transport gives the session a stream of [`Inbound`] items (one per
//! client frame, already cut out of the byte stream) and a [`FrameSink`]
//! that writes encoded server frames. Frames are `bytes::Bytes` encoded once
//! by chat-core or the session; a sink only adds its own framing.

use std::future::Future;
use std::io;

use bytes::Bytes;
use futures_util::SinkExt as _;
use futures_util::stream::SplitSink;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};

/// Close codes, the same numbers on both transports: the WebSocket close
/// status, or the QUIC application error code of the connection close.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (after `GoingAway`).
    pub const GOING_AWAY: u16 = 1001;
    /// Unsupported protocol version.
    pub const PROTOCOL: u16 = 1002;
    /// Policy: no or bad `Hello`, token refused.
    pub const POLICY: u16 = 1008;
    /// A frame over `max_frame_bytes`.
    pub const TOO_LARGE: u16 = 1009;
    /// Nothing heard from the client for `idle_timeout_ms`.
    pub const IDLE: u16 = 4000;
}

/// One item read from a transport.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A whole client frame.
    Frame(Bytes),
    /// A WebSocket text message (not a frame: refused as malformed).
    Text,
    /// A frame over the size limit; the connection is then closed.
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Transport-level traffic with nothing for the session (pings).
    Ignore,
    /// The peer closed.
    Closed,
    /// The transport failed.
    Failed(String),
}

/// Which of a connection's two outgoing flows a frame belongs to. Over
/// WebSocket both share the socket; over QUIC they are separate streams, so
/// an answer never waits behind pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Answers to this connection's requests.
    Answer,
    /// Pushes: messages, out-of-sync, going-away.
    Push,
}

/// Where a connection's writer puts encoded server frames.
pub(crate) trait FrameSink: Send + 'static {
    /// Queues one frame (it may be written at once or at the next flush).
    fn feed(&mut self, lane: Lane, frame: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes everything fed so far.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Delivers what was written, then closes with `code` and `reason`.
    fn close(&mut self, code: u16, reason: String) -> impl Future<Output = ()> + Send;
    /// Ends the connection without a close code (the peer is gone or left).
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// A WebSocket message as an [`Inbound`] item.
pub(crate) fn ws_inbound(incoming: Result<Message, WsError>) -> Inbound {
    match incoming {
        Ok(Message::Binary(b)) => Inbound::Frame(b),
        Ok(Message::Text(_)) => Inbound::Text,
        Ok(Message::Close(_)) => Inbound::Closed,
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Inbound::Ignore,
        Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
            Inbound::TooLarge {
                size,
                max: max_size,
            }
        }
        Err(e) => Inbound::Failed(e.to_string()),
    }
}

/// The sending half of a WebSocket: both lanes on one socket.
pub(crate) struct WsSink(pub(crate) SplitSink<WebSocketStream<TcpStream>, Message>);

impl FrameSink for WsSink {
    async fn feed(&mut self, _lane: Lane, frame: Bytes) -> io::Result<()> {
        self.0
            .feed(Message::Binary(frame))
            .await
            .map_err(io::Error::other)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.0.flush().await.map_err(io::Error::other)
    }

    async fn close(&mut self, code: u16, reason: String) {
        let _ = self.0.flush().await;
        let _ = self
            .0
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            })))
            .await;
    }

    async fn shutdown(&mut self) {
        let _ = self.0.close().await;
    }
}
