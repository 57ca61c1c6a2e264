//! Detection: each rule on its interval (and soon after events of the tables it reads)
//! becomes a collection task for those tables,
//! the answers are aggregated, the rule's SQL runs over them ([`crate::engine`]), and each
//! new match raises one [`Alert`](daemoneye_eventbus::schema::events::Alert) on
//! `events.alert.<severity>` (published `Processed`). A match (a row, all its values) that
//! persists is not raised again until it has cleared; an alert that could not be published
//! leaves its matches new. A partial answer is not evaluated (a collector that did not answer
//! says nothing about what it would have shown). SQLite runs on a blocking thread, never on
//! the agent's runtime, which the embedded broker shares.

use crate::engine::{Engine, Output};
use crate::lifecycle::{Checks, check_of};
use crate::rules::{Rule, RuleError};
use crate::tasks::{Candidate, TaskView, Tasks};
use daemoneye_eventbus::client::{Client, Publish, RecvError};
use daemoneye_eventbus::collector::tables::Table;
use daemoneye_eventbus::core::Qos;
use daemoneye_eventbus::rpc::HealthStatus;
use daemoneye_eventbus::schema::events as epb;
use daemoneye_eventbus::supervisor::{CollectorState, Supervisor};
use prost::Message as _;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Rows one alert carries at most (the rest are counted in it).
pub const ALERT_ROWS_MAX: usize = 100;

/// Matches remembered per rule at most (to raise each once while it persists).
pub const MATCHES_KEPT_MAX: usize = 10_000;

/// One rule as the report shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RuleView {
    /// Its id.
    pub id: String,
    /// Its severity.
    pub severity: String,
    /// Seconds between evaluations.
    pub interval_secs: u64,
    /// Evaluations run (with rows or not).
    pub evaluations: u64,
    /// Rows it matched at its last evaluation.
    pub matches: u64,
    /// Alerts it raised.
    pub alerts: u64,
    /// Evaluations that failed.
    pub errors: u64,
    /// Why the last one failed, or what was missing from its last answer.
    pub last_problem: Option<String>,
}

/// Detection as the report shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DetectionView {
    /// The rules running.
    pub rules: Vec<RuleView>,
    /// Rules refused when loaded, each with its file and why.
    pub refused: Vec<String>,
    /// Alerts raised.
    pub alerts: u64,
    /// Collection tasks.
    pub tasks: TaskView,
}

/// Where detection's view is shared with the report.
pub type SharedView = Arc<parking_lot::Mutex<DetectionView>>;

struct Running {
    rule: Rule,
    /// Matches at the last evaluation (each row's values).
    last: HashSet<Vec<Option<String>>>,
    view: RuleView,
    next: tokio::time::Instant,
    /// When it was last evaluated.
    evaluated: Option<tokio::time::Instant>,
    /// Ids of the events since then of the tables it reads (correlation ids, else message
    /// ids), at most [`EVENTS_KEPT`].
    events: Vec<String>,
}

/// The events that make rules run soon: process and connection changes.
const EVENT_TOPICS: [&str; 2] = ["events.process.lifecycle", "events.network.connections"];

/// How soon after an event of its tables a rule runs (events of a burst are taken together).
pub const EVENT_DELAY: Duration = Duration::from_millis(100);

/// Shortest time between two evaluations of a rule that events bring forward.
pub const EVENT_GAP: Duration = Duration::from_secs(1);

/// Event ids kept per rule for its next alert.
pub const EVENTS_KEPT: usize = 16;

/// The detection loop's state (owned by its task).
pub struct Detection {
    rules: Vec<Running>,
    /// SQLite, lent to a blocking thread for each evaluation.
    engine: Option<Engine>,
    tasks: Tasks,
    client: Client,
    supervisor: Supervisor,
    checks: Checks,
    deadline: Duration,
    view: SharedView,
}

