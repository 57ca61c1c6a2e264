//! Parses text as a `/proc/net/{tcp,udp}` table would hold it. Must never panic; every line
//! after the header is either a socket or a named error, never both, never lost.
#![no_main]

use daemoneye_netmond::procnet::{Proto, parse_table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for proto in [Proto::Tcp, Proto::Udp] {
        let (sockets, errors) = parse_table(text, proto);
        let lines = text
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count();
        assert_eq!(sockets.len() + errors.len(), lines);
        for s in &sockets {
            assert_eq!(s.proto, proto);
            let _ = s.state_name();
        }
    }
});
