//! Who may do what (`broker.acl_file`): a policy of rules, each keyed by an identity (uid,
//! gid, executable, supervised collector, TLS subject, client name) and granting operations
//! (publish, subscribe, request, reply) on topic filters; anything not granted is denied, and
//! a rule's `deny` lists take back what any rule granted. A connection's identity resolves the
//! policy once into its [`Grants`], which every subscribe and publish is checked against.
//!
//! Pure: the file is read by the caller ([`Policy::parse`] takes its text), no clock, no I/O.
//!
//! Operations, on the topic a frame names:
//! - **publish**: a PUBLISH (or a run) without a reply topic;
//! - **request**: a PUBLISH with a reply topic (a call);
//! - **reply**: serving calls: subscribing to the topics they arrive on, and publishing on
//!   `_inbox.…` topics (the answers);
//! - **subscribe**: a SUBSCRIBE or SUBSCRIBE_ACKED filter, allowed when a granted filter
//!   covers it (every topic it matches, a granted filter matches) and no denied filter
//!   overlaps it (no topic matches both).

use daemoneye_eventbus_core::topic::Segment;
use daemoneye_eventbus_core::{SubscriptionTrie, Topic, TopicFilter};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// The placeholder a rule's filters may hold for the supervised collector's id.
pub const COLLECTOR_PLACEHOLDER: &str = "{collector}";

/// A rule's filter list entry standing for the event topics the supervisor declared for the
/// collector (`CollectorSpec::events`).
pub const EVENTS_PLACEHOLDER: &str = "{events}";

/// An operation a rule grants ([module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Publishing without a reply topic.
    Publish,
    /// Subscribing.
    Subscribe,
    /// Publishing with a reply topic (a call).
    Request,
    /// Serving calls: receiving them, answering on `_inbox` topics.
    Reply,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Publish => "publish on",
            Self::Subscribe => "subscribe to",
            Self::Request => "send requests on",
            Self::Reply => "reply on",
        })
    }
}

/// Who a connection is, as the policy sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    /// The broker's own process (the agent's in-process client): always allowed everything.
    pub in_process: bool,
    /// Unix peer credentials.
    pub uid: Option<u32>,
    /// Unix peer credentials.
    pub gid: Option<u32>,
    /// The peer's executable (Linux, read through a pidfd).
    pub exe: Option<&'a Path>,
    /// The supervised collector it is (its pid registered by the supervisor).
    pub collector: Option<&'a str>,
    /// The event topics the supervisor declared for that collector.
    pub collector_events: &'a [TopicFilter],
    /// The verified subject of its TLS client certificate.
    pub tls_subject: Option<&'a str>,
    /// The client name of its handshake.
    pub name: &'a str,
}

/// A refusal: what was asked, and on which topic or filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The operation refused.
    pub operation: Operation,
    /// The topic or filter it named.
    pub target: String,
    /// Whether the built-in default policy refused it (no `acl_file`).
    pub by_default: bool,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.by_default {
            "the default policy keeps this to the agent and its collectors; grant it in broker.acl_file"
        } else {
            "broker.acl_file grants this connection's identity no such right"
        };
        write!(
            f,
            "not allowed to {} {} ({why})",
            self.operation, self.target
        )
    }
}

/// A policy that could not be read: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// One value per operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ops<T> {
    publish: T,
    subscribe: T,
    request: T,
    reply: T,
}

impl<T> Ops<T> {
    fn get(&self, op: Operation) -> &T {
        match op {
            Operation::Publish => &self.publish,
            Operation::Subscribe => &self.subscribe,
            Operation::Request => &self.request,
            Operation::Reply => &self.reply,
        }
    }

    fn get_mut(&mut self, op: Operation) -> &mut T {
        match op {
            Operation::Publish => &mut self.publish,
            Operation::Subscribe => &mut self.subscribe,
            Operation::Request => &mut self.request,
            Operation::Reply => &mut self.reply,
        }
    }
}

const OPERATIONS: [Operation; 4] = [
    Operation::Publish,
    Operation::Subscribe,
    Operation::Request,
    Operation::Reply,
];

/// The file's form ([`Policy::parse`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    uid: Option<u32>,
    gid: Option<u32>,
    exe: Option<PathBuf>,
    collector: Option<String>,
    tls_subject: Option<String>,
    name: Option<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    request: Vec<String>,
    #[serde(default)]
    reply: Vec<String>,
    #[serde(default)]
    deny: DenyFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyFile {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    request: Vec<String>,
    #[serde(default)]
    reply: Vec<String>,
}

