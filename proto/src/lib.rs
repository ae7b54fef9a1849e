//! Qun's wire protocol.
//!
//! This crate is the contract between a phone and the server: the protobuf
//! messages generated from `proto/qun.proto` by prost, the protocol version,
//! and two helpers that turn frames into bytes and back. It knows nothing
//! about sockets or state (the same split as `quinn-proto` under `quinn`).
//!
//! # Layout
//! - [`v1`]: every generated type. [`ClientFrame`] and [`ServerFrame`] are the
//!   two envelopes; each carries a `request_id` and a `body` oneof.
//! - [`encode_server_frame`] / [`decode_client_frame`] (and the mirror pair
//!   for clients) move between frames and bytes, with [`DecodeError`] for
//!   anything a socket can deliver.
//!
//! # Example
//! ```
//! use qun_proto::{v1, ClientFrame, decode_client_frame, encode_client_frame};
//!
//! let frame = ClientFrame {
//!     request_id: 1,
//!     body: Some(v1::client_frame::Body::Ping(v1::Ping { client_time_ms: 42 })),
//! };
//! let bytes = encode_client_frame(&frame);
//! assert_eq!(decode_client_frame(&bytes).unwrap(), frame);
//! assert!(decode_client_frame(b"\xff\xff").is_err());
//! ```

use bytes::Bytes;
use prost::Message as _;

/// Every generated protobuf type of protocol version 1.
#[allow(missing_docs, missing_debug_implementations, unreachable_pub)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/qun.v1.rs"));
}

pub use v1::{ClientFrame, ErrorCode, Role, ServerFrame};

/// The protocol version this crate describes; clients send it in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The default largest frame, in bytes, that either side accepts.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// The ALPN protocol id of Qun over QUIC.
pub const QUIC_ALPN: &[u8] = b"qun/1";

/// Over QUIC every frame is preceded by its length as this many bytes,
/// big-endian (see docs/protocol.md, "QUIC").
pub const QUIC_LENGTH_PREFIX: usize = 4;

/// The longest text message, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 4096;

/// The WebSocket (RFC 6455) frame opcodes, for the server's and the
/// client's framing alike. Qun's frames travel as binary messages.
pub mod ws_opcode {
    /// A later fragment of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text message (Qun refuses them).
    pub const TEXT: u8 = 0x1;
    /// A binary message: one Qun frame.
    pub const BINARY: u8 = 0x2;
    /// Close, with an optional status and reason.
    pub const CLOSE: u8 = 0x8;
    /// Ping; answered with a pong carrying its payload.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Close codes, the same numbers on both transports: the WebSocket close
/// status, or the QUIC application error code of the connection close.
/// The server and the client library both use them.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (after `GoingAway`).
    pub const GOING_AWAY: u16 = 1001;
    /// Unsupported protocol version, or the transport's protocol broken.
    pub const PROTOCOL: u16 = 1002;
    /// Policy: no or bad `Hello`, token refused.
    pub const POLICY: u16 = 1008;
    /// A frame over the server's `max_frame_bytes`.
    pub const TOO_LARGE: u16 = 1009;
    /// Nothing heard from the client for the server's `idle_timeout_ms`.
    pub const IDLE: u16 = 4000;
}

/// Bytes that are not a frame of the expected kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not valid protobuf for the envelope. Answer with
    /// [`ErrorCode::MalformedFrame`]; the connection can go on.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The envelope decoded but carries no body. Answer with
    /// [`ErrorCode::MalformedFrame`].
    #[error("frame has no body")]
    EmptyBody,
}

/// Decodes one client frame, rejecting an empty body.
///
/// # Errors
/// [`DecodeError`] when the bytes are not a `ClientFrame` with a body.
pub fn decode_client_frame(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    let frame = ClientFrame::decode(bytes)?;
    if frame.body.is_none() {
        return Err(DecodeError::EmptyBody);
    }
    Ok(frame)
}

/// Decodes one server frame, rejecting an empty body.
///
/// # Errors
/// [`DecodeError`] when the bytes are not a `ServerFrame` with a body.
pub fn decode_server_frame(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    let frame = ServerFrame::decode(bytes)?;
    if frame.body.is_none() {
        return Err(DecodeError::EmptyBody);
    }
    Ok(frame)
}

/// Encodes a server frame once into shareable bytes. On the fan-out path the
/// result is cloned (a reference-count increment) for every recipient.
pub fn encode_server_frame(frame: &ServerFrame) -> Bytes {
    Bytes::from(frame.encode_to_vec())
}

/// Encodes a client frame.
pub fn encode_client_frame(frame: &ClientFrame) -> Bytes {
    Bytes::from(frame.encode_to_vec())
}

/// Builds the server frame that answers `request_id` with an error.
pub fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame {
        request_id,
        body: Some(v1::server_frame::Body::Error(v1::Error {
            code: code as i32,
            message: message.into(),
            retry_after_ms: 0,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frame_round_trips() {
        let frame = ServerFrame {
            request_id: 7,
            body: Some(v1::server_frame::Body::Message(v1::ChatMessage {
                group_id: 3,
                seq: 9,
                text: "is S size EU 34 or 36?".into(),
                ..Default::default()
            })),
        };
        let bytes = encode_server_frame(&frame);
        assert_eq!(decode_server_frame(&bytes).unwrap(), frame);
    }

    #[test]
    fn empty_envelope_is_rejected() {
        let bytes = encode_client_frame(&ClientFrame {
            request_id: 1,
            body: None,
        });
        assert!(matches!(
            decode_client_frame(&bytes),
            Err(DecodeError::EmptyBody)
        ));
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for junk in [&b"\x0a\xff\xff\xff\xff\xff"[..], b"\xff", b"\x12\x05ab"] {
            assert!(decode_client_frame(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn error_codes_are_stable() {
        // Codes are part of the wire contract: renumbering one breaks clients.
        assert_eq!(ErrorCode::MalformedFrame as i32, 1);
        assert_eq!(ErrorCode::FrameTooLarge as i32, 2);
        assert_eq!(ErrorCode::TokenInvalid as i32, 10);
        assert_eq!(ErrorCode::UnknownGroup as i32, 30);
        assert_eq!(ErrorCode::TextNotUtf8 as i32, 41);
        assert_eq!(ErrorCode::ShuttingDown as i32, 63);
        assert_eq!(ErrorCode::RateLimited as i32, 50);
        assert_eq!(ErrorCode::SlowMode as i32, 51);
        assert_eq!(ErrorCode::QuotaExhausted as i32, 52);
        assert_eq!(ErrorCode::UnknownObject as i32, 34);
        assert_eq!(crate::v1::MessageKind::Hidden as i32, 3);
        assert_eq!(crate::v1::MessageKind::Recall as i32, 4);
        assert_eq!(ErrorCode::Muted as i32, 53);
        assert_eq!(ErrorCode::Banned as i32, 54);
        assert_eq!(ErrorCode::JoinPending as i32, 55);
        assert_eq!(ErrorCode::NotEligible as i32, 56);
        assert_eq!(ErrorCode::ContactBlocked as i32, 57);
        assert_eq!(ErrorCode::ProactiveOff as i32, 58);
    }
}
