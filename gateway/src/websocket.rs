//! WebSocket (RFC 6455), the server's side, sized for many idle phones.
//!
//! A phone keeps its connection open for hours and sends a frame now and
//! then; the server writes it a push now and then. So an idle connection
//! here holds no buffer at all:
//!
//! - [`WsReader`] reads into a buffer on the stack of the poll that reads
//!   and keeps only the bytes of a frame that has not wholly arrived. Once a
//!   frame is complete, that leftover is freed.
//! - [`WsWriter`] writes each frame as its header (2 to 10 bytes, kept
//!   inline) and the encoded message itself, the same `Bytes` every
//!   recipient of a push shares, in one vectored write per batch: the
//!   payload is never copied into a per-connection write buffer.
//! - The two halves share the socket without a lock (`TcpStream::into_split`).
//!
//! A general WebSocket library keeps a read buffer, a write buffer and a
//! split lock per connection, and the connection's streams wake each other
//! through it: about 0.9 KB per idle connection on this server
//! (docs/benchmarks.md, "Connections").
//!
//! What the server speaks: binary messages (text messages are read and
//! refused by the session), fragmentation, ping (answered with pong), pong,
//! close; no extensions (no compression) and no subprotocols. A client that
//! breaks the protocol (an unmasked frame, a reserved bit or opcode, a bad
//! control frame, a continuation out of place) is closed with status 1002
//! and a reason.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use qun_proto::ws_opcode::{
    BINARY as OP_BINARY, CLOSE as OP_CLOSE, CONTINUATION as OP_CONTINUATION, PING as OP_PING,
    PONG as OP_PONG, TEXT as OP_TEXT,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::transport::{FrameSink, Inbound, Lane, close};

/// The longest upgrade request the server reads (request line and headers).
pub(crate) const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Bytes read from the socket at a time, into a buffer on the stack.
const READ_CHUNK: usize = 8 * 1024;

/// Pending frames up to this many bytes in all, headers included, are
/// written from one buffer on the stack ([`WsWriter::try_write_small`]): a
/// chat push is about 100 bytes.
const SMALL_WRITE: usize = 1024;

