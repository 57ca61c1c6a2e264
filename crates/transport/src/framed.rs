//! Frame reader and writer over any transport.
//!
//! Byte streams (Unix, TCP, named pipe) are decoded with [`FrameDecoder`]; in-process
//! connections pass [`Frame`] values through bounded channels, so payload bytes are never
//! serialised. The writer collects frames and writes them in one batch on
//! [`FrameWriter::flush`], which callers invoke when their queue goes empty.

use crate::error::ReadError;
use crate::large::LARGE_FRAME;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use daemoneye_eventbus_core::codec::{
    AckedDelivery, AckedHead, AckedRun, DecodeCache, GroupDelivery, LEN_PREFIX, LentFrame,
    MessageRun, RunPart, encode_acked_frame, encode_acked_frame_head, encode_acked_run,
    encode_frame_head, encode_group_frame, encode_group_frame_head, encode_message_frame,
    encode_run_as_delivers, encode_run_delivery, kind, max_frame_len,
};
use daemoneye_eventbus_core::{Frame, FrameDecoder, Message, QueueGroup};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Boxed read half of a byte stream.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// Boxed write half of a byte stream.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Capacity of each direction of an in-process connection, in frames.
pub const INPROC_CHANNEL_FRAMES: usize = 4096;
/// Read buffer growth step for byte streams.
const READ_CHUNK: usize = 256 * 1024;
/// The most the read after a large frame takes (see `after_large`).
const HEAD_READ: usize = 4 * 1024;

enum ReaderKind {
    Stream {
        io: BoxRead,
        buf: BytesMut,
        cache: DecodeCache,
        /// A frame of [`LARGE_FRAME`] bytes or more being read into a buffer of its own
        /// ([`crate::large`]), length prefix included.
        large: Option<Vec<u8>>,
        /// The last frame was large: the next read takes at most [`HEAD_READ`] bytes, so the
        /// start of another large frame is not read into `buf` only to be copied out.
        after_large: bool,
        /// A large frame read whole by [`FrameReader::fill`]: its kind and body, decoded by
        /// the next [`FrameReader::next_lent`].
        ready: Option<(u8, Bytes)>,
    },
    InProc {
        rx: mpsc::Receiver<Frame>,
        /// A frame received by [`FrameReader::fill`], returned by the next
        /// [`FrameReader::next_lent`].
        ready: Option<Frame>,
    },
}

/// Reads frames from one connection.
pub struct FrameReader {
    kind: ReaderKind,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub(crate) fn stream(io: BoxRead) -> Self {
        Self {
            kind: ReaderKind::Stream {
                io,
                buf: BytesMut::with_capacity(READ_CHUNK),
                cache: DecodeCache::default(),
                large: None,
                after_large: false,
                ready: None,
            },
            decoder: FrameDecoder::new(max_frame_len(
                daemoneye_eventbus_core::codec::DEFAULT_MAX_MESSAGE_SIZE,
            )),
        }
    }

    pub(crate) fn inproc(rx: mpsc::Receiver<Frame>) -> Self {
        Self {
            kind: ReaderKind::InProc { rx, ready: None },
            decoder: FrameDecoder::new(0),
        }
    }

    /// Copies small frames out of the read buffer into shared chunks rather than one buffer
    /// each ([`DecodeCache::carving`]): for readers handing messages to an application.
    pub fn carve_small_frames(&mut self) {
        if let ReaderKind::Stream { cache, .. } = &mut self.kind {
            *cache = DecodeCache::carving();
        }
    }

    /// Leaves small frames in the read buffer ([`DecodeCache::lending`]): for a reader that
    /// reads with [`FrameReader::fill`] and [`FrameReader::next_lent`], is done with each
    /// frame before reading again, and keeps only copies
    /// ([`daemoneye_eventbus_core::codec::Lent::keep`]). The buffer is then reused in place.
    pub fn lend_small_frames(&mut self) {
        if let ReaderKind::Stream { cache, .. } = &mut self.kind {
            *cache = DecodeCache::lending();
        }
    }

    /// Sets the largest frame accepted, derived from a payload limit.
    pub fn set_max_message_size(&mut self, max_message_size: usize) {
        self.decoder = FrameDecoder::new(max_frame_len(max_message_size));
    }

