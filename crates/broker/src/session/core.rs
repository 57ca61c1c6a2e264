//! The session state machine: what the broker does with each frame a client sends and with
//! the passing of time, as values. No socket, no clock, no task: time comes in as a
//! parameter, and the shell (`session/mod.rs`) reads the frames, calls this, and carries out
//! the [`Step`]s.

use crate::acl::{Denied, Grants};
use crate::router::SubscribeRefusal;
use daemoneye_eventbus_core::codec::{
    ErrorCode, ErrorFrame, Hello, Lent, LentFrame, MessageRun, Nack, PROTOCOL_MAJOR, Reply,
};
use daemoneye_eventbus_core::{Frame, FrameError, Message};
use daemoneye_eventbus_transport::ReadError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fatal error frame.
pub(crate) fn fatal(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
    ErrorFrame {
        request_id: 0,
        code,
        fatal: true,
        message: message.into(),
    }
}

/// Why a session ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Exit {
    /// The client closed its end.
    ClientClosed,
    /// The broker is shutting down.
    Shutdown,
    /// The connection was torn down (overflow under the disconnect policy, forced shutdown).
    Cancelled,
    /// The client broke a rule; the frame is its last.
    Fatal(ErrorFrame),
}

/// What the shell must do after a frame or a tick.
#[derive(Debug)]
pub(crate) enum Step<'f> {
    /// Route this publish: it passed every check.
    Route(Lent<'f, Message>),
    /// Route this run as a unit (every message passed the checks).
    RouteRun(Lent<'f, MessageRun>),
    /// Route this run message by message, each checked on its own ([`SessionCore::check`]):
    /// a check failed for the run as a whole.
    SplitRun(Lent<'f, MessageRun>),
    /// Queue this control frame for the client; `refused` when it refuses a publish.
    Answer { frame: Frame, refused: bool },
    /// Carry out this subscribe request, then answer [`SessionCore::subscribed`].
    Subscribe(daemoneye_eventbus_core::codec::Subscribe),
    /// Carry out this unsubscribe request, then answer [`SessionCore::unsubscribed`].
    Unsubscribe(daemoneye_eventbus_core::codec::Unsubscribe),
    /// Open or attach this acknowledged subscription, then answer [`SessionCore::answered`].
    SubscribeAcked(daemoneye_eventbus_core::codec::SubscribeAcked),
    /// Acknowledge these deliveries.
    Ack(daemoneye_eventbus_core::codec::SubAck),
    /// Close (or detach, or delete) this acknowledged subscription, then answer.
    CloseSub(daemoneye_eventbus_core::codec::SubClose),
    /// Delete this durable subscription, then answer.
    DeleteDurable(daemoneye_eventbus_core::codec::DurableDelete),
    /// Nothing to do.
    Nothing,
    /// End the session.
    Close(Exit),
}

/// The limits a session enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest payload accepted.
    pub(crate) max_message_size: usize,
    /// A peer silent in either direction for this long is pinged.
    pub(crate) keepalive: Duration,
    /// A peer not heard from for this long is closed.
    pub(crate) idle_timeout: Duration,
}

/// Checks a client's HELLO.
pub(crate) fn check_hello(hello: &Hello) -> Result<(), ErrorFrame> {
    if hello.version.major != PROTOCOL_MAJOR {
        let msg = format!(
            "protocol version {} is not supported; this broker speaks {}.x",
            hello.version, PROTOCOL_MAJOR
        );
        return Err(fatal(ErrorCode::UnsupportedVersion, msg));
    }
    if hello.client_name.is_empty() || hello.client_name.chars().any(char::is_control) {
        let msg = "client name must be non-empty printable text";
        return Err(fatal(ErrorCode::Protocol, msg));
    }
    Ok(())
}

/// The fatal error answering a read error that ends a connection.
pub(crate) fn read_error(e: &ReadError) -> ErrorFrame {
    let code = match e {
        ReadError::Frame(FrameError::TooLarge { .. }) => ErrorCode::FrameTooLarge,
        _ => ErrorCode::Protocol,
    };
    fatal(code, format!("{e}; closing the connection"))
}

/// One client's session after its handshake.
#[derive(Debug)]
pub(crate) struct SessionCore {
    /// The name from HELLO: every message published must carry it as its source.
    name: String,
    limits: Limits,
    last_heard: Instant,
    ping_nonce: u64,
    /// What the connection may do (the ACL policy resolved for its identity).
    grants: Arc<Grants>,
    /// Publishes and subscriptions the ACL refused, not yet taken by [`SessionCore::take_denials`].
    denials: u64,
    /// The first [`DENIALS_KEPT`] of them, for the audit trail.
    denied: Vec<Denied>,
}

/// Refusals a session keeps the details of between two batches (the rest are counted).
const DENIALS_KEPT: usize = 64;

impl SessionCore {
    pub(crate) fn new(name: String, limits: Limits, now: Instant, grants: Arc<Grants>) -> Self {
        Self {
            name,
            limits,
            last_heard: now,
            ping_nonce: 0,
            grants,
            denials: 0,
            denied: Vec::new(),
        }
    }

    /// Puts a reloaded policy's grants in force.
    pub(crate) fn set_grants(&mut self, grants: Arc<Grants>) {
        self.grants = grants;
    }

    /// The ACL refusals since the last call: how many, and the details of the first ones.
    pub(crate) fn take_denials(&mut self) -> (u64, Vec<Denied>) {
        (
            std::mem::take(&mut self.denials),
            std::mem::take(&mut self.denied),
        )
    }

    fn deny(&mut self, d: &Denied) {
        self.denials += 1;
        if self.denied.len() < DENIALS_KEPT {
            self.denied.push(d.clone());
        }
    }

    /// A REPLY refusing a subscription the ACL does not allow.
    fn deny_subscribe(&mut self, request_id: u32, d: &Denied) -> Step<'static> {
        self.deny(d);
        Step::Answer {
            frame: Frame::Reply(Reply {
                request_id,
                error: Some(ErrorCode::NotAuthorized),
                message: d.to_string(),
            }),
            refused: false,
        }
    }

    /// Something arrived from the client at `now`.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The next keepalive probe.
    pub(crate) fn ping(&mut self) -> Frame {
        self.ping_nonce += 1;
        Frame::Ping(self.ping_nonce)
    }

    /// What to do with one frame from the client.
    pub(crate) fn on_frame<'f>(&mut self, frame: LentFrame<'f>) -> Step<'f> {
        match frame {
            LentFrame::Publish(msg) => match self.check(&msg) {
                Ok(()) => Step::Route(msg),
                Err(nack) => Step::Answer {
                    frame: Frame::Nack(nack),
                    refused: true,
                },
            },
            LentFrame::PublishRun(run) => {
                // A run holds no requests: its entries carry no reply topic.
                let whole = run.max_payload() <= self.limits.max_message_size
                    && !run.topic().is_sys()
                    && run.source().as_str() == self.name
                    && self.grants.check_publish(run.topic(), false).is_ok();
                if whole {
                    Step::RouteRun(run)
                } else {
                    Step::SplitRun(run)
                }
            }
            LentFrame::Other(Frame::Subscribe(s)) => match self.grants.check_subscribe(&s.filter) {
                Ok(()) => Step::Subscribe(s),
                Err(d) => self.deny_subscribe(s.request_id, &d),
            },
            LentFrame::Other(Frame::Unsubscribe(u)) => Step::Unsubscribe(u),
            LentFrame::Other(Frame::SubscribeAcked(s)) => {
                match s
                    .filters
                    .iter()
                    .find_map(|f| self.grants.check_subscribe(f).err())
                {
                    None => Step::SubscribeAcked(s),
                    Some(d) => self.deny_subscribe(s.request_id, &d),
                }
            }
            LentFrame::Other(Frame::SubAck(a)) => Step::Ack(a),
            LentFrame::Other(Frame::SubClose(c)) => Step::CloseSub(c),
            LentFrame::Other(Frame::DurableDelete(d)) => Step::DeleteDurable(d),
            LentFrame::Other(Frame::Ping(n)) => Step::Answer {
                frame: Frame::Pong(n),
                refused: false,
            },
            // Subscriber acknowledgements and client notices carry nothing the broker must
            // act on in protocol 1.2; a client's going-away is followed by its end of stream;
            // a client's error is only reported.
            LentFrame::Other(
                Frame::Pong(_)
                | Frame::Ack(_)
                | Frame::Nack(_)
                | Frame::GoingAway(_)
                | Frame::Error(_),
            ) => Step::Nothing,
            other => {
                let msg = format!("unexpected frame kind 0x{:02x} from a client", other.kind());
                Step::Close(Exit::Fatal(fatal(ErrorCode::Protocol, msg)))
            }
        }
    }

    /// The checks every publish passes: size, reserved topics, source.
    pub(crate) fn check(&mut self, msg: &Lent<'_, Message>) -> Result<(), Nack> {
        let refuse = |code, reason| {
            Err(Nack {
                id: msg.id(),
                code,
                reason,
            })
        };
        let max = self.limits.max_message_size;
        let len = msg.payload_len();
        if len > max {
            let reason = format!("message of {len} bytes exceeds max_message_size ({max} bytes)");
            return refuse(ErrorCode::MessageTooLarge, reason);
        }
        if msg.topic().is_sys() {
            let reason = format!(
                "clients cannot publish to {}: $sys is reserved",
                msg.topic()
            );
            return refuse(ErrorCode::ReservedTopic, reason);
        }
        if let Some(reply_to) = msg.header().reply_to.as_ref().filter(|r| r.is_sys()) {
            let reason = format!(
                "replies cannot go to {reply_to}: $sys is reserved for the broker; use an _inbox topic"
            );
            return refuse(ErrorCode::ReservedTopic, reason);
        }
        if msg.header().source.as_str() != self.name {
            let reason = format!(
                "message source {:?} does not match the connection's name {:?}",
                msg.header().source.as_str(),
                self.name
            );
            return refuse(ErrorCode::NotAuthorized, reason);
        }
        if let Err(d) = self
            .grants
            .check_publish(msg.topic(), msg.header().reply_to.is_some())
        {
            self.deny(&d);
            return refuse(ErrorCode::NotAuthorized, d.to_string());
        }
        Ok(())
    }

    /// What to do after a read error: a frame whose content was refused while the stream
    /// stays in sync ([`FrameError::is_recoverable`]: an invalid topic, filter or field) is
    /// answered, and the session goes on; anything else ends it.
    pub(crate) fn on_read_error(&mut self, e: ReadError) -> Step<'static> {
        let answer = |frame, refused| Step::Answer { frame, refused };
        match e {
            ReadError::Frame(FrameError::InvalidFilter { request_id, error }) => answer(
                Frame::Reply(Reply {
                    request_id,
                    error: Some(ErrorCode::InvalidFilter),
                    message: error.to_string(),
                }),
                false,
            ),
            ReadError::Frame(FrameError::InvalidGroup { request_id, error }) => answer(
                Frame::Reply(Reply {
                    request_id,
                    error: Some(ErrorCode::InvalidGroup),
                    message: error.to_string(),
                }),
                false,
            ),
            ReadError::Frame(FrameError::InvalidName { request_id, error }) => answer(
                Frame::Reply(Reply {
                    request_id,
                    error: Some(ErrorCode::InvalidName),
                    message: error.to_string(),
                }),
                false,
            ),
            ReadError::Frame(FrameError::Topic(error)) => answer(
                Frame::Error(ErrorFrame {
                    request_id: 0,
                    code: ErrorCode::InvalidTopic,
                    fatal: false,
                    message: format!("{error}; the message was discarded"),
                }),
                true,
            ),
            ReadError::Frame(e) if e.is_recoverable() => answer(
                Frame::Error(ErrorFrame {
                    request_id: 0,
                    code: ErrorCode::Protocol,
                    fatal: false,
                    message: format!("{e}; the frame was discarded"),
                }),
                true,
            ),
            other => Step::Close(Exit::Fatal(read_error(&other))),
        }
    }

    /// Keepalive at `now`, the broker having last written to the client at `written`: a
    /// client silent for `idle_timeout` is closed; one silent for `keepalive` in either
    /// direction is pinged (a client that only publishes hears from the broker, and a client
    /// that only receives is asked to answer).
    pub(crate) fn on_tick(&mut self, now: Instant, written: Instant) -> Step<'static> {
        let idle = now.saturating_duration_since(self.last_heard);
        if idle >= self.limits.idle_timeout {
            let msg = format!(
                "nothing received for {} s; closing",
                self.limits.idle_timeout.as_secs()
            );
            return Step::Close(Exit::Fatal(fatal(ErrorCode::KeepaliveTimeout, msg)));
        }
        let unwritten = now.saturating_duration_since(written);
        if idle >= self.limits.keepalive || unwritten >= self.limits.keepalive {
            return Step::Answer {
                frame: self.ping(),
                refused: false,
            };
        }
        Step::Nothing
    }

    /// The REPLY to a subscribe request.
    pub(crate) fn subscribed(request_id: u32, outcome: &Result<bool, SubscribeRefusal>) -> Frame {
        let (error, message) = match outcome {
            Ok(true) => (None, String::new()),
            Ok(false) => (None, "already subscribed".into()),
            Err(SubscribeRefusal::Conflict(why)) => {
                (Some(ErrorCode::SubscriptionConflict), why.clone())
            }
            Err(SubscribeRefusal::Limit(why) | SubscribeRefusal::Memory(why)) => {
                (Some(ErrorCode::ResourceExhausted), why.clone())
            }
            Err(SubscribeRefusal::Inbox(why)) => (Some(ErrorCode::NotAuthorized), why.clone()),
        };
        Frame::Reply(Reply {
            request_id,
            error,
            message,
        })
    }

    /// The REPLY to a request of protocol 1.3 (acknowledged subscriptions): `note` on
    /// success (e.g. `resumed`), the refusal otherwise.
    pub(crate) fn answered(request_id: u32, outcome: Result<&str, (ErrorCode, String)>) -> Frame {
        let (error, message) = match outcome {
            Ok(note) => (None, note.to_owned()),
            Err((code, why)) => (Some(code), why),
        };
        Frame::Reply(Reply {
            request_id,
            error,
            message,
        })
    }

    /// The REPLY to an unsubscribe request.
    pub(crate) fn unsubscribed(request_id: u32, removed: bool) -> Frame {
        let message = if removed {
            String::new()
        } else {
            "was not subscribed".into()
        };
        Frame::Reply(Reply {
            request_id,
            error: None,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use daemoneye_eventbus_core::codec::{
        DecodeCache, FrameDecoder, RunWriter, SlowReaderPolicy, Version,
    };
    use daemoneye_eventbus_core::{ByteStr, Header, Qos, Topic};

    const KEEPALIVE: Duration = Duration::from_secs(10);

    fn core(now: Instant) -> SessionCore {
        let limits = Limits {
            max_message_size: 16,
            keepalive: KEEPALIVE,
            idle_timeout: Duration::from_secs(30),
        };
        SessionCore::new("pub".into(), limits, now, Arc::new(Grants::everything()))
    }

    fn message(topic: &str, source: &str, payload: usize) -> Message {
        Message::new(
            Topic::new(topic).unwrap(),
            Header {
                source: ByteStr::from(source),
                ..Header::default()
            },
            Bytes::from(vec![1; payload]),
        )
    }

    /// The step for a PUBLISH of `msg`, as the broker reads it.
    fn step_of(c: &mut SessionCore, msg: Message) -> String {
        let step = c.on_frame(LentFrame::owned(Frame::Publish(msg)));
        describe(&step)
    }

    fn describe(step: &Step<'_>) -> String {
        match step {
            Step::Route(m) => format!("route {}", m.topic()),
            Step::RouteRun(r) => format!("route run {}", r.topic()),
            Step::SplitRun(r) => format!("split run {}", r.topic()),
            Step::Answer {
                frame: Frame::Nack(n),
                refused,
            } => format!("nack {:?} {refused}", n.code),
            Step::Answer { frame, refused } => format!("answer 0x{:02x} {refused}", frame.kind()),
            Step::Subscribe(_) | Step::SubscribeAcked(_) => "subscribe".into(),
            Step::Ack(_) => "ack".into(),
            Step::CloseSub(_) | Step::DeleteDurable(_) => "close".into(),
            Step::Unsubscribe(_) => "unsubscribe".into(),
            Step::Nothing => "nothing".into(),
            Step::Close(Exit::Fatal(e)) => format!("close {:?}", e.code),
            Step::Close(e) => format!("close {e:?}"),
        }
    }

    #[test]
    fn publishes_are_checked_before_they_are_routed() {
        let mut c = core(Instant::now());
        assert_eq!(step_of(&mut c, message("a.b", "pub", 16)), "route a.b");
        assert_eq!(
            step_of(&mut c, message("a.b", "pub", 17)),
            "nack MessageTooLarge true"
        );
        assert_eq!(
            step_of(&mut c, message("$sys.x", "pub", 1)),
            "nack ReservedTopic true"
        );
        assert_eq!(
            step_of(&mut c, message("a.b", "other", 1)),
            "nack NotAuthorized true"
        );
        let mut to_sys = message("a.b", "pub", 1).header().clone();
        to_sys.reply_to = Some(Topic::new("$sys.broker.stats").unwrap());
        let request = Message::new(Topic::new("a.b").unwrap(), to_sys, Bytes::new());
        assert_eq!(step_of(&mut c, request), "nack ReservedTopic true");
    }

    #[test]
    fn a_run_is_routed_whole_only_when_every_message_passes() {
        let mut c = core(Instant::now());
        let run_of = |qos: Qos, source: &str, payload: usize| {
            let mut b = BytesMut::new();
            let header = Header {
                source: ByteStr::from(source),
                qos,
                ..Header::default()
            };
            let mut w = RunWriter::begin(&mut b, &Topic::new("r").unwrap(), qos);
            w.push(&mut b, &header, &vec![0; payload]);
            w.push(&mut b, &header, b"x");
            b
        };
        let run = |source: &str, payload: usize| run_of(Qos::Realtime, source, payload);
        let dec = FrameDecoder::new(1 << 20);
        let mut cache = DecodeCache::lending();
        for (wire, expected) in [
            (run("pub", 3), "route run r"),
            (run("pub", 17), "split run r"),
            (run("other", 1), "split run r"),
            // Protocol 1.4: Processed runs, checked alike.
            (run_of(Qos::Processed, "pub", 3), "route run r"),
            (run_of(Qos::Processed, "other", 3), "split run r"),
        ] {
            let mut wire = wire;
            let frame = dec.decode_lent(&mut wire, &mut cache).unwrap().unwrap();
            assert_eq!(describe(&c.on_frame(frame)), expected);
        }
    }

    #[test]
    fn the_acl_refuses_what_it_does_not_grant_and_counts_it() {
        let policy = crate::acl::Policy::parse(
            "version = 1\n[[rule]]\nuid = 5\npublish = [\"jobs.#\"]\nsubscribe = [\"events.#\"]\n",
            false,
        )
        .unwrap();
        let id = crate::acl::Identity {
            uid: Some(5),
            name: "pub",
            ..crate::acl::Identity::default()
        };
        let mut c = core(Instant::now());
        c.set_grants(Arc::new(policy.grants(&id)));
        assert_eq!(step_of(&mut c, message("jobs.a", "pub", 1)), "route jobs.a");
        assert_eq!(
            step_of(&mut c, message("events.a", "pub", 1)),
            "nack NotAuthorized true"
        );
        // A run on a topic not granted is split: each message refused on its own.
        let mut b = BytesMut::new();
        let header = Header {
            source: ByteStr::from("pub"),
            ..Header::default()
        };
        let mut w = RunWriter::begin(&mut b, &Topic::new("events.a").unwrap(), Qos::Realtime);
        w.push(&mut b, &header, b"x");
        w.push(&mut b, &header, b"y");
        let dec = FrameDecoder::new(1 << 20);
        let mut cache = DecodeCache::lending();
        let frame = dec.decode_lent(&mut b, &mut cache).unwrap().unwrap();
        assert_eq!(describe(&c.on_frame(frame)), "split run events.a");
        let subscribe = |filter: &str| {
            Frame::Subscribe(daemoneye_eventbus_core::codec::Subscribe {
                request_id: 9,
                qos: Qos::Realtime,
                filter: daemoneye_eventbus_core::TopicFilter::new(filter).unwrap(),
                group: None,
            })
        };
        assert_eq!(
            describe(&c.on_frame(LentFrame::owned(subscribe("events.+")))),
            "subscribe"
        );
        let step = c.on_frame(LentFrame::owned(subscribe("jobs.#")));
        let Step::Answer {
            frame: Frame::Reply(r),
            refused: false,
        } = step
        else {
            panic!("a refusal")
        };
        assert_eq!(r.error, Some(ErrorCode::NotAuthorized));
        assert!(r.message.contains("subscribe to jobs.#"), "{}", r.message);
        let (n, details) = c.take_denials();
        assert_eq!((n, details.len()), (2, 2));
        assert_eq!(details[1].target, "jobs.#");
        assert_eq!(c.take_denials().0, 0);
    }

    #[test]
    fn control_frames_and_unexpected_ones() {
        let mut c = core(Instant::now());
        let on = |c: &mut SessionCore, f: Frame| describe(&c.on_frame(LentFrame::owned(f)));
        assert_eq!(on(&mut c, Frame::Ping(3)), "answer 0x0b false");
        assert_eq!(on(&mut c, Frame::Pong(3)), "nothing");
        assert_eq!(
            on(&mut c, Frame::Deliver(message("a", "pub", 0))),
            "close Protocol"
        );
        assert_eq!(on(&mut c, Frame::Hello(hello(1))), "close Protocol");
    }

    fn hello(major: u16) -> Hello {
        Hello {
            version: Version { major, minor: 2 },
            capabilities: 0,
            max_message_size: 0,
            keepalive_ms: 0,
            slow_reader: SlowReaderPolicy::DropOldest,
            client_name: "c".into(),
        }
    }

    #[test]
    fn hello_checks() {
        assert!(check_hello(&hello(1)).is_ok());
        let e = check_hello(&hello(2)).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedVersion);
        assert!(e.message.contains("2.2") && e.fatal);
        let unnamed = Hello {
            client_name: "a\nb".into(),
            ..hello(1)
        };
        assert_eq!(check_hello(&unnamed).unwrap_err().code, ErrorCode::Protocol);
    }

    #[test]
    fn recoverable_read_errors_are_answered_and_others_close() {
        let mut c = core(Instant::now());
        let topic = Topic::new("A").unwrap_err();
        let step = c.on_read_error(ReadError::Frame(FrameError::Topic(topic)));
        assert_eq!(describe(&step), "answer 0x0c true");
        let step = c.on_read_error(ReadError::Frame(FrameError::Trailing(2)));
        assert_eq!(describe(&step), "answer 0x0c true");
        let step = c.on_read_error(ReadError::Frame(FrameError::UnknownKind(0x7f)));
        assert_eq!(describe(&step), "close Protocol");
        let step = c.on_read_error(ReadError::Frame(FrameError::TooLarge { len: 9, max: 1 }));
        assert_eq!(describe(&step), "close FrameTooLarge");
    }

    #[test]
    fn keepalive_pings_a_peer_silent_in_either_direction_and_closes_an_idle_one() {
        let t0 = Instant::now();
        let mut c = core(t0);
        let s = |secs| t0 + Duration::from_secs(secs);
        // Heard and written lately: nothing.
        c.heard(s(5));
        assert_eq!(describe(&c.on_tick(s(9), s(8))), "nothing");
        // A publisher the broker hears all the time but never writes to: pinged.
        c.heard(s(12));
        assert_eq!(describe(&c.on_tick(s(12), s(1))), "answer 0x0a false");
        // A client the broker writes to but does not hear from: pinged, then closed.
        assert_eq!(describe(&c.on_tick(s(22), s(21))), "answer 0x0a false");
        assert_eq!(describe(&c.on_tick(s(42), s(41))), "close KeepaliveTimeout");
        // Nonces go up.
        assert_eq!(c.ping(), Frame::Ping(3));
    }

    #[test]
    fn replies_to_subscription_requests() {
        let ok = SessionCore::subscribed(4, &Ok(true));
        assert!(matches!(
            ok,
            Frame::Reply(Reply {
                request_id: 4,
                error: None,
                ..
            })
        ));
        let limit = SessionCore::subscribed(5, &Err(SubscribeRefusal::Limit("full".into())));
        assert!(matches!(
            limit,
            Frame::Reply(Reply {
                error: Some(ErrorCode::ResourceExhausted),
                ..
            })
        ));
        let gone = SessionCore::unsubscribed(6, false);
        assert!(
            matches!(gone, Frame::Reply(Reply { message, .. }) if message == "was not subscribed")
        );
    }
}
