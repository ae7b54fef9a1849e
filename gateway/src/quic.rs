//! The QUIC listener (quinn): the same protocol as the WebSocket, for
//! phones that switch networks.
//!
//! # Framing
//! The client opens one bidirectional stream and sends its frames on it;
//! the server answers on the same stream and opens one unidirectional
//! stream for pushes. Every frame on either stream is a 4-byte big-endian
//! length, then that many bytes of protobuf (`ClientFrame` up,
//! `ServerFrame` down), at most `max_frame_bytes`. A frame's meaning never
//! depends on its stream: `request_id` tells answers from pushes. So a push
//! never holds up an answer, or the other way round.
//!
//! # Closing
//! The connection is closed with an application error code equal to the
//! WebSocket close status for the same case ([`crate::transport::close`]),
//! after the streams are finished and what was written has been delivered
//! (so `GoingAway` arrives before the close).
//!
//! # TLS
//! TLS 1.3 with ALPN `qun/1` (rustls, ring). The certificate and key come
//! from `quic_cert`/`quic_key`. Without them, a self-signed development
//! certificate is created in the data dir on first start. Its SHA-256
//! fingerprint is logged and printed, and clients pin it. 0-RTT is off: a
//! replayed early request could post twice. TLS session resumption is on,
//! so a reconnect saves a round trip.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{ReadExactError, RecvStream, SendStream, VarInt};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;

use crate::config::Config;
use crate::server::Shared;
use crate::transport::{FrameSink, Inbound, Lane, close};

/// The development certificate and key, in the data dir.
const DEV_CERT: &str = "quic-cert.pem";
const DEV_KEY: &str = "quic-key.pem";

/// How long a closing connection waits for its last frames to be delivered.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Why the QUIC listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// A certificate or key file could not be read, written or parsed.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The certificate and key do not make a TLS configuration (e.g. the
    /// key does not match the certificate).
    #[error("TLS: {0}")]
    Tls(String),
    /// The UDP socket could not be bound or used.
    #[error("cannot listen on {addr} (UDP): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What the server asks of the kernel for each of its QUIC socket's buffers.
///
/// Every client's first packet is padded to 1,200 bytes, and a reconnect
/// storm queues hundreds of them on the one socket at once. Linux's default
/// receive buffer (208 KiB) holds about a hundred; the kernel drops the rest
/// (`RcvbufErrors` in `/proc/net/snmp`), and each dropped phone waits for its
/// retransmit timer, a second at first, before it tries again.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Binds the QUIC socket at `addr` with [`UDP_BUFFER_BYTES`] buffers, or
/// as much as the kernel allows (`net.core.rmem_max`, `net.core.wmem_max`),
/// with a warning naming the setting when that is less.
fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let sock = socket2::SockRef::from(&socket);
    // The kernel caps these silently; what it granted is read back below.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(UDP_BUFFER_BYTES);
    // Linux reports twice what it grants (the rest is its bookkeeping), so
    // a report below the ask means it granted less than half of it.
    let granted = sock.recv_buffer_size()?;
    if granted < UDP_BUFFER_BYTES {
        tracing::warn!(
            asked = UDP_BUFFER_BYTES,
            granted,
            "the kernel capped the QUIC socket's receive buffer: in a reconnect storm it \
             drops handshakes, which then wait a second to retry; raise net.core.rmem_max \
             (sysctl) to at least {UDP_BUFFER_BYTES}"
        );
    }
    Ok(socket)
}

