//! WebSocket (RFC 6455), the client's side: the upgrade, masked frames out,
//! the server's frames in.
//!
//! The client reads far more than it writes: a member of a busy group gets
//! a push every few milliseconds and sends now and then. So the read side
//! is kept short:
//!
//! - One task owns the read half (`TcpStream::into_split`, no lock shared
//!   with the writer) and reads into one buffer without zero-filling it:
//!   the client's reader task, or the caller's own with
//!   [`Reading::OnDemand`](crate::Reading::OnDemand).
//! - A whole binary frame is cut out of that buffer as `Bytes` (no copy),
//!   and the client decodes it straight away.
//! - Pings are answered, and the server's close frame is echoed, by the
//!   writing task, told through a small channel of its own: the reader
//!   never waits for a write.
//!
//! A general WebSocket library, with its split lock and stream adapters,
//! cost a load-test worker more CPU per delivery than the decoding did
//! (docs/benchmarks.md, "The client's WebSocket reader").
//!
//! What the client speaks: binary messages (text messages from the server
//! are skipped), fragmented messages, ping, pong and close; no extensions
//! and no subprotocols; `ws://` only (`quic://` is the encrypted transport).

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use qun_proto::close;
use qun_proto::ws_opcode::{
    BINARY as OP_BINARY, CLOSE as OP_CLOSE, CONTINUATION as OP_CONTINUATION, PING as OP_PING,
    PONG as OP_PONG, TEXT as OP_TEXT,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::transport::{Frames, Incoming, OpenFailure, Opened, Outbound, decode_frame};

/// The longest upgrade response head the client reads.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// The most of a refusal's body the client reads and reports.
const MAX_REFUSAL_BODY: usize = 1024;
/// Room made in the read buffer before each read: one read takes dozens
/// of pushes when they queue up.
const READ_CHUNK: usize = 8 * 1024;
/// Client frames and control replies taken per write.
const WRITE_BATCH: usize = 64;
/// Frames the caller may queue before [`crate::Client`] calls wait.
const OUT_QUEUE: usize = 256;

/// Connects to `url` (`ws://host:port/path`), from `local_ip` if given, and
/// upgrades the connection; with `delayed_acks` the reader keeps asking the
/// kernel to delay its acknowledgements ([`crate::ClientOptions::delayed_acks`]).
///
/// # Errors
/// [`OpenFailure::Full`] when the server answers 503 (it is at its
/// connection limit), with its `Retry-After`; otherwise a description of
/// what failed: a URL that is not `ws://`, no address, the connection, or
/// the server's refusal of the upgrade (with its HTTP status and the start
/// of its body).
pub(crate) async fn connect(
    url: &str,
    local_ip: Option<IpAddr>,
    delayed_acks: bool,
) -> Result<Opened, OpenFailure> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or("the URL must start with ws:// (or quic://)")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let server = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let socket = match server {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| e.to_string())?;
    if let Some(ip) = local_ip {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let mut stream = socket.connect(server).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let leftover = upgrade(&mut stream, authority, path).await?;
    let (read, write) = stream.into_split();
    let (out, out_rx) = mpsc::channel::<Outbound>(OUT_QUEUE);
    // Pongs and the close echo: a few at most are ever pending.
    let (control, control_rx) = mpsc::channel::<Control>(8);
    tokio::spawn(write_loop(write, out_rx, control_rx));
    let mut reader = Reader::new(read, leftover, control);
    reader.delayed_acks = delayed_acks;
    reader.delay_acks();
    let incoming = Frames::WebSocket(reader);
    Ok(Opened {
        out,
        incoming,
        quic: None,
    })
}

/// Sends the upgrade request and reads the answer; returns what the server
/// sent after the answer's head.
async fn upgrade(
    stream: &mut TcpStream,
    authority: &str,
    path: &str,
) -> Result<BytesMut, OpenFailure> {
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection during the upgrade".into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(format!("upgrade response head over {MAX_RESPONSE_HEAD} bytes").into());
            }
            Err(e) => return Err(format!("not an HTTP response: {e}").into()),
        };
        let status = response.code.unwrap_or(0);
        if status != 101 {
            let reason = response.reason.unwrap_or("").to_string();
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::trim)
            };
            let body_len = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0usize)
                .min(MAX_REFUSAL_BODY);
            // Only the delay form; a server that gives a date gets no wait.
            let retry_after = header("retry-after")
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_secs);
            // The body says why; it may come in a later segment.
            while buf.len() < head_len + body_len {
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let end = buf.len().min(head_len + body_len);
            let body = String::from_utf8_lossy(&buf[head_len..end]);
            let detail = format!("HTTP {status} {reason}: {}", body.trim());
            if status == 503 {
                return Err(OpenFailure::Full {
                    retry_after,
                    detail,
                });
            }
            return Err(OpenFailure::Other(format!(
                "the server refused the WebSocket upgrade: {detail}"
            )));
        }
        let accept = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|h| h.value);
        if accept != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
            return Err("the server's Sec-WebSocket-Accept does not match the key sent".into());
        }
        buf.advance(head_len);
        return Ok(buf);
    }
}

