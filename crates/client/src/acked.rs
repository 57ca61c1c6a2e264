//! At-least-once on the client's side (protocol 1.3): acknowledging deliveries of Processed
//! subscriptions and recognising duplicates ([`AckState`]), and keeping Processed publishes
//! until the broker acknowledges them, to send them again after a reconnect ([`Unacked`]).

use crate::idmap::IdBuild;
use bytes::Bytes;
use daemoneye_eventbus_core::codec::SubId;
use daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
use daemoneye_eventbus_core::{ByteStr, CorrelationFilter, Header, Message, MessageId, Qos, Topic};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};

/// The deliveries of one message handed to the application: (connection epoch, sequence),
/// the first inline (a message is usually delivered once).
struct Handed {
    first: (u64, u64),
    more: Vec<(u64, u64)>,
}

/// When a Processed subscription's deliveries are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AckMode {
    /// A message is acknowledged when the application asks its subscription for the next one
    /// (it is done with this one), or takes it with [`crate::Subscription::ack`] first
    /// (default).
    #[default]
    Auto,
    /// Only [`crate::Subscription::ack`] acknowledges.
    Manual,
}

/// A message of a Processed subscription, with what the broker says of its delivery.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// How many times the broker delivered it before (0 the first time): after the
    /// subscriber's acknowledgement timed out, or after it reconnected.
    pub redelivered: u16,
}

/// What [`crate::Client::wait_acked`] observed of the Processed publishes made so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AckReport {
    /// Acknowledged by the broker: every matching Processed subscription holds them.
    pub acked: u64,
    /// Refused by the broker (NACK; the reason is in [`crate::Client::last_rejection`]).
    pub refused: u64,
    /// Neither yet (those waiting in the spool, `ClientOptions::spool_dir`, included).
    pub outstanding: u64,
}

/// Acknowledgement bookkeeping of one Processed subscription (the application's side).
pub(crate) struct AckState {
    pub(crate) sub: SubId,
    pub(crate) mode: AckMode,
    keep_duplicates: bool,
    /// Messages handed to the application and not acknowledged yet: the (connection epoch,
    /// delivery sequence) of each delivery of them, a redelivery included.
    handed: HashMap<MessageId, Handed, IdBuild>,
    /// The message handed last, acknowledged on the next receive in [`AckMode::Auto`].
    current: Option<MessageId>,
    /// Recently acknowledged messages: a delivery of one again is a duplicate.
    done: HashSet<MessageId, IdBuild>,
    done_order: VecDeque<MessageId>,
    dedup_window: usize,
    /// Sequences acknowledged and not yet sent, with their connection epoch.
    due: Vec<(u64, u64)>,
    /// Only messages whose correlation metadata passes it reach the application; the others
    /// are acknowledged as they arrive.
    filter: Option<CorrelationFilter>,
}

/// What to do with a delivery the reader queued.
pub(crate) enum Verdict {
    /// Hand it to the application.
    Deliver,
    /// A duplicate: dropped (its sequence is acknowledged with the original).
    Duplicate,
}

impl AckState {
    pub(crate) fn new(
        sub: SubId,
        mode: AckMode,
        keep_duplicates: bool,
        dedup_window: usize,
    ) -> Self {
        Self {
            sub,
            mode,
            keep_duplicates,
            handed: HashMap::default(),
            current: None,
            done: HashSet::default(),
            done_order: VecDeque::new(),
            dedup_window,
            due: Vec::new(),
            filter: None,
        }
    }

    /// Hands the application only messages whose correlation metadata passes `filter`.
    pub(crate) fn filtered(mut self, filter: Option<CorrelationFilter>) -> Self {
        self.filter = filter.filter(|f| !f.is_empty());
        self
    }

