//! Encoding and decoding of whole frames.

use super::body::{
    DecodeCache, decode_message_body, encode_acked_frame, encode_group_frame, encode_message_frame,
};
use super::run::{AckedHead, MessageRun, encode_acked_run, encode_run_frame};
use super::types::*;
use super::wire::{Cursor, begin, finish, put_id, put_str8, put_str16};
use super::{FrameError, MAX_ACK_RANGES, MAX_ACKED_FILTERS, MAX_NAME_LEN, SUBSCRIBE_GROUP, kind};
use bytes::{BufMut, Bytes, BytesMut};

impl Frame {
    /// The frame's kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello(_) => kind::HELLO,
            Self::Welcome(_) => kind::WELCOME,
            Self::Subscribe(_) => kind::SUBSCRIBE,
            Self::Unsubscribe(_) => kind::UNSUBSCRIBE,
            Self::Reply(_) => kind::REPLY,
            Self::Publish(_) => kind::PUBLISH,
            Self::Deliver(_) => kind::DELIVER,
            Self::DeliverGroup(_) => kind::DELIVER_GROUP,
            Self::PublishRun(_) => kind::PUBLISH_RUN,
            Self::DeliverRun(_) => kind::DELIVER_RUN,
            Self::Ack(_) => kind::ACK,
            Self::Nack(_) => kind::NACK,
            Self::Ping(_) => kind::PING,
            Self::Pong(_) => kind::PONG,
            Self::Error(_) => kind::ERROR,
            Self::Notice(_) => kind::NOTICE,
            Self::GoingAway(_) => kind::GOING_AWAY,
            Self::SubscribeAcked(_) => kind::SUBSCRIBE_ACKED,
            Self::DeliverAcked(_) => kind::DELIVER_ACKED,
            Self::DeliverAckedRun(_) => kind::DELIVER_ACKED_RUN,
            Self::SubAck(_) => kind::SUB_ACK,
            Self::SubClose(_) => kind::SUB_CLOSE,
            Self::DurableDelete(_) => kind::DURABLE_DELETE,
            Self::SubEnd(_) => kind::SUB_END,
        }
    }

    /// Appends the encoded frame (length prefix included) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Self::Publish(m) | Self::Deliver(m) => {
                return encode_message_frame(dst, self.kind(), m);
            }
            Self::DeliverGroup(d) => return encode_group_frame(dst, d),
            Self::DeliverAcked(d) => return encode_acked_frame(dst, d),
            Self::DeliverAckedRun(d) => {
                return encode_acked_run(dst, d.head, &d.run, d.run.whole(), true);
            }
            Self::PublishRun(r) | Self::DeliverRun(r) => {
                return encode_run_frame(dst, self.kind(), r);
            }
            _ => {}
        }
        let start = begin(dst, self.kind());
        self.encode_body(dst);
        finish(dst, start);
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Self::Hello(h) => {
                put_version(dst, h.version);
                dst.put_u32_le(h.capabilities);
                dst.put_u32_le(h.max_message_size);
                dst.put_u32_le(h.keepalive_ms);
                dst.put_u8(match h.slow_reader {
                    SlowReaderPolicy::DropOldest => 0,
                    SlowReaderPolicy::Disconnect => 1,
                });
                put_str8(dst, &h.client_name);
            }
            Self::Welcome(w) => {
                put_version(dst, w.version);
                dst.put_u64_le(w.session_id);
                dst.put_u32_le(w.capabilities);
                dst.put_u32_le(w.max_message_size);
                dst.put_u32_le(w.keepalive_ms);
                put_str8(dst, &w.broker);
            }
            Self::Subscribe(s) => {
                dst.put_u32_le(s.request_id);
                let group_bit = if s.group.is_some() {
                    SUBSCRIBE_GROUP
                } else {
                    0
                };
                dst.put_u8(s.qos.to_bits() | group_bit);
                put_str16(dst, s.filter.as_str());
                if let Some(g) = &s.group {
                    put_str8(dst, g.as_str());
                }
            }
            Self::Unsubscribe(u) => {
                dst.put_u32_le(u.request_id);
                put_str16(dst, u.filter.as_str());
            }
            Self::Reply(r) => {
                dst.put_u32_le(r.request_id);
                dst.put_u16_le(r.error.map_or(0, ErrorCode::to_u16));
                put_str16(dst, &r.message);
            }
            Self::Ack(id) => put_id(dst, *id),
            Self::Nack(n) => {
                put_id(dst, n.id);
                dst.put_u16_le(n.code.to_u16());
                put_str16(dst, &n.reason);
            }
            Self::Ping(n) | Self::Pong(n) => dst.put_u64_le(*n),
            Self::Error(e) => {
                dst.put_u32_le(e.request_id);
                dst.put_u16_le(e.code.to_u16());
                dst.put_u8(u8::from(e.fatal));
                put_str16(dst, &e.message);
            }
            Self::Notice(Notice::SubDropped {
                sub,
                reason,
                topics,
            }) => {
                dst.put_u8(2);
                dst.put_u32_le(sub.0);
                put_drops(dst, *reason, topics);
            }
            Self::Notice(Notice::Dropped { reason, topics }) => {
                dst.put_u8(1);
                put_drops(dst, *reason, topics);
            }
            Self::GoingAway(g) => {
                dst.put_u32_le(g.drain_ms);
                put_str16(dst, &g.reason);
            }
            Self::SubscribeAcked(s) => {
                dst.put_u32_le(s.request_id);
                dst.put_u32_le(s.sub.0);
                dst.put_u8(u8::from(s.durable.is_some()));
                dst.put_u32_le(s.window);
                if let Some(name) = &s.durable {
                    put_str8(dst, name.as_str());
                }
                let n = s.filters.len().min(MAX_ACKED_FILTERS);
                dst.put_u8(n as u8);
                for f in s.filters.iter().take(n) {
                    put_str16(dst, f.as_str());
                }
            }
            Self::SubAck(a) => {
                dst.put_u32_le(a.sub.0);
                let n = a.ranges.len().min(MAX_ACK_RANGES);
                dst.put_u16_le(n as u16);
                for (first, last) in a.ranges.iter().take(n) {
                    dst.put_u64_le(*first);
                    dst.put_u64_le(*last);
                }
            }
            Self::SubClose(c) => {
                dst.put_u32_le(c.request_id);
                dst.put_u32_le(c.sub.0);
                dst.put_u8(u8::from(c.delete));
            }
            Self::DurableDelete(d) => {
                dst.put_u32_le(d.request_id);
                put_str8(dst, d.name.as_str());
            }
            Self::SubEnd(e) => {
                dst.put_u32_le(e.sub.0);
                dst.put_u16_le(e.code.to_u16());
                put_str16(dst, &e.message);
            }
            Self::Publish(_)
            | Self::Deliver(_)
            | Self::DeliverGroup(_)
            | Self::DeliverAcked(_)
            | Self::DeliverAckedRun(_)
            | Self::PublishRun(_)
            | Self::DeliverRun(_) => {
                unreachable!("handled by encode")
            }
        }
    }
}

