//! The audit trail (`broker.audit_log`): control actions, ACL denials, policy reloads, refused
//! connections and the first connection of each identity, one JSON record per line, each
//! chained to the one before by SHA-256, so that a changed byte, a removed, reordered or
//! inserted record, or a file cut short shows.
//!
//! A record is `{"seq":N,"time_ms":T,"prev":"HEX","event":{…},"hash":"HEX"}`: `seq` counts from
//! 1 across files, `prev` is the previous record's `hash` (64 zeros before the first), and
//! `hash` is the SHA-256 of the line without its `"hash"` field, i.e. of
//! `{"seq":N,"time_ms":T,"prev":"HEX","event":{…}}` (the event's keys sorted). Files are
//! rotated by size (`audit.log` → `audit.log.1`, `.2`, …, the newest the highest), the chain
//! going on across them.
//!
//! [`Chain`] and [`verify`] are pure; `AuditLog` is the writer: a thread of its own, fed
//! through a bounded queue (full: the record is dropped, counted, and the next record written
//! says how many went), writing each batch then syncing it once.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records waiting for the writer at most; more are dropped, counted.
pub const QUEUE: usize = 4096;

#[derive(Serialize)]
struct Unsealed<'a> {
    seq: u64,
    time_ms: u64,
    prev: &'a str,
    event: &'a serde_json::Value,
}

/// One record as read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Its number, from 1 across files.
    pub seq: u64,
    /// When it was written, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The previous record's hash.
    pub prev: String,
    /// What happened.
    pub event: serde_json::Value,
    /// SHA-256 of the record without this field.
    pub hash: String,
}

impl Record {
    /// The hash this record should carry.
    fn expected_hash(&self) -> String {
        seal_hash(self.seq, self.time_ms, &self.prev, &self.event)
    }
}

fn seal_hash(seq: u64, time_ms: u64, prev: &str, event: &serde_json::Value) -> String {
    let body = serde_json::to_vec(&Unsealed {
        seq,
        time_ms,
        prev,
        event,
    })
    .unwrap_or_default();
    hex(&Sha256::digest(&body))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The head of a chain: the last record's number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The last record's `seq` (0: none yet).
    pub seq: u64,
    /// The last record's `hash` ([`GENESIS`]: none yet).
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.into(),
        }
    }
}

/// Seals records one after another (pure).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    head: Head,
}

impl Chain {
    /// A chain going on after `head`.
    pub fn after(head: Head) -> Self {
        Self { head }
    }

    /// The last record sealed.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Seals `event` at `time_ms` as the next record: its line (without a newline).
    pub fn seal(&mut self, time_ms: u64, event: serde_json::Value) -> String {
        let seq = self.head.seq + 1;
        let hash = seal_hash(seq, time_ms, &self.head.hash, &event);
        let record = Record {
            seq,
            time_ms,
            prev: std::mem::replace(&mut self.head.hash, hash.clone()),
            event,
            hash,
        };
        self.head.seq = seq;
        serde_json::to_string(&record).unwrap_or_default()
    }
}

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {why}")]
pub struct Broken {
    /// The file.
    pub file: String,
    /// The line (from 1).
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

/// What [`verify`] found in an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records read.
    pub records: u64,
    /// The last one.
    pub head: Head,
}

/// Checks the chain through `files`, given oldest first (their lines, and a name for each to
/// report): every line a whole record whose hash is right, numbered one after the previous,
/// linked to its hash. The first record must be the first of the chain (`prev` = [`GENESIS`])
/// unless `anchored` (the files start later in the chain: older files were removed); with
/// `expect`, the chain must end at that head (so that records cut off the end show too).
///
/// # Errors
///
/// [`Broken`]: the first place where the chain does not hold.
pub fn verify<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
    anchored: bool,
    expect: Option<&Head>,
) -> Result<Verified, Broken> {
    let mut head: Option<Head> = None;
    let mut records = 0;
    let mut last = (String::new(), 0);
    for (file, text) in files {
        let broken = |line: usize, why: String| Broken {
            file: file.to_owned(),
            line,
            why,
        };
        if !text.is_empty() && !text.ends_with('\n') {
            let line = text.lines().count();
            return Err(broken(
                line,
                "the last record is cut short (truncated file)".into(),
            ));
        }
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let r: Record =
                serde_json::from_str(line).map_err(|e| broken(n, format!("not a record: {e}")))?;
            if r.hash != r.expected_hash() {
                return Err(broken(
                    n,
                    format!("record {} was changed (its hash does not match)", r.seq),
                ));
            }
            match &head {
                None if !anchored && (r.seq != 1 || r.prev != GENESIS) => {
                    return Err(broken(
                        n,
                        format!(
                            "the chain starts at record {} instead of 1 (records removed from its start?)",
                            r.seq
                        ),
                    ));
                }
                Some(h) if r.seq != h.seq + 1 => {
                    return Err(broken(
                        n,
                        format!(
                            "record {} follows record {} (records removed, inserted or reordered)",
                            r.seq, h.seq
                        ),
                    ));
                }
                Some(h) if r.prev != h.hash => {
                    return Err(broken(
                        n,
                        format!(
                            "record {} does not link to record {} (its prev is not that record's hash)",
                            r.seq, h.seq
                        ),
                    ));
                }
                _ => {}
            }
            records += 1;
            head = Some(Head {
                seq: r.seq,
                hash: r.hash,
            });
            last = (file.to_owned(), n);
        }
    }
    let head = head.unwrap_or_default();
    if let Some(e) = expect
        && *e != head
    {
        return Err(Broken {
            file: last.0,
            line: last.1,
            why: format!(
                "the chain ends at record {} but the broker's head is record {} (records cut off the end?)",
                head.seq, e.seq
            ),
        });
    }
    Ok(Verified { records, head })
}