    /// Whether `msg` is for the application (its correlation metadata passes the filter).
    pub(crate) fn wants(&self, msg: &Message) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.matches(msg.header().correlation.as_deref()))
    }

    /// Acknowledges the message handed last, in [`AckMode::Auto`] (the application asked for
    /// the next one).
    pub(crate) fn next(&mut self) {
        if self.mode == AckMode::Auto
            && let Some(id) = self.current.take()
        {
            self.ack(id);
        }
    }

    /// A delivery (sequence `seq` on connection `epoch`) arrives for the application.
    pub(crate) fn arrive(&mut self, id: MessageId, epoch: u64, seq: u64) -> Verdict {
        if !self.keep_duplicates && self.done.contains(&id) {
            self.due.push((epoch, seq));
            return Verdict::Duplicate;
        }
        match self.handed.entry(id) {
            Entry::Occupied(mut h) => {
                h.get_mut().more.push((epoch, seq));
                if !self.keep_duplicates {
                    // Still being handled: acknowledged together with the original.
                    return Verdict::Duplicate;
                }
            }
            Entry::Vacant(v) => {
                v.insert(Handed {
                    first: (epoch, seq),
                    more: Vec::new(),
                });
            }
        }
        self.current = Some(id);
        Verdict::Deliver
    }

    /// Acknowledges message `id` (every delivery of it the application was handed).
    pub(crate) fn ack(&mut self, id: MessageId) -> bool {
        if self.current == Some(id) {
            self.current = None;
        }
        let Some(h) = self.handed.remove(&id) else {
            return false;
        };
        self.due.push(h.first);
        self.due.extend(h.more);
        if self.dedup_window > 0 && self.done.insert(id) {
            self.done_order.push_back(id);
            if self.done_order.len() > self.dedup_window
                && let Some(old) = self.done_order.pop_front()
            {
                self.done.remove(&old);
            }
        }
        true
    }

    /// Whether acknowledgements wait to be sent.
    pub(crate) fn has_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// How many acknowledgements wait to be sent.
    pub(crate) fn due_len(&self) -> usize {
        self.due.len()
    }

    /// Acknowledgements waiting to be sent, as ranges, for connection `epoch` (those of an
    /// earlier connection name deliveries the broker already took back).
    pub(crate) fn take_ranges(&mut self, epoch: u64) -> Vec<(u64, u64)> {
        let mut seqs: Vec<u64> = self
            .due
            .drain(..)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, s)| s)
            .collect();
        seqs.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for s in seqs {
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 >= s => *last = (*last).max(s),
                _ => ranges.push((s, s)),
            }
        }
        ranges
    }
}

/// A Processed publish kept until the broker acknowledges it, small (a client keeps thousands):
/// its sequence, timestamp and payload; its topic unless it is the one of the publish kept
/// before it (`None`), so that keeping a stream of publishes on one topic clones no shared
/// buffer; and, only when it has any, its other header fields (`rest`, without `source`: every
/// publish of a client carries the client's name, put back when it is sent again).
struct KeptPublish {
    sequence: u64,
    timestamp_ns: u64,
    payload: Bytes,
    topic: Option<Topic>,
    rest: Option<Box<Header>>,
}

/// Processed publishes the broker has not acknowledged yet, in publish order, to send again
/// with the same ids after a reconnect. Bounded in charged bytes.
#[derive(Default)]
pub(crate) struct Unacked {
    kept: VecDeque<KeptPublish>,
    /// The publisher id of every publish kept (the client's).
    publisher: u64,
    /// The topic of the last one kept.
    tail_topic: Option<Topic>,
    pub(crate) bytes: usize,
    pub(crate) acked: u64,
    pub(crate) refused: u64,
}

/// What a kept publish is charged: as [`Message::accounted_size`].
fn charge(topic: &Topic, payload: &Bytes) -> usize {
    payload.len() + topic.as_str().len() + MESSAGE_OVERHEAD
}

impl Unacked {
    /// Keeps a Processed publish of `header` on `topic` (its `source` is not kept).
    pub(crate) fn push(&mut self, topic: &Topic, header: &Header, payload: Bytes) {
        self.bytes += charge(topic, &payload);
        self.publisher = header.id.publisher;
        let topic = if self.tail_topic.as_ref() == Some(topic) {
            None
        } else {
            self.tail_topic = Some(topic.clone());
            Some(topic.clone())
        };
        let plain = header.reply_to.is_none()
            && header.deadline_ns.is_none()
            && header.correlation.is_none()
            && header.status.is_none();
        let rest = (!plain).then(|| {
            Box::new(Header {
                source: ByteStr::default(),
                ..header.clone()
            })
        });
        self.kept.push_back(KeptPublish {
            sequence: header.id.sequence,
            timestamp_ns: header.timestamp_ns,
            payload,
            topic,
            rest,
        });
    }