/// Why an upgrade request was refused. Each has the HTTP status the client
/// is answered with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The socket failed or closed during the handshake.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The request head is not HTTP.
    #[error("not an HTTP request: {0}")]
    Malformed(#[from] httparse::Error),
    /// The request head is longer than [`MAX_REQUEST_HEAD`].
    #[error("request head over {MAX_REQUEST_HEAD} bytes")]
    HeadTooLarge,
    /// Not the WebSocket path.
    #[error("not found: {0}")]
    NotFound(String),
    /// A method other than GET.
    #[error("method {0} is not GET")]
    Method(String),
    /// Not a WebSocket upgrade (missing `Upgrade`, `Connection` or key).
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(&'static str),
    /// A WebSocket version other than 13.
    #[error("unsupported WebSocket version {0:?}")]
    Version(String),
    /// The server already holds as many connections as it admits.
    #[error("server full: all {limit} connections in use")]
    Full {
        /// Connections admitted at most.
        limit: u64,
        /// Seconds the client is told to wait (`Retry-After`).
        retry_after_s: u64,
    },
}

impl HandshakeError {
    /// The HTTP response that tells the client what was wrong, if the
    /// socket is still there to take it.
    fn response(&self, path: &str) -> Option<String> {
        let retry_after;
        let (status, extra, body) = match self {
            Self::Io(_) => return None,
            Self::Malformed(_) => ("400 Bad Request", "", "malformed HTTP request\n".into()),
            Self::HeadTooLarge => (
                "431 Request Header Fields Too Large",
                "",
                format!("request head over {MAX_REQUEST_HEAD} bytes\n"),
            ),
            Self::NotFound(_) => (
                "404 Not Found",
                "",
                format!("not found; the WebSocket endpoint is {path}\n"),
            ),
            Self::Method(_) => (
                "405 Method Not Allowed",
                "Allow: GET\r\n",
                format!("{self}\n"),
            ),
            Self::NotUpgrade(_) => ("400 Bad Request", "", format!("{self}\n")),
            Self::Version(_) => (
                "426 Upgrade Required",
                "Sec-WebSocket-Version: 13\r\n",
                format!("{self}; this server speaks 13\n"),
            ),
            Self::Full { retry_after_s, .. } => {
                retry_after = format!("Retry-After: {retry_after_s}\r\n");
                (
                    "503 Service Unavailable",
                    retry_after.as_str(),
                    format!("{self}; retry later\n"),
                )
            }
        };
        Some(format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }
}

/// Reads an upgrade request for `path` from `stream` and answers it.
///
/// On success the connection speaks WebSocket: frames from the client are
/// read by the returned [`WsReader`] (refusing any over `max_message`
/// bytes), frames to it written by the [`WsWriter`]. A request that is not
/// a WebSocket upgrade for `path` is answered with an HTTP error status (404
/// for another path, 405 for another method, 426 for another version, 431
/// for a head over [`MAX_REQUEST_HEAD`], 400 otherwise) and returned as the
/// error.
///
/// # Errors
/// [`HandshakeError`]: the socket failed, or the request was refused.
pub(crate) async fn accept(
    mut stream: TcpStream,
    path: &str,
    max_message: usize,
) -> Result<(WsReader, WsWriter), HandshakeError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (key, head_len) = loop {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(refuse(&mut stream, HandshakeError::HeadTooLarge, path).await);
        }
        let room = (MAX_REQUEST_HEAD - head.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        // Parse the first read (garbage is refused at once), then only once
        // the head's blank line has arrived: a client sending a byte at a
        // time does not make the server re-parse the head on every read.
        let first = head.is_empty();
        let seen = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if !first && !head[seen..].windows(4).any(|w| w == b"\r\n\r\n") {
            continue;
        }
        match upgrade_key(&head, path) {
            Ok(Some(found)) => break found,
            Ok(None) => {}
            Err(e) => return Err(refuse(&mut stream, e, path).await),
        }
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    // A client may send its first frames right behind the request.
    let early = head.split_off(head_len);
    let (read, write) = stream.into_split();
    let reader = WsReader {
        half: read,
        partial: early,
        message: None,
        max: max_message,
        ended: false,
    };
    let writer = WsWriter {
        half: write,
        pending: Vec::new(),
    };
    Ok((reader, writer))
}

/// The wait a full server asks of the `refused`-th connection it turns
/// away: 3 to 8 seconds, in turn, so that a crowd turned away in the same
/// second (a flash sale's) does not all come back in the same second.
pub(crate) fn retry_after_s(refused: u64) -> u64 {
    RETRY_AFTER_MIN_S + refused % RETRY_AFTER_SPREAD_S
}

/// The shortest wait a full server asks for.
const RETRY_AFTER_MIN_S: u64 = 3;
/// How many different waits it spreads refusals over, a second apart.
const RETRY_AFTER_SPREAD_S: u64 = 6;

/// Answers a connection the server has no room for with 503 and
/// `Retry-After: retry_after_s`, within `grace`. The request head is read
/// first: closing a socket with an unread request resets it, and the reset
/// can reach the client before the answer does.
pub(crate) async fn refuse_full(
    mut stream: TcpStream,
    limit: u64,
    retry_after_s: u64,
    grace: Duration,
) {
    let _ = tokio::time::timeout(grace, async {
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while head.len() < MAX_REQUEST_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let full = HandshakeError::Full {
            limit,
            retry_after_s,
        };
        refuse(&mut stream, full, "").await;
    })
    .await;
}

/// Answers a refused upgrade with its HTTP status, best effort.
async fn refuse(stream: &mut TcpStream, e: HandshakeError, path: &str) -> HandshakeError {
    if let Some(response) = e.response(path) {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
    e
}

/// The `Sec-WebSocket-Key` of a complete upgrade request for `path`, with
/// the request head's length; `None` while the head is incomplete.
fn upgrade_key(head: &[u8], path: &str) -> Result<Option<(String, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = request.parse(head)? else {
        return Ok(None);
    };
    let method = request.method.unwrap_or_default();
    if method != "GET" {
        return Err(HandshakeError::Method(method.to_string()));
    }
    let target = request.path.unwrap_or_default();
    let target_path = target.split('?').next().unwrap_or_default();
    if target_path != path {
        return Err(HandshakeError::NotFound(target.to_string()));
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") {
        return Err(HandshakeError::NotUpgrade("no `Upgrade: websocket`"));
    }
    if !has_token("Connection", "upgrade") {
        return Err(HandshakeError::NotUpgrade("no `Connection: Upgrade`"));
    }
    match header("Sec-WebSocket-Version") {
        Some(v) if v == "13" => {}
        other => return Err(HandshakeError::Version(other.unwrap_or_default())),
    }
    let Some(key) = header("Sec-WebSocket-Key").filter(|k| !k.is_empty()) else {
        return Err(HandshakeError::NotUpgrade("no `Sec-WebSocket-Key`"));
    };
    Ok(Some((key, len)))
}

/// The reading half of a WebSocket connection: a stream of [`Inbound`]
/// items, one per client message (or control frame).
///
/// It ends after the peer's close, a protocol error, an oversized message
/// or a failed read, each of which is reported as its last item.
#[derive(Debug)]
pub(crate) struct WsReader {
    half: OwnedReadHalf,
    /// Bytes read that do not yet make a whole frame. Empty, and not
    /// allocated, while the phone is idle.
    partial: Vec<u8>,
    /// A fragmented message being gathered (boxed: rare, and the reader
    /// is part of every idle connection's task).
    message: Option<Box<Fragments>>,
    /// The largest message taken, in bytes.
    max: usize,
    /// The last item has been returned.
    ended: bool,
}

/// The frames of a fragmented message so far.
#[derive(Debug)]
struct Fragments {
    /// A text message: only its size is kept, as the session refuses it.
    text: bool,
    /// The payload so far (binary messages).
    data: Vec<u8>,
    /// Its size so far.
    len: usize,
}

/// A frame header, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    /// The payload's length.
    len: u64,
    mask: [u8; 4],
    /// The header's own length: 6, 8 or 14 bytes.
    header_len: usize,
}

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
enum HeaderRead {
    /// Not a whole header yet.
    Incomplete,
    /// A header.
    Header(Header),
    /// A frame the protocol forbids, and why.
    Invalid(&'static str),
}

/// Reads the frame header at the start of `buf` (a client's: masked).
fn read_header(buf: &[u8]) -> HeaderRead {
    let [b0, b1, ..] = *buf else {
        return HeaderRead::Incomplete;
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0 {
        return HeaderRead::Invalid("reserved bits set, and no extension was agreed");
    }
    if b1 & 0x80 == 0 {
        return HeaderRead::Invalid("a client's frames must be masked");
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return HeaderRead::Incomplete,
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                let len = u64::from_be_bytes(n);
                if len >> 63 != 0 {
                    return HeaderRead::Invalid("payload length's top bit set");
                }
                (len, 10)
            }
            None => return HeaderRead::Incomplete,
        },
        n => (u64::from(n), 2),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return HeaderRead::Incomplete;
    };
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return HeaderRead::Invalid("a control frame must not be fragmented");
            }
            if len > 125 {
                return HeaderRead::Invalid("a control frame's payload is at most 125 bytes");
            }
            if opcode == OP_CLOSE && len == 1 {
                return HeaderRead::Invalid("a close frame's status needs two bytes");
            }
        }
        _ => return HeaderRead::Invalid("reserved opcode"),
    }
    HeaderRead::Header(Header {
        fin,
        opcode,
        len,
        mask: [mask[0], mask[1], mask[2], mask[3]],
        header_len: at + 4,
    })
}

