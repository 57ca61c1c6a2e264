//! Detection rules (`docs/rules.md`): one rule per YAML or TOML file, each a read-only SQL
//! `SELECT` over the collectors' tables, checked with a real SQL parser (`sqlparser`) before
//! it is run. What is pure here: reading, checking, and the tables a rule reads; running it is
//! [`crate::engine`]'s.

use daemoneye_eventbus::collector::tables::Table;
use daemoneye_eventbus::core::Topic;
use daemoneye_eventbus::core::catalog;
use serde::Deserialize;
use sqlparser::ast::{Query, Statement, Visit, Visitor};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How serious a rule's matches are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// `low`.
    Low,
    /// `medium`.
    Medium,
    /// `high`.
    High,
    /// `critical`.
    Critical,
}

impl Severity {
    /// Where its alerts are published (`events.alert.<severity>`).
    #[must_use]
    pub fn topic(self) -> Topic {
        match self {
            Self::Low => catalog::alert::low(),
            Self::Medium => catalog::alert::medium(),
            Self::High => catalog::alert::high(),
            Self::Critical => catalog::alert::critical(),
        }
    }

    /// Its name (`low` … `critical`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// A rule file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    name: String,
    severity: Severity,
    #[serde(default)]
    description: String,
    interval_seconds: u64,
    sql: String,
}

/// Shortest and longest interval between a rule's evaluations.
pub const INTERVAL_MIN: Duration = Duration::from_secs(1);
/// See [`INTERVAL_MIN`].
pub const INTERVAL_MAX: Duration = Duration::from_secs(86_400);

/// Longest rule query, in bytes.
pub const SQL_MAX: usize = 16 * 1024;

/// A checked rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its id (unique among the rules loaded; letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// Its name, for people.
    pub name: String,
    /// How serious its matches are.
    pub severity: Severity,
    /// What a match means.
    pub description: String,
    /// How often it is evaluated.
    pub interval: Duration,
    /// Its `SELECT`.
    pub sql: String,
    /// The tables it reads: the capabilities of the collectors its tasks go to.
    pub tables: BTreeSet<Table>,
    /// Where it came from (a file, or `built-in:<name>` for the examples).
    pub source: String,
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}{}: {reason}", rule.as_ref().map(|r| format!(" (rule {r})")).unwrap_or_default())]
pub struct RuleError {
    /// The file (or built-in name).
    pub origin: String,
    /// The rule's id, when it got that far.
    pub rule: Option<String>,
    /// Why.
    pub reason: String,
}

impl RuleError {
    fn new(source: &str, rule: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            origin: source.to_owned(),
            rule: rule.map(str::to_owned),
            reason: reason.into(),
        }
    }
}

/// The example rules, built in: loaded when no rules directory is configured.
pub const EXAMPLES: [(&str, &str); 3] = [
    (
        "process-from-temp-dir.yaml",
        include_str!("../rules/process-from-temp-dir.yaml"),
    ),
    (
        "deleted-executable.yaml",
        include_str!("../rules/deleted-executable.yaml"),
    ),
    (
        "shell-with-connection.yaml",
        include_str!("../rules/shell-with-connection.yaml"),
    ),
];

/// Parses and checks one rule file's text; `source` names it in errors, and its extension
/// (`.toml`, `.yaml`, `.yml`) says the format.
///
/// # Errors
///
/// [`RuleError`] naming the file, the rule when known, and why.
pub fn parse(source: &str, text: &str) -> Result<Rule, RuleError> {
    let file: RuleFile = if source.ends_with(".toml") {
        toml::from_str(text).map_err(|e| RuleError::new(source, None, e.to_string()))?
    } else {
        serde_norway::from_str(text).map_err(|e| RuleError::new(source, None, e.to_string()))?
    };
    let id = Some(file.id.as_str());
    if file.id.is_empty()
        || !file
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(RuleError::new(
            source,
            id,
            "id must be letters, digits, '-', '_' or '.'",
        ));
    }
    if file.name.trim().is_empty() {
        return Err(RuleError::new(source, id, "name is empty"));
    }
    let interval = Duration::from_secs(file.interval_seconds);
    if !(INTERVAL_MIN..=INTERVAL_MAX).contains(&interval) {
        return Err(RuleError::new(
            source,
            id,
            format!(
                "interval_seconds must be {} to {}",
                INTERVAL_MIN.as_secs(),
                INTERVAL_MAX.as_secs()
            ),
        ));
    }
    let tables = check_sql(&file.sql).map_err(|reason| RuleError::new(source, id, reason))?;
    Ok(Rule {
        id: file.id,
        name: file.name,
        severity: file.severity,
        description: file.description,
        interval,
        sql: file.sql.trim().to_owned(),
        tables,
        source: source.to_owned(),
    })
}

