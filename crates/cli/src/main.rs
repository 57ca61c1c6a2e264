//! `eventbus`: run a broker, publish, subscribe and read statistics.
//!
//! Every error exits non-zero with one line on stderr.

mod agent_cmd;
#[cfg(unix)]
mod bench;
mod collector_cmd;
mod commands;
mod output;
mod query_cmd;
mod rpc_cmd;
mod tls_cmd;

use daemoneye_eventbus::collector::cli::BrokerArg;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// daemoneye-eventbus command line.
#[derive(Parser, Debug)]
#[command(
    name = "eventbus",
    version,
    about = "Embedded IPC event bus for host security agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to find the broker: `--socket`, else `EVENTBUS_SOCKET`, else the default path.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SocketArg {
    /// Socket path or endpoint (unix:///path, tcp://127.0.0.1:PORT).
    #[arg(long, env = "EVENTBUS_SOCKET", value_name = "PATH")]
    socket: Option<String>,
}

/// `eventbus serve`'s mutual TLS listener (each overrides its `broker.tls` key).
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct ServeTlsArg {
    /// Also serve other hosts on this address, `HOST:PORT`, over TCP with mutual TLS.
    #[arg(long, value_name = "HOST:PORT")]
    tls_listen: Option<String>,
    /// The broker's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The broker's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) clients' certificates must chain to.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
}

/// `eventbus tls` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum TlsCommand {
    /// Print the subject of the first certificate in a PEM file, as the broker reports a
    /// client presenting it and as a policy rule's `tls_subject` names it.
    Subject {
        /// The certificate file.
        cert: PathBuf,
    },
    /// Make a development PKI in DIR: a CA (`ca.pem`, `ca.key`), a broker certificate for
    /// localhost, 127.0.0.1, ::1 and each --host (`broker.pem`, `broker.key`), and a client
    /// certificate per --client (`client-NAME.pem`, `.key`), valid 90 days. For trying mutual
    /// TLS and benchmarking it; production brokers use certificates from your own CA.
    DevPki {
        /// Where to write them (created private; the files must not exist yet).
        dir: PathBuf,
        /// Another name or address the broker certificate is valid for.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// A client certificate for this name (its subject's CN).
        #[arg(long = "client", value_name = "NAME", default_values_t = ["client".to_owned()])]
        clients: Vec<String>,
    },
}

/// `eventbus config` subcommands.
#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Check a configuration file (TOML, or YAML by its .yaml/.yml extension).
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the default configuration, commented.
    Default,
}

/// `eventbus rules` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum RulesCommand {
    /// Check the rule files of a directory (without one, the built-in example rules): prints
    /// each rule, or each file's problem; exits 1 if any rule is refused.
    Check {
        /// The directory.
        dir: Option<PathBuf>,
    },
}

/// `eventbus acl` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum AclCommand {
    /// Check a policy file (`broker.acl_file`: TOML, or YAML by its .yaml/.yml extension):
    /// prints how many rules it has, or what is wrong with it.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Ask a running broker to read its `acl_file` again (a request on
    /// `control.broker.admin`, which its policy must grant you; SIGHUP does the same).
    Reload {
        #[command(flatten)]
        socket: BrokerArg,
    },
}