impl std::fmt::Debug for Detection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detection")
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// The collectors that may take tasks now: running, answered their last health check (not
/// unhealthy), with the tables their capabilities name.
pub(crate) async fn candidates(supervisor: &Supervisor, checks: &Checks) -> Vec<Candidate> {
    let Ok(statuses) = supervisor.status().await else {
        return Vec::new();
    };
    let checks = checks.lock().clone();
    statuses
        .iter()
        .filter(|s| s.state == CollectorState::Running)
        .filter_map(|s| {
            let check = check_of(&checks, s)?;
            if check.health == HealthStatus::Unhealthy {
                return None;
            }
            Some(Candidate {
                id: s.id.clone(),
                collector_type: s.collector_type.clone(),
                tables: check
                    .capabilities
                    .iter()
                    .filter_map(|c| Table::from_name(c))
                    .collect(),
                capacity: check.task_capacity,
            })
        })
        .filter(|c| !c.tables.is_empty() && c.capacity > 0)
        .collect()
}

/// Loads the rules of `dir` (the built-in examples when `None`) and checks each with SQLite
/// too (its columns and functions exist, it is read-only): the rules that passed, and an
/// error naming the file, the rule and the reason for each that did not.
///
/// # Errors
///
/// When SQLite cannot open its database in memory.
pub fn load_rules(
    dir: Option<&std::path::Path>,
) -> Result<(Vec<Rule>, Vec<RuleError>), crate::engine::EngineError> {
    let (rules, mut refused) = crate::rules::load(dir);
    let engine = Engine::new()?;
    let mut passed = Vec::with_capacity(rules.len());
    for rule in rules {
        match engine.check(&rule.sql) {
            Ok(()) => passed.push(rule),
            Err(e) => refused.push(RuleError {
                origin: rule.source.clone(),
                rule: Some(rule.id.clone()),
                reason: e.to_string(),
            }),
        }
    }
    Ok((passed, refused))
}

