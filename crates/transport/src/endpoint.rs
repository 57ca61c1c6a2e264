//! Endpoint addresses: `unix:///path`, `tcp://127.0.0.1:port`, `inproc://name`, `pipe://name`.

use crate::error::TransportError;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a broker listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// A TCP address (plain TCP is loopback-only).
    Tcp(SocketAddr),
    /// A broker in this process, by name; frames are passed without serialisation.
    InProc(String),
    /// A Windows named pipe name (`\\.\pipe\NAME`).
    NamedPipe(String),
}

impl Endpoint {
    /// Parses `unix:///abs/path` (or `unix:/abs/path`, or a bare absolute path),
    /// `tcp://host:port`, `inproc://name`, `pipe://name`.
    ///
    /// # Errors
    ///
    /// [`TransportError::InvalidEndpoint`] naming what is wrong.
    pub fn parse(input: &str) -> Result<Self, TransportError> {
        let bad = |reason| TransportError::InvalidEndpoint {
            input: input.to_owned(),
            reason,
        };
        if let Some(rest) = input
            .strip_prefix("unix://")
            .or(input.strip_prefix("unix:"))
        {
            if rest.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            return Ok(Self::Unix(PathBuf::from(rest)));
        }
        if let Some(rest) = input.strip_prefix("tcp://") {
            let addr = rest
                .parse()
                .map_err(|_| bad("expected tcp://IP:PORT, for example tcp://127.0.0.1:4222"))?;
            return Ok(Self::Tcp(addr));
        }
        if let Some(rest) = input.strip_prefix("inproc://") {
            if rest.is_empty() {
                return Err(bad("the in-process name is empty"));
            }
            return Ok(Self::InProc(rest.to_owned()));
        }
        if let Some(rest) = input.strip_prefix("pipe://") {
            if rest.is_empty() {
                return Err(bad("the pipe name is empty"));
            }
            return Ok(Self::NamedPipe(rest.to_owned()));
        }
        if input.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(input)));
        }
        Err(bad(
            "expected unix:///path, tcp://IP:PORT, inproc://NAME or pipe://NAME",
        ))
    }
}

impl std::str::FromStr for Endpoint {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::InProc(n) => write!(f, "inproc:{n}"),
            Self::NamedPipe(n) => write!(f, "pipe:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            Endpoint::parse("unix:///tmp/x.sock").unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/a/b").unwrap(),
            Endpoint::Unix("/a/b".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:9").unwrap(),
            Endpoint::Tcp("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(
            Endpoint::parse("inproc://b").unwrap(),
            Endpoint::InProc("b".into())
        );
        assert!(Endpoint::parse("tcp://localhost").is_err());
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("inproc://").is_err());
    }
}
