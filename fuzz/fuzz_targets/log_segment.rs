//! Feeds arbitrary bytes to the disk log's reader, as a record stream and as the last segment
//! of a log that is opened: never a panic; every record read back is whole and checksummed;
//! opening truncates or sets aside whatever is not, and opening again finds nothing more to
//! repair.
#![no_main]

use daemoneye_eventbus_store::record::{HEADER_LEN, RECORD_HEAD, read_record};
use daemoneye_eventbus_store::{Log, LogOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As records, from the start.
    let mut at = 0;
    while let Ok((r, n)) = read_record(&data[at..]) {
        assert!(n >= RECORD_HEAD && at + n <= data.len());
        assert_eq!(r.body.len(), n - RECORD_HEAD);
        at += n;
    }

    // As a log's only segment (a valid header first, then the bytes).
    let dir = std::env::temp_dir().join(format!("eb-fuzz-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = Vec::with_capacity(HEADER_LEN + data.len());
    daemoneye_eventbus_store::record::put_header(&mut file);
    file.extend_from_slice(data);
    std::fs::write(dir.join("00000000000000000000.log"), &file).unwrap();
    let mut first = Vec::new();
    let (log, recovery) = Log::open(&dir, LogOptions::default(), |r| first.push(r.seq))
        .expect("a damaged log still opens");
    assert!(first.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(recovery.records as usize, first.len());
    drop(log);
    let mut again = Vec::new();
    let (_, second) = Log::open(&dir, LogOptions::default(), |r| again.push(r.seq)).unwrap();
    assert_eq!(again, first, "the same records the second time");
    assert_eq!((second.torn_bytes, second.damaged.len()), (0, 0), "nothing left to repair");
    let _ = std::fs::remove_dir_all(&dir);
});
