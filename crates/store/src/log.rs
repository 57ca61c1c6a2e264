//! The log's files: recovery, appends, rolling segments, syncing, giving space back.

use crate::StoreError;
use crate::dir::ensure_private_dir;
use crate::record::{
    Bad, FORMAT_VERSION, HEADER_LEN, Header, MAX_BODY, RECORD_HEAD, Record, check_header,
    put_header, put_record, read_record,
};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Settings of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A segment takes no more records once it holds this many bytes (a record larger than
    /// this gets a segment of its own). Default 64 MiB.
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One segment: its records' sequence numbers and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The first record's sequence number (the file's name).
    pub first_seq: u64,
    /// One past the last record's sequence number (`first_seq` when it holds none).
    pub end_seq: u64,
    /// Its size on disk, header included (records still buffered included).
    pub bytes: u64,
}

/// What opening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records read back.
    pub records: u64,
    /// Bytes of a record cut short at the end of the last segment, truncated.
    pub torn_bytes: u64,
    /// Segments damaged elsewhere, moved aside.
    pub damaged: Vec<Damaged>,
}

/// A damaged segment, moved aside: the records before the damage were kept (written again
/// under the segment's name), the rest could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// Where the damaged file is now.
    pub moved_to: PathBuf,
    /// Bytes that could not be read from it.
    pub lost_bytes: u64,
    /// What was wrong.
    pub reason: &'static str,
}

struct Segment {
    info: SegmentInfo,
    path: PathBuf,
}

/// An open log. See the crate documentation.
pub struct Log {
    dir: PathBuf,
    options: LogOptions,
    /// In order; the last is the one appended to.
    segments: Vec<Segment>,
    file: File,
    /// Bytes of `file` written (the active segment without what `buf` holds).
    file_len: u64,
    /// Records appended and not yet written.
    buf: Vec<u8>,
    next_seq: u64,
    /// Segments rolled over and not yet synced.
    unsynced: Vec<File>,
    /// A segment was made or removed since the directory was last synced.
    dir_dirty: bool,
    #[cfg(unix)]
    _lock: nix::fcntl::Flock<File>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

impl Log {
    /// Opens the log in `dir` (made if missing, private), handing every record to `visit` in
    /// order; a log that does not exist yet is created empty.
    ///
    /// # Errors
    ///
    /// An unsafe or locked directory, a segment of a newer format, or an I/O error. Damage is
    /// not an error: it is repaired and reported in the [`Recovery`].
    pub fn open(
        dir: &Path,
        options: LogOptions,
        mut visit: impl FnMut(Record<'_>),
    ) -> Result<(Self, Recovery), StoreError> {
        ensure_private_dir(dir)?;
        #[cfg(unix)]
        let lock = lock(dir)?;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        let mut recovery = Recovery::default();
        for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let path = entry.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<u64>().ok());
            let Some(first) = first else { continue };
            // Only a regular file is read: a pipe would block the start for ever, a link
            // could lead anywhere, a directory is no segment.
            let regular = entry
                .file_type()
                .map_err(|e| StoreError::io(&path, e))?
                .is_file();
            if regular {
                found.push((first, path));
            } else {
                recovery.damaged.push(Damaged {
                    moved_to: set_aside(&path)?,
                    lost_bytes: 0,
                    reason: "not a regular file",
                });
            }
        }
        found.sort_unstable();
        let mut segments: Vec<Segment> = Vec::new();
        let mut next_seq = found.first().map_or(0, |(first, _)| *first);
        let last = found.len().saturating_sub(1);
        // A reader thread reads the next segment while this one checks and hands out the
        // records of the last (recovery takes about half the time it would in turn).
        std::thread::scope(|scope| -> Result<(), StoreError> {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || {
                for (first, path) in found {
                    let read = std::fs::read(&path);
                    if tx.send((first, path, read)).is_err() {
                        return;
                    }
                }
            });
            for (i, (first, path, read)) in rx.into_iter().enumerate() {
                let bytes = bytes::Bytes::from(read.map_err(|e| StoreError::io(&path, e))?);
                match check_header(&bytes) {
                    Header::Valid => {}
                    Header::Newer(found) => {
                        return Err(StoreError::NewerFormat {
                            path,
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                    Header::Invalid if i == last && bytes.len() < HEADER_LEN => {
                        // Made, then the crash came before its header was written.
                        recovery.torn_bytes += bytes.len() as u64;
                        std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                        continue;
                    }
                    Header::Invalid => {
                        let moved_to = set_aside(&path)?;
                        recovery.damaged.push(Damaged {
                            moved_to,
                            lost_bytes: bytes.len() as u64,
                            reason: "not a segment header",
                        });
                        continue;
                    }
                }
                next_seq = next_seq.max(first);
                let (mut at, mut end_seq) = (HEADER_LEN, first);
                let mut bad = None;
                while at < bytes.len() {
                    match read_record(&bytes[at..]) {
                        Ok((r, _)) if r.seq < end_seq => {
                            bad = Some(Bad::Corrupt("sequence number out of order"));
                            break;
                        }
                        Ok((r, n)) => {
                            visit(r.backed(&bytes));
                            recovery.records += 1;
                            end_seq = r.seq + 1;
                            at += n;
                        }
                        Err(b) => {
                            bad = Some(b);
                            break;
                        }
                    }
                }
                if let Some(b) = bad {
                    let lost = (bytes.len() - at) as u64;
                    if i == last {
                        // A write the crash cut short (or never finished): truncated.
                        recovery.torn_bytes += lost;
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| StoreError::io(&path, e))?;
                        f.set_len(at as u64).map_err(|e| StoreError::io(&path, e))?;
                        f.sync_all().map_err(|e| StoreError::io(&path, e))?;
                    } else {
                        let moved_to = set_aside(&path)?;
                        write_file(&path, &bytes[..at])?;
                        recovery.damaged.push(Damaged {
                            moved_to,
                            lost_bytes: lost,
                            reason: match b {
                                Bad::Cut => "a record cut short inside the log",
                                Bad::Corrupt(why) => why,
                            },
                        });
                    }
                }
                next_seq = next_seq.max(end_seq);
                segments.push(Segment {
                    info: SegmentInfo {
                        first_seq: first,
                        end_seq,
                        bytes: at as u64,
                    },
                    path,
                });
            }
            Ok(())
        })?;
        let file = match segments.last() {
            Some(s) => OpenOptions::new()
                .append(true)
                .open(&s.path)
                .map_err(|e| StoreError::io(&s.path, e))?,
            None => {
                let (segment, file) = new_segment(dir, next_seq)?;
                segments.push(segment);
                file
            }
        };
        let file_len = segments.last().map_or(0, |s| s.info.bytes);
        let log = Self {
            dir: dir.to_path_buf(),
            options,
            segments,
            file,
            file_len,
            buf: Vec::new(),
            next_seq,
            unsynced: Vec::new(),
            dir_dirty: true,
            #[cfg(unix)]
            _lock: lock,
        };
        Ok((log, recovery))
    }

