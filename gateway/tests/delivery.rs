//! Delivery guarantees against the real server: resume, idempotent sends,
//! slow readers, read state, rate limits and liveness.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestServer, code, messages, next_event, no_rate_limits};
use qun_client::{Client, ClientError, ClientOptions, Event, FullBuffer, Reading};
use qun_proto::{ErrorCode, v1};

/// Options for a client that never pings on its own.
fn quiet() -> ClientOptions {
    ClientOptions {
        heartbeat: None,
        ..ClientOptions::default()
    }
}

/// Events until the message with seq `last` of `group`, filling reported
/// gaps by paging forwards; returns every message seq in arrival order.
async fn collect_through(client: &mut Client, group: u64, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        match next_event(client).await {
            Event::Message(m) if m.group_id == group => {
                seqs.push(m.seq);
                if m.seq == last {
                    return seqs;
                }
            }
            Event::Gap {
                group_id,
                after_seq,
                through_seq,
            } if group_id == group => {
                let mut after = after_seq;
                while after < through_seq {
                    let page = client.fetch_range(group, after, 200).await.unwrap();
                    for m in page.messages.iter().filter(|m| m.seq <= through_seq) {
                        seqs.push(m.seq);
                    }
                    after = page.messages.last().unwrap().seq.min(through_seq);
                }
                if through_seq >= last {
                    return seqs;
                }
            }
            Event::OutOfSync { .. } | Event::ReadState(_) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

async fn post_n(agent: &Client, g: u64, n: usize, text: &str) {
    for i in 0..n {
        agent.send(g, &format!("{text} {i}"), None).await.unwrap();
    }
}

#[tokio::test]
async fn a_reconnecting_phone_gets_exactly_what_it_missed_then_live() {
    let dir = tempfile::tempdir().unwrap();
    // A small ring, so most of the gap is read from the store.
    let server = TestServer::start_with(dir.path(), |c| c.recent_ring = 50).await;
    let (agent, g) = server.agent_with_group("Resume", 0).await;
    let mut phone = server.client("ann", "buyer", None).await;
    phone.join(g).await.unwrap();
    post_n(&agent, g, 5, "before").await;
    assert_eq!(messages(&mut phone, 5).await.len(), 5);
    let saved = phone.cursors();
    assert_eq!(saved, [(g, 5)]);
    drop(phone); // the socket drops: a tunnel, a lift, a sleeping app

    post_n(&agent, g, 295, "while away").await;
    let mut phone = server.client("ann", "buyer", None).await;
    let resumed = phone.resume(&saved).await.unwrap();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].error, 0);
    assert_eq!(
        (resumed[0].through_seq, resumed[0].gap_too_large),
        (300, false)
    );
    agent.send(g, "live again", None).await.unwrap();
    let got = collect_through(&mut phone, g, 301).await;
    assert_eq!(got, (6..=301).collect::<Vec<_>>());
    assert_eq!(
        phone.sequencer_stats(),
        (0, 0),
        "the server itself sent no duplicate and no gap"
    );
    assert!(server.metric("qun_catch_up_messages_total").await >= 295);
    server.stop().await;
}

#[tokio::test]
async fn a_gap_over_the_cap_is_said_out_loud_and_paged() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.resume_max_gap = 20).await;
    let (agent, g) = server.agent_with_group("Big gap", 0).await;
    let phone = server.client("ann", "buyer", None).await;
    phone.join(g).await.unwrap();
    drop(phone);
    post_n(&agent, g, 50, "sale").await;
    let mut phone = server.client("ann", "buyer", None).await;
    let resumed = phone.resume(&[(g, 0)]).await.unwrap();
    assert!(resumed[0].gap_too_large);
    assert_eq!(resumed[0].through_seq, 50);
    let gap = next_event(&mut phone).await;
    assert_eq!(
        gap,
        Event::Gap {
            group_id: g,
            after_seq: 0,
            through_seq: 50
        }
    );
    agent.send(g, "live", None).await.unwrap();
    let live = messages(&mut phone, 1).await;
    assert_eq!(live[0].seq, 51, "live continues right after the gap");
    let first = phone.fetch_range(g, 0, 30).await.unwrap();
    assert_eq!(first.messages.len(), 30);
    assert!(first.has_more);
    let rest = phone.fetch_range(g, 30, 30).await.unwrap();
    let seqs: Vec<u64> = first
        .messages
        .iter()
        .chain(&rest.messages)
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (1..=51).collect::<Vec<_>>());
    assert!(!rest.has_more);
    assert_eq!(server.metric("qun_resume_gaps_too_large_total").await, 1);
    server.stop().await;
}

