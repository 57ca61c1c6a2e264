//! Ad-hoc queries (`eventbus query`): one `SELECT` served on `control.agent.query` through
//! the path rules take — checked by the SQL parser, collection tasks to the collectors that
//! answer its tables, aggregation, SQLite — answered with its rows and who answered.

use crate::detection::collect;
use crate::engine::{Engine, EngineError, run_blocking};
use crate::lifecycle::Checks;
use crate::tasks::Tasks;
use daemoneye_eventbus::client::{Client, ServeOptions, Service, SubscribeError};
use daemoneye_eventbus::core::{Message, ReplyStatus, catalog};
use daemoneye_eventbus::supervisor::Supervisor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A query's answer (the reply's JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryAnswer {
    /// The collection task's id (its correlation id).
    pub task_id: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, values as text (`None`: NULL).
    pub rows: Vec<Vec<Option<String>>>,
    /// Rows not returned (bounds of the answers or of the result).
    pub rows_left_out: u64,
    /// Collectors that answered.
    pub answered: Vec<String>,
    /// Collector types (or tables) that did not answer: the rows may be incomplete.
    pub missing: Vec<String>,
}

struct Ctx {
    tasks: Tasks,
    supervisor: Supervisor,
    checks: Checks,
    deadline: Duration,
}

/// Serves queries on `control.agent.query` (four at a time).
pub(crate) async fn serve(
    client: &Client,
    tasks: Tasks,
    supervisor: Supervisor,
    checks: Checks,
    deadline: Duration,
) -> Result<Service, SubscribeError> {
    let ctx = Arc::new(Ctx {
        tasks,
        supervisor,
        checks,
        deadline,
    });
    client
        .serve(
            [catalog::agent::query().as_str()],
            ServeOptions::default().concurrency(4),
            move |msg: Message| {
                let ctx = Arc::clone(&ctx);
                async move { answer(&ctx, &msg).await }
            },
        )
        .await
}

/// Bytes of rows an answer carries at most (the rest are counted in `rows_left_out`): the
/// reply stays under the broker's default message limit.
pub const ANSWER_BYTES: usize = 512 * 1024;

async fn answer(ctx: &Ctx, msg: &Message) -> Result<bytes::Bytes, ReplyStatus> {
    let sql = std::str::from_utf8(msg.payload())
        .map_err(|_| ReplyStatus::invalid_operation("the query is not UTF-8 text"))?;
    let tables = crate::rules::check_sql(sql).map_err(ReplyStatus::invalid_operation)?;
    // Refused before any collector is asked.
    let engine = Engine::new().map_err(|e| ReplyStatus::unavailable(e.to_string()))?;
    engine
        .check(sql)
        .map_err(|e| ReplyStatus::invalid_operation(e.to_string()))?;
    let task_id = ctx.tasks.next_id("query");
    let outcome = collect(
        &ctx.tasks,
        &ctx.supervisor,
        &ctx.checks,
        &task_id,
        &tables,
        ctx.deadline,
    )
    .await
    .ok_or_else(|| {
        ReplyStatus::unavailable("no running, checked collector answers the query's tables")
    })?;
    if outcome.answered.is_empty() {
        return Err(ReplyStatus::unavailable(format!(
            "no collector answered (missing: {})",
            outcome.missing.join(", ")
        )));
    }
    let (_, out) = run_blocking(engine, outcome.tables, vec![sql.to_owned()], ctx.deadline).await;
    let out = out.and_then(|mut outs| {
        outs.pop()
            .unwrap_or_else(|| Err(EngineError::Invalid("no result".into())))
    });
    let mut out = out.map_err(|e| match e {
        EngineError::Deadline(_) => {
            ReplyStatus::new(daemoneye_eventbus::core::StatusCode::Timeout, e.to_string())
        }
        other => ReplyStatus::invalid_operation(other.to_string()),
    })?;
    // Within ANSWER_BYTES: the rows beyond are counted.
    let mut bytes = 0;
    let keep = out
        .rows
        .iter()
        .take_while(|row| {
            bytes += row
                .iter()
                .map(|v| v.as_ref().map_or(4, |s| s.len() + 3))
                .sum::<usize>()
                + 2;
            bytes <= ANSWER_BYTES
        })
        .count();
    let cut = (out.rows.len() - keep) as u64;
    out.rows.truncate(keep);
    let answer = QueryAnswer {
        task_id,
        columns: out.columns,
        rows: out.rows,
        rows_left_out: out
            .rows_left_out
            .saturating_add(outcome.rows_left_out)
            .saturating_add(cut),
        answered: outcome.answered,
        missing: outcome.missing,
    };
    serde_json::to_vec(&answer)
        .map(bytes::Bytes::from)
        .map_err(|e| ReplyStatus::invalid_operation(format!("the answer did not encode: {e}")))
}