/// Which connections a rule is about: every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Selector {
    uid: Option<u32>,
    gid: Option<u32>,
    exe: Option<PathBuf>,
    /// A collector id, or `*` for every supervised collector.
    collector: Option<String>,
    tls_subject: Option<String>,
    name: Option<String>,
    /// Only connections that are not supervised collectors (the default policy's; a file
    /// cannot say it).
    not_collector: bool,
}

impl Selector {
    fn matches(&self, id: &Identity<'_>) -> bool {
        self.matches_but_name(id) && self.name.as_deref().is_none_or(|n| n == id.name)
    }

    fn matches_but_name(&self, id: &Identity<'_>) -> bool {
        (!self.not_collector || id.collector.is_none())
            && self.uid.is_none_or(|u| id.uid == Some(u))
            && self.gid.is_none_or(|g| id.gid == Some(g))
            && self.exe.as_deref().is_none_or(|e| id.exe == Some(e))
            && self
                .collector
                .as_deref()
                .is_none_or(|c| id.collector.is_some_and(|have| c == "*" || c == have))
            && self
                .tls_subject
                .as_deref()
                .is_none_or(|s| id.tls_subject == Some(s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    who: Selector,
    /// Filters as written (`{collector}` resolved per connection).
    allow: Ops<Vec<String>>,
    deny: Ops<Vec<String>>,
}

/// A parsed, checked policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The built-in default ([`Policy::default_policy`]), not a file's.
    by_default: bool,
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl Policy {
    /// The policy of a broker without `acl_file` (`SECURITY.md`): the broker's own process
    /// may do everything; a supervised collector may publish on the event topics its
    /// supervisor declared for it and on its own health topics, serve
    /// `control.collector.<its id>` and take tasks on `control.collector.task.<its id>`, and
    /// read events and `$sys`; every other
    /// client may subscribe to anything but others' calls (`control.collector.#`, the agent's
    /// lifecycle, shutdown, tasks, coordination and query topics, the broker's admin topic, other
    /// callers' inboxes), publish, call and serve anything outside `control.#`, and publish
    /// outside `events.#` too.
    pub fn default_policy() -> Self {
        let collectors = Rule {
            who: Selector {
                collector: Some("*".into()),
                ..Selector::default()
            },
            allow: Ops {
                publish: strings(&["{events}", "control.health.+.{collector}"]),
                subscribe: strings(&["events.#", "$sys.#"]),
                request: Vec::new(),
                reply: strings(&[
                    "control.collector.{collector}",
                    "control.collector.task.{collector}",
                ]),
            },
            deny: Ops::default(),
        };
        let others = Rule {
            who: Selector {
                not_collector: true,
                ..Selector::default()
            },
            allow: Ops {
                publish: strings(&["#"]),
                subscribe: strings(&["#", "$sys.#"]),
                request: strings(&["#"]),
                reply: strings(&["#"]),
            },
            deny: Ops {
                publish: strings(&["control.#", "events.#"]),
                subscribe: strings(&[
                    "control.collector.#",
                    "control.agent.lifecycle",
                    "control.agent.shutdown",
                    "control.agent.tasks",
                    "control.agent.coordination",
                    "control.agent.query",
                    "control.broker.admin",
                    "_inbox.#",
                ]),
                request: strings(&["control.#"]),
                reply: strings(&["control.#"]),
            },
        };
        Self {
            rules: vec![collectors, others],
            by_default: true,
        }
    }

    /// Whether this is the built-in default, not a file's.
    pub fn is_default(&self) -> bool {
        self.by_default
    }
    /// Reads a policy from `text`, TOML unless `yaml` (`SECURITY.md` shows the form).
    ///
    /// # Errors
    ///
    /// [`PolicyError`] naming the rule and the field: unknown fields, a wrong version, a
    /// filter that is not one, a rule that names nobody and nothing.
    pub fn parse(text: &str, yaml: bool) -> Result<Self, PolicyError> {
        let file: PolicyFile = if yaml {
            serde_norway::from_str(text).map_err(|e| PolicyError(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| PolicyError(e.to_string()))?
        };
        if file.version != 1 {
            return Err(PolicyError(format!(
                "version {} is not one this build reads (1)",
                file.version
            )));
        }
        let mut rules = Vec::with_capacity(file.rule.len());
        for (i, r) in file.rule.into_iter().enumerate() {
            let at = |field: &str| format!("rule {} ({field})", i + 1);
            let allow = Ops {
                publish: r.publish,
                subscribe: r.subscribe,
                request: r.request,
                reply: r.reply,
            };
            let deny = Ops {
                publish: r.deny.publish,
                subscribe: r.deny.subscribe,
                request: r.deny.request,
                reply: r.deny.reply,
            };
            for (lists, prefix) in [(&allow, ""), (&deny, "deny.")] {
                for op in OPERATIONS {
                    for f in lists.get(op) {
                        check_pattern(f, r.collector.is_some()).map_err(|why| {
                            PolicyError(format!(
                                "{}: {why}",
                                at(&format!("{prefix}{}", op_key(op)))
                            ))
                        })?;
                    }
                }
            }
            if let Some(exe) = &r.exe
                && !exe.is_absolute()
            {
                return Err(PolicyError(format!(
                    "{}: {} is not an absolute path",
                    at("exe"),
                    exe.display()
                )));
            }
            rules.push(Rule {
                who: Selector {
                    uid: r.uid,
                    gid: r.gid,
                    exe: r.exe,
                    collector: r.collector,
                    tls_subject: r.tls_subject,
                    name: r.name,
                    not_collector: false,
                },
                allow,
                deny,
            });
        }
        Ok(Self {
            rules,
            by_default: false,
        })
    }

    /// Reads a policy file (YAML for `.yaml` / `.yml`, TOML otherwise).
    ///
    /// # Errors
    ///
    /// The file could not be read, or [`Policy::parse`] refused it; the message names the
    /// file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = daemoneye_eventbus_store::read_regular(path)
            .and_then(|b| {
                String::from_utf8(b).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
                })
            })
            .map_err(|e| PolicyError(format!("{}: {e}", path.display())))?;
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        Self::parse(&text, yaml).map_err(|e| PolicyError(format!("{}: {e}", path.display())))
    }

    /// Rules in the policy.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether it has no rule (everything is denied but to the broker's own process).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What a connection of identity `id` may do: the union of the rules that match it, less
    /// their denials. The broker's own process may do everything.
    pub fn grants(&self, id: &Identity<'_>) -> Grants {
        if id.in_process {
            return Grants::everything();
        }
        let mut allow: Ops<Vec<TopicFilter>> = Ops::default();
        let mut deny: Ops<Vec<TopicFilter>> = Ops::default();
        for rule in self.rules.iter().filter(|r| r.who.matches(id)) {
            for op in OPERATIONS {
                for (from, to) in [(&rule.allow, &mut allow), (&rule.deny, &mut deny)] {
                    for f in from.get(op) {
                        if f == EVENTS_PLACEHOLDER {
                            if id.collector.is_some() {
                                to.get_mut(op).extend(id.collector_events.iter().cloned());
                            }
                        } else if let Some(f) = resolve(f, id.collector) {
                            to.get_mut(op).push(f);
                        }
                    }
                }
            }
        }
        let mut g = Grants::new(allow, deny);
        g.by_default = self.by_default;
        g
    }

    /// Whether `id` may use its client name: a name some rule gives (`name = …`) is kept for
    /// the identities of those rules.
    ///
    /// # Errors
    ///
    /// A message naming the name and why it is refused.
    pub fn check_name(&self, id: &Identity<'_>) -> Result<(), String> {
        if id.in_process {
            return Ok(());
        }
        let mut named = self
            .rules
            .iter()
            .filter(|r| r.who.name.as_deref() == Some(id.name))
            .peekable();
        if named.peek().is_none() || named.any(|r| r.who.matches_but_name(id)) {
            return Ok(());
        }
        Err(format!(
            "the client name {:?} is kept by broker.acl_file for other identities; connect under another name",
            id.name
        ))
    }
}

fn op_key(op: Operation) -> &'static str {
    match op {
        Operation::Publish => "publish",
        Operation::Subscribe => "subscribe",
        Operation::Request => "request",
        Operation::Reply => "reply",
    }
}

