//! The tables collectors answer for the agent's detection rules and queries
//! (`docs/rules.md`). A table's name is the capability a collector advertises to say it
//! answers it; the agent sends collection tasks (`EXECUTE_TASK` on
//! `control.collector.task.<id>`) to the collectors that advertise every table a rule reads.

use daemoneye_eventbus_schema::rpc as pb;

/// The type of a column, as the agent's SQL engine stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// A signed 64-bit integer (`INTEGER`).
    Integer,
    /// UTF-8 text (`TEXT`).
    Text,
}

impl ColumnType {
    /// Its SQL name.
    #[must_use]
    pub fn sql(self) -> &'static str {
        match self {
            Self::Integer => "INTEGER",
            Self::Text => "TEXT",
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub kind: ColumnType,
    /// What it holds (`docs/rules.md`).
    pub doc: &'static str,
}

const fn col(name: &'static str, kind: ColumnType, doc: &'static str) -> Column {
    Column { name, kind, doc }
}

use ColumnType::{Integer, Text};

const PROCESSES: &[Column] = &[
    col("pid", Integer, "Process id."),
    col("ppid", Integer, "Parent's process id."),
    col(
        "name",
        Text,
        "Program name (at most 15 bytes, as the kernel keeps it).",
    ),
    col(
        "command_line",
        Text,
        "Arguments joined with spaces (NULL for kernel threads and processes gone before they were read).",
    ),
    col(
        "executable_path",
        Text,
        "The executable's path (NULL when unreadable), without the kernel's ` (deleted)` mark.",
    ),
    col(
        "executable_deleted",
        Integer,
        "1 when the executable file was deleted or replaced since the process started, else 0 (as of procmond's last reading of the process: its exec, or its last `/proc` scan).",
    ),
    col("uid", Integer, "Real user id (NULL when unknown)."),
    col("user", Text, "User name of `uid` (NULL when it has none)."),
    col(
        "state",
        Text,
        "State letter at the last reading: R, S, D, T, I, … (a process that has exited, a zombie, is not listed).",
    ),
    col(
        "start_time",
        Integer,
        "Start, in Unix seconds (NULL when unknown).",
    ),
    col("collector_id", Text, "The collector that answered."),
];

const NETWORK_CONNECTIONS: &[Column] = &[
    col("protocol", Text, "`tcp` or `udp`."),
    col("family", Text, "`ipv4` or `ipv6`."),
    col("local_address", Text, "Local address."),
    col("local_port", Integer, "Local port."),
    col(
        "remote_address",
        Text,
        "Remote address (unspecified for a listener).",
    ),
    col("remote_port", Integer, "Remote port (0 for a listener)."),
    col(
        "state",
        Text,
        "TCP state (`LISTEN`, `ESTABLISHED`, …); for UDP `CONNECTED` or `UNCONNECTED`.",
    ),
    col("inode", Integer, "The socket's inode."),
    col("uid", Integer, "Owner's user id."),
    col(
        "pid",
        Integer,
        "A process holding the socket (NULL when none was found).",
    ),
    col(
        "process_name",
        Text,
        "That process's name (NULL when none was found).",
    ),
    col("collector_id", Text, "The collector that answered."),
];

/// A table collectors answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `processes`: the processes running now (procmond).
    Processes,
    /// `network_connections`: TCP and UDP sockets now, with a holder (netmond).
    NetworkConnections,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 2] = [Table::Processes, Table::NetworkConnections];

    /// Its name in SQL, and the capability of the collectors that answer it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Processes => "processes",
            Self::NetworkConnections => "network_connections",
        }
    }

    /// The table named `name` (as in SQL: case does not matter).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Its columns, in order.
    #[must_use]
    pub fn columns(self) -> &'static [Column] {
        match self {
            Self::Processes => PROCESSES,
            Self::NetworkConnections => NETWORK_CONNECTIONS,
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An integer value.
#[must_use]
pub fn int(v: impl Into<i64>) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Integer(v.into())),
    }
}

/// A text value.
#[must_use]
pub fn text(v: impl Into<String>) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Text(v.into())),
    }
}

/// SQL NULL.
#[must_use]
pub fn null() -> pb::Value {
    pb::Value { kind: None }
}

/// Rows a collector answers per table at most, unless the task asks for fewer.
pub const MAX_ROWS: usize = 100_000;

/// Bytes of rows one answer carries at most per table (within the broker's default message
/// limit, with room for the envelope).
pub const MAX_BYTES: usize = 768 * 1024;

