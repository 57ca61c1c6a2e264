//! Topic names and subscription filters (normative rules: `docs/topics.md`).
//!
//! A [`Topic`] is a concrete dotted name such as `events.process.lifecycle`; a [`TopicFilter`]
//! may also contain the wildcards `+` (exactly one segment, `*` is accepted as a synonym) and `#`
//! (zero or more trailing segments, last segment only). Both are parsed once at the edge and are
//! valid by construction.

use crate::bytestr::ByteStr;
use bytes::Bytes;
use std::fmt;

/// Maximum length of a topic or filter, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Maximum number of `.`-separated segments in a topic or filter.
pub const MAX_SEGMENTS: usize = 16;
/// Root segment reserved for topics published by the broker itself.
pub const SYS_ROOT: &str = "$sys";
/// Root segment reserved for RPC reply inboxes.
pub const INBOX_ROOT: &str = "_inbox";

/// Why a topic or filter was refused. Carried by [`TopicError`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicErrorKind {
    /// The input was empty.
    Empty,
    /// The input is longer than [`MAX_TOPIC_LEN`] bytes.
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input has more than [`MAX_SEGMENTS`] segments.
    TooManySegments {
        /// Number of segments found.
        count: usize,
    },
    /// A segment is empty (leading, trailing or doubled `.`).
    EmptySegment {
        /// Zero-based index of the empty segment.
        index: usize,
    },
    /// An upper-case ASCII letter was found.
    UpperCase {
        /// The offending character.
        ch: char,
        /// Byte offset in the input.
        offset: usize,
    },
    /// A character outside `a-z 0-9 _ -` was found.
    InvalidChar {
        /// The offending character.
        ch: char,
        /// Byte offset in the input.
        offset: usize,
    },
    /// A wildcard appears in a concrete topic.
    WildcardInTopic {
        /// Zero-based index of the segment.
        index: usize,
    },
    /// A wildcard character is mixed with other characters in one segment (`pro+`).
    PartialWildcard {
        /// The offending segment.
        segment: String,
    },
    /// `#` is not the last segment.
    HashNotLast {
        /// Zero-based index of the `#` segment.
        index: usize,
    },
    /// A segment starts with `$` but is not the reserved root `$sys` in first position.
    BadReservedRoot {
        /// The offending segment.
        segment: String,
    },
}

/// A topic or filter that failed validation, with the input and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {kind}")]
pub struct TopicError {
    what: &'static str,
    input: String,
    kind: TopicErrorKind,
}

impl TopicError {
    /// The reason the input was refused.
    pub fn kind(&self) -> &TopicErrorKind {
        &self.kind
    }

    /// The refused input.
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl fmt::Display for TopicErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("it is empty"),
            Self::TooLong { len } => {
                write!(f, "it is {len} bytes long, the limit is {MAX_TOPIC_LEN}")
            }
            Self::TooManySegments { count } => {
                write!(f, "it has {count} segments, the limit is {MAX_SEGMENTS}")
            }
            Self::EmptySegment { index } => write!(
                f,
                "segment {index} is empty (leading, trailing or doubled '.')"
            ),
            Self::UpperCase { ch, offset } => write!(
                f,
                "upper-case character {ch:?} at byte {offset}; topics are lower case \
                 (a-z, 0-9, '_' and '-')"
            ),
            Self::InvalidChar { ch, offset } => write!(
                f,
                "character {ch:?} at byte {offset} is not allowed; segments use a-z, 0-9, \
                 '_' and '-'"
            ),
            Self::WildcardInTopic { index } => write!(
                f,
                "segment {index} is a wildcard; wildcards are only allowed in subscription \
                 filters"
            ),
            Self::PartialWildcard { segment } => write!(
                f,
                "segment {segment:?} mixes a wildcard with other characters; '+', '*' and '#' \
                 must be a whole segment"
            ),
            Self::HashNotLast { index } => {
                write!(f, "'#' at segment {index} must be the last segment")
            }
            Self::BadReservedRoot { segment } => write!(
                f,
                "segment {segment:?} starts with '$'; only {SYS_ROOT:?} is reserved, and only \
                 as the first segment"
            ),
        }
    }
}

/// Kind of a parsed filter segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// A literal segment that must match exactly.
    Literal(&'a str),
    /// `+` (or `*`): exactly one segment.
    Single,
    /// `#`: zero or more trailing segments.
    Multi,
}

impl<'a> Segment<'a> {
    fn parse(s: &'a str) -> Self {
        match s {
            "+" => Self::Single,
            "#" => Self::Multi,
            other => Self::Literal(other),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Topic,
    Filter,
}

fn err(mode: Mode, input: &str, kind: TopicErrorKind) -> TopicError {
    TopicError {
        what: if mode == Mode::Topic {
            "topic"
        } else {
            "topic filter"
        },
        input: input.to_owned(),
        kind,
    }
}

/// Bytes allowed in a literal segment.
const fn literal_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
        c += 1;
    }
    t
}
static LITERAL: [bool; 256] = literal_table();

