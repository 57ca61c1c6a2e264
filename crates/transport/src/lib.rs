//! Transports for daemoneye-eventbus behind one abstraction.
//!
//! A [`Listener`] accepts [`Connection`]s and [`connect`] opens one; every connection is a
//! [`FrameReader`] plus a [`FrameWriter`] and a [`PeerInfo`], whatever carries it:
//!
//! | endpoint | carrier | notes |
//! |---|---|---|
//! | `unix:///path` | Unix stream socket | 0600 socket in a 0700 directory, stale-socket replacement ([`unix`]) |
//! | `tcp://127.0.0.1:port` | TCP | plain TCP on loopback only; `TCP_NODELAY` |
//! | `tls://host:port` | TCP with mutual TLS | any address; both ends present certificates ([`tls`]) |
//! | `inproc://name` | bounded frame channels | payloads are never serialised |
//! | `pipe://name` | Windows named pipe | `cfg(windows)` only |

mod endpoint;
mod error;
mod framed;
mod inproc;
mod large;
#[cfg(windows)]
mod pipe;
pub mod tls;
#[cfg(unix)]
pub mod unix;
#[cfg(unix)]
mod unix_io;

pub use endpoint::{Endpoint, TlsAddr};
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
    /// Remote address (TCP and TLS).
    pub addr: Option<std::net::SocketAddr>,
    /// The subject of the certificate a TLS peer presented, verified against the client CA
    /// (`CN=procmond, O=DaemonEye`: attributes in certificate order).
    pub tls_subject: Option<String>,
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
    /// TCP with mutual TLS.
    Tls,
    /// In process.
    InProc,
    /// Windows named pipe.
    NamedPipe,
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.transport, self.pid, self.uid, self.addr) {
            (TransportKind::Tls, _, _, Some(addr)) => match &self.tls_subject {
                Some(subject) => write!(f, "tls {addr} ({subject})"),
                None => write!(f, "tls {addr}"),
            },
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
    Tls(tokio::net::TcpListener, tls::ServerTls),
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

/// A connection accepted by a [`Listener`], to be established ([`Incoming::establish`]) in
/// the task that serves it: a TLS handshake happens there, not in the accept loop.
pub struct Incoming {
    kind: IncomingKind,
}

// Moved once, into the task that serves it: not worth a box.
#[allow(clippy::large_enum_variant)]
enum IncomingKind {
    Ready(Connection),
    Tls {
        stream: tokio::net::TcpStream,
        addr: std::net::SocketAddr,
        tls: tls::ServerTls,
    },
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("peer", &self.peer())
            .finish()
    }
}

impl Incoming {
    /// What is known of the peer before the connection is established: everything for a
    /// Unix socket, only the address for TLS (its subject comes with the handshake).
    pub fn peer(&self) -> PeerInfo {
        match &self.kind {
            IncomingKind::Ready(c) => c.peer.clone(),
            IncomingKind::Tls { addr, .. } => PeerInfo {
                addr: Some(*addr),
                transport: TransportKind::Tls,
                ..PeerInfo::default()
            },
        }
    }

    /// Whether [`Incoming::establish`] has a handshake to do (TLS); otherwise it returns at
    /// once.
    pub fn needs_handshake(&self) -> bool {
        matches!(self.kind, IncomingKind::Tls { .. })
    }

    /// Finishes the connection: for TLS, the handshake, which verifies the client's
    /// certificate. Not bounded in time: the caller applies its deadline.
    ///
    /// # Errors
    ///
    /// [`TransportError::Handshake`] when the handshake fails (no certificate, one from
    /// another CA, expired…).
    pub async fn establish(self) -> Result<Connection, TransportError> {
        match self.kind {
            IncomingKind::Ready(c) => Ok(c),
            IncomingKind::Tls { stream, addr, tls } => {
                let stream = tls.acceptor.accept(stream).await.map_err(|error| {
                    TransportError::Handshake {
                        peer: addr.to_string(),
                        error,
                    }
                })?;
                let subject = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(tls::subject);
                let peer = PeerInfo {
                    addr: Some(addr),
                    tls_subject: subject,
                    transport: TransportKind::Tls,
                    ..PeerInfo::default()
                };
                Ok(split_stream(stream, peer))
            }
        }
    }
}

impl From<Connection> for Incoming {
    fn from(c: Connection) -> Self {
        Self {
            kind: IncomingKind::Ready(c),
        }
    }
}

/// A connection over any byte stream, read and written through halves that share it.
fn split_stream<S>(stream: S, peer: PeerInfo) -> Connection
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    Connection {
        reader: FrameReader::stream(Box::new(r)),
        writer: FrameWriter::stream(Box::new(w)),
        peer,
    }
}

impl Listener {
    /// Starts listening on `endpoint`.
    ///
    /// # Errors
    ///
    /// A [`TransportError`] naming the endpoint and the problem (address in use, unsafe path,
    /// non-loopback TCP, unsupported on this platform…); for `tls://`, which needs its
    /// settings, [`TransportError::TlsNotConfigured`] (use [`Listener::bind_with`]).
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, TransportError> {
        Self::bind_with(endpoint, None).await
    }

