//! The outbound order of the bridge (pure: no sockets, no clock). Local messages wait here,
//! in the order the broker delivered them, until JetStream has stored them; a window of them
//! is in flight at once. Each publish names what the stream must hold last before it, so the
//! stream never stores one after a later one: when a publish is lost (the connection broke,
//! the server restarted), every later one is refused. After a failure the bridge asks the
//! stream where it stands ([`Outflow::resync`]: its last sequence, and its last message's
//! id): everything waiting up to that message is stored, the rest is sent again, in order,
//! the first of them naming the stream's last *sequence* (`Nats-Expected-Last-Sequence`: a
//! restarted server forgets message ids older than its duplicate window, never sequences),
//! each later one the message before it (`Nats-Expected-Last-Msg-Id`). A resend of a stored
//! message is also recognised by its id (`Nats-Msg-Id`, JetStream's duplicate window).

use std::collections::{HashSet, VecDeque};

/// One local message waiting for JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry<T> {
    /// Its id (`Nats-Msg-Id`): the local message id, unique per publisher and message.
    pub(crate) id: String,
    /// What the shell needs to publish and acknowledge it.
    pub(crate) item: T,
}

/// What the stream must hold last for a publish to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expect<S> {
    /// Its last sequence is this (0: it is empty).
    Sequence(u64),
    /// Its last message has this id.
    Id(S),
}

/// The next publish: which entry, and what the stream must hold last before it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Send<'a, T> {
    pub(crate) entry: &'a Entry<T>,
    pub(crate) expect: Expect<&'a str>,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Outflow<T> {
    pending: VecDeque<Entry<T>>,
    ids: HashSet<String>,
    /// Entries at the front of `pending` published and not yet acknowledged.
    in_flight: usize,
    /// What the stream holds last, as far as the bridge knows.
    last: Expect<String>,
    /// Publishes in flight at most.
    window: usize,
    /// Whether the stream's last message is known (after a resync); nothing is sent before.
    synced: bool,
}

