//! The client's sequencer against a server that skips messages.
//!
//! A correct Qun server never pushes a group's messages out of order or
//! with a hole, so no test against the real one can reach the client's
//! gap filling. This peer speaks just enough of the protocol over a real
//! WebSocket on loopback to do it: it welcomes the client, pushes
//! messages 1, 4 and 10 of a group, and answers the client's `FetchRange`
//! with 2 and 3 the first time and nothing the second.

#![allow(clippy::unwrap_used)]

use futures_util::{SinkExt as _, StreamExt as _};
use qun_client::proto::{self, client_frame, server_frame::Body};
use qun_client::{Client, ClientOptions, Event, Reading};
use qun_proto::{ServerFrame, decode_client_frame, encode_server_frame};
use tokio_tungstenite::tungstenite::Message;

const GROUP: u64 = 7;

fn message(seq: u64) -> proto::ChatMessage {
    proto::ChatMessage {
        group_id: GROUP,
        seq,
        text: format!("message {seq}"),
        ..Default::default()
    }
}

fn frame(request_id: u64, body: Body) -> Message {
    let frame = ServerFrame {
        request_id,
        body: Some(body),
    };
    Message::Binary(encode_server_frame(&frame))
}

/// Serves one client as described above; returns the `FetchRange`s it
/// was asked, as (after_seq, limit).
async fn skipping_server(listener: tokio::net::TcpListener) -> Vec<(u64, u32)> {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let mut fetches = Vec::new();
    let mut pushed = false;
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Binary(bytes) = msg else {
            continue;
        };
        let request = decode_client_frame(&bytes).unwrap();
        let answer = match request.body.unwrap() {
            client_frame::Body::Hello(_) => Body::Welcome(proto::Welcome {
                protocol_version: qun_proto::PROTOCOL_VERSION,
                user_id: "ann".into(),
                ..Default::default()
            }),
            client_frame::Body::FetchRange(f) => {
                fetches.push((f.after_seq, f.limit));
                // The first hole can be filled, the second cannot.
                let messages = if fetches.len() == 1 {
                    vec![message(2), message(3)]
                } else {
                    Vec::new()
                };
                Body::HistoryPage(proto::HistoryPage {
                    group_id: GROUP,
                    messages,
                    has_more: false,
                })
            }
            other => panic!("unexpected request {other:?}"),
        };
        ws.send(frame(request.request_id, answer)).await.unwrap();
        if !pushed {
            pushed = true;
            for seq in [1, 4, 10] {
                ws.send(frame(0, Body::Message(message(seq))))
                    .await
                    .unwrap();
            }
        }
        if fetches.len() == 2 {
            break;
        }
    }
    // Let the client read the last answer before the socket closes.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    fetches
}

async fn a_gap_is_filled_from_history_or_said_out_loud(reading: Reading) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(skipping_server(listener));
    let options = ClientOptions {
        reading,
        heartbeat: None,
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&url, "any token", options)
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 6 {
        match client.next_event().await.unwrap() {
            Event::Message(m) => got.push(format!("{} {}", m.seq, m.text)),
            Event::Gap {
                group_id,
                after_seq,
                through_seq,
            } => got.push(format!("gap {group_id} {after_seq}..={through_seq}")),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(
        got,
        [
            "1 message 1",
            "2 message 2",
            "3 message 3",
            "4 message 4",
            "gap 7 4..=9",
            "10 message 10",
        ]
    );
    assert_eq!(client.cursors(), [(GROUP, 10)]);
    assert_eq!(client.sequencer_stats(), (0, 2), "two gaps, no duplicate");
    let fetches = server.await.unwrap();
    assert_eq!(fetches.len(), 2);
    assert_eq!(
        (fetches[0].0, fetches[1].0),
        (1, 4),
        "each fetch after the cursor"
    );
}

#[tokio::test]
async fn a_gap_is_filled_from_history_or_said_out_loud_reading_in_the_background() {
    a_gap_is_filled_from_history_or_said_out_loud(Reading::Background).await;
}

#[tokio::test]
async fn a_gap_is_filled_from_history_or_said_out_loud_reading_on_demand() {
    a_gap_is_filled_from_history_or_said_out_loud(Reading::OnDemand).await;
}
