//! How the load generator's threads are scheduled: `SCHED_BATCH` by
//! default, so that its members do not preempt the server they measure.
//!
//! On one machine, every frame the server writes to a member wakes one of
//! the load generator's threads, and Linux's scheduler lets a thread it has
//! just woken take the core from the thread that woke it (wake-up
//! preemption). So the server is interrupted in the middle of a fan-out
//! once per member it wakes, switches to the member, and back: at 100k
//! deliveries/s on two cores, 37,000 involuntary context switches a second
//! on the server's runtime threads. With the clients on other machines, as
//! in production, none of those happen. `SCHED_BATCH` (sched(7)) keeps a
//! thread's share of the CPU, its nice value included, and only gives up
//! wake-up preemption: the woken member runs at the next scheduling point
//! instead. docs/benchmarks.md has the figures with and without.
//!
//! A policy set on a thread is inherited by the threads and processes it
//! starts afterwards, across `exec` too, so [`Scheduling::apply`] on the
//! main thread, before the runtime's threads exist, covers the whole
//! coordinator and its worker processes; each worker reports what it runs
//! under ([`Scheduling::of_this_thread`]) and the coordinator checks it.

use std::fmt;

use serde::{Deserialize, Serialize};
use uapi::c;

/// A Linux scheduling policy the load generator runs under.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Scheduling {
    /// `SCHED_BATCH`: no wake-up preemption of the server (the default).
    Batch,
    /// `SCHED_OTHER`: as any process, preempting the server at every
    /// wake-up.
    Normal,
}

/// Why the policy could not be set or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SchedulingError {
    /// The kernel refused the policy (a sandbox that forbids
    /// `sched_setscheduler`, for one).
    #[error("could not run under {policy} scheduling: {source}{hint}",
        hint = if *policy == Scheduling::Batch { " (--scheduling normal runs without it)" } else { "" })]
    Set {
        /// The policy asked for.
        policy: Scheduling,
        /// The OS error.
        source: uapi::Errno,
    },
    /// The policy could not be read.
    #[error("could not read the scheduling policy: {0}")]
    Read(uapi::Errno),
    /// The thread runs under a policy that is neither of ours (a real-time
    /// or idle policy set from outside, with `chrt`).
    #[error("the load generator runs under scheduling policy {0}, neither batch nor normal")]
    Other(i32),
}

impl Scheduling {
    /// The policy's number for `sched_setscheduler(2)`.
    fn policy(self) -> c::c_int {
        match self {
            Scheduling::Batch => c::SCHED_BATCH,
            Scheduling::Normal => c::SCHED_OTHER,
        }
    }

    /// Puts the calling thread under this policy; threads and processes it
    /// starts from then on inherit it. Call it before the runtime starts.
    ///
    /// # Errors
    /// [`SchedulingError::Set`] when the kernel refuses (it does not for
    /// an unprivileged thread moving between these two policies).
    pub(crate) fn apply(self) -> Result<(), SchedulingError> {
        let param = c::sched_param { sched_priority: 0 };
        uapi::sched_setscheduler(0, self.policy(), &param)
            .map(|_| ())
            .map_err(|source| SchedulingError::Set {
                policy: self,
                source,
            })
    }

    /// The policy the calling thread runs under.
    ///
    /// # Errors
    /// [`SchedulingError::Read`] when it cannot be read;
    /// [`SchedulingError::Other`] for a policy that is not one of ours.
    pub(crate) fn of_this_thread() -> Result<Self, SchedulingError> {
        let policy =
            uapi::sched_getscheduler(0).map_err(SchedulingError::Read)? & !c::SCHED_RESET_ON_FORK;
        match policy {
            c::SCHED_BATCH => Ok(Scheduling::Batch),
            c::SCHED_OTHER => Ok(Scheduling::Normal),
            other => Err(SchedulingError::Other(other)),
        }
    }
}

impl fmt::Display for Scheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduling::Batch => "batch",
            Scheduling::Normal => "normal",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each policy set on a thread is the one read back, and a thread
    /// started afterwards inherits it. Run on a thread of its own, so the
    /// test harness's threads keep theirs.
    #[test]
    fn a_refusal_says_what_to_do_when_there_is_something_to_do() {
        let refused = |policy| {
            SchedulingError::Set {
                policy,
                source: uapi::Errno(c::EPERM),
            }
            .to_string()
        };
        let batch = refused(Scheduling::Batch);
        assert!(
            batch.contains("batch") && batch.contains("--scheduling normal"),
            "{batch}"
        );
        let normal = refused(Scheduling::Normal);
        assert!(
            normal.contains("normal") && !normal.contains("--scheduling"),
            "{normal}"
        );
    }

    #[test]
    fn a_policy_set_is_read_back_and_inherited() {
        std::thread::spawn(|| {
            for policy in [Scheduling::Batch, Scheduling::Normal, Scheduling::Batch] {
                policy.apply().expect("an unprivileged thread may switch");
                assert_eq!(Scheduling::of_this_thread().ok(), Some(policy));
                let child = std::thread::spawn(Scheduling::of_this_thread)
                    .join()
                    .expect("the child thread runs");
                assert_eq!(child.ok(), Some(policy));
            }
        })
        .join()
        .expect("the test thread runs");
    }
}