    /// Returns a frame that is already buffered, without waiting.
    ///
    /// # Errors
    ///
    /// [`ReadError::Frame`] when buffered bytes do not decode.
    pub fn try_read_buffered(&mut self) -> Result<Option<Frame>, ReadError> {
        match &mut self.kind {
            ReaderKind::Stream {
                buf, cache, ready, ..
            } => match ready.take() {
                Some((kind, body)) => Ok(Some(Frame::decode_cached(kind, body, cache)?)),
                None => Ok(self.decoder.decode_cached(buf, cache)?),
            },
            ReaderKind::InProc { rx, ready } => Ok(ready.take().or_else(|| rx.try_recv().ok())),
        }
    }

    /// Waits until at least one whole frame is buffered; `Ok(false)` is a clean end of
    /// stream. Take the frames with [`FrameReader::next_lent`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: partial frames stay in the reader's buffer.
    ///
    /// # Errors
    ///
    /// I/O errors, a length prefix over the limit, or a stream that ends inside a frame.
    pub async fn fill(&mut self) -> Result<bool, ReadError> {
        match &mut self.kind {
            ReaderKind::InProc { rx, ready } => {
                if ready.is_none() {
                    *ready = rx.recv().await;
                }
                Ok(ready.is_some())
            }
            ReaderKind::Stream {
                io,
                buf,
                large,
                after_large,
                ready,
                ..
            } => loop {
                if ready.is_some() {
                    return Ok(true);
                }
                if let Some(frame) = large {
                    if read_large(io, frame, &self.decoder).await? {
                        *after_large = true;
                        let frame = large.take().expect("a large frame is being read");
                        let kind = frame[LEN_PREFIX];
                        let body = crate::large::POOL.share(frame).slice(LEN_PREFIX + 1..);
                        *ready = Some((kind, body));
                    }
                    continue;
                }
                if start_large(buf, large, &self.decoder)? {
                    continue;
                }
                if self.decoder.complete(buf)? {
                    return Ok(true);
                }
                if !read_more(io, buf, after_large).await? {
                    return Ok(false);
                }
            },
        }
    }

    /// The next frame already buffered (see [`FrameReader::fill`]), without waiting; `Ok(None)`
    /// when no whole frame is. With [`FrameReader::lend_small_frames`], a publish borrows the
    /// read buffer until it is dropped.
    ///
    /// # Errors
    ///
    /// [`ReadError::Frame`] when a buffered frame does not decode (after a
    /// [recoverable](daemoneye_eventbus_core::FrameError::is_recoverable) one, the next frame
    /// can be read).
    pub fn next_lent(&mut self) -> Result<Option<LentFrame<'_>>, ReadError> {
        match &mut self.kind {
            ReaderKind::InProc { rx, ready } => Ok(ready
                .take()
                .or_else(|| rx.try_recv().ok())
                .map(LentFrame::owned)),
            ReaderKind::Stream {
                buf, cache, ready, ..
            } => {
                if let Some((kind, body)) = ready.take() {
                    // A large frame has a buffer of its own: nothing of it is lent.
                    let frame = Frame::decode_cached(kind, body, cache)?;
                    return Ok(Some(LentFrame::owned(frame)));
                }
                Ok(self.decoder.decode_lent(buf, cache)?)
            }
        }
    }

    /// Reads the next frame; `Ok(None)` is a clean end of stream.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: partial frames stay in the reader's buffer.
    ///
    /// # Errors
    ///
    /// I/O errors, a malformed frame, or a stream that ends inside a frame.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        match &mut self.kind {
            ReaderKind::InProc { rx, ready } => match ready.take() {
                Some(frame) => Ok(Some(frame)),
                None => Ok(rx.recv().await),
            },
            ReaderKind::Stream {
                io,
                buf,
                cache,
                large,
                after_large,
                ready,
            } => loop {
                if let Some((kind, body)) = ready.take() {
                    return Ok(Some(Frame::decode_cached(kind, body, cache)?));
                }
                if let Some(frame) = large {
                    if read_large(io, frame, &self.decoder).await? {
                        *after_large = true;
                        let frame = large.take().expect("a large frame is being read");
                        let kind = frame[LEN_PREFIX];
                        let body = crate::large::POOL.share(frame).slice(LEN_PREFIX + 1..);
                        return Ok(Some(Frame::decode_cached(kind, body, cache)?));
                    }
                    continue;
                }
                if start_large(buf, large, &self.decoder)? {
                    continue;
                }
                if let Some(frame) = self.decoder.decode_cached(buf, cache)? {
                    return Ok(Some(frame));
                }
                if !read_more(io, buf, after_large).await? {
                    return Ok(None);
                }
            },
        }
    }
}

