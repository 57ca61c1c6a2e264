//! Transports for daemoneye-eventbus behind one abstraction.
//!
//! A [`Listener`] accepts [`Connection`]s and [`connect`] opens one; every connection is a
//! [`FrameReader`] plus a [`FrameWriter`] and a [`PeerInfo`], whatever carries it:
//!
//! | endpoint | carrier | notes |
//! |---|---|---|
//! | `unix:///path` | Unix stream socket | 0600 socket in a 0700 directory, stale-socket replacement ([`unix`]) |
//! | `tcp://127.0.0.1:port` | TCP | plain TCP on loopback only; `TCP_NODELAY` |
//! | `inproc://name` | bounded frame channels | payloads are never serialised |
//! | `pipe://name` | Windows named pipe | `cfg(windows)` only |

mod endpoint;
mod error;
mod framed;
mod inproc;
mod large;
#[cfg(windows)]
mod pipe;
#[cfg(unix)]
pub mod unix;
#[cfg(unix)]
mod unix_io;

pub use endpoint::Endpoint;
pub use error::{ReadError, TransportError};
pub use framed::{FrameReader, FrameWriter, INPROC_CHANNEL_FRAMES, RUN_SEGMENT_MIN, VECTORED_MIN};

use std::fmt;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Process id (Unix sockets).
    pub pid: Option<i32>,
    /// User id (Unix sockets).
    pub uid: Option<u32>,
    /// Group id (Unix sockets).
    pub gid: Option<u32>,
    /// The peer process's executable (Unix sockets on Linux): read through a pidfd the kernel
    /// gave for the connecting process, and kept only if that very process was still alive
    /// after it was read, so a pid reused by another process is never mistaken for the peer.
    /// `None` when it could not be read that way.
    pub exe: Option<std::path::PathBuf>,
    /// Remote address (TCP).
    pub addr: Option<std::net::SocketAddr>,
    /// Which transport carried the connection.
    pub transport: TransportKind,
}

/// The kind of transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportKind {
    /// Unix domain socket.
    #[default]
    Unix,
    /// TCP.
    Tcp,
    /// In process.
    InProc,
    /// Windows named pipe.
    NamedPipe,
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.transport, self.pid, self.uid, self.addr) {
            (_, _, _, Some(addr)) => write!(f, "tcp {addr}"),
            (TransportKind::InProc, ..) => f.write_str("in-process"),
            (_, Some(pid), Some(uid), _) => write!(f, "pid {pid} uid {uid}"),
            (kind, ..) => write!(f, "{kind:?} peer"),
        }
    }
}

/// An open connection, split into independent halves.
pub struct Connection {
    /// Incoming frames.
    pub reader: FrameReader,
    /// Outgoing frames.
    pub writer: FrameWriter,
    /// The peer.
    pub peer: PeerInfo,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .finish()
    }
}

enum ListenerKind {
    #[cfg(unix)]
    Unix {
        listener: tokio::net::UnixListener,
        /// Removes the socket file when the listener is dropped.
        _guard: unix::SocketGuard,
    },
    Tcp(tokio::net::TcpListener),
    InProc(inproc::InProcListener),
    #[cfg(windows)]
    Pipe(pipe::PipeListener),
}

/// Accepts connections on one endpoint. Dropping it stops listening (and removes the Unix
/// socket file it created).
pub struct Listener {
    kind: ListenerKind,
    endpoint: Endpoint,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Listener {
    /// Starts listening on `endpoint`.
    ///
    /// # Errors
    ///
    /// A [`TransportError`] naming the endpoint and the problem (address in use, unsafe path,
    /// non-loopback TCP, unsupported on this platform…).
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let kind = match endpoint {
            #[cfg(unix)]
            Endpoint::Unix(path) => {
                let (l, guard) = unix::bind(path)?;
                ListenerKind::Unix {
                    listener: l,
                    _guard: guard,
                }
            }
            #[cfg(not(unix))]
            Endpoint::Unix(_) => return Err(TransportError::Unsupported("unix")),
            Endpoint::Tcp(addr) => {
                if !addr.ip().is_loopback() {
                    return Err(TransportError::NonLoopbackTcp(*addr));
                }
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| TransportError::io(format!("binding tcp {addr}"), e))?;
                ListenerKind::Tcp(l)
            }
            Endpoint::InProc(name) => ListenerKind::InProc(inproc::InProcListener::bind(name)?),
            #[cfg(windows)]
            Endpoint::NamedPipe(name) => ListenerKind::Pipe(pipe::PipeListener::bind(name)?),
            #[cfg(not(windows))]
            Endpoint::NamedPipe(_) => return Err(TransportError::Unsupported("named pipe")),
        };
        let endpoint = match &kind {
            ListenerKind::Tcp(l) => Endpoint::Tcp(
                l.local_addr()
                    .map_err(|e| TransportError::io("reading the bound tcp address", e))?,
            ),
            _ => endpoint.clone(),
        };
        Ok(Self { kind, endpoint })
    }

    /// The endpoint actually bound (with the real port for `tcp://…:0`).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Waits for the next connection.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    ///
    /// # Errors
    ///
    /// I/O errors from `accept` (often transient, such as running out of descriptors); the
    /// listener stays usable.
    pub async fn accept(&mut self) -> std::io::Result<Connection> {
        match &mut self.kind {
            #[cfg(unix)]
            ListenerKind::Unix { listener: l, .. } => {
                let (stream, _) = l.accept().await?;
                unix_connection(stream)
            }
            ListenerKind::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                Ok(tcp_connection(stream, Some(addr)))
            }
            ListenerKind::InProc(l) => match l.accept().await {
                Some(ends) => Ok(inproc_connection(ends)),
                None => std::future::pending().await,
            },
            #[cfg(windows)]
            ListenerKind::Pipe(l) => l.accept().await,
        }
    }
}

