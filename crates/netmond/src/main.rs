//! `netmond`: the network collector. Started by the agent's supervisor, or by hand against
//! any broker. Links the client side of the bus only.

use anyhow::{Context, Result};
use clap::Parser;
use daemoneye_eventbus_client::Client;
use daemoneye_eventbus_collector::cli::CollectorArgs;
use daemoneye_eventbus_collector::services::SourceChoice;
use daemoneye_netmond::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

/// Publishes TCP and UDP sockets opened and closed, with the process holding each, and
/// snapshots and heartbeats; answers the collector services on control.collector.{ID}.
#[derive(Parser, Debug)]
#[command(name = "netmond", version)]
struct Args {
    /// The broker, the id and the intervals.
    #[command(flatten)]
    common: CollectorArgs,
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
    let (id, ep, options) = args.common.client("netmond")?;
    let client = Client::connect(&ep, options)
        .await
        .with_context(|| format!("connecting to {ep}"))?;
    let (scan_interval, batch_interval, heartbeat_interval) = args.common.intervals();
    let settings = Settings {
        scan_interval,
        batch_interval,
        heartbeat_interval,
        source: args.source,
    };
    tracing::info!(id = %id, endpoint = %ep, "netmond starting");
    daemoneye_netmond::run(
        client,
        &id,
        settings,
        args.proc_root,
        daemoneye_eventbus_collector::cli::terminated(),
    )
    .await?;
    Ok(())
}
