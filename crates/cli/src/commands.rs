//! The subcommands.

use crate::{Command, ConfigCommand, SocketArg};
use crate::{output, rpc_cmd};
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use daemoneye_eventbus::broker::BrokerConfig;
use daemoneye_eventbus::client::{Client, ClientOptions, Publish, RecvError};
use daemoneye_eventbus::{Broker, CorrelationMetadata, Endpoint, Topic, catalog};
use serde::Deserialize;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            socket,
            tcp,
            config,
            threads: _,
        } => serve(&socket, tcp, config.as_deref()).await,
        Command::Pub {
            socket,
            topic,
            payload,
            count,
            size,
            correlation_id,
            name,
        } => {
            let payloads = Payloads::new(payload.as_deref(), size)?;
            publish(&socket, &name, &topic, payloads, count, correlation_id).await
        }
        Command::Sub {
            socket,
            patterns,
            count,
            timeout,
            json,
            qos,
            name,
        } => {
            let options = SubOptions {
                count,
                timeout,
                json,
                qos: qos.into(),
            };
            subscribe(&socket, &name, &patterns, options).await
        }
        Command::Stats { socket, json } => stats(&socket, json).await,
        Command::Agent { socket, config } => crate::agent::run(&socket, config.as_deref()).await,
        Command::Config(ConfigCommand::Check { file }) => crate::agent::config_command(Some(&file)),
        Command::Config(ConfigCommand::Default) => crate::agent::config_command(None),
        Command::Procmond(args) => crate::procmond_cmd::run(args).await,
        Command::Reply {
            socket,
            topic,
            echo,
            exec,
            group,
            no_group,
            count,
            concurrency,
            name,
        } => {
            let args = rpc_cmd::ReplyArgs {
                topic,
                answer: rpc_cmd::answer(echo, exec)?,
                group: (!no_group).then_some(group),
                count,
                concurrency,
                name,
            };
            rpc_cmd::reply(&socket, args).await
        }
        Command::Request {
            socket,
            topic,
            payload,
            timeout,
            json,
            name,
        } => {
            let args = rpc_cmd::RequestArgs {
                topic,
                payload,
                timeout,
                json,
                name,
            };
            rpc_cmd::request(&socket, args).await
        }
        #[cfg(unix)]
        Command::Bench(args) => {
            tokio::task::spawn_blocking(move || crate::bench::run(args)).await?
        }
        #[cfg(unix)]
        Command::BenchWorker(role) => crate::bench::run_worker(role).await,
    }
}

pub(crate) fn endpoint(arg: &SocketArg) -> Result<Endpoint> {
    crate::shared::endpoint_from(arg.socket.as_deref())
}

/// Configuration file layout: sections by component.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    broker: BrokerConfig,
}

fn load_config(path: &Path) -> Result<BrokerConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: FileConfig =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.message()))?;
    file.broker
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(file.broker)
}

async fn serve(
    socket: &SocketArg,
    tcp: Option<std::net::SocketAddr>,
    config: Option<&Path>,
) -> Result<()> {
    let mut cfg = match config {
        Some(p) => load_config(p)?,
        None => BrokerConfig::default(),
    };
    let mut endpoints = Vec::new();
    match (&socket.socket, &cfg.socket_path) {
        (None, Some(p)) => endpoints.push(Endpoint::Unix(p.clone())),
        _ => endpoints.push(endpoint(socket)?),
    }
    if let Some(addr) = tcp.or(cfg.tcp_listen) {
        endpoints.push(Endpoint::Tcp(addr));
    }
    cfg.tcp_listen = None;
    // Handlers go in before the ready line, so a signal sent right after it is handled.
    let signals = Signals::install()?;
    let broker = Broker::start_on(cfg, &endpoints).await?;
    {
        let mut out = std::io::stdout().lock();
        for e in broker.endpoints() {
            if !matches!(e, Endpoint::InProc(_)) {
                writeln!(out, "listening on {e}")?;
            }
        }
        out.flush()?;
    }
    signals.wait().await?;
    let report = broker.shutdown().await;
    if !report.drained {
        eprintln!(
            "shutdown deadline passed; sessions torn down: {:?}",
            report.overran
        );
    }
    Ok(())
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere), installed once.
pub(crate) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    pub(crate) fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    #[cfg(unix)]
    pub(crate) async fn wait(mut self) -> Result<()> {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        Ok(())
    }

    #[cfg(not(unix))]
    pub(crate) fn install() -> Result<Self> {
        Ok(Self {})
    }

    #[cfg(not(unix))]
    pub(crate) async fn wait(self) -> Result<()> {
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
    }
}