impl<T> Outflow<T> {
    pub(crate) fn new(window: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            ids: HashSet::new(),
            in_flight: 0,
            last: Expect::Sequence(0),
            window: window.max(1),
            synced: false,
        }
    }

    /// Queues a message; `false` (and nothing queued) when one with this id waits already (a
    /// redelivery of the local broker).
    pub(crate) fn offer(&mut self, id: String, item: T) -> bool {
        if !self.ids.insert(id.clone()) {
            return false;
        }
        self.pending.push_back(Entry { id, item });
        true
    }

    /// Messages waiting (in flight included).
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Publishes in flight.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next message to publish, if the window has room and the stream's last message is
    /// known; counted as in flight.
    pub(crate) fn next(&mut self) -> Option<Send<'_, T>> {
        if !self.synced || self.in_flight >= self.window || self.in_flight >= self.pending.len() {
            return None;
        }
        let i = self.in_flight;
        self.in_flight += 1;
        let expect = match (i, &self.last) {
            (0, Expect::Sequence(n)) => Expect::Sequence(*n),
            (0, Expect::Id(id)) => Expect::Id(id.as_str()),
            _ => Expect::Id(self.pending[i - 1].id.as_str()),
        };
        Some(Send {
            entry: &self.pending[i],
            expect,
        })
    }

    /// JetStream stored (or had stored) the oldest message in flight, `id`: it leaves, to be
    /// acknowledged locally. `None` when `id` is not that message (an answer of an earlier
    /// round, after a failure: ignored).
    pub(crate) fn stored(&mut self, id: &str) -> Option<Entry<T>> {
        if self.in_flight == 0 || self.pending.front().map(|e| e.id.as_str()) != Some(id) {
            return None;
        }
        self.in_flight -= 1;
        let e = self.pending.pop_front()?;
        self.ids.remove(&e.id);
        self.last = Expect::Id(e.id.clone());
        Some(e)
    }

    /// The oldest message in flight, `id`, can never be stored (larger than the server
    /// takes): it leaves, to be acknowledged locally and counted, and what was sent after it
    /// (naming it) goes again after a resync.
    pub(crate) fn give_up(&mut self, id: &str) -> Option<Entry<T>> {
        if self.in_flight == 0 || self.pending.front().map(|e| e.id.as_str()) != Some(id) {
            return None;
        }
        let e = self.pending.pop_front()?;
        self.ids.remove(&e.id);
        self.failed();
        Some(e)
    }

    /// A publish failed (refused, timed out, the connection broke): nothing more is sent
    /// until [`Outflow::resync`]; what was in flight is sent again then.
    pub(crate) fn failed(&mut self) {
        self.in_flight = 0;
        self.synced = false;
    }

    /// Whether sending waits for a resync.
    pub(crate) fn needs_resync(&self) -> bool {
        !self.synced
    }

    /// The stream's last sequence is `sequence` (0: empty) and its last message's id `last`
    /// (`None`: it has none, or the stream is empty). Every waiting message up to and
    /// including `last` is stored: they leave, to be acknowledged locally, and sending resumes
    /// after it, the first publish naming `sequence`.
    pub(crate) fn resync(&mut self, sequence: u64, last: Option<&str>) -> Vec<Entry<T>> {
        let mut stored = Vec::new();
        if let Some(id) = last
            && self.ids.contains(id)
        {
            while let Some(e) = self.pending.pop_front() {
                self.ids.remove(&e.id);
                let done = e.id == id;
                stored.push(e);
                if done {
                    break;
                }
            }
        }
        self.in_flight = 0;
        self.last = Expect::Sequence(sequence);
        self.synced = true;
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(o: &mut Outflow<u32>) -> Vec<(String, Expect<String>)> {
        let mut v = Vec::new();
        while let Some(s) = o.next() {
            let expect = match s.expect {
                Expect::Sequence(n) => Expect::Sequence(n),
                Expect::Id(id) => Expect::Id(id.to_owned()),
            };
            v.push((s.entry.id.clone(), expect));
        }
        v
    }

    fn id(s: &str) -> Expect<String> {
        Expect::Id(s.to_owned())
    }

    #[test]
    fn nothing_is_sent_before_the_stream_is_known_then_a_window_in_order() {
        let mut o = Outflow::new(2);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            assert!(o.offer(id.into(), i as u32));
        }
        assert!(!o.offer("b".into(), 9), "a redelivery waits once");
        assert!(o.next().is_none());
        assert!(o.resync(7, Some("z")).is_empty());
        assert_eq!(
            drain(&mut o),
            [("a".into(), Expect::Sequence(7)), ("b".into(), id("a"))],
            "the first names the stream's last sequence, each later one the one before; the \
             window holds two"
        );
        assert_eq!(o.stored("a").map(|e| e.item), Some(0));
        assert_eq!(drain(&mut o), [("c".into(), id("b"))]);
        assert!(o.stored("c").is_none(), "acknowledged in order only");
        assert_eq!(o.stored("b").map(|e| e.item), Some(1));
        assert_eq!(o.stored("c").map(|e| e.item), Some(2));
        assert_eq!((o.pending(), o.in_flight()), (0, 0));
        // Later, with nothing in flight: the last one stored is named.
        o.offer("d".into(), 3);
        assert_eq!(drain(&mut o), [("d".into(), id("c"))]);
    }

    #[test]
    fn after_a_failure_what_the_stream_holds_leaves_and_the_rest_goes_again_in_order() {
        let mut o = Outflow::new(8);
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            o.offer(id.into(), i as u32);
        }
        o.resync(0, None);
        assert_eq!(drain(&mut o).len(), 4);
        assert_eq!(drain(&mut o).first(), None);
        // "a" and "b" were stored, their answers lost with the connection.
        o.failed();
        assert!(o.needs_resync() && o.next().is_none());
        let stored: Vec<_> = o.resync(12, Some("b")).into_iter().map(|e| e.id).collect();
        assert_eq!(stored, ["a", "b"]);
        assert_eq!(
            drain(&mut o),
            [("c".into(), Expect::Sequence(12)), ("d".into(), id("c"))]
        );
        // An answer of the earlier round changes nothing.
        assert!(o.stored("a").is_none());
    }

    #[test]
    fn a_message_the_server_never_takes_leaves_and_the_rest_go_again() {
        let mut o = Outflow::new(4);
        o.offer("big".into(), 0);
        o.offer("b".into(), 1);
        o.resync(5, None);
        assert_eq!(drain(&mut o).len(), 2);
        assert!(o.give_up("b").is_none(), "only the oldest in flight");
        assert_eq!(o.give_up("big").map(|e| e.item), Some(0));
        assert!(o.needs_resync());
        o.resync(5, None);
        assert_eq!(drain(&mut o), [("b".into(), Expect::Sequence(5))]);
    }

    #[test]
    fn a_stream_whose_last_message_is_not_ours_is_followed_as_it_is() {
        let mut o = Outflow::new(4);
        o.offer("a".into(), 0);
        assert!(o.resync(3, Some("other")).is_empty());
        assert_eq!(drain(&mut o), [("a".into(), Expect::Sequence(3))]);
    }
}
