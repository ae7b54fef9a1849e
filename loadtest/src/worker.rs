//! A worker process: runs a share of the members (at most
//! `--per-worker` connections, so no process nears the descriptor limit),
//! reports progress, waits for "go", measures, and reports.

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use qun_client::{Client, ClientError, ClientOptions, Event, Reading};
use qun_gateway::auth::TokenKey;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{oneshot, watch};

use crate::recorder::Recorder;
use crate::report::encode;
use crate::scheduling::Scheduling;
use crate::spec::{CoordinatorLine, Task, WorkerLine, WorkerResult, WorkerSpec};
use crate::{member_token, now_us, random_u64};

/// Connections opened at once while setting up.
const CONNECT_CONCURRENCY: usize = 200;
/// How long members keep reading after the senders stopped.
const DRAIN: Duration = Duration::from_secs(15);

fn say(line: &WorkerLine) {
    if let Ok(s) = serde_json::to_string(line) {
        println!("{s}");
    }
}

/// Runs one worker until the coordinator says stop (or goes away).
///
/// # Errors
/// When the spec cannot be read or the token key loaded.
pub(crate) async fn run(spec_json: &str) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec_json).context("worker spec")?;
    let key = TokenKey::load_or_create(&spec.data_dir).context("token key")?;
    let options = ClientOptions {
        cert_sha256: spec.cert_sha256.clone(),
        insecure_dev_cert: spec.insecure_dev_cert,
        local_ip: spec.source_ip,
        delayed_acks: spec.member_acks.delayed(),
        // Each push read and decoded in the member's own task: no
        // hand-over from a reader task per delivery.
        reading: Reading::OnDemand,
        event_buffer: 65_536,
        timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let (clients, first_failure) = connect_all(&spec, &key, &options).await;
    let connected = clients.iter().filter(|c| c.is_some()).count();
    say(&WorkerLine::Ready {
        connected,
        failed: spec.count - connected,
        scheduling: Scheduling::of_this_thread().ok(),
        first_failure,
    });
    let clients: Vec<(usize, Client)> = clients
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|c| (spec.first + i, c)))
        .collect();
    loop {
        match next_line(&mut lines).await {
            Some(CoordinatorLine::Go) => break,
            Some(CoordinatorLine::Stop) | None => return Ok(()),
            Some(CoordinatorLine::End(_)) => {}
        }
    }
    let (ends_tx, ends_rx) = watch::channel(None);
    let measured = tokio::spawn(measure(spec.clone(), key, options, clients, ends_rx));
    // Forward "end" to the members, until the measured phase is over.
    tokio::pin!(measured);
    let result = loop {
        tokio::select! {
            r = &mut measured => break r?,
            line = next_line(&mut lines) => match line {
                Some(CoordinatorLine::End(ends)) => { let _ = ends_tx.send(Some(ends)); }
                Some(CoordinatorLine::Stop) | None => return Ok(()),
                Some(CoordinatorLine::Go) => {}
            },
        }
    };
    say(&WorkerLine::Result(result.0));
    // Hold the connections (the coordinator may be measuring memory).
    let _held = result.1;
    while let Some(line) = next_line(&mut lines).await {
        if matches!(line, CoordinatorLine::Stop) {
            break;
        }
    }
    Ok(())
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
) -> Option<CoordinatorLine> {
    loop {
        let line = lines.next_line().await.ok()??;
        if let Ok(l) = serde_json::from_str(&line) {
            return Some(l);
        }
    }
}

/// The group member `i` joins.
fn group_of(task: &Task, i: usize) -> u64 {
    match task {
        Task::Idle { groups } | Task::Fanout { groups } => groups[i % groups.len()],
        Task::FlashSale { group, .. }
        | Task::Backfill { group, .. }
        | Task::ResumeStorm { group, .. } => *group,
    }
}