/// Single pass over the bytes for the common, valid case: `Some(has_star)` when valid, `None`
/// when the detailed check must explain the refusal. Accepts only ASCII.
fn scan(bytes: &[u8], mode: Mode) -> Option<bool> {
    if mode == Mode::Topic && plain_topic(bytes) {
        return Some(false);
    }
    if bytes.is_empty() || bytes.len() > MAX_TOPIC_LEN {
        return None;
    }
    let (mut segments, mut start, mut star) = (0, 0, false);
    for end in memchr_dots(bytes) {
        let seg = &bytes[start..end];
        let last = end == bytes.len();
        segments += 1;
        match seg {
            [] => return None,
            [b'+' | b'*' | b'#'] if mode == Mode::Filter => {
                if seg[0] == b'#' && !last {
                    return None;
                }
                star |= seg[0] == b'*';
            }
            [b'$', ..] if start == 0 && seg == SYS_ROOT.as_bytes() => {}
            _ if seg.iter().all(|b| LITERAL[*b as usize]) => {}
            _ => return None,
        }
        start = end + 1;
    }
    (segments <= MAX_SEGMENTS).then_some(star)
}

/// The hot case in one loop of a table lookup per byte: a topic of literal segments only
/// (no `$sys`). `false` sends the input to the general scan.
fn plain_topic(bytes: &[u8]) -> bool {
    if bytes.is_empty() || bytes.len() > MAX_TOPIC_LEN {
        return false;
    }
    let (mut segments, mut seg_len) = (1, 0usize);
    for &b in bytes {
        if b == b'.' {
            if seg_len == 0 {
                return false;
            }
            segments += 1;
            seg_len = 0;
        } else if LITERAL[b as usize] {
            seg_len += 1;
        } else {
            return false;
        }
    }
    seg_len > 0 && segments <= MAX_SEGMENTS
}

/// Ends of the segments: the index of every `.`, then the length.
fn memchr_dots(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter_map(|(i, b)| (*b == b'.').then_some(i))
        .chain(std::iter::once(bytes.len()))
}

/// Validates one input; returns `true` when a `*` needs normalising to `+`.
fn validate(input: &str, mode: Mode) -> Result<bool, TopicError> {
    if let Some(star) = scan(input.as_bytes(), mode) {
        return Ok(star);
    }
    explain(input, mode)
}

/// The detailed check: names the first problem of an input the fast scan refused.
fn explain(input: &str, mode: Mode) -> Result<bool, TopicError> {
    if input.is_empty() {
        return Err(err(mode, input, TopicErrorKind::Empty));
    }
    if input.len() > MAX_TOPIC_LEN {
        let kind = TopicErrorKind::TooLong { len: input.len() };
        return Err(err(mode, input, kind));
    }
    let count = input.split('.').count();
    if count > MAX_SEGMENTS {
        return Err(err(mode, input, TopicErrorKind::TooManySegments { count }));
    }
    let mut star = false;
    let mut offset = 0;
    for (index, seg) in input.split('.').enumerate() {
        validate_segment(input, mode, index, seg, offset, count)?;
        star |= seg == "*";
        offset += seg.len() + 1;
    }
    Ok(star)
}

fn validate_segment(
    input: &str,
    mode: Mode,
    index: usize,
    seg: &str,
    offset: usize,
    count: usize,
) -> Result<(), TopicError> {
    if seg.is_empty() {
        return Err(err(mode, input, TopicErrorKind::EmptySegment { index }));
    }
    if matches!(seg, "+" | "*" | "#") {
        if mode == Mode::Topic {
            return Err(err(mode, input, TopicErrorKind::WildcardInTopic { index }));
        }
        if seg == "#" && index + 1 != count {
            return Err(err(mode, input, TopicErrorKind::HashNotLast { index }));
        }
        return Ok(());
    }
    if seg.starts_with('$') {
        if index == 0 && seg == SYS_ROOT {
            return Ok(());
        }
        let segment = seg.to_owned();
        return Err(err(
            mode,
            input,
            TopicErrorKind::BadReservedRoot { segment },
        ));
    }
    for (i, ch) in seg.char_indices() {
        match ch {
            'a'..='z' | '0'..='9' | '_' | '-' => {}
            '+' | '*' | '#' => {
                let segment = seg.to_owned();
                return Err(err(
                    mode,
                    input,
                    TopicErrorKind::PartialWildcard { segment },
                ));
            }
            'A'..='Z' => {
                let kind = TopicErrorKind::UpperCase {
                    ch,
                    offset: offset + i,
                };
                return Err(err(mode, input, kind));
            }
            _ => {
                let kind = TopicErrorKind::InvalidChar {
                    ch,
                    offset: offset + i,
                };
                return Err(err(mode, input, kind));
            }
        }
    }
    Ok(())
}

