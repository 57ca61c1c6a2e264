//! [`ByteStr`]: an immutable UTF-8 string that shares a [`Bytes`] buffer.
//!
//! Decoded topics and header strings point into the frame they came from, so receiving a message
//! allocates no strings.

use bytes::Bytes;
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// An immutable, cheaply cloneable UTF-8 string backed by [`Bytes`].
///
/// Invariant: the bytes are valid UTF-8 (checked by every constructor).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteStr(Bytes);

impl ByteStr {
    /// Wraps `bytes`, checking that they are UTF-8.
    ///
    /// # Errors
    ///
    /// Returns the UTF-8 error when `bytes` is not valid UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Self(bytes))
    }

    /// A string that borrows static data (no allocation).
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    /// Wraps bytes already known to be ASCII (checked by the caller, for example the topic
    /// validator); ASCII is UTF-8.
    pub(crate) fn from_ascii(bytes: Bytes) -> Self {
        // Checked in every build: `as_str` relies on it (topics are at most 256 bytes).
        assert!(bytes.is_ascii(), "from_ascii needs ASCII bytes");
        Self(bytes)
    }

    /// The string slice.
    #[allow(unsafe_code)]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor establishes that the bytes are UTF-8 (`from_utf8` checks,
        // `from_static` / `From<&str>` / `From<String>` start from `str`, `from_ascii` takes
        // bytes the caller checked are ASCII), and the bytes are immutable afterwards. This is
        // the one `unsafe` block of the workspace: `as_str` runs on every routed message, and
        // re-validating there showed in profiles.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

/// Hashes like `str`, as `Borrow<str>` requires (maps keyed by `ByteStr` can be queried with
/// `&str`).
impl std::hash::Hash for ByteStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl From<String> for ByteStr {
    fn from(s: String) -> Self {
        Self(Bytes::from(s.into_bytes()))
    }
}

impl From<&str> for ByteStr {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl Deref for ByteStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ByteStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ByteStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_by_str_find_byte_str_keys() {
        let mut set = std::collections::HashSet::new();
        set.insert(ByteStr::from("events.process"));
        assert!(set.contains("events.process"));
    }
}
