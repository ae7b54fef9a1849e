use std::fmt;

/// What can go wrong in a store.
///
/// Every variant says whether a retry can help ([`StorageError::is_retryable`]).
/// None of them means data already acknowledged was lost: a store that cannot
/// make a write durable refuses it and every later one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The store is overloaded: its write queue is full, or the database
    /// cluster reported overload. Nothing was queued; retry after a short
    /// pause.
    #[error("storage is overloaded; retry shortly")]
    Overloaded,
    /// The database did not answer in time (a clustered backend). For a
    /// read, retry. A write that times out is retried by the store itself
    /// and is never reported durable unless it is.
    #[error("storage timed out during {op}; retry shortly")]
    Timeout {
        /// What the store was doing.
        op: &'static str,
    },
    /// Not enough database replicas are reachable for the configured
    /// consistency (nodes down, no connection). Retry once the cluster
    /// recovers; check its health (`nodetool status`).
    #[error("storage unavailable during {op}: {detail}; retry when the cluster recovers")]
    Unavailable {
        /// What the store was doing.
        op: &'static str,
        /// The driver's account, for logs.
        detail: String,
    },
    /// The database's schema is missing, older or newer than this build
    /// expects. The message says what to run (`qun migrate`).
    #[error("{0}")]
    Schema(String),
    /// A value cannot be stored by this backend: ScyllaDB keeps ids and seqs
    /// as signed 64-bit numbers, so values above 2^63-1 are refused.
    #[error("{what} {value} is out of range for this storage backend (at most 2^63-1)")]
    OutOfRange {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// An earlier write failed, so the store refuses all writes until the
    /// server restarts (a later write must never land while an earlier one
    /// is missing). Check the disk and the server log, then restart.
    #[error("storage refuses writes after an earlier failure; restart the server")]
    Poisoned,
    /// The store was closed (server shutting down).
    #[error("storage is closed")]
    Closed,
    /// The backend failed (I/O, the database engine). The detail is for logs.
    #[error("storage backend failed during {op}: {source}")]
    Backend {
        /// What the store was doing.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored record does not decode. The data dir is damaged or was
    /// written by an incompatible version; restore it from a backup.
    #[error("corrupt record in {keyspace}: {detail}")]
    Corrupt {
        /// Which keyspace (table).
        keyspace: &'static str,
        /// What failed to decode.
        detail: String,
    },
}

impl StorageError {
    /// Whether the same request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Overloaded | Self::Timeout { .. } | Self::Unavailable { .. }
        )
    }

    /// A copy of this error for a second caller (a coalesced read shares
    /// one result between many). A backend's source becomes its message.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::Overloaded => Self::Overloaded,
            Self::Poisoned => Self::Poisoned,
            Self::Closed => Self::Closed,
            Self::Timeout { op } => Self::Timeout { op },
            Self::Unavailable { op, detail } => Self::Unavailable {
                op,
                detail: detail.clone(),
            },
            Self::Schema(detail) => Self::Schema(detail.clone()),
            Self::OutOfRange { what, value } => Self::OutOfRange {
                what,
                value: *value,
            },
            Self::Backend { op, source } => Self::Backend {
                op,
                source: source.to_string().into(),
            },
            Self::Corrupt { keyspace, detail } => Self::Corrupt {
                keyspace,
                detail: detail.clone(),
            },
        }
    }

    pub(crate) fn backend(
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend {
            op,
            source: Box::new(source),
        }
    }

    /// A record of `keyspace` that does not decode, for callers that decode
    /// the opaque bodies they stored (object and product bodies).
    pub fn corrupt(keyspace: &'static str, detail: impl fmt::Display) -> Self {
        Self::Corrupt {
            keyspace,
            detail: detail.to_string(),
        }
    }
}
