//! Reading the kernel's socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`). Pure: text in,
//! sockets out.
//!
//! A line is `sl local rem st tx:rx tr:when retrnsmt uid timeout inode …`; addresses are the
//! kernel's 32-bit words in hex as the host stores them, ports are hex.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// The four tables, with their file names.
pub const TABLES: [(&str, Proto); 4] = [
    ("tcp", Proto::Tcp),
    ("tcp6", Proto::Tcp),
    ("udp", Proto::Udp),
    ("udp6", Proto::Udp),
];

/// One socket of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// TCP or UDP.
    pub proto: Proto,
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified for a listening or unconnected socket).
    pub remote: SocketAddr,
    /// The kernel's state number (`st`).
    pub state: u8,
    /// The uid that created it.
    pub uid: u32,
    /// Its inode (0 for a socket no process holds any more, such as TIME_WAIT).
    pub inode: u64,
}

impl Socket {
    /// The state's name: TCP's states, or for UDP `CONNECTED` / `UNCONNECTED`.
    #[must_use]
    pub fn state_name(&self) -> &'static str {
        match (self.proto, self.state) {
            (Proto::Udp, 1) => "CONNECTED",
            (Proto::Udp, _) => "UNCONNECTED",
            (Proto::Tcp, s) => match s {
                1 => "ESTABLISHED",
                2 => "SYN_SENT",
                3 => "SYN_RECV",
                4 => "FIN_WAIT1",
                5 => "FIN_WAIT2",
                6 => "TIME_WAIT",
                7 => "CLOSE",
                8 => "CLOSE_WAIT",
                9 => "LAST_ACK",
                10 => "LISTEN",
                11 => "CLOSING",
                12 => "NEW_SYN_RECV",
                _ => "UNKNOWN",
            },
        }
    }
}

/// Why a line is not a socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct LineError {
    /// Its number (1 is the header).
    pub line: usize,
    /// What is wrong.
    pub what: &'static str,
}

/// The sockets of one table's text, and the lines that did not parse (each counted by the
/// caller; the others are kept).
#[must_use]
pub fn parse_table(text: &str, proto: Proto) -> (Vec<Socket>, Vec<LineError>) {
    let mut sockets = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, proto) {
            Ok(s) => sockets.push(s),
            Err(what) => errors.push(LineError { line: i + 1, what }),
        }
    }
    (sockets, errors)
}

fn parse_line(line: &str, proto: Proto) -> Result<Socket, &'static str> {
    let mut f = line.split_ascii_whitespace();
    let _slot = f.next().ok_or("empty")?;
    let local = addr(f.next().ok_or("no local address")?)?;
    let remote = addr(f.next().ok_or("no remote address")?)?;
    let state = u8::from_str_radix(f.next().ok_or("no state")?, 16).map_err(|_| "bad state")?;
    let _queues = f.next().ok_or("no queues")?;
    let _timer = f.next().ok_or("no timer")?;
    let _retransmits = f.next().ok_or("no retransmits")?;
    let uid = f.next().ok_or("no uid")?.parse().map_err(|_| "bad uid")?;
    let _timeout = f.next().ok_or("no timeout")?;
    let inode = f
        .next()
        .ok_or("no inode")?
        .parse()
        .map_err(|_| "bad inode")?;
    Ok(Socket {
        proto,
        local,
        remote,
        state,
        uid,
        inode,
    })
}

/// `ADDR:PORT` in the kernel's hex: 8 digits for IPv4, 32 for IPv6.
fn addr(s: &str) -> Result<SocketAddr, &'static str> {
    let (a, p) = s.split_once(':').ok_or("address without a port")?;
    let port = u16::from_str_radix(p, 16).map_err(|_| "bad port")?;
    let word = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .map(u32::to_ne_bytes)
            .map_err(|_| "bad address")
    };
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(a)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(a.get(i * 8..i * 8 + 8).ok_or("bad address")?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return Err("address of neither 8 nor 32 hex digits"),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2B4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 4243 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn ipv4_lines_read_as_the_kernel_wrote_them() {
        let (s, e) = parse_table(TCP, Proto::Tcp);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s[0].state_name(), "LISTEN");
        assert_eq!(s[0].inode, 4242);
        assert_eq!(s[1].remote, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s[1].local.port(), 0xA2B4);
        assert_eq!((s[1].uid, s[1].state_name()), (1000, "ESTABLISHED"));
    }

    #[test]
    fn ipv6_lines_read_word_by_word() {
        let text = "header\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1\n";
        let (s, e) = parse_table(text, Proto::Tcp);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(s[0].local, "[::1]:22".parse().unwrap());
        let udp = "h\n  5: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 9 2\n";
        let (u, _) = parse_table(udp, Proto::Udp);
        assert_eq!((u[0].local.port(), u[0].state_name()), (68, "UNCONNECTED"));
    }

    #[test]
    fn a_bad_line_is_named_and_the_others_are_kept() {
        let text = format!("{TCP}   2: zzzz:1 00000000:0000 0A\n   3: 0100007F:1F90\n");
        let (s, e) = parse_table(&text, Proto::Tcp);
        assert_eq!(s.len(), 2);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].line, 4);
        assert_eq!(e[1].what, "no remote address");
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panic(text in "\\PC{0,400}") {
            let _ = parse_table(&text, Proto::Udp);
        }

        #[test]
        fn written_sockets_read_back(a in proptest::prelude::any::<[u8; 4]>(), port in 0u16.., inode in 0u64.., uid in 0u32..) {
            let hex = format!("{:08X}", u32::from_ne_bytes(a));
            let line = format!("h\n 0: {hex}:{port:04X} 00000000:0000 01 0:0 0:0 0 {uid} 0 {inode}\n");
            let (s, e) = parse_table(&line, Proto::Tcp);
            proptest::prop_assert!(e.is_empty());
            proptest::prop_assert_eq!(s[0].local, SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port));
            proptest::prop_assert_eq!((s[0].inode, s[0].uid), (inode, uid));
        }
    }
}
