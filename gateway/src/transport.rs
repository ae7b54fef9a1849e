//! What a connection needs from its transport, so that one session loop
//! (`crate::connection`) serves WebSocket and QUIC alike and chat-core never
//! knows which one it talks to.
//!
//! A transport gives the session a stream of `Inbound` items (one per
//! client frame, already cut out of the byte stream) and a `FrameSink`
//! that writes encoded server frames. Frames are `bytes::Bytes` encoded once
//! by chat-core or the session; a sink only adds its own framing.

use std::future::Future;
use std::io;

use bytes::Bytes;

/// Close codes, the same numbers on both transports (defined in
/// `qun-proto`, shared with the client library).
pub use qun_proto::close;

/// One item read from a transport.
#[derive(Debug, PartialEq, Eq)]
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
    /// Transport-level traffic with nothing for the session (pongs). It
    /// still counts as the client being there.
    Ignore,
    /// A WebSocket ping: answered with a pong carrying this payload.
    Ping(Bytes),
    /// The client broke the transport's protocol (why); the connection is
    /// closed with [`close::PROTOCOL`].
    Protocol(&'static str),
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
    /// Queues a pong (WebSocket) with `payload`; transports without one
    /// ignore it.
    fn pong(&mut self, payload: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        drop(payload);
        std::future::ready(Ok(()))
    }
    /// Writes everything fed so far.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Delivers what was written, then closes with `code` and `reason`.
    fn close(&mut self, code: u16, reason: String) -> impl Future<Output = ()> + Send;
    /// Ends the connection without a close code (the peer is gone or left).
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}
