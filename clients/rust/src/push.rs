//! Pushes (staff): a product card or an announcement to the whole group
//! or, with a tag expression, only to the buyers it matches; scheduled
//! pushes; and the industry tag pool (anyone).
//!
//! Members outside a targeted push's audience get it as a message of kind
//! HIDDEN, like a muted promotion: only `group_id`, `seq` and `ts_ms` set.

use qun_proto::v1::{self, client_frame, push_content::Kind, server_frame::Body};

use crate::{Client, ClientError, unexpected};

/// What to push: a card of one of the shop's products, or an announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A product card.
    Card(String),
    /// A broadcast announcement (1 to 2,000 bytes).
    Announcement(String),
}

impl Push {
    /// On the wire, for `audience` (a tag expression; "" for everyone).
    pub fn content(&self, audience: &str) -> v1::PushContent {
        v1::PushContent {
            kind: Some(match self {
                Push::Card(id) => Kind::ProductId(id.clone()),
                Push::Announcement(t) => Kind::Announcement(t.clone()),
            }),
            audience: audience.to_string(),
        }
    }
}

impl Client {
    /// Pushes now; takes one unit of the group's reach quota.
    ///
    /// # Errors
    /// [`ClientError`]; the server's codes include `QUOTA_EXHAUSTED` (with
    /// the time to reset), `NOT_ELIGIBLE` (the audience matches nobody),
    /// `INVALID_ARGUMENT`, `UNKNOWN_PRODUCT`, `FORBIDDEN_ROLE`, `WRONG_SHOP`.
    pub async fn push_promotion(
        &self,
        group_id: u64,
        push: &Push,
        audience: &str,
    ) -> Result<v1::PromotionPushed, ClientError> {
        let req = v1::PushPromotion {
            group_id,
            content: Some(push.content(audience)),
        };
        match self.request(client_frame::Body::PushPromotion(req)).await? {
            Body::PromotionPushed(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    async fn schedules(&self, body: client_frame::Body) -> Result<v1::Schedules, ClientError> {
        match self.request(body).await? {
            Body::Schedules(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Schedules a push at `first_at_ms`, then every `every_ms` (0: once).
    /// Answered with the group's schedules; `created` is the new one.
    ///
    /// # Errors
    /// [`ClientError`]; `INVALID_ARGUMENT` for a time in the past, a period
    /// under an hour, too many schedules; `UNKNOWN_PRODUCT`.
    pub async fn schedule_push(
        &self,
        group_id: u64,
        push: &Push,
        audience: &str,
        first_at_ms: u64,
        every_ms: u64,
    ) -> Result<v1::Schedules, ClientError> {
        self.schedules(client_frame::Body::SchedulePush(v1::SchedulePush {
            group_id,
            content: Some(push.content(audience)),
            first_at_ms,
            every_ms,
        }))
        .await
    }

    /// Cancels a schedule.
    ///
    /// # Errors
    /// [`ClientError`]; `UNKNOWN_OBJECT` for no such schedule.
    pub async fn cancel_schedule(
        &self,
        group_id: u64,
        schedule_id: u64,
    ) -> Result<v1::Schedules, ClientError> {
        self.schedules(client_frame::Body::CancelSchedule(v1::CancelSchedule {
            group_id,
            schedule_id,
        }))
        .await
    }

    /// The group's schedules.
    ///
    /// # Errors
    /// [`ClientError`]; `FORBIDDEN_ROLE`, `WRONG_SHOP`.
    pub async fn list_schedules(&self, group_id: u64) -> Result<v1::Schedules, ClientError> {
        self.schedules(client_frame::Body::ListSchedules(v1::ListSchedules {
            group_id,
        }))
        .await
    }

    /// The industry tag pool.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn tag_pool(&self) -> Result<v1::TagPool, ClientError> {
        match self
            .request(client_frame::Body::GetTagPool(v1::GetTagPool {}))
            .await?
        {
            Body::TagPool(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }
}