/// A connection over a Unix stream, registered for writability only while a write waits
/// ([`unix_io`]).
#[cfg(unix)]
fn unix_connection(stream: tokio::net::UnixStream) -> std::io::Result<Connection> {
    let cred = stream.peer_cred().ok();
    let pid = cred.as_ref().and_then(|c| c.pid());
    let peer = PeerInfo {
        pid,
        uid: cred.as_ref().map(|c| c.uid()),
        gid: cred.as_ref().map(|c| c.gid()),
        exe: pid.and_then(|pid| unix::peer_exe(&stream, pid)),
        addr: None,
        transport: TransportKind::Unix,
    };
    let (r, w) = unix_io::split(stream)?;
    Ok(Connection {
        reader: FrameReader::stream(Box::new(r)),
        writer: FrameWriter::stream(Box::new(w)),
        peer,
    })
}

fn tcp_connection(stream: tokio::net::TcpStream, addr: Option<std::net::SocketAddr>) -> Connection {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    Connection {
        reader: FrameReader::stream(Box::new(r)),
        writer: FrameWriter::stream(Box::new(w)),
        peer: PeerInfo {
            addr,
            transport: TransportKind::Tcp,
            ..PeerInfo::default()
        },
    }
}

fn inproc_connection(ends: inproc::InProcEnds) -> Connection {
    Connection {
        reader: ends.reader,
        writer: ends.writer,
        peer: PeerInfo {
            pid: i32::try_from(std::process::id()).ok(),
            transport: TransportKind::InProc,
            ..PeerInfo::default()
        },
    }
}

/// The platform's default broker endpoint: the private Unix socket path
/// ([`unix::default_socket_path`]) on Unix, the named pipe `daemoneye-eventbus` on Windows.
///
/// # Errors
///
/// [`TransportError::NoDefaultPath`] for a user other than root without `XDG_RUNTIME_DIR`.
pub fn default_endpoint() -> Result<Endpoint, TransportError> {
    #[cfg(unix)]
    return unix::default_socket_path().map(Endpoint::Unix);
    #[cfg(not(unix))]
    return Ok(Endpoint::NamedPipe("daemoneye-eventbus".into()));
}

/// Opens a connection to `endpoint`.
///
/// # Errors
///
/// A [`TransportError`] naming the endpoint.
pub async fn connect(endpoint: &Endpoint) -> Result<Connection, TransportError> {
    match endpoint {
        #[cfg(unix)]
        Endpoint::Unix(path) => {
            unix::check_socket(path)?;
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| TransportError::io(format!("connecting to {}", path.display()), e))?;
            unix_connection(s).map_err(|e| {
                TransportError::io(format!("registering the socket to {}", path.display()), e)
            })
        }
        #[cfg(not(unix))]
        Endpoint::Unix(_) => Err(TransportError::Unsupported("unix")),
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| TransportError::io(format!("connecting to tcp {addr}"), e))?;
            Ok(tcp_connection(s, Some(*addr)))
        }
        Endpoint::InProc(name) => Ok(inproc_connection(inproc::connect(name).await?)),
        #[cfg(windows)]
        Endpoint::NamedPipe(name) => pipe::connect(name).await,
        #[cfg(not(windows))]
        Endpoint::NamedPipe(_) => Err(TransportError::Unsupported("named pipe")),
    }
}
