//! Parses a datagram as the kernel's process-events connector would send it. Must never
//! panic; the events read before an error are kept, and every fork, exec and exit read is
//! one the datagram holds (parsing the same bytes twice gives the same events).
#![no_main]

use daemoneye_procmond::connector::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut first = Vec::new();
    let r1 = parse(data, &mut first);
    let mut second = Vec::new();
    let r2 = parse(data, &mut second);
    assert_eq!(r1, r2);
    assert_eq!(first, second);
    // The smallest event (an acknowledgement) takes 16 + 20 + 16 + 4 bytes.
    if data.len() < 56 {
        assert!(first.is_empty());
    }
});