/// A filter as written in a rule: valid once `{collector}` is put in (only in a rule about
/// collectors).
fn check_pattern(f: &str, about_collectors: bool) -> Result<(), String> {
    if f == EVENTS_PLACEHOLDER {
        return if about_collectors {
            Ok(())
        } else {
            Err(format!("{f:?} only a rule with `collector` may use"))
        };
    }
    if f.contains(COLLECTOR_PLACEHOLDER) && !about_collectors {
        return Err(format!(
            "{f:?} uses {COLLECTOR_PLACEHOLDER}, which only a rule with `collector` may"
        ));
    }
    TopicFilter::new(f.replace(COLLECTOR_PLACEHOLDER, "x"))
        .map(|_| ())
        .map_err(|e| format!("{f:?} is not a topic filter: {e}"))
}

fn resolve(f: &String, collector: Option<&str>) -> Option<TopicFilter> {
    match (f.contains(COLLECTOR_PLACEHOLDER), collector) {
        (false, _) => TopicFilter::new(f).ok(),
        (true, Some(c)) => TopicFilter::new(f.replace(COLLECTOR_PLACEHOLDER, c)).ok(),
        (true, None) => None,
    }
}

/// Filters of one operation, with a trie to match topics against them.
#[derive(Debug, Default)]
struct FilterSet {
    filters: Vec<TopicFilter>,
    trie: SubscriptionTrie<u32>,
}

