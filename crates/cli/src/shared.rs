//! What both binaries (`eventbus` and `procmond`) need: logging set-up and reading a socket
//! argument.

use anyhow::Result;
use daemoneye_eventbus::Endpoint;
use std::path::PathBuf;

/// Logs to stderr, filtered by `EVENTBUS_LOG` (default `warn`).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVENTBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The endpoint a `--socket` value names: `unix:///path`, `tcp://…`, `pipe://…`, or a plain
/// Unix socket path (made absolute); the default endpoint when absent.
pub(crate) fn endpoint_from(socket: Option<&str>) -> Result<Endpoint> {
    match socket {
        None => Ok(daemoneye_eventbus::transport::default_endpoint()?),
        Some(s) if s.contains("://") || s.starts_with("unix:") => Ok(Endpoint::parse(s)?),
        Some(s) => Ok(Endpoint::Unix(std::path::absolute(s)?)),
    }
}

/// The broker a client command talks to: where (`--socket`) and, for `tls://HOST:PORT`, the
/// client's certificate.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BrokerArg {
    /// Broker socket path or endpoint (unix:///path, tcp://127.0.0.1:PORT, tls://HOST:PORT).
    #[arg(long, env = "EVENTBUS_SOCKET", value_name = "PATH")]
    pub(crate) socket: Option<String>,
    /// For tls://: this client's certificate chain (PEM).
    #[arg(long, env = "EVENTBUS_TLS_CERT", value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// For tls://: this client's private key (PEM).
    #[arg(long, env = "EVENTBUS_TLS_KEY", value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,
    /// For tls://: the CA certificates (PEM) the broker's certificate must chain to.
    #[arg(long, env = "EVENTBUS_TLS_CA", value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,
}

impl BrokerArg {
    /// The endpoint, and the client's TLS settings when it is `tls://`.
    pub(crate) fn resolve(
        &self,
    ) -> Result<(Endpoint, Option<daemoneye_eventbus::client::ClientTls>)> {
        let ep = crate::shared::endpoint_from(self.socket.as_deref())?;
        if !matches!(ep, Endpoint::Tls(_)) {
            return Ok((ep, None));
        }
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            anyhow::bail!(
                "{ep} needs --tls-cert, --tls-key and --tls-ca (or EVENTBUS_TLS_CERT, \
                 EVENTBUS_TLS_KEY and EVENTBUS_TLS_CA): this client's certificate, its key, and \
                 the CA of the broker's certificate"
            );
        };
        let files = daemoneye_eventbus::client::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        };
        let tls = daemoneye_eventbus::client::ClientTls::load(&files)?;
        Ok((ep, Some(tls)))
    }
}
