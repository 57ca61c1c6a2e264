//! `procmond`: the process collector. Started by `eventbus agent` (its supervisor), or by hand
//! against any broker.

#[path = "../procmond_cmd.rs"]
mod procmond_cmd;
#[path = "../shared.rs"]
mod shared;

use clap::Parser;
use std::process::ExitCode;

/// Publishes process starts and exits, snapshots and heartbeats, and answers the collector
/// services on control.collector.{ID}.
#[derive(Parser, Debug)]
#[command(name = "procmond", version)]
struct Cli {
    #[command(flatten)]
    args: procmond_cmd::Args,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shared::init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(procmond_cmd::run(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
