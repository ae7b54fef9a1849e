//! `qun-loadtest`: reserved for the load generator (fan-out, connections,
//! flash sales, history storms). It has no workloads yet; it says so and
//! exits non-zero rather than pretending to measure anything.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("qun-loadtest: no workloads are implemented yet");
    ExitCode::from(2)
}
