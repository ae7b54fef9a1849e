use std::fmt;

/// What can go wrong in a store.
///
/// Every variant says whether a retry can help ([`StorageError::is_retryable`]).
/// None of them means data already acknowledged was lost: a store that cannot
/// make a write durable refuses it and every later one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The write queue is full. Nothing was queued; retry after a short pause.
    #[error("storage write queue is full; retry shortly")]
    Overloaded,
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
        matches!(self, Self::Overloaded)
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
