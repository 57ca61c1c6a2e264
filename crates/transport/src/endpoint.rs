//! Endpoint addresses: `unix:///path`, `tcp://127.0.0.1:port`, `tls://host:port`,
//! `inproc://name`, `pipe://name`.

use crate::error::TransportError;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A host and port for TLS: the host is what a client checks the broker's certificate
/// against (a DNS name or an IP address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsAddr {
    /// A host name or an IP address (IPv6 without brackets).
    pub host: String,
    /// The TCP port (0 when binding: any free port).
    pub port: u16,
}

impl fmt::Display for TlsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl TlsAddr {
    /// Parses `HOST:PORT` (`[IPV6]:PORT` for an IPv6 address).
    fn parse(input: &str) -> Option<Self> {
        let (host, port) = input.rsplit_once(':')?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']')?,
            None if host.contains(':') => return None,
            None => host,
        };
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
        if !valid {
            return None;
        }
        Some(Self {
            host: host.to_owned(),
            port: port.parse().ok()?,
        })
    }
}

/// Where a broker listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// A TCP address (plain TCP is loopback-only).
    Tcp(SocketAddr),
    /// TCP with mutual TLS, on any address ([`crate::tls`]).
    Tls(TlsAddr),
    /// A broker in this process, by name; frames are passed without serialisation.
    InProc(String),
    /// A Windows named pipe name (`\\.\pipe\NAME`).
    NamedPipe(String),
}

impl Endpoint {
    /// Parses `unix:///abs/path` (or `unix:/abs/path`, or a bare absolute path),
    /// `tcp://IP:PORT`, `tls://HOST:PORT`, `inproc://name`, `pipe://name`.
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
        if let Some(rest) = input.strip_prefix("tls://") {
            return TlsAddr::parse(rest).map(Self::Tls).ok_or_else(|| {
                bad("expected tls://HOST:PORT, for example tls://broker.example:4443")
            });
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
            "expected unix:///path, tcp://IP:PORT, tls://HOST:PORT, inproc://NAME or pipe://NAME",
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
            Self::Tls(a) => write!(f, "tls:{a}"),
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
        assert_eq!(
            Endpoint::parse("tls://broker.example:4443").unwrap(),
            Endpoint::Tls(TlsAddr {
                host: "broker.example".into(),
                port: 4443
            })
        );
        let v6 = Endpoint::parse("tls://[::1]:0").unwrap();
        assert_eq!(
            v6,
            Endpoint::Tls(TlsAddr {
                host: "::1".into(),
                port: 0
            })
        );
        assert_eq!(v6.to_string(), "tls:[::1]:0");
        assert!(Endpoint::parse("tls://::1:9").is_err());
        assert!(Endpoint::parse("tls://host").is_err());
        assert!(Endpoint::parse("tls://:9").is_err());
        assert!(Endpoint::parse("tls://a/b:9").is_err());
        assert!(Endpoint::parse("tcp://localhost").is_err());
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("inproc://").is_err());
    }
}
