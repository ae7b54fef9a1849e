//! The two ways to reach a server: WebSocket (`ws://`) and QUIC
//! (`quic://`). Both give the client the same thing: a queue for encoded
//! client frames and a stream of server frames ending with how the
//! connection closed. docs/protocol.md describes both framings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use quinn::crypto::rustls::QuicClientConfig;
use qun_proto::{ServerFrame, decode_server_frame};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::{ClientError, ClientOptions, MAX_SERVER_FRAME};

/// What the client sends.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// An encoded frame (or raw bytes, for protocol tests).
    Frame(Bytes),
    /// A WebSocket text message (for tests; not possible over QUIC).
    Text(String),
}

/// What the client receives.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// One server frame, decoded by the transport that read it (a message
    /// that is not one is skipped there). Boxed: a frame is 256 bytes, and
    /// on its way out of the reader, through `Frames` and the inbox, each
    /// async layer would copy it into its own state, memory of the
    /// connection's that is cold at every push.
    Frame(Box<ServerFrame>),
    /// The connection ended, with the server's close code and reason when
    /// it sent one.
    Closed(Option<(u16, String)>),
}

/// A whole message (a WebSocket message, a QUIC length-prefixed frame) as
/// a server frame; `None` (logged) for one that is not, which the client
/// skips as it skips frames it has no use for.
pub(crate) fn decode_frame(message: &[u8]) -> Option<Box<ServerFrame>> {
    match decode_server_frame(message) {
        Ok(frame) => Some(Box::new(frame)),
        Err(why) => {
            tracing::debug!(%why, len = message.len(), "skipping a message that is not a server frame");
            None
        }
    }
}

/// The server's frames as they arrive, whoever reads them: the client's
/// reader task, or the caller's own with
/// [`Reading::OnDemand`](crate::Reading::OnDemand).
pub(crate) enum Frames {
    /// A WebSocket, read straight from its reader: for a member of a busy
    /// group this is called once per push, so no stream adapter or dynamic
    /// call sits between the caller and the socket.
    WebSocket(crate::websocket::Reader),
    /// QUIC's answers and pushes streams, merged.
    Quic(BoxStream<'static, Incoming>),
}

impl Frames {
    /// The next item; `None` after the connection's end was returned.
    /// Cancel-safe: an item is either returned whole or left unread.
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        match self {
            Frames::WebSocket(reader) => reader.next().await,
            Frames::Quic(stream) => stream.next().await,
        }
    }
}

impl std::fmt::Debug for Frames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Frames::WebSocket(_) => "Frames::WebSocket",
            Frames::Quic(_) => "Frames::Quic",
        })
    }
}