/// A valid concrete topic name, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(ByteStr);

impl Topic {
    /// Parses and validates a topic name.
    ///
    /// # Errors
    ///
    /// Returns a [`TopicError`] naming the problem (empty, too long, bad character, wildcard…).
    ///
    /// # Examples
    ///
    /// ```
    /// use daemoneye_eventbus_core::Topic;
    /// assert!(Topic::new("events.process.lifecycle").is_ok());
    /// assert!(Topic::new("Events.process").is_err());
    /// ```
    pub fn new(s: impl AsRef<str>) -> Result<Self, TopicError> {
        let s = s.as_ref();
        validate(s, Mode::Topic)?;
        Ok(Self(ByteStr::from(s)))
    }

    /// Validates a topic held in shared bytes without copying them.
    ///
    /// # Errors
    ///
    /// As [`Topic::new`]; non-UTF-8 bytes are reported as an invalid character.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, TopicError> {
        if scan(&bytes, Mode::Topic).is_some() {
            return Ok(Self(ByteStr::from_ascii(bytes)));
        }
        let s = ByteStr::from_utf8(bytes).map_err(|e| {
            let kind = TopicErrorKind::InvalidChar {
                ch: char::REPLACEMENT_CHARACTER,
                offset: e.valid_up_to(),
            };
            err(Mode::Topic, "<non-UTF-8 bytes>", kind)
        })?;
        validate(&s, Mode::Topic)?;
        Ok(Self(s))
    }

    /// A topic from a static string that is known to be valid (catalogue constants).
    ///
    /// Validity is checked by this crate's tests for every constant that uses it; an invalid
    /// input panics in debug builds.
    pub fn from_static(s: &'static str) -> Self {
        debug_assert!(validate(s, Mode::Topic).is_ok(), "invalid static topic {s}");
        Self(ByteStr::from_static(s))
    }

    /// A copy in its own allocation (already valid: not checked again), so that keeping it
    /// does not keep the buffer this topic was sliced from alive.
    pub(crate) fn detached(&self) -> Self {
        Self(ByteStr::from(self.as_str()))
    }

    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The topic's bytes (shared, not copied).
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    /// The segments of the topic.
    pub fn segments(&self) -> std::str::Split<'_, char> {
        self.as_str().split('.')
    }

    /// Whether the topic is under the broker-reserved `$sys` root.
    pub fn is_sys(&self) -> bool {
        self.as_str().starts_with('$')
    }

    /// Whether the topic is an RPC reply inbox (`_inbox.…`): one per call, seen once.
    pub fn is_inbox(&self) -> bool {
        self.as_str()
            .strip_prefix(INBOX_ROOT)
            .is_some_and(|rest| rest.starts_with('.'))
    }

    /// Appends a segment, returning a new topic.
    ///
    /// # Errors
    ///
    /// Returns a [`TopicError`] when the segment is invalid or a limit is exceeded.
    pub fn child(&self, segment: &str) -> Result<Self, TopicError> {
        let mut s = String::with_capacity(self.as_str().len() + 1 + segment.len());
        s.push_str(self.as_str());
        s.push('.');
        s.push_str(segment);
        Self::new(s)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", self.as_str())
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// A valid subscription filter; `*` segments are normalised to `+`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(ByteStr);

impl TopicFilter {
    /// Parses and validates a filter.
    ///
    /// # Errors
    ///
    /// Returns a [`TopicError`] naming the problem (for example `pro+`, `#` not last, upper
    /// case).
    ///
    /// # Examples
    ///
    /// ```
    /// use daemoneye_eventbus_core::{Topic, TopicFilter};
    /// let f = TopicFilter::new("events.process.*").unwrap();
    /// assert_eq!(f.as_str(), "events.process.+");
    /// assert!(f.matches(&Topic::new("events.process.lifecycle").unwrap()));
    /// assert!(TopicFilter::new("events.pro+").is_err());
    /// ```
    pub fn new(s: impl AsRef<str>) -> Result<Self, TopicError> {
        let s = s.as_ref();
        if validate(s, Mode::Filter)? {
            let normalised: Vec<&str> = s
                .split('.')
                .map(|seg| if seg == "*" { "+" } else { seg })
                .collect();
            return Ok(Self(ByteStr::from(normalised.join("."))));
        }
        Ok(Self(ByteStr::from(s)))
    }

    /// The filter as a string slice (normalised: `+`, never `*`).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The parsed segments.
    pub fn segments(&self) -> impl Iterator<Item = Segment<'_>> {
        self.as_str().split('.').map(Segment::parse)
    }

    /// Whether the filter contains a wildcard.
    pub fn has_wildcard(&self) -> bool {
        self.segments().any(|s| !matches!(s, Segment::Literal(_)))
    }

    /// Whether the filter matches `topic` (the reference semantics the trie must agree with).
    ///
    /// A leading wildcard never matches a `$sys` topic.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut filter = self.segments().peekable();
        let mut first = true;
        for seg in topic.segments() {
            let reserved = first && seg.starts_with('$');
            first = false;
            match filter.next() {
                Some(Segment::Multi) => return !reserved,
                Some(Segment::Single) if !reserved => {}
                Some(Segment::Literal(lit)) if lit == seg => {}
                _ => return false,
            }
        }
        match filter.next() {
            None => true,
            // `#` matches zero trailing segments too: `events.#` matches `events`.
            Some(Segment::Multi) => filter.peek().is_none(),
            Some(_) => false,
        }
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicFilter({:?})", self.as_str())
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TopicFilter {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl From<Topic> for TopicFilter {
    fn from(t: Topic) -> Self {
        Self(t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn valid_topics() {
        for s in [
            "a",
            "events.process.lifecycle",
            "a-b.c_d.0",
            "$sys.broker.stats",
        ] {
            assert!(Topic::new(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = Topic::new("events.Process").unwrap_err();
        assert_eq!(e.kind(), &TopicErrorKind::UpperCase { ch: 'P', offset: 7 });
        assert!(e.to_string().contains("'P'"), "{e}");
        assert!(matches!(
            Topic::new("a..b").unwrap_err().kind(),
            TopicErrorKind::EmptySegment { index: 1 }
        ));
        assert!(matches!(
            Topic::new("").unwrap_err().kind(),
            TopicErrorKind::Empty
        ));
        assert!(matches!(
            Topic::new("a.+").unwrap_err().kind(),
            TopicErrorKind::WildcardInTopic { index: 1 }
        ));
        assert!(matches!(
            TopicFilter::new("events.pro+").unwrap_err().kind(),
            TopicErrorKind::PartialWildcard { .. }
        ));
        assert!(matches!(
            TopicFilter::new("a.#.b").unwrap_err().kind(),
            TopicErrorKind::HashNotLast { index: 1 }
        ));
        assert!(matches!(
            Topic::new("a.$sys").unwrap_err().kind(),
            TopicErrorKind::BadReservedRoot { .. }
        ));
        assert!(matches!(
            Topic::new("a b").unwrap_err().kind(),
            TopicErrorKind::InvalidChar { ch: ' ', offset: 1 }
        ));
    }

    #[test]
    fn limits() {
        let long = "a".repeat(MAX_TOPIC_LEN);
        assert!(Topic::new(&long).is_ok());
        assert!(matches!(
            Topic::new(format!("{long}b")).unwrap_err().kind(),
            TopicErrorKind::TooLong { len: 257 }
        ));
        let segs = vec!["a"; MAX_SEGMENTS].join(".");
        assert!(Topic::new(&segs).is_ok());
        assert!(matches!(
            Topic::new(format!("{segs}.a")).unwrap_err().kind(),
            TopicErrorKind::TooManySegments { count: 17 }
        ));
    }

    #[test]
    fn star_is_plus() {
        assert_eq!(f("events.*.x").as_str(), "events.+.x");
        assert_eq!(f("*"), f("+"));
    }

    proptest::proptest! {
        #[test]
        fn fast_scan_agrees_with_the_detailed_check(
            s in "[a.+*#$A_é-]{0,12}|(\\$sys)?[a.+*#_-]{0,300}",
            filter in proptest::bool::ANY,
        ) {
            let mode = if filter { Mode::Filter } else { Mode::Topic };
            match scan(s.as_bytes(), mode) {
                Some(star) => proptest::prop_assert_eq!(explain(&s, mode), Ok(star)),
                None => proptest::prop_assert!(explain(&s, mode).is_err(), "{:?} passed explain", s),
            }
        }
    }

    #[test]
    fn matching_rules() {
        assert!(f("events.#").matches(&t("events")));
        assert!(f("events.#").matches(&t("events.a.b")));
        assert!(!f("events.+").matches(&t("events")));
        assert!(f("events.+").matches(&t("events.a")));
        assert!(!f("events.+").matches(&t("events.a.b")));
        assert!(f("#").matches(&t("a.b")));
        assert!(!f("#").matches(&t("$sys.broker.stats")));
        assert!(!f("+.broker.stats").matches(&t("$sys.broker.stats")));
        assert!(f("$sys.#").matches(&t("$sys.broker.stats")));
        assert!(f("$sys.+.stats").matches(&t("$sys.broker.stats")));
        assert!(f("a.+.c").matches(&t("a.b.c")));
        assert!(!f("a.b").matches(&t("a.b.c")));
    }
}
