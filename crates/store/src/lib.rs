//! A segmented, append-only log of checksummed records that survives a killed process, and
//! with `fsync` a power loss: what the broker keeps durable subscriptions in, and what a
//! client spools Processed publishes to while its broker is away.
//!
//! A log is a private directory of segment files, each named by the sequence number of its
//! first record and holding records up to about [`LogOptions::segment_bytes`]. A record is
//! framed with its length, a CRC-32C and a format version ([`record`], normative in
//! `docs/storage.md`). Opening a log reads every record back ([`Log::open`]); a record cut
//! short at the end of the last segment (a write the crash interrupted) is truncated and
//! counted, and a segment damaged anywhere else keeps its valid records and is moved aside,
//! reported, so that a damaged file never stops its owner from starting. Space is given back
//! a whole segment at a time ([`Log::remove_segments_before`], [`Log::remove_oldest_segment`]).
//!
//! [`Log::append`] buffers, [`Log::flush`] writes what is buffered to the operating system
//! (enough for a process that is killed), [`Log::sync`] also makes it durable on the disk
//! (enough for a power loss). When to call which is the owner's fsync policy.

mod dir;
mod log;
pub mod record;

pub use dir::{ensure_private_dir, open_regular, read_regular};
pub use log::{Damaged, Log, LogOptions, Recovery, SegmentInfo, SyncJob};
pub use record::Record;

use std::path::{Path, PathBuf};

/// What can go wrong with a log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed (a full disk is `ErrorKind::StorageFull`).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The directory could be changed by someone else, or is not a plain directory.
    #[error("data directory {path} is not safe to use: {reason}")]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong, and what to do about it.
        reason: String,
    },
    /// Another process holds the log.
    #[error(
        "data directory {path} is in use by another process (its LOCK file is held); stop it or use another directory"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// A segment was written by a newer build.
    #[error(
        "{path} was written in storage format {found}, newer than the format {supported} this build reads; run a newer build, or move the data directory aside"
    )]
    NewerFormat {
        /// The segment.
        path: PathBuf,
        /// Its format version.
        found: u32,
        /// The version this build reads.
        supported: u8,
    },
    /// A record over [`record::MAX_BODY`].
    #[error("a record of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Its body's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the disk (or the user's quota) is full.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }
}
