//! `netmond`: the network collector. Started by the agent's supervisor, or by hand against
//! any broker. Links the client side of the bus only.

use anyhow::{Context, Result};
use clap::Parser;
use daemoneye_eventbus_client::{Client, ClientOptions};
use daemoneye_eventbus_collector::cli::BrokerArg;
use daemoneye_eventbus_collector::services::SourceChoice;
use daemoneye_netmond::Settings;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Publishes TCP and UDP sockets opened and closed, with the process holding each, and
/// snapshots and heartbeats; answers the collector services on control.collector.{ID}.
#[derive(Parser, Debug)]
#[command(name = "netmond", version)]
struct Args {
    /// The broker (default: the agent's default socket); over tls:// with a certificate.
    #[command(flatten)]
    broker: BrokerArg,
    /// Collector id (its RPC address is control.collector.{ID}).
    #[arg(long, env = "DAEMONEYE_COLLECTOR_ID", default_value = "netmond")]
    id: String,
    /// How often the socket tables are read, milliseconds (50 to 60000): a socket open for
    /// less may be missed.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    scan_interval_ms: u64,
    /// How often a snapshot of every socket is published, seconds (0: never).
    #[arg(long, default_value_t = 30)]
    batch_interval_secs: u64,
    /// How often a heartbeat is published, seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_secs: u64,
    /// Where sockets are read from: `auto` (the kernel's socket dump, sock_diag, when it
    /// answers; else /proc/net), `kernel` (the dump or nothing), `proc` (the /proc/net tables,
    /// which the kernel regenerates as text at each reading: costlier with many sockets).
    #[arg(long, value_enum, default_value_t = SourceChoice::Auto)]
    source: SourceChoice,
    /// The proc file system to read.
    #[arg(long, default_value = "/proc", hide = true)]
    proc_root: PathBuf,
}

fn main() -> ExitCode {
    daemoneye_eventbus_collector::cli::main_with(run(Args::parse()))
}

/// Runs netmond until SIGINT, SIGTERM or a shutdown request.
async fn run(args: Args) -> Result<()> {
    let (ep, tls) = args.broker.resolve()?;
    let mut options = ClientOptions::named(args.id.clone());
    options.tls = tls;
    let client = Client::connect(&ep, options)
        .await
        .with_context(|| format!("connecting to {ep}"))?;
    let settings = Settings {
        scan_interval: Duration::from_millis(args.scan_interval_ms),
        batch_interval: Duration::from_secs(args.batch_interval_secs),
        heartbeat_interval: Duration::from_secs(args.heartbeat_secs),
        source: args.source,
    };
    tracing::info!(id = %args.id, endpoint = %ep, "netmond starting");
    daemoneye_netmond::run(
        client,
        &args.id,
        settings,
        args.proc_root,
        daemoneye_eventbus_collector::cli::terminated(),
    )
    .await?;
    Ok(())
}
