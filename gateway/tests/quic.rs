//! The same protocol over real QUIC on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{TestServer, code, messages, next_event, no_rate_limits};
use qun_client::{Client, ClientError, ClientOptions, Event};
use qun_proto::ErrorCode;

fn seqs(msgs: &[qun_proto::v1::ChatMessage]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn a_chat_over_quic_is_the_chat_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    // The agent on WebSocket, the buyer on QUIC, in one group.
    let (mut agent, g) = server.agent_with_group("Sneaker fans", 0).await;
    agent.join(g).await.unwrap();
    let mut buyer = server.quic_client("ann", "buyer", None).await;
    assert_eq!(buyer.welcome().user_id, "ann");
    let joined = buyer.join(g).await.unwrap();
    assert_eq!(joined.group.unwrap().member_count, 2);
    let q = buyer.send(g, "Is S size EU 34 or 36?", None).await.unwrap();
    let a = agent.send(g, "S is EU 34.", Some(q.seq)).await.unwrap();
    let over_ws = messages(&mut agent, 2).await;
    let over_quic = messages(&mut buyer, 2).await;
    assert_eq!(over_ws, over_quic, "both transports see the same sequence");
    assert_eq!(seqs(&over_quic), [q.seq, a.seq]);
    assert_eq!(over_quic[1].quote.as_ref().unwrap().seq, q.seq);
    // Retries, history and read state work the same.
    let again = buyer.send_with_id(g, "x", None, "fixed-id").await.unwrap();
    let retry = buyer.send_with_id(g, "x", None, "fixed-id").await.unwrap();
    assert_eq!((retry.seq, retry.duplicate), (again.seq, true));
    let page = buyer.history(g, 0, 10).await.unwrap();
    assert_eq!(page.messages.len(), 3);
    assert_eq!(server.metric("qun_quic_connections_total").await, 1);
    drop((agent, buyer));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_changes_its_address_keeps_its_session_with_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), no_rate_limits).await;
    let (agent, g) = server.agent_with_group("Moving phones", 0).await;
    let mut phone = server.quic_client("ann", "buyer", None).await;
    phone.join(g).await.unwrap();
    for i in 1..=20 {
        agent.send(g, &format!("before {i}"), None).await.unwrap();
    }
    let first = messages(&mut phone, 20).await;
    // Wi-Fi to cellular: a new local port, mid-session.
    let moved_to = phone.rebind().unwrap();
    assert_ne!(moved_to.port(), 0);
    for i in 1..=20 {
        agent.send(g, &format!("after {i}"), None).await.unwrap();
    }
    let second = messages(&mut phone, 20).await;
    let all: Vec<u64> = seqs(&first).into_iter().chain(seqs(&second)).collect();
    assert_eq!(all, (1..=40).collect::<Vec<_>>(), "no gap, no duplicate");
    // Still the same authenticated connection: requests work, no new Hello.
    let ack = phone.send(g, "still here", None).await.unwrap();
    assert_eq!(ack.seq, 41);
    assert_eq!(phone.sequencer_stats(), (0, 0));
    drop((agent, phone));
    server.stop().await;
}