/// Connects and joins every member of this worker, [`CONNECT_CONCURRENCY`]
/// at a time: a client for each that made it, and why the first that did
/// not failed.
async fn connect_all(
    spec: &WorkerSpec,
    key: &TokenKey,
    options: &ClientOptions,
) -> (Vec<Option<Client>>, Option<String>) {
    let mut out = Vec::with_capacity(spec.count);
    let mut first_failure = None;
    let indices: Vec<usize> = (spec.first..spec.first + spec.count).collect();
    for chunk in indices.chunks(CONNECT_CONCURRENCY) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let token = member_token(key, &spec.run_id, i);
                let (url, options) = (spec.url.clone(), options.clone());
                let group = group_of(&spec.task, i);
                tokio::spawn(async move {
                    let c = Client::connect_with(&url, &token, options)
                        .await
                        .map_err(|e| format!("connecting: {}", with_remedy(&e)))?;
                    c.join(group)
                        .await
                        .map_err(|e| format!("joining group {group}: {e}"))?;
                    Ok::<_, String>(c)
                })
            })
            .collect();
        for t in batch {
            match t.await {
                Ok(Ok(c)) => out.push(Some(c)),
                Ok(Err(why)) => {
                    first_failure.get_or_insert(why);
                    out.push(None);
                }
                Err(e) => {
                    first_failure.get_or_insert(format!("the member's task failed: {e}"));
                    out.push(None);
                }
            }
        }
        say(&WorkerLine::Progress(out.len()));
    }
    (out, first_failure)
}

/// A failure to connect, with what to do about it when the cause is one
/// the run's set-up can fix.
pub(crate) fn with_remedy(e: &ClientError) -> String {
    match e {
        ClientError::ServerFull { .. } => format!(
            "{e} (the server is at its max_connections: start it with \
             QUN_MAX_CONNECTIONS above the members of the run)"
        ),
        e => e.to_string(),
    }
}

type Measured = (WorkerResult, Vec<Client>);

/// The measured phase; returns the result and the clients still open.
async fn measure(
    spec: WorkerSpec,
    key: TokenKey,
    options: ClientOptions,
    clients: Vec<(usize, Client)>,
    ends: watch::Receiver<Option<BTreeMap<u64, u64>>>,
) -> Measured {
    let key = Arc::new(key);
    let recorder = Arc::new(Recorder::default());
    // Each member is told the end of the run (its group's last seq) on a
    // channel of its own: waiting on one shared channel took its lock at
    // every delivery.
    let mut ends_to_tell = Vec::with_capacity(clients.len());
    let told = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(i, client)| {
            let (end_tx, seq) = oneshot::channel();
            let end = EndOfRun::new(seq, &told);
            if let Task::Fanout { groups } = &spec.task {
                ends_to_tell.push((groups[i % groups.len()], end_tx));
            }
            let (spec, key, options) = (spec.clone(), key.clone(), options.clone());
            let recorder = recorder.clone();
            tokio::spawn(
                async move { member(spec, &key, &recorder, options, i, client, end).await },
            )
        })
        .collect();
    tokio::spawn(async move {
        let mut ends = ends;
        let ended = ends.wait_for(Option::is_some).await;
        // Before any member's channel completes: see `EndOfRun`.
        told.store(true, Ordering::Release);
        // Without an end (the coordinator went away), dropping the senders
        // stops the members.
        let Ok(ends) = ended else {
            return;
        };
        let ends = ends.clone().unwrap_or_default();
        for (group, tx) in ends_to_tell {
            let _ = tx.send(ends.get(&group).copied().unwrap_or(0));
        }
    });
    let mut total = WorkerResult::default();
    let mut kept = Vec::new();
    for t in tasks {
        let Ok((r, client)) = t.await else {
            *total.errors.entry("task panicked".into()).or_default() += 1;
            continue;
        };
        total.ops += r.ops;
        total.lost += r.lost;
        total.duplicates += r.duplicates;
        total.gaps += r.gaps;
        for (k, v) in r.results {
            *total.results.entry(k).or_default() += v;
        }
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
        kept.extend(client);
    }
    let (latency, part) = recorder.merged();
    total.latency = encode(&latency);
    if !part.is_empty() {
        total.part_latency = encode(&part);
    }
    (total, kept)
}