    /// The header of `k`, from `source`.
    fn header(&self, k: &KeptPublish, source: &ByteStr) -> Header {
        let mut h = match &k.rest {
            Some(rest) => (**rest).clone(),
            None => Header {
                qos: Qos::Processed,
                ..Header::default()
            },
        };
        h.id = MessageId {
            publisher: self.publisher,
            sequence: k.sequence,
        };
        h.timestamp_ns = k.timestamp_ns;
        h.source = source.clone();
        h
    }

    pub(crate) fn len(&self) -> usize {
        self.kept.len()
    }

    /// Removes the publish at `at`, handing its topic to the next one if that shares it;
    /// returns its charge.
    fn remove(&mut self, at: usize) -> Option<usize> {
        let mut gone = self.kept.remove(at)?;
        let topic = match gone.topic.take() {
            Some(t) => {
                if let Some(next) = self.kept.get_mut(at).filter(|n| n.topic.is_none()) {
                    next.topic = Some(t.clone());
                }
                t
            }
            None => self.topic_at(at.checked_sub(1)?)?.clone(),
        };
        if self.kept.is_empty() {
            self.tail_topic = None;
        }
        let n = charge(&topic, &gone.payload);
        self.bytes -= n;
        Some(n)
    }

    /// The topic of the publish at `at`.
    fn topic_at(&self, at: usize) -> Option<&Topic> {
        self.kept.range(..=at).rev().find_map(|k| k.topic.as_ref())
    }

    /// The broker acknowledged `id`: in protocol 1.3, every Processed publish of this client
    /// up to it is either acknowledged or was refused. Returns how many were.
    pub(crate) fn ack_through(&mut self, id: MessageId) -> usize {
        let mut n = 0;
        while let Some(front) = self.kept.front() {
            if self.publisher != id.publisher || front.sequence > id.sequence {
                break;
            }
            self.remove(0);
            n += 1;
        }
        self.acked += n as u64;
        n
    }

    /// The broker refused `id`; returns whether it was one of ours kept here.
    pub(crate) fn refuse(&mut self, id: MessageId) -> bool {
        if id.publisher != self.publisher {
            return false;
        }
        let Some(at) = self.kept.iter().position(|k| k.sequence == id.sequence) else {
            return false;
        };
        self.remove(at);
        self.refused += 1;
        true
    }

    /// How many kept publishes have a sequence up to `through` (those a writer already took:
    /// later ones are still queued).
    pub(crate) fn count_through(&self, through: u64) -> usize {
        self.kept
            .iter()
            .take_while(|k| k.sequence <= through)
            .count()
    }