#[tokio::test]
async fn bad_frames_over_quic_get_typed_errors_and_the_server_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut buyer = server.quic_client("ann", "buyer", None).await;
    buyer
        .send_raw(Bytes::from_static(b"\xff\xff\xff"))
        .await
        .unwrap();
    match next_event(&mut buyer).await {
        Event::Error { code, .. } => assert_eq!(code, ErrorCode::MalformedFrame as i32),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(buyer.ping().await.is_ok(), "the connection goes on");
    // Over the size limit: FRAME_TOO_LARGE, then the connection is closed
    // with 1009, as over WebSocket.
    let big = Bytes::from(vec![0u8; qun_proto::DEFAULT_MAX_FRAME_BYTES + 1]);
    buyer.send_raw(big).await.unwrap();
    let mut saw_error = false;
    let closed = loop {
        match next_event(&mut buyer).await {
            Event::Error { code, .. } => {
                assert_eq!(code, ErrorCode::FrameTooLarge as i32);
                saw_error = true;
            }
            Event::Closed { code, .. } => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(saw_error);
    assert_eq!(closed, Some(qun_gateway::transport::close::TOO_LARGE));
    // A bad token is refused with its code; the server still serves.
    let refused =
        Client::connect_with(&server.quic_url, "not-a-token", server.quic_options()).await;
    assert_eq!(code(refused), ErrorCode::TokenInvalid);
    let other = server.quic_client("bob", "buyer", None).await;
    assert!(other.ping().await.is_ok());
    drop(other);
    server.stop().await;
}

#[tokio::test]
async fn the_client_refuses_a_certificate_it_did_not_pin() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let token = server.token("ann", "buyer", None);
    let wrong = ClientOptions {
        cert_sha256: Some("00".repeat(32)),
        timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let r = Client::connect_with(&server.quic_url, &token, wrong).await;
    assert!(matches!(r, Err(ClientError::Connect { .. })), "{r:?}");
    let none = Client::connect_with(&server.quic_url, &token, ClientOptions::default()).await;
    match none {
        Err(ClientError::Connect { detail, .. }) => assert!(detail.contains("SHA-256"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let dev = ClientOptions {
        insecure_dev_cert: true,
        ..ClientOptions::default()
    };
    let c = Client::connect_with(&server.quic_url, &token, dev)
        .await
        .unwrap();
    assert!(c.ping().await.is_ok());
    drop(c);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_says_going_away_over_quic_before_closing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut buyer = server.quic_client("ann", "buyer", None).await;
    server.shutdown.cancel();
    let mut saw_going_away = false;
    let code = loop {
        match next_event(&mut buyer).await {
            Event::GoingAway { .. } => saw_going_away = true,
            Event::Closed { code, .. } => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(saw_going_away);
    assert_eq!(code, Some(qun_gateway::transport::close::GOING_AWAY));
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_development_certificate_is_kept_and_a_configured_one_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(dir.path()).await;
    let pin = first.cert_sha256.clone();
    assert_eq!(pin.len(), 64);
    first.stop().await;
    let again = TestServer::start(dir.path()).await;
    assert_eq!(
        again.cert_sha256, pin,
        "a restart keeps the pinned certificate"
    );
    again.stop().await;

    // A configured certificate is served as it is.
    let made = rcgen::generate_simple_self_signed(vec!["qun.example".into()]).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let other = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(other.path(), |c| {
        c.quic_cert = cert.display().to_string();
        c.quic_key = key.display().to_string();
    })
    .await;
    assert_eq!(
        server.cert_sha256,
        qun_gateway::quic::fingerprint(made.cert.der())
    );
    let c = server.quic_client("ann", "buyer", None).await;
    assert!(c.ping().await.is_ok());
    drop(c);
    server.stop().await;
}

#[tokio::test]
async fn a_full_server_refuses_quic_and_websocket_connections_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.max_connections = 1).await;
    let first = server.quic_client("ann", "buyer", None).await;
    let token = server.token("bob", "buyer", None);
    // QUIC: the handshake is refused with the transport's CONNECTION_REFUSED.
    // The client tells it apart from any other failure.
    match Client::connect_with(&server.quic_url, &token, server.quic_options()).await {
        Err(e @ ClientError::ServerFull { .. }) => {
            assert!(e.is_connection_error(), "worth retrying later");
            assert_eq!(e.retry_after(), None, "QUIC's refusal says no wait");
            assert!(e.to_string().contains("CONNECTION_REFUSED"), "{e}");
        }
        Err(e) => panic!("expected a full server, got {e}"),
        Ok(_) => panic!("a second connection must be refused"),
    }
    // WebSocket: HTTP 503 with the limit and Retry-After.
    match Client::connect(&server.url, &token).await {
        Err(ClientError::ServerFull {
            detail,
            retry_after,
            ..
        }) => {
            assert!(detail.contains("HTTP 503"), "{detail}");
            assert!(
                detail.contains("server full: all 1 connections in use"),
                "{detail}"
            );
            let wait = retry_after.expect("a wait to retry after");
            assert!((3..=8).contains(&wait.as_secs()), "{wait:?}");
        }
        Err(e) => panic!("expected a full server, got {e}"),
        Ok(_) => panic!("a second connection must be refused"),
    }
    assert_eq!(server.metric("qun_connections_refused_total").await, 2);
    assert!(first.ping().await.is_ok(), "the admitted one still works");
    drop(first);
    server.stop().await;
}
