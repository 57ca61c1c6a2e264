//! What every command-line program of the bus needs (`eventbus`, `procmond`, `netmond`):
//! logging set-up and the broker arguments (`--socket` and, for `tls://`, the client's
//! certificate). Behind the `cli` feature.

use daemoneye_eventbus_client::{ClientTls, TlsFiles};
use daemoneye_eventbus_transport::Endpoint;
use std::path::PathBuf;

/// Logs to stderr, filtered by `EVENTBUS_LOG` (default `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVENTBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Why the broker arguments name no broker this program can reach.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerArgError {
    /// The `--socket` value is not an endpoint.
    #[error("--socket {value:?}: {source}")]
    Endpoint {
        /// The value given.
        value: String,
        /// Why it is not an endpoint.
        source: daemoneye_eventbus_transport::TransportError,
    },
    /// No default endpoint for this user (no private runtime directory).
    #[error("no --socket given and no default endpoint: {0}")]
    NoDefault(daemoneye_eventbus_transport::TransportError),
    /// A relative socket path could not be made absolute.
    #[error("--socket {value:?}: {source}")]
    Path {
        /// The value given.
        value: String,
        /// Why it could not be made absolute.
        source: std::io::Error,
    },
    /// `tls://` without the client's certificate, key or CA.
    #[error(
        "{0} needs --tls-cert, --tls-key and --tls-ca (or EVENTBUS_TLS_CERT, EVENTBUS_TLS_KEY \
         and EVENTBUS_TLS_CA): this client's certificate, its key, and the CA of the broker's \
         certificate"
    )]
    TlsFilesMissing(Endpoint),
    /// The certificate, key or CA could not be loaded.
    #[error(transparent)]
    Tls(daemoneye_eventbus_transport::TransportError),
}

/// The endpoint a `--socket` value names: `unix:///path`, `tcp://…`, `tls://…`, `pipe://…`,
/// or a plain Unix socket path (made absolute); the default endpoint when absent.
pub fn endpoint_from(socket: Option<&str>) -> Result<Endpoint, BrokerArgError> {
    match socket {
        None => daemoneye_eventbus_transport::default_endpoint().map_err(BrokerArgError::NoDefault),
        Some(s) if s.contains("://") || s.starts_with("unix:") => {
            Endpoint::parse(s).map_err(|source| BrokerArgError::Endpoint {
                value: s.to_owned(),
                source,
            })
        }
        Some(s) => std::path::absolute(s)
            .map(Endpoint::Unix)
            .map_err(|source| BrokerArgError::Path {
                value: s.to_owned(),
                source,
            }),
    }
}

/// The broker a command talks to: where (`--socket`) and, for `tls://HOST:PORT`, the
/// client's certificate.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BrokerArg {
    /// Broker socket path or endpoint (unix:///path, tcp://127.0.0.1:PORT, tls://HOST:PORT).
    #[arg(long, env = "EVENTBUS_SOCKET", value_name = "PATH")]
    pub socket: Option<String>,
    /// For tls://: this client's certificate chain (PEM).
    #[arg(long, env = "EVENTBUS_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// For tls://: this client's private key (PEM).
    #[arg(long, env = "EVENTBUS_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// For tls://: the CA certificates (PEM) the broker's certificate must chain to.
    #[arg(long, env = "EVENTBUS_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl BrokerArg {
    /// The endpoint, and the client's TLS settings when it is `tls://`.
    pub fn resolve(&self) -> Result<(Endpoint, Option<ClientTls>), BrokerArgError> {
        let ep = endpoint_from(self.socket.as_deref())?;
        if !matches!(ep, Endpoint::Tls(_)) {
            return Ok((ep, None));
        }
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Err(BrokerArgError::TlsFilesMissing(ep));
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        };
        let tls = ClientTls::load(&files).map_err(BrokerArgError::Tls)?;
        Ok((ep, Some(tls)))
    }
}

/// What every collector program takes: the broker, its id, and how often it reads its
/// source, publishes a snapshot and heartbeats.
#[derive(clap::Args, Debug, Clone)]
pub struct CollectorArgs {
    /// The broker (default: the agent's default socket); over tls:// with a certificate.
    #[command(flatten)]
    pub broker: BrokerArg,
    /// Collector id (its RPC address is control.collector.{ID}; default: the program's
    /// name). The agent's supervisor sets it.
    #[arg(long, env = "DAEMONEYE_COLLECTOR_ID")]
    pub id: Option<String>,
    /// How often the source is read, milliseconds (50 to 60000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub scan_interval_ms: u64,
    /// How often a snapshot of everything seen is published, seconds (0: never).
    #[arg(long, default_value_t = 30)]
    pub batch_interval_secs: u64,
    /// How often a heartbeat is published, seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_secs: u64,
}

impl CollectorArgs {
    /// The id: `--id`, or `program`.
    #[must_use]
    pub fn id_or(&self, program: &str) -> String {
        self.id.clone().unwrap_or_else(|| program.to_owned())
    }

    /// The id (`--id`, or `program`), the broker's endpoint, and client options named after
    /// the id with the broker's TLS settings.
    ///
    /// # Errors
    ///
    /// [`BrokerArgError`] when the broker arguments name no broker this program can reach.
    pub fn client(
        &self,
        program: &str,
    ) -> Result<(String, Endpoint, daemoneye_eventbus_client::ClientOptions), BrokerArgError> {
        let id = self.id_or(program);
        let (endpoint, tls) = self.broker.resolve()?;
        let mut options = daemoneye_eventbus_client::ClientOptions::named(id.clone());
        options.tls = tls;
        Ok((id, endpoint, options))
    }

    /// The scan, snapshot and heartbeat intervals.
    #[must_use]
    pub fn intervals(
        &self,
    ) -> (
        std::time::Duration,
        std::time::Duration,
        std::time::Duration,
    ) {
        (
            std::time::Duration::from_millis(self.scan_interval_ms),
            std::time::Duration::from_secs(self.batch_interval_secs),
            std::time::Duration::from_secs(self.heartbeat_secs),
        )
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C elsewhere); never if the handlers cannot be
/// installed.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A collector program's `main`: logging, a single-threaded runtime, `run` on it, and its
/// error printed (with its causes, `{:#}`) as the exit status 1.
pub fn main_with<F, E>(run: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
