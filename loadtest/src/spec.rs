//! What the coordinator tells a worker process, and what the worker says
//! back: one JSON object per line on the worker's stdin and stdout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::scheduling::Scheduling;

/// How the members' kernels acknowledge the pushes they read
/// (`--member-acks`).
///
/// A member only reads, so Linux acknowledges each small push as soon as
/// the member reads it. Over loopback that ACK's whole path, the server
/// socket's side of it too, runs on the member's thread: at 300,000
/// deliveries a second, a quarter of the load generator's CPU, on a machine
/// it shares with the server (docs/benchmarks.md, "fifteenth stop"). Phones
/// pay for their own ACKs, not the server's machine.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MemberAcks {
    /// Quick-ACK mode off after every read
    /// ([`qun_client::ClientOptions::delayed_acks`]): an ACK for every
    /// second push (the default).
    Delayed,
    /// The kernel's own choice for a connection that only reads: an ACK per
    /// push.
    Immediate,
}

impl MemberAcks {
    /// The client option that gives these acknowledgements.
    pub(crate) fn delayed(self) -> bool {
        self == MemberAcks::Delayed
    }
}

impl std::fmt::Display for MemberAcks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberAcks::Delayed => "delayed",
            MemberAcks::Immediate => "immediate",
        })
    }
}

/// One worker's share of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    /// The server's URL (`ws://…` or `quic://…`).
    pub(crate) url: String,
    /// Where the server's token key is (to sign members' tokens).
    pub(crate) data_dir: PathBuf,
    /// QUIC certificate pin.
    pub(crate) cert_sha256: Option<String>,
    /// QUIC without a pin (development servers).
    pub(crate) insecure_dev_cert: bool,
    /// Local address this worker connects from.
    pub(crate) source_ip: Option<IpAddr>,
    /// How its members' kernels acknowledge pushes.
    pub(crate) member_acks: MemberAcks,
    /// Distinguishes the users of this run from earlier runs.
    pub(crate) run_id: String,
    /// The first member index of this worker.
    pub(crate) first: usize,
    /// How many members it runs.
    pub(crate) count: usize,
    /// What they do.
    pub(crate) task: Task,
}

/// What a worker's members do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Task {
    /// Connect, join `groups[i % len]`, and stay idle until told to stop.
    Idle {
        /// The groups.
        groups: Vec<u64>,
    },
    /// Connect, join `groups[i % len]`, and read every message until the
    /// coordinator says where each group ended.
    Fanout {
        /// The groups.
        groups: Vec<u64>,
    },
    /// Join the group, then press join on the group-buy at a random moment
    /// within `within_ms` of "go".
    FlashSale {
        /// The group.
        group: u64,
        /// The group-buy.
        group_buy: u64,
        /// The window.
        within_ms: u64,
    },
    /// Join the group, then page its whole history backwards at once.
    Backfill {
        /// The group.
        group: u64,
        /// Messages per page.
        page: u32,
        /// The newest seq when the history was posted: every seq from 1 to
        /// it must come back, once.
        last_seq: u64,
    },
    /// Join the group; on "go" drop the connection, reconnect and resume
    /// from `last_seq - behind`, until caught up to `last_seq`.
    ResumeStorm {
        /// The group.
        group: u64,
        /// Its newest seq.
        last_seq: u64,
        /// How far behind each member resumes from.
        behind: u64,
    },
}

/// A line from a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WorkerLine {
    /// Members connected (and joined) so far.
    Progress(usize),
    /// Setup is done; waiting for "go".
    Ready {
        /// Members connected.
        connected: usize,
        /// Members that could not connect or join.
        failed: usize,
        /// The scheduling policy the worker runs under, as inherited from
        /// the coordinator; `None` when it is not one of ours or cannot be
        /// read.
        scheduling: Option<Scheduling>,
        /// Why the first member that failed could not connect or join.
        #[serde(default)]
        first_failure: Option<String>,
    },
    /// The measured phase is over.
    Result(WorkerResult),
    /// The worker could not run.
    Error(String),
}

/// A line to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum CoordinatorLine {
    /// Start the measured phase.
    Go,
    /// Fan-out: every group's newest seq now that the senders stopped.
    End(BTreeMap<u64, u64>),
    /// Close every connection and exit.
    Stop,
}

/// What a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    /// Latencies in µs, an HdrHistogram in V2 format, base64.
    pub(crate) latency: String,
    /// Messages received (fan-out, resume), pages read (backfill), joins
    /// answered (flash sale).
    pub(crate) ops: u64,
    /// Messages expected but never received.
    pub(crate) lost: u64,
    /// Duplicates the client's sequencer dropped.
    pub(crate) duplicates: u64,
    /// Gaps the client's sequencer filled (out-of-order arrivals).
    pub(crate) gaps: u64,
    /// Answers by name (flash sale: joined, sold-out, …).
    pub(crate) results: BTreeMap<String, u64>,
    /// Errors by kind.
    pub(crate) errors: BTreeMap<String, u64>,
    /// The latency of a part of the operation, encoded as `latency`
    /// (empty when the scenario has none). Flash sale: the joins that won
    /// a slot alone (winners wait for their entry to be durable; the
    /// others are answered from memory). Fan-out: from the server's
    /// sequencing of a message (its `ts_ms`) to the member.
    #[serde(default)]
    pub(crate) part_latency: String,
}