/// The lowercase hex SHA-256 of a certificate (DER): what clients pin.
pub fn fingerprint(cert_der: &[u8]) -> String {
    Sha256::digest(cert_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The certificate chain and key the listener serves.
struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> QuicError {
    QuicError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

impl Identity {
    /// The configured certificate, or the development one (created on
    /// first use).
    fn load_or_create(config: &Config) -> Result<Self, QuicError> {
        let (cert, key) = if config.quic_cert.is_empty() {
            let dir = &config.data_dir;
            std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
            let (cert, key) = (dir.join(DEV_CERT), dir.join(DEV_KEY));
            if !cert.exists() || !key.exists() {
                create_dev_cert(&cert, &key)?;
                tracing::info!(cert = %cert.display(), "created a self-signed development certificate for QUIC");
            }
            (cert, key)
        } else {
            (
                PathBuf::from(&config.quic_cert),
                PathBuf::from(&config.quic_key),
            )
        };
        let certs = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| file_error(&cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(&cert, e))?;
        if certs.is_empty() {
            return Err(file_error(&cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| file_error(&key, e))?;
        Ok(Self { certs, key })
    }
}

fn create_dev_cert(cert: &Path, key: &Path) -> Result<(), QuicError> {
    let names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let made =
        rcgen::generate_simple_self_signed(names).map_err(|e| QuicError::Tls(e.to_string()))?;
    std::fs::write(cert, made.cert.pem()).map_err(|e| file_error(cert, e))?;
    write_private(key, made.key_pair.serialize_pem().as_bytes())
}

/// Writes a key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), QuicError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| file_error(path, e))?;
    file.write_all(bytes).map_err(|e| file_error(path, e))
}

/// A bound QUIC endpoint and the fingerprint of its certificate.
#[derive(Debug)]
pub struct QuicListener {
    pub(crate) endpoint: quinn::Endpoint,
    /// Lowercase hex SHA-256 of the served certificate.
    pub fingerprint: String,
}

impl QuicListener {
    /// Loads (or creates) the certificate and binds the UDP socket of
    /// `config.quic_listen`.
    ///
    /// # Errors
    /// [`QuicError`] naming the file or address at fault.
    pub fn bind(config: &Config) -> Result<Self, QuicError> {
        let identity = Identity::load_or_create(config)?;
        let fingerprint = fingerprint(&identity.certs[0]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(identity.certs, identity.key)
            .map_err(|e| QuicError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![qun_proto::QUIC_ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        // One request stream from the client; it may open nothing else.
        transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
        transport.max_concurrent_uni_streams(VarInt::from_u32(0));
        // The session's own idle timer (close code 4000) acts first.
        let idle = Duration::from_millis(config.idle_timeout_ms) + Duration::from_secs(10);
        transport.max_idle_timeout(idle.try_into().ok());
        server.transport_config(Arc::new(transport));
        // A phone moving from Wi-Fi to cellular keeps its connection.
        server.migration(true);
        let addr = config.quic_listen;
        let socket = bind_udp(addr).map_err(|source| QuicError::Bind { addr, source })?;
        let runtime = quinn::default_runtime().ok_or_else(|| QuicError::Bind {
            addr,
            source: io::Error::other("no async runtime"),
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(|source| QuicError::Bind { addr, source })?;
        Ok(Self {
            endpoint,
            fingerprint,
        })
    }

    /// The UDP address actually bound.
    ///
    /// # Errors
    /// The OS error, if the socket has none.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }
}

/// Accepts QUIC connections until shutdown, under the same connection limit
/// as the WebSocket listener.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let peer = incoming.remote_address();
        let Ok((conn, permit)) = shared.admit(peer) else {
            incoming.refuse();
            continue;
        };
        let span = crate::connection::span(conn, peer, "quic");
        let shared2 = shared.clone();
        shared.tracker.spawn(
            async move {
                serve(incoming, conn, shared2).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Sets up one QUIC connection (handshake, the client's stream, the push
/// stream) and runs its session.
async fn serve(incoming: quinn::Incoming, conn: qun_chat_core::ConnId, shared: Arc<Shared>) {
    let setup = async {
        let connection = incoming.await?;
        let (answers, requests) = connection.accept_bi().await?;
        let pushes = connection.open_uni().await?;
        Ok::<_, quinn::ConnectionError>((connection, answers, requests, pushes))
    };
    let hello_timeout = Duration::from_millis(shared.config.hello_timeout_ms);
    let (connection, answers, requests, pushes) =
        match tokio::time::timeout(hello_timeout, setup).await {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                shared
                    .metrics
                    .connections_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(error = %e, "quic handshake failed");
                return;
            }
            Err(_) => {
                shared
                    .metrics
                    .connections_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!("quic handshake timed out");
                return;
            }
        };
    shared
        .metrics
        .quic_connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let source = frames(requests, shared.config.max_frame_bytes);
    let sink = QuicSink {
        connection,
        answers,
        pushes,
    };
    crate::connection::run(source, sink, conn, shared).await;
}

/// The client's frames, cut out of its stream by their length prefix.
fn frames(recv: RecvStream, max: usize) -> impl Stream<Item = Inbound> + Unpin + Send {
    Box::pin(futures_util::stream::unfold(
        Some(recv),
        move |state| async move {
            let mut recv = state?;
            let mut prefix = [0u8; qun_proto::QUIC_LENGTH_PREFIX];
            match recv.read_exact(&mut prefix).await {
                Ok(()) => {}
                Err(ReadExactError::FinishedEarly(0)) => return Some((Inbound::Closed, None)),
                Err(e) => return Some((ended(e), None)),
            }
            let size = u32::from_be_bytes(prefix) as usize;
            if size > max {
                return Some((Inbound::TooLarge { size, max }, None));
            }
            let mut frame = BytesMut::zeroed(size);
            match recv.read_exact(&mut frame).await {
                Ok(()) => Some((Inbound::Frame(frame.freeze()), Some(recv))),
                Err(e) => Some((ended(e), None)),
            }
        },
    ))
}

/// A read that ended: the client closing is not a failure.
fn ended(e: ReadExactError) -> Inbound {
    match e {
        ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed,
        )) => Inbound::Closed,
        other => Inbound::Failed(other.to_string()),
    }
}

/// The sending side of a QUIC connection: answers on the client's stream,
/// pushes on the server's.
struct QuicSink {
    connection: quinn::Connection,
    answers: SendStream,
    pushes: SendStream,
}

impl QuicSink {
    /// Finishes both streams and waits (briefly) until the client has what
    /// was written.
    async fn finish(&mut self) {
        let _ = self.answers.finish();
        let _ = self.pushes.finish();
        let delivered = async {
            let _ = self.answers.stopped().await;
            let _ = self.pushes.stopped().await;
        };
        let _ = tokio::time::timeout(CLOSE_LINGER, delivered).await;
    }
}

impl FrameSink for QuicSink {
    async fn feed(&mut self, lane: Lane, frame: Bytes) -> io::Result<()> {
        let stream = match lane {
            Lane::Answer => &mut self.answers,
            Lane::Push => &mut self.pushes,
        };
        let len = u32::try_from(frame.len()).map_err(io::Error::other)?;
        // The frame itself is the shared, encoded-once buffer: not copied.
        let mut chunks = [Bytes::copy_from_slice(&len.to_be_bytes()), frame];
        stream
            .write_all_chunks(&mut chunks)
            .await
            .map_err(io::Error::other)
    }

    async fn flush(&mut self) -> io::Result<()> {
        // quinn sends as soon as congestion control allows.
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: String) {
        self.finish().await;
        self.connection.close(VarInt::from(code), reason.as_bytes());
    }

    async fn shutdown(&mut self) {
        self.finish().await;
        self.connection.close(VarInt::from(close::NORMAL), b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The QUIC socket gets the big receive buffer, as far as this kernel
    /// allows: without it a reconnect storm loses handshakes.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_quic_socket_asks_for_a_big_receive_buffer() {
        let socket = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let granted = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Linux grants min(ask, rmem_max) and reports twice that.
        assert_eq!(granted, 2 * UDP_BUFFER_BYTES.min(cap));
    }
}
