//! The subcommands.

use crate::{BrokerArg, Command, ConfigCommand, ServeTlsArg, SocketArg};
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
            tls,
            config,
            data_dir,
            fsync,
            threads: _,
            metrics,
        } => {
            let storage = (data_dir, fsync);
            serve(&socket, tcp, &tls, config.as_deref(), storage, metrics).await
        }
        Command::Pub {
            socket,
            topic,
            payload,
            count,
            size,
            correlation_id,
            qos,
            timeout,
            name,
        } => {
            let payloads = Payloads::new(payload.as_deref(), size)?;
            let timeout = Duration::try_from_secs_f64(timeout).context("--timeout")?;
            let args = PubArgs {
                topic,
                payloads,
                count,
                correlation_id,
                qos: qos.into(),
                timeout,
            };
            publish(&socket, &name, args).await
        }
        Command::Sub {
            socket,
            patterns,
            count,
            timeout,
            json,
            qos,
            durable,
            delete_durable,
            name,
        } => {
            if let Some(name_to_delete) = delete_durable {
                return delete_durable_sub(&socket, &name, &name_to_delete).await;
            }
            let options = SubOptions {
                count,
                timeout,
                json,
                qos: qos.into(),
                durable,
            };
            subscribe(&socket, &name, &patterns, options).await
        }
        Command::Stats { socket, json } => stats(&socket, json).await,
        Command::Agent {
            socket,
            config,
            rules,
            metrics,
        } => crate::agent_cmd::run(&socket, config.as_deref(), rules, metrics).await,
        Command::Query(args) => crate::query_cmd::run(args).await,
        Command::Rules(crate::RulesCommand::Check { dir }) => {
            crate::agent_cmd::rules_check(dir.as_deref())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            crate::agent_cmd::config_command(Some(&file))
        }
        Command::Config(ConfigCommand::Default) => crate::agent_cmd::config_command(None),
        Command::Audit(crate::AuditCommand::Verify {
            files,
            head,
            anchored,
        }) => audit_verify(&files, head.as_deref(), anchored),
        Command::Audit(crate::AuditCommand::Tail { file, lines, json }) => {
            audit_tail(&file, lines, json)
        }
        Command::Acl(crate::AclCommand::Reload { socket }) => {
            let client = connect(&socket, "eventbus-acl").await?;
            let asked = client
                .request(
                    &daemoneye_eventbus::core::catalog::broker::admin(),
                    "acl reload",
                    Duration::from_secs(10),
                )
                .await;
            client.close().await;
            let reply = asked.map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", String::from_utf8_lossy(reply.payload()));
            Ok(())
        }
        Command::Tls(crate::TlsCommand::Subject { cert }) => {
            println!(
                "{}",
                daemoneye_eventbus::transport::tls::subject_of_file(&cert)?
            );
            Ok(())
        }
        Command::Collector(action) => crate::collector_cmd::run(action).await,
        Command::Bridge { socket, config } => bridge(&socket, &config).await,
        Command::Tls(crate::TlsCommand::DevPki {
            dir,
            hosts,
            clients,
        }) => crate::tls_cmd::dev_pki_command(&dir, &hosts, &clients),
        Command::Acl(crate::AclCommand::Check { file }) => {
            let policy = daemoneye_eventbus::broker::acl::Policy::load(&file)?;
            println!("{}: {} rules, valid", file.display(), policy.len());
            Ok(())
        }
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

/// `eventbus bridge --config FILE`: the file's `agent.bridge` against the local broker.
async fn bridge(socket: &SocketArg, file: &Path) -> Result<()> {
    let config = daemoneye_agent::AgentConfig::load(file)?;
    let Some(settings) = config.agent.bridge else {
        bail!(
            "{} has no [agent.bridge] section (see `eventbus config default`)",
            file.display()
        );
    };
    let local = match (&socket.socket, &config.broker.socket_path) {
        (None, Some(p)) => Endpoint::Unix(p.clone()),
        _ => endpoint(socket)?,
    };
    let signals = Signals::install()?;
    let (url, stream) = (settings.url.clone(), settings.stream.clone());
    let bridge = daemoneye_agent::nats::Bridge::start(settings, &local).await?;
    println!("bridge ready: local {local}, nats {url}, stream {stream}");
    std::io::stdout().flush()?;
    let wait = signals.wait();
    tokio::pin!(wait);
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            r = &mut wait => {
                r?;
                break;
            }
            _ = every.tick() => {
                let s = bridge.stats();
                tracing::info!(connected = s.connected, stored = s.stored, pending = s.pending, failures = s.failures, inbound = s.inbound_published, "bridge");
            }
        }
    }
    let stats = bridge.stats();
    bridge.shutdown().await;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

