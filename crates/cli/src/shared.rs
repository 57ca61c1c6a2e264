//! What both binaries (`eventbus` and `procmond`) need: logging set-up and reading a socket
//! argument.

use anyhow::Result;
use daemoneye_eventbus::Endpoint;

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