/// Appends `payload`, unmasked with `mask`, to `out`.
fn unmask_into(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    out.reserve(payload.len());
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        out.extend_from_slice(&v.to_ne_bytes());
    }
    for (b, m) in chunks.remainder().iter().zip(mask) {
        out.push(b ^ m);
    }
}

/// What [`next_item`] made of the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Not a whole frame yet.
    NeedMore,
    /// A frame of `usize` bytes was taken, and gave the item, if any (a
    /// fragment of a message gives none).
    Took(usize, Option<Inbound>),
    /// The connection's last item: nothing after it is read.
    End(Inbound),
}

/// Takes the frame at the start of `buf`, gathering fragments in `message`
/// and refusing messages over `max` bytes.
fn next_item(buf: &[u8], message: &mut Option<Box<Fragments>>, max: usize) -> Step {
    let h = match read_header(buf) {
        HeaderRead::Incomplete => return Step::NeedMore,
        HeaderRead::Invalid(why) => return Step::End(Inbound::Protocol(why)),
        HeaderRead::Header(h) => h,
    };
    let before = message.as_ref().map_or(0, |m| m.len);
    let size = usize::try_from(h.len).unwrap_or(usize::MAX).saturating_add(
        if h.opcode == OP_CONTINUATION {
            before
        } else {
            0
        },
    );
    if size > max {
        return Step::End(Inbound::TooLarge { size, max });
    }
    // `h.len` fits in usize: it is at most `max` here.
    let end = h.header_len + h.len as usize;
    let Some(payload) = buf.get(h.header_len..end) else {
        return Step::NeedMore;
    };
    let unmasked = || {
        let mut out = Vec::new();
        unmask_into(&mut out, payload, h.mask);
        out
    };
    let item = match h.opcode {
        OP_CONTINUATION => {
            let Some(m) = message else {
                return Step::End(Inbound::Protocol("a continuation frame with no message"));
            };
            m.len += payload.len();
            if !m.text {
                unmask_into(&mut m.data, payload, h.mask);
            }
            if !h.fin {
                return Step::Took(end, None);
            }
            let whole = message.take().map(|m| {
                if m.text {
                    Inbound::Text
                } else {
                    Inbound::Frame(Bytes::from(m.data))
                }
            });
            return Step::Took(end, whole);
        }
        OP_TEXT | OP_BINARY => {
            if message.is_some() {
                return Step::End(Inbound::Protocol(
                    "a new message before the fragmented one ended",
                ));
            }
            let text = h.opcode == OP_TEXT;
            if !h.fin {
                *message = Some(Box::new(Fragments {
                    text,
                    data: if text { Vec::new() } else { unmasked() },
                    len: payload.len(),
                }));
                return Step::Took(end, None);
            }
            if text {
                Inbound::Text
            } else {
                Inbound::Frame(Bytes::from(unmasked()))
            }
        }
        OP_CLOSE => return Step::End(Inbound::Closed),
        OP_PING => Inbound::Ping(Bytes::from(unmasked())),
        // A pong answers nothing here, but it is traffic: it keeps the
        // connection from idling out.
        _ => Inbound::Ignore,
    };
    Step::Took(end, Some(item))
}

