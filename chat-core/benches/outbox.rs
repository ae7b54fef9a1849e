//! The cost of handing one push to a connection's writer: the fan-out's
//! `Outbox::push_in` and the writer task's `Outbox::next` and `try_next`,
//! with the task wake-ups between them, and no socket.
//!
//! `cargo bench -p qun-chat-core --bench outbox [-- CONNECTIONS PUSHES ROUNDS]`
//!
//! On one thread (as the server's runtime thread at 300k deliveries/s),
//! CONNECTIONS writer tasks each take what is queued for them the way the
//! gateway's connection writers do (wait for the next thing, take whatever
//! else is already queued, "flush", wait again), while a fan-out task pushes
//! PUSHES frames round-robin over the connections, yielding after every 64
//! as a fan-out turn does. Reports the time per push, best of ROUNDS; the
//! socket writes a server makes after each are not included.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use qun_chat_core::{Next, Outbox, OutboxLimits, Outgoing, Pushed};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let connections = args.first().copied().unwrap_or(5_000);
    let pushes = args.get(1).copied().unwrap_or(3_000_000);
    let rounds = args.get(2).copied().unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut best = Duration::MAX;
    for round in 1..=rounds {
        let took = runtime.block_on(run(connections, pushes));
        let per_push = took / u32::try_from(pushes).unwrap();
        println!(
            "round {round}: {pushes} pushes to {connections} connections in {took:.2?}: \
             {:.0} ns a push",
            per_push.as_nanos()
        );
        best = best.min(per_push);
    }
    println!("best: {} ns a push", best.as_nanos());
}

/// One round: the writers, the fan-out, and the time until every push was
/// taken.
async fn run(connections: usize, pushes: usize) -> Duration {
    let outboxes: Vec<Outbox> = (0..connections)
        .map(|_| Outbox::new(OutboxLimits::default()))
        .collect();
    let writers: Vec<_> = outboxes
        .iter()
        .map(|outbox| tokio::spawn(write_loop(outbox.clone())))
        .collect();
    let frame = Bytes::from_static(&[7u8; 120]);
    let started = Instant::now();
    for (n, outbox) in (0..pushes).zip(outboxes.iter().cycle()) {
        let epoch = outbox.epoch();
        assert!(matches!(
            outbox.push_in(epoch, frame.clone()),
            Pushed::Queued
        ));
        if n % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    // Until the writers have taken everything.
    while outboxes.iter().any(|outbox| outbox.queued_bytes() > 0) {
        tokio::task::yield_now().await;
    }
    let took = started.elapsed();
    for outbox in &outboxes {
        outbox.close();
    }
    let taken: usize = futures_join(writers).await;
    assert_eq!(taken, pushes, "every push taken once");
    took
}

/// What a connection's writer does with its outbox, without the socket.
async fn write_loop(outbox: Outbox) -> usize {
    let mut taken = 0;
    while let Some(first) = outbox.next().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            if let Next::Push(Outgoing::Frame(frame)) = item {
                std::hint::black_box(frame);
                taken += 1;
            }
            next = outbox.try_next().ok();
        }
        // The flush would be here.
    }
    taken
}

/// Waits for every writer; the pushes they took, in all.
async fn futures_join(writers: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut all = 0;
    for w in writers {
        all += w.await.unwrap();
    }
    all
}
