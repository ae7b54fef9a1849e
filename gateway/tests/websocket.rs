//! The server's WebSocket layer (`gateway/src/websocket.rs`) against the real
//! server, driven by tokio-tungstenite as a raw client: what the Qun client
//! library never sends (pings, fragments, broken frames, other paths).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use futures_util::{SinkExt as _, StreamExt as _};
use qun_proto::v1::{self, client_frame, server_frame};
use qun_proto::{ClientFrame, decode_server_frame, encode_client_frame};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

type Ws = WebSocketStream<TcpStream>;

/// A WebSocket to the server over a plain socket the test can also write
/// raw bytes to.
async fn connect(server: &TestServer) -> Ws {
    let addr = server
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws");
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(&server.url, tcp)
        .await
        .unwrap()
        .0
}

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("nothing within 10 s")
        .expect("the connection ended")
        .unwrap()
}

#[tokio::test]
async fn pings_are_answered_and_a_broken_frame_closes_with_1002() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut ws = connect(&server).await;

    ws.send(Message::Ping(Bytes::from_static(b"still there?")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(Bytes::from_static(b"still there?"))
    );

    // An unmasked frame, which a client must never send.
    ws.get_mut().write_all(&[0x82, 0x01, 0x00]).await.unwrap();
    match next(&mut ws).await {
        Message::Close(Some(close)) => {
            assert_eq!(u16::from(close.code), 1002);
            assert!(close.reason.contains("masked"), "{}", close.reason);
        }
        other => panic!("expected a close, got {other:?}"),
    }

    // The server runs on.
    let buyer = server.client("ann", "buyer", None).await;
    assert!(buyer.ping().await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_fragmented_hello_is_one_frame_and_other_paths_get_404() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut ws = connect(&server).await;
    let hello = encode_client_frame(&ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Hello(v1::Hello {
            protocol_version: qun_proto::PROTOCOL_VERSION,
            token: server.token("ann", "buyer", None),
            client_name: "fragments".into(),
        })),
    });
    let (first, rest) = hello.split_at(hello.len() / 2);
    ws.send(Message::Frame(Frame::message(
        Bytes::copy_from_slice(first),
        OpCode::Data(Data::Binary),
        false,
    )))
    .await
    .unwrap();
    // A ping between the fragments is allowed, and answered.
    ws.send(Message::Ping(Bytes::from_static(b"between")))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(
        Bytes::copy_from_slice(rest),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(Bytes::from_static(b"between"))
    );
    let Message::Binary(answer) = next(&mut ws).await else {
        panic!("expected the answer to Hello");
    };
    let answer = decode_server_frame(&answer).unwrap();
    assert_eq!(answer.request_id, 1);
    match answer.body {
        Some(server_frame::Body::Welcome(w)) => assert_eq!(w.user_id, "ann"),
        other => panic!("expected Welcome, got {other:?}"),
    }

    // Another path: a plain HTTP 404 that names the WebSocket endpoint.
    let addr = server
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET /chat HTTP/1.1\r\nHost: qun\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
    assert!(
        response.contains("the WebSocket endpoint is /ws"),
        "{response}"
    );

    // The client library says the same, as a connect error.
    let wrong = server.url.replace("/ws", "/chat");
    match qun_client::Client::connect_unauthenticated(&wrong).await {
        Err(qun_client::ClientError::Connect { detail, .. }) => {
            assert!(detail.contains("HTTP 404"), "{detail}");
            assert!(detail.contains("the WebSocket endpoint is /ws"), "{detail}");
        }
        Err(e) => panic!("expected a connect error, got {e}"),
        Ok(_) => panic!("expected a connect error, got a connection"),
    }
    server.stop().await;
}