/// Payload source for `pub`.
enum Payloads {
    Fixed(Bytes),
    Generated(usize),
}

impl Payloads {
    fn new(payload: Option<&str>, size: Option<usize>) -> Result<Self> {
        match (payload, size) {
            (Some(_), Some(_)) => bail!("give either PAYLOAD or --size, not both"),
            (None, Some(n)) => Ok(Self::Generated(n)),
            (Some("-"), None) => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("reading the payload from stdin")?;
                Ok(Self::Fixed(Bytes::from(buf)))
            }
            (Some(p), None) => Ok(Self::Fixed(Bytes::copy_from_slice(p.as_bytes()))),
            (None, None) => bail!("give a PAYLOAD, '-' for stdin, or --size BYTES"),
        }
    }

    fn get(&self, i: u64) -> Bytes {
        match self {
            Self::Fixed(b) => b.clone(),
            Self::Generated(n) => {
                let seed = i.to_le_bytes();
                Bytes::from(
                    (0..*n)
                        .map(|j| seed[j % 8] ^ (j as u8))
                        .collect::<Vec<u8>>(),
                )
            }
        }
    }
}

pub(crate) async fn connect(socket: &SocketArg, name: &str) -> Result<Client> {
    let ep = endpoint(socket)?;
    let mut options = ClientOptions::named(name);
    options.max_message_size = daemoneye_eventbus::core::codec::MAX_MESSAGE_SIZE_LIMIT;
    options.reconnect.max_attempts = Some(5);
    // The error names the endpoint already.
    Ok(Client::connect(&ep, options).await?)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn publish(
    socket: &SocketArg,
    name: &str,
    topic: &str,
    payloads: Payloads,
    count: u64,
    correlation_id: Option<String>,
) -> Result<()> {
    let topic = Topic::new(topic)?;
    let client = connect(socket, name).await?;
    for i in 0..count {
        let mut p = Publish::new(topic.clone(), payloads.get(i));
        if let Some(id) = &correlation_id {
            p = p.correlation(CorrelationMetadata::root(id.clone(), now_ns()));
        }
        client.publish_with(p).await?;
    }
    client
        .ping()
        .await
        .context("waiting for the broker to take every message")?;
    let stats = client.stats();
    client.close().await;
    if stats.rejected > 0 {
        let why = client.last_rejection().unwrap_or_default();
        bail!(
            "broker refused {} of {count} messages: {why}",
            stats.rejected
        );
    }
    if stats.lost > 0 {
        bail!(
            "{} of {count} messages were lost while the broker was unreachable",
            stats.lost
        );
    }
    Ok(())
}

/// How `sub` runs.
struct SubOptions {
    count: Option<u64>,
    timeout: Option<f64>,
    json: bool,
    qos: daemoneye_eventbus::Qos,
}

async fn subscribe(
    socket: &SocketArg,
    name: &str,
    patterns: &[String],
    o: SubOptions,
) -> Result<()> {
    let SubOptions {
        count,
        timeout,
        json,
        qos,
    } = o;
    let idle = timeout
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--timeout")?;
    let client = connect(socket, name).await?;
    let mut sub = client.subscribe_with(patterns, qos).await?;
    eprintln!("ready");
    let mut out = std::io::LineWriter::new(std::io::stdout().lock());
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, sub.recv()).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => sub.recv().await,
        };
        match next {
            Ok(msg) => {
                seen += 1;
                output::print_message(&mut out, &msg, json)?;
            }
            Err(RecvError::Closed) => bail!("the broker connection closed"),
            Err(gap) => eprintln!("warning: {gap}"),
        }
    }
    drop(sub);
    client.close().await;
    Ok(())
}

async fn stats(socket: &SocketArg, json: bool) -> Result<()> {
    let client = connect(socket, "eventbus-stats").await?;
    let mut sub = client.subscribe([catalog::sys::stats().as_str()]).await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .context("no statistics from the broker within 5 s")??;
    let stats =
        daemoneye_eventbus::broker::parse_stats(msg.payload()).context("decoding statistics")?;
    drop(sub);
    client.close().await;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", String::from_utf8_lossy(msg.payload()))?;
    } else {
        output::print_stats(&mut out, &stats)?;
    }
    Ok(())
}
