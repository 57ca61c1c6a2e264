//! The SQL engine that evaluates rules over the rows the collectors answered: SQLite in
//! memory (`rusqlite`, the library bundled). SQLite because a rule is the SQL people already
//! write for osquery, its planner handles joins and subqueries we would otherwise write
//! ourselves, it runs in the agent's process with nothing to deploy, and it can be held to
//! reading (`query_only`, read-only statements) and to a deadline (its progress handler).

use daemoneye_eventbus::collector::tables::Table;
use daemoneye_eventbus::schema::rpc as pb;
use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use std::time::{Duration, Instant};

/// Why a query could not be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// SQLite refused the query (an unknown column or function, a type error…).
    #[error("{0}")]
    Invalid(String),
    /// The query writes (SQLite says it is not read-only).
    #[error("the query is not read-only")]
    Writes,
    /// It ran past its deadline and was stopped.
    #[error("the query ran past its deadline of {0:?} and was stopped")]
    Deadline(Duration),
    /// The rows could not be loaded (a collector answered columns this agent does not know).
    #[error("the rows of {table} could not be loaded: {reason}")]
    Load {
        /// The table.
        table: String,
        /// Why.
        reason: String,
    },
}

/// What a query returned: its columns, and each row's values as text (`None`: NULL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<Option<String>>>,
    /// Rows the query returned beyond [`ROWS_MAX`], not kept.
    pub rows_left_out: u64,
}

/// Rows of a query's result kept at most.
pub const ROWS_MAX: usize = 10_000;

/// An in-memory database holding every collector table (empty until rows are loaded).
pub struct Engine {
    conn: Connection,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

impl Engine {
    /// A new database with the tables of [`Table::ALL`].
    ///
    /// # Errors
    ///
    /// When SQLite cannot open a database in memory.
    pub fn new() -> Result<Self, EngineError> {
        let conn = Connection::open_in_memory().map_err(|e| EngineError::Invalid(e.to_string()))?;
        for t in Table::ALL {
            let columns: Vec<String> = t
                .columns()
                .iter()
                .map(|c| format!("{} {}", c.name, c.kind.sql()))
                .collect();
            conn.execute_batch(&format!(
                "CREATE TABLE {} ({})",
                t.name(),
                columns.join(", ")
            ))
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        }
        Ok(Self { conn })
    }

    /// Checks that `sql` prepares against the tables (columns and functions exist) and is
    /// read-only.
    ///
    /// # Errors
    ///
    /// [`EngineError::Invalid`] with SQLite's reason, or [`EngineError::Writes`].
    pub fn check(&self, sql: &str) -> Result<(), EngineError> {
        self.conn.authorizer(Some(authorize));
        let prepared = self.conn.prepare(sql).map(|stmt| stmt.readonly());
        self.conn
            .authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
        match prepared {
            Ok(true) => Ok(()),
            Ok(false) => Err(EngineError::Writes),
            Err(e) => Err(EngineError::Invalid(e.to_string())),
        }
    }

    /// Replaces the rows of each table in `data` (tables not in it keep none).
    ///
    /// # Errors
    ///
    /// [`EngineError::Load`] when a table or column is not this agent's.
    pub fn load(&mut self, data: &[pb::TableRows]) -> Result<(), EngineError> {
        let tx = self
            .conn
            .transaction()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        for t in Table::ALL {
            tx.execute(&format!("DELETE FROM {}", t.name()), [])
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
        }
        for rows in data {
            let load_err = |reason: String| EngineError::Load {
                table: rows.table.clone(),
                reason,
            };
            let table =
                Table::from_name(&rows.table).ok_or_else(|| load_err("no such table".into()))?;
            // The collector's column order: every column it sent must be ours.
            for c in &rows.columns {
                if !table.columns().iter().any(|k| k.name == c) {
                    return Err(load_err(format!("no column {c:?}")));
                }
            }
            let marks = vec!["?"; rows.columns.len()].join(", ");
            let mut stmt = tx
                .prepare(&format!(
                    "INSERT INTO {} ({}) VALUES ({marks})",
                    table.name(),
                    rows.columns.join(", ")
                ))
                .map_err(|e| load_err(e.to_string()))?;
            for row in &rows.rows {
                if row.values.len() != rows.columns.len() {
                    return Err(load_err(format!(
                        "a row of {} values for {} columns",
                        row.values.len(),
                        rows.columns.len()
                    )));
                }
                let values = row.values.iter().map(|v| match &v.kind {
                    Some(pb::value::Kind::Integer(i)) => rusqlite::types::Value::Integer(*i),
                    Some(pb::value::Kind::Text(s)) => rusqlite::types::Value::Text(s.clone()),
                    None => rusqlite::types::Value::Null,
                });
                stmt.execute(rusqlite::params_from_iter(values))
                    .map_err(|e| load_err(e.to_string()))?;
            }
        }
        tx.commit().map_err(|e| EngineError::Invalid(e.to_string()))
    }