fn decode_slow_reader(v: u8) -> Result<SlowReaderPolicy, FrameError> {
    match v {
        0 => Ok(SlowReaderPolicy::DropOldest),
        1 => Ok(SlowReaderPolicy::Disconnect),
        v => Err(FrameError::InvalidValue {
            field: "slow_reader",
            value: u64::from(v),
        }),
    }
}

fn put_version(dst: &mut BytesMut, v: Version) {
    dst.put_u16_le(v.major);
    dst.put_u16_le(v.minor);
}

fn decode_version(c: &mut Cursor) -> Result<Version, FrameError> {
    Ok(Version {
        major: c.u16("version.major")?,
        minor: c.u16("version.minor")?,
    })
}

impl Frame {
    /// Decodes one frame from its kind byte and body (everything after the kind byte).
    ///
    /// # Errors
    ///
    /// Any [`FrameError`]. The frame was consumed whole, so after a
    /// [recoverable](FrameError::is_recoverable) one the stream is still in sync.
    pub fn decode(kind: u8, body: Bytes) -> Result<Frame, FrameError> {
        Self::decode_cached(kind, body, &mut DecodeCache::default())
    }

    /// [`Frame::decode`] for the frames of one connection: `cache` carries the last
    /// message's topic and source over to the next (see [`DecodeCache`]).
    ///
    /// # Errors
    ///
    /// As [`Frame::decode`].
    pub fn decode_cached(
        kind: u8,
        body: Bytes,
        cache: &mut DecodeCache,
    ) -> Result<Frame, FrameError> {
        if kind == kind::PUBLISH {
            return decode_message_body(body, cache).map(Frame::Publish);
        }
        if kind == kind::DELIVER {
            return decode_message_body(body, cache).map(Frame::Deliver);
        }
        if kind == kind::DELIVER_GROUP {
            let mut c = Cursor::new(body);
            let group = c.group(0)?;
            let (rest, _) = c.into_rest();
            let message = decode_message_body(rest, cache)?;
            return Ok(Frame::DeliverGroup(GroupDelivery { group, message }));
        }
        if kind == kind::DELIVER_ACKED {
            let mut c = Cursor::new(body);
            let sub = SubId(c.u32("sub")?);
            let seq = c.u64("seq")?;
            let redelivered = c.u16("redelivered")?;
            let (rest, _) = c.into_rest();
            let message = decode_message_body(rest, cache)?;
            return Ok(Frame::DeliverAcked(AckedDelivery {
                sub,
                seq,
                redelivered,
                message,
            }));
        }
        if kind == kind::DELIVER_ACKED_RUN {
            let mut c = Cursor::new(body);
            let head = AckedHead {
                sub: SubId(c.u32("sub")?),
                seq: c.u64("seq")?,
                redelivered: c.u16("redelivered")?,
            };
            let (rest, _) = c.into_rest();
            let run = MessageRun::decode(rest, false, cache)?;
            return Ok(Frame::DeliverAckedRun(AckedRun { head, run }));
        }
        if kind == kind::PUBLISH_RUN {
            return MessageRun::decode(body, true, cache).map(Frame::PublishRun);
        }
        if kind == kind::DELIVER_RUN {
            return MessageRun::decode(body, false, cache).map(Frame::DeliverRun);
        }
        let mut c = Cursor::new(body);
        let frame = match kind {
            kind::HELLO => Frame::Hello(Hello {
                version: decode_version(&mut c)?,
                capabilities: c.u32("capabilities")?,
                max_message_size: c.u32("max_message_size")?,
                keepalive_ms: c.u32("keepalive_ms")?,
                slow_reader: decode_slow_reader(c.u8("slow_reader")?)?,
                client_name: c.string8(MAX_NAME_LEN, "client_name")?,
            }),
            kind::WELCOME => Frame::Welcome(Welcome {
                version: decode_version(&mut c)?,
                session_id: c.u64("session_id")?,
                capabilities: c.u32("capabilities")?,
                max_message_size: c.u32("max_message_size")?,
                keepalive_ms: c.u32("keepalive_ms")?,
                broker: c.string8(MAX_NAME_LEN, "broker")?,
            }),
            kind::SUBSCRIBE => {
                let request_id = c.u32("request_id")?;
                let bits = c.u8("qos")?;
                let qos = c.qos(bits & !SUBSCRIBE_GROUP)?;
                let filter = c.request_filter(request_id)?;
                let group = if bits & SUBSCRIBE_GROUP != 0 {
                    Some(c.group(request_id)?)
                } else {
                    None
                };
                Frame::Subscribe(Subscribe {
                    request_id,
                    qos,
                    filter,
                    group,
                })
            }
            kind::UNSUBSCRIBE => {
                let request_id = c.u32("request_id")?;
                let filter = c.request_filter(request_id)?;
                Frame::Unsubscribe(Unsubscribe { request_id, filter })
            }
            kind::REPLY => {
                let request_id = c.u32("request_id")?;
                let code = c.u16("code")?;
                Frame::Reply(Reply {
                    request_id,
                    error: (code != 0).then(|| ErrorCode::from_u16(code)),
                    message: c.string16(u16::MAX as usize, "message")?,
                })
            }
            kind::ACK => Frame::Ack(c.id()?),
            kind::NACK => Frame::Nack(Nack {
                id: c.id()?,
                code: ErrorCode::from_u16(c.u16("code")?),
                reason: c.string16(u16::MAX as usize, "reason")?,
            }),
            kind::PING => Frame::Ping(c.u64("nonce")?),
            kind::PONG => Frame::Pong(c.u64("nonce")?),
            kind::ERROR => Frame::Error(ErrorFrame {
                request_id: c.u32("request_id")?,
                code: ErrorCode::from_u16(c.u16("code")?),
                fatal: c.u8("fatal")? != 0,
                message: c.string16(u16::MAX as usize, "message")?,
            }),
            kind::NOTICE => Frame::Notice(decode_notice(&mut c)?),
            kind::GOING_AWAY => Frame::GoingAway(GoingAway {
                drain_ms: c.u32("drain_ms")?,
                reason: c.string16(u16::MAX as usize, "reason")?,
            }),
            kind::SUBSCRIBE_ACKED => Frame::SubscribeAcked(decode_subscribe_acked(&mut c)?),
            kind::SUB_ACK => {
                let sub = SubId(c.u32("sub")?);
                let n = c.u16("count")? as usize;
                if n > MAX_ACK_RANGES {
                    return Err(FrameError::FieldTooLong {
                        field: "ranges",
                        len: n,
                        max: MAX_ACK_RANGES,
                    });
                }
                let mut ranges = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let (first, last) = (c.u64("range.first")?, c.u64("range.last")?);
                    if first > last {
                        return Err(FrameError::InvalidValue {
                            field: "range",
                            value: first,
                        });
                    }
                    ranges.push((first, last));
                }
                Frame::SubAck(SubAck { sub, ranges })
            }
            kind::SUB_CLOSE => {
                let request_id = c.u32("request_id")?;
                let sub = SubId(c.u32("sub")?);
                let delete = match c.u8("flags")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(FrameError::InvalidValue {
                            field: "flags",
                            value: u64::from(v),
                        });
                    }
                };
                Frame::SubClose(SubClose {
                    request_id,
                    sub,
                    delete,
                })
            }
            kind::DURABLE_DELETE => {
                let request_id = c.u32("request_id")?;
                Frame::DurableDelete(DurableDelete {
                    request_id,
                    name: c.durable(request_id)?,
                })
            }
            kind::SUB_END => Frame::SubEnd(SubEnd {
                sub: SubId(c.u32("sub")?),
                code: ErrorCode::from_u16(c.u16("code")?),
                message: c.string16(u16::MAX as usize, "message")?,
            }),
            other => return Err(FrameError::UnknownKind(other)),
        };
        c.end()?;
        Ok(frame)
    }
}