impl Detection {
    /// Detection of `rules` (checked by [`load_rules`]; `refused` are reported), tasks within
    /// `deadline`, alerts published with `client`.
    ///
    /// # Errors
    ///
    /// When SQLite cannot open its database in memory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        rules: Vec<Rule>,
        refused: Vec<RuleError>,
        tasks: Tasks,
        client: Client,
        supervisor: Supervisor,
        checks: Checks,
        deadline: Duration,
        view: SharedView,
    ) -> Result<Self, crate::engine::EngineError> {
        let engine = Engine::new()?;
        let now = tokio::time::Instant::now();
        let mut running = Vec::new();
        for rule in rules {
            running.push(Running {
                view: RuleView {
                    id: rule.id.clone(),
                    severity: rule.severity.as_str().into(),
                    interval_secs: rule.interval.as_secs(),
                    ..RuleView::default()
                },
                // The first evaluation once the collectors had a moment to be heard.
                next: now + rule.interval.min(Duration::from_secs(2)),
                rule,
                last: HashSet::new(),
                evaluated: None,
                events: Vec::new(),
            });
        }
        for e in &refused {
            tracing::warn!(error = %e, "rule refused");
        }
        {
            let mut v = view.lock();
            v.refused = refused.iter().map(ToString::to_string).collect();
            v.rules = running.iter().map(|r| r.view.clone()).collect();
        }
        Ok(Self {
            rules: running,
            engine: Some(engine),
            tasks,
            client,
            supervisor,
            checks,
            deadline,
            view,
        })
    }

    /// Evaluates each rule on its interval, and soon after events of the tables it reads
    /// (at most once per [`EVENT_GAP`]), until the task is stopped.
    pub async fn run(mut self) {
        if self.rules.is_empty() {
            return;
        }
        let mut events = match self.client.subscribe(EVENT_TOPICS).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "rules run on their intervals only");
                None
            }
        };
        loop {
            let next = self
                .rules
                .iter()
                .map(|r| r.next)
                .min()
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                r = async { Some(events.as_mut()?.recv().await) }, if events.is_some() => {
                    match r {
                        Some(Ok(m)) => self.heard(&m),
                        Some(Err(RecvError::Closed | RecvError::Ended(_))) | None => {
                            tracing::warn!("events stopped: rules run on their intervals only");
                            events = None;
                        }
                        // A gap (events dropped while an evaluation ran, a reconnection):
                        // every rule runs soon.
                        Some(Err(_)) => self.heard_gap(),
                    }
                    continue;
                }
            }
            let now = tokio::time::Instant::now();
            // Rules due now that read the same tables share one collection task.
            let mut groups: BTreeMap<BTreeSet<Table>, Vec<usize>> = BTreeMap::new();
            for (i, r) in self.rules.iter().enumerate() {
                if r.next <= now {
                    groups.entry(r.rule.tables.clone()).or_default().push(i);
                }
            }
            for (tables, due) in &groups {
                self.evaluate(tables, due).await;
            }
            let after = tokio::time::Instant::now();
            for r in &mut self.rules {
                if r.next <= now {
                    r.next = (r.next + r.rule.interval).max(after);
                }
            }
            let mut v = self.view.lock();
            v.rules = self.rules.iter().map(|r| r.view.clone()).collect();
            v.tasks = self.tasks.view();
        }
    }

    /// Events were lost: every rule runs soon.
    fn heard_gap(&mut self) {
        let soon = tokio::time::Instant::now() + EVENT_DELAY;
        for r in &mut self.rules {
            let earliest = r.evaluated.map_or(soon, |t| (t + EVENT_GAP).max(soon));
            r.next = r.next.min(earliest);
        }
    }

    /// An event of a table: the rules reading it are evaluated soon.
    fn heard(&mut self, m: &daemoneye_eventbus::core::Message) {
        let table = match m.topic().as_str().split('.').nth(1) {
            Some("process") => Table::Processes,
            Some("network") => Table::NetworkConnections,
            _ => return,
        };
        let id = m
            .header()
            .correlation
            .as_ref()
            .map_or_else(|| m.id().to_string(), |c| c.correlation_id.clone());
        let soon = tokio::time::Instant::now() + EVENT_DELAY;
        for r in &mut self.rules {
            if !r.rule.tables.contains(&table) {
                continue;
            }
            let earliest = r.evaluated.map_or(soon, |t| (t + EVENT_GAP).max(soon));
            if earliest < r.next {
                r.next = earliest;
            }
            if r.events.len() < EVENTS_KEPT {
                r.events.push(id.clone());
            }
        }
    }

    /// Evaluates the rules `due` (indices), which read the same `tables`: one collection
    /// task for all of them, their queries over the same rows.
    async fn evaluate(&mut self, tables: &BTreeSet<Table>, due: &[usize]) {
        for &i in due {
            let r = &mut self.rules[i];
            r.view.evaluations += 1;
            r.evaluated = Some(tokio::time::Instant::now());
        }
        let label = match due {
            [one] => self.rules[*one].rule.id.clone(),
            [first, rest @ ..] => format!("{}+{}", self.rules[*first].rule.id, rest.len()),
            [] => return,
        };
        let id = self.tasks.next_id(&label);
        let Some(outcome) = collect(
            &self.tasks,
            &self.supervisor,
            &self.checks,
            &id,
            tables,
            self.deadline,
        )
        .await
        else {
            // No task for nobody: said in the rules' view, not counted as a partial task.
            self.failed(due, "no running, checked collector answers its tables");
            return;
        };
        if outcome.partial() {
            // Rows missing from a table can make a rule match what is not there (`NOT
            // EXISTS`) as much as miss what is: not evaluated, nothing raised or cleared.
            let why = format!(
                "not evaluated: no answer from {}",
                outcome.missing.join(", ")
            );
            self.failed(due, &why);
            return;
        }
        let engine = match self.engine.take().map_or_else(Engine::new, Ok) {
            Ok(e) => e,
            Err(e) => {
                self.failed(due, &e.to_string());
                return;
            }
        };
        let sqls = due
            .iter()
            .map(|&i| self.rules[i].rule.sql.clone())
            .collect();
        let (engine, results) =
            crate::engine::run_blocking(engine, outcome.tables.clone(), sqls, self.deadline).await;
        self.engine = engine;
        match results {
            Ok(results) => {
                for (&i, result) in due.iter().zip(results) {
                    self.conclude(i, result, &outcome).await;
                }
            }
            Err(e) => self.failed(due, &e.to_string()),
        }
    }

    /// Records why the rules `due` were not evaluated.
    fn failed(&mut self, due: &[usize], why: &str) {
        for &i in due {
            let r = &mut self.rules[i];
            tracing::warn!(rule = %r.rule.id, problem = %why, "rule not evaluated");
            r.view.errors += 1;
            r.view.last_problem = Some(why.to_owned());
        }
    }

    /// Rule `i`'s query came to `result`: its new matches raise an alert.
    async fn conclude(
        &mut self,
        i: usize,
        result: Result<Output, crate::engine::EngineError>,
        outcome: &crate::tasks::Outcome,
    ) {
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                self.failed(&[i], &e.to_string());
                return;
            }
        };
        let r = &mut self.rules[i];
        r.view.last_problem = None;
        r.view.matches = out.rows.len() as u64;
        let fresh: Vec<&Vec<Option<String>>> = out
            .rows
            .iter()
            .filter(|row| !r.last.contains(*row))
            .collect();
        if fresh.is_empty() {
            r.events.clear();
        } else {
            let events = std::mem::take(&mut r.events);
            let alert = alert_of(&r.rule, &out, &fresh, outcome, events);
            let sent = self
                .client
                .publish_with(
                    Publish::new(r.rule.severity.topic(), alert.encode_to_vec())
                        .qos(Qos::Processed),
                )
                .await;
            match sent {
                Ok(_) => {
                    r.view.alerts += 1;
                    self.view.lock().alerts += 1;
                    tracing::info!(rule = %r.rule.id, rows = fresh.len(), "alert raised");
                }
                Err(e) => {
                    // Not raised: the matches stay new for the next evaluation.
                    self.failed(&[i], &format!("alert not published: {e}"));
                    return;
                }
            }
        }
        // The matches now, at most MATCHES_KEPT_MAX (those beyond are raised again while
        // they last: counted in the alert's rows, never silently).
        r.last = out.rows.iter().take(MATCHES_KEPT_MAX).cloned().collect();
    }
}