/// How a member learns that the run is over: its group's last seq, on a
/// channel of its own, after a flag all the worker's members share is set.
///
/// A member waits for its next push and for the end at once, so a plain
/// channel was looked at (its state, a cache line no one else had touched
/// since the member's last push) every time the member went back to
/// waiting: once per delivery. Instead the channel is polled once, which
/// leaves the member's waker with it, and after that only once the flag
/// is up. The flag is read by every member and written once, so it stays
/// in every core's cache; when the channel completes, the waker it holds
/// wakes the member, which then sees the flag and takes the value.
struct EndOfRun {
    seq: oneshot::Receiver<u64>,
    /// Set before any member's `seq` completes (sent or dropped).
    told: Arc<AtomicBool>,
    /// `seq` has been polled, so it holds this task's waker.
    armed: bool,
}

impl EndOfRun {
    /// The end told on `seq`, once `told` (shared by the worker's members)
    /// is set.
    fn new(seq: oneshot::Receiver<u64>, told: &Arc<AtomicBool>) -> Self {
        Self {
            seq,
            told: told.clone(),
            armed: false,
        }
    }

    /// Resolves with the group's last seq, or an error when the worker
    /// went away without one.
    fn told(&mut self) -> impl Future<Output = Result<u64, oneshot::error::RecvError>> + '_ {
        std::future::poll_fn(|cx| {
            if self.armed && !self.told.load(Ordering::Acquire) {
                return Poll::Pending;
            }
            self.armed = true;
            // Outside tokio's cooperative budget: with the task's budget
            // spent, a plain poll would return `Pending` without leaving
            // the waker, and the member would never hear of the end.
            Pin::new(&mut tokio::task::unconstrained(&mut self.seq)).poll(cx)
        })
    }
}

