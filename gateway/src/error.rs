//! The one place where failures become wire error codes.
//!
//! Everything a request can fail with is a [`RequestError`]; [`RequestError::to_frame`]
//! picks the code and the client-facing message, and logs the internal
//! detail of server-side failures (the client sees only a code and a
//! short message).

use qun_chat_core::{ChatError, ConnId};
use qun_proto::v1::server_frame::Body;
use qun_proto::{DecodeError, ErrorCode, ServerFrame, error_frame};

use crate::auth::TokenError;

/// A request that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// chat-core refused it.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// The token did not verify.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A text (not binary) WebSocket message.
    #[error("frames must be binary WebSocket messages carrying protobuf")]
    TextFrame,
    /// The frame exceeded the size limit.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Hello with another protocol version.
    #[error("protocol version {0} is not supported; this server speaks {v}", v = qun_proto::PROTOCOL_VERSION)]
    UnsupportedVersion(u32),
    /// A request before Hello.
    #[error("send Hello with a token first")]
    NotAuthenticated,
    /// A second Hello.
    #[error("this connection is already authenticated")]
    AlreadyAuthenticated,
}

impl RequestError {
    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::Chat(e) => e.code(),
            RequestError::Token(TokenError::Expired) => ErrorCode::TokenExpired,
            RequestError::Token(_) => ErrorCode::TokenInvalid,
            RequestError::Decode(_) | RequestError::TextFrame => ErrorCode::MalformedFrame,
            RequestError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            RequestError::UnsupportedVersion(_) => ErrorCode::UnsupportedProtocolVersion,
            RequestError::NotAuthenticated => ErrorCode::NotAuthenticated,
            RequestError::AlreadyAuthenticated => ErrorCode::AlreadyAuthenticated,
        }
    }

    /// The error frame answering `request_id` on connection `conn` (named
    /// in the log line of a server-side failure).
    pub fn to_frame(&self, request_id: u64, conn: ConnId) -> ServerFrame {
        let code = self.code();
        let message = match self {
            RequestError::Chat(e) => e.client_message(),
            other => other.to_string(),
        };
        if matches!(
            code,
            ErrorCode::Internal | ErrorCode::StorageUnavailable | ErrorCode::Overloaded
        ) {
            tracing::warn!(error = %self, ?code, request_id, conn = conn.0, "request failed on the server side");
        } else {
            tracing::debug!(error = %self, ?code, request_id, "request refused");
        }
        let mut frame = error_frame(request_id, code, message);
        if let (RequestError::Chat(e), Some(Body::Error(err))) = (self, frame.body.as_mut()) {
            err.retry_after_ms = e.retry_after_ms().unwrap_or(0);
        }
        frame
    }
}