    /// Runs `sql` over the rows loaded, stopping it at `deadline` from now.
    ///
    /// # Errors
    ///
    /// [`EngineError`]: refused, writes, or past its deadline.
    pub fn query(&self, sql: &str, deadline: Duration) -> Result<Output, EngineError> {
        let until = Instant::now() + deadline;
        self.conn
            .progress_handler(10_000, Some(move || Instant::now() > until));
        let result = self.run(sql, deadline);
        self.conn.progress_handler(0, None::<fn() -> bool>);
        result
    }

    fn run(&self, sql: &str, deadline: Duration) -> Result<Output, EngineError> {
        self.conn
            .pragma_update(None, "query_only", true)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        self.conn.authorizer(Some(authorize));
        let result = (|| {
            let mut stmt = self
                .conn
                .prepare(sql)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            if !stmt.readonly() {
                return Err(EngineError::Writes);
            }
            let columns: Vec<String> = stmt
                .column_names()
                .iter()
                .map(|c| (*c).to_owned())
                .collect();
            let width = columns.len();
            let mut out = Output {
                columns,
                ..Output::default()
            };
            let interrupted = |e: rusqlite::Error| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::OperationInterrupted) => EngineError::Deadline(deadline),
                _ => EngineError::Invalid(e.to_string()),
            };
            let mut rows = stmt.query([]).map_err(interrupted)?;
            while let Some(row) = rows.next().map_err(interrupted)? {
                if out.rows.len() >= ROWS_MAX {
                    out.rows_left_out += 1;
                    continue;
                }
                let mut values = Vec::with_capacity(width);
                for i in 0..width {
                    values.push(match row.get_ref(i).map_err(interrupted)? {
                        ValueRef::Null => None,
                        ValueRef::Integer(v) => Some(v.to_string()),
                        ValueRef::Real(v) => Some(v.to_string()),
                        ValueRef::Text(t) | ValueRef::Blob(t) => {
                            Some(String::from_utf8_lossy(t).into_owned())
                        }
                    });
                }
                out.rows.push(values);
            }
            Ok(out)
        })();
        self.conn
            .authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
        // Loading needs writes again: a connection that cannot go back is refused whole.
        self.conn
            .pragma_update(None, "query_only", false)
            .map_err(|e| EngineError::Invalid(format!("the database stays read-only: {e}")))?;
        result
    }
}

/// What a rule's statement may do, as SQLite prepares it: select, read the collector tables
/// (not SQLite's own: a read of a real table names its database) and what its `WITH` clauses
/// define (those name none), call functions and recurse; nothing else (no `ATTACH`, which
/// SQLite counts as read-only, no `PRAGMA`, no writes, no transactions).
fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Select | AuthAction::Recursive | AuthAction::Function { .. } => {
            Authorization::Allow
        }
        AuthAction::Read { table_name, .. }
            if ctx.database_name.is_none()
                || (ctx.database_name == Some("main")
                    && Table::from_name(table_name).is_some()) =>
        {
            Authorization::Allow
        }
        _ => Authorization::Deny,
    }
}

