//! Queue groups: subscriptions that share a stream, each message going to one member.

use crate::bytestr::ByteStr;
use std::fmt;

/// Maximum length of a queue group name, in bytes.
pub const MAX_GROUP_LEN: usize = 64;

/// A validated name type: `$name` holds 1 to `$max` bytes of `a-z 0-9 _ -`, refused with
/// `$error`.
macro_rules! segment_name {
    (
        $(#[$doc:meta])* $name:ident,
        $(#[$error_doc:meta])* $error:ident = $message:literal,
        $max:ident, $what:literal
    ) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(ByteStr);

        $(#[$error_doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error($message)]
        pub struct $error {
            /// The name as given (cut to 80 bytes for display).
            pub name: String,
            /// Why.
            pub reason: &'static str,
        }

        impl $name {
            #[doc = concat!("Validates ", $what, ".")]
            ///
            /// # Errors
            ///
            #[doc = concat!("[`", stringify!($error), "`] when the name is empty, longer than [`",
                stringify!($max), "`] bytes or holds a character other than `a-z 0-9 _ -`.")]
            pub fn new(name: &str) -> Result<Self, $error> {
                check_name(name).map_err(|reason| $error {
                    name: crate::message::truncate_utf8(name.to_owned(), 80),
                    reason,
                })?;
                Ok(Self(ByteStr::from(name)))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }
    };
}

segment_name! {
    /// The name of a queue group: 1 to [`MAX_GROUP_LEN`] bytes of `a-z 0-9 _ -` (the
    /// characters of a topic segment). Subscriptions of one group that match a message share
    /// it: the broker gives it to exactly one of them (see `docs/protocol.md`, SUBSCRIBE).
    QueueGroup,
    /// A refused queue group name.
    GroupError = "invalid queue group {name:?}: {reason}",
    MAX_GROUP_LEN, "a group name"
}

/// Maximum length of a durable subscription name, in bytes.
pub const MAX_DURABLE_LEN: usize = MAX_GROUP_LEN;

segment_name! {
    /// The name of a durable subscription (protocol 1.3): 1 to [`MAX_DURABLE_LEN`] bytes of
    /// `a-z 0-9 _ -`. A durable subscription outlives the connections that attach to it: the
    /// broker keeps what it has not acknowledged while nobody is attached.
    DurableName,
    /// A refused durable subscription name.
    DurableNameError = "invalid durable subscription name {name:?}: {reason}",
    MAX_DURABLE_LEN, "a durable subscription name"
}

/// The rule of queue group and durable subscription names: 1 to 64 bytes of `a-z 0-9 _ -`.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("a name cannot be empty");
    }
    if name.len() > MAX_GROUP_LEN {
        return Err("a name is at most 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("a name uses only a-z, 0-9, '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_segment_alphabet() {
        assert_eq!(
            QueueGroup::new("procmond-1_a").unwrap().as_str(),
            "procmond-1_a"
        );
        for bad in ["", "Proc", "a.b", "a b", &"x".repeat(65)] {
            let e = QueueGroup::new(bad).unwrap_err();
            assert!(!e.reason.is_empty(), "{bad:?} refused with a reason");
        }
        assert!(QueueGroup::new(&"x".repeat(64)).is_ok());
        let e = DurableName::new("Audit").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid durable subscription name \"Audit\": a name uses only a-z, 0-9, '_' and '-'"
        );
        assert_eq!(
            format!("{:?}", DurableName::new("audit").unwrap()),
            "\"audit\""
        );
    }
}