/// Reads more of a large frame straight into its own buffer; `true` once it is whole.
async fn read_large(
    io: &mut BoxRead,
    frame: &mut Vec<u8>,
    decoder: &FrameDecoder,
) -> Result<bool, ReadError> {
    let whole = decoder.announced(frame)?.unwrap_or_default();
    let want = whole - frame.len();
    if io.read_buf(&mut (&mut *frame).limit(want)).await? == 0 {
        let e = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("stream ended inside a frame of {whole} bytes"),
        );
        return Err(ReadError::Io(e));
    }
    Ok(frame.len() == whole)
}

/// Moves what is buffered of a frame of [`LARGE_FRAME`] bytes or more, once its prefix has
/// arrived, into a buffer of exactly its size; `true` when it did.
fn start_large(
    buf: &mut BytesMut,
    large: &mut Option<Vec<u8>>,
    decoder: &FrameDecoder,
) -> Result<bool, ReadError> {
    match decoder.announced(buf)? {
        Some(whole) if whole >= LARGE_FRAME && buf.len() < whole => {
            let mut frame = crate::large::POOL.take(whole);
            frame.extend_from_slice(buf);
            buf.clear();
            *large = Some(frame);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Reads more bytes into `buf`; `false` at a clean end of stream (nothing buffered).
async fn read_more(
    io: &mut BoxRead,
    buf: &mut BytesMut,
    after_large: &mut bool,
) -> Result<bool, ReadError> {
    // Reuses the buffer in place once no frame lent from it is alive (or, never lent, once
    // the bytes left are fewer than those already read).
    if buf.capacity() - buf.len() < READ_CHUNK / 4 && !buf.try_reclaim(READ_CHUNK / 2) {
        buf.reserve(READ_CHUNK);
    }
    let read = match std::mem::take(after_large) {
        true => io.read_buf(&mut (&mut *buf).limit(HEAD_READ)).await?,
        false => io.read_buf(buf).await?,
    };
    if read == 0 {
        if buf.is_empty() {
            return Ok(false);
        }
        let e = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("stream ended inside a frame ({} bytes buffered)", buf.len()),
        );
        return Err(ReadError::Io(e));
    }
    Ok(true)
}

/// Payloads at least this large are written from their shared buffer with `writev` instead of
/// being copied into the batch buffer.
pub const VECTORED_MIN: usize = 16 * 1024;

/// Runs at least this large are written from their shared buffer with `writev` instead of
/// being copied into the batch buffer: runs are kept below [`VECTORED_MIN`] by their writers,
/// and copying a deep backlog of them grew the batch buffer by megabytes at a time.
pub const RUN_SEGMENT_MIN: usize = 4 * 1024;

/// A byte-stream writer: small frames are encoded into `buf`; large message bodies join the
/// batch as shared segments, so the payload is never copied in user space.
struct StreamOut {
    io: BoxWrite,
    buf: BytesMut,
    segments: std::collections::VecDeque<Bytes>,
    segment_bytes: usize,
    /// Whether `buf` was split into a segment since the last flush (it then shares its
    /// allocation, and is replaced after the flush).
    split: bool,
}

impl StreamOut {
    /// Moves what `buf` holds into the segment list (keeping order with large bodies).
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            let head = self.buf.split().freeze();
            self.segment_bytes += head.len();
            self.segments.push_back(head);
            self.split = true;
        }
    }

    /// A delivery whose body is written from the message's own buffer (no copy).
    fn push_large(&mut self, msg: &Message, group: Option<&GroupDelivery>) {
        let wire = msg.wire();
        match group {
            Some(d) => encode_group_frame_head(&mut self.buf, d, wire.len()),
            None => encode_frame_head(&mut self.buf, kind::DELIVER, wire.len()),
        }
        self.push_body(wire);
    }

    /// Ends the frame head encoded so far with `body`, written from its own buffer.
    fn push_body(&mut self, body: &Bytes) {
        self.seal();
        self.segment_bytes += body.len();
        self.segments.push_back(body.clone());
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.segments.is_empty() {
            if !self.buf.is_empty() {
                self.io.write_all(&self.buf).await?;
                self.buf.clear();
                if self.buf.capacity() > 4 * READ_CHUNK {
                    self.buf = BytesMut::with_capacity(READ_CHUNK);
                }
            }
            return self.io.flush().await;
        }
        self.seal();
        while !self.segments.is_empty() {
            let slices: Vec<io::IoSlice<'_>> = self
                .segments
                .iter()
                .take(64)
                .map(|b| io::IoSlice::new(b))
                .collect();
            let mut n = self.io.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer took no bytes",
                ));
            }
            self.segment_bytes -= n;
            while n > 0 {
                let front = self
                    .segments
                    .front_mut()
                    .expect("written bytes came from segments");
                if n >= front.len() {
                    n -= front.len();
                    self.segments.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        // Every segment is written and gone: a buffer split into segments is unshared again
        // and reused in place (a fresh one would fault its pages in anew), unless a burst
        // grew it past 1 MiB (as after a write without segments).
        if std::mem::take(&mut self.split)
            && !(self.buf.try_reclaim(READ_CHUNK) && self.buf.capacity() <= 4 * READ_CHUNK)
        {
            self.buf = BytesMut::with_capacity(READ_CHUNK);
        }
        self.io.flush().await
    }
}