/// An open connection, before `Hello`.
pub(crate) struct Opened {
    pub(crate) out: mpsc::Sender<Outbound>,
    pub(crate) incoming: Frames,
    /// The QUIC endpoint, kept to move the connection to a new socket.
    pub(crate) quic: Option<quinn::Endpoint>,
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub(crate) enum OpenFailure {
    /// The server is at its connection limit.
    Full {
        /// The wait it asked for, if it said.
        retry_after: Option<Duration>,
        /// What it said.
        detail: String,
    },
    /// Anything else, described.
    Other(String),
}

impl From<String> for OpenFailure {
    fn from(detail: String) -> Self {
        OpenFailure::Other(detail)
    }
}

impl From<&str> for OpenFailure {
    fn from(detail: &str) -> Self {
        OpenFailure::Other(detail.to_string())
    }
}

/// Connects to `url`: `ws://…` or `quic://host:port`.
pub(crate) async fn open(url: &str, options: &ClientOptions) -> Result<Opened, ClientError> {
    let opened = match url.strip_prefix("quic://") {
        Some(rest) => open_quic(rest.trim_end_matches('/'), options).await,
        None => crate::websocket::connect(url, options.local_ip, options.delayed_acks).await,
    };
    opened.map_err(|failure| match failure {
        OpenFailure::Full {
            retry_after,
            detail,
        } => ClientError::ServerFull {
            url: url.to_string(),
            retry_after,
            detail,
        },
        OpenFailure::Other(detail) => ClientError::Connect {
            url: url.to_string(),
            detail,
        },
    })
}

/// How the client trusts the server's QUIC certificate.
fn trust_key(options: &ClientOptions) -> Result<Option<[u8; 32]>, String> {
    if options.insecure_dev_cert {
        return Ok(None);
    }
    let Some(hex) = &options.cert_sha256 else {
        return Err(
            "quic:// needs the server certificate's SHA-256 (printed by `qun serve`; \
             --cert-fingerprint) or, for development only, --insecure-dev-cert"
                .into(),
        );
    };
    let hex = hex.trim().replace(':', "").to_ascii_lowercase();
    let bytes: Result<Vec<u8>, _> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect();
    match bytes.ok().and_then(|b| <[u8; 32]>::try_from(b).ok()) {
        Some(pin) => Ok(Some(pin)),
        None => Err(format!(
            "{hex:?} is not a SHA-256 fingerprint (64 hex digits)"
        )),
    }
}

/// Trusts exactly one certificate, by the SHA-256 of its DER (or, with no
/// pin, any certificate: development only). Handshake signatures are
/// still verified, so the server must hold the certificate's key.
#[derive(Debug)]
struct PinnedCert {
    pin: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pin {
            Some(pin) if Sha256::digest(end_entity.as_ref()).as_slice() != pin => {
                Err(rustls::Error::General(
                    "the server's certificate does not match the pinned SHA-256".into(),
                ))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One QUIC client configuration per trust, for the whole process: its
/// TLS session cache lets a reconnect resume the session (one round trip
/// less). 0-RTT is not used: early data could be replayed.
fn quic_config(pin: Option<[u8; 32]>) -> Result<quinn::ClientConfig, String> {
    static CONFIGS: OnceLock<Mutex<HashMap<Option<[u8; 32]>, quinn::ClientConfig>>> =
        OnceLock::new();
    let mut configs = CONFIGS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(c) = configs.get(&pin) {
        return Ok(c.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCert {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![qun_proto::QUIC_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Keeps NAT bindings and the server's idle timer fresh between pings.
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    config.transport_config(Arc::new(transport));
    configs.insert(pin, config.clone());
    Ok(config)
}

/// A local UDP socket suited to reaching `server`.
pub(crate) fn local_socket(server: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let local: SocketAddr = match server {
        SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0",
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(a) if a.ip().is_loopback() => "[::1]:0",
        SocketAddr::V6(_) => "[::]:0",
    }
    .parse()
    .map_err(std::io::Error::other)?;
    std::net::UdpSocket::bind(local)
}

async fn open_quic(authority: &str, options: &ClientOptions) -> Result<Opened, OpenFailure> {
    let config = quic_config(trust_key(options)?)?;
    let server = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let socket = match options.local_ip {
        Some(ip) => std::net::UdpSocket::bind(SocketAddr::new(ip, 0)),
        None => local_socket(server),
    }
    .map_err(|e| e.to_string())?;
    let runtime = quinn::default_runtime().ok_or("no async runtime")?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(|e| e.to_string())?;
    let connection = endpoint
        .connect_with(config, server, host)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| match e {
            // A Qun server refuses a handshake only when it is full
            // (gateway/src/quic.rs, `accept_loop`).
            quinn::ConnectionError::ConnectionClosed(close)
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                OpenFailure::Full {
                    retry_after: None,
                    detail: "QUIC handshake refused: CONNECTION_REFUSED".into(),
                }
            }
            e => OpenFailure::Other(e.to_string()),
        })?;
    let (mut send, answers) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let (out, mut out_rx) = mpsc::channel::<Outbound>(256);
    {
        let connection = connection.clone();
        tokio::spawn(async move {
            while let Some(item) = out_rx.recv().await {
                let Outbound::Frame(frame) = item else {
                    continue; // text messages do not exist over QUIC
                };
                let Ok(len) = u32::try_from(frame.len()) else {
                    continue;
                };
                let mut chunks = [Bytes::copy_from_slice(&len.to_be_bytes()), frame];
                if send.write_all_chunks(&mut chunks).await.is_err() {
                    break;
                }
            }
            // The client is done: deliver what was written, then leave.
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            connection.close(quinn::VarInt::from_u32(1000), b"");
        });
    }
    let pushes = {
        let connection = connection.clone();
        futures_util::stream::once(async move { connection.accept_uni().await.ok() })
            .filter_map(|r| async move { r })
            .flat_map(frames)
    };
    let closed = futures_util::stream::once(async move {
        match connection.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => Incoming::Closed(Some((
                u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX),
                String::from_utf8_lossy(&c.reason).into_owned(),
            ))),
            _ => Incoming::Closed(None),
        }
    });
    let incoming = Frames::Quic(
        futures_util::stream::select(frames(answers), pushes)
            .chain(closed)
            .boxed(),
    );
    Ok(Opened {
        out,
        incoming,
        quic: Some(endpoint),
    })
}

/// The server's frames on one QUIC stream, cut by their length prefix;
/// ends at the stream's end or on an error.
fn frames(recv: quinn::RecvStream) -> BoxStream<'static, Incoming> {
    futures_util::stream::unfold(recv, |mut recv| async move {
        let mut prefix = [0u8; qun_proto::QUIC_LENGTH_PREFIX];
        recv.read_exact(&mut prefix).await.ok()?;
        let size = u32::from_be_bytes(prefix) as usize;
        if size > MAX_SERVER_FRAME {
            return None;
        }
        let mut frame = BytesMut::zeroed(size);
        recv.read_exact(&mut frame).await.ok()?;
        Some((decode_frame(&frame), recv))
    })
    .filter_map(|frame| std::future::ready(frame.map(Incoming::Frame)))
    .boxed()
}
