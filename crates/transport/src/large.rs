//! Buffers of their own for frames too large for a reader's buffer, recycled process-wide.
//!
//! A frame of [`LARGE_FRAME`] bytes or more is read into a buffer of exactly its size rather
//! than by growing the connection's read buffer (which would then be shared with the queued
//! frame and reallocated for the next one). Freeing such buffers as each message is written
//! gave every large message fresh pages: glibc hands allocations this large back to the
//! kernel (unmapped, or trimmed off the heap's top), and a 256 KiB message cost its reader
//! and the broker some 60 page faults each. Buffers therefore come from, and go back to, one
//! pool of the process, bounded in bytes ([`POOL_BYTES`]); when it is full, a released
//! buffer is freed.

use bytes::Bytes;
use parking_lot::Mutex;

/// Frames of at least this many bytes (prefix included) are read into a buffer of their own.
pub(crate) const LARGE_FRAME: usize = 64 * 1024;
/// Buffer capacities are rounded up to a multiple of this, so frames of similar sizes share
/// buffers.
const CLASS: usize = 64 * 1024;
/// Most bytes of spare buffers the process keeps.
pub(crate) const POOL_BYTES: usize = 8 << 20;
/// Buffers larger than this are never kept (a rare huge frame must not pin its memory).
const POOLED_MAX: usize = 2 << 20;

/// Spare buffers, bounded in bytes.
pub(crate) struct Pool(Mutex<Spare>);

struct Spare {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

/// The pool of the process.
pub(crate) static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Self {
        Self(Mutex::new(Spare {
            free: Vec::new(),
            bytes: 0,
        }))
    }

    /// An empty buffer with room for `len` bytes: a spare one that fits without wasting more
    /// than half of it, else a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let class = len.div_ceil(CLASS) * CLASS;
        {
            let mut spare = self.0.lock();
            let fits = |b: &Vec<u8>| b.capacity() >= len && b.capacity() <= 2 * class;
            if let Some(i) = spare.free.iter().rposition(fits) {
                let buf = spare.free.swap_remove(i);
                spare.bytes -= buf.capacity();
                return buf;
            }
        }
        Vec::with_capacity(class)
    }

    /// Shares a filled buffer as [`Bytes`] that give it back to this pool when the last of
    /// them drops.
    pub(crate) fn share(&'static self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Recycled { buf, pool: self })
    }

    fn give(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap > POOLED_MAX {
            return;
        }
        let mut spare = self.0.lock();
        if spare.bytes + cap <= POOL_BYTES {
            buf.clear();
            spare.bytes += cap;
            spare.free.push(buf);
        }
    }
}

/// A frame's buffer, given back to its pool when dropped.
struct Recycled {
    buf: Vec<u8>,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_share_drops_and_the_pool_stays_bounded() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let mut a = pool.take(300 * 1024);
        assert!(a.capacity() >= 300 * 1024 && a.capacity().is_multiple_of(CLASS));
        a.extend_from_slice(&[7u8; 300 * 1024]);
        let ptr = a.as_ptr();
        let whole = pool.share(a);
        let part = whole.slice(10..20);
        drop(whole);
        assert_eq!(&part[..], &[7u8; 10], "a slice keeps the buffer alive");
        assert_eq!(pool.0.lock().bytes, 0);
        drop(part);
        let again = pool.take(290 * 1024);
        assert_eq!(again.as_ptr(), ptr, "the released buffer is taken again");
        assert!(again.is_empty());
        // A buffer far larger than asked for is not used for a small frame.
        drop(pool.share(again));
        let small = pool.take(LARGE_FRAME);
        assert_ne!(small.as_ptr(), ptr);
        assert!(small.capacity() < 300 * 1024);
        // Huge buffers are never kept, and the pool never holds more than its bound.
        drop(pool.share(pool.take(POOLED_MAX + 1)));
        assert_eq!(pool.0.lock().bytes, 320 * 1024);
        let many: Vec<Bytes> = (0..(POOL_BYTES / CLASS + 8))
            .map(|_| pool.share(pool.take(CLASS)))
            .collect();
        drop(many);
        let spare = pool.0.lock();
        assert!(spare.bytes <= POOL_BYTES);
        assert_eq!(
            spare.bytes,
            spare.free.iter().map(Vec::capacity).sum::<usize>()
        );
    }
}