impl FilterSet {
    fn new(filters: Vec<TopicFilter>) -> Self {
        let mut trie = SubscriptionTrie::new();
        for (i, f) in filters.iter().enumerate() {
            trie.insert(f, i as u32);
        }
        Self { filters, trie }
    }

    fn matches(&self, topic: &Topic) -> bool {
        let mut hit = false;
        self.trie.for_each_match(topic, |_| hit = true);
        hit
    }

    fn covers(&self, s: &TopicFilter) -> bool {
        self.filters.iter().any(|g| covers(g, s))
    }

    fn overlaps(&self, s: &TopicFilter) -> bool {
        self.filters.iter().any(|d| overlaps(d, s))
    }

    fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

/// What one connection may do ([`Policy::grants`]).
#[derive(Debug, Default)]
pub struct Grants {
    everything: bool,
    allow: Ops<FilterSet>,
    deny: Ops<FilterSet>,
    /// Topic prefixes (`a.b.`) under which every plain publish is allowed: from granted
    /// filters `a.b.#` that no denial overlaps. A publisher streaming on such topics is
    /// answered by comparing a few bytes, without walking the tries.
    open_publish: Vec<String>,
    /// When `#` is granted for plain publishes and every denial is a literal `a.b.#`: those
    /// denials' prefixes (`a.b.`), under which alone publishes are refused. The default
    /// policy's case: answered by comparing a few bytes.
    all_but: Option<Vec<String>>,
    /// The same for requests.
    all_but_request: Option<Vec<String>>,
    /// Every answer (a publish on an `_inbox` topic) is allowed: a reply grant, and no reply
    /// denial reaching inboxes.
    answers: bool,
    /// Resolved from the built-in default policy (said in refusals).
    by_default: bool,
}

impl Grants {
    /// Everything (the broker's own process; a broker without `acl_file`).
    pub fn everything() -> Self {
        Self {
            everything: true,
            ..Self::default()
        }
    }

    fn new(allow: Ops<Vec<TopicFilter>>, deny: Ops<Vec<TopicFilter>>) -> Self {
        let set = |o: Ops<Vec<TopicFilter>>| Ops {
            publish: FilterSet::new(o.publish),
            subscribe: FilterSet::new(o.subscribe),
            request: FilterSet::new(o.request),
            reply: FilterSet::new(o.reply),
        };
        // Literal segments then `#`, at least one segment (`#` alone also refuses `$sys`),
        // never over `_inbox` (answers are checked as replies).
        let literal_prefix = |f: &TopicFilter| {
            let prefix = f.as_str().strip_suffix('#')?;
            (!prefix.is_empty()
                && !prefix.split('.').any(|s| s == "+")
                && !prefix.starts_with("_inbox."))
            .then(|| prefix.to_owned())
        };
        let open_publish = allow
            .publish
            .iter()
            .filter(|f| !deny.publish.iter().any(|d| overlaps(d, f)))
            .filter_map(literal_prefix)
            .collect();
        let all_but = |allow: &[TopicFilter], deny: &[TopicFilter]| {
            allow
                .iter()
                .any(|f| f.as_str() == "#")
                .then(|| deny.iter().map(literal_prefix).collect::<Option<Vec<_>>>())
                .flatten()
        };
        let all_but_request = all_but(&allow.request, &deny.request);
        let answers = !allow.reply.is_empty() && !deny.reply.iter().any(|d| overlaps(d, inboxes()));
        let all_but = all_but(&allow.publish, &deny.publish);
        Self {
            everything: false,
            allow: set(allow),
            deny: set(deny),
            open_publish,
            all_but,
            all_but_request,
            answers,
            by_default: false,
        }
    }

