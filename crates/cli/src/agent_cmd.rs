//! `eventbus agent` and `eventbus config`: a thin shell over the agent library
//! (`daemoneye-agent`): signals, the ready line, statistics in the log, and a live status view
//! on a terminal.

use crate::SocketArg;
use crate::commands::Signals;
use anyhow::Result;
use daemoneye_agent::config::{self, AgentConfig};
use daemoneye_agent::{Agent, AgentOptions, CollectorView, Report};
use daemoneye_eventbus::Endpoint;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

/// Runs the agent until SIGINT or SIGTERM.
pub(crate) async fn run(
    socket: &SocketArg,
    config_path: Option<&Path>,
    rules: Option<std::path::PathBuf>,
    metrics: Option<String>,
) -> Result<()> {
    let mut config = match config_path {
        Some(p) => AgentConfig::load(&config::absolute(p))?,
        None => AgentConfig::default(),
    };
    if let Some(dir) = rules {
        config.agent.rules_dir = Some(config::absolute(&dir));
    }
    if let Some(addr) = metrics {
        config.agent.metrics_listen = Some(addr);
    }
    let endpoint = match (&socket.socket, &config.broker.socket_path) {
        (None, Some(p)) => Endpoint::Unix(p.clone()),
        _ => crate::commands::endpoint(socket)?,
    };
    let signals = Signals::install()?;
    let mut reload = crate::commands::Reload::install()?;
    let live = config.agent.live_view && std::io::stdout().is_terminal();
    let every = Duration::from_secs(config.agent.status_interval_seconds);
    let mut agent = Agent::start(config, endpoint, AgentOptions::beside_this_program()?).await?;
    let listening = agent
        .broker()
        .endpoints()
        .iter()
        .filter(|e| !matches!(e, Endpoint::InProc(_)))
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ");
    let names: Vec<String> = agent
        .supervisor()
        .status()
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    println!(
        "agent ready: broker on {listening}, collectors: {}",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    );
    if let Some(addr) = agent.metrics_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    let _ = std::io::stdout().flush();
    let wait = signals.wait();
    tokio::pin!(wait);
    // The first report waits until every running collector was heard.
    let heard = agent.wait_until_heard();
    tokio::select! {
        r = &mut wait => {
            r?;
            return stop(agent).await;
        }
        r = heard => r?,
    }
    // The live view redraws every second; reports are published every status interval.
    let mut redraw = tokio::time::interval(if live { Duration::from_secs(1) } else { every });
    let mut publish_at = tokio::time::Instant::now();
    let mut last_health = None;
    loop {
        tokio::select! {
            r = &mut wait => {
                r?;
                break;
            }
            () = reload.next() => crate::commands::reload_acl(agent.broker()),
            _ = redraw.tick() => {
                let report = agent.report().await?;
                if tokio::time::Instant::now() >= publish_at {
                    agent.publish(&report).await;
                    publish_at += every;
                }
                if live {
                    draw(&report);
                } else {
                    log_line(&report);
                }
                if last_health != Some(report.health) {
                    tracing::info!(health = ?report.health, "agent health changed");
                    last_health = Some(report.health);
                }
            }
        }
    }
    stop(agent).await
}

async fn stop(agent: Agent) -> Result<()> {
    println!("agent stopping: collectors first, then the broker");
    let (collectors, report) = agent.shutdown().await;
    for s in collectors {
        println!(
            "collector {}: {}",
            s.id,
            s.last_exit.unwrap_or_else(|| s.state.to_string())
        );
    }
    if report.drained {
        println!("agent stopped");
    } else {
        let overran: Vec<String> = report
            .overran
            .iter()
            .map(|(name, id)| format!("{name} (session {id})"))
            .collect();
        println!(
            "agent stopped; sessions torn down after the drain deadline: {}",
            overran.join(", ")
        );
    }
    Ok(())
}