enum WriterKind {
    Stream(StreamOut),
    InProc {
        tx: mpsc::Sender<Frame>,
        pending: Vec<Frame>,
    },
}

/// Writes frames to one connection in batches.
pub struct FrameWriter {
    kind: WriterKind,
}

impl FrameWriter {
    pub(crate) fn stream(io: BoxWrite) -> Self {
        Self {
            kind: WriterKind::Stream(StreamOut {
                io,
                buf: BytesMut::with_capacity(READ_CHUNK),
                segments: std::collections::VecDeque::new(),
                segment_bytes: 0,
                split: false,
            }),
        }
    }

    pub(crate) fn inproc(tx: mpsc::Sender<Frame>) -> Self {
        Self {
            kind: WriterKind::InProc {
                tx,
                pending: Vec::new(),
            },
        }
    }

    /// Adds a frame to the batch.
    pub fn push(&mut self, frame: &Frame) {
        match &mut self.kind {
            WriterKind::Stream(out) => frame.encode(&mut out.buf),
            WriterKind::InProc { pending, .. } => pending.push(frame.clone()),
        }
    }

    /// Adds a delivery to the chosen member of a queue group.
    pub fn push_group_deliver(&mut self, msg: &Message, group: &QueueGroup) {
        let d = GroupDelivery {
            group: group.clone(),
            message: msg.clone(),
        };
        match &mut self.kind {
            WriterKind::Stream(out) if msg.wire().len() >= VECTORED_MIN => {
                out.push_large(msg, Some(&d));
            }
            WriterKind::Stream(out) => encode_group_frame(&mut out.buf, &d),
            WriterKind::InProc { pending, .. } => pending.push(Frame::DeliverGroup(d)),
        }
    }

    /// Adds a delivery of an acknowledged subscription (protocol 1.3): a large body is written
    /// from the message's own buffer, as for [`FrameWriter::push_deliver`].
    pub fn push_acked_deliver(&mut self, d: &AckedDelivery) {
        match &mut self.kind {
            WriterKind::Stream(out) if d.message.wire().len() >= VECTORED_MIN => {
                let wire = d.message.wire();
                encode_acked_frame_head(&mut out.buf, d.sub, d.seq, d.redelivered, wire.len());
                out.push_body(wire);
            }
            WriterKind::Stream(out) => encode_acked_frame(&mut out.buf, d),
            WriterKind::InProc { pending, .. } => pending.push(Frame::DeliverAcked(d.clone())),
        }
    }

    /// Adds `part` of a run an acknowledged subscription kept, numbered from `head.seq`: one
    /// DELIVER_ACKED_RUN, or DELIVER_ACKED frames for a peer before protocol 1.4 (`runs`
    /// false) ([`encode_acked_run`]).
    pub fn push_acked_run(&mut self, head: AckedHead, run: &MessageRun, part: RunPart, runs: bool) {
        match &mut self.kind {
            WriterKind::Stream(out) => encode_acked_run(&mut out.buf, head, run, part, runs),
            WriterKind::InProc { pending, .. } => pending.push(Frame::DeliverAckedRun(AckedRun {
                head,
                run: run.slice(part),
            })),
        }
    }

