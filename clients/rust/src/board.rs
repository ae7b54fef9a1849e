//! The group's board: FAQ entries and pins. Staff make a question and its
//! answer an FAQ entry and pin entries or messages; members read the board.
//! Every change reaches members as a message of kind BOARD; refresh with
//! [`Client::list_faq`] when one arrives.

use qun_proto::v1::{self, client_frame, server_frame::Body};

use crate::{Client, ClientError, unexpected};

impl Client {
    async fn board(&self, body: client_frame::Body) -> Result<v1::FaqBoard, ClientError> {
        match self.request(body).await? {
            Body::FaqBoard(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    /// The group's FAQ entries and pins.
    ///
    /// # Errors
    /// [`ClientError`]; `NOT_MEMBER`, `UNKNOWN_GROUP`.
    pub async fn list_faq(&self, group_id: u64) -> Result<v1::FaqBoard, ClientError> {
        self.board(client_frame::Body::ListFaq(v1::ListFaq { group_id }))
            .await
    }

    /// Makes the messages at `question_seq` and `answer_seq` an FAQ entry
    /// (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`, `INVALID_ARGUMENT`.
    pub async fn promote_faq(
        &self,
        group_id: u64,
        question_seq: u64,
        answer_seq: u64,
    ) -> Result<v1::FaqBoard, ClientError> {
        self.board(client_frame::Body::PromoteFaq(v1::PromoteFaq {
            group_id,
            question_seq,
            answer_seq,
        }))
        .await
    }

    /// Removes an FAQ entry and its pin (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for no such entry.
    pub async fn remove_faq(
        &self,
        group_id: u64,
        faq_id: u64,
    ) -> Result<v1::FaqBoard, ClientError> {
        self.board(client_frame::Body::RemoveFaq(v1::RemoveFaq {
            group_id,
            faq_id,
        }))
        .await
    }

    /// Pins or unpins a message or an FAQ entry (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` (no such target, too many pins).
    pub async fn set_pin(
        &self,
        group_id: u64,
        target: v1::pin::Target,
        pinned: bool,
    ) -> Result<v1::FaqBoard, ClientError> {
        self.board(client_frame::Body::SetPin(v1::SetPin {
            group_id,
            pin: Some(v1::Pin {
                target: Some(target),
            }),
            pinned,
        }))
        .await
    }
}