pub(crate) fn endpoint(arg: &SocketArg) -> Result<Endpoint> {
    Ok(daemoneye_eventbus::collector::cli::endpoint_from(
        arg.socket.as_deref(),
    )?)
}

impl ServeTlsArg {
    /// `broker.tls` with these flags over it; `None` when neither sets a listen address.
    fn apply(
        &self,
        tls: Option<daemoneye_eventbus::broker::TlsListen>,
    ) -> Result<Option<daemoneye_eventbus::broker::TlsListen>> {
        let given =
            self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some();
        let Some(listen) = self
            .tls_listen
            .clone()
            .or_else(|| tls.as_ref().map(|t| t.listen.clone()))
        else {
            if given {
                bail!("--tls-cert, --tls-key and --tls-client-ca need --tls-listen HOST:PORT");
            }
            return Ok(None);
        };
        let pick = |flag: &Option<std::path::PathBuf>, from: Option<&std::path::PathBuf>, name| {
            flag.clone()
                .or_else(|| from.cloned())
                .ok_or_else(|| anyhow!("--tls-listen needs {name} (or its broker.tls key)"))
        };
        Ok(Some(daemoneye_eventbus::broker::TlsListen {
            listen,
            cert: pick(&self.tls_cert, tls.as_ref().map(|t| &t.cert), "--tls-cert")?,
            key: pick(&self.tls_key, tls.as_ref().map(|t| &t.key), "--tls-key")?,
            client_ca: pick(
                &self.tls_client_ca,
                tls.as_ref().map(|t| &t.client_ca),
                "--tls-client-ca",
            )?,
        }))
    }
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
    tls: &ServeTlsArg,
    config: Option<&Path>,
    (data_dir, fsync): (Option<std::path::PathBuf>, Option<crate::FsyncArg>),
    metrics: Option<std::net::SocketAddr>,
) -> Result<()> {
    let mut cfg = match config {
        Some(p) => load_config(p)?,
        None => BrokerConfig::default(),
    };
    if data_dir.is_some() {
        cfg.data_dir = data_dir;
    }
    if let Some(f) = fsync {
        cfg.fsync = f.into();
    }
    let mut endpoints = Vec::new();
    match (&socket.socket, &cfg.socket_path) {
        (None, Some(p)) => endpoints.push(Endpoint::Unix(p.clone())),
        _ => endpoints.push(endpoint(socket)?),
    }
    if let Some(addr) = tcp.or(cfg.tcp_listen) {
        endpoints.push(Endpoint::Tcp(addr));
    }
    cfg.tcp_listen = None;
    cfg.tls = tls.apply(cfg.tls.take())?;
    if let Some(tls) = &cfg.tls {
        endpoints.push(tls.endpoint()?);
    }
    // Handlers go in before the ready line, so a signal sent right after it is handled.
    let signals = Signals::install()?;
    let broker = Broker::start_on(cfg, &endpoints).await?;
    let metrics = match metrics {
        Some(addr) => Some(
            daemoneye_agent::MetricsServer::start(
                addr,
                daemoneye_agent::Probe::broker(broker.clone()),
            )
            .await
            .with_context(|| format!("serving metrics on {addr} (--metrics)"))?,
        ),
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        for e in broker.endpoints() {
            if !matches!(e, Endpoint::InProc(_)) {
                writeln!(out, "listening on {e}")?;
            }
        }
        if let Some(m) = &metrics {
            writeln!(out, "metrics on http://{}/metrics", m.local_addr())?;
        }
        out.flush()?;
    }
    let mut reload = Reload::install()?;
    let wait = signals.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            r = &mut wait => {
                r?;
                break;
            }
            () = reload.next() => reload_acl(&broker),
        }
    }
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