    /// Adds a message delivery to the batch (no payload copy for in-process peers).
    pub fn push_deliver(&mut self, msg: &Message) {
        match &mut self.kind {
            WriterKind::Stream(out) if msg.wire().len() >= VECTORED_MIN => {
                out.push_large(msg, None);
            }
            WriterKind::Stream(out) => encode_message_frame(&mut out.buf, kind::DELIVER, msg),
            WriterKind::InProc { pending, .. } => pending.push(Frame::Deliver(msg.clone())),
        }
    }

    /// Adds a run delivery (protocol 1.2): the run's bytes verbatim, written from its shared
    /// buffer when it holds at least [`RUN_SEGMENT_MIN`] bytes. A run of one message goes as
    /// a plain DELIVER, which the subscriber reads with less work.
    pub fn push_deliver_run(&mut self, run: &MessageRun) {
        match &mut self.kind {
            WriterKind::Stream(out)
                if run.wire().len() >= VECTORED_MIN
                    || (run.len() > 1 && run.wire().len() >= RUN_SEGMENT_MIN) =>
            {
                encode_frame_head(&mut out.buf, kind::DELIVER_RUN, run.wire().len());
                out.push_body(run.wire());
            }
            WriterKind::Stream(out) => encode_run_delivery(&mut out.buf, run, true),
            WriterKind::InProc { pending, .. } => pending.push(Frame::DeliverRun(run.clone())),
        }
    }

    /// Adds a run's messages as DELIVER frames, for a peer before protocol 1.2: headers and
    /// payloads are copied verbatim.
    pub fn push_run_as_delivers(&mut self, run: &MessageRun) {
        match &mut self.kind {
            WriterKind::Stream(out) => encode_run_as_delivers(&mut out.buf, run),
            // The decoder checked every entry, so every message reads back.
            WriterKind::InProc { pending, .. } => {
                pending.extend(run.messages().map_while(Result::ok).map(Frame::Deliver))
            }
        }
    }

    /// Appends bytes that already hold complete encoded frames (client publish fast path).
    /// In-process writers decode them back into frames.
    ///
    /// # Errors
    ///
    /// When the bytes are not complete frames (a caller bug).
    pub fn push_encoded(&mut self, bytes: &mut BytesMut) -> Result<(), ReadError> {
        match &mut self.kind {
            WriterKind::Stream(out) => {
                if out.buf.is_empty() {
                    std::mem::swap(&mut out.buf, bytes);
                } else {
                    out.buf.extend_from_slice(bytes);
                    bytes.clear();
                }
                Ok(())
            }
            WriterKind::InProc { pending, .. } => {
                let decoder = FrameDecoder::new(usize::MAX);
                while let Some(frame) = decoder.decode(bytes)? {
                    pending.push(frame);
                }
                Ok(())
            }
        }
    }

