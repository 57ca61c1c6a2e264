//! Collection tasks (seed 003, "Multi-Collector Coordination"): the agent asks the
//! collectors for the rows of the tables a rule or query reads.
//!
//! - [`Dispatcher`] (pure) chooses, for each collector type that answers one of the tables,
//!   its running and healthy instances in round-robin order, skipping those at the capacity
//!   they announced (`task_capacity` in their capabilities); the
//!   first answers, the others take over when it fails (redistribution).
//! - [`Aggregate`] (pure) matches answers to their task by id, keeps one answer per collector
//!   (a redelivery is a duplicate), orders them by the collector's sequence number, merges
//!   the rows per table without duplicates, and at the deadline completes as partial, naming
//!   the collector types that did not answer. An answer after that is late: counted, never
//!   merged.
//! - [`Tasks`] is the shell: RPC calls (`EXECUTE_TASK` on `control.collector.task.<id>`)
//!   with the task's correlation id and deadlines, and the counters.

use daemoneye_eventbus::client::Request;
use daemoneye_eventbus::collector::tables::Table;
use daemoneye_eventbus::core::{CorrelationMetadata, Topic};
use daemoneye_eventbus::rpc::{CollectorRpcClient, RpcRequest};
use daemoneye_eventbus::schema::rpc as pb;
use prost::Message as _;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A collector that may take tasks: running, and not unhealthy at its last check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: String,
    /// Its type: one instance of a type answers for all of them.
    pub collector_type: String,
    /// The tables it answers (its capabilities that are table names).
    pub tables: BTreeSet<Table>,
    /// Tasks it takes at once, as it said (at least 1).
    pub capacity: u32,
}

/// Who a task goes to: per collector type, its instances in the order to try them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per type, the tables it is asked for and its instances in order.
    pub groups: BTreeMap<String, (BTreeSet<Table>, Vec<String>)>,
    /// Tables no running collector answers.
    pub unanswered: BTreeSet<Table>,
    /// Types whose every instance is at capacity: not asked this time (named as missing).
    pub busy: BTreeSet<String>,
}

/// Round-robin over the instances of each type, within each instance's capacity.
#[derive(Debug, Default)]
pub struct Dispatcher {
    /// Per type, where the next task starts.
    next: HashMap<String, usize>,
    /// Tasks in flight per instance.
    in_flight: HashMap<String, u32>,
}

impl Dispatcher {
    /// Chooses the collectors for a task reading `tables` among `candidates`, and counts the
    /// first of each type as busy with it (until [`Dispatcher::done`]).
    pub fn plan(&mut self, tables: &BTreeSet<Table>, candidates: &[Candidate]) -> Plan {
        let mut plan = Plan::default();
        let mut by_type: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
        for c in candidates {
            if c.tables.iter().any(|t| tables.contains(t)) {
                by_type.entry(&c.collector_type).or_default().push(c);
            }
        }
        for t in tables {
            if !candidates.iter().any(|c| c.tables.contains(t)) {
                plan.unanswered.insert(*t);
            }
        }
        for (kind, mut instances) in by_type {
            instances.sort_by(|a, b| a.id.cmp(&b.id));
            let n = instances.len();
            let start = self.next.get(kind).copied().unwrap_or(0) % n;
            self.next.insert(kind.to_owned(), (start + 1) % n);
            let order: Vec<String> = (0..n)
                .map(|i| instances[(start + i) % n])
                .filter(|c| self.in_flight.get(&c.id).copied().unwrap_or(0) < c.capacity.max(1))
                .map(|c| c.id.clone())
                .collect();
            let asked: BTreeSet<Table> = instances
                .iter()
                .flat_map(|c| c.tables.iter().copied())
                .filter(|t| tables.contains(t))
                .collect();
            let Some(first) = order.first() else {
                plan.busy.insert(kind.to_owned());
                continue;
            };
            *self.in_flight.entry(first.clone()).or_default() += 1;
            plan.groups.insert(kind.to_owned(), (asked, order));
        }
        plan
    }

    /// Counts instance `id` as busy with one more task (a redistribution to it).
    pub fn took(&mut self, id: &str) {
        *self.in_flight.entry(id.to_owned()).or_default() += 1;
    }

    /// Instance `id` is done with one task (answered or failed).
    pub fn done(&mut self, id: &str) {
        if let Some(n) = self.in_flight.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(id);
            }
        }
    }

    /// Tasks in flight across instances.
    #[must_use]
    pub fn in_flight(&self) -> u64 {
        self.in_flight.values().map(|n| u64::from(*n)).sum()
    }
}

