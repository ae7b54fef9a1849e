//! Moderation: staff mute and remove buyers and mute every buyer; any
//! member recalls (撤回) their own message within two minutes, staff any
//! message. A recall reaches every member as a message of kind RECALL
//! naming the seq it took back; history shows the original as recalled.

use qun_proto::v1::{self, client_frame, server_frame::Body};

use crate::{Client, ClientError, unexpected};

impl Client {
    async fn moderate(&self, body: client_frame::Body) -> Result<v1::Moderated, ClientError> {
        match self.request(body).await? {
            Body::Moderated(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// Mutes a buyer for `duration_ms` (1 s to 30 days); 0 unmutes. Staff.
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`, `INVALID_ARGUMENT`
    /// (not a buyer member, a duration out of range).
    pub async fn mute_member(
        &self,
        group_id: u64,
        user_id: &str,
        duration_ms: u64,
    ) -> Result<v1::Moderated, ClientError> {
        self.moderate(client_frame::Body::MuteMember(v1::MuteMember {
            group_id,
            user_id: user_id.to_string(),
            duration_ms,
        }))
        .await
    }

    /// Mutes (or unmutes) every buyer of the group. Staff.
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`.
    pub async fn mute_all_buyers(
        &self,
        group_id: u64,
        muted: bool,
    ) -> Result<v1::Moderated, ClientError> {
        self.moderate(client_frame::Body::MuteAllBuyers(v1::MuteAllBuyers {
            group_id,
            muted,
        }))
        .await
    }

    /// Removes a buyer, barring them for `ban_ms` (0: may join again). Staff.
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`, `INVALID_ARGUMENT`.
    pub async fn remove_member(
        &self,
        group_id: u64,
        user_id: &str,
        ban_ms: u64,
    ) -> Result<v1::Moderated, ClientError> {
        self.moderate(client_frame::Body::RemoveMember(v1::RemoveMember {
            group_id,
            user_id: user_id.to_string(),
            ban_ms,
        }))
        .await
    }

    /// Recalls the message at `seq`; the answer's `seq` is the RECALL
    /// message's.
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` (no such text message, already
    /// recalled, two minutes passed), `FORBIDDEN_ROLE` (another's message).
    pub async fn recall(&self, group_id: u64, seq: u64) -> Result<v1::Moderated, ClientError> {
        self.moderate(client_frame::Body::RecallMessage(v1::RecallMessage {
            group_id,
            seq,
        }))
        .await
    }
}

impl Client {
    async fn join_requests(
        &self,
        body: client_frame::Body,
    ) -> Result<v1::JoinRequests, ClientError> {
        match self.request(body).await? {
            Body::JoinRequests(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Lets buyers join freely, on approval, or by tags (staff). On
    /// approval, a buyer's [`Client::join`] answers `JOIN_PENDING` and the
    /// decision arrives as [`crate::Event::JoinDecided`]; by tags
    /// (`expression`, e.g. `tier:vip`), others get `NOT_ELIGIBLE`.
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`, `INVALID_ARGUMENT`
    /// for a bad expression.
    pub async fn set_join_policy(
        &self,
        group_id: u64,
        policy: v1::JoinPolicy,
        expression: &str,
    ) -> Result<v1::JoinRequests, ClientError> {
        self.join_requests(client_frame::Body::SetJoinPolicy(v1::SetJoinPolicy {
            group_id,
            policy: policy as i32,
            expression: expression.to_string(),
        }))
        .await
    }

    /// Adds and removes tags of a buyer in the caller's shop (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a malformed tag.
    pub async fn tag_buyer(
        &self,
        user_id: &str,
        add: &[&str],
        remove: &[&str],
    ) -> Result<v1::BuyerTags, ClientError> {
        let req = v1::TagBuyer {
            user_id: user_id.to_string(),
            add: add.iter().map(|t| t.to_string()).collect(),
            remove: remove.iter().map(|t| t.to_string()).collect(),
        };
        match self.request(client_frame::Body::TagBuyer(req)).await? {
            Body::BuyerTags(t) => Ok(t),
            other => Err(unexpected(&other)),
        }
    }

    /// Buyers waiting for approval (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`.
    pub async fn list_join_requests(&self, group_id: u64) -> Result<v1::JoinRequests, ClientError> {
        self.join_requests(client_frame::Body::ListJoinRequests(v1::ListJoinRequests {
            group_id,
        }))
        .await
    }

    /// Approves or rejects a buyer's request (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for no such request, `GROUP_FULL`.
    pub async fn decide_join(
        &self,
        group_id: u64,
        user_id: &str,
        approve: bool,
    ) -> Result<v1::JoinRequests, ClientError> {
        self.join_requests(client_frame::Body::DecideJoin(v1::DecideJoin {
            group_id,
            user_id: user_id.to_string(),
            approve,
        }))
        .await
    }
}
