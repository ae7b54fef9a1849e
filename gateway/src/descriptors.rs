//! File descriptors: every connection holds one, and a process has a limit.
//!
//! Running out shows up obscurely: `accept` fails with `EMFILE`, and the
//! store can fail to open a file. So at start the server raises its soft
//! limit to the hard one, keeps [`RESERVED`] descriptors for everything that
//! is not a connection, and admits at most the rest as connections. When
//! that is fewer than `max_connections` it says so, once, with what to do;
//! connections beyond it are refused at the door and counted like any other
//! refusal.

/// Descriptors kept for what is not a client connection: the listeners,
/// the store's journal and segment files, logs, and headroom.
pub(crate) const RESERVED: u64 = 256;

/// What the server may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdBudget {
    /// The soft limit after raising it (`u64::MAX`: unlimited).
    pub(crate) limit: u64,
    /// The soft limit before, when it was raised.
    pub(crate) raised_from: Option<u64>,
    /// Connections admitted at most: `max_connections`, or fewer when the
    /// limit does not allow it.
    pub(crate) connections: usize,
}

/// The connections a descriptor limit allows, at most `max_connections`.
pub(crate) fn connections_within(max_connections: usize, limit: u64) -> usize {
    let usable = limit.saturating_sub(RESERVED);
    max_connections.min(usize::try_from(usable).unwrap_or(usize::MAX))
}

/// Raises the soft limit to the hard one and works out the budget, logging
/// what it did and any shortfall.
pub(crate) fn plan(max_connections: usize) -> FdBudget {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let mut limit = before.current.unwrap_or(u64::MAX);
    let mut raised_from = None;
    let hard = before.maximum.unwrap_or(u64::MAX);
    if limit < hard {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        ) {
            Ok(()) => {
                raised_from = Some(limit);
                limit = hard;
            }
            Err(e) => {
                tracing::warn!(error = %e, soft = limit, hard, "cannot raise the file descriptor limit")
            }
        }
    }
    let connections = connections_within(max_connections, limit);
    if let Some(from) = raised_from {
        tracing::info!(
            from,
            to = limit,
            "raised the file descriptor limit to its hard limit"
        );
    }
    if connections < max_connections {
        tracing::warn!(
            limit,
            max_connections,
            admitted = connections,
            "the file descriptor limit allows only {connections} connections \
             ({RESERVED} kept for the store and listeners); more are refused. \
             Raise the hard limit (`ulimit -Hn`, LimitNOFILE= in systemd) or lower max_connections"
        );
    }
    FdBudget {
        limit,
        raised_from,
        connections,
    }
}

/// Descriptors open now, or 0 when `/proc` cannot tell.
pub(crate) fn open_now() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_reserve_and_never_exceeds_the_setting() {
        assert_eq!(connections_within(18_000, 20_000), 18_000);
        assert_eq!(
            connections_within(19_900, 20_000),
            20_000 - RESERVED as usize
        );
        assert_eq!(connections_within(18_000, 1_024), 1_024 - RESERVED as usize);
        assert_eq!(connections_within(18_000, 100), 0);
        assert_eq!(connections_within(18_000, u64::MAX), 18_000);
    }

    #[test]
    fn plan_reports_the_process_limit() {
        let budget = plan(10);
        assert!(budget.limit > 0);
        assert!(budget.connections <= 10);
        assert!(
            open_now() > 0,
            "this process has stdin, stdout, stderr at least"
        );
    }
}