    /// The kept publishes up to sequence `through`, in order, as messages from `source`.
    pub(crate) fn through(&self, through: u64, source: &ByteStr) -> Vec<Message> {
        let mut topic: Option<&Topic> = None;
        let mut out = Vec::new();
        for k in &self.kept {
            if k.sequence > through {
                break;
            }
            let t = k
                .topic
                .as_ref()
                .or(topic)
                .expect("the first kept names its topic");
            topic = Some(t);
            out.push(Message::new(
                t.clone(),
                self.header(k, source),
                k.payload.clone(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> MessageId {
        MessageId {
            publisher: 7,
            sequence: n,
        }
    }

    #[test]
    fn auto_acknowledges_the_previous_message_and_duplicates_ride_along() {
        let mut a = AckState::new(SubId(1), AckMode::Auto, false, 16);
        assert!(matches!(a.arrive(id(1), 0, 1), Verdict::Deliver));
        a.next();
        assert!(matches!(a.arrive(id(2), 0, 2), Verdict::Deliver));
        // A redelivery of 2 while the application still holds it.
        assert!(matches!(a.arrive(id(2), 0, 3), Verdict::Duplicate));
        assert_eq!(a.take_ranges(0), [(1, 1)]);
        a.next();
        assert_eq!(a.take_ranges(0), [(2, 3)]);
        // A late duplicate of something acknowledged: acknowledged at once, never handed.
        assert!(matches!(a.arrive(id(1), 0, 9), Verdict::Duplicate));
        assert_eq!(a.take_ranges(0), [(9, 9)]);
        assert!(a.handed.is_empty());
    }

    #[test]
    fn manual_acks_in_any_order_become_ranges_of_the_current_connection() {
        let mut a = AckState::new(SubId(1), AckMode::Manual, false, 2);
        for n in 1..=4 {
            a.arrive(id(n), 1, n);
        }
        a.next();
        assert!(!a.has_due(), "manual: nothing until acknowledged");
        assert!(a.ack(id(3)) && a.ack(id(1)) && a.ack(id(2)));
        assert!(!a.ack(id(2)), "once");
        assert_eq!(a.take_ranges(1), [(1, 3)]);
        // After a reconnect (epoch 2), what the old connection delivered is not acknowledged
        // there: the broker took it back.
        a.ack(id(4));
        assert!(a.take_ranges(2).is_empty());
        // The dedup window keeps the last two acknowledged.
        assert!(matches!(a.arrive(id(1), 2, 1), Verdict::Deliver));
        assert!(matches!(a.arrive(id(4), 2, 2), Verdict::Duplicate));
        let mut keep = AckState::new(SubId(1), AckMode::Manual, true, 2);
        keep.arrive(id(1), 0, 1);
        assert!(matches!(keep.arrive(id(1), 0, 2), Verdict::Deliver));
    }

    #[test]
    fn publishes_are_kept_until_acknowledged_or_refused() {
        let mut u = Unacked::default();
        let (a, b) = (Topic::new("a").unwrap(), Topic::new("b").unwrap());
        let header = |n: u64| Header {
            id: id(n),
            source: ByteStr::from("me"),
            ..Header::default()
        };
        let x = || Bytes::from_static(b"x");
        for (n, t) in [(2, &a), (3, &a), (5, &b), (8, &b), (9, &b)] {
            u.push(t, &header(n), x());
        }
        let one = 1 + 1 + MESSAGE_OVERHEAD;
        assert_eq!(u.bytes, 5 * one);
        // 2 names topic a, 3 shares it: acknowledging 2 hands the topic to 3.
        assert_eq!(u.ack_through(id(2)), 1);
        assert!(u.refuse(id(5)), "5 names b; 8 takes it over");
        assert!(!u.refuse(id(4)));
        assert_eq!(u.count_through(7), 1);
        let again = u.through(9, &ByteStr::from("me"));
        let seen: Vec<_> = again
            .iter()
            .map(|m| {
                (
                    m.id().sequence,
                    m.topic().as_str(),
                    m.header().source.as_str(),
                )
            })
            .collect();
        assert_eq!(seen, [(3, "a", "me"), (8, "b", "me"), (9, "b", "me")]);
        assert_eq!(u.ack_through(id(8)), 2);
        assert_eq!(u.through(9, &ByteStr::from("me"))[0].topic().as_str(), "b");
        assert_eq!(u.ack_through(id(10)), 1);
        assert_eq!((u.len(), u.bytes, u.acked, u.refused), (0, 0, 4, 1));
        assert!(u.tail_topic.is_none());
        // After emptying, the next one names its topic again; header fields beyond the id and
        // timestamp are kept when there are any.
        let mut full = header(11);
        full.qos = Qos::Processed;
        full.timestamp_ns = 42;
        full.deadline_ns = Some(7);
        u.push(&a, &full, x());
        let mut plain = header(12);
        plain.qos = Qos::Processed;
        u.push(&a, &plain, x());
        let again = u.through(12, &ByteStr::from("me"));
        assert_eq!(again[0].topic().as_str(), "a");
        assert_eq!(again[0].header(), &full);
        assert_eq!(again[1].header(), &plain);
    }
}
