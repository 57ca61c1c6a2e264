//! A Unix stream socket that asks the event loop about writability only while a write waits.
//!
//! Linux wakes every epoll waiter registered for `EPOLLOUT` on a Unix stream socket each time
//! the peer reads from it (`unix_write_space` does not check whether the writer ever found the
//! socket full, unlike TCP). A socket registered for reading and writing, as
//! `tokio::net::UnixStream` always is, therefore wakes its process once for every read the
//! peer makes: a request/reply round trip through the broker woke each of the three processes
//! twice, once for the data and once for nothing.
//!
//! Here the socket is registered for readability only. Writes go straight to the socket; a
//! write that finds it full registers a duplicate descriptor for writability
//! ([`UnixWriteHalf::poll_write_vectored`]) and waits on that. The registration stays while
//! the writer keeps finding the socket full, and goes at the first flush (the end of a
//! writer's batch) whose batch never waited: a writer that never fills the socket never hears
//! of the peer's reads, and one streaming into a slower reader does not register and
//! deregister for every batch. The duplicate descriptor is kept for the next time.

use socket2::Socket;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Flags of every send: a closed peer is an `EPIPE` error, never a `SIGPIPE` (the broker may
/// be embedded in a process that did not ignore the signal).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: std::ffi::c_int = nix::libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: std::ffi::c_int = 0;

/// Splits a connected stream into halves registered as the module describes.
///
/// # Errors
///
/// Registering the socket with the runtime's event loop failed (or no runtime is running).
pub(crate) fn split(stream: tokio::net::UnixStream) -> io::Result<(UnixReadHalf, UnixWriteHalf)> {
    // `into_std` deregisters the socket and leaves it non-blocking.
    let socket = Socket::from(OwnedFd::from(stream.into_std()?));
    let socket = Arc::new(register(socket, Interest::READABLE)?);
    Ok((
        UnixReadHalf(Arc::clone(&socket)),
        UnixWriteHalf {
            socket,
            watch: None,
            spare: None,
            blocked: false,
        },
    ))
}

/// Registers `socket` with the runtime's event loop for `interest` alone.
#[allow(unsafe_code)]
fn register(socket: Socket, interest: Interest) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: the `AsyncFd` owns the `Socket`, which owns its descriptor and always reports
    // that same one, open until the `Socket` drops (after the `AsyncFd` deregistered it).
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

/// The reading half: registered for readability only.
pub(crate) struct UnixReadHalf(Arc<AsyncFd<Socket>>);

impl AsyncRead for UnixReadHalf {
    #[allow(unsafe_code)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.poll_read_ready(cx))?;
            let wanted = buf.remaining();
            // SAFETY: `recv` only writes into the slice, never de-initialises any of it.
            let unfilled: &mut [MaybeUninit<u8>] = unsafe { buf.unfilled_mut() };
            match ready.try_io(|s| s.get_ref().recv(unfilled)) {
                Ok(Ok(n)) => {
                    // SAFETY: `recv` initialised the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    // A short read drained the socket (stream sockets fill what they can):
                    // wait for the next edge rather than find out with a read that fails.
                    if n > 0 && n < wanted {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness is cleared, wait for the next edge.
                Err(_) => {}
            }
        }
    }
}

/// The writing half: writes directly, and registers for writability only while a write
/// waits for room. Dropping it shuts down the sending direction, as the peer expects when a
/// connection's writer stops.
pub(crate) struct UnixWriteHalf {
    socket: Arc<AsyncFd<Socket>>,
    /// A duplicate of the socket registered for writability, present from a write that found
    /// the socket full to the first flush of a batch that never did.
    watch: Option<AsyncFd<Socket>>,
    /// The duplicate while it is not registered.
    spare: Option<Socket>,
    /// A write found the socket full since the last flush.
    blocked: bool,
}

impl UnixWriteHalf {
    fn watch(&mut self) -> io::Result<&AsyncFd<Socket>> {
        match &mut self.watch {
            Some(w) => Ok(w),
            slot @ None => {
                let dup = match self.spare.take() {
                    Some(dup) => dup,
                    None => self.socket.get_ref().try_clone()?,
                };
                Ok(slot.insert(register(dup, Interest::WRITABLE)?))
            }
        }
    }
}

impl AsyncWrite for UnixWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this
                .socket
                .get_ref()
                .send_vectored_with_flags(bufs, SEND_FLAGS)
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                done => return Poll::Ready(done),
            }
            // Full. A descriptor registered now is reported at once if room appeared
            // meanwhile (epoll checks readiness when a descriptor is added).
            this.blocked = true;
            ready!(this.watch()?.poll_write_ready(cx))?.clear_ready();
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything was handed to the kernel. A batch that went out without waiting means the
        // reader keeps up: stop hearing about its reads.
        let this = self.get_mut();
        if !std::mem::take(&mut this.blocked) {
            this.unwatch();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.unwatch();
        Poll::Ready(this.socket.get_ref().shutdown(Shutdown::Write))
    }
}

