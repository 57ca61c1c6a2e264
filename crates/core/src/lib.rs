//! Pure core of daemoneye-eventbus: no sockets, no clock, no tasks.
//!
//! - [`topic`]: [`Topic`] and [`TopicFilter`], validated once at the edge (`docs/topics.md`).
//! - [`trie`]: the [`SubscriptionTrie`] used by the broker to route, and its naive oracle.
//! - [`topic_cache`]: [`TopicCache`], the bounded table of recently seen topics that lets a
//!   connection validate and match each topic once.
//! - [`catalog`]: the seed topic catalogue as constants and builders.
//! - [`message`]: [`Message`], [`Header`], ids, QoS and correlation metadata.
//! - [`codec`]: the v1 frame format and a cancel-safe stream decoder (`docs/protocol.md`).
//! - [`bytestr`]: [`ByteStr`], a zero-copy string over shared bytes.
//! - [`budget`]: [`Budget`], the byte budget kept messages are charged to, and [`Charge`].

pub mod budget;
pub mod bytestr;
pub mod catalog;
pub mod codec;
pub mod correlation;
pub mod group;
pub mod message;
pub mod topic;
pub mod topic_cache;
pub mod trie;

pub use budget::{Budget, Charge};
pub use bytestr::ByteStr;
pub use codec::{Frame, FrameDecoder, FrameError};
pub use correlation::CorrelationFilter;
pub use group::{DurableName, DurableNameError, GroupError, QueueGroup};
pub use message::{
    CorrelationError, CorrelationMetadata, Header, Message, MessageId, Qos, ReplyStatus, StatusCode,
};
pub use topic::{Topic, TopicError, TopicFilter};
pub use topic_cache::TopicCache;
pub use trie::{NaiveMatcher, SubscriptionTrie};