/// The rows of one table an answer carries, bounded in rows and bytes: what does not fit is
/// counted (`rows_left_out`), never dropped silently.
#[derive(Debug)]
pub struct Rows {
    table: Table,
    max_rows: usize,
    bytes: usize,
    out: pb::TableRows,
}

impl Rows {
    /// Rows of `table`, at most `max_rows` (0: [`MAX_ROWS`]).
    #[must_use]
    pub fn new(table: Table, max_rows: usize) -> Self {
        Self {
            table,
            max_rows: if max_rows == 0 {
                MAX_ROWS
            } else {
                max_rows.min(MAX_ROWS)
            },
            bytes: 0,
            out: pb::TableRows {
                table: table.name().to_owned(),
                columns: table.columns().iter().map(|c| c.name.to_owned()).collect(),
                ..pb::TableRows::default()
            },
        }
    }

    /// Adds a row: its values in the order of the table's columns.
    ///
    /// # Panics
    ///
    /// When `values` does not have one value per column (a collector's bug).
    pub fn push(&mut self, values: Vec<pb::Value>) {
        assert_eq!(
            values.len(),
            self.table.columns().len(),
            "a row of {} has one value per column",
            self.table
        );
        let row = pb::Row { values };
        let size = prost::Message::encoded_len(&row) + 4;
        if self.out.rows.len() >= self.max_rows || self.bytes + size > MAX_BYTES {
            self.out.rows_left_out += 1;
            return;
        }
        self.bytes += size;
        self.out.rows.push(row);
    }

    /// The rows.
    #[must_use]
    pub fn finish(self) -> pb::TableRows {
        self.out
    }
}

/// Collection tasks waiting at most for the part of a collector that owns its table (one
/// more is refused as busy): what a collector announces as its `task_capacity`.
pub const TASKS_WAITING: usize = 16;

/// A collection task's question to the owner of a table: rows at most, and where the answer
/// goes.
pub type TableAsk = (usize, tokio::sync::oneshot::Sender<pb::TableRows>);

/// The sending side of a collector's bounded queue of collection tasks (full: refused, the
/// caller told the collector is busy).
#[derive(Debug, Clone)]
pub struct TaskSender {
    tx: tokio::sync::mpsc::Sender<TableAsk>,
    program: &'static str,
}

/// A queue of collection tasks from `program`'s services to the owner of its table, which
/// answers each from the receiver.
#[must_use]
pub fn task_queue(program: &'static str) -> (TaskSender, tokio::sync::mpsc::Receiver<TableAsk>) {
    let (tx, rx) = tokio::sync::mpsc::channel(TASKS_WAITING);
    (TaskSender { tx, program }, rx)
}

impl TaskSender {
    /// Asks the owner for at most `max_rows` rows.
    ///
    /// # Errors
    ///
    /// The queue is full (busy), or the owner has stopped.
    pub async fn ask(&self, max_rows: usize) -> Result<pb::TableRows, String> {
        let (answer, rows) = tokio::sync::oneshot::channel();
        self.tx.try_send((max_rows, answer)).map_err(|_| {
            format!(
                "{} has {TASKS_WAITING} collection tasks waiting already; try again",
                self.program
            )
        })?;
        rows.await
            .map_err(|_| format!("{} is stopping", self.program))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_rows_are_bounded() {
        for t in Table::ALL {
            assert_eq!(Table::from_name(t.name()), Some(t));
            assert_eq!(Table::from_name(&t.name().to_uppercase()), Some(t));
        }
        assert_eq!(Table::from_name("files"), None);
        let mut rows = Rows::new(Table::NetworkConnections, 2);
        for port in 0..3 {
            let mut v: Vec<pb::Value> = Table::NetworkConnections
                .columns()
                .iter()
                .map(|_| null())
                .collect();
            v[3] = int(port);
            rows.push(v);
        }
        let out = rows.finish();
        assert_eq!(out.rows.len(), 2);
        assert_eq!(out.rows_left_out, 1);
        assert_eq!(out.columns[3], "local_port");
    }

    #[test]
    fn docs_rules_md_lists_every_table_and_column() {
        let doc = include_str!("../../../docs/rules.md");
        for t in Table::ALL {
            assert!(doc.contains(&format!("### `{}`", t.name())), "{t}");
            for c in t.columns() {
                assert!(
                    doc.contains(&format!("| `{}` | {} |", c.name, c.kind.sql())),
                    "docs/rules.md lacks {t}.{}",
                    c.name
                );
            }
        }
    }
}
