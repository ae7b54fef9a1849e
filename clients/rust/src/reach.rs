//! Reach and buyer feedback: muting a group's promotions, reporting a
//! message, telling the shop a card was opened, and (staff) reading the
//! group's reach quota.
//!
//! A member who muted promotions gets them as messages of kind HIDDEN:
//! only `group_id`, `seq` and `ts_ms` are set, so the sequence stays
//! gap-free. Clients show nothing for them.

use qun_proto::v1::{self, client_frame, server_frame::Body};

use crate::{Client, ClientError, unexpected};

impl Client {
    async fn feedback(&self, body: client_frame::Body) -> Result<(), ClientError> {
        match self.request(body).await? {
            Body::FeedbackAck(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Mutes (or unmutes) the group's promotions for this user, on every
    /// device. Members only.
    ///
    /// # Errors
    /// [`ClientError`]; the server's codes include `NOT_MEMBER` and
    /// `UNKNOWN_GROUP`.
    pub async fn mute_promotions(&self, group_id: u64, muted: bool) -> Result<(), ClientError> {
        self.feedback(client_frame::Body::MutePromotions(v1::MutePromotions {
            group_id,
            muted,
        }))
        .await
    }

    /// Reports the message at `seq` with a reason (1 to 500 characters).
    /// Reporting it again changes nothing.
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for no such message or a bad
    /// reason, `NOT_MEMBER`.
    pub async fn report_message(
        &self,
        group_id: u64,
        seq: u64,
        reason: &str,
    ) -> Result<(), ClientError> {
        self.feedback(client_frame::Body::ReportMessage(v1::ReportMessage {
            group_id,
            seq,
            reason: reason.to_string(),
        }))
        .await
    }

    /// Tells the shop the card at `seq` was opened (counted once).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for no such message, `NOT_MEMBER`.
    pub async fn open_card(&self, group_id: u64, seq: u64) -> Result<(), ClientError> {
        self.feedback(client_frame::Body::OpenCard(v1::OpenCard { group_id, seq }))
            .await
    }

    /// The group's reach quota today (staff of its shop).
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`.
    pub async fn reach_quota(&self, group_id: u64) -> Result<v1::ReachQuota, ClientError> {
        match self
            .request(client_frame::Body::GetReachQuota(v1::GetReachQuota {
                group_id,
            }))
            .await?
        {
            Body::ReachQuota(q) => Ok(q),
            other => Err(unexpected(&other)),
        }
    }
}
