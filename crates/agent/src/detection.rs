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
    /// Whether an evaluation of it is under way (it is not started again meanwhile).
    busy: bool,
}

/// An evaluation of one rule came to an end: its query's rows, or why there are none.
struct Done {
    rule: usize,
    outcome: Option<Arc<crate::tasks::Outcome>>,
    result: Result<Output, String>,
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
        // SQLite works (each evaluation opens its own database).
        Engine::new()?;
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
                busy: false,
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
        // Evaluations under way: each rule's query on a thread of its own, so one that runs
        // to its deadline holds up no other. Bounded: a rule has one at most.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Done>(self.rules.len());
        let mut work = tokio::task::JoinSet::new();
        loop {
            let next = self
                .rules
                .iter()
                .filter(|r| !r.busy)
                .map(|r| r.next)
                .min()
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = tokio::time::sleep_until(next) => self.start_due(&mut work, &done_tx),
                Some(done) = done_rx.recv() => self.finish(done).await,
                Some(_) = work.join_next(), if !work.is_empty() => {}
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
            let mut v = self.view.lock();
            v.rules = self.rules.iter().map(|r| r.view.clone()).collect();
            v.tasks = self.tasks.view();
        }
    }

    /// Starts the evaluations due now: rules that read the same tables share one collection
    /// task, then each runs its query over the rows on a thread of its own.
    fn start_due(
        &mut self,
        work: &mut tokio::task::JoinSet<()>,
        done: &tokio::sync::mpsc::Sender<Done>,
    ) {
        let now = tokio::time::Instant::now();
        let mut groups: BTreeMap<BTreeSet<Table>, Vec<usize>> = BTreeMap::new();
        for (i, r) in self.rules.iter_mut().enumerate() {
            if r.busy || r.next > now {
                continue;
            }
            r.busy = true;
            r.view.evaluations += 1;
            r.evaluated = Some(now);
            r.next = (r.next + r.rule.interval).max(now);
            groups.entry(r.rule.tables.clone()).or_default().push(i);
        }
        for (tables, due) in groups {
            let label = match due.as_slice() {
                [one] => self.rules[*one].rule.id.clone(),
                [first, rest @ ..] => format!("{}+{}", self.rules[*first].rule.id, rest.len()),
                [] => continue,
            };
            let id = self.tasks.next_id(&label);
            let queries: Vec<(usize, String)> = due
                .iter()
                .map(|&i| (i, self.rules[i].rule.sql.clone()))
                .collect();
            work.spawn(evaluate(
                self.tasks.clone(),
                self.supervisor.clone(),
                self.checks.clone(),
                id,
                tables,
                queries,
                self.deadline,
                done.clone(),
            ));
        }
    }

    /// An evaluation ended: its rule may start again, and its rows are concluded.
    async fn finish(&mut self, done: Done) {
        let Some(r) = self.rules.get_mut(done.rule) else {
            return;
        };
        r.busy = false;
        match (done.result, done.outcome) {
            (Ok(out), Some(outcome)) => self.conclude(done.rule, out, &outcome).await,
            (Ok(_), None) => self.failed(&[done.rule], "no rows"),
            (Err(why), _) => {
                self.failed(&[done.rule], &why);
            }
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
    async fn conclude(&mut self, i: usize, out: Output, outcome: &crate::tasks::Outcome) {
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

/// One evaluation of the rules `queries` (index and SQL), which read the same `tables`: one
/// collection task as `id`, then each query over its rows on a blocking thread of its own
/// (SQLite never runs on the runtime the broker shares); each rule's end is sent on `done`.
#[allow(clippy::too_many_arguments)]
async fn evaluate(
    tasks: Tasks,
    supervisor: Supervisor,
    checks: Checks,
    id: String,
    tables: BTreeSet<Table>,
    queries: Vec<(usize, String)>,
    deadline: Duration,
    done: tokio::sync::mpsc::Sender<Done>,
) {
    let failed = |why: String| {
        let done = done.clone();
        let rules: Vec<usize> = queries.iter().map(|(i, _)| *i).collect();
        async move {
            for rule in rules {
                let _ = done
                    .send(Done {
                        rule,
                        outcome: None,
                        result: Err(why.clone()),
                    })
                    .await;
            }
        }
    };
    let Some(outcome) = collect(&tasks, &supervisor, &checks, &id, &tables, deadline).await else {
        // No task for nobody: said in the rules' view, not counted as a partial task.
        failed("no running, checked collector answers its tables".into()).await;
        return;
    };
    if outcome.partial() {
        // Rows missing from a table can make a rule match what is not there (`NOT EXISTS`)
        // as much as miss what is: not evaluated, nothing raised or cleared.
        failed(format!(
            "not evaluated: no answer from {}",
            outcome.missing.join(", ")
        ))
        .await;
        return;
    }
    let outcome = Arc::new(outcome);
    let mut queries_run = tokio::task::JoinSet::new();
    for (rule, sql) in queries {
        let (outcome, done) = (Arc::clone(&outcome), done.clone());
        queries_run.spawn(async move {
            let result = match Engine::new() {
                Ok(engine) => {
                    let (_, r) = crate::engine::run_blocking(
                        engine,
                        outcome.tables.clone(),
                        vec![sql],
                        deadline,
                    )
                    .await;
                    r.and_then(|mut outs| outs.pop().unwrap_or_else(|| Ok(Output::default())))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = done
                .send(Done {
                    rule,
                    outcome: Some(outcome),
                    result,
                })
                .await;
        });
    }
    while queries_run.join_next().await.is_some() {}
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
