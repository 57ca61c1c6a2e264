//! The kernel's socket dump (`NETLINK_SOCK_DIAG`, `inet_diag`): every TCP and UDP socket of
//! one family and protocol in one binary dump, TIME_WAIT left out by the kernel. Far cheaper
//! than `/proc/net/tcp`, whose text the kernel regenerates a page at a time. The message
//! codec is pure ([`request`], [`parse`]); [`Dumper`] does the I/O (Linux).

use crate::procnet::{Proto, Socket};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use daemoneye_eventbus_collector::netlink::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, messages, u32_at,
};
/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
/// `AF_INET`, `AF_INET6`.
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;
/// TCP's state number for TIME_WAIT, which the dump leaves out (no process holds it).
const TIME_WAIT: u8 = 6;

/// The dumps one reading makes: each family with each protocol.
pub const DUMPS: [(u8, Proto); 4] = [
    (AF_INET, Proto::Tcp),
    (AF_INET6, Proto::Tcp),
    (AF_INET, Proto::Udp),
    (AF_INET6, Proto::Udp),
];

/// The request for one dump: every state but TIME_WAIT.
#[must_use]
pub fn request(family: u8, proto: Proto, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    m.extend_from_slice(
        &u32::try_from(NLMSG_HDRLEN + REQ_LEN)
            .unwrap_or(0)
            .to_ne_bytes(),
    );
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(match proto {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    });
    m.push(0); // no extensions
    m.push(0);
    let states: u32 = 0xfff & !(1 << TIME_WAIT);
    m.extend_from_slice(&states.to_ne_bytes());
    m.resize(NLMSG_HDRLEN + REQ_LEN, 0); // any socket id
    m
}

/// Why a dump could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiagError {
    /// A message is cut short or its length is impossible.
    #[error("a socket dump message is truncated ({have} of {need} bytes)")]
    Truncated {
        /// Bytes there.
        have: usize,
        /// Bytes its header claims, or the least a message needs.
        need: usize,
    },
    /// The kernel refused the request.
    #[error("the kernel refused the socket dump: errno {0}")]
    Refused(i32),
    /// A socket of an unknown address family.
    #[error("a socket of unknown address family {0}")]
    Family(u8),
}

/// Reads one datagram of the dump asked for with sequence number `seq`: its sockets appended
/// to `out`; `true` once that dump is done. Messages of another request (left over from one
/// that failed part way) are skipped, so a dump never takes another's sockets or end.
///
/// # Errors
///
/// [`DiagError`]; the sockets read before it are kept in `out`.
pub fn parse(
    datagram: &[u8],
    proto: Proto,
    seq: u32,
    out: &mut Vec<Socket>,
) -> Result<bool, DiagError> {
    for msg in messages(datagram) {
        let msg = msg.map_err(|t| DiagError::Truncated {
            have: t.have,
            need: t.need,
        })?;
        if msg.seq != seq {
            continue;
        }
        match msg.kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR if msg.errno() != 0 => return Err(DiagError::Refused(msg.errno())),
            SOCK_DIAG_BY_FAMILY => out.push(socket(msg.body, proto)?),
            _ => {}
        }
    }
    Ok(false)
}

/// One `inet_diag_msg`.
fn socket(b: &[u8], proto: Proto) -> Result<Socket, DiagError> {
    if b.len() < MSG_LEN {
        return Err(DiagError::Truncated {
            have: b.len(),
            need: MSG_LEN,
        });
    }
    let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let ip = |at: usize| -> Result<IpAddr, DiagError> {
        match b[0] {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
                b[at],
                b[at + 1],
                b[at + 2],
                b[at + 3],
            ))),
            AF_INET6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&b[at..at + 16]);
                Ok(IpAddr::V6(Ipv6Addr::from(a)))
            }
            other => Err(DiagError::Family(other)),
        }
    };
    // family, state, timer, retrans; sport, dport, src[16], dst[16], if, cookie[8];
    // expires, rqueue, wqueue, uid, inode.
    Ok(Socket {
        proto,
        local: SocketAddr::new(ip(8)?, port(4)),
        remote: SocketAddr::new(ip(24)?, port(6)),
        state: b[1],
        uid: u32_at(b, 64).unwrap_or(0),
        inode: u64::from(u32_at(b, 68).unwrap_or(0)),
    })
}

#[cfg(target_os = "linux")]
pub use linux::Dumper;

#[cfg(target_os = "linux")]
mod linux {
    use super::{DUMPS, DiagError, parse, request};
    use crate::procnet::Socket;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::time::Duration;

