//! The group's board: FAQ entries and pins. Staff make a question and its
//! answer an FAQ entry and pin entries or messages; members read the board.
//! Every change reaches members as a message of kind BOARD; refresh with
//! [`Client::list_faq`] when one arrives. Staff also manage the shop's
//! auto-reply rules here: the bot answers questions that match a rule or an
//! FAQ entry.

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

impl Client {
    async fn auto_replies(&self, body: client_frame::Body) -> Result<v1::AutoReplies, ClientError> {
        match self.request(body).await? {
            Body::AutoReplies(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates or replaces an auto-reply rule of the caller's shop (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a rule out of range or a
    /// pattern that does not compile (the message quotes the compiler).
    pub async fn put_auto_reply(
        &self,
        rule: v1::AutoReplyRule,
    ) -> Result<v1::AutoReplies, ClientError> {
        self.auto_replies(client_frame::Body::PutAutoReply(v1::PutAutoReply {
            rule: Some(rule),
        }))
        .await
    }

    /// Removes an auto-reply rule of the caller's shop (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for no such rule.
    pub async fn remove_auto_reply(&self, rule_id: &str) -> Result<v1::AutoReplies, ClientError> {
        self.auto_replies(client_frame::Body::RemoveAutoReply(v1::RemoveAutoReply {
            rule_id: rule_id.to_string(),
        }))
        .await
    }

    /// The caller's shop's auto-reply rules (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`.
    pub async fn list_auto_replies(&self) -> Result<v1::AutoReplies, ClientError> {
        self.auto_replies(client_frame::Body::ListAutoReplies(v1::ListAutoReplies {}))
            .await
    }
}
