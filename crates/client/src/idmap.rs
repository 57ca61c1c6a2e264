//! Maps keyed by the client's own sequential numbers (call numbers, subscription ids).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes sequential `u64` keys with one multiplication: the default SipHash costs more than
/// the rest of a map operation, and these keys are ours, not an attacker's.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing spreads sequential numbers over the high bits the table uses; a
        // key of several numbers (a message id) folds each in.
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by sequential numbers, hashed with [`IdHasher`].
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The hasher of [`IdHasher`], for maps and sets of other sequential keys (message ids).
pub(crate) type IdBuild = BuildHasherDefault<IdHasher>;