    /// Appends raw bytes that continue the frames pushed so far (a payload whose frame head
    /// came through [`FrameWriter::push_encoded`]), written from their own buffer.
    ///
    /// # Errors
    ///
    /// In process, where frames travel as values, raw bytes cannot be sent (a caller bug).
    pub fn push_segment(&mut self, bytes: Bytes) -> Result<(), ReadError> {
        match &mut self.kind {
            WriterKind::Stream(out) => {
                out.seal();
                out.segment_bytes += bytes.len();
                out.segments.push_back(bytes);
                Ok(())
            }
            WriterKind::InProc { .. } => Err(ReadError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "raw segments cannot be sent in process",
            ))),
        }
    }

    /// Bytes (or frames, in process) waiting for [`FrameWriter::flush`].
    pub fn pending(&self) -> usize {
        match &self.kind {
            WriterKind::Stream(out) => out.buf.len() + out.segment_bytes,
            WriterKind::InProc { pending, .. } => pending.len(),
        }
    }

    /// Writes the batch.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a cancelled flush may have written part of the batch.
    ///
    /// # Errors
    ///
    /// I/O errors; in process, a closed peer is `BrokenPipe`.
    pub async fn flush(&mut self) -> io::Result<()> {
        match &mut self.kind {
            WriterKind::Stream(out) => out.flush().await,
            WriterKind::InProc { tx, pending } => {
                for frame in pending.drain(..) {
                    tx.send(frame).await.map_err(|_| {
                        io::Error::new(io::ErrorKind::BrokenPipe, "in-process peer closed")
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Flushes, then shuts down the write direction.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        if let WriterKind::Stream(out) = &mut self.kind {
            out.io.shutdown().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use daemoneye_eventbus_core::codec::{LEN_PREFIX, RunWriter};
    use daemoneye_eventbus_core::{ByteStr, Header, Topic};

    fn run_of(n: usize, size: usize) -> MessageRun {
        let header = Header {
            source: ByteStr::from("p"),
            ..Header::default()
        };
        let mut b = BytesMut::new();
        let mut w = RunWriter::begin(
            &mut b,
            &Topic::new("a.b").unwrap(),
            daemoneye_eventbus_core::Qos::Realtime,
        );
        for i in 0..n {
            w.push(&mut b, &header, &vec![u8::try_from(i).unwrap(); size]);
        }
        match FrameDecoder::new(1 << 20).decode(&mut b) {
            Ok(Some(Frame::PublishRun(r))) => r,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn runs_are_written_from_their_own_buffer_and_the_batch_buffer_is_reused() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::stream(Box::new(a));
        let mut reader = FrameReader::stream(Box::new(b));
        let (small, large) = (run_of(3, 10), run_of(20, 300));
        assert!(large.wire().len() >= RUN_SEGMENT_MIN);
        let WriterKind::Stream(out) = &writer.kind else {
            unreachable!()
        };
        let before = out.buf.as_ptr();
        writer.push(&Frame::Ping(1));
        writer.push_deliver_run(&large);
        writer.push_deliver_run(&small);
        let WriterKind::Stream(out) = &writer.kind else {
            unreachable!()
        };
        // The ping and the large run's head, then the large run's own bytes; the small run
        // is copied into the batch buffer.
        assert_eq!(out.segments.len(), 2);
        assert_eq!(out.segments[1].as_ptr(), large.wire().as_ptr());
        assert_eq!(out.buf.len(), LEN_PREFIX + 1 + small.wire().len());
        writer.flush().await.unwrap();
        let WriterKind::Stream(out) = &writer.kind else {
            unreachable!()
        };
        assert_eq!(out.buf.as_ptr(), before, "reused in place");
        let mut read = Vec::new();
        for _ in 0..3 {
            read.push(reader.read_frame().await.unwrap().unwrap());
        }
        assert_eq!(
            read,
            [
                Frame::Ping(1),
                Frame::DeliverRun(large.clone()),
                Frame::DeliverRun(small.clone())
            ]
        );
        // A burst that grew the batch buffer past 1 MiB does not keep it.
        let n = 4 * READ_CHUNK / small.wire().len() + 1;
        for _ in 0..n {
            writer.push_deliver_run(&small);
        }
        writer.push_deliver_run(&large);
        let drain = async {
            for _ in 0..=n {
                reader.read_frame().await.unwrap().unwrap();
            }
        };
        let (flushed, ()) = tokio::join!(writer.flush(), drain);
        flushed.unwrap();
        let WriterKind::Stream(out) = &writer.kind else {
            unreachable!()
        };
        assert!(out.buf.capacity() <= 4 * READ_CHUNK);
    }

    fn publish(size: usize, fill: u8) -> Frame {
        let payload = Bytes::from(vec![fill; size]);
        Frame::Publish(Message::new(
            Topic::new("a.b").unwrap(),
            Header::default(),
            payload,
        ))
    }

    #[tokio::test]
    async fn large_frames_are_read_into_buffers_of_their_own_between_small_ones() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let mut reader = FrameReader::stream(Box::new(b));
        reader.set_max_message_size(8 << 20);
        // Around the threshold, far past the read buffer and the pool's largest buffer, and
        // small frames before, between and after.
        let sizes = [
            10,
            LARGE_FRAME - 200,
            LARGE_FRAME,
            300 * 1024,
            7,
            3 << 20,
            64 * 1024,
            1,
        ];
        let frames: Vec<Frame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| publish(n, u8::try_from(i).unwrap()))
            .collect();
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        // Written in odd pieces, so frames and their prefixes arrive split.
        let writer = async move {
            for piece in wire.chunks(12_345) {
                a.write_all(piece).await.unwrap();
            }
            drop(a);
        };
        let read = async {
            let mut got = Vec::new();
            while let Some(f) = reader.read_frame().await.unwrap() {
                got.push(f);
            }
            got
        };
        let ((), got) = tokio::join!(writer, read);
        assert_eq!(got, frames);
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_large_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::stream(Box::new(b));
        let mut wire = BytesMut::new();
        publish(200 * 1024, 1).encode(&mut wire);
        a.write_all(&wire[..150 * 1024]).await.unwrap();
        drop(a);
        match reader.read_frame().await {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
