//! Benchmark rows, their JSON form and the readable table.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use std::io::Write;

/// One result line (the fields of `docs/benchmarks.md`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) peer: String,
    pub(crate) workload: String,
    pub(crate) variant: String,
    pub(crate) payload_bytes: usize,
    pub(crate) messages: u64,
    pub(crate) seconds: Option<f64>,
    pub(crate) msgs_per_sec: Option<f64>,
    pub(crate) mb_per_sec: Option<f64>,
    pub(crate) lost: u64,
    pub(crate) p50_us: Option<u64>,
    pub(crate) p99_us: Option<u64>,
    pub(crate) p999_us: Option<u64>,
    pub(crate) max_us: Option<u64>,
    pub(crate) per_sub_msgs_per_sec: Option<Vec<f64>>,
    pub(crate) broker_peak_rss_kb: Option<u64>,
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn rate(n: u64, secs: f64) -> Option<f64> {
    (secs > 0.0).then(|| n as f64 / secs)
}

impl Row {
    fn empty(peer: &str, workload: &str, variant: &str, payload: usize, messages: u64) -> Self {
        Self {
            peer: peer.into(),
            workload: workload.into(),
            variant: variant.into(),
            payload_bytes: payload,
            messages,
            seconds: None,
            msgs_per_sec: None,
            mb_per_sec: None,
            lost: 0,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            max_us: None,
            per_sub_msgs_per_sec: None,
            broker_peak_rss_kb: None,
        }
    }

    /// Deliveries over (last receive on any subscriber − first publish).
    pub(crate) fn throughput(
        workload: &str,
        variant: &str,
        payload: usize,
        expected: u64,
        publisher: &Value,
        subs: &[Value],
        rss: Option<u64>,
    ) -> Self {
        let start = num(publisher, "start_ns");
        let received: u64 = subs.iter().map(|s| num(s, "received")).sum();
        let last = subs
            .iter()
            .map(|s| num(s, "last_ns"))
            .max()
            .unwrap_or(start);
        let secs = last.saturating_sub(start) as f64 / 1e9;
        let mut row = Self::empty("daemoneye-eventbus", workload, variant, payload, expected);
        row.seconds = Some(secs);
        row.msgs_per_sec = rate(received, secs);
        row.mb_per_sec = rate(received * payload as u64, secs).map(|b| b / 1e6);
        row.lost = expected.saturating_sub(received);
        if subs.len() > 1 {
            let per = subs.iter().map(|s| {
                let secs = num(s, "last_ns").saturating_sub(start) as f64 / 1e9;
                rate(num(s, "received"), secs).unwrap_or(0.0)
            });
            row.per_sub_msgs_per_sec = Some(per.collect());
        }
        row.broker_peak_rss_kb = rss;
        row
    }

    /// Round-trip latency percentiles.
    pub(crate) fn latency(
        peer: &str,
        workload: &str,
        variant: &str,
        count: u64,
        r: &Value,
        rss: Option<u64>,
    ) -> Self {
        let mut row = Self::empty(peer, workload, variant, 256, count);
        let start = num(r, "start_ns").max(num(r, "ping_start_ns"));
        let secs = num(r, "end_ns").saturating_sub(start) as f64 / 1e9;
        row.seconds = Some(secs);
        row.msgs_per_sec = rate(count, secs);
        row.lost = num(r, "lost");
        row.p50_us = r["p50_us"].as_u64();
        row.p99_us = r["p99_us"].as_u64();
        row.p999_us = r["p999_us"].as_u64();
        row.max_us = r["max_us"].as_u64();
        row.broker_peak_rss_kb = rss;
        row
    }

    /// The raw socket's streaming rate.
    pub(crate) fn floor_stream(count: u64, received: u64, secs: f64) -> Self {
        let mut row = Self::empty("floor", "w1", "uds,proc", 256, count);
        row.seconds = Some(secs);
        row.msgs_per_sec = rate(received, secs);
        row.mb_per_sec = rate(received * 256, secs).map(|b| b / 1e6);
        row.lost = count.saturating_sub(received);
        row
    }
}

/// Broker figures for the whole run.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub(crate) broker_ready_ms: Option<f64>,
    pub(crate) broker_idle_rss_kb: Option<u64>,
    pub(crate) broker_peak_rss_kb: Option<u64>,
}

/// A field of `/proc/PID/status`, in kB.
pub(crate) fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A progress bar on stderr, hidden with `--json` or when stderr is not a terminal.
pub(crate) fn progress(steps: u64, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_bar} {msg} ({elapsed})")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

pub(crate) fn print_json(rows: &[Row]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for r in rows {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
    }
    Ok(())
}

pub(crate) fn print_summary_json(s: &Summary) -> Result<()> {
    let mut v = serde_json::to_value(s)?;
    v["peer"] = "daemoneye-eventbus".into();
    v["workload"] = "summary".into();
    println!("{v}");
    Ok(())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn human(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1e6 => format!("{:.2}M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.1}"),
    }
}

pub(crate) fn print_table(rows: &[Row], s: &Summary) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<4} {:<26} {:>7} {:>9} {:>9} {:>8} {:>6} {:>6} {:>6} {:>7} {:>7}",
        "peer",
        "wl",
        "variant",
        "payload",
        "messages",
        "msg/s",
        "MB/s",
        "lost",
        "p50us",
        "p99us",
        "p99.9us",
        "maxus"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<20} {:<4} {:<26} {:>7} {:>9} {:>9} {:>8} {:>6} {:>6} {:>6} {:>7} {:>7}",
            r.peer,
            r.workload,
            r.variant,
            r.payload_bytes,
            r.messages,
            human(r.msgs_per_sec),
            human(r.mb_per_sec),
            r.lost,
            opt(r.p50_us),
            opt(r.p99_us),
            opt(r.p999_us),
            opt(r.max_us)
        )?;
        if let Some(per) = &r.per_sub_msgs_per_sec {
            let per: Vec<String> = per.iter().map(|v| human(Some(*v))).collect();
            writeln!(out, "{:<26} per subscriber msg/s: {}", "", per.join(" | "))?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "broker ready after start: {} ms (process spawn included)",
        s.broker_ready_ms.map_or("-".into(), |v| format!("{v:.1}"))
    )?;
    writeln!(
        out,
        "broker RSS idle: {} kB, peak: {} kB",
        opt(s.broker_idle_rss_kb),
        opt(s.broker_peak_rss_kb)
    )?;
    Ok(())
}