fn collector_line(c: &CollectorView) -> String {
    let pid = c.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
    let beat = c
        .heartbeat_age_secs
        .map_or_else(|| "never".to_owned(), |a| format!("{a:.1} s ago"));
    let mut line = format!(
        "{:<12} {:<9} {:<10} pid {:<8} restarts {:<3} heartbeat {:<10} {} ({})",
        c.id, c.collector_type, c.state, pid, c.restart_count, beat, c.health, c.health_reason
    );
    if !c.capabilities.is_empty() {
        line.push_str(&format!("\n{:<14}can: {}", "", c.capabilities.join(", ")));
    }
    line
}

fn log_line(r: &Report) {
    let collectors: Vec<String> = r
        .collectors
        .iter()
        .map(|c| format!("{} {} {}", c.id, c.state, c.health))
        .collect();
    println!(
        "agent: health {:?} | published {} delivered {} dropped {} connections {} | collectors: {} | alerts {} | events/s: {}",
        r.health,
        r.published,
        r.delivered,
        r.dropped,
        r.connections,
        collectors.join(", "),
        r.detection.alerts,
        r.events_per_sec
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn draw(r: &Report) {
    let mut out = String::from("\x1b[H\x1b[2J");
    out.push_str(&format!(
        "daemoneye agent — health {:?}   (Ctrl-C to stop)\n\n",
        r.health
    ));
    for (name, p) in [
        ("broker", &r.broker),
        ("rpc", &r.rpc),
        ("collectors", &r.collectors_health),
    ] {
        out.push_str(&format!(
            "  {name:<11} {:<10} {}\n",
            format!("{:?}", p.health),
            p.reason
        ));
    }
    out.push_str(&format!(
        "\nbroker: {} connections, {} published, {} delivered, {} dropped\n\ncollectors:\n",
        r.connections, r.published, r.delivered, r.dropped
    ));
    for c in &r.collectors {
        out.push_str(&format!("  {}\n", collector_line(c)));
    }
    let d = &r.detection;
    out.push_str(&format!(
        "\ndetection: {} rules, {} alerts raised; tasks {} in flight, {} complete, {} partial, {} late\n",
        d.rules.len(),
        d.alerts,
        d.tasks.in_flight,
        d.tasks.complete,
        d.tasks.partial,
        d.tasks.late
    ));
    for rule in &d.rules {
        out.push_str(&format!(
            "  {:<28} {:<8} every {:>4} s  evaluations {:<5} matches {:<4} alerts {:<4} {}\n",
            rule.id,
            rule.severity,
            rule.interval_secs,
            rule.evaluations,
            rule.matches,
            rule.alerts,
            rule.last_problem.as_deref().unwrap_or("")
        ));
    }
    for refused in &d.refused {
        out.push_str(&format!("  refused: {refused}\n"));
    }
    out.push_str("\nevents/s by topic:\n");
    if r.events_per_sec.is_empty() {
        out.push_str("  (none yet)\n");
    }
    for (t, n) in &r.events_per_sec {
        out.push_str(&format!("  {t:<40} {n:>10.1}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// `eventbus config check FILE` / `eventbus config default`.
pub(crate) fn config_command(check: Option<&Path>) -> Result<()> {
    match check {
        Some(p) => println!("{}", config::check(&config::absolute(p))?),
        None => print!("{}", AgentConfig::default_toml()),
    }
    Ok(())
}

/// `eventbus rules check [DIR]`: each rule, or each file's problem; an error (exit 1) when any
/// rule is refused.
pub(crate) fn rules_check(dir: Option<&Path>) -> Result<()> {
    let (rules, refused) = daemoneye_agent::detection::load_rules(dir)?;
    for r in &rules {
        let tables: Vec<&str> = r.tables.iter().map(|t| t.name()).collect();
        println!(
            "{}: rule {} ({}, every {} s, reads {}): valid",
            r.source,
            r.id,
            r.severity.as_str(),
            r.interval.as_secs(),
            tables.join(", ")
        );
    }
    for e in &refused {
        println!("{e}");
    }
    if refused.is_empty() {
        println!("{} rules, valid", rules.len());
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} rules refused",
            refused.len(),
            rules.len() + refused.len()
        )
    }
}