/// Takes frames from the start of `buf` until one gives an item or what is
/// left is not a whole frame: the bytes taken, and the item with whether it
/// is the connection's last.
fn take_frames(
    buf: &[u8],
    message: &mut Option<Box<Fragments>>,
    max: usize,
) -> (usize, Option<(Inbound, bool)>) {
    let mut at = 0;
    loop {
        match next_item(&buf[at..], message, max) {
            Step::NeedMore => return (at, None),
            Step::Took(n, item) => {
                at += n;
                if let Some(item) = item {
                    return (at, Some((item, false)));
                }
            }
            Step::End(item) => return (at, Some((item, true))),
        }
    }
}

impl WsReader {
    /// The item from the bytes already read, if they hold one.
    fn take_buffered(&mut self) -> Option<Inbound> {
        let (taken, item) = take_frames(&self.partial, &mut self.message, self.max);
        if taken == self.partial.len() {
            // Idle again: hold no buffer.
            self.partial = Vec::new();
        } else {
            self.partial.drain(..taken);
        }
        self.give(item)
    }

    /// Takes what `read` holds: items are returned one at a time, and what
    /// follows the first item is kept for the next call.
    fn take_read(&mut self, read: &[u8]) -> Option<Inbound> {
        if !self.partial.is_empty() {
            self.partial.extend_from_slice(read);
            return self.take_buffered();
        }
        // Straight from the read: only what is left is copied.
        let (taken, item) = take_frames(read, &mut self.message, self.max);
        self.partial.extend_from_slice(&read[taken..]);
        self.give(item)
    }

    /// Returns a taken item, ending the stream after the last one.
    fn give(&mut self, item: Option<(Inbound, bool)>) -> Option<Inbound> {
        match item {
            Some((last, true)) => Some(self.end(last)),
            Some((item, false)) => Some(item),
            None => None,
        }
    }

    fn end(&mut self, last: Inbound) -> Inbound {
        self.ended = true;
        self.partial = Vec::new();
        self.message = None;
        last
    }
}

impl Stream for WsReader {
    type Item = Inbound;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(item) = this.take_buffered() {
                return Poll::Ready(Some(item));
            }
            // The buffer lives only for this poll: an idle connection
            // keeps none.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut this.half).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(this.end(Inbound::Failed(e.to_string()))));
                }
                Poll::Ready(Ok(())) => {}
            }
            let read = buf.filled();
            if read.is_empty() {
                let gone = Inbound::Failed("the peer closed without a close frame".into());
                return Poll::Ready(Some(this.end(gone)));
            }
            if let Some(item) = this.take_read(read) {
                return Poll::Ready(Some(item));
            }
        }
    }
}