    /// Whether nothing is ever refused.
    pub fn is_everything(&self) -> bool {
        self.everything
    }

    /// Whether a publish on `topic` is allowed: a call when `request` (it has a reply topic),
    /// an answer when the topic is an `_inbox` one (allowed to those that may reply on
    /// anything), a plain publish otherwise.
    ///
    /// # Errors
    ///
    /// The operation and topic refused.
    pub fn check_publish(&self, topic: &Topic, request: bool) -> Result<(), Denied> {
        let t = topic.as_str();
        if self.everything
            || (!request && self.open_publish.iter().any(|p| t.starts_with(p.as_str())))
            || (!request && self.answers && topic.is_inbox())
        {
            return Ok(());
        }
        let all_but = if request {
            &self.all_but_request
        } else {
            &self.all_but
        };
        if (request || !topic.is_inbox())
            && !topic.is_sys()
            && let Some(denied) = all_but
            && !denied
                .iter()
                .any(|p| t.starts_with(p.as_str()) || Some(t) == p.strip_suffix('.'))
        {
            return Ok(());
        }
        let op = if request {
            Operation::Request
        } else if topic.is_inbox() {
            Operation::Reply
        } else {
            Operation::Publish
        };
        let allowed = match op {
            Operation::Reply => {
                (!self.allow.reply.is_empty() && !self.deny.reply.matches(topic))
                    || self.allow.publish.matches(topic)
            }
            _ => self.allow.get(op).matches(topic),
        };
        if allowed && !self.deny.get(op).matches(topic) {
            Ok(())
        } else {
            Err(Denied {
                operation: op,
                target: topic.as_str().to_owned(),
                by_default: self.by_default,
            })
        }
    }

    /// Whether subscribing to `filter` is allowed: a subscribe or reply grant covers it, and
    /// no denial of that operation overlaps it.
    ///
    /// # Errors
    ///
    /// The filter refused.
    pub fn check_subscribe(&self, filter: &TopicFilter) -> Result<(), Denied> {
        if self.everything || inbox_token(filter).is_some() {
            // A reply inbox of its own: the broker keeps each inbox to the connection that
            // subscribed to it first.
            return Ok(());
        }
        let by = |op: Operation| {
            self.allow.get(op).covers(filter) && !self.deny.get(op).overlaps(filter)
        };
        // Serving calls never needs another's inbox: a reply grant does not reach inboxes.
        if by(Operation::Subscribe) || (by(Operation::Reply) && !overlaps(inboxes(), filter)) {
            Ok(())
        } else {
            Err(Denied {
                operation: Operation::Subscribe,
                target: filter.as_str().to_owned(),
                by_default: self.by_default,
            })
        }
    }
}

/// `_inbox.#`: every reply inbox.
fn inboxes() -> &'static TopicFilter {
    static INBOXES: std::sync::LazyLock<TopicFilter> =
        std::sync::LazyLock::new(|| TopicFilter::new("_inbox.#").expect("a valid filter"));
    &INBOXES
}

/// The token of a filter on one reply inbox (`_inbox.TOKEN`, and below it): `None` for any
/// other filter, wildcards over inboxes included.
pub fn inbox_token(filter: &TopicFilter) -> Option<&str> {
    let mut segs = filter.segments();
    match (segs.next(), segs.next()) {
        (Some(Segment::Literal("_inbox")), Some(Segment::Literal(token))) => Some(token),
        _ => None,
    }
}

/// Whether the first segment of a filter may match a `$` topic: only a literal one can.
fn leading_wildcard(seg: Option<Segment<'_>>) -> bool {
    matches!(seg, Some(Segment::Single | Segment::Multi))
}

fn reserved(seg: Option<Segment<'_>>) -> bool {
    matches!(seg, Some(Segment::Literal(l)) if l.starts_with('$'))
}

