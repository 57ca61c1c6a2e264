//! The log across reopenings: what was written comes back, a torn tail is truncated, damage
//! elsewhere is set aside, space is given back a segment at a time; the on-disk bytes are
//! pinned by a golden test (`docs/storage.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use daemoneye_eventbus_store::{Log, LogOptions, Record, StoreError};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "eb-store-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    TempDir(p.join("log"))
}

type Owned = (u64, u8, Vec<u8>);

fn open(dir: &Path, segment_bytes: u64) -> (Log, Vec<Owned>, daemoneye_eventbus_store::Recovery) {
    let mut seen = Vec::new();
    let (log, recovery) = Log::open(dir, LogOptions { segment_bytes }, |r: Record<'_>| {
        seen.push((r.seq, r.kind, r.body.to_vec()));
    })
    .unwrap();
    (log, seen, recovery)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_come_back_in_order_across_segments_and_reopenings() {
    let dir = temp_dir();
    let (mut log, seen, rec) = open(&dir.0, 200);
    assert!(seen.is_empty() && rec.records == 0);
    let written: Vec<Owned> = (0..20u8)
        .map(|i| {
            let body = vec![i; usize::from(i) * 7];
            (log.append(i % 3, &body).unwrap(), i % 3, body)
        })
        .collect();
    assert_eq!(written[0].0, 0);
    assert_eq!(written[19].0, 19);
    log.sync().unwrap();
    assert!(log.segments().count() > 3, "small segments roll");
    let bytes = log.bytes();
    drop(log);
    let (mut log, seen, rec) = open(&dir.0, 200);
    assert_eq!(seen, written);
    assert_eq!((rec.records, rec.torn_bytes, rec.damaged.len()), (20, 0, 0));
    assert_eq!(log.bytes(), bytes);
    // Sequence numbers go on where they stopped.
    assert_eq!(log.append(9, b"more").unwrap(), 20);
    log.flush().unwrap();
    drop(log);
    let (_, seen, _) = open(&dir.0, 200);
    assert_eq!(seen.len(), 21);
}

#[test]
fn whole_segments_are_given_back() {
    let dir = temp_dir();
    let (mut log, _, _) = open(&dir.0, 100);
    for i in 0..12u64 {
        log.append(1, &[0; 40]).unwrap();
        assert_eq!(log.next_seq(), i + 1);
    }
    log.flush().unwrap();
    let segs: Vec<_> = log.segments().collect();
    assert!(segs.len() >= 4, "{segs:?}");
    // Records below 5: only segments that end at or before it go.
    let freed = log.remove_segments_before(5).unwrap();
    assert!(freed > 0);
    assert!(log.segments().all(|s| s.end_seq > 5 || s.first_seq >= 5));
    let oldest = log.remove_oldest_segment().unwrap().unwrap();
    assert!(oldest.first_seq < oldest.end_seq);
    while log.remove_oldest_segment().unwrap().is_some() {}
    assert_eq!(log.segments().count(), 1, "always one to append to");
    assert_eq!(log.append(1, b"x").unwrap(), 12);
    log.flush().unwrap();
    drop(log);
    let (_, seen, _) = open(&dir.0, 100);
    assert_eq!(seen, [(12, 1, b"x".to_vec())]);
}

#[test]
fn a_torn_tail_is_truncated_and_damage_elsewhere_set_aside() {
    let dir = temp_dir();
    let (mut log, _, _) = open(&dir.0, 150);
    for i in 0..9u8 {
        log.append(0, &[i; 50]).unwrap();
    }
    log.flush().unwrap();
    drop(log);
    let files = segment_files(&dir.0);
    assert!(files.len() >= 3);
    // The last segment loses its last 10 bytes (a cut write); a byte of the first flips.
    let last = files.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let mut first = std::fs::read(&files[0]).unwrap();
    let at = first.len() - 5;
    first[at] ^= 0xFF;
    std::fs::write(&files[0], &first).unwrap();
    let (mut log, seen, rec) = open(&dir.0, 150);
    // The first segment's last record and the cut one are gone; the rest come back.
    assert_eq!(rec.torn_bytes, 50 + 18 - 10);
    assert_eq!(rec.damaged.len(), 1);
    let d = &rec.damaged[0];
    assert_eq!(d.reason, "checksum mismatch");
    assert!(d.moved_to.exists(), "kept for inspection");
    assert_eq!(d.lost_bytes, 68);
    assert_eq!(seen.len(), 9 - 2);
    assert!(
        seen.iter()
            .all(|(seq, _, body)| body == &vec![*seq as u8; 50])
    );
    // Appends go on after the truncation, and nothing is damaged any more.
    log.append(0, b"after").unwrap();
    log.flush().unwrap();
    drop(log);
    let (_, again, rec) = open(&dir.0, 150);
    assert_eq!(again.len(), 8);
    assert_eq!((rec.torn_bytes, rec.damaged.len()), (0, 0));
}

#[test]
fn a_newer_format_is_refused_and_a_log_has_one_owner() {
    let dir = temp_dir();
    let (mut log, _, _) = open(&dir.0, 1 << 20);
    log.append(0, b"x").unwrap();
    log.flush().unwrap();
    let e = Log::open(&dir.0, LogOptions::default(), |_| {}).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    drop(log);
    let file = segment_files(&dir.0).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8] = 2;
    std::fs::write(&file, &bytes).unwrap();
    let e = Log::open(&dir.0, LogOptions::default(), |_| {}).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::NewerFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("newer than the format 1"), "{e}");
}