/// What the reader asks the writer to send.
#[derive(Debug)]
enum Control {
    /// Answer a ping with its payload.
    Pong(Bytes),
    /// Echo the server's close (with its status), then stop writing.
    Close(u16),
}

/// Writes the caller's frames, masked, several per write when they queue
/// up; ends with a close frame when the caller is gone or the server
/// closed.
async fn write_loop(
    mut half: OwnedWriteHalf,
    mut out: mpsc::Receiver<Outbound>,
    mut control: mpsc::Receiver<Control>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut bytes = BytesMut::new();
    let close_code = loop {
        tokio::select! {
            biased;
            c = control.recv() => match c {
                Some(Control::Pong(payload)) => put_frame(&mut bytes, OP_PONG, &payload),
                Some(Control::Close(code)) => break code,
                // The reader is gone: the connection is over.
                None => break close::NORMAL,
            },
            n = out.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    break close::NORMAL; // the caller is gone
                }
                for item in batch.drain(..) {
                    match item {
                        Outbound::Frame(b) => put_frame(&mut bytes, OP_BINARY, &b),
                        Outbound::Text(t) => put_frame(&mut bytes, OP_TEXT, t.as_bytes()),
                    }
                }
            }
        }
        if half.write_all(&bytes).await.is_err() {
            return;
        }
        bytes.clear();
    };
    put_frame(&mut bytes, OP_CLOSE, &close_code.to_be_bytes());
    let _ = half.write_all(&bytes).await;
    let _ = half.shutdown().await;
}

/// Appends one final, masked frame (a client's frames must be masked).
fn put_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    let mut mask = [0u8; 4];
    // Without the OS's randomness the mask is still valid, only guessable.
    let _ = getrandom::fill(&mut mask);
    out.reserve(14 + payload.len());
    out.put_u8(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.put_u8(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.put_u8(0x80 | 126);
        out.put_u16(short);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(len as u64);
    }
    out.put_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// A frame header from the server, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    /// The payload's length.
    len: usize,
    /// The header's own length: 2, 4 or 10 bytes.
    header_len: usize,
}

/// Reads the server frame header at the start of `buf`: `Ok(None)` when it
/// has not wholly arrived, `Err` with the reason when the protocol forbids
/// it (or its payload is over `max`).
fn read_header(buf: &[u8], max: usize) -> Result<Option<Header>, String> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("reserved bits set, and no extension was agreed".into());
    }
    if b1 & 0x80 != 0 {
        return Err("a server's frames must not be masked".into());
    }
    let (len, header_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                (u64::from_be_bytes(n), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let len = match usize::try_from(len) {
        Ok(len) if len <= max => len,
        _ => return Err(format!("a frame of {len} bytes, over the {max}-byte limit")),
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG if fin && len <= 125 => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            return Err("a control frame that is fragmented or over 125 bytes".into());
        }
        _ => return Err(format!("reserved opcode {opcode:#x}")),
    }
    Ok(Some(Header {
        fin,
        opcode,
        len,
        header_len,
    }))
}

/// A fragmented message being gathered.
#[derive(Debug)]
struct Fragments {
    /// A text message: skipped, so its data is not kept.
    text: bool,
    data: BytesMut,
}

