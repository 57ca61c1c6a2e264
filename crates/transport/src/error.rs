//! Transport errors.

use std::io;
use std::path::PathBuf;

/// Errors from binding, connecting or parsing an endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint string could not be parsed.
    #[error("invalid endpoint {input:?}: {reason}")]
    InvalidEndpoint {
        /// The input.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An I/O operation failed. The OS error is part of the message (not a chained source,
    /// so printing the error chain does not repeat it).
    #[error("{context}: {error}")]
    Io {
        /// What was being done, naming the path or address.
        context: String,
        /// The underlying error.
        error: io::Error,
    },
    /// Another live broker is listening on the socket path.
    #[error("another broker is already listening on {0}; stop it or choose another --socket")]
    AddressInUse(PathBuf),
    /// A path component is a symbolic link, which is never followed.
    #[error("{0} is a symbolic link; refusing to follow it (choose another path)")]
    Symlink(PathBuf),
    /// Something other than a socket exists at the socket path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A file or directory we must own belongs to another user.
    #[error("{path} is owned by uid {owner}, expected uid {expected}; refusing to use it")]
    ForeignOwner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        expected: u32,
    },
    /// Nothing listens under this in-process name.
    #[error("no in-process broker is listening as {0:?}")]
    NoInProcListener(String),
    /// The in-process name is already taken in this process.
    #[error("an in-process broker is already listening as {0:?}")]
    InProcNameTaken(String),
    /// Plain TCP was requested on a non-loopback address.
    #[error(
        "plain TCP is only allowed on loopback, not {0}: the broker serves no other address \
         (use the Unix socket, or a loopback address)"
    )]
    NonLoopbackTcp(std::net::SocketAddr),
    /// A directory on the way to the socket, or the socket itself, could be replaced by
    /// another user.
    #[error("{path} is not safe for a socket: {reason}")]
    UnsafePath {
        /// The path.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// There is no default socket path for this user.
    #[error(
        "no default socket path: XDG_RUNTIME_DIR is not set, and only root has one outside it \
         (/run/daemoneye); set XDG_RUNTIME_DIR or give the socket path (--socket PATH)"
    )]
    NoDefaultPath,
    /// A TLS file could not be used, or a TLS setting is wrong.
    #[error("TLS: {0}")]
    Tls(String),
    /// A `tls://` endpoint was given without the certificates it needs.
    #[error(
        "{0} needs TLS settings: a certificate, its key and a CA (for the command line \
         --tls-cert, --tls-key and --tls-ca, or EVENTBUS_TLS_CERT, EVENTBUS_TLS_KEY and \
         EVENTBUS_TLS_CA; for a broker, broker.tls)"
    )]
    TlsNotConfigured(crate::Endpoint),
    /// The TLS handshake failed: the peer's certificate was refused, or it refused ours.
    #[error("TLS handshake with {peer} failed: {error}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// What went wrong, as the TLS library says it.
        error: io::Error,
    },
    /// The transport does not exist on this platform.
    #[error("{0} endpoints are not supported on this platform")]
    Unsupported(&'static str),
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>, error: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            error,
        }
    }
}

/// Errors while reading frames from a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent a frame that does not decode.
    #[error("malformed frame: {0}")]
    Frame(#[from] daemoneye_eventbus_core::FrameError),
}
