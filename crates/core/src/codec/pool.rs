//! Recycled buffers for the copies of small frames.
//!
//! Every small frame read from a socket is copied into a buffer of its own (so a queued
//! message holds exactly its bytes, never a whole read buffer). Allocating those buffers from
//! the general-purpose allocator was the broker's largest single cost: a read of 256 KiB makes
//! hundreds of them at once, and the writer frees them in a burst, which defeats the
//! allocator's per-thread caches. Buffers are therefore taken from, and given back to, a
//! small per-thread pool, sorted by size class.

use bytes::Bytes;
use std::cell::RefCell;

/// Size classes are multiples of this many bytes.
const CLASS: usize = 64;
/// Frames up to this size are copied into pooled buffers; larger ones get a fresh allocation
/// (their copy costs more than the allocation).
pub(crate) const POOLED_MAX: usize = 1024;
const CLASSES: usize = POOLED_MAX / CLASS;
/// Most bytes of spare buffers one thread keeps.
const POOL_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Pool {
    free: [Vec<Vec<u8>>; CLASSES],
    bytes: usize,
}

impl Pool {
    fn take(&mut self, class: usize) -> Option<Vec<u8>> {
        let buf = self.free[class].pop()?;
        self.bytes -= buf.capacity();
        Some(buf)
    }

    fn give(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap == 0
            || !cap.is_multiple_of(CLASS)
            || cap > POOLED_MAX
            || self.bytes + cap > POOL_BYTES
        {
            return;
        }
        buf.clear();
        self.bytes += cap;
        self.free[cap / CLASS - 1].push(buf);
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

/// A pooled buffer: given back to the pool of the thread that drops it.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // During thread exit the pool may be gone: the buffer is then simply freed.
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                p.give(buf);
            }
        });
    }
}

/// Copies `src` into a buffer of its own, recycled through the pool when `src` is small.
pub(crate) fn copy(src: &[u8]) -> Bytes {
    if src.is_empty() || src.len() > POOLED_MAX {
        return Bytes::copy_from_slice(src);
    }
    let class = (src.len() - 1) / CLASS;
    let spare = POOL
        .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take(class)))
        .ok()
        .flatten();
    let mut buf = spare.unwrap_or_else(|| Vec::with_capacity((class + 1) * CLASS));
    buf.extend_from_slice(src);
    Bytes::from_owner(Pooled(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled_bytes() -> usize {
        POOL.with_borrow(|p| p.bytes)
    }

    #[test]
    fn buffers_come_back_and_are_reused_with_their_contents_replaced() {
        let a = copy(&[1u8; 100]);
        assert_eq!(&a[..], &[1u8; 100]);
        let before = pooled_bytes();
        drop(a);
        assert_eq!(
            pooled_bytes(),
            before + 128,
            "the 128-byte class buffer came back"
        );
        let b = copy(&[2u8; 120]);
        assert_eq!(&b[..], &[2u8; 120]);
        assert_eq!(pooled_bytes(), before, "and was taken again");
        let slice = b.slice(10..20);
        drop(b);
        assert_eq!(pooled_bytes(), before, "a live slice keeps the buffer");
        assert_eq!(&slice[..], &[2u8; 10]);
        drop(slice);
        assert_eq!(pooled_bytes(), before + 128);
    }

    #[test]
    fn large_and_empty_copies_bypass_the_pool_and_the_pool_is_bounded() {
        let before = pooled_bytes();
        drop(copy(&[0u8; POOLED_MAX + 1]));
        drop(copy(&[]));
        assert_eq!(pooled_bytes(), before);
        let many: Vec<Bytes> = (0..2 * POOL_BYTES / POOLED_MAX)
            .map(|_| copy(&[3u8; POOLED_MAX]))
            .collect();
        drop(many);
        assert!(pooled_bytes() <= POOL_BYTES);
    }
}
