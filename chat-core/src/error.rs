use qun_proto::ErrorCode;
use qun_storage::StorageError;

/// Why a chat operation was refused. Every variant maps to one wire
/// [`ErrorCode`] ([`ChatError::code`]); nothing was changed when one is
/// returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// No group has this id. The client should drop it from its list.
    #[error("no group with id {0}")]
    UnknownGroup(u64),
    /// The caller is not a member. Join first.
    #[error("not a member of group {0}")]
    NotMember(u64),
    /// The caller's role may not do this.
    #[error("a {role} may not {action}")]
    ForbiddenRole {
        /// The caller's role name.
        role: &'static str,
        /// What was attempted.
        action: &'static str,
    },
    /// The caller is staff of another shop.
    #[error("group belongs to another shop")]
    WrongShop,
    /// The group has `max_members` members.
    #[error("group {group_id} is full ({max_members} members)")]
    GroupFull {
        /// The group.
        group_id: u64,
        /// Its cap.
        max_members: u32,
    },
    /// `reply_to` names no message of this group.
    #[error("group {group_id} has no message {seq} to reply to")]
    ReplyToUnknown {
        /// The group.
        group_id: u64,
        /// The seq asked for.
        seq: u64,
    },
    /// Text over the limit.
    #[error("text is {len} bytes; the limit is {max}")]
    TextTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Text is not UTF-8.
    #[error("text is not valid UTF-8")]
    TextNotUtf8,
    /// Text is empty or only white space.
    #[error("text is empty")]
    TextEmpty,
    /// Another argument is out of range; the message says which.
    #[error("{0}")]
    InvalidArgument(String),
    /// A buyer sends faster than the per-user rate. Retry after the wait.
    #[error("sending too fast; retry in {retry_after_ms} ms")]
    RateLimited {
        /// Milliseconds until a message would be accepted.
        retry_after_ms: u64,
    },
    /// The group's buyers together send faster than its slow-mode rate.
    #[error("the group is in slow mode; retry in {retry_after_ms} ms")]
    SlowMode {
        /// Milliseconds until a message would be accepted.
        retry_after_ms: u64,
    },
    /// No product with this id in the caller's shop. Create it first.
    #[error("no product {0:?} in this shop")]
    UnknownProduct(String),
    /// No commerce object with this id in the group, or not of the kind
    /// the request needs.
    #[error("group {group_id} has no such object {object_id}")]
    UnknownObject {
        /// The group.
        group_id: u64,
        /// The id asked for.
        object_id: u64,
    },
    /// The group's promotions for today are used up.
    #[error(
        "today's promotions in this group are used up ({limit} a day); the quota resets at midnight UTC"
    )]
    QuotaExhausted {
        /// Today's limit.
        limit: u32,
        /// Until the next UTC midnight.
        retry_after_ms: u64,
    },
    /// Staff muted the caller (or every buyer) in this group.
    #[error("you are muted in this group")]
    Muted {
        /// Until the mute ends; 0 while all buyers are muted.
        retry_after_ms: u64,
    },
    /// Staff removed the caller and barred them from joining again.
    #[error("you were removed from this group and cannot join again yet")]
    Banned {
        /// Until the ban ends.
        retry_after_ms: u64,
    },
    /// The group admits by tags and the caller's do not match.
    #[error("this group admits only buyers its shop selected (by tags or tier)")]
    NotEligible,
    /// A targeted push whose expression matches no buyer of the group.
    #[error(
        "no buyer of this group matches {expression:?}: nothing was pushed and no quota was taken"
    )]
    NoAudience {
        /// The expression.
        expression: String,
    },
    /// The buyer blocked proactive contact from this shop.
    #[error("this buyer blocked proactive contact from your shop")]
    ContactBlocked,
    /// Proactive contact is off for the shop: its buyer feedback is too
    /// low, or its proactive base is 0.
    #[error(
        "proactive contact is off for your shop: its buyer feedback is below the threshold (it comes back as the score recovers) or its proactive_base is 0"
    )]
    ProactiveOff,
    /// The group admits buyers on approval; the request is recorded.
    #[error("your request to join is waiting for the shop's approval")]
    JoinPending,
    /// The store refused or failed the write; nothing became visible.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl ChatError {
    /// The stable wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::UnknownGroup(_) => ErrorCode::UnknownGroup,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::ForbiddenRole { .. } => ErrorCode::ForbiddenRole,
            ChatError::WrongShop => ErrorCode::WrongShop,
            ChatError::GroupFull { .. } => ErrorCode::GroupFull,
            ChatError::ReplyToUnknown { .. } => ErrorCode::ReplyToUnknown,
            ChatError::TextTooLong { .. } => ErrorCode::TextTooLong,
            ChatError::TextNotUtf8 => ErrorCode::TextNotUtf8,
            ChatError::TextEmpty => ErrorCode::TextEmpty,
            ChatError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ChatError::RateLimited { .. } => ErrorCode::RateLimited,
            ChatError::SlowMode { .. } => ErrorCode::SlowMode,
            ChatError::UnknownProduct(_) => ErrorCode::UnknownProduct,
            ChatError::UnknownObject { .. } => ErrorCode::UnknownObject,
            ChatError::QuotaExhausted { .. } => ErrorCode::QuotaExhausted,
            ChatError::Muted { .. } => ErrorCode::Muted,
            ChatError::Banned { .. } => ErrorCode::Banned,
            ChatError::JoinPending => ErrorCode::JoinPending,
            ChatError::NotEligible | ChatError::NoAudience { .. } => ErrorCode::NotEligible,
            ChatError::ContactBlocked => ErrorCode::ContactBlocked,
            ChatError::ProactiveOff => ErrorCode::ProactiveOff,
            ChatError::Storage(StorageError::Overloaded) => ErrorCode::Overloaded,
            ChatError::Storage(StorageError::Corrupt { .. }) => ErrorCode::Internal,
            ChatError::Storage(_) => ErrorCode::StorageUnavailable,
        }
    }

    /// For rate limits: how long the client should wait before retrying.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            ChatError::RateLimited { retry_after_ms }
            | ChatError::SlowMode { retry_after_ms }
            | ChatError::QuotaExhausted { retry_after_ms, .. }
            | ChatError::Muted { retry_after_ms }
            | ChatError::Banned { retry_after_ms } => Some(*retry_after_ms),
            _ => None,
        }
    }

    /// The message safe to show a client (internal detail stays in logs).
    pub fn client_message(&self) -> String {
        match self {
            ChatError::Storage(StorageError::Overloaded) => "server is busy; retry shortly".into(),
            ChatError::Storage(StorageError::Corrupt { .. }) => "internal error".into(),
            ChatError::Storage(StorageError::Timeout { .. } | StorageError::Unavailable { .. }) => {
                "storage is unavailable; retry shortly".into()
            }
            // Not "nothing was written": with a cluster store a write that
            // timed out may still land. A retry with the same id is safe.
            ChatError::Storage(_) => {
                "storage unavailable; retry with the same client_msg_id".into()
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_storage_errors_reach_clients_as_retryable_unavailability() {
        let cases = [
            StorageError::Timeout { op: "read" },
            StorageError::Unavailable {
                op: "write",
                detail: "2 of 3 replicas down".into(),
            },
        ];
        for e in cases {
            let e = ChatError::Storage(e);
            assert_eq!(e.code(), ErrorCode::StorageUnavailable);
            assert_eq!(e.client_message(), "storage is unavailable; retry shortly");
        }
        let overloaded = ChatError::Storage(StorageError::Overloaded);
        assert_eq!(overloaded.code(), ErrorCode::Overloaded);
        // A refused write is never reported as sent, and the client is
        // told how to retry safely.
        let poisoned = ChatError::Storage(StorageError::Poisoned);
        assert_eq!(poisoned.code(), ErrorCode::StorageUnavailable);
        assert!(poisoned.client_message().contains("same client_msg_id"));
    }
}
