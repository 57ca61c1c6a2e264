//! `eventbus query`: one SELECT against a running agent (`control.agent.query`, which the
//! broker's policy must grant the caller), printed as a table or JSON, with the collectors
//! that answered and any that did not.

use crate::BrokerArg;
use crate::commands::connect;
use crate::rpc_cmd::CallFailed;
use anyhow::{Context, Result};
use daemoneye_agent::query::QueryAnswer;
use daemoneye_eventbus::client::Request;
use daemoneye_eventbus::core::catalog;
use std::io::Write;
use std::time::Duration;

/// `eventbus query` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct QueryArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// The SELECT (tables and columns: docs/rules.md).
    sql: String,
    /// The answer as one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
}

pub(crate) async fn run(a: QueryArgs) -> Result<()> {
    let timeout = Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let client = connect(&a.broker, "eventbus-query").await?;
    let outcome = client
        .call(
            Request::new(catalog::agent::query(), a.sql.into_bytes())
                .timeout(timeout)
                .operation("query"),
        )
        .await;
    client.close().await;
    let reply = outcome.map_err(CallFailed)?;
    let answer: QueryAnswer = serde_json::from_slice(reply.payload())
        .context("the agent's answer is not a query answer")?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&answer)?)?;
        return Ok(());
    }
    print_table(&mut out, &answer)?;
    Ok(())
}

/// Rows as an aligned table, then who answered.
fn print_table(out: &mut impl Write, a: &QueryAnswer) -> std::io::Result<()> {
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let mut widths: Vec<usize> = a.columns.iter().map(|c| c.chars().count()).collect();
    for row in &a.rows {
        for (w, v) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell(v).chars().count()).min(60);
        }
    }
    let line = |values: Vec<String>| {
        values
            .iter()
            .zip(&widths)
            .map(|(v, w)| {
                let v: String = v.chars().take(*w).collect();
                format!("{v:<w$}")
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(a.columns.clone()))?;
    for row in &a.rows {
        writeln!(out, "{}", line(row.iter().map(cell).collect()))?;
    }
    writeln!(
        out,
        "({} rows{}; answered by {}{})",
        a.rows.len(),
        if a.rows_left_out > 0 {
            format!(", {} left out", a.rows_left_out)
        } else {
            String::new()
        },
        if a.answered.is_empty() {
            "none".to_owned()
        } else {
            a.answered.join(", ")
        },
        if a.missing.is_empty() {
            String::new()
        } else {
            format!("; no answer from {}", a.missing.join(", "))
        }
    )
}