/// What an answer was to its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Merged.
    New,
    /// This collector had answered already (a redelivery): not merged again.
    Duplicate,
    /// The aggregate had completed: counted, not merged.
    Late,
    /// For another task, or from a collector type it did not ask.
    Foreign,
}

/// The answers to one task until its deadline.
#[derive(Debug)]
pub struct Aggregate {
    task_id: String,
    /// Types asked, and the one instance whose answer counts for each.
    asked: BTreeMap<String, Option<String>>,
    /// Answers by collector id: its sequence number and rows.
    answers: BTreeMap<String, (u64, Vec<pb::TableRows>)>,
    complete: bool,
}

/// A completed aggregate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// The task's id (also its correlation id).
    pub task_id: String,
    /// Rows per table, merged across collectors without duplicates.
    pub tables: Vec<pb::TableRows>,
    /// Collectors that answered.
    pub answered: Vec<String>,
    /// Collector types that did not answer by the deadline (or had no instance to ask), and
    /// tables no collector answers.
    pub missing: Vec<String>,
    /// Rows collectors left out of their answers (bounds).
    pub rows_left_out: u64,
}

impl Outcome {
    /// Whether something asked for did not answer.
    #[must_use]
    pub fn partial(&self) -> bool {
        !self.missing.is_empty()
    }
}

impl Aggregate {
    /// Awaits answers to `task_id` from one instance of each of `types`.
    #[must_use]
    pub fn new(task_id: &str, types: impl IntoIterator<Item = String>) -> Self {
        Self {
            task_id: task_id.to_owned(),
            asked: types.into_iter().map(|t| (t, None)).collect(),
            answers: BTreeMap::new(),
            complete: false,
        }
    }

    /// Takes `answer` from an instance of `collector_type`.
    pub fn accept(&mut self, collector_type: &str, answer: pb::TaskResponse) -> Accepted {
        if answer.task_id != self.task_id {
            return Accepted::Foreign;
        }
        let Some(who) = self.asked.get_mut(collector_type) else {
            return Accepted::Foreign;
        };
        if self.complete {
            return Accepted::Late;
        }
        if who.is_some() || self.answers.contains_key(&answer.collector_id) {
            return Accepted::Duplicate;
        }
        *who = Some(answer.collector_id.clone());
        self.answers
            .insert(answer.collector_id, (answer.sequence, answer.tables));
        Accepted::New
    }

    /// Whether every type asked has answered.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.asked.values().all(Option::is_some)
    }

    /// Completes the aggregate (at its deadline, or when full): later answers are late.
    /// Each answer's rows are taken in this agent's column order (a column it does not know
    /// is left out, one the collector did not send is NULL), at most
    /// [`tables::MAX_ROWS`](daemoneye_eventbus::collector::tables::MAX_ROWS) per table and
    /// answer; rows beyond, or with a value count that is not their columns', are counted in
    /// `rows_left_out`.
    pub fn complete(&mut self, unanswered: &BTreeSet<Table>) -> Outcome {
        use daemoneye_eventbus::collector::tables::MAX_ROWS;
        self.complete = true;
        let mut answers: Vec<(&String, &(u64, Vec<pb::TableRows>))> = self.answers.iter().collect();
        // Per collector in the order it numbered its answers (ids break ties).
        answers.sort_by(|a, b| (a.1.0, a.0).cmp(&(b.1.0, b.0)));
        let mut merged: BTreeMap<Table, (pb::TableRows, HashSet<Vec<u8>>)> = BTreeMap::new();
        let mut rows_left_out: u64 = 0;
        for (_, (_, tables)) in &answers {
            for t in tables {
                rows_left_out = rows_left_out.saturating_add(t.rows_left_out);
                let Some(table) = Table::from_name(&t.table) else {
                    rows_left_out = rows_left_out.saturating_add(t.rows.len() as u64);
                    continue;
                };
                let (into, seen) = merged.entry(table).or_insert_with(|| {
                    (
                        pb::TableRows {
                            table: table.name().to_owned(),
                            columns: table.columns().iter().map(|c| c.name.to_owned()).collect(),
                            ..pb::TableRows::default()
                        },
                        HashSet::new(),
                    )
                });
                // Where each of our columns is in the answer's.
                let from: Vec<Option<usize>> = table
                    .columns()
                    .iter()
                    .map(|c| t.columns.iter().position(|a| a == c.name))
                    .collect();
                let collector = table
                    .columns()
                    .iter()
                    .position(|c| c.name == "collector_id");
                for (n, row) in t.rows.iter().enumerate() {
                    if n >= MAX_ROWS || row.values.len() != t.columns.len() {
                        rows_left_out = rows_left_out.saturating_add(1);
                        continue;
                    }
                    let values: Vec<pb::Value> = from
                        .iter()
                        .map(|at| at.map_or_else(pb::Value::default, |i| row.values[i].clone()))
                        .collect();
                    // The same row from two collectors (or twice from one) once: compared
                    // without the column that names the collector.
                    let key: Vec<u8> = values
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| Some(*i) != collector)
                        .flat_map(|(_, v)| {
                            prost::Message::encode_to_vec(v).into_iter().chain([0xff])
                        })
                        .collect();
                    if seen.insert(key) {
                        into.rows.push(pb::Row { values });
                    }
                }
            }
        }
        let mut missing: Vec<String> = self
            .asked
            .iter()
            .filter(|(_, who)| who.is_none())
            .map(|(t, _)| t.clone())
            .collect();
        missing.extend(unanswered.iter().map(|t| format!("table {t}")));
        Outcome {
            task_id: self.task_id.clone(),
            tables: merged.into_values().map(|(t, _)| t).collect(),
            answered: answers.iter().map(|(id, _)| (*id).clone()).collect(),
            missing,
            rows_left_out,
        }
    }
}