/// Whether every topic `s` matches, `g` matches too.
pub fn covers(g: &TopicFilter, s: &TopicFilter) -> bool {
    let (mut gi, mut si) = (g.segments(), s.segments());
    let mut first = true;
    loop {
        let (a, b) = (gi.next(), si.next());
        // A leading wildcard never matches a `$sys` topic.
        if first && leading_wildcard(a) && reserved(b) {
            return false;
        }
        let at_root = std::mem::replace(&mut first, false);
        match (a, b) {
            (Some(Segment::Multi), _) => return true,
            (None, None) => return true,
            // A leading `#` matches one segment or more (a topic has one at least), as `+.#`
            // does; further down it matches none or more, which only `#` covers.
            (Some(Segment::Single), Some(Segment::Multi)) if at_root => {
                return matches!((gi.next(), gi.next()), (Some(Segment::Multi), None));
            }
            (Some(Segment::Single), Some(Segment::Single | Segment::Literal(_))) => {}
            (Some(Segment::Literal(x)), Some(Segment::Literal(y))) if x == y => {}
            _ => return false,
        }
    }
}

/// Whether some topic matches both `a` and `b`.
pub fn overlaps(a: &TopicFilter, b: &TopicFilter) -> bool {
    let (mut ai, mut bi) = (a.segments(), b.segments());
    let mut first = true;
    loop {
        let (x, y) = (ai.next(), bi.next());
        if first && ((leading_wildcard(x) && reserved(y)) || (leading_wildcard(y) && reserved(x))) {
            return false;
        }
        first = false;
        match (x, y) {
            (Some(Segment::Multi), _) | (_, Some(Segment::Multi)) | (None, None) => return true,
            (None, _) | (_, None) => return false,
            (Some(Segment::Literal(p)), Some(Segment::Literal(q))) if p != q => return false,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A policy path that is a named pipe is refused at once (reading it would block the
    /// reload, and the broker with it, until some process wrote to it).
    #[cfg(unix)]
    #[test]
    fn a_pipe_is_refused_without_waiting() {
        let dir = std::env::temp_dir().join(format!("eb-acl-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("acl.toml");
        let _ = std::fs::remove_file(&fifo);
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Policy::load(&path).map(|p| p.len()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("answered without waiting")
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    /// Every topic of 1 to 4 segments over a small alphabet (with a `$` root).
    fn universe() -> Vec<Topic> {
        let segs = ["a", "b", "c"];
        let mut out = Vec::new();
        let mut level: Vec<String> = vec![String::new()];
        for depth in 1..=4 {
            let mut next = Vec::new();
            for prefix in &level {
                let firsts: &[&str] = if depth == 1 {
                    &["a", "b", "c", "$sys"]
                } else {
                    &segs
                };
                for s in firsts {
                    let topic = if prefix.is_empty() {
                        (*s).to_owned()
                    } else {
                        format!("{prefix}.{s}")
                    };
                    out.push(t(&topic));
                    next.push(topic);
                }
            }
            level = next;
        }
        out
    }

    fn filter_strategy() -> impl Strategy<Value = TopicFilter> {
        let seg = prop_oneof![Just("a"), Just("b"), Just("+"), Just("$sys")];
        (proptest::collection::vec(seg, 1..=3), any::<bool>()).prop_filter_map(
            "a valid filter",
            |(segs, multi)| {
                let mut s = segs.join(".");
                if multi {
                    s.push_str(".#");
                }
                TopicFilter::new(&s)
                    .ok()
                    .or_else(|| TopicFilter::new("#").ok())
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// `covers` and `overlaps` agree with matching every topic of a universe deep enough
        /// for the filters drawn.
        #[test]
        fn covers_and_overlaps_agree_with_matching(g in filter_strategy(), s in filter_strategy()) {
            let u = universe();
            let covered = u.iter().all(|topic| !s.matches(topic) || g.matches(topic));
            let overlapping = u.iter().any(|topic| s.matches(topic) && g.matches(topic));
            prop_assert_eq!(covers(&g, &s), covered, "covers({}, {})", g, s);
            prop_assert_eq!(overlaps(&g, &s), overlapping, "overlaps({}, {})", g, s);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        /// The prefix fast path answers as the tries do.
        #[test]
        fn open_prefixes_answer_as_the_tries(
            allow in proptest::collection::vec(filter_strategy(), 0..4),
            deny in proptest::collection::vec(filter_strategy(), 0..3),
        ) {
            let ops = |publish: Vec<TopicFilter>| Ops {
                request: publish.clone(),
                publish,
                ..Ops::default()
            };
            let fast = Grants::new(ops(allow.clone()), ops(deny.clone()));
            let mut slow = Grants::new(ops(allow.clone()), ops(deny.clone()));
            slow.open_publish.clear();
            slow.all_but = None;
            slow.all_but_request = None;
            slow.answers = false;
            // With `#` granted too (the default policy's shape).
            let mut everything_but = allow;
            everything_but.push(TopicFilter::new("#").unwrap());
            let fast_all = Grants::new(ops(everything_but.clone()), ops(deny.clone()));
            let mut slow_all = Grants::new(ops(everything_but), ops(deny));
            slow_all.open_publish.clear();
            slow_all.all_but = None;
            slow_all.all_but_request = None;
            slow_all.answers = false;
            for topic in universe() {
                for request in [false, true] {
                    prop_assert_eq!(
                        fast_all.check_publish(&topic, request).is_ok(),
                        slow_all.check_publish(&topic, request).is_ok(),
                        "{} (request {}) with # and denials {:?}", topic, request, fast_all.all_but
                    );
                }
            }
            for topic in universe() {
                prop_assert_eq!(
                    fast.check_publish(&topic, false).is_ok(),
                    slow.check_publish(&topic, false).is_ok(),
                    "{} with prefixes {:?}", topic, fast.open_publish
                );
            }
        }
    }

    const POLICY: &str = r#"
version = 1

[[rule]]
uid = 1000
subscribe = ["events.#", "$sys.#"]
publish = ["jobs.+.done"]
request = ["control.collector.+"]
deny = { subscribe = ["events.secret.#"], request = ["control.collector.procmond"] }

[[rule]]
collector = "*"
publish = ["events.{collector}.#"]
reply = ["control.collector.{collector}"]

[[rule]]
name = "procmond"
exe = "/usr/bin/procmond"
"#;

    fn id(uid: u32) -> Identity<'static> {
        Identity {
            uid: Some(uid),
            name: "client",
            ..Identity::default()
        }
    }

    #[test]
    fn rules_grant_what_they_name_and_deny_takes_back() {
        let p = Policy::parse(POLICY, false).unwrap();
        assert_eq!(p.len(), 3);
        let g = p.grants(&id(1000));
        assert!(g.check_subscribe(&f("events.process.+")).is_ok());
        assert!(g.check_subscribe(&f("$sys.broker.stats")).is_ok());
        let denied = g.check_subscribe(&f("events.#")).unwrap_err();
        assert_eq!(
            denied.operation,
            Operation::Subscribe,
            "overlaps the denied events.secret.#"
        );
        assert!(g.check_subscribe(&f("control.#")).is_err());
        assert!(g.check_publish(&t("jobs.a.done"), false).is_ok());
        assert!(g.check_publish(&t("jobs.a.failed"), false).is_err());
        assert!(
            g.check_publish(&t("control.collector.netmond"), true)
                .is_ok()
        );
        let e = g
            .check_publish(&t("control.collector.procmond"), true)
            .unwrap_err();
        assert_eq!(
            e.to_string().split(" (").next().unwrap(),
            "not allowed to send requests on control.collector.procmond"
        );
        // Not a server: no answers on inboxes.
        assert!(g.check_publish(&t("_inbox.00ab"), false).is_err());
        // Another uid: nothing.
        let other = p.grants(&id(1001));
        assert!(other.check_subscribe(&f("events.#")).is_err());
        assert!(other.check_publish(&t("jobs.a.done"), false).is_err());
    }

    #[test]
    fn collector_rules_resolve_their_placeholder_and_names_are_kept() {
        let p = Policy::parse(POLICY, false).unwrap();
        let procmond = Identity {
            collector: Some("procmond"),
            name: "procmond",
            exe: Some(Path::new("/usr/bin/procmond")),
            ..Identity::default()
        };
        let g = p.grants(&procmond);
        assert!(
            g.check_publish(&t("events.procmond.lifecycle"), false)
                .is_ok()
        );
        assert!(
            g.check_publish(&t("events.other.lifecycle"), false)
                .is_err()
        );
        assert!(g.check_subscribe(&f("control.collector.procmond")).is_ok());
        assert!(
            g.check_publish(&t("_inbox.00ab"), false).is_ok(),
            "a server answers"
        );
        assert!(p.check_name(&procmond).is_ok());
        let impostor = Identity {
            uid: Some(1000),
            name: "procmond",
            exe: Some(Path::new("/tmp/evil")),
            ..Identity::default()
        };
        assert!(p.check_name(&impostor).unwrap_err().contains("procmond"));
        assert!(p.check_name(&id(1000)).is_ok(), "an unnamed name is free");
        let agent = Identity {
            in_process: true,
            ..Identity::default()
        };
        assert!(p.grants(&agent).is_everything());
    }

    #[test]
    fn the_default_policy_keeps_control_and_events_to_collectors() {
        let p = Policy::default_policy();
        assert!(p.is_default());
        let events = [f("events.process.#")];
        let procmond = Identity {
            collector: Some("procmond"),
            collector_events: &events,
            name: "procmond",
            ..Identity::default()
        };
        let c = p.grants(&procmond);
        assert!(
            c.check_publish(&t("events.process.lifecycle"), false)
                .is_ok()
        );
        assert!(
            c.check_publish(&t("events.network.dns"), false).is_err(),
            "only its own event domain"
        );
        assert!(
            c.check_publish(&t("control.health.heartbeat.procmond"), false)
                .is_ok()
        );
        assert!(
            c.check_publish(&t("control.health.heartbeat.netmond"), false)
                .is_err()
        );
        assert!(c.check_subscribe(&f("control.collector.procmond")).is_ok());
        assert!(c.check_subscribe(&f("control.collector.netmond")).is_err());
        assert!(
            c.check_publish(&t("_inbox.00ab.1"), false).is_ok(),
            "it answers calls"
        );
        let other = p.grants(&id(0));
        let e = other
            .check_publish(&t("events.process.lifecycle"), false)
            .unwrap_err();
        assert!(e.by_default && e.to_string().contains("grant it in broker.acl_file"));
        assert!(
            other
                .check_publish(&t("control.health.heartbeat.procmond"), false)
                .is_err()
        );
        assert!(
            other
                .check_publish(&t("control.agent.lifecycle"), true)
                .is_err()
        );
        assert!(other.check_publish(&t("jobs.a"), false).is_ok());
        assert!(other.check_publish(&t("svc.echo"), true).is_ok());
        assert!(
            other.check_publish(&t("_inbox.00ab.1"), false).is_ok(),
            "answers its own services' calls"
        );
        for denied in [
            "#",
            "control.collector.#",
            "control.agent.lifecycle",
            "_inbox.#",
            "_inbox.+.x",
        ] {
            assert!(other.check_subscribe(&f(denied)).is_err(), "{denied}");
        }
        for allowed in [
            "events.#",
            "$sys.#",
            "control.agent.status",
            "control.health.#",
            "_inbox.00ab.+",
            "svc.echo",
        ] {
            assert!(other.check_subscribe(&f(allowed)).is_ok(), "{allowed}");
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_rule_and_field() {
        for (text, why) in [
            ("version = 2\n", "version 2"),
            (
                "version = 1\n[[rule]]\nuid = 1\npublish = [\"a..b\"]\n",
                "rule 1 (publish)",
            ),
            (
                "version = 1\n[[rule]]\npublish = [\"events.{collector}\"]\n",
                "only a rule with `collector`",
            ),
            (
                "version = 1\n[[rule]]\nexe = \"procmond\"\n",
                "rule 1 (exe)",
            ),
            (
                "version = 1\n[[rule]]\nuid = 1\nsubscrbe = [\"a\"]\n",
                "unknown field",
            ),
            (
                "version = 1\n[[rule]]\nuid = 1\ndeny = { publish = [\"#.a\"] }\n",
                "rule 1 (deny.publish)",
            ),
        ] {
            let e = Policy::parse(text, false).unwrap_err();
            assert!(e.0.contains(why), "{text:?}: {e}");
        }
        let yaml = "version: 1\nrule:\n  - uid: 7\n    subscribe: [\"events.#\"]\n";
        let p = Policy::parse(yaml, true).unwrap();
        assert!(p.grants(&id(7)).check_subscribe(&f("events.a")).is_ok());
    }
}