/// The bytes of a segment holding two records, as `docs/storage.md` shows them.
#[test]
fn golden_segment() {
    let dir = temp_dir();
    let (mut log, _, _) = open(&dir.0, 1 << 20);
    log.append(1, b"ab").unwrap();
    log.append(2, b"").unwrap();
    log.flush().unwrap();
    let files = segment_files(&dir.0);
    assert_eq!(
        files[0].file_name().unwrap().to_str().unwrap(),
        "00000000000000000000.log"
    );
    let hex: Vec<String> = std::fs::read(&files[0])
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex.join(" "),
        "44 45 42 55 53 4c 4f 47 01 00 00 00 00 00 00 00 \
         10 00 00 00 48 c8 a3 9e 01 01 00 00 00 00 00 00 00 00 61 62 \
         0e 00 00 00 88 2c 26 8c 01 02 01 00 00 00 00 00 00 00"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random appends, then the last segment cut at a random length: exactly the whole records
    /// written before the cut come back, and the next append follows the last of them.
    #[test]
    fn recovery_keeps_exactly_the_whole_records_before_a_cut(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..40),
        segment_bytes in 64u64..600,
        cut in any::<proptest::sample::Index>(),
    ) {
        let dir = temp_dir();
        let (mut log, _, _) = open(&dir.0, segment_bytes);
        let written: Vec<Owned> = bodies
            .into_iter()
            .map(|b| (log.append(7, &b).unwrap(), 7, b))
            .collect();
        log.flush().unwrap();
        drop(log);
        let last = segment_files(&dir.0).pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len() as usize;
        let keep = cut.index(len + 1);
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(keep as u64).unwrap();
        // What the last segment holds whole after the cut.
        let bytes = std::fs::read(&last).unwrap();
        let (mut whole, mut at) = (0usize, 16usize);
        while let Ok((_, n)) = daemoneye_eventbus_store::record::read_record(bytes.get(at..).unwrap_or(&[])) {
            whole += 1;
            at += n;
        }
        let in_last = written.iter().filter(|w| {
            let first: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            w.0 >= first
        }).count();
        let expected = written.len() - in_last + whole;
        let (mut log, seen, rec) = open(&dir.0, segment_bytes);
        prop_assert_eq!(&seen[..], &written[..expected]);
        prop_assert!(rec.damaged.is_empty());
        prop_assert_eq!(rec.records as usize, expected);
        let next = log.append(7, b"next").unwrap();
        prop_assert!(expected == 0 || next > written[expected - 1].0);
    }
}

/// A full disk at a segment's end loses no record: the new segment that cannot be made is
/// made later, the records go on in the last one, and every flush that failed is made good
/// by the next. Needs root (a small tmpfs is mounted).
#[test]
fn a_full_disk_at_a_segment_boundary_loses_no_record() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let tmp = temp_dir();
    let mnt = tmp.0.parent().unwrap().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }
    let _unmount = Unmount(mnt.clone());
    let dir = mnt.join("log");
    let (mut log, seen, _) = open(&dir, 8 * 1024);
    assert!(seen.is_empty());
    let body = vec![7u8; 1000];
    for _ in 0..5 {
        log.append(1, &body).unwrap();
    }
    log.flush().unwrap();
    // Fill the disk.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut f, &[0u8; 4096]).is_ok() {}
    drop(f);
    // Past the segment's end while no segment can be made, and no write succeeds.
    let mut failed = 0;
    for _ in 5..20 {
        log.append(1, &body).unwrap();
        failed += usize::from(log.flush().is_err());
    }
    assert!(failed > 0, "the disk was full");
    std::fs::remove_file(&filler).unwrap();
    for _ in 20..25 {
        log.append(1, &body).unwrap();
    }
    log.sync().unwrap();
    assert!(
        segment_files(&dir).len() >= 2,
        "segments were made once there was room"
    );
    drop(log);
    let (_, seen, recovery) = open(&dir, 8 * 1024);
    assert_eq!(recovery.torn_bytes, 0);
    let seqs: Vec<u64> = seen.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(seqs, (0..25).collect::<Vec<_>>());
}

/// Something other than a regular file under a segment's name (a pipe, whose reading would
/// block the start for ever; a link; a directory) is set aside, never read.
#[cfg(unix)]
#[test]
fn what_is_not_a_regular_file_is_set_aside_unread() {
    let dir = temp_dir();
    let (mut log, _, _) = open(&dir.0, 150);
    for i in 0..3u8 {
        log.append(0, &[i; 50]).unwrap();
    }
    log.flush().unwrap();
    drop(log);
    let name = |n: u64| dir.0.join(format!("{n:020}.log"));
    let status = std::process::Command::new("mkfifo")
        .arg(name(1000))
        .status()
        .unwrap();
    assert!(status.success());
    std::os::unix::fs::symlink("/etc/passwd", name(1001)).unwrap();
    std::fs::create_dir(name(1002)).unwrap();
    // Bounded: reading the pipe would never return.
    let (tx, rx) = std::sync::mpsc::channel();
    let at = dir.0.clone();
    std::thread::spawn(move || {
        let (_, seen, rec) = open(&at, 150);
        let _ = tx.send((seen, rec));
    });
    let (seen, rec) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the log opened");
    assert_eq!(seen.len(), 3);
    assert_eq!(rec.damaged.len(), 3, "{:?}", rec.damaged);
    for d in &rec.damaged {
        assert_eq!((d.reason, d.lost_bytes), ("not a regular file", 0));
        assert!(d.moved_to.to_string_lossy().contains(".damaged"), "{d:?}");
    }
    assert!(
        std::fs::read_to_string("/etc/passwd").is_ok(),
        "the link's target is untouched"
    );
}