impl UnixWriteHalf {
    /// Deregisters the duplicate descriptor, keeping it for the next wait.
    fn unwatch(&mut self) {
        if let Some(w) = self.watch.take() {
            self.spare = Some(w.into_inner());
        }
    }
}

impl Drop for UnixWriteHalf {
    fn drop(&mut self) {
        // `NotConnected` when the peer is gone already: nothing to tell it.
        let _ = self.socket.get_ref().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> ((UnixReadHalf, UnixWriteHalf), (UnixReadHalf, UnixWriteHalf)) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (split(a).unwrap(), split(b).unwrap())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_dropping_a_writer_ends_the_peer_s_stream() {
        let ((mut ar, mut aw), (mut br, mut bw)) = pair();
        aw.write_all(b"ping").await.unwrap();
        aw.flush().await.unwrap();
        let mut got = [0u8; 4];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        bw.write_all(b"pong").await.unwrap();
        ar.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(aw);
        let mut rest = Vec::new();
        assert_eq!(
            br.read_to_end(&mut rest).await.unwrap(),
            0,
            "EOF after the drop"
        );
        // The other direction still works.
        bw.write_all(b"more").await.unwrap();
        ar.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more");
    }

    #[tokio::test]
    async fn a_writer_that_fills_the_socket_waits_for_room_and_loses_nothing() {
        let ((_ar, mut aw), (mut br, _bw)) = pair();
        // Far more than a Unix socket buffers: the writer must wait for the reader many times.
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&data).await.unwrap();
            assert!(aw.watch.is_some(), "the socket was full at least once");
            aw.flush().await.unwrap();
            assert!(aw.watch.is_some(), "kept after a batch that waited");
            aw
        });
        let mut got = Vec::with_capacity(expected.len());
        let mut chunk = vec![0u8; 64 * 1024];
        while got.len() < expected.len() {
            let n = br.read(&mut chunk).await.unwrap();
            assert!(n > 0, "stream ended early at {}", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == expected, "bytes arrive whole and in order");
        // The reader has drained everything: a batch that fits deregisters at its flush and
        // keeps the descriptor for the next wait.
        let mut aw = writer.await.unwrap();
        aw.write_all(b"x").await.unwrap();
        aw.flush().await.unwrap();
        assert!(aw.watch.is_none() && aw.spare.is_some());
        br.read_exact(&mut chunk[..1]).await.unwrap();
        assert_eq!(chunk[0], b'x');
    }

    #[tokio::test]
    async fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let ((_ar, mut aw), peer) = pair();
        drop(peer);
        let mut result = Ok(());
        // The first write may still be buffered; one of a few must fail.
        for _ in 0..4 {
            result = aw.write_all(&[0u8; 64 * 1024]).await;
            if result.is_err() {
                break;
            }
        }
        let e = result.expect_err("a write to a closed peer fails");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
}