#[tokio::test]
async fn resume_refusals_are_per_group_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Mine", 0).await;
    agent.send(g, "hello", None).await.unwrap();
    let mut buyer = server.client("ann", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let other = agent.create_group("Not joined", 0).await.unwrap().group_id;
    let answers = buyer
        .resume(&[(g, 0), (other, 0), (999, 0), (g + 1_000, 0)])
        .await
        .unwrap();
    let codes: Vec<i32> = answers.iter().map(|a| a.error).collect();
    assert_eq!(
        codes,
        [
            0,
            ErrorCode::NotMember as i32,
            ErrorCode::UnknownGroup as i32,
            ErrorCode::UnknownGroup as i32
        ]
    );
    assert_eq!(buyer.cursors(), [(g, 0)], "refused groups are not followed");
    let beyond = buyer.resume(&[(g, 7)]).await.unwrap();
    assert_eq!(beyond[0].error, ErrorCode::InvalidArgument as i32);
    let twice = buyer.resume(&[(g, 0), (g, 1)]).await;
    assert_eq!(code(twice), ErrorCode::InvalidArgument);
    // The connection is fine after all that.
    buyer.send(g, "still here", None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_retried_send_posts_once_across_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Retries", 0).await;
    let buyer = server.client("ann", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let first = buyer
        .send_with_id(g, "is S size EU 34 or 36?", None, "ann-phone-0001")
        .await
        .unwrap();
    assert!(!first.duplicate);
    // The ack was lost; the phone reconnects and sends again.
    drop(buyer);
    let buyer = server.client("ann", "buyer", None).await;
    let again = buyer
        .send_with_id(g, "is S size EU 34 or 36?", None, "ann-phone-0001")
        .await
        .unwrap();
    assert_eq!(
        (again.seq, again.ts_ms, again.duplicate),
        (first.seq, first.ts_ms, true)
    );
    agent.send(g, "EU 34", Some(first.seq)).await.unwrap();
    drop((agent, buyer));
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let buyer = server.client("ann", "buyer", None).await;
    let after_restart = buyer
        .send_with_id(g, "is S size EU 34 or 36?", None, "ann-phone-0001")
        .await
        .unwrap();
    assert_eq!(
        (after_restart.seq, after_restart.duplicate),
        (first.seq, true)
    );
    let history = buyer.history(g, 0, 50).await.unwrap();
    let texts: Vec<&str> = history.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["is S size EU 34 or 36?", "EU 34"]);
    assert_eq!(server.metric("qun_duplicate_sends_total").await, 1);
    // A message without an id is refused.
    let no_id = buyer
        .send_message(v1::SendMessage {
            group_id: g,
            text: "no id".into(),
            client_msg_id: String::new(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(no_id), ErrorCode::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn a_first_attempt_is_checked_against_recent_ids_only() {
    let dir = tempfile::tempdir().unwrap();
    // Two ids per group in memory: the window soon stops reaching back.
    let server = TestServer::start_with(dir.path(), |c| {
        no_rate_limits(c);
        c.sent_window = 2;
    })
    .await;
    let (_agent, g) = server.agent_with_group("Window", 0).await;
    let buyer = server.client("ann", "buyer", None).await;
    buyer.join(g).await.unwrap();
    let old = buyer
        .send_with_id(g, "old", None, "ann-0001")
        .await
        .unwrap();
    // Fresh ids (`send`) are first attempts: none is looked up in the
    // store's index, though the window has long left the first message.
    for n in 0..5 {
        buyer.send(g, &format!("new {n}"), None).await.unwrap();
    }
    assert_eq!(server.metric("qun_sent_index_reads_total").await, 0);
    // A retry of the old message is found in the index: posted once.
    let retry = buyer
        .send_with_id(g, "old", None, "ann-0001")
        .await
        .unwrap();
    assert_eq!((retry.seq, retry.duplicate), (old.seq, true));
    assert_eq!(server.metric("qun_sent_index_reads_total").await, 1);
    // An id that may have been sent before is looked up too, new or not.
    let recent = buyer
        .send_with_id(g, "recent", None, "ann-0002")
        .await
        .unwrap();
    assert!(!recent.duplicate);
    assert_eq!(server.metric("qun_sent_index_reads_total").await, 2);
    // `text` sent as a first attempt with `id`.
    let first_try = |text: &'static str, id: &str| v1::SendMessage {
        group_id: g,
        text: text.into(),
        client_msg_id: id.into(),
        first_attempt: true,
        ..Default::default()
    };
    // A recent id is caught in memory even when marked a first attempt.
    let first_again = buyer
        .send_message(first_try("recent", "ann-0002"))
        .await
        .unwrap();
    assert_eq!((first_again.seq, first_again.duplicate), (recent.seq, true));
    // An old id wrongly marked a first attempt is not looked up: the
    // sender's word is taken, and the message is posted again (the
    // protocol tells clients to mark only fresh ids).
    let wrongly_first = buyer
        .send_message(first_try("old", "ann-0001"))
        .await
        .unwrap();
    assert!(!wrongly_first.duplicate);
    assert!(wrongly_first.seq > recent.seq);
    assert_eq!(server.metric("qun_sent_index_reads_total").await, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_phone_never_slows_the_group_and_catches_up_completely() {
    // The phone buffers 4 events, then stops reading its socket.
    stalled_phone_catches_up(ClientOptions {
        event_buffer: 4,
        heartbeat: None,
        full_buffer: FullBuffer::Backpressure,
        ..ClientOptions::default()
    })
    .await;
}

#[tokio::test]
async fn a_client_reading_on_demand_stalls_like_a_phone_and_catches_up_completely() {
    // Read on demand, a client that does not call `next_event` does not
    // read its socket at all.
    stalled_phone_catches_up(ClientOptions {
        heartbeat: None,
        reading: Reading::OnDemand,
        ..ClientOptions::default()
    })
    .await;
}

/// A phone (`stalled`, with `options`) stops reading while 10,000 large
/// messages are posted: the group does not wait for it, its outbox stays
/// bounded, and once it reads again it ends with every message once.
async fn stalled_phone_catches_up(options: ClientOptions) {
    const TOTAL: u64 = 10_000;
    const OUTBOX_BYTES: usize = 1024 * 1024;
    // Sends in flight at once: one group commit publishes at most this many
    // messages in one burst, which a reading phone's outbox must absorb.
    const IN_FLIGHT: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| {
        no_rate_limits(c);
        c.outbox_max_frames = 256;
        c.outbox_max_bytes = OUTBOX_BYTES;
    })
    .await;
    let (agent, g) = server.agent_with_group("Flash sale", 0).await;
    let mut stalled = server.client_with("slow", "buyer", None, options).await;
    stalled.join(g).await.unwrap();
    let mut fast = server.client("fast", "buyer", None).await;
    fast.join(g).await.unwrap();
    let fast_reader = tokio::spawn(async move {
        let got = messages(&mut fast, TOTAL as usize).await;
        (fast, got)
    });

    // 10,000 messages of 3 KB: far more than the socket buffers and the
    // outbox of the stalled phone hold.
    let text = "x".repeat(3_000);
    let agent = std::sync::Arc::new(agent);
    let mut posted = 0;
    while posted < TOTAL {
        let batch: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let agent = agent.clone();
                let text = text.clone();
                async move { agent.send(g, &text, None).await.unwrap() }
            })
            .collect();
        futures_util::future::join_all(batch).await;
        posted += IN_FLIGHT;
    }
    // The other member got all of them, in order, while the phone stalled.
    let (fast, got) = fast_reader.await.unwrap();
    assert_eq!(got.len() as u64, TOTAL);
    assert!(got.iter().zip(1..).all(|(m, seq)| m.seq == seq));
    assert_eq!(fast.sequencer_stats(), (0, 0));
    // The stalled connection was cut off at its bound, not allowed to grow.
    // (The out-of-sync notice itself waits behind the full socket.)
    assert!(server.metric("qun_deliveries_dropped_total").await >= 1);
    let peak = server.metric("qun_outbox_peak_bytes").await;
    assert!(peak <= OUTBOX_BYTES as u64, "outbox peaked at {peak} bytes");

    // It reads again: told out of sync, it resumes and ends complete.
    let seqs = collect_through(&mut stalled, g, TOTAL).await;
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "no duplicate");
    assert_eq!(sorted, (1..=TOTAL).collect::<Vec<_>>(), "no gap");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_events_still_gets_its_answers_and_then_resumes() {
    never_reads_events_then_resumes(Reading::Background).await;
}

#[tokio::test]
async fn read_on_demand_a_request_keeps_a_bounded_number_of_pushes_then_resumes() {
    never_reads_events_then_resumes(Reading::OnDemand).await;
}

/// A server with an agent's group, and buyer `ann` joined to it on a
/// connection with `options`: (server, agent, group, buyer).
async fn busy_group_with_a_buyer(
    dir: &std::path::Path,
    options: ClientOptions,
) -> (TestServer, Client, u64, Client) {
    let server = TestServer::start(dir).await;
    let (agent, g) = server.agent_with_group("Busy", 0).await;
    let buyer = server.client_with("ann", "buyer", None, options).await;
    buyer.join(g).await.unwrap();
    (server, agent, g, buyer)
}

/// A client with room for 8 events makes a request behind 100 pushes it
/// has not read: it gets its answer, and then every push once, in order.
async fn never_reads_events_then_resumes(reading: Reading) {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, g, mut buyer) = busy_group_with_a_buyer(
        dir.path(),
        ClientOptions {
            event_buffer: 8,
            reading,
            ..ClientOptions::default()
        },
    )
    .await;
    // Far more pushes than its buffer, none read; requests still answer.
    post_n(&agent, g, 100, "promo").await;
    let page = buyer.history(g, 0, 10).await.unwrap();
    assert_eq!(page.messages.last().unwrap().seq, 100);
    // Reading now: the dropped pushes are recovered, each once, in order.
    let mut out_of_sync = false;
    let mut seqs = Vec::new();
    while seqs.last() != Some(&100) {
        match next_event(&mut buyer).await {
            Event::Message(m) if m.group_id == g => seqs.push(m.seq),
            Event::OutOfSync { dropped } => out_of_sync = dropped > 0,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    // Over the buffer, pushes were dropped and the client resumed.
    assert!(out_of_sync);
    server.stop().await;
}

#[tokio::test]
async fn read_on_demand_requests_keep_the_pushes_they_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, g, mut buyer) = busy_group_with_a_buyer(
        dir.path(),
        ClientOptions {
            reading: Reading::OnDemand,
            ..ClientOptions::default()
        },
    )
    .await;
    // Nothing reads the socket but the requests: each reads up to its own
    // answer and keeps the pushes that came before it.
    post_n(&agent, g, 30, "first").await;
    let page = buyer.history(g, 0, 10).await.unwrap();
    assert_eq!(page.messages.last().unwrap().seq, 30);
    post_n(&agent, g, 30, "second").await;
    buyer.ping().await.unwrap();
    assert!(buyer.clock_offset_ms().is_some());
    post_n(&agent, g, 30, "third").await;
    // Every push once, in order: the kept ones, then those still unread.
    let seqs = collect_through(&mut buyer, g, 90).await;
    assert_eq!(seqs, (1..=90).collect::<Vec<_>>());
    assert_eq!(buyer.sequencer_stats(), (0, 0));
    // The server goes away: the last event says so, then nothing, and a
    // request is refused as closed rather than left waiting.
    server.stop().await;
    loop {
        match next_event(&mut buyer).await {
            Event::Closed { .. } => break,
            Event::GoingAway { .. } => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(buyer.next_event().await.is_none());
    assert!(matches!(buyer.ping().await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn read_state_follows_the_user_across_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (agent, g) = server.agent_with_group("Devices", 0).await;
    let mut phone = server.client("ann", "buyer", None).await;
    let mut pad = server.client("ann", "buyer", None).await;
    let joined = phone.join(g).await.unwrap();
    assert_eq!(joined.unread, 0);
    pad.join(g).await.unwrap();
    post_n(&agent, g, 3, "news").await;
    // Each device gets every message.
    assert_eq!(messages(&mut phone, 3).await.len(), 3);
    assert_eq!(messages(&mut pad, 3).await.len(), 3);
    let marked = phone.mark_read(g, 2).await.unwrap();
    assert_eq!((marked.last_read_seq, marked.unread), (2, 1));
    match next_event(&mut pad).await {
        Event::ReadState(rs) => {
            assert_eq!((rs.group_id, rs.last_read_seq, rs.unread), (g, 2, 1));
        }
        other => panic!("expected ReadState, got {other:?}"),
    }
    let mine = pad.my_groups().await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].last_read_seq, mine[0].unread), (2, 1));
    let unknown = phone.mark_read(999, 1).await;
    assert_eq!(code(unknown), ErrorCode::UnknownGroup);
    server.stop().await;
}

#[tokio::test]
async fn buyers_get_rate_limits_with_a_retry_time_and_staff_never_do() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| {
        // Refills so slow that nothing refills during the test.
        c.buyer_send_rate = 0.001;
        c.buyer_send_burst = 2;
        c.group_buyer_rate = 0.001;
        c.group_buyer_burst = 3;
    })
    .await;
    let (agent, g) = server.agent_with_group("Flash sale", 0).await;
    let mut buyers = Vec::new();
    for name in ["b1", "b2", "b3"] {
        let b = server.client(name, "buyer", None).await;
        b.join(g).await.unwrap();
        buyers.push(b);
    }
    buyers[0].send(g, "1", None).await.unwrap();
    buyers[0].send(g, "2", None).await.unwrap();
    match buyers[0].send(g, "3", None).await {
        Err(ClientError::RateLimited {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(code, ErrorCode::RateLimited as i32);
            assert!(retry_after_ms > 0);
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    buyers[1].send(g, "b2", None).await.unwrap();
    let slowed = buyers[2].send(g, "b3", None).await;
    assert_eq!(code(slowed), ErrorCode::SlowMode);
    for n in 0..30 {
        agent.send(g, &format!("answer {n}"), None).await.unwrap();
    }
    assert_eq!(server.metric("qun_sends_rate_limited_total").await, 2);
    let history = agent.history(g, 0, 200).await.unwrap();
    assert_eq!(
        history.messages.len(),
        33,
        "refused messages were not posted"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_connection_without_hello_is_closed_at_the_hello_deadline_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| {
        c.hello_timeout_ms = 300;
        c.idle_timeout_ms = 10_000;
    })
    .await;
    // Said Hello before the deadline: the deadline no longer applies.
    let hello = server.client_with("h", "buyer", None, quiet()).await;
    let mut mute = Client::connect_unauthenticated(&server.url).await.unwrap();
    match next_event(&mut mute).await {
        Event::Closed { code, reason } => {
            assert_eq!(code, Some(1008));
            assert_eq!(reason, "no Hello in time");
        }
        other => panic!("expected the Hello-deadline close, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        hello.ping().await.unwrap() > 0,
        "still open after the deadline"
    );
    assert_eq!(server.metric("qun_idle_closed_total").await, 0);
    server.stop().await;
}

#[tokio::test]
async fn silent_connections_are_closed_and_heartbeats_keep_them_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.idle_timeout_ms = 1_000).await;
    let mut silent = server.client_with("s", "buyer", None, quiet()).await;
    let mut beating = server
        .client_with(
            "b",
            "buyer",
            None,
            ClientOptions {
                heartbeat: Some(Duration::from_millis(100)),
                ..ClientOptions::default()
            },
        )
        .await;
    assert_eq!(silent.welcome().idle_timeout_ms, 1_000);
    match next_event(&mut silent).await {
        Event::Closed { code, reason } => {
            assert_eq!(code, Some(qun_gateway::IDLE_CLOSE_CODE));
            assert_eq!(reason, "idle timeout");
        }
        other => panic!("expected the idle close, got {other:?}"),
    }
    // Well past the timeout, the heartbeating one still answers.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let server_ms = beating.ping().await.unwrap();
    assert!(server_ms > 0);
    let offset = beating
        .clock_offset_ms()
        .expect("pongs set the clock offset");
    assert!(offset.abs() < 5_000, "same machine, offset {offset} ms");
    assert!(
        tokio::time::timeout(Duration::from_millis(10), beating.next_event())
            .await
            .is_err(),
        "no close event for the heartbeating client"
    );
    assert!(server.metric("qun_idle_closed_total").await >= 1);
    server.stop().await;
}