/// How long a task waits before asking its collectors again when each failed at once.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Counters of tasks (in the agent's report).
#[derive(Debug, Default)]
pub struct TaskCounts {
    /// Tasks started.
    pub started: AtomicU64,
    /// Tasks whose every collector answered.
    pub complete: AtomicU64,
    /// Tasks completed as partial.
    pub partial: AtomicU64,
    /// Calls to an instance that failed or timed out (the task went to another if any).
    pub failed_calls: AtomicU64,
    /// Tasks given to another instance after one failed.
    pub redistributed: AtomicU64,
    /// Answers after their task had completed.
    pub late: AtomicU64,
}

/// Task counters as a report shows them.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TaskView {
    /// Tasks started.
    pub started: u64,
    /// In flight now.
    pub in_flight: u64,
    /// Completed with every answer.
    pub complete: u64,
    /// Completed as partial.
    pub partial: u64,
    /// Calls that failed or timed out.
    pub failed_calls: u64,
    /// Tasks moved to another instance.
    pub redistributed: u64,
    /// Late answers.
    pub late: u64,
}

/// The task shell: dispatches over RPC and aggregates.
#[derive(Clone)]
pub struct Tasks {
    rpc: CollectorRpcClient,
    dispatcher: Arc<parking_lot::Mutex<Dispatcher>>,
    counts: Arc<TaskCounts>,
    /// This agent run's prefix of task ids.
    run: Arc<str>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").finish_non_exhaustive()
    }
}

/// What one collector type's part of a task came to.
struct Part {
    collector_type: String,
    answer: Option<pb::TaskResponse>,
}