/// The last whole record of `path` (`None`: no file or no record), and whether the file ends in
/// something that is not one.
fn last_record(path: &Path) -> std::io::Result<(Option<Record>, bool)> {
    let file = match daemoneye_eventbus_store::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, false)),
        Err(e) => return Err(e),
    };
    let mut last = None;
    let mut damaged = false;
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => {
                last = Some(r);
                damaged = false;
            }
            Err(_) => damaged = true,
        }
    }
    Ok((last, damaged))
}

/// Counts the audit trail keeps (shown in `BrokerStats`).
#[derive(Debug, Default)]
pub(crate) struct AuditCounts {
    pub(crate) records: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// The head, as `seq` and hash, updated after each sync.
    pub(crate) head: parking_lot::Mutex<Head>,
}

/// The writer side (see the module documentation).
pub(crate) struct AuditLog {
    tx: mpsc::SyncSender<serde_json::Value>,
    pub(crate) counts: Arc<AuditCounts>,
    /// Records dropped since the writer last said so.
    unreported: Arc<AtomicU64>,
}

/// How the writer rotates (`broker.audit_max_bytes`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rotation {
    pub(crate) max_bytes: u64,
}

impl AuditLog {
    /// Opens (or starts) the trail at `path`, going on from its last record, and starts the
    /// writer thread. A last line that is not a record (a crash mid-write) is cut off, and
    /// the first record written says so.
    pub(crate) fn open(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let (last, damaged) = last_record(path)?;
        let mut head = last.map_or_else(Head::default, |r| Head {
            seq: r.seq,
            hash: r.hash,
        });
        // A new file may follow rotated ones: the chain goes on from the newest.
        if head.seq == 0
            && let Some(rotated) = newest_rotated(path)?
            && let (Some(r), _) = last_record(&rotated)?
        {
            head = Head {
                seq: r.seq,
                hash: r.hash,
            };
        }
        if damaged {
            truncate_to_records(path)?;
        }
        let counts = Arc::new(AuditCounts::default());
        *counts.head.lock() = head.clone();
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let unreported = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.to_path_buf(),
            rotation,
            chain: Chain::after(head),
            counts: Arc::clone(&counts),
            unreported: Arc::clone(&unreported),
            file: open_append(path)?,
        };
        std::thread::Builder::new()
            .name("eventbus-audit".into())
            .spawn(move || writer.run(rx, damaged))?;
        Ok(Self {
            tx,
            counts,
            unreported,
        })
    }

    /// Queues `event` (never waits: a full queue drops it, counted).
    pub(crate) fn record(&self, event: serde_json::Value) {
        if self.tx.try_send(event).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            self.unreported.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// Cuts `path` back to its whole records.
fn truncate_to_records(path: &Path) -> std::io::Result<()> {
    let text = daemoneye_eventbus_store::read_regular(path)?;
    let mut keep = 0;
    for line in text.split_inclusive(|b| *b == b'\n') {
        if !line.ends_with(b"\n")
            || serde_json::from_slice::<Record>(&line[..line.len() - 1]).is_err()
        {
            break;
        }
        keep += line.len();
    }
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(keep as u64)?;
    f.sync_all()
}

/// The rotated file with the highest number (`audit.log.N`).
fn newest_rotated(path: &Path) -> std::io::Result<Option<PathBuf>> {
    Ok(rotated(path)?.pop())
}

/// The rotated files of `path`, oldest first.
pub fn rotated(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let n = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(name))
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            found.push((n, p));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

struct Writer {
    path: PathBuf,
    rotation: Rotation,
    chain: Chain,
    counts: Arc<AuditCounts>,
    unreported: Arc<AtomicU64>,
    file: File,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<serde_json::Value>, damaged: bool) {
        let mut batch = Vec::new();
        if damaged {
            batch.push(serde_json::json!({
                "kind": "trail_repaired",
                "detail": "the last line was not a whole record (the broker stopped mid-write) and was cut off",
            }));
            self.write(&mut batch);
        }
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let dropped = self.unreported.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                batch.push(serde_json::json!({"kind": "records_dropped", "count": dropped}));
            }
            self.write(&mut batch);
        }
    }

    fn write(&mut self, batch: &mut Vec<serde_json::Value>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut out = Vec::new();
        let n = batch.len() as u64;
        for event in batch.drain(..) {
            out.extend_from_slice(self.chain.seal(now, event).as_bytes());
            out.push(b'\n');
        }
        let written = self
            .file
            .write_all(&out)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.counts.records.fetch_add(n, Ordering::Relaxed);
                *self.counts.head.lock() = self.chain.head().clone();
            }
            Err(e) => {
                self.counts.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(file = %self.path.display(), error = %e, "could not write the audit trail");
            }
        }
        if let Err(e) = self.rotate_if_full() {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(file = %self.path.display(), error = %e, "could not rotate the audit trail");
        }
    }

    fn rotate_if_full(&mut self) -> std::io::Result<()> {
        if self.file.metadata()?.len() < self.rotation.max_bytes {
            return Ok(());
        }
        let next = newest_rotated(&self.path)?
            .and_then(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .and_then(|e| e.parse::<u64>().ok())
            })
            .map_or(1, |n| n + 1);
        let name = format!(
            "{}.{next}",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("audit.log")
        );
        std::fs::rename(&self.path, self.path.with_file_name(name))?;
        self.file = open_append(&self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(n: usize) -> String {
        let mut c = Chain::default();
        let mut s = String::new();
        for i in 0..n {
            s.push_str(&c.seal(1000 + i as u64, serde_json::json!({"kind": "test", "i": i})));
            s.push('\n');
        }
        s
    }

    #[test]
    fn an_intact_chain_verifies_and_every_kind_of_tampering_is_found() {
        let good = trail(5);
        let v = verify([("a", good.as_str())], false, None).unwrap();
        assert_eq!(v.records, 5);
        assert_eq!(v.head.seq, 5);
        let lines: Vec<&str> = good.lines().collect();
        let join = |l: &[&str]| l.iter().map(|x| format!("{x}\n")).collect::<String>();
        let why = |text: &str| verify([("a", text)], false, None).unwrap_err().to_string();
        // A changed byte.
        let changed = good.replacen("\"i\":2", "\"i\":7", 1);
        assert!(
            why(&changed).contains("record 3 was changed"),
            "{}",
            why(&changed)
        );
        // A removed record.
        let removed = join(&[lines[0], lines[1], lines[3], lines[4]]);
        assert!(why(&removed).contains("record 4 follows record 2"));
        // Reordered.
        let reordered = join(&[lines[0], lines[2], lines[1], lines[3], lines[4]]);
        assert!(why(&reordered).contains("record 3 follows record 1"));
        // Cut short in the middle of a record.
        let cut = &good[..good.len() - 10];
        assert!(why(cut).contains("cut short"));
        // Its start removed.
        let headless = join(&lines[2..]);
        assert!(why(&headless).contains("starts at record 3"));
        assert!(
            verify([("a", headless.as_str())], true, None).is_ok(),
            "anchored"
        );
        // Whole records cut off the end: found against the broker's head.
        let head = v.head.clone();
        let short = join(&lines[..4]);
        let e = verify([("a", short.as_str())], false, Some(&head)).unwrap_err();
        assert!(e.why.contains("cut off the end"), "{e}");
        // Across files, the chain goes on.
        let (one, two) = (join(&lines[..2]), join(&lines[2..]));
        assert_eq!(
            verify(
                [("1", one.as_str()), ("2", two.as_str())],
                false,
                Some(&head)
            )
            .unwrap()
            .records,
            5
        );
        assert!(verify([("2", two.as_str()), ("1", one.as_str())], false, None).is_err());
    }

    #[test]
    fn the_writer_goes_on_across_restarts_and_rotations() {
        let dir = std::env::temp_dir().join(format!("eb-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.log");
        let rotation = Rotation { max_bytes: 600 };
        for round in 0..3u64 {
            let log = AuditLog::open(&path, rotation).unwrap();
            for i in 0..5 {
                log.record(serde_json::json!({"kind": "test", "round": round, "i": i}));
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while log.counts.head.lock().seq < (round + 1) * 5 {
                assert!(std::time::Instant::now() < deadline, "written");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        // A crash mid-write: the tail is cut off at the next start, and said.
        {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(b"{\"seq\":16,\"ti").unwrap();
        }
        let log = AuditLog::open(&path, rotation).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.counts.head.lock().seq < 16 {
            assert!(std::time::Instant::now() < deadline, "the repair written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut files = rotated(&path).unwrap();
        assert!(!files.is_empty(), "rotated");
        files.push(path.clone());
        let texts: Vec<(String, String)> = files
            .iter()
            .map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap()))
            .collect();
        let head = log.counts.head.lock().clone();
        let v = verify(
            texts.iter().map(|(a, b)| (a.as_str(), b.as_str())),
            false,
            Some(&head),
        )
        .unwrap();
        assert_eq!(v.records, 16);
        let last = texts.last().unwrap().1.lines().last().unwrap().to_owned();
        assert!(last.contains("trail_repaired"), "{last}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