/// One member's measured phase.
async fn member(
    spec: WorkerSpec,
    key: &TokenKey,
    recorder: &Recorder,
    options: ClientOptions,
    i: usize,
    mut client: Client,
    mut end: EndOfRun,
) -> (WorkerResult, Option<Client>) {
    let mut r = WorkerResult::default();
    let fail = |r: &mut WorkerResult, what: &str| *r.errors.entry(what.into()).or_default() += 1;
    match spec.task {
        Task::Idle { .. } => {}
        Task::Fanout { ref groups } => {
            let group = groups[i % groups.len()];
            let mut last = 0u64;
            // The group's last seq, once the coordinator has said the run
            // is over.
            let mut target: Option<u64> = None;
            let mut deadline: Option<tokio::time::Instant> = None;
            loop {
                if let Some(t) = target {
                    if last >= t {
                        break;
                    }
                    let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN);
                    if tokio::time::Instant::now() >= d {
                        r.lost += t - last;
                        break;
                    }
                }
                // No timer per event: while the run goes on, only the end of
                // the run (or an event) wakes this member; once the senders
                // have stopped, one deadline bounds the drain. (A timeout
                // around every `next_event` registered and cancelled a
                // timer per delivery.)
                let event = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, client.next_event()).await {
                        Ok(event) => event,
                        Err(_) => continue,
                    },
                    None => tokio::select! {
                        biased;
                        event = client.next_event() => event,
                        told = end.told() => match told {
                            Ok(last_seq) => { target = Some(last_seq); continue; }
                            Err(_) => break,
                        }
                    },
                };
                match &event {
                    Some(Event::Message(m)) if m.group_id == group => {
                        if let Ok(sent) = m.text.parse::<u64>() {
                            let now = now_us();
                            // The server's clock is this machine's (loopback
                            // only), to the millisecond.
                            recorder.latency_and_part(
                                now.saturating_sub(sent),
                                now.saturating_sub(m.ts_ms.saturating_mul(1000)),
                            );
                        }
                        last = last.max(m.seq);
                        r.ops += 1;
                    }
                    Some(Event::Closed { .. }) | None => {
                        fail(&mut r, "closed");
                        break;
                    }
                    Some(_) => {}
                }
            }
            let (duplicates, gaps) = client.sequencer_stats();
            r.duplicates = duplicates;
            r.gaps = gaps;
        }
        Task::FlashSale {
            group,
            group_buy,
            within_ms,
        } => {
            if within_ms > 0 {
                tokio::time::sleep(Duration::from_millis(random_u64() % within_ms)).await;
            }
            let t = Instant::now();
            match client.join_group_buy(group, group_buy).await {
                Ok(a) => {
                    let us = micros(t.elapsed());
                    if a.result() == qun_client::proto::CommerceResult::Joined {
                        recorder.latency_and_part(us, us);
                    } else {
                        recorder.latency(us);
                    }
                    let name = a
                        .result()
                        .as_str_name()
                        .trim_start_matches("COMMERCE_RESULT_")
                        .to_ascii_lowercase();
                    *r.results.entry(name).or_default() += 1;
                    r.ops += 1;
                }
                Err(e) => fail(&mut r, &e.to_string()),
            }
        }
        Task::Backfill {
            group,
            page,
            last_seq,
        } => {
            // Every seq of the posted history, 1 to `last_seq`, must come
            // back once; later ones (members joining meanwhile) are not
            // counted.
            let mut seen = HashSet::new();
            let mut before = 0;
            loop {
                let t = Instant::now();
                match client.history(group, before, page).await {
                    Ok(p) => {
                        recorder.latency(micros(t.elapsed()));
                        r.ops += 1;
                        for m in &p.messages {
                            if m.seq <= last_seq && !seen.insert(m.seq) {
                                r.duplicates += 1;
                            }
                        }
                        match p.messages.first() {
                            Some(m) if p.has_more => before = m.seq,
                            _ => break,
                        }
                    }
                    Err(e) => {
                        fail(&mut r, &e.to_string());
                        break;
                    }
                }
            }
            r.lost += last_seq.saturating_sub(seen.len() as u64);
        }
        Task::ResumeStorm {
            group,
            last_seq,
            behind,
        } => {
            drop(client);
            let t = Instant::now();
            let token = member_token(key, &spec.run_id, i);
            let Ok(mut fresh) = Client::connect_with(&spec.url, &token, options).await else {
                fail(&mut r, "reconnect");
                return (r, None);
            };
            let from = last_seq.saturating_sub(behind);
            if fresh.resume(&[(group, from)]).await.is_err() {
                fail(&mut r, "resume");
                return (r, Some(fresh));
            }
            let mut seen = HashSet::new();
            let caught_up = tokio::time::timeout(DRAIN, async {
                while let Some(event) = fresh.next_event().await {
                    if let Event::Message(m) = event
                        && m.group_id == group
                    {
                        seen.insert(m.seq);
                        if m.seq >= last_seq {
                            return true;
                        }
                    }
                }
                false
            })
            .await;
            if caught_up == Ok(true) {
                recorder.latency(micros(t.elapsed()));
            } else {
                r.lost += last_seq - from - seen.len() as u64;
            }
            r.ops += seen.len() as u64;
            return (r, Some(fresh));
        }
    }
    (r, Some(client))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member whose task has spent tokio's cooperative budget by the
    /// time it first waits for the end (a burst of pushes read in one
    /// poll) must still be woken by the end.
    #[tokio::test]
    async fn the_end_wakes_a_member_that_first_waited_with_its_budget_spent() {
        let (end_tx, seq) = oneshot::channel();
        let told = Arc::new(AtomicBool::new(false));
        let mut end = EndOfRun::new(seq, &told);
        let (armed_tx, armed_rx) = oneshot::channel();
        let member = tokio::spawn(async move {
            let (pushes, mut queued) = tokio::sync::mpsc::unbounded_channel();
            for _ in 0..1_000 {
                pushes.send(()).unwrap();
            }
            std::future::poll_fn(|cx| {
                // Read until the budget, not the queue, says stop.
                while queued.poll_recv(cx).is_ready() {}
                assert!(!queued.is_empty(), "the budget stopped the reads");
                let told = std::pin::pin!(end.told());
                assert!(told.poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            armed_tx.send(()).unwrap();
            end.told().await
        });
        armed_rx.await.unwrap();
        // Let the member run out of wake-ups first (the budget's own
        // wake-up included), so that only the end can wake it again.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        told.store(true, Ordering::Release);
        end_tx.send(42).unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(10), member)
            .await
            .expect("the member was never woken by the end");
        assert_eq!(heard.unwrap().unwrap(), 42);
    }
}