fn decode_subscribe_acked(c: &mut Cursor) -> Result<SubscribeAcked, FrameError> {
    let request_id = c.u32("request_id")?;
    let sub = SubId(c.u32("sub")?);
    let flags = c.u8("flags")?;
    if flags > 1 {
        return Err(FrameError::InvalidValue {
            field: "flags",
            value: u64::from(flags),
        });
    }
    let window = c.u32("window")?;
    let durable = match flags {
        1 => Some(c.durable(request_id)?),
        _ => None,
    };
    let n = c.u8("count")? as usize;
    if n == 0 {
        return Err(FrameError::InvalidValue {
            field: "count",
            value: 0,
        });
    }
    let mut filters = Vec::with_capacity(n);
    for _ in 0..n {
        filters.push(c.request_filter(request_id)?);
    }
    Ok(SubscribeAcked {
        request_id,
        sub,
        durable,
        window,
        filters,
    })
}

/// A drop notice's reason and per-topic counts (at most 65,535 topics; the broker keeps far
/// fewer, section 3.8 of `docs/protocol.md`).
fn put_drops(dst: &mut BytesMut, reason: DropReason, topics: &[(crate::Topic, u64)]) {
    dst.put_u8(reason.to_u8());
    let n = topics.len().min(u16::MAX as usize);
    dst.put_u16_le(n as u16);
    for (t, c) in topics.iter().take(n) {
        put_str16(dst, t.as_str());
        dst.put_u64_le(*c);
    }
}

fn decode_notice(c: &mut Cursor) -> Result<Notice, FrameError> {
    let what = c.u8("notice.kind")?;
    let sub = match what {
        1 => None,
        2 => Some(SubId(c.u32("notice.sub")?)),
        _ => {
            return Err(FrameError::InvalidValue {
                field: "notice.kind",
                value: u64::from(what),
            });
        }
    };
    let reason = DropReason::from_u8(c.u8("notice.reason")?);
    let n = c.u16("notice.count")? as usize;
    let mut topics = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let t = c.topic("notice.topic")?;
        topics.push((t, c.u64("notice.dropped")?));
    }
    Ok(match sub {
        Some(sub) => Notice::SubDropped {
            sub,
            reason,
            topics,
        },
        None => Notice::Dropped { reason, topics },
    })
}