/// `eventbus audit verify`: exits 1 (with the broken link) unless the chain holds.
fn audit_verify(files: &[std::path::PathBuf], head: Option<&str>, anchored: bool) -> Result<()> {
    use daemoneye_eventbus::broker::audit;
    let mut paths = files.to_vec();
    if let [only] = files {
        // The current file alone: its rotated files come first.
        let mut all =
            audit::rotated(only).with_context(|| format!("listing {}", only.display()))?;
        all.push(only.clone());
        paths = all;
    }
    let texts = paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|t| (p.display().to_string(), t))
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let expect = head
        .map(|h| {
            let (seq, hash) = h
                .split_once(':')
                .context("--head is SEQ:HASH, as the broker's audit_head")?;
            Ok::<_, anyhow::Error>(audit::Head {
                seq: seq.parse().context("--head: SEQ is a number")?,
                hash: hash.to_owned(),
            })
        })
        .transpose()?;
    match audit::verify(
        texts.iter().map(|(a, b)| (a.as_str(), b.as_str())),
        anchored,
        expect.as_ref(),
    ) {
        Ok(v) => {
            println!(
                "{} records in {} files, chain intact; head {}:{}",
                v.records,
                texts.len(),
                v.head.seq,
                v.head.hash
            );
            Ok(())
        }
        Err(broken) => anyhow::bail!("audit trail broken at {broken}"),
    }
}

