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
    /// Which of a repeated workload's runs this is (from 1), for workloads run more than once.
    pub(crate) run: Option<u32>,
    /// W7: the collector's CPU over the row's seconds, percent of one core.
    pub(crate) collector_cpu_pct: Option<f64>,
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn rate(n: u64, secs: f64) -> Option<f64> {
    (secs > 0.0).then(|| n as f64 / secs)
}

impl Row {
    pub(crate) fn empty(
        peer: &str,
        workload: &str,
        variant: &str,
        payload: usize,
        messages: u64,
    ) -> Self {
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
            run: None,
            collector_cpu_pct: None,
        }
    }

    /// W7: `messages` processes started over `secs` (the rest is filled in by the caller).
    pub(crate) fn collector(
        collector: &str,
        workload: &str,
        variant: &str,
        messages: u64,
        secs: f64,
    ) -> Self {
        let mut row = Self::empty(collector, workload, variant, 0, messages);
        row.seconds = Some(secs);
        row.msgs_per_sec = rate(messages, secs);
        row
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

    /// W6: a durable subscription's backlog redelivered, from the subscriber's first message
    /// to its last.
    /// W6 over `transport` (`uds`, `tls`): a durable subscription's `phase` (`durable-publish`: its backlog published, every
    /// message acknowledged; `durable-backlog`: the backlog redelivered), `received` of
    /// `count` in `secs`; `disk`: the broker keeps durable subscriptions on disk, with this
    /// `fsync`.
    pub(crate) fn durable(
        transport: &str,
        phase: &str,
        disk: Option<&str>,
        count: u64,
        received: u64,
        secs: f64,
        rss: Option<u64>,
    ) -> Self {
        let variant = match disk {
            Some(fsync) => format!("{transport},proc,processed,{phase},disk,fsync={fsync}"),
            None => format!("{transport},proc,processed,{phase}"),
        };
        let mut row = Self::empty("daemoneye-eventbus", "w6", &variant, 256, count);
        row.seconds = Some(secs);
        row.msgs_per_sec = rate(received, secs);
        row.mb_per_sec = rate(received * 256, secs).map(|b| b / 1e6);
        row.lost = count.saturating_sub(received);
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
    /// How much slower the healthy W2 subscribers received with a stalled fifth subscriber,
    /// in percent (negative: faster): the median over the alternating pairs.
    pub(crate) stalled_reader_drop_pct: Option<f64>,
    /// The same for each pair, in the order run.
    pub(crate) stalled_reader_drop_pct_by_pair: Option<Vec<f64>>,
}

/// The slow-reader isolation figure from W2's alternating runs: for each pair (same `run`),
/// how much lower the healthy subscribers' rate was with the stalled subscriber, in percent;
/// and the median of those. `None` without a complete pair.
pub(crate) fn stalled_reader_drop(rows: &[Row]) -> Option<(f64, Vec<f64>)> {
    let w2 = |stalled: bool, run: u32| {
        rows.iter().find(|r| {
            r.workload == "w2" && r.run == Some(run) && r.variant.ends_with(",+1stalled") == stalled
        })
    };
    let runs = rows
        .iter()
        .filter_map(|r| r.run.filter(|_| r.workload == "w2"));
    let mut runs: Vec<u32> = runs.collect();
    runs.sort_unstable();
    runs.dedup();
    let by_pair: Vec<f64> = runs
        .into_iter()
        .filter_map(|run| {
            let plain = w2(false, run)?.msgs_per_sec?;
            let stalled = w2(true, run)?.msgs_per_sec?;
            (plain > 0.0).then(|| (plain - stalled) / plain * 100.0)
        })
        .collect();
    let mut sorted = by_pair.clone();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => return None,
        n if n % 2 == 1 => sorted[n / 2],
        n => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    };
    Some((median, by_pair))
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
        if let Some(cpu) = r.collector_cpu_pct {
            writeln!(out, "{:<26} {} CPU: {cpu:.2} % of one core", "", r.peer)?;
        }
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
    if let (Some(median), Some(pairs)) = (
        s.stalled_reader_drop_pct,
        s.stalled_reader_drop_pct_by_pair.as_ref(),
    ) {
        let pairs: Vec<String> = pairs.iter().map(|p| format!("{p:+.1}")).collect();
        writeln!(
            out,
            "w2 healthy subscribers with a stalled fifth: {median:+.1} % slower (median of \
             {} alternating pairs: {} %)",
            pairs.len(),
            pairs.join(", ")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w2(variant: &str, run: u32, rate: f64) -> Row {
        let mut r = Row::empty("daemoneye-eventbus", "w2", variant, 256, 1000);
        r.msgs_per_sec = Some(rate);
        r.run = Some(run);
        r
    }

    #[test]
    fn the_stalled_reader_drop_pairs_runs_by_number_and_takes_the_median() {
        let rows = [
            w2("uds,proc,processed", 1, 100.0),
            w2("uds,proc,processed,+1stalled", 1, 80.0),
            w2("uds,proc,processed", 2, 100.0),
            w2("uds,proc,processed,+1stalled", 2, 105.0),
            w2("uds,proc,processed", 3, 200.0),
            w2("uds,proc,processed,+1stalled", 3, 196.0),
            // Not part of the pairs.
            Row::empty(
                "daemoneye-eventbus",
                "w2",
                "uds,proc,processed,31conns",
                256,
                1,
            ),
        ];
        let (median, pairs) = stalled_reader_drop(&rows).unwrap();
        assert_eq!(pairs, vec![20.0, -5.0, 2.0]);
        assert!((median - 2.0).abs() < 1e-9, "{median}");
        let (median, _) = stalled_reader_drop(&rows[..4]).unwrap();
        assert!((median - 7.5).abs() < 1e-9, "{median}");
        assert!(
            stalled_reader_drop(&rows[..1]).is_none(),
            "no pair, no figure"
        );
    }
}