/// Collects the rows of `tables` as task `id`: a collection task to the collectors that may
/// take it now, aggregated by `deadline`; `None` when no collector may.
pub(crate) async fn collect(
    tasks: &Tasks,
    supervisor: &Supervisor,
    checks: &Checks,
    id: &str,
    tables: &std::collections::BTreeSet<Table>,
    deadline: Duration,
) -> Option<crate::tasks::Outcome> {
    let candidates = candidates(supervisor, checks).await;
    if candidates.is_empty() {
        return None;
    }
    Some(tasks.run(id, tables, &candidates, deadline).await)
}

/// The alert for `fresh`, the new rows of `out`.
fn alert_of(
    rule: &Rule,
    out: &Output,
    fresh: &[&Vec<Option<String>>],
    outcome: &crate::tasks::Outcome,
    events: Vec<String>,
) -> epb::Alert {
    let rows = fresh
        .iter()
        .take(ALERT_ROWS_MAX)
        .map(|row| epb::AlertRow {
            columns: out
                .columns
                .iter()
                .zip(row.iter())
                .filter_map(|(c, v)| Some((c.clone(), v.clone()?)))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        })
        .collect();
    epb::Alert {
        rule_id: rule.id.clone(),
        rule_name: rule.name.clone(),
        severity: match rule.severity {
            crate::rules::Severity::Low => epb::Severity::Low,
            crate::rules::Severity::Medium => epb::Severity::Medium,
            crate::rules::Severity::High => epb::Severity::High,
            crate::rules::Severity::Critical => epb::Severity::Critical,
        } as i32,
        description: rule.description.trim().to_owned(),
        rows,
        rows_left_out: (fresh.len().saturating_sub(ALERT_ROWS_MAX) as u64)
            .saturating_add(out.rows_left_out)
            .saturating_add(outcome.rows_left_out),
        task_correlation_id: outcome.task_id.clone(),
        answered: outcome.answered.clone(),
        missing: outcome.missing.clone(),
        raised_at_ns: daemoneye_eventbus::collector::services::now_ns(),
        event_correlation_ids: events,
    }
}