    /// Starts listening on `endpoint`, with `tls` for a `tls://` endpoint (ignored by others).
    ///
    /// # Errors
    ///
    /// As [`Listener::bind`].
    pub async fn bind_with(
        endpoint: &Endpoint,
        tls: Option<&tls::ServerTls>,
    ) -> Result<Self, TransportError> {
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
            Endpoint::Tls(addr) => {
                let tls = tls.ok_or_else(|| TransportError::TlsNotConfigured(endpoint.clone()))?;
                let l = tokio::net::TcpListener::bind((addr.host.as_str(), addr.port))
                    .await
                    .map_err(|e| TransportError::io(format!("binding tls {addr}"), e))?;
                ListenerKind::Tls(l, tls.clone())
            }
            Endpoint::InProc(name) => ListenerKind::InProc(inproc::InProcListener::bind(name)?),
            #[cfg(windows)]
            Endpoint::NamedPipe(name) => ListenerKind::Pipe(pipe::PipeListener::bind(name)?),
            #[cfg(not(windows))]
            Endpoint::NamedPipe(_) => return Err(TransportError::Unsupported("named pipe")),
        };
        let endpoint = match (&kind, endpoint) {
            (ListenerKind::Tcp(l), _) => Endpoint::Tcp(
                l.local_addr()
                    .map_err(|e| TransportError::io("reading the bound tcp address", e))?,
            ),
            (ListenerKind::Tls(l, _), Endpoint::Tls(addr)) => Endpoint::Tls(TlsAddr {
                host: addr.host.clone(),
                port: l
                    .local_addr()
                    .map_err(|e| TransportError::io("reading the bound tls address", e))?
                    .port(),
            }),
            _ => endpoint.clone(),
        };
        Ok(Self { kind, endpoint })
    }

    /// The endpoint actually bound (with the real port for `tcp://…:0` and `tls://…:0`).
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
    pub async fn accept(&mut self) -> std::io::Result<Incoming> {
        Ok(match &mut self.kind {
            #[cfg(unix)]
            ListenerKind::Unix { listener: l, .. } => {
                let (stream, _) = l.accept().await?;
                unix_connection(stream)?.into()
            }
            ListenerKind::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                tcp_connection(stream, Some(addr)).into()
            }
            ListenerKind::Tls(l, tls) => {
                let (stream, addr) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Incoming {
                    kind: IncomingKind::Tls {
                        stream,
                        addr,
                        tls: tls.clone(),
                    },
                }
            }
            ListenerKind::InProc(l) => match l.accept().await {
                Some(ends) => inproc_connection(ends).into(),
                None => std::future::pending().await,
            },
            #[cfg(windows)]
            ListenerKind::Pipe(l) => l.accept().await?.into(),
        })
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
        transport: TransportKind::Unix,
        ..PeerInfo::default()
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
/// A [`TransportError`] naming the endpoint; for `tls://`, which needs its settings,
/// [`TransportError::TlsNotConfigured`] (use [`connect_with`]).
pub async fn connect(endpoint: &Endpoint) -> Result<Connection, TransportError> {
    connect_with(endpoint, None).await
}

/// Opens a connection to `endpoint`, with `tls` for a `tls://` endpoint (ignored by others):
/// the TLS handshake is part of it.
///
/// # Errors
///
/// As [`connect`]; [`TransportError::Handshake`] when the broker's certificate is refused
/// (another CA, not valid for the host dialled, expired).
pub async fn connect_with(
    endpoint: &Endpoint,
    tls: Option<&tls::ClientTls>,
) -> Result<Connection, TransportError> {
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
        Endpoint::Tls(addr) => {
            let tls = tls.ok_or_else(|| TransportError::TlsNotConfigured(endpoint.clone()))?;
            let name = tls::server_name(&addr.host)?;
            let s = tokio::net::TcpStream::connect((addr.host.as_str(), addr.port))
                .await
                .map_err(|e| TransportError::io(format!("connecting to tls {addr}"), e))?;
            let _ = s.set_nodelay(true);
            let remote = s.peer_addr().ok();
            let stream = tls.connector.connect(name, s).await.map_err(|error| {
                TransportError::Handshake {
                    peer: addr.to_string(),
                    error,
                }
            })?;
            let peer = PeerInfo {
                addr: remote,
                transport: TransportKind::Tls,
                ..PeerInfo::default()
            };
            Ok(split_stream(stream, peer))
        }
        Endpoint::InProc(name) => Ok(inproc_connection(inproc::connect(name).await?)),
        #[cfg(windows)]
        Endpoint::NamedPipe(name) => pipe::connect(name).await,
        #[cfg(not(windows))]
        Endpoint::NamedPipe(_) => Err(TransportError::Unsupported("named pipe")),
    }
}