/// Checks that `sql` is one read-only `SELECT` over known tables, and returns them.
///
/// # Errors
///
/// Why not, for people.
pub fn check_sql(sql: &str) -> Result<BTreeSet<Table>, String> {
    if sql.len() > SQL_MAX {
        return Err(format!(
            "the query is {} bytes; at most {SQL_MAX}",
            sql.len()
        ));
    }
    let statements =
        Parser::parse_sql(&SQLiteDialect {}, sql).map_err(|e| format!("SQL syntax: {e}"))?;
    let [statement] = statements.as_slice() else {
        return Err(format!(
            "one SELECT statement expected, found {}",
            statements.len()
        ));
    };
    let Statement::Query(query) = statement else {
        return Err(format!(
            "only a read-only SELECT is allowed, not {}",
            statement_kind(statement)
        ));
    };
    let mut names = Names::default();
    let _ = query.visit(&mut names);
    let mut tables = BTreeSet::new();
    for name in names.relations {
        if names.ctes.contains(&name) {
            continue;
        }
        match Table::from_name(&name) {
            Some(t) => {
                tables.insert(t);
            }
            None => {
                let known: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
                return Err(format!(
                    "unknown table {name:?} (the tables are: {})",
                    known.join(", ")
                ));
            }
        }
    }
    if tables.is_empty() {
        return Err("the query reads no collector table".into());
    }
    Ok(tables)
}

/// The first words of a statement, to say what was refused.
fn statement_kind(statement: &Statement) -> String {
    statement
        .to_string()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The relations a query reads, and the names its `WITH` clauses define.
#[derive(Default)]
struct Names {
    relations: Vec<String>,
    ctes: BTreeSet<String>,
}

impl Visitor for Names {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_ascii_lowercase());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &sqlparser::ast::ObjectName) -> ControlFlow<()> {
        // `main.processes` and `processes` name one table; the last part is its name.
        let name = relation
            .0
            .last()
            .and_then(|p| p.as_ident())
            .map_or_else(|| relation.to_string(), |i| i.value.clone());
        self.relations.push(name.to_ascii_lowercase());
        ControlFlow::Continue(())
    }
}

/// Files of a rules directory that hold rules (by extension), in name order.
///
/// # Errors
///
/// When the directory cannot be listed.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "toml"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Rule files read at most from a directory, and bytes per file.
pub const FILES_MAX: usize = 1024;
/// See [`FILES_MAX`].
pub const FILE_BYTES_MAX: u64 = 64 * 1024;

