//! Parses a datagram as the kernel's socket dump (`NETLINK_SOCK_DIAG`) would send it. Must
//! never panic; parsing the same bytes twice gives the same sockets and the same answer.
#![no_main]

use daemoneye_netmond::diag::parse;
use daemoneye_netmond::procnet::Proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut first = Vec::new();
    let r1 = parse(data, Proto::Tcp, 0, &mut first);
    let mut second = Vec::new();
    let r2 = parse(data, Proto::Tcp, 0, &mut second);
    assert_eq!(r1, r2);
    assert_eq!(first, second);
    // A socket takes a 16-byte header and a 72-byte message.
    assert!(first.len() * 88 <= data.len());
});