/// Loads `tables` into `engine` and runs each of `sqls` over them on a blocking thread
/// (SQLite must not hold up the async runtime: each query may run up to `deadline`): the
/// loading's failure, or each query's result. The engine comes back, unless the thread
/// panicked (`None`: make another).
pub async fn run_blocking(
    mut engine: Engine,
    tables: Vec<pb::TableRows>,
    sqls: Vec<String>,
    deadline: Duration,
) -> (
    Option<Engine>,
    Result<Vec<Result<Output, EngineError>>, EngineError>,
) {
    let ran = tokio::task::spawn_blocking(move || {
        let out = engine.load(&tables).map(|()| {
            sqls.iter()
                .map(|sql| engine.query(sql, deadline))
                .collect::<Vec<_>>()
        });
        (engine, out)
    })
    .await;
    match ran {
        Ok((engine, out)) => (Some(engine), out),
        Err(e) => (
            None,
            Err(EngineError::Invalid(format!(
                "the query's thread failed: {e}"
            ))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daemoneye_eventbus::collector::tables::{Rows, int, null, text};

    fn processes(rows: &[(i64, &str, Option<&str>)]) -> pb::TableRows {
        let mut out = Rows::new(Table::Processes, 0);
        for (pid, name, exe) in rows {
            let mut v: Vec<pb::Value> = Table::Processes.columns().iter().map(|_| null()).collect();
            v[0] = int(*pid);
            v[2] = text(*name);
            v[4] = exe.map_or_else(null, text);
            out.push(v);
        }
        out.finish()
    }

    #[test]
    fn rows_are_loaded_queried_and_replaced() {
        let mut e = Engine::new().unwrap();
        e.load(&[processes(&[
            (1, "init", Some("/sbin/init")),
            (42, "x", Some("/tmp/x")),
        ])])
        .unwrap();
        let sql = "SELECT pid, name FROM processes WHERE executable_path LIKE '/tmp/%'";
        e.check(sql).unwrap();
        let out = e.query(sql, Duration::from_secs(1)).unwrap();
        assert_eq!(out.columns, ["pid", "name"]);
        assert_eq!(out.rows, vec![vec![Some("42".into()), Some("x".into())]]);
        e.load(&[processes(&[(1, "init", None)])]).unwrap();
        assert!(
            e.query(sql, Duration::from_secs(1))
                .unwrap()
                .rows
                .is_empty()
        );
    }

    #[test]
    fn unknown_columns_writes_and_runaway_queries_are_refused() {
        let mut e = Engine::new().unwrap();
        let err = e.check("SELECT nope FROM processes").unwrap_err();
        assert!(err.to_string().contains("no such column: nope"), "{err}");
        assert!(e.check("DELETE FROM processes").is_err());
        assert!(
            e.query("DELETE FROM processes", Duration::from_secs(1))
                .is_err()
        );
        // What SQLite itself calls read-only, and what reads its own tables: refused too.
        for sql in [
            "ATTACH DATABASE ':memory:' AS other",
            "PRAGMA query_only = 0",
            "SELECT * FROM sqlite_master",
            "SELECT * FROM sqlite_master, (WITH sqlite_master AS (SELECT 1) SELECT * FROM processes)",
        ] {
            assert!(e.check(sql).is_err(), "{sql}");
            assert!(e.query(sql, Duration::from_secs(1)).is_err(), "{sql}");
        }
        assert!(
            e.check(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) \
                 SELECT * FROM n, processes"
            )
            .is_ok()
        );
        e.load(&[processes(&[(1, "a", None)])]).unwrap();
        // A recursive query that never ends on its own.
        let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                       SELECT count(*) FROM n, processes";
        assert_eq!(
            e.query(endless, Duration::from_millis(50)),
            Err(EngineError::Deadline(Duration::from_millis(50)))
        );
        // Still serving after it.
        assert_eq!(
            e.query("SELECT count(*) FROM processes", Duration::from_secs(1))
                .unwrap()
                .rows,
            vec![vec![Some("1".into())]]
        );
        let mut bad = processes(&[]);
        bad.columns.push("secret".into());
        assert!(matches!(e.load(&[bad]), Err(EngineError::Load { .. })));
    }
}