/// Loads the rules of `dir` (or the built-in examples when `None`): the rules that passed,
/// and an error for each that did not (a duplicate id too). One bad rule never keeps the
/// others out.
#[must_use]
pub fn load(dir: Option<&Path>) -> (Vec<Rule>, Vec<RuleError>) {
    let mut texts: Vec<(String, Result<String, String>)> = Vec::new();
    match dir {
        None => {
            for (name, text) in EXAMPLES {
                texts.push((format!("built-in:{name}"), Ok(text.to_owned())));
            }
        }
        Some(dir) => match files(dir) {
            Ok(files) => {
                for path in files.into_iter().take(FILES_MAX) {
                    let text = match std::fs::metadata(&path) {
                        Ok(m) if m.len() > FILE_BYTES_MAX => Err(format!(
                            "the file is {} bytes; at most {FILE_BYTES_MAX}",
                            m.len()
                        )),
                        _ => std::fs::read_to_string(&path).map_err(|e| e.to_string()),
                    };
                    texts.push((path.display().to_string(), text));
                }
            }
            Err(e) => {
                return (
                    Vec::new(),
                    vec![RuleError::new(
                        &dir.display().to_string(),
                        None,
                        format!("cannot list the rules directory: {e}"),
                    )],
                );
            }
        },
    }
    let mut rules: Vec<Rule> = Vec::new();
    let mut errors = Vec::new();
    for (source, text) in texts {
        let rule = text
            .map_err(|reason| RuleError::new(&source, None, reason))
            .and_then(|t| parse(&source, &t));
        match rule {
            Ok(r) => match rules.iter().find(|o| o.id == r.id) {
                Some(first) => errors.push(RuleError::new(
                    &source,
                    Some(&r.id),
                    format!("the id is taken by {}", first.source),
                )),
                None => rules.push(r),
            },
            Err(e) => errors.push(e),
        }
    }
    (rules, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(sql: &str) -> String {
        format!(
            "id: r1\nname: A rule\nseverity: high\ninterval_seconds: 5\nsql: {}\n",
            serde_json::to_string(sql).unwrap()
        )
    }

    #[test]
    fn a_select_over_known_tables_passes_with_its_tables() {
        let r = parse(
            "r.yaml",
            &rule(
                "WITH shells AS (SELECT pid FROM processes WHERE name = 'sh') \
                 SELECT * FROM shells s JOIN network_connections n ON n.pid = s.pid",
            ),
        )
        .unwrap();
        assert_eq!(
            r.tables,
            BTreeSet::from([Table::Processes, Table::NetworkConnections])
        );
        assert_eq!(r.severity, Severity::High);
        assert_eq!(r.interval, Duration::from_secs(5));
        let toml = "id = \"r2\"\nname = \"T\"\nseverity = \"low\"\ninterval_seconds = 1\n\
                    sql = \"SELECT pid FROM PROCESSES\"\n";
        assert_eq!(
            parse("r.toml", toml).unwrap().tables,
            BTreeSet::from([Table::Processes])
        );
    }

    #[test]
    fn writes_syntax_errors_unknown_tables_and_bad_fields_are_refused_with_the_reason() {
        for (sql, why) in [
            ("DELETE FROM processes", "only a read-only SELECT"),
            ("UPDATE processes SET name = 'x'", "only a read-only SELECT"),
            ("DROP TABLE processes", "only a read-only SELECT"),
            ("ATTACH DATABASE '/tmp/x' AS x", "only a read-only SELECT"),
            ("PRAGMA query_only = 0", "only a read-only SELECT"),
            (
                "SELECT 1; SELECT 2",
                "one SELECT statement expected, found 2",
            ),
            ("SELEC pid FROM processes", "SQL syntax"),
            ("SELECT * FROM files", "unknown table \"files\""),
            (
                "SELECT * FROM processes p JOIN sqlite_master m",
                "unknown table",
            ),
            ("SELECT 1", "reads no collector table"),
        ] {
            let e = parse("bad.yaml", &rule(sql)).unwrap_err();
            assert!(e.reason.contains(why), "{sql}: {e}");
            assert_eq!(e.to_string().split(':').next(), Some("bad.yaml (rule r1)"));
        }
        let e = parse("bad.yaml", &rule("SELECT 1").replace("high", "urgent")).unwrap_err();
        assert!(e.reason.contains("severity"), "{e}");
        let e = parse(
            "bad.yaml",
            &rule("SELECT 1").replace("interval_seconds: 5", "interval_seconds: 0"),
        )
        .unwrap_err();
        assert!(e.reason.contains("interval_seconds"), "{e}");
        let e = parse("bad.yaml", &format!("{}extra: 1\n", rule("SELECT 1"))).unwrap_err();
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn the_examples_load_and_a_duplicate_id_is_refused() {
        let (rules, errors) = load(None);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(rules.len(), EXAMPLES.len());
        let dir = std::env::temp_dir().join(format!("rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), rule("SELECT pid FROM processes")).unwrap();
        std::fs::write(dir.join("b.yaml"), rule("SELECT pid FROM processes")).unwrap();
        std::fs::write(dir.join("c.yaml"), rule("DELETE FROM processes")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a rule").unwrap();
        let (rules, errors) = load(Some(&dir));
        assert_eq!(rules.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].reason.contains("taken by"), "{errors:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
