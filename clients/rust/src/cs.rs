//! Exclusive customer service (专属客服): one-to-one sessions between a
//! buyer and a shop's agents.
//!
//! A session is a group of its own: send, read history, tail, resume and
//! mark read with its `session_id` as the group id, as in any group. Its
//! changes (assigned, queued, transferred, closed) arrive as
//! [`crate::Event::CsSession`].

use qun_proto::v1::{self, client_frame, server_frame::Body};

use crate::{Client, ClientError, unexpected};

impl Client {
    async fn cs_session(&self, body: client_frame::Body) -> Result<v1::CsSession, ClientError> {
        match self.request(body).await? {
            Body::CsSession(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// A buyer opens (or reopens) their session with a shop: it reaches
    /// their assigned agent, another available agent, or the queue.
    ///
    /// # Errors
    /// [`ClientError`]; `NOT_ELIGIBLE` when the buyer's tier is below the
    /// shop's.
    pub async fn cs_open(&self, shop_id: &str) -> Result<v1::CsSession, ClientError> {
        self.cs_session(client_frame::Body::CsOpen(v1::CsOpen {
            shop_id: shop_id.to_string(),
            buyer_id: String::new(),
        }))
        .await
    }

    /// The buyer's assigned agent opens a session with them (proactive
    /// contact); takes one unit of the shop's proactive quota.
    ///
    /// # Errors
    /// [`ClientError`]; `CONTACT_BLOCKED`, `PROACTIVE_OFF`,
    /// `QUOTA_EXHAUSTED`, `INVALID_ARGUMENT` (not their assigned agent).
    pub async fn cs_contact(&self, buyer_id: &str) -> Result<v1::CsSession, ClientError> {
        self.cs_session(client_frame::Body::CsOpen(v1::CsOpen {
            shop_id: String::new(),
            buyer_id: buyer_id.to_string(),
        }))
        .await
    }

    /// Hands a session to another available agent of the shop, with a note
    /// for them.
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` when the session is not open or
    /// the agent not available.
    pub async fn cs_transfer(
        &self,
        session_id: u64,
        to_agent: &str,
        note: &str,
    ) -> Result<v1::CsSession, ClientError> {
        self.cs_session(client_frame::Body::CsTransfer(v1::CsTransfer {
            session_id,
            to_agent: to_agent.to_string(),
            note: note.to_string(),
        }))
        .await
    }

    /// Closes a session (its buyer or the shop's staff).
    ///
    /// # Errors
    /// [`ClientError`]; `NOT_MEMBER`, `WRONG_SHOP`.
    pub async fn cs_close(&self, session_id: u64) -> Result<v1::CsSession, ClientError> {
        self.cs_session(client_frame::Body::CsClose(v1::CsClose { session_id }))
            .await
    }

    /// The shop's queue and agents (staff), or one's own place (buyer).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn cs_queue(&self, shop_id: &str) -> Result<v1::CsQueueState, ClientError> {
        match self
            .request(client_frame::Body::CsQueue(v1::CsQueue {
                shop_id: shop_id.to_string(),
            }))
            .await?
        {
            Body::CsQueueState(q) => Ok(q),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets this agent's presence; ONLINE takes new sessions (while this
    /// connection, or another of the agent's, is open).
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE` for buyers.
    pub async fn set_presence(
        &self,
        presence: v1::Presence,
    ) -> Result<v1::CsQueueState, ClientError> {
        match self
            .request(client_frame::Body::SetPresence(v1::SetPresence {
                presence: presence as i32,
            }))
            .await?
        {
            Body::CsQueueState(q) => Ok(q),
            other => Err(unexpected(&other)),
        }
    }

    /// A buyer blocks (or unblocks) proactive contact from a shop.
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE` for staff.
    pub async fn cs_block(&self, shop_id: &str, blocked: bool) -> Result<(), ClientError> {
        match self
            .request(client_frame::Body::CsBlock(v1::CsBlock {
                shop_id: shop_id.to_string(),
                blocked,
            }))
            .await?
        {
            Body::CsBlocked(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}