/// What [`Reader::take_frame`] found at the start of the buffer.
enum Taken {
    /// The next item.
    Item(Incoming),
    /// Not a whole frame: this many more bytes are needed (0 while even
    /// the header is incomplete).
    Missing(usize),
}

/// The read half of the connection, turning the server's frames into
/// [`Incoming`] items.
pub(crate) struct Reader {
    half: OwnedReadHalf,
    /// Bytes read and not yet taken as frames.
    buf: BytesMut,
    message: Option<Fragments>,
    control: mpsc::Sender<Control>,
    /// The last item (the close) has been returned.
    ended: bool,
    /// Ask again after every read for delayed acknowledgements
    /// ([`crate::ClientOptions::delayed_acks`]).
    delayed_acks: bool,
}

impl Reader {
    /// Reads `half`, starting with the bytes already read (`leftover`);
    /// pongs and the close echo go to `control`.
    fn new(half: OwnedReadHalf, leftover: BytesMut, control: mpsc::Sender<Control>) -> Self {
        Self {
            half,
            buf: leftover,
            message: None,
            control,
            ended: false,
            delayed_acks: false,
        }
    }

    /// With `delayed_acks`, turns the kernel's quick-ACK mode off for the
    /// next read: the mode comes back on its own (whenever the delayed-ACK
    /// timer fires), so this is asked again after every read. Failing, it
    /// leaves the kernel's default, which only costs packets.
    fn delay_acks(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if self.delayed_acks {
            let _ = socket2::SockRef::from(self.half.as_ref()).set_tcp_quickack(false);
        }
    }