/// A frame to write: its header, kept inline, and its payload.
#[derive(Debug)]
struct OutFrame {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
}

impl OutFrame {
    /// A final, unmasked (server) frame.
    fn new(opcode: u8, payload: Bytes) -> Self {
        let mut head = [0u8; 10];
        head[0] = 0x80 | opcode;
        let len = payload.len();
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(short) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self {
            head,
            head_len,
            payload,
        }
    }

    /// Bytes written as they are, with no header: the rest of a frame a
    /// partial write began.
    fn raw(bytes: Bytes) -> Self {
        Self {
            head: [0u8; 10],
            head_len: 0,
            payload: bytes,
        }
    }

    fn close(code: u16, reason: &str) -> Self {
        // A control frame's payload is at most 125 bytes: the status and
        // up to 123 bytes of reason, cut at a character boundary.
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = Vec::with_capacity(2 + cut);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        Self::new(OP_CLOSE, Bytes::from(payload))
    }

    fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }
}

/// The writing half of a WebSocket connection: frames fed are written in
/// one vectored write at the next flush.
#[derive(Debug)]
pub(crate) struct WsWriter {
    half: OwnedWriteHalf,
    /// Frames fed since the last flush.
    pending: Vec<OutFrame>,
}

impl WsWriter {
    /// Writes every pending frame.
    async fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Taken, so an idle connection holds no frame list.
        let mut frames = std::mem::take(&mut self.pending);
        if self.try_write_small(&mut frames) {
            return Ok(());
        }
        let mut slices = Vec::with_capacity(frames.len() * 2);
        for f in &frames {
            slices.push(IoSlice::new(f.head()));
            if !f.payload.is_empty() {
                slices.push(IoSlice::new(&f.payload));
            }
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = self.half.write_vectored(rest).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    /// Writes small frames at once, headers and payloads copied into one
    /// buffer on the stack: one `send` instead of a vectored write, and no
    /// list of slices to allocate. A busy connection's pushes, a few of
    /// about 100 bytes, go this way (docs/benchmarks.md, "twelfth stop").
    /// `true` when all were written; otherwise `frames` holds what is left
    /// (all of them if the socket took nothing, else the rest of the bytes
    /// as one frame with no header of its own).
    fn try_write_small(&mut self, frames: &mut Vec<OutFrame>) -> bool {
        let total: usize = frames
            .iter()
            .map(|f| f.head().len() + f.payload.len())
            .sum();
        if total > SMALL_WRITE {
            return false;
        }
        let mut buf = [0u8; SMALL_WRITE];
        let mut at = 0;
        for f in frames.iter() {
            for part in [f.head(), &f.payload[..]] {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
        match self.half.try_write(&buf[..total]) {
            Ok(n) if n == total => true,
            Ok(n) if n > 0 => {
                // The rest goes the usual way.
                frames.clear();
                frames.push(OutFrame::raw(Bytes::copy_from_slice(&buf[n..total])));
                false
            }
            // Not writable now (or an error, which the usual way meets
            // again and reports).
            _ => false,
        }
    }

    /// Writes the pending frames and a close frame, then ends the sending
    /// direction of the socket.
    async fn close_with(&mut self, code: u16, reason: &str) {
        self.pending.push(OutFrame::close(code, reason));
        let _ = self.write_pending().await;
        let _ = self.half.shutdown().await;
    }
}

impl FrameSink for WsWriter {
    async fn feed(&mut self, _lane: Lane, frame: Bytes) -> io::Result<()> {
        self.pending.push(OutFrame::new(OP_BINARY, frame));
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.write_pending().await
    }

    async fn pong(&mut self, payload: Bytes) -> io::Result<()> {
        self.pending.push(OutFrame::new(OP_PONG, payload));
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: String) {
        self.close_with(code, &reason).await;
    }

    async fn shutdown(&mut self) {
        self.close_with(close::NORMAL, "").await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client's frame: masked, as RFC 6455 requires of clients.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        unmask_into(&mut out, payload, MASK);
        out
    }

    fn take_all(bytes: &[u8], max: usize) -> Vec<Inbound> {
        let mut message = None;
        let mut at = 0;
        let mut items = Vec::new();
        loop {
            match next_item(&bytes[at..], &mut message, max) {
                Step::NeedMore => return items,
                Step::Took(n, item) => {
                    at += n;
                    items.extend(item);
                }
                Step::End(item) => {
                    items.push(item);
                    return items;
                }
            }
        }
    }

    #[test]
    fn headers_of_every_length_encoding_are_read() {
        for len in [0usize, 125, 126, 65_535, 65_536, 100_000] {
            let f = frame(true, OP_BINARY, &vec![7u8; len]);
            let HeaderRead::Header(h) = read_header(&f) else {
                panic!("{len}: no header");
            };
            assert_eq!(h.len, len as u64);
            assert_eq!(h.mask, MASK);
            assert_eq!(h.header_len + len, f.len());
            for cut in 0..h.header_len {
                assert_eq!(
                    read_header(&f[..cut]),
                    HeaderRead::Incomplete,
                    "{len} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn frames_the_protocol_forbids_are_named() {
        let unmasked = [0x82, 0x01, 0x00];
        let rsv = [0xC2, 0x80, 0, 0, 0, 0];
        let reserved_op = [0x83, 0x80, 0, 0, 0, 0];
        let fragmented_ping = [0x09, 0x80, 0, 0, 0, 0];
        let huge_top_bit = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let long_ping = frame(true, OP_PING, &[0u8; 126]);
        let short_close = frame(true, OP_CLOSE, &[3]);
        for (bytes, why) in [
            (&unmasked[..], "masked"),
            (&rsv[..], "reserved bits"),
            (&reserved_op[..], "reserved opcode"),
            (&fragmented_ping[..], "fragmented"),
            (&huge_top_bit[..], "top bit"),
            (&long_ping[..], "125 bytes"),
            (&short_close[..], "two bytes"),
        ] {
            match read_header(bytes) {
                HeaderRead::Invalid(r) => assert!(r.contains(why), "{r} vs {why}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_fragmented_message_is_gathered_and_control_frames_pass_between() {
        let mut bytes = frame(false, OP_BINARY, b"hel");
        bytes.extend(frame(true, OP_PING, b"p"));
        bytes.extend(frame(false, OP_CONTINUATION, b"lo "));
        bytes.extend(frame(true, OP_CONTINUATION, b"phone"));
        bytes.extend(frame(true, OP_PONG, b""));
        bytes.extend(frame(false, OP_TEXT, b"a"));
        bytes.extend(frame(true, OP_CONTINUATION, b"b"));
        bytes.extend(frame(true, OP_CLOSE, &1000u16.to_be_bytes()));
        bytes.extend(frame(true, OP_BINARY, b"after the close"));
        assert_eq!(
            take_all(&bytes, 1024),
            vec![
                Inbound::Ping(Bytes::from_static(b"p")),
                Inbound::Frame(Bytes::from_static(b"hello phone")),
                Inbound::Ignore,
                Inbound::Text,
                Inbound::Closed,
            ]
        );
    }

    #[test]
    fn continuations_out_of_place_break_the_protocol() {
        let stray = frame(true, OP_CONTINUATION, b"x");
        assert!(matches!(take_all(&stray, 64)[..], [Inbound::Protocol(_)]));
        let mut interleaved = frame(false, OP_BINARY, b"x");
        interleaved.extend(frame(true, OP_BINARY, b"y"));
        assert!(matches!(
            take_all(&interleaved, 64)[..],
            [Inbound::Protocol(_)]
        ));
    }

    #[test]
    fn oversized_messages_are_refused_from_the_header_or_by_their_fragments() {
        let whole = frame(true, OP_BINARY, &[0u8; 65]);
        // Only the header is needed to refuse it.
        assert_eq!(
            take_all(&whole[..8], 64),
            vec![Inbound::TooLarge { size: 65, max: 64 }]
        );
        let mut parts = frame(false, OP_BINARY, &[0u8; 40]);
        parts.extend(frame(true, OP_CONTINUATION, &[0u8; 40]));
        assert_eq!(
            take_all(&parts, 64),
            vec![Inbound::TooLarge { size: 80, max: 64 }]
        );
        assert_eq!(
            take_all(&frame(true, OP_BINARY, &[1u8; 64]), 64),
            vec![Inbound::Frame(Bytes::from(vec![1u8; 64]))]
        );
    }

    #[test]
    fn unmasking_matches_byte_by_byte_at_every_length() {
        for len in 0..12 {
            let payload: Vec<u8> = (0..len).map(|i: u8| i.wrapping_mul(31)).collect();
            let mut out = Vec::new();
            unmask_into(&mut out, &payload, MASK);
            let expected: Vec<u8> = payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn server_frames_carry_the_shortest_length_and_a_cut_close_reason() {
        for (len, head) in [(5usize, 2usize), (126, 4), (70_000, 10)] {
            let f = OutFrame::new(OP_BINARY, Bytes::from(vec![0u8; len]));
            assert_eq!(f.head().len(), head);
            assert_eq!(f.head()[0], 0x82);
        }
        let reason = "é".repeat(100);
        let c = OutFrame::close(1008, &reason);
        assert!(c.payload.len() <= 125);
        assert_eq!(&c.payload[..2], &1008u16.to_be_bytes());
        assert!(std::str::from_utf8(&c.payload[2..]).is_ok());
    }

    /// A listener that accepts one upgrade and hands its halves over.
    async fn server(
        max: usize,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<(WsReader, WsWriter), HandshakeError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, "/ws", max).await
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_real_client_talks_to_it_both_ways() {
        let (addr, task) = server(200_000).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
            .await
            .unwrap();
        let (mut reader, mut writer) = task.await.unwrap().unwrap();

        let big = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        client
            .send(Message::Binary(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        client.send(Message::Binary(big.clone())).await.unwrap();
        client
            .send(Message::Ping(Bytes::from_static(b"are you there")))
            .await
            .unwrap();
        assert_eq!(
            reader.next().await,
            Some(Inbound::Frame(Bytes::from_static(b"hi")))
        );
        assert_eq!(reader.next().await, Some(Inbound::Frame(big.clone())));
        assert_eq!(
            reader.next().await,
            Some(Inbound::Ping(Bytes::from_static(b"are you there")))
        );
        // Idle again: no read buffer held.
        assert_eq!(reader.partial.capacity(), 0);

        writer
            .pong(Bytes::from_static(b"are you there"))
            .await
            .unwrap();
        writer.feed(Lane::Push, big.clone()).await.unwrap();
        writer
            .feed(Lane::Answer, Bytes::from_static(b"ok"))
            .await
            .unwrap();
        writer.flush().await.unwrap();
        assert_eq!(writer.pending.capacity(), 0);
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"are you there"))
        );
        assert_eq!(client.next().await.unwrap().unwrap(), Message::Binary(big));
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"ok"))
        );

        writer.close(1008, "no Hello in time".into()).await;
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(CloseFrame { code, reason })) => {
                assert_eq!(u16::from(code), 1008);
                assert_eq!(reason.as_str(), "no Hello in time");
            }
            other => panic!("{other:?}"),
        }
        // The client answers the close (tungstenite writes its answer on
        // the next flush); the reader sees it and ends.
        let _ = client.flush().await;
        assert_eq!(reader.next().await, Some(Inbound::Closed));
        assert_eq!(reader.next().await, None);
    }

    /// Small frames go out copied into one buffer, bigger batches as
    /// slices; with a client that reads late, the socket fills, so writes
    /// also meet a full socket and stop part-way. Every frame must still
    /// arrive whole and in order.
    #[tokio::test]
    async fn frames_written_into_a_filling_socket_arrive_whole_and_in_order() {
        const FRAMES: u32 = 40_000;
        let (addr, task) = server(1024).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
            .await
            .unwrap();
        let (_reader, mut writer) = task.await.unwrap().unwrap();
        let payload = |i: u32| {
            // 4 to 403 bytes: one to three per flush stay under
            // SMALL_WRITE, five of the longer ones go over it.
            let mut p = i.to_be_bytes().to_vec();
            p.resize(4 + (i as usize * 7) % 400, i as u8);
            Bytes::from(p)
        };
        let writing = tokio::spawn(async move {
            let mut i = 0;
            let mut flush = 0;
            while i < FRAMES {
                let batch = [1, 2, 3, 5][flush % 4].min(FRAMES - i);
                for _ in 0..batch {
                    writer.feed(Lane::Push, payload(i)).await.unwrap();
                    i += 1;
                }
                writer.flush().await.unwrap();
                flush += 1;
            }
            writer
        });
        // Let the socket fill before reading.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for i in 0..FRAMES {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(got) => assert_eq!(got, payload(i), "frame {i}"),
                other => panic!("frame {i}: {other:?}"),
            }
        }
        let writer = writing.await.unwrap();
        assert!(writer.pending.is_empty());
    }

    #[tokio::test]
    async fn frames_split_across_reads_or_sharing_one_are_each_taken_once() {
        let (addr, task) = server(1024).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        // Three frames in one write, straight behind the request.
        let mut three = frame(true, OP_BINARY, b"one");
        three.extend(frame(true, OP_BINARY, b"two"));
        three.extend(frame(true, OP_BINARY, b"three"));
        tcp.write_all(&three).await.unwrap();
        let (mut reader, _writer) = task.await.unwrap().unwrap();
        let mut response = vec![0u8; 129];
        tcp.read_exact(&mut response).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        // RFC 6455's own example key and answer.
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        for want in ["one", "two", "three"] {
            assert_eq!(
                reader.next().await,
                Some(Inbound::Frame(Bytes::copy_from_slice(want.as_bytes())))
            );
        }
        assert_eq!(reader.partial.capacity(), 0);
        // One frame a byte at a time.
        let slow = frame(true, OP_BINARY, b"slowly");
        let feeding = tokio::spawn(async move {
            for b in slow {
                tcp.write_all(&[b]).await.unwrap();
                tcp.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            tcp
        });
        assert_eq!(
            reader.next().await,
            Some(Inbound::Frame(Bytes::from_static(b"slowly")))
        );
        assert_eq!(reader.partial.capacity(), 0);
        let mut tcp = feeding.await.unwrap();
        // An unmasked frame ends the connection as a protocol error.
        tcp.write_all(&[0x82, 0x01, 0x00]).await.unwrap();
        assert!(matches!(reader.next().await, Some(Inbound::Protocol(_))));
        assert_eq!(reader.next().await, None);
    }

    #[tokio::test]
    async fn an_upgrade_request_sent_a_byte_at_a_time_is_accepted() {
        let (addr, task) = server(1024).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let request = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        for b in request {
            tcp.write_all(&[*b]).await.unwrap();
            tcp.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let upgraded = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        let (mut reader, _writer) = upgraded
            .expect("the upgrade was not seen")
            .unwrap()
            .unwrap();
        let mut status = [0u8; 12];
        tcp.read_exact(&mut status).await.unwrap();
        assert_eq!(&status, b"HTTP/1.1 101");
        tcp.write_all(&frame(true, OP_BINARY, b"hi")).await.unwrap();
        assert_eq!(
            reader.next().await,
            Some(Inbound::Frame(Bytes::from_static(b"hi")))
        );
    }

    /// Sends `request` and returns the status line of the answer.
    async fn status_of(request: &str, path: &str) -> (String, HandshakeError) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let path = path.to_string();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, &path, 1024).await.map(|_| ())
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        let e = task.await.unwrap().expect_err("refused");
        (answer.lines().next().unwrap_or_default().to_string(), e)
    }

    #[tokio::test]
    async fn requests_that_are_not_upgrades_get_an_http_status() {
        let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: a2V5\r\n";
        let cases = [
            (
                format!("GET /chat HTTP/1.1\r\n{upgrade}Sec-WebSocket-Version: 13\r\n\r\n"),
                "404",
            ),
            (
                format!("POST /ws HTTP/1.1\r\n{upgrade}Sec-WebSocket-Version: 13\r\n\r\n"),
                "405",
            ),
            ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), "400"),
            (
                format!("GET /ws HTTP/1.1\r\n{upgrade}Sec-WebSocket-Version: 8\r\n\r\n"),
                "426",
            ),
            ("\u{1}\u{2} nonsense\r\n\r\n".to_string(), "400"),
            (
                format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000)),
                "431",
            ),
        ];
        for (request, status) in cases {
            let (line, e) = status_of(&request, "/ws").await;
            assert!(
                line.starts_with(&format!("HTTP/1.1 {status} ")),
                "{line} for {e}"
            );
        }
        let (_, e) = status_of(&format!("GET /chat HTTP/1.1\r\n{upgrade}\r\n"), "/ws").await;
        assert!(matches!(e, HandshakeError::NotFound(p) if p == "/chat"));
    }
}