/// `eventbus audit tail`.
fn audit_tail(file: &Path, lines: usize, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let all: Vec<&str> = text.lines().collect();
    let mut out = std::io::stdout().lock();
    for line in &all[all.len().saturating_sub(lines)..] {
        if json {
            writeln!(out, "{line}")?;
            continue;
        }
        let Ok(r) = serde_json::from_str::<daemoneye_eventbus::broker::audit::Record>(line) else {
            writeln!(out, "(not a record) {line}")?;
            continue;
        };
        let when = humantime_ms(r.time_ms);
        let kind = r.event["kind"].as_str().unwrap_or("?");
        let who = &r.event["who"];
        let who = if who.is_null() {
            String::new()
        } else {
            format!(
                " {}uid {} {}{}",
                who["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .map(|n| format!("{n} "))
                    .unwrap_or_default(),
                who["uid"],
                who["exe"].as_str().unwrap_or("-"),
                who["collector"]
                    .as_str()
                    .map(|c| format!(" (collector {c})"))
                    .unwrap_or_default(),
            )
        };
        let mut rest = r.event.clone();
        if let Some(m) = rest.as_object_mut() {
            m.remove("kind");
            m.remove("who");
        }
        writeln!(out, "{when} #{} {kind}{who} {rest}", r.seq)?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn humantime_ms(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// SIGHUP: read `broker.acl_file` again (never on systems without it).
pub(crate) struct Reload {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Reload {
    /// Installs the SIGHUP handler (before the ready line, like [`Signals`]).
    #[cfg(unix)]
    pub(crate) fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    #[cfg(not(unix))]
    pub(crate) fn install() -> Result<Self> {
        Ok(Self {})
    }

    /// The next SIGHUP.
    pub(crate) async fn next(&mut self) {
        #[cfg(unix)]
        if self.hup.recv().await.is_some() {
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// Reads the broker's ACL policy again and says what happened (the policy in force stays
/// when the file is bad).
pub(crate) fn reload_acl(broker: &Broker) {
    match broker.reload_acl() {
        Ok(rules) => eprintln!("ACL policy reloaded: {rules} rules"),
        Err(e) => eprintln!("ACL policy not reloaded, the one in force stays: {e}"),
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

pub(crate) async fn connect(socket: &BrokerArg, name: &str) -> Result<Client> {
    let (ep, tls) = socket.resolve()?;
    let mut options = ClientOptions::named(name);
    options.tls = tls;
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

/// What `pub` publishes.
struct PubArgs {
    topic: String,
    payloads: Payloads,
    count: u64,
    correlation_id: Option<String>,
    qos: daemoneye_eventbus::Qos,
    timeout: Duration,
}

async fn publish(socket: &BrokerArg, name: &str, args: PubArgs) -> Result<()> {
    let topic = Topic::new(&args.topic)?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let client = tokio::time::timeout_at(deadline, connect(socket, name))
        .await
        .map_err(|_| anyhow!("could not connect within --timeout ({:?})", args.timeout))??;
    let count = args.count;
    let mut sent = 0u64;
    let publishing = async {
        for i in 0..count {
            let mut p = Publish::new(topic.clone(), args.payloads.get(i)).qos(args.qos);
            if let Some(id) = &args.correlation_id {
                p = p.correlation(CorrelationMetadata::root(id.clone(), now_ns()));
            }
            client.publish_with(p).await?;
            sent += 1;
        }
        anyhow::Ok(())
    };
    let published = tokio::time::timeout_at(deadline, publishing).await;
    let outcome = match args.qos {
        daemoneye_eventbus::Qos::Processed => {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let report = client.wait_acked(left).await;
            if report.acked == count {
                Ok(())
            } else {
                let why = client
                    .last_rejection()
                    .map(|r| format!("; last refusal: {r}"))
                    .unwrap_or_default();
                Err(anyhow!(
                    "{} of {count} messages acknowledged by the broker ({} refused, {} not \
                     acknowledged within --timeout {:?}, {} not published){why}",
                    report.acked,
                    report.refused,
                    report.outstanding,
                    args.timeout,
                    count - sent
                ))
            }
        }
        _ => {
            let routed = match published {
                Ok(_) => tokio::time::timeout_at(deadline, client.ping())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .is_some(),
                Err(_) => false,
            };
            let stats = client.stats();
            if stats.rejected > 0 {
                let why = client.last_rejection().unwrap_or_default();
                Err(anyhow!(
                    "broker refused {} of {count} messages: {why}",
                    stats.rejected
                ))
            } else if stats.lost > 0 {
                Err(anyhow!(
                    "{} of {count} messages were lost while the broker was unreachable",
                    stats.lost
                ))
            } else if !routed {
                Err(anyhow!(
                    "{sent} of {count} messages published, not confirmed routed within \
                     --timeout {:?}",
                    args.timeout
                ))
            } else {
                Ok(())
            }
        }
    };
    if let Ok(Err(e)) = published {
        client.close().await;
        return Err(e);
    }
    client.close().await;
    outcome
}

/// How `sub` runs.
struct SubOptions {
    count: Option<u64>,
    timeout: Option<f64>,
    json: bool,
    qos: daemoneye_eventbus::Qos,
    durable: Option<String>,
}

async fn subscribe(
    socket: &BrokerArg,
    name: &str,
    patterns: &[String],
    o: SubOptions,
) -> Result<()> {
    let SubOptions {
        count,
        timeout,
        json,
        qos,
        durable,
    } = o;
    let idle = timeout
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--timeout")?;
    let client = connect(socket, name).await?;
    let mut sub = match &durable {
        Some(d) => client.subscribe_durable(d, patterns).await?,
        None => client.subscribe_with(patterns, qos).await?,
    };
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
                // Printed: acknowledged at once (a Processed subscription), so a `sub` killed
                // later is sent again only what it had not printed.
                sub.ack(&msg);
                sub.flush_acks();
            }
            Err(RecvError::Closed) => bail!("the broker connection closed"),
            Err(e @ RecvError::Ended(_)) => bail!("{e}"),
            Err(gap) => eprintln!("warning: {gap}"),
        }
    }
    sub.flush_acks();
    drop(sub);
    // Writes the acknowledgements (and the unsubscribe) before leaving.
    client.drain().await;
    Ok(())
}

async fn delete_durable_sub(socket: &BrokerArg, name: &str, durable: &str) -> Result<()> {
    let client = connect(socket, name).await?;
    let deleted = client.delete_durable(durable).await;
    client.close().await;
    deleted.with_context(|| format!("deleting durable subscription {durable}"))
}

async fn stats(socket: &BrokerArg, json: bool) -> Result<()> {
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

#[cfg(test)]
mod audit_time_tests {
    #[test]
    fn milliseconds_print_as_utc() {
        assert_eq!(super::humantime_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::humantime_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            super::humantime_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