    /// Appends a record of `kind`; returns its sequence number. Buffered until
    /// [`Log::flush`] or [`Log::sync`]. A new segment that cannot be made now (a full disk)
    /// is left to a later append: the record goes on in the current one.
    ///
    /// # Errors
    ///
    /// [`StoreError::TooLarge`].
    pub fn append(&mut self, kind: u8, body: &[u8]) -> Result<u64, StoreError> {
        if body.len() > MAX_BODY {
            return Err(StoreError::TooLarge {
                len: body.len(),
                max: MAX_BODY,
            });
        }
        let size = (RECORD_HEAD + body.len()) as u64;
        let active = &self.segments.last().expect("a log has a segment").info;
        if active.end_seq > active.first_seq && active.bytes + size > self.options.segment_bytes {
            // A segment that cannot be made now (a full disk) is made by a later append: the
            // record goes on in this one, so that it is written with the next flush.
            let _deferred = self.roll();
        }
        let seq = self.next_seq;
        put_record(&mut self.buf, seq, kind, body);
        self.next_seq += 1;
        let active = &mut self.segments.last_mut().expect("a log has a segment").info;
        active.end_seq = self.next_seq;
        active.bytes += size;
        Ok(seq)
    }

    /// Writes what is buffered to the operating system: it survives this process being
    /// killed.
    ///
    /// # Errors
    ///
    /// The write failed (the disk is full: [`StoreError::is_full`]); what was buffered is
    /// kept, to be written by the next call.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self.segments.last().expect("a log has a segment").path;
        if let Err(e) = self.file.write_all(&self.buf) {
            // Part of it may be in the file: cut back, so that the next attempt writes whole
            // records after whole records.
            let _ = self.file.set_len(self.file_len);
            return Err(StoreError::io(path, e));
        }
        self.file_len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// [`Log::flush`], then makes every write durable on the disk (segments and the
    /// directory): it survives a power loss.
    ///
    /// # Errors
    ///
    /// As [`Log::flush`], or the disk refused to sync.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        let path = &self.segments.last().expect("a log has a segment").path;
        self.file.sync_data().map_err(|e| StoreError::io(path, e))?;
        for f in self.unsynced.drain(..) {
            f.sync_data().map_err(|e| StoreError::io(&self.dir, e))?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// [`Log::sync`] in two steps, so that the wait for the disk can happen elsewhere (a
    /// blocking thread) while the log goes on being used: writes what is buffered now, and
    /// returns what must be synced for it to be on the disk.
    ///
    /// # Errors
    ///
    /// As [`Log::flush`], or the segment could not be opened again for the sync.
    pub fn flush_for_sync(&mut self) -> Result<SyncJob, StoreError> {
        self.flush()?;
        let path = &self.segments.last().expect("a log has a segment").path;
        let mut files = std::mem::take(&mut self.unsynced);
        files.push(self.file.try_clone().map_err(|e| StoreError::io(path, e))?);
        Ok(SyncJob {
            files,
            dir: self.dir.clone(),
            sync_dir: std::mem::take(&mut self.dir_dirty),
        })
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes of every segment (records still buffered included).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.info.bytes).sum()
    }