/// `eventbus audit` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Check the SHA-256 chain of audit files (`broker.audit_log`): give the rotated files and
    /// the current one, oldest first (`audit.log.1 audit.log.2 … audit.log`), or just the
    /// current one to have its rotated files found. Prints the first broken link and exits 1
    /// on any change, removal, reordering or truncation.
    Verify {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The chain must end at this record, `SEQ:HASH` (the broker's `audit_head` in
        /// `eventbus stats --json`): records cut off the end show too.
        #[arg(long, value_name = "SEQ:HASH")]
        head: Option<String>,
        /// The files start later in the chain (older files were removed).
        #[arg(long)]
        anchored: bool,
    },
    /// Print the last records of an audit file readably.
    Tail {
        /// The file.
        file: PathBuf,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// The records as written, one JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: the embedded broker, the supervised collectors (the bundled procmond
    /// unless configured otherwise), health and statistics, until SIGINT or SIGTERM.
    Agent {
        #[command(flatten)]
        socket: SocketArg,
        /// Configuration file (TOML or YAML; see `eventbus config default`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Detection rules: a directory of rule files (overrides `agent.rules_dir`; unset:
        /// the built-in example rules).
        #[arg(long, value_name = "DIR")]
        rules: Option<PathBuf>,
        /// Serve `/metrics`, `/healthz` and `/readyz` on this `HOST:PORT`, or `off`
        /// (overrides `agent.metrics_listen`; default 127.0.0.1:9477).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Detection rules (`docs/rules.md`).
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Run one SELECT over the collectors' tables through a running agent
    /// (`control.agent.query`, which the broker's policy must grant you): rows as a table or
    /// JSON, with the collectors that answered. Exit status as `request`'s.
    Query(query_cmd::QueryArgs),
    /// Check or print the agent's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The broker's access control policy (`broker.acl_file`).
    #[command(subcommand)]
    Acl(AclCommand),
    /// The broker's audit trail (`broker.audit_log`).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// TCP with mutual TLS.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The agent's collectors: list, status, start, stop, restart, pause, resume (through its
    /// lifecycle service, control.agent.lifecycle). Exit status as `request`'s.
    #[command(subcommand)]
    Collector(collector_cmd::Action),
    /// Run the NATS JetStream bridge of a configuration file's `agent.bridge` beside a
    /// broker (`eventbus serve`, or an agent without its own bridge), until SIGINT or
    /// SIGTERM. The local socket is `--socket`, else the file's `broker.socket_path`.
    Bridge {
        #[command(flatten)]
        socket: SocketArg,
        /// Configuration file (TOML or YAML) with an `[agent.bridge]` section.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a broker in the foreground until SIGINT or SIGTERM.
    Serve {
        #[command(flatten)]
        socket: SocketArg,
        /// Also listen on this loopback TCP address (plain TCP).
        #[arg(long, value_name = "ADDR")]
        tcp: Option<std::net::SocketAddr>,
        #[command(flatten)]
        tls: ServeTlsArg,
        /// TOML configuration file with a `[broker]` section.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Keep durable subscriptions in this directory, so that they survive the broker
        /// (made private if missing; overrides `broker.data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// When durable subscriptions' logs reach the disk: `always` (before each
        /// publisher's ACK), `interval` (every `fsync_interval_ms`), `never` (left to the
        /// operating system). Overrides `broker.fsync`.
        #[arg(long, value_enum, value_name = "MODE")]
        fsync: Option<FsyncArg>,
        /// Threads routing messages. One (the default) is fastest for a local bus: every
        /// session runs on one thread, so hand-overs between a publisher's reader and a
        /// subscriber's writer are plain function calls, never cross-thread wake-ups (W1
        /// measured +18 % against two threads on a 2-core machine, `docs/benchmarks.md`).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        /// Serve `/metrics`, `/healthz` and `/readyz` over HTTP on this address (off by
        /// default; unauthenticated, so keep it on loopback).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Publish one or more messages.
    Pub {
        #[command(flatten)]
        socket: BrokerArg,
        /// Topic to publish on.
        topic: String,
        /// Payload text, or '-' to read it from stdin.
        payload: Option<String>,
        /// Number of messages.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Publish generated payloads of this many bytes instead of PAYLOAD.
        #[arg(long, value_name = "BYTES")]
        size: Option<usize>,
        /// Correlation id attached to every message.
        #[arg(long, value_name = "ID")]
        correlation_id: Option<String>,
        /// Delivery guarantee: `realtime` (routed at most once; the exit status says the broker
        /// routed every message) or `processed` (the exit status says the broker acknowledged
        /// every message: every matching Processed subscription holds it).
        #[arg(long, value_enum, default_value = "realtime")]
        qos: QosArg,
        /// Seconds the whole command may take; past them it prints how far it got and exits
        /// non-zero.
        #[arg(long, default_value_t = 10.0, value_name = "SECS")]
        timeout: f64,
        /// Client name.
        #[arg(long, default_value = "eventbus-pub")]
        name: String,
    },
    /// Subscribe and print messages.
    Sub {
        #[command(flatten)]
        socket: BrokerArg,
        /// Topic filters (`+`, `*`, `#` wildcards).
        #[arg(required_unless_present = "delete_durable")]
        patterns: Vec<String>,
        /// Subscribe durably under this name (Processed): the broker keeps what this
        /// subscriber has not acknowledged, and what is published while nobody is subscribed,
        /// for the next `sub --durable` of the name. Each message is acknowledged once
        /// printed.
        #[arg(long, value_name = "NAME", conflicts_with = "delete_durable")]
        durable: Option<String>,
        /// Delete the durable subscription NAME (and its backlog), then exit.
        #[arg(long, value_name = "NAME")]
        delete_durable: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds without a message.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Delivery guarantee: `realtime` (at most once, the broker may drop for a slow
        /// reader) or `processed` (nothing dropped; publishers wait for room).
        #[arg(long, value_enum, default_value = "realtime")]
        qos: QosArg,
        /// Client name.
        #[arg(long, default_value = "eventbus-sub")]
        name: String,
    },
    /// Answer requests on a topic: echo them, or run a command for each.
    Reply {
        #[command(flatten)]
        socket: BrokerArg,
        /// Topic filter to serve (`+`, `*`, `#` wildcards).
        topic: String,
        /// Answer with the request's payload.
        #[arg(long)]
        echo: bool,
        /// Answer with the standard output of `sh -c CMD`, which gets the request payload on
        /// standard input; a non-zero exit is sent back as an execution error with its
        /// standard error. Killed at the request's deadline.
        #[arg(long, value_name = "CMD")]
        exec: Option<String>,
        /// Queue group: several responders in one group share the requests.
        #[arg(long, default_value = "eventbus-reply", value_name = "NAME")]
        group: String,
        /// Every responder gets every request (no queue group).
        #[arg(long, conflicts_with = "group")]
        no_group: bool,
        /// Stop after answering this many requests.
        #[arg(long)]
        count: Option<u64>,
        /// Requests handled at the same time.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Client name.
        #[arg(long, default_value = "eventbus-reply")]
        name: String,
    },
    /// Send one request and print the reply. Exit status: 0 answered, 3 no responders,
    /// 4 timeout, 5 the responder refused or failed, 6 other RPC failure, 1 anything else.
    Request {
        #[command(flatten)]
        socket: BrokerArg,
        /// Topic to send the request to.
        topic: String,
        /// Payload text, or '-' to read it from stdin (default: empty).
        payload: Option<String>,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 5.0, value_name = "SECS")]
        timeout: f64,
        /// Print the reply (or the error) as one JSON object.
        #[arg(long)]
        json: bool,
        /// Client name.
        #[arg(long, default_value = "eventbus-request")]
        name: String,
    },
    /// Run the benchmark workloads (W1–W5 and the raw-socket floor) in separate processes.
    #[cfg(unix)]
    Bench(bench::BenchArgs),
    /// A benchmark participant (started by `eventbus bench`).
    #[cfg(unix)]
    #[command(hide = true, subcommand)]
    BenchWorker(bench::Role),
    /// Print broker statistics.
    Stats {
        #[command(flatten)]
        socket: BrokerArg,
        /// Print the raw JSON snapshot.
        #[arg(long)]
        json: bool,
    },
}

/// `--fsync` values (`broker.fsync`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsyncArg {
    /// Synced before each publisher's ACK: survives a power loss.
    Always,
    /// Synced every `fsync_interval_ms`: survives a killed broker.
    Interval,
    /// Left to the operating system: survives a killed broker.
    Never,
}

impl FsyncArg {
    /// How `eventbus serve --fsync` spells it (the benchmarks' labels; Unix only).
    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Interval => "interval",
            Self::Never => "never",
        }
    }
}

impl From<FsyncArg> for daemoneye_eventbus::broker::FsyncPolicy {
    fn from(f: FsyncArg) -> Self {
        match f {
            FsyncArg::Always => Self::Always,
            FsyncArg::Interval => Self::Interval,
            FsyncArg::Never => Self::Never,
        }
    }
}

/// `--qos` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QosArg {
    /// At most once.
    Realtime,
    /// At least once: nothing dropped for this subscriber.
    Processed,
}

impl From<QosArg> for daemoneye_eventbus::Qos {
    fn from(q: QosArg) -> Self {
        match q {
            QosArg::Realtime => Self::Realtime,
            QosArg::Processed => Self::Processed,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemoneye_eventbus::collector::cli::init_logging();
    // A benchmark participant is one connection doing one thing, and a broker on one thread
    // hands messages from reader to writer without cross-thread wake-ups.
    let builder = match &cli.command {
        #[cfg(unix)]
        Command::BenchWorker(_) => tokio::runtime::Builder::new_current_thread(),
        Command::Serve { threads: 1, .. } | Command::Agent { .. } => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Serve { threads, .. } => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(*threads));
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match { builder }.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<rpc_cmd::CallFailed>() {
                Some(failed) => ExitCode::from(failed.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}