impl Tasks {
    /// Tasks sent with `rpc`.
    #[must_use]
    pub fn new(rpc: CollectorRpcClient) -> Self {
        Self {
            rpc,
            dispatcher: Arc::default(),
            counts: Arc::default(),
            run: format!("{:08x}", fastrand::u32(..)).into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The counters now.
    #[must_use]
    pub fn view(&self) -> TaskView {
        let c = &self.counts;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TaskView {
            started: l(&c.started),
            in_flight: self.dispatcher.lock().in_flight(),
            complete: l(&c.complete),
            partial: l(&c.partial),
            failed_calls: l(&c.failed_calls),
            redistributed: l(&c.redistributed),
            late: l(&c.late),
        }
    }

    /// Runs one task: the rows of `tables` from `candidates`, aggregated by `deadline` from
    /// now. `task_id` is its id and correlation id.
    pub async fn run(
        &self,
        task_id: &str,
        tables: &BTreeSet<Table>,
        candidates: &[Candidate],
        deadline: Duration,
    ) -> Outcome {
        self.counts.started.fetch_add(1, Ordering::Relaxed);
        let plan = self.dispatcher.lock().plan(tables, candidates);
        let mut aggregate = Aggregate::new(task_id, plan.groups.keys().cloned());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Part>(plan.groups.len().max(1));
        let until = tokio::time::Instant::now() + deadline;
        for (kind, (asked, order)) in plan.groups {
            let tx = tx.clone();
            let this = self.clone();
            let task_id = task_id.to_owned();
            tokio::spawn(async move {
                let answer = this.ask(&task_id, &asked, &order, until, deadline).await;
                let part = Part {
                    collector_type: kind,
                    answer,
                };
                if let Err(late) = tx.send(part).await
                    && late.0.answer.is_some()
                {
                    // The aggregate completed without it.
                    this.counts.late.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        drop(tx);
        while !aggregate.is_full() {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(Part {
                    collector_type,
                    answer: Some(answer),
                })) => {
                    // One part per type: never a duplicate here.
                    aggregate.accept(&collector_type, answer);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let mut outcome = aggregate.complete(&plan.unanswered);
        outcome.missing.extend(
            plan.busy
                .iter()
                .map(|t| format!("{t} (every instance at capacity)")),
        );
        let counter = if outcome.partial() {
            &self.counts.partial
        } else {
            &self.counts.complete
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    /// Asks the instances of one type in `order` until one answers: each gets half the time
    /// left, the last all of it and twice as long again (its answer may then come late). Each
    /// call is one attempt (the next instance is the retry); when every instance failed fast
    /// (busy, restarting) and time is left, they are asked again, [`RETRY_AFTER`] later: at
    /// least once within the deadline. An answer is taken as from the instance called, with
    /// the tables it was asked for only.
    async fn ask(
        &self,
        task_id: &str,
        tables: &BTreeSet<Table>,
        order: &[String],
        until: tokio::time::Instant,
        deadline: Duration,
    ) -> Option<pb::TaskResponse> {
        let mut attempt = 0;
        let mut previous: Option<&String> = None;
        loop {
            for (i, id) in order.iter().enumerate() {
                if attempt > 0 {
                    self.dispatcher.lock().took(id);
                    if previous != Some(id) {
                        self.counts.redistributed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                previous = Some(id);
                attempt += 1;
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                let timeout = if i + 1 == order.len() {
                    left + 2 * deadline
                } else {
                    (left / 2).max(Duration::from_millis(50))
                };
                let result = self.call(task_id, tables, id, attempt, timeout).await;
                self.dispatcher.lock().done(id);
                match result {
                    Ok(mut answer) => {
                        answer.collector_id.clone_from(id);
                        answer.task_id = task_id.to_owned();
                        answer.tables.retain(|t| {
                            Table::from_name(&t.table).is_some_and(|t| tables.contains(&t))
                        });
                        return Some(answer);
                    }
                    Err(e) => {
                        tracing::warn!(collector = %id, error = %e, "a collection task failed");
                    }
                }
                self.counts.failed_calls.fetch_add(1, Ordering::Relaxed);
                if tokio::time::Instant::now() >= until {
                    return None;
                }
            }
            if tokio::time::Instant::now() + RETRY_AFTER >= until {
                return None;
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    /// One attempt of a task at instance `id`.
    async fn call(
        &self,
        task_id: &str,
        tables: &BTreeSet<Table>,
        id: &str,
        attempt: u32,
        timeout: Duration,
    ) -> Result<pb::TaskResponse, String> {
        let request = RpcRequest::task(
            String::new(),
            id,
            pb::TaskRequest {
                task_id: task_id.to_owned(),
                tables: tables.iter().map(|t| t.name().to_owned()).collect(),
                attempt,
                max_rows: 0,
            },
            timeout,
        );
        let topic = Topic::new(&request.target).map_err(|e| e.to_string())?;
        let reply = self
            .rpc
            .client()
            .call(
                Request::new(topic, request.encode())
                    .timeout(timeout)
                    .operation("execute_task")
                    .correlation(CorrelationMetadata::root(
                        task_id,
                        daemoneye_eventbus::collector::services::now_ns(),
                    )),
            )
            .await
            .map_err(|e| e.to_string())?;
        match pb::RpcResponse::decode(reply.payload().as_ref()) {
            Ok(pb::RpcResponse {
                body: Some(pb::rpc_response::Body::Task(answer)),
                ..
            }) => Ok(answer),
            Ok(_) => Err("the reply is not a task's answer".into()),
            Err(e) => Err(format!("the reply is not an RpcResponse: {e}")),
        }
    }

    /// A new task id: this agent run's, the label (a rule's id, `query`) and a number.
    #[must_use]
    pub fn next_id(&self, label: &str) -> String {
        format!(
            "{}-{label}.{}",
            self.run,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daemoneye_eventbus::collector::tables::{Rows, int, text};

    const CAPACITY: u32 = 3;

    fn candidate(id: &str, kind: &str, tables: &[Table]) -> Candidate {
        Candidate {
            id: id.into(),
            collector_type: kind.into(),
            tables: tables.iter().copied().collect(),
            capacity: CAPACITY,
        }
    }

    #[test]
    fn instances_of_a_type_take_turns_within_capacity_and_tables_nobody_answers_are_named() {
        let mut d = Dispatcher::default();
        let cands = [
            candidate("procmond-a", "procmond", &[Table::Processes]),
            candidate("procmond-b", "procmond", &[Table::Processes]),
            candidate("netmond", "netmond", &[Table::NetworkConnections]),
        ];
        let procs = BTreeSet::from([Table::Processes]);
        let first = d.plan(&procs, &cands);
        let second = d.plan(&procs, &cands);
        assert_eq!(first.groups["procmond"].1, ["procmond-a", "procmond-b"]);
        assert_eq!(second.groups["procmond"].1, ["procmond-b", "procmond-a"]);
        assert!(!first.groups.contains_key("netmond"));
        let both = BTreeSet::from([Table::Processes, Table::NetworkConnections]);
        let p = d.plan(&both, &cands[..2]);
        assert_eq!(p.unanswered, BTreeSet::from([Table::NetworkConnections]));
        // Fill procmond-a and -b to capacity: the type is busy.
        for _ in 0..2 * CAPACITY {
            d.plan(&procs, &cands);
        }
        let p = d.plan(&procs, &cands);
        assert!(p.busy.contains("procmond"), "{p:?}");
        d.done("procmond-b");
        let p = d.plan(&procs, &cands);
        assert_eq!(p.groups["procmond"].1, ["procmond-b"]);
    }

    fn answer(task: &str, collector: &str, seq: u64, pids: &[i64]) -> pb::TaskResponse {
        let mut rows = Rows::new(Table::NetworkConnections, 0);
        for pid in pids {
            let mut v: Vec<pb::Value> = Table::NetworkConnections
                .columns()
                .iter()
                .map(|_| daemoneye_eventbus::collector::tables::null())
                .collect();
            v[9] = int(*pid);
            v[11] = text(collector);
            rows.push(v);
        }
        pb::TaskResponse {
            task_id: task.into(),
            collector_id: collector.into(),
            sequence: seq,
            tables: vec![rows.finish()],
        }
    }

    #[test]
    fn answers_merge_once_and_the_deadline_makes_a_partial_with_late_answers_counted() {
        let mut a = Aggregate::new("t1", ["netmond".to_owned(), "procmond".to_owned()]);
        assert_eq!(
            a.accept("netmond", answer("t0", "n1", 1, &[1])),
            Accepted::Foreign
        );
        assert_eq!(
            a.accept("other", answer("t1", "x", 1, &[1])),
            Accepted::Foreign
        );
        assert_eq!(
            a.accept("netmond", answer("t1", "n1", 2, &[1, 2, 2])),
            Accepted::New
        );
        assert_eq!(
            a.accept("netmond", answer("t1", "n1", 2, &[1])),
            Accepted::Duplicate
        );
        assert_eq!(
            a.accept("netmond", answer("t1", "n2", 1, &[3])),
            Accepted::Duplicate
        );
        assert!(!a.is_full());
        let out = a.complete(&BTreeSet::new());
        assert!(out.partial());
        assert_eq!(out.missing, ["procmond"]);
        assert_eq!(out.answered, ["n1"]);
        // Pid 2 twice in one answer: once.
        assert_eq!(out.tables[0].rows.len(), 2);
        assert_eq!(
            a.accept("procmond", answer("t1", "p1", 1, &[])),
            Accepted::Late
        );
    }

    #[test]
    fn answers_are_taken_in_our_column_order_and_bad_rows_are_counted_not_merged() {
        let mut a = Aggregate::new("t", ["netmond".to_owned(), "other".to_owned()]);
        // netmond's columns reversed, with one we do not know: reordered, the unknown left out.
        let mut n = answer("t", "n1", 1, &[7]);
        let t = &mut n.tables[0];
        t.columns.reverse();
        t.columns.push("secret".into());
        for row in &mut t.rows {
            row.values.reverse();
            row.values.push(text("x"));
        }
        // A row whose values are not its columns', and a sum that would overflow.
        t.rows.push(pb::Row {
            values: vec![int(1)],
        });
        t.rows_left_out = u64::MAX;
        assert_eq!(a.accept("netmond", n), Accepted::New);
        // Another type's answer with the same table, in our order: no duplicate row.
        assert_eq!(a.accept("other", answer("t", "o1", 1, &[7])), Accepted::New);
        let out = a.complete(&BTreeSet::new());
        let t = &out.tables[0];
        assert_eq!(t.columns[9], "pid");
        assert_eq!(t.rows.len(), 1, "{t:?}");
        assert_eq!(t.rows[0].values[9], int(7));
        assert_eq!(t.rows[0].values.len(), t.columns.len());
        assert_eq!(out.rows_left_out, u64::MAX);
    }
}
