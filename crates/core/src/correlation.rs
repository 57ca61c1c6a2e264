//! Filtering messages by their correlation metadata.
//!
//! A subscription may carry a [`CorrelationFilter`]; only messages whose metadata satisfies
//! every criterion set on it are delivered to that subscription.

use crate::message::CorrelationMetadata;
use std::collections::BTreeMap;

/// Criteria on a message's [`CorrelationMetadata`]. Every criterion that is set must hold
/// (they combine with AND); within `ids` and `id_patterns`, any one match suffices. A message
/// without metadata passes only the empty filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorrelationFilter {
    /// Exact correlation ids accepted.
    pub ids: Vec<String>,
    /// Glob patterns on the correlation id: `*` matches any run of characters (including `.`
    /// and none), `?` exactly one character; everything else matches itself.
    pub id_patterns: Vec<String>,
    /// Required parent correlation id.
    pub parent: Option<String>,
    /// Required root correlation id.
    pub root: Option<String>,
    /// Accepted workflow stages (any one).
    pub stages: Vec<String>,
    /// Required tags: the key must be present and its value must match the glob pattern
    /// (`"*"`: any value).
    pub tags: BTreeMap<String, String>,
}

impl CorrelationFilter {
    /// The filter that accepts everything.
    pub fn any() -> Self {
        Self::default()
    }

    /// Whether no criterion is set.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.id_patterns.is_empty()
            && self.parent.is_none()
            && self.root.is_none()
            && self.stages.is_empty()
            && self.tags.is_empty()
    }

    /// Accepts this exact correlation id (in addition to other ids and patterns).
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.ids.push(id.into());
        self
    }

    /// Accepts correlation ids matching this glob pattern.
    #[must_use]
    pub fn id_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.id_patterns.push(pattern.into());
        self
    }

    /// Requires this parent id.
    #[must_use]
    pub fn parent(mut self, id: impl Into<String>) -> Self {
        self.parent = Some(id.into());
        self
    }

    /// Requires this root id (the whole chain started by it).
    #[must_use]
    pub fn root(mut self, id: impl Into<String>) -> Self {
        self.root = Some(id.into());
        self
    }

    /// Accepts this workflow stage (in addition to other stages).
    #[must_use]
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.stages.push(stage.into());
        self
    }

    /// Requires tag `key` with a value matching `value_pattern`.
    #[must_use]
    pub fn tag(mut self, key: impl Into<String>, value_pattern: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value_pattern.into());
        self
    }

    /// Whether a message carrying `meta` passes.
    pub fn matches(&self, meta: Option<&CorrelationMetadata>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(m) = meta else {
            return false;
        };
        let id = m.correlation_id.as_str();
        let id_ok = (self.ids.is_empty() && self.id_patterns.is_empty())
            || self.ids.iter().any(|i| i == id)
            || self.id_patterns.iter().any(|p| glob_match(p, id));
        id_ok
            && self
                .parent
                .as_ref()
                .is_none_or(|p| m.parent_correlation_id.as_ref() == Some(p))
            && self
                .root
                .as_ref()
                .is_none_or(|r| *r == m.root_correlation_id)
            && (self.stages.is_empty()
                || m.workflow_stage
                    .as_ref()
                    .is_some_and(|s| self.stages.contains(s)))
            && self
                .tags
                .iter()
                .all(|(k, pattern)| m.tags.get(k).is_some_and(|v| glob_match(pattern, v)))
    }
}

/// Whether `text` matches the glob `pattern`: `*` matches any run of characters (including
/// none and `.`), `?` exactly one character. Linear in practice: backtracks only to the last
/// `*`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Position after the last `*` seen, and the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                Some((after, at)) => {
                    pi = after;
                    ti = at + 1;
                    star = Some((after, at + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> CorrelationMetadata {
        let mut m = CorrelationMetadata::root("scan.42.proc", 1).child("scan.42.proc.7", 2);
        m.workflow_stage = Some("enrich".into());
        m.with_tag("host", "web-01");
        m
    }

    #[test]
    fn glob_stars_cross_dots() {
        assert!(glob_match("scan.*", "scan.42.proc"));
        assert!(glob_match("*.proc", "scan.42.proc"));
        assert!(glob_match("s?an*", "scan"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("scan", "scan.42"));
        assert!(!glob_match("?", ""));
        assert!(glob_match("é*", "été"));
    }

    #[test]
    fn every_criterion_is_applied() {
        let m = meta();
        assert!(CorrelationFilter::any().matches(None));
        assert!(CorrelationFilter::any().matches(Some(&m)));
        assert!(!CorrelationFilter::any().id("x").matches(None));
        assert!(
            CorrelationFilter::any()
                .id("scan.42.proc.7")
                .matches(Some(&m))
        );
        assert!(
            CorrelationFilter::any()
                .id("nope")
                .id_pattern("scan.*.7")
                .matches(Some(&m))
        );
        assert!(!CorrelationFilter::any().id("nope").matches(Some(&m)));
        assert!(
            CorrelationFilter::any()
                .parent("scan.42.proc")
                .matches(Some(&m))
        );
        assert!(!CorrelationFilter::any().parent("other").matches(Some(&m)));
        assert!(
            CorrelationFilter::any()
                .root("scan.42.proc")
                .matches(Some(&m))
        );
        assert!(
            !CorrelationFilter::any()
                .root("scan.42.proc.7")
                .matches(Some(&m))
        );
        assert!(CorrelationFilter::any().stage("enrich").matches(Some(&m)));
        assert!(!CorrelationFilter::any().stage("detect").matches(Some(&m)));
        assert!(
            CorrelationFilter::any()
                .tag("host", "web-*")
                .matches(Some(&m))
        );
        assert!(
            !CorrelationFilter::any()
                .tag("host", "db-*")
                .matches(Some(&m))
        );
        assert!(!CorrelationFilter::any().tag("zone", "*").matches(Some(&m)));
        // AND across criteria.
        assert!(
            !CorrelationFilter::any()
                .stage("enrich")
                .root("other")
                .matches(Some(&m))
        );
    }

    /// Reference implementation: regex-free recursive matcher.
    fn naive(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => naive(&p[1..], t) || (!t.is_empty() && naive(p, &t[1..])),
            (Some('?'), Some(_)) => naive(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => naive(&p[1..], &t[1..]),
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_the_naive_matcher(p in "[ab.*?]{0,8}", t in "[ab.]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(glob_match(&p, &t), naive(&pc, &tc));
        }
    }
}