    /// Why a reading through the socket dump failed.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum DumpError {
        /// The socket failed.
        #[error("socket dump: {0}")]
        Io(#[from] std::io::Error),
        /// The answer did not read.
        #[error(transparent)]
        Diag(#[from] DiagError),
    }

    /// A `NETLINK_SOCK_DIAG` socket, kept open between readings.
    pub struct Dumper {
        fd: OwnedFd,
        seq: u32,
        buf: Vec<u8>,
    }

    impl Dumper {
        /// Opens the socket and makes one dump to see that the kernel answers.
        ///
        /// # Errors
        ///
        /// The socket cannot be made, or the kernel does not answer dumps (no `inet_diag`).
        pub fn open() -> Result<Self, DumpError> {
            let socket = socket2::Socket::new(
                socket2::Domain::from(nix::libc::AF_NETLINK),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::from(nix::libc::NETLINK_SOCK_DIAG)),
            )?;
            // Every wait bounded: a kernel that stops answering fails the reading.
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut d = Self {
                fd: OwnedFd::from(socket),
                seq: 0,
                buf: vec![0u8; 64 * 1024],
            };
            d.read()?;
            Ok(d)
        }

        /// Every TCP and UDP socket, IPv4 and IPv6, but TIME_WAIT.
        ///
        /// # Errors
        ///
        /// The socket failed or an answer did not read.
        pub fn read(&mut self) -> Result<Vec<Socket>, DumpError> {
            let mut out = Vec::new();
            for (family, proto) in DUMPS {
                self.seq = self.seq.wrapping_add(1);
                nix::sys::socket::send(
                    self.fd.as_raw_fd(),
                    &request(family, proto, self.seq),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)?;
                loop {
                    let n = nix::sys::socket::recv(
                        self.fd.as_raw_fd(),
                        &mut self.buf,
                        nix::sys::socket::MsgFlags::empty(),
                    )
                    .map_err(std::io::Error::from)?;
                    if n == 0 || parse(&self.buf[..n], proto, self.seq, &mut out)? {
                        break;
                    }
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump message as the kernel writes it (sequence number 1).
    fn message(family: u8, state: u8, src: &[u8], sport: u16, inode: u32) -> Vec<u8> {
        let mut b = vec![0u8; MSG_LEN];
        b[0] = family;
        b[1] = state;
        b[4..6].copy_from_slice(&sport.to_be_bytes());
        b[8..8 + src.len()].copy_from_slice(src);
        b[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        b[68..72].copy_from_slice(&inode.to_ne_bytes());
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(NLMSG_HDRLEN + MSG_LEN).unwrap().to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 2]);
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&b);
        m
    }

    #[test]
    fn a_dump_reads_to_its_end() {
        let mut d = message(AF_INET, 10, &[127, 0, 0, 1], 8080, 42);
        d.extend(message(AF_INET6, 1, &Ipv6Addr::LOCALHOST.octets(), 22, 43));
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        done[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // What is left of another request is not this dump's.
        let mut other = d.clone();
        for at in [8, NLMSG_HDRLEN + MSG_LEN + 8] {
            other[at..at + 4].copy_from_slice(&7u32.to_ne_bytes());
        }
        let mut stale = other.clone();
        stale.extend_from_slice(&done);
        stale[other.len() + 8..other.len() + 12].copy_from_slice(&7u32.to_ne_bytes());
        let mut skipped = Vec::new();
        assert_eq!(parse(&stale, Proto::Tcp, 1, &mut skipped), Ok(false));
        assert!(skipped.is_empty());
        let mut out = Vec::new();
        assert_eq!(parse(&d, Proto::Tcp, 1, &mut out), Ok(false));
        assert_eq!(parse(&done, Proto::Tcp, 1, &mut out), Ok(true));
        assert_eq!(out[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            (out[0].state_name(), out[0].inode, out[0].uid),
            ("LISTEN", 42, 1000)
        );
        assert_eq!(out[1].local, "[::1]:22".parse().unwrap());
    }

    #[test]
    fn damage_is_refused_by_name_and_what_came_before_is_kept() {
        let mut d = message(AF_INET, 10, &[127, 0, 0, 1], 1, 1);
        let whole = d.len();
        d.extend(message(AF_INET, 10, &[127, 0, 0, 1], 2, 2));
        d.truncate(whole + 30);
        let mut out = Vec::new();
        assert!(matches!(
            parse(&d, Proto::Tcp, 1, &mut out),
            Err(DiagError::Truncated { .. })
        ));
        assert_eq!(out.len(), 1);
        let mut bad = message(7, 10, &[0; 4], 1, 1);
        assert_eq!(
            parse(&bad, Proto::Tcp, 1, &mut out),
            Err(DiagError::Family(7))
        );
        bad.truncate(NLMSG_HDRLEN + 10);
        let len = u32::try_from(bad.len()).unwrap();
        bad[0..4].copy_from_slice(&len.to_ne_bytes());
        assert!(matches!(
            parse(&bad, Proto::Tcp, 1, &mut out),
            Err(DiagError::Truncated { need: MSG_LEN, .. })
        ));
    }

    #[test]
    fn a_message_whose_padding_runs_past_the_datagram_ends_it() {
        // Found by the fuzzer: a length not a multiple of 4 on the last message.
        let mut m = vec![0u8; 17];
        m[0..4].copy_from_slice(&17u32.to_ne_bytes());
        m[4..6].copy_from_slice(&99u16.to_ne_bytes());
        let mut out = Vec::new();
        assert_eq!(parse(&m, Proto::Udp, 0, &mut out), Ok(false));
    }

    #[test]
    fn the_request_asks_a_dump_of_every_state_but_time_wait() {
        let r = request(AF_INET6, Proto::Udp, 9);
        assert_eq!(r.len(), 72);
        assert_eq!((r[16], r[17]), (AF_INET6, 17));
        assert_eq!(u32_at(&r, 20), Some(0xfff & !(1 << 6)));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_dump_holds_this_processes_listener() {
        use std::os::unix::fs::MetadataExt as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let all = Dumper::open().unwrap().read().unwrap();
        let me = all.iter().find(|s| s.inode == inode).unwrap();
        assert_eq!(me.local, listener.local_addr().unwrap());
        assert_eq!(me.state_name(), "LISTEN");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)
        ) {
            let mut out = Vec::new();
            let _ = parse(&bytes, Proto::Tcp, 0, &mut out);
        }
    }
}