    /// The segments, oldest first; the last is the one appended to.
    pub fn segments(&self) -> impl Iterator<Item = SegmentInfo> + '_ {
        self.segments.iter().map(|s| s.info)
    }

    /// Removes every segment but the one appended to whose records all have sequence numbers
    /// below `seq`; returns the bytes given back.
    ///
    /// # Errors
    ///
    /// An I/O error removing a file (the segments before it are gone).
    pub fn remove_segments_before(&mut self, seq: u64) -> Result<u64, StoreError> {
        let mut freed = 0;
        while self.segments.len() > 1 && self.segments[0].info.end_seq <= seq {
            freed += self.remove_first()?.bytes;
        }
        Ok(freed)
    }

    /// Removes the oldest segment, whatever it holds (to keep the log within a size); the
    /// segment appended to is first closed, so that this never leaves the log without one.
    /// Returns what it held, or `None` when the log holds no record.
    ///
    /// # Errors
    ///
    /// An I/O error.
    pub fn remove_oldest_segment(&mut self) -> Result<Option<SegmentInfo>, StoreError> {
        let first = &self.segments[0].info;
        if first.end_seq == first.first_seq && self.segments.len() == 1 {
            return Ok(None);
        }
        if self.segments.len() == 1 {
            self.roll()?;
        }
        self.remove_first().map(Some)
    }

    /// Closes the segment appended to, when it holds records, and starts the next: what
    /// is appended from now on is not in the segments before.
    ///
    /// # Errors
    ///
    /// As [`Log::flush`], or the new segment could not be made.
    pub fn start_segment(&mut self) -> Result<(), StoreError> {
        let active = &self.segments.last().expect("a log has a segment").info;
        if active.end_seq == active.first_seq {
            return Ok(());
        }
        self.roll()
    }

    fn remove_first(&mut self) -> Result<SegmentInfo, StoreError> {
        let s = self.segments.remove(0);
        std::fs::remove_file(&s.path).map_err(|e| StoreError::io(&s.path, e))?;
        self.dir_dirty = true;
        Ok(s.info)
    }

    /// Closes the segment appended to and starts the next.
    fn roll(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        let (segment, file) = new_segment(&self.dir, self.next_seq)?;
        self.file_len = segment.info.bytes;
        let old = std::mem::replace(&mut self.file, file);
        self.unsynced.push(old);
        self.segments.push(segment);
        self.dir_dirty = true;
        Ok(())
    }
}

/// What a [`Log::flush_for_sync`] left to sync: segments, and the directory when segments were
/// made or removed.
#[derive(Debug)]
pub struct SyncJob {
    files: Vec<File>,
    /// The log's directory, synced too when `sync_dir`.
    dir: PathBuf,
    sync_dir: bool,
}

impl SyncJob {
    /// Waits for the disk (blocking: run it where blocking is allowed).
    ///
    /// # Errors
    ///
    /// The disk refused to sync.
    pub fn run(self) -> Result<(), StoreError> {
        for f in &self.files {
            f.sync_data().map_err(|e| StoreError::io(&self.dir, e))?;
        }
        if self.sync_dir {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn new_segment(dir: &Path, first_seq: u64) -> Result<(Segment, File), StoreError> {
    let path = dir.join(segment_name(first_seq));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    put_header(&mut header);
    if let Err(e) = file.write_all(&header) {
        // Not left half made: the name is free for the next attempt.
        let _ = std::fs::remove_file(&path);
        return Err(StoreError::io(&path, e));
    }
    let info = SegmentInfo {
        first_seq,
        end_seq: first_seq,
        bytes: HEADER_LEN as u64,
    };
    Ok((Segment { info, path }, file))
}

/// Renames a damaged file out of the log's way (`NAME.damaged`, or `NAME.damaged.N`).
fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let mut to = path.with_extension("log.damaged");
    let mut n = 1;
    while to.exists() {
        to = path.with_extension(format!("log.damaged.{n}"));
        n += 1;
    }
    std::fs::rename(path, &to).map_err(|e| StoreError::io(path, e))?;
    Ok(to)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(|e| StoreError::io(path, e))?;
    f.write_all(bytes).map_err(|e| StoreError::io(path, e))?;
    f.sync_all().map_err(|e| StoreError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(unix)]
fn lock(dir: &Path) -> Result<nix::fcntl::Flock<File>, StoreError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    // A process killed a moment ago still holds it until the kernel has closed its files:
    // asked again for up to two seconds before it counts as held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StoreError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err((_, errno)) => return Err(StoreError::io(&path, errno.into())),
        }
    }
}
