//! `eventbus bench` end to end, at a tiny scale: every workload runs across real processes,
//! nothing is lost, and the report carries every field `docs/benchmarks.md` relies on. No
//! figure is judged here (figures belong to the benchmark, not to tests).
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Proc, eventbus};
use serde_json::Value;

fn r_has(rows: &[&Value], workload: &str, variant: &str) -> bool {
    rows.iter()
        .any(|r| r["workload"] == workload && r["variant"].as_str().unwrap().contains(variant))
}

fn run(args: &[&str]) -> Vec<String> {
    let mut cmd = eventbus();
    cmd.arg("bench").args(args);
    let mut p = Proc::spawn(cmd);
    let code = p.wait();
    let out = p.stdout_lines();
    assert_eq!(code, 0, "bench failed: {:?} {:?}", out, p.stderr_lines());
    out
}

#[test]
fn every_workload_runs_across_processes_without_loss_and_reports_every_field() {
    let rows: Vec<Value> = run(&["--json", "--scale", "0.002"])
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, rows): (Vec<&Value>, Vec<&Value>) =
        rows.iter().partition(|r| r["workload"] == "summary");
    for w in ["w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"] {
        assert!(rows.iter().any(|r| r["workload"] == w), "no {w} row");
    }
    // W9: the scrapes timed, then W1 pairs without and with a scrape every second.
    let w9: Vec<&str> = rows
        .iter()
        .filter(|r| r["workload"] == "w9")
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert!(w9[0].starts_with("scrape,64conns,1024filters"), "{w9:?}");
    assert!(
        r_has(&rows, "w9", "scraped-every-1s") && w9.len() == 7,
        "{w9:?}"
    );
    // W7 measures the collectors under the agent: procmond's CPU idle and under load, the
    // latency of the processes it reported with their program (a process gone before /proc
    // could be read is reported without it: counted in `lost`); netmond's CPU idle and while
    // connections open, and the connections it did not report.
    let (w7, rows): (Vec<&Value>, Vec<&Value>) = rows.iter().partition(|r| r["workload"] == "w7");
    let peers: Vec<&str> = w7.iter().map(|r| r["peer"].as_str().unwrap()).collect();
    assert_eq!(
        peers,
        ["procmond", "procmond", "procmond", "netmond", "netmond"],
        "{w7:?}"
    );
    for r in &w7 {
        assert!(r["collector_cpu_pct"].as_f64().is_some(), "{r}");
    }
    // The loaded rows (the quiet one may be a single process at this scale).
    for loaded in [w7[2], w7[4]] {
        assert!(
            loaded["lost"].as_u64().unwrap() < loaded["messages"].as_u64().unwrap(),
            "{loaded}"
        );
    }
    // The streaming workloads run in both guarantees, with the default client options.
    for w in ["w1", "w2", "w4", "w5"] {
        for qos in ["realtime", "processed"] {
            assert!(
                rows.iter().any(|r| r["workload"] == w
                    && r["variant"].as_str().unwrap().contains(&format!(",{qos}"))),
                "no {w} {qos} row"
            );
        }
    }
    assert!(rows.iter().any(|r| r["peer"] == "floor"), "no floor row");
    for r in &rows {
        for field in [
            "peer",
            "workload",
            "variant",
            "payload_bytes",
            "messages",
            "seconds",
            "msgs_per_sec",
            "mb_per_sec",
            "lost",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "broker_peak_rss_kb",
        ] {
            assert!(r.get(field).is_some(), "{field} missing from {r}");
        }
        assert_eq!(r["lost"], 0, "lost messages: {r}");
        assert!(r["msgs_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        if r["workload"] == "w3" {
            let p = |k: &str| r[k].as_u64().unwrap();
            assert!(
                p("p50_us") <= p("p99_us") && p("p99_us") <= p("max_us"),
                "{r}"
            );
        }
    }
    // W2 and W2 with a stalled subscriber alternate, three times each (in each guarantee).
    for stalled in [false, true] {
        let runs: Vec<u64> = rows
            .iter()
            .filter(|r| {
                r["workload"] == "w2"
                    && r["run"].is_u64()
                    && r["variant"].as_str().unwrap().contains(",realtime")
                    && r["variant"].as_str().unwrap().ends_with("+1stalled") == stalled
            })
            .map(|r| r["run"].as_u64().unwrap())
            .collect();
        assert_eq!(runs, [1, 2, 3], "stalled: {stalled}");
    }
    let [summary] = summary[..] else {
        panic!("one summary line expected: {summary:?}")
    };
    assert!(summary["broker_ready_ms"].as_f64().unwrap() > 0.0);
    assert!(summary["broker_idle_rss_kb"].as_u64().unwrap() > 0);
    assert!(summary["stalled_reader_drop_pct"].is_f64(), "{summary}");
    assert_eq!(
        summary["stalled_reader_drop_pct_by_pair"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn the_table_reports_the_stalled_reader_comparison() {
    let out = run(&["--workload", "w2", "--scale", "0.002"]).join("\n");
    assert!(out.contains("per subscriber msg/s"), "{out}");
    assert!(
        out.contains("with a stalled fifth") && out.contains("3 alternating pairs"),
        "{out}"
    );
}

/// `--tls`: the workers reach the broker over TCP with mutual TLS (a development PKI made for
/// the run), and the rows say so.
#[test]
fn workloads_run_over_mutual_tls() {
    for w in ["w1", "w3"] {
        let rows: Vec<Value> = run(&["--json", "--tls", "--workload", w, "--scale", "0.002"])
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|r: &Value| r["workload"] == w)
            .collect();
        assert!(!rows.is_empty(), "no {w} row");
        for r in &rows {
            assert!(r["variant"].as_str().unwrap().starts_with("tls,"), "{r}");
            assert_eq!(r["lost"], 0, "{r}");
        }
    }
}
