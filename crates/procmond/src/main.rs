//! `procmond`: the process collector. Started by the agent's supervisor, or by hand against
//! any broker. Links the client side of the bus only.

use anyhow::{Context, Result};
use clap::Parser;
use daemoneye_eventbus_client::{Client, ClientOptions, SpoolFull};
use daemoneye_eventbus_collector::cli::CollectorArgs;
use daemoneye_eventbus_collector::services::SourceChoice;
use daemoneye_eventbus_core::Qos;
use daemoneye_procmond::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

/// Publishes process starts and exits, snapshots and heartbeats, and answers the collector
/// services on control.collector.{ID}.
#[derive(Parser, Debug)]
#[command(name = "procmond", version)]
struct Args {
    /// The broker, the id and the intervals.
    #[command(flatten)]
    common: CollectorArgs,
    /// Publish the SHA-256 of each new process's executable on events.process.integrity.
    #[arg(long)]
    hash_executables: bool,
    /// Keep process events made while the broker is away in this directory (made private if
    /// missing), and send them when it is back, or from the next procmond on it if this one
    /// ends first. Process events are then published Processed (acknowledged by the broker)
    /// instead of Realtime; heartbeats stay Realtime.
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Bytes the spool holds at most.
    #[arg(long, default_value_t = ClientOptions::default().spool_max_bytes, requires = "spool_dir")]
    spool_max_bytes: usize,
    /// What an event finds a full spool does (each lost event is counted in the client's
    /// `lost`).
    #[arg(long, value_enum, default_value_t = SpoolFullArg::Refuse, requires = "spool_dir")]
    spool_full: SpoolFullArg,
    /// Where process events come from: `auto` (the kernel's process-events connector when
    /// procmond may listen to it: root, in the initial namespaces; else scanning /proc),
    /// `kernel` (the connector or nothing), `proc` (scanning /proc every --scan-interval-ms:
    /// a process living less may be missed).
    #[arg(long, value_enum, default_value_t = SourceChoice::Auto)]
    source: SourceChoice,
    /// The proc file system to read.
    #[arg(long, default_value = "/proc", hide = true)]
    proc_root: PathBuf,
}

/// `--spool-full`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SpoolFullArg {
    /// The new event is lost.
    Refuse,
    /// The oldest spooled event is dropped to make room.
    DropOldest,
}

fn main() -> ExitCode {
    daemoneye_eventbus_collector::cli::main_with(run(Args::parse()))
}

/// Runs procmond until SIGINT, SIGTERM or a shutdown request.
async fn run(args: Args) -> Result<()> {
    let (id, ep, mut options) = args.common.client("procmond")?;
    let events = if let Some(dir) = &args.spool_dir {
        options.spool_dir = Some(dir.clone());
        options.spool_max_bytes = args.spool_max_bytes;
        options.spool_full = match args.spool_full {
            SpoolFullArg::Refuse => SpoolFull::Refuse,
            SpoolFullArg::DropOldest => SpoolFull::DropOldest,
        };
        Qos::Processed
    } else {
        Qos::Realtime
    };
    let client = Client::connect(&ep, options)
        .await
        .with_context(|| format!("connecting to {ep}"))?;
    let (scan_interval, batch_interval, heartbeat_interval) = args.common.intervals();
    let settings = Settings {
        scan_interval,
        batch_interval,
        heartbeat_interval,
        hash_executables: args.hash_executables,
        source: args.source,
    };
    let stop = daemoneye_eventbus_collector::cli::terminated();
    tracing::info!(id = %id, endpoint = %ep, "procmond starting");
    daemoneye_procmond::run(client, &id, settings, args.proc_root, events, stop).await?;
    Ok(())
}
