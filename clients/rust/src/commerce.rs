//! Commerce requests: product cards, group-buys, coupons and polls.
//!
//! Every one is answered by a [`v1::CommerceAnswer`]: the object, the
//! caller's stake in it, a [`v1::CommerceResult`] for buyers' actions
//! (sold out and the like are results, not errors) and the server clock
//! for countdowns. Changes reach every member as [`crate::Event::Message`]s
//! of kind COMMERCE.

use qun_proto::v1::{self, client_frame, server_frame::Body};

use crate::{Client, ClientError, unexpected};

impl Client {
    async fn commerce(&self, body: client_frame::Body) -> Result<v1::CommerceAnswer, ClientError> {
        match self.request(body).await? {
            Body::Commerce(a) => Ok(*a),
            other => Err(unexpected(&other)),
        }
    }

    /// Posts a product card (staff). With `req.product` set, the shop's
    /// product is created or updated from it first.
    ///
    /// # Errors
    /// [`ClientError`]; the server's codes include `FORBIDDEN_ROLE`,
    /// `WRONG_SHOP`, `INVALID_ARGUMENT` and `UNKNOWN_PRODUCT`.
    pub async fn post_card(&self, req: v1::PostCard) -> Result<v1::CommerceAnswer, ClientError> {
        self.commerce(client_frame::Body::PostCard(req)).await
    }

    /// Starts a group-buy (staff); its id is the answer's `seq`.
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a price, target, slots or
    /// deadline out of range.
    pub async fn start_group_buy(
        &self,
        req: v1::StartGroupBuy,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        self.commerce(client_frame::Body::StartGroupBuy(req)).await
    }

    /// Joins a group-buy (buyers who are members). Idempotent.
    ///
    /// # Errors
    /// [`ClientError`]; `UNKNOWN_OBJECT`, `NOT_MEMBER`, `FORBIDDEN_ROLE`.
    pub async fn join_group_buy(
        &self,
        group_id: u64,
        group_buy_id: u64,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        let req = v1::JoinGroupBuy {
            group_id,
            group_buy_id,
        };
        self.commerce(client_frame::Body::JoinGroupBuy(req)).await
    }

    /// Leaves a group-buy that is still OPEN.
    ///
    /// # Errors
    /// As for [`Client::join_group_buy`].
    pub async fn leave_group_buy(
        &self,
        group_id: u64,
        group_buy_id: u64,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        let req = v1::LeaveGroupBuy {
            group_id,
            group_buy_id,
        };
        self.commerce(client_frame::Body::LeaveGroupBuy(req)).await
    }

    /// Issues a coupon (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a field out of range.
    pub async fn issue_coupon(
        &self,
        req: v1::IssueCoupon,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        self.commerce(client_frame::Body::IssueCoupon(req)).await
    }

    /// Claims one coupon (buyers who are members).
    ///
    /// # Errors
    /// As for [`Client::join_group_buy`].
    pub async fn claim_coupon(
        &self,
        group_id: u64,
        coupon_id: u64,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        let req = v1::ClaimCoupon {
            group_id,
            coupon_id,
        };
        self.commerce(client_frame::Body::ClaimCoupon(req)).await
    }

    /// Opens a poll (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a question, options or
    /// deadline out of range.
    pub async fn open_poll(&self, req: v1::OpenPoll) -> Result<v1::CommerceAnswer, ClientError> {
        self.commerce(client_frame::Body::OpenPoll(req)).await
    }

    /// Votes for `option` (0-based), or changes one's vote.
    ///
    /// # Errors
    /// As for [`Client::join_group_buy`]; `INVALID_ARGUMENT` for no such
    /// option.
    pub async fn vote(
        &self,
        group_id: u64,
        poll_id: u64,
        option: u32,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        let req = v1::Vote {
            group_id,
            poll_id,
            option,
        };
        self.commerce(client_frame::Body::Vote(req)).await
    }

    /// Reads a commerce object's state and the caller's stake in it.
    ///
    /// # Errors
    /// [`ClientError`]; `UNKNOWN_OBJECT`, `NOT_MEMBER`, `WRONG_SHOP`.
    pub async fn commerce_object(
        &self,
        group_id: u64,
        object_id: u64,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        let req = v1::GetCommerce {
            group_id,
            object_id,
        };
        self.commerce(client_frame::Body::GetCommerce(req)).await
    }

    /// Ends a group-buy (cancelled) or a poll (closed) now (staff).
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a coupon.
    pub async fn end_commerce(
        &self,
        group_id: u64,
        object_id: u64,
    ) -> Result<v1::CommerceAnswer, ClientError> {
        let req = v1::EndCommerce {
            group_id,
            object_id,
        };
        self.commerce(client_frame::Body::EndCommerce(req)).await
    }
}