    /// The next item; `None` after the connection's end was returned.
    /// Cancel-safe: its only wait is the socket read, which takes nothing
    /// when cancelled, and every frame taken is returned at once.
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        loop {
            if self.ended {
                return None;
            }
            let missing = match self.take_frame() {
                Ok(Taken::Item(item)) => return Some(item),
                Ok(Taken::Missing(n)) => n,
                Err(why) => {
                    tracing::debug!(%why, "closing a connection that broke the WebSocket protocol");
                    return Some(self.end(None, close::PROTOCOL));
                }
            };
            // Room for the rest of a frame whose header has come (a history
            // page can be hundreds of KB: one allocation, not one per
            // read), and at least a chunk.
            let want = missing.max(READ_CHUNK);
            if self.buf.capacity() - self.buf.len() < want {
                self.buf.reserve(want);
            }
            match self.half.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Some(self.end(None, close::NORMAL)),
                Ok(_) => self.delay_acks(),
            }
        }
    }

    /// Takes whole frames from the buffer until one gives an item, or says
    /// how many more bytes the frame at its start needs.
    fn take_frame(&mut self) -> Result<Taken, String> {
        loop {
            let Some(h) = read_header(&self.buf, crate::MAX_SERVER_FRAME)? else {
                return Ok(Taken::Missing(0));
            };
            let whole = h.header_len + h.len;
            if self.buf.len() < whole {
                return Ok(Taken::Missing(whole - self.buf.len()));
            }
            self.buf.advance(h.header_len);
            if h.opcode == OP_BINARY && h.fin && self.message.is_none() {
                // A whole message, the common case (every push): decoded
                // where it lies, then dropped from the buffer. Taking it
                // out as `Bytes` first made the buffer shared, an
                // allocation and two atomic counts per frame.
                let frame = decode_frame(&self.buf[..h.len]);
                self.buf.advance(h.len);
                match frame {
                    Some(frame) => return Ok(Taken::Item(Incoming::Frame(frame))),
                    None => continue,
                }
            }
            let payload = self.buf.split_to(h.len);
            match h.opcode {
                OP_BINARY | OP_TEXT if self.message.is_some() => {
                    return Err("a new message before the fragmented one ended".into());
                }
                OP_TEXT if h.fin => {} // the protocol is binary: skipped
                OP_BINARY | OP_TEXT => {
                    self.message = Some(Fragments {
                        text: h.opcode == OP_TEXT,
                        data: payload,
                    });
                }
                OP_CONTINUATION => {
                    let Some(m) = self.message.as_mut() else {
                        return Err("a continuation frame with no message".into());
                    };
                    if !m.text {
                        if m.data.len() + payload.len() > crate::MAX_SERVER_FRAME {
                            return Err("a fragmented message over the size limit".into());
                        }
                        m.data.extend_from_slice(&payload);
                    }
                    if h.fin
                        && let Some(m) = self.message.take()
                        && !m.text
                        && let Some(frame) = decode_frame(&m.data)
                    {
                        return Ok(Taken::Item(Incoming::Frame(frame)));
                    }
                }
                OP_PING => {
                    // A pong the writer has no room for is skipped: the
                    // next ping gets one.
                    let _ = self.control.try_send(Control::Pong(payload.freeze()));
                }
                OP_CLOSE => {
                    let how = (payload.len() >= 2).then(|| {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        (code, String::from_utf8_lossy(&payload[2..]).into_owned())
                    });
                    let code = how.as_ref().map_or(close::NORMAL, |(c, _)| *c);
                    return Ok(Taken::Item(self.end(how, code)));
                }
                _ => {} // a pong
            }
        }
    }

    /// The connection's last item (`how` the server closed it, if it
    /// said); the writer sends a close with `code` and stops.
    fn end(&mut self, how: Option<(u16, String)>, code: u16) -> Incoming {
        self.ended = true;
        self.buf = BytesMut::new();
        let _ = self.control.try_send(Control::Close(code));
        Incoming::Closed(how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame: final unless `fin` is false, unmasked.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= usize::from(u16::MAX) => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// A reader on one end of a real loopback connection, and the server's
    /// end to write frames into.
    async fn reader_pair() -> (Reader, mpsc::Receiver<Control>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (read, _write) = client.unwrap().into_split();
        let (control, control_rx) = mpsc::channel(8);
        (
            Reader::new(read, BytesMut::new(), control),
            control_rx,
            accepted.unwrap().0,
        )
    }

    /// A server frame to send: an error answer to request `id` saying
    /// `message`, encoded.
    fn encoded(id: u64, message: &str) -> Vec<u8> {
        let frame = qun_proto::error_frame(id, qun_proto::ErrorCode::MalformedFrame, message);
        qun_proto::encode_server_frame(&frame).to_vec()
    }

    /// The request id and message of the error frame `item` must be.
    fn error_of(item: Option<Incoming>) -> (u64, String) {
        let Some(Incoming::Frame(frame)) = item else {
            panic!("expected a frame, got {item:?}");
        };
        match frame.body {
            Some(qun_proto::v1::server_frame::Body::Error(e)) => (frame.request_id, e.message),
            other => panic!("expected an error frame, got {other:?}"),
        }
    }

    /// Whether the kernel would acknowledge the reader's next read at once.
    #[cfg(target_os = "linux")]
    fn quick_acks(reader: &Reader) -> bool {
        socket2::SockRef::from(reader.half.as_ref())
            .tcp_quickack()
            .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_reader_asked_for_delayed_acks_asks_again_after_every_read() {
        let (mut reader, _control, mut server) = reader_pair().await;
        reader.delayed_acks = true;
        reader.delay_acks();
        assert!(!quick_acks(&reader));
        for n in 0..3u8 {
            // What the kernel does when its delayed-ACK timer fires.
            socket2::SockRef::from(reader.half.as_ref())
                .set_tcp_quickack(true)
                .unwrap();
            server
                .write_all(&server_frame(true, OP_BINARY, &encoded(n.into(), "x")))
                .await
                .unwrap();
            assert_eq!(error_of(reader.next().await), (n.into(), "x".into()));
            assert!(!quick_acks(&reader), "after read {n}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_reader_leaves_acks_to_the_kernel_by_default() {
        let (mut reader, _control, mut server) = reader_pair().await;
        server
            .write_all(&server_frame(true, OP_BINARY, &encoded(1, "x")))
            .await
            .unwrap();
        assert_eq!(error_of(reader.next().await), (1, "x".into()));
        assert!(quick_acks(&reader));
    }

    #[tokio::test]
    async fn frames_split_across_reads_fragments_and_pings_are_read_and_non_frames_skipped() {
        let (mut reader, mut control, mut server) = reader_pair().await;
        let fragmented = encoded(2, "fragments");
        let big = "b".repeat(70_000);
        let mut wire = server_frame(true, OP_BINARY, &encoded(1, "one"));
        wire.extend(server_frame(true, OP_TEXT, b"skipped"));
        wire.extend(server_frame(true, OP_BINARY, b"\xff not a server frame"));
        wire.extend(server_frame(false, OP_BINARY, &fragmented[..3]));
        wire.extend(server_frame(true, OP_PING, b"p"));
        wire.extend(server_frame(false, OP_CONTINUATION, &fragmented[3..7]));
        wire.extend(server_frame(true, OP_CONTINUATION, &fragmented[7..]));
        wire.extend(server_frame(true, OP_BINARY, &encoded(3, &big)));
        // Sent a byte at a time at first, so every header is cut somewhere.
        let (slow, fast) = wire.split_at(40);
        let write = async {
            for b in slow {
                server.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            server.write_all(fast).await.unwrap();
        };
        let read = async {
            let one = error_of(reader.next().await);
            let joined = error_of(reader.next().await);
            let last = error_of(reader.next().await);
            (one, joined, last)
        };
        let ((), (one, joined, last)) = tokio::join!(write, read);
        assert_eq!(one, (1, "one".into()));
        assert_eq!(
            joined,
            (2, "fragments".into()),
            "the message that was not a frame is skipped"
        );
        assert_eq!(last, (3, big));
        match control.try_recv() {
            Ok(Control::Pong(p)) => assert_eq!(&p[..], b"p"),
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_close_frame_ends_the_stream_with_its_status_and_is_echoed() {
        let (mut reader, mut control, mut server) = reader_pair().await;
        let mut payload = 1008u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bad token");
        server
            .write_all(&server_frame(true, OP_CLOSE, &payload))
            .await
            .unwrap();
        match reader.next().await {
            Some(Incoming::Closed(Some((1008, reason)))) => assert_eq!(reason, "bad token"),
            other => panic!("expected the close, got {other:?}"),
        }
        assert!(reader.next().await.is_none(), "nothing after the close");
        assert!(matches!(control.try_recv(), Ok(Control::Close(1008))));
    }

    #[tokio::test]
    async fn a_broken_frame_or_a_vanished_server_ends_the_stream_without_a_status() {
        let (mut reader, _control, mut server) = reader_pair().await;
        server
            .write_all(&[0x82, 0x81, 1, 2, 3, 4, 5])
            .await
            .unwrap();
        assert!(matches!(reader.next().await, Some(Incoming::Closed(None))));
        assert!(reader.next().await.is_none());

        let (mut reader, _control, server) = reader_pair().await;
        drop(server);
        assert!(matches!(reader.next().await, Some(Incoming::Closed(None))));
    }

    /// A server that answers the upgrade with `head`, then `body` in a
    /// later segment; returns its URL.
    async fn refusing_server(head: &'static [u8], body: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let _ = s.read(&mut request).await.unwrap();
            s.write_all(head).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            s.write_all(body).await.unwrap();
        });
        url
    }

    /// How `connect` to `url` failed; panics if it did not.
    async fn refusal(url: &str) -> OpenFailure {
        match connect(url, None, false).await {
            Err(failure) => failure,
            Ok(_) => panic!("expected the upgrade to be refused"),
        }
    }

    #[tokio::test]
    async fn a_full_server_is_told_apart_with_its_retry_after_and_body() {
        let url = refusing_server(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 12\r\n\r\n",
            b"server full\n",
        )
        .await;
        match refusal(&url).await {
            OpenFailure::Full {
                retry_after,
                detail,
            } => {
                assert_eq!(retry_after, Some(std::time::Duration::from_secs(7)));
                assert_eq!(detail, "HTTP 503 Service Unavailable: server full");
            }
            other => panic!("expected a full server, got {other:?}"),
        }
        // No Retry-After (or a date, which is not read): no wait is made up.
        let url = refusing_server(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: Fri, 31 Dec 2027 23:59:59 GMT\r\nContent-Length: 4\r\n\r\n",
            b"full",
        )
        .await;
        assert!(matches!(
            refusal(&url).await,
            OpenFailure::Full {
                retry_after: None,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn another_refused_upgrade_reports_the_status_and_the_body_sent_after_the_head() {
        let url = refusing_server(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\n",
            b"not found\n",
        )
        .await;
        match refusal(&url).await {
            OpenFailure::Other(detail) => assert_eq!(
                detail,
                "the server refused the WebSocket upgrade: HTTP 404 Not Found: not found"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn headers_of_each_length_are_read() {
        for n in [0usize, 125, 126, 65_535, 65_536] {
            let f = server_frame(true, OP_BINARY, &vec![7u8; n]);
            let h = read_header(&f, 1 << 20).unwrap().unwrap();
            assert_eq!(h.len, n);
            assert_eq!(h.header_len + n, f.len());
            assert!(h.fin);
            // Every shorter prefix of the header is "not yet".
            for cut in 0..h.header_len {
                assert_eq!(
                    read_header(&f[..cut], 1 << 20),
                    Ok(None),
                    "{n} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn frames_the_protocol_forbids_are_refused() {
        let masked = [0x82, 0x80 | 1, 0, 0, 0, 0, 9];
        assert!(read_header(&masked, 100).unwrap_err().contains("masked"));
        let reserved_bit = [0x80 | 0x40 | OP_BINARY, 0];
        assert!(read_header(&reserved_bit, 100).is_err());
        let reserved_opcode = [0x83, 0];
        assert!(
            read_header(&reserved_opcode, 100)
                .unwrap_err()
                .contains("opcode")
        );
        let fragmented_ping = server_frame(false, OP_PING, b"x");
        assert!(read_header(&fragmented_ping, 100).is_err());
        let big = server_frame(true, OP_BINARY, &[0u8; 101]);
        assert!(
            read_header(&big, 100)
                .unwrap_err()
                .contains("over the 100-byte")
        );
    }

    /// Reads one client frame from the start of `wire`: its first byte
    /// (FIN and opcode), its unmasked payload, and its length on the wire.
    fn client_frame(wire: &[u8]) -> (u8, Vec<u8>, usize) {
        assert_ne!(wire[1] & 0x80, 0, "a client's frame is masked");
        let (len, at) = match wire[1] & 0x7F {
            126 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
            127 => (
                u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize,
                10,
            ),
            l => (usize::from(l), 2),
        };
        let mask = [wire[at], wire[at + 1], wire[at + 2], wire[at + 3]];
        let body = wire[at + 4..at + 4 + len]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        (wire[0], body, at + 4 + len)
    }

    #[test]
    fn a_client_frame_is_masked_and_unmasks_to_its_payload() {
        for n in [0usize, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut out = BytesMut::new();
            put_frame(&mut out, OP_BINARY, &payload);
            let (first, body, size) = client_frame(&out);
            assert_eq!(first, 0x80 | OP_BINARY);
            assert_eq!(body, payload);
            assert_eq!(size, out.len());
        }
    }

    #[tokio::test]
    async fn the_writer_answers_pings_sends_frames_and_closes_when_the_caller_is_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_read, write) = client.unwrap().into_split();
        let mut server = accepted.unwrap().0;
        let (out, out_rx) = mpsc::channel(8);
        let (control, control_rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_loop(write, out_rx, control_rx));

        control
            .send(Control::Pong(Bytes::from_static(b"p")))
            .await
            .unwrap();
        out.send(Outbound::Frame(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        out.send(Outbound::Text("t".into())).await.unwrap();
        drop(out); // the caller is gone: the writer closes
        writer.await.unwrap();
        let mut wire = Vec::new();
        server.read_to_end(&mut wire).await.unwrap(); // ends: the writer shut down

        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let (first, body, size) = client_frame(&wire[at..]);
            frames.push((first, body));
            at += size;
        }
        assert_eq!(
            frames,
            [
                (0x80 | OP_PONG, b"p".to_vec()),
                (0x80 | OP_BINARY, b"hello".to_vec()),
                (0x80 | OP_TEXT, b"t".to_vec()),
                (0x80 | OP_CLOSE, 1000u16.to_be_bytes().to_vec()),
            ]
        );
    }
}
