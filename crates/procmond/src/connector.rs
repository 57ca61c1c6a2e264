//! Process events from the kernel: the Linux process-events connector (netlink, `NETLINK_CONNECTOR`,
//! group `CN_IDX_PROC`), which tells of every fork, exec and exit as it happens, so a process
//! that lives a millisecond is seen. Listening needs `CAP_NET_ADMIN` in the initial network
//! namespace; without it procmond scans `/proc` instead.
//!
//! [`parse`] and [`listen_message`] are pure (and fuzzed); [`Listener`] is the socket, read on
//! a thread of its own into a bounded channel.

/// The connector's index and value for process events (`CN_IDX_PROC`, `CN_VAL_PROC`).
pub const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
use daemoneye_eventbus_collector::netlink::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, messages, u16_at, u32_at,
};
const CN_MSG_LEN: usize = 20;
/// `what`, `cpu`, `timestamp_ns` before the event's own fields.
const EVENT_HEADER: usize = 16;

const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_UID: u32 = 0x0000_0004;
const PROC_EVENT_COMM: u32 = 0x0000_0200;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// `PROC_CN_MCAST_LISTEN` / `PROC_CN_MCAST_IGNORE`.
const MCAST_LISTEN: u32 = 1;
const MCAST_IGNORE: u32 = 2;

/// One event of interest. Threads' events are reported too (a thread's `pid` differs from its
/// `tgid`); processes are what has `pid == tgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    /// `parent_tgid` made `child_pid` (in process `child_tgid`).
    Fork {
        /// The parent process.
        parent_tgid: u32,
        /// The new task.
        child_pid: u32,
        /// Its process (equal to `child_pid` for a new process).
        child_tgid: u32,
    },
    /// Task `pid` of process `tgid` ran a new program.
    Exec {
        /// The task.
        pid: u32,
        /// Its process.
        tgid: u32,
    },
    /// Task `pid` of process `tgid` changed its user ids (`setuid` and its kin).
    Uid {
        /// The task.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The real uid now.
        ruid: u32,
        /// The effective uid now.
        euid: u32,
    },
    /// Task `pid` of process `tgid` took the name `comm` (`prctl(PR_SET_NAME)`, a write to
    /// `/proc/<pid>/comm`; an exec renames without this event).
    Comm {
        /// The task.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The new name (at most 15 bytes, as `/proc/<pid>/comm` shows it).
        comm: [u8; 16],
    },
    /// The kernel's answer to a subscription whose `ack` field was `ack - 1`: `err` is 0 when
    /// accepted, an errno otherwise. Every listener sees every answer.
    Ack {
        /// The subscription's `ack`, plus one.
        ack: u32,
        /// 0, or why it was refused (`EPERM`).
        err: u32,
    },
    /// Task `pid` of process `tgid` ended.
    Exit {
        /// The task.
        pid: u32,
        /// Its process.
        tgid: u32,
        /// The wait status (`exit_code`: the code in bits 8–15, or a signal).
        exit_code: u32,
        /// The parent process.
        parent_tgid: u32,
    },
}

/// A datagram that is not what the connector sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Shorter than its headers say.
    #[error("a netlink message of {have} bytes where {need} were announced")]
    Truncated {
        /// Bytes there.
        have: usize,
        /// Bytes announced.
        need: usize,
    },
    /// The kernel answered with an error (`NLMSG_ERROR`).
    #[error("the kernel refused the subscription: errno {0}")]
    Refused(i32),
}

/// Appends the fork, exec and exit events of one datagram to `out` (other connectors' and
/// other kinds of events are skipped).
///
/// # Errors
///
/// [`ParseError`] for a datagram cut short or an error from the kernel; the events before it
/// are kept.
pub fn parse(datagram: &[u8], out: &mut Vec<KernelEvent>) -> Result<(), ParseError> {
    for msg in messages(datagram) {
        let msg = msg.map_err(|t| ParseError::Truncated {
            have: t.have,
            need: t.need,
        })?;
        match msg.kind {
            // The connector's messages carry NLMSG_DONE.
            NLMSG_DONE => parse_cn(msg.body, out)?,
            NLMSG_ERROR if msg.errno() != 0 => return Err(ParseError::Refused(msg.errno())),
            _ => {}
        }
    }
    Ok(())
}

fn parse_cn(body: &[u8], out: &mut Vec<KernelEvent>) -> Result<(), ParseError> {
    let short = |need| ParseError::Truncated {
        have: body.len(),
        need,
    };
    if body.len() < CN_MSG_LEN {
        return Err(short(CN_MSG_LEN));
    }
    if u32_at(body, 0) != Some(CN_IDX_PROC) || u32_at(body, 4) != Some(CN_VAL_PROC) {
        return Ok(());
    }
    let data_len = usize::from(u16_at(body, 16).unwrap_or(0));
    let ev = body
        .get(CN_MSG_LEN..CN_MSG_LEN + data_len)
        .ok_or_else(|| short(CN_MSG_LEN + data_len))?;
    let Some(what) = u32_at(ev, 0) else {
        return Ok(());
    };
    let field = |i: usize| u32_at(ev, EVENT_HEADER + 4 * i);
    let event = match what {
        PROC_EVENT_NONE => (|| {
            Some(KernelEvent::Ack {
                ack: u32_at(body, 12)?,
                err: field(0)?,
            })
        })(),
        PROC_EVENT_FORK => (|| {
            Some(KernelEvent::Fork {
                parent_tgid: field(1)?,
                child_pid: field(2)?,
                child_tgid: field(3)?,
            })
        })(),
        PROC_EVENT_EXEC => (|| {
            Some(KernelEvent::Exec {
                pid: field(0)?,
                tgid: field(1)?,
            })
        })(),
        PROC_EVENT_UID => (|| {
            Some(KernelEvent::Uid {
                pid: field(0)?,
                tgid: field(1)?,
                ruid: field(2)?,
                euid: field(3)?,
            })
        })(),
        PROC_EVENT_COMM => (|| {
            Some(KernelEvent::Comm {
                pid: field(0)?,
                tgid: field(1)?,
                comm: ev
                    .get(EVENT_HEADER + 8..EVENT_HEADER + 24)?
                    .try_into()
                    .ok()?,
            })
        })(),
        PROC_EVENT_EXIT => (|| {
            Some(KernelEvent::Exit {
                pid: field(0)?,
                tgid: field(1)?,
                exit_code: field(2)?,
                parent_tgid: field(5)?,
            })
        })(),
        _ => return Ok(()),
    };
    match event {
        Some(e) => {
            out.push(e);
            Ok(())
        }
        None => Err(short(EVENT_HEADER + 24)),
    }
}

/// The datagram that starts (`listen`) or stops process events for the socket of port `port`;
/// the kernel's answer is an [`KernelEvent::Ack`] with `ack = nonce + 1`.
pub fn listen_message(port: u32, listen: bool, nonce: u32) -> Vec<u8> {
    let op = if listen { MCAST_LISTEN } else { MCAST_IGNORE };
    let total = NLMSG_HDRLEN + CN_MSG_LEN + 4;
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&port.to_ne_bytes());
    b.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    b.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&nonce.to_ne_bytes());
    b.extend_from_slice(&4u16.to_ne_bytes());
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&op.to_ne_bytes());
    b
}

/// One instruction of a classic BPF program (`struct sock_filter`): opcode, jump if true,
/// jump if false, constant.
pub type BpfInsn = (u16, u8, u8, u32);

/// Offsets in a datagram: the event's kind, then its first four fields.
const AT_WHAT: u32 = (NLMSG_HDRLEN + CN_MSG_LEN) as u32;
const AT_FIELD: u32 = AT_WHAT + EVENT_HEADER as u32;

/// The socket filter that keeps, in the kernel, only what procmond reads: answers to
/// subscriptions, and the forks, execs, uid changes, names and exits of processes (not of
/// threads: a fork's new task is its process, an event's task is its process's leader). On a
/// host whose programs start and end threads all the time, most events never reach procmond.
/// A word is loaded in network order: the kinds are compared in the host's order turned so.
#[must_use]
pub fn thread_filter() -> Vec<BpfInsn> {
    const LD_W_ABS: u16 = 0x20;
    const ST: u16 = 0x02;
    const LDX_W_MEM: u16 = 0x61;
    const JEQ_K: u16 = 0x15;
    const JEQ_X: u16 = 0x1d;
    const RET_K: u16 = 0x06;
    let kind = |v: u32| u32::from_be_bytes(v.to_ne_bytes());
    // A task and its process (for a fork, the new ones) are at fields `task` and `task + 1`.
    let same = |task: u32| {
        [
            (LD_W_ABS, 0, 0, AT_FIELD + 4 * task),
            (ST, 0, 0, 0),
            (LD_W_ABS, 0, 0, AT_FIELD + 4 * task + 4),
            (LDX_W_MEM, 0, 0, 0),
        ]
    };
    let mut p = vec![
        (LD_W_ABS, 0, 0, AT_WHAT),
        (JEQ_K, 15, 0, kind(PROC_EVENT_NONE)), // → keep
        (JEQ_K, 4, 0, kind(PROC_EVENT_FORK)),  // → the fork's check
        (JEQ_K, 8, 0, kind(PROC_EVENT_EXEC)),  // → the task's check
        (JEQ_K, 7, 0, kind(PROC_EVENT_UID)),
        (JEQ_K, 6, 0, kind(PROC_EVENT_COMM)),
        (JEQ_K, 5, 11, kind(PROC_EVENT_EXIT)), // else → drop
    ];
    p.extend(same(2)); // fork: child_pid == child_tgid
    p.push((JEQ_X, 5, 6, 0));
    p.extend(same(0)); // others: pid == tgid
    p.push((JEQ_X, 0, 1, 0));
    p.push((RET_K, 0, 0, 0x0004_0000)); // keep (whole)
    p.push((RET_K, 0, 0, 0)); // drop
    p
}

#[cfg(target_os = "linux")]
pub use linux::Listener;

/// What `/proc` showed of an event's process when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Nothing: the process was gone, or there is nothing to read (an exit, a name).
    Nothing,
    /// A new process's `stat` alone ([`crate::procfs::ProcRoot::stat`]): it still runs its
    /// parent's program.
    Forked(crate::procfs::ProcInfo),
    /// Everything ([`crate::procfs::ProcRoot::process`]), read at its exec. A fork whose exec came
    /// in the same batch carries this, and the exec is not repeated: one start, showing the
    /// new program.
    Execed(crate::procfs::ProcInfo),
}

/// An event and what `/proc` showed of its process.
pub type Observed = (KernelEvent, Seen);

#[cfg(target_os = "linux")]
mod linux {
    use super::{CN_IDX_PROC, KernelEvent, Observed, Seen, listen_message, parse};
    use crate::coalesce::{Hold, Urgency};
    use crate::procfs::ProcRoot;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Batches of events waiting for procmond, at most; a batch that finds the channel full
    /// is dropped and counted (`lost`), and procmond reads `/proc` again to catch up.
    pub const QUEUE_BATCHES: usize = 1024;

    /// What the listening thread counts.
    #[derive(Debug, Default)]
    pub struct Counts {
        /// Events received.
        pub events: AtomicU64,
        /// Times events were lost: the kernel's socket buffer overflowed (`ENOBUFS`), or a
        /// batch found the channel full. Each loss sets `resync`.
        pub lost: AtomicU64,
        /// Set when events were lost; procmond clears it when it has read `/proc` again.
        pub resync: AtomicBool,
    }

    /// A socket listening to process events, read by a thread that sends batches.
    pub struct Listener {
        /// The events, a batch per hand-over ([`crate::coalesce`]), each with what `/proc`
        /// showed the moment the thread heard of it.
        pub events: mpsc::Receiver<Vec<Observed>>,
        /// What the thread counts.
        pub counts: Arc<Counts>,
        /// Set: starts are handed over at once, not held to ride together (procmond hashing
        /// executables opens each new process's executable when it hears of the start, and a
        /// short process is soon gone).
        pub starts_at_once: Arc<AtomicBool>,
    }

    impl Listener {
        /// Opens the socket, subscribes, and starts the thread, which reads each new
        /// process's details under `root` (normally `/proc`) as soon as it hears of it: a
        /// process that lives a millisecond is often gone a scheduling delay later.
        ///
        /// # Errors
        ///
        /// The socket cannot be made or bound, or the kernel refuses the subscription
        /// (`EPERM` without `CAP_NET_ADMIN`, or outside the initial network namespace).
        pub fn start(root: &Path, starts_at_once: bool) -> std::io::Result<Self> {
            let socket = socket2::Socket::new(
                socket2::Domain::from(nix::libc::AF_NETLINK),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::from(nix::libc::NETLINK_CONNECTOR)),
            )?;
            // Room for bursts (the kernel drops what does not fit, and says ENOBUFS).
            let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
            // The thread looks up every so often whether procmond still wants events.
            socket.set_read_timeout(Some(Duration::from_millis(250)))?;
            // Threads' events are dropped in the kernel; without the filter they are read and
            // dropped here.
            let filter: Vec<socket2::SockFilter> = super::thread_filter()
                .into_iter()
                .map(|(code, jt, jf, k)| socket2::SockFilter::new(code, jt, jf, k))
                .collect();
            if let Err(e) = socket.attach_filter(&filter) {
                tracing::warn!(error = %e, "threads' events are filtered by procmond, not the kernel");
            }
            let fd = OwnedFd::from(socket);
            let addr = nix::sys::socket::NetlinkAddr::new(0, CN_IDX_PROC);
            nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
            let port =
                nix::sys::socket::getsockname::<nix::sys::socket::NetlinkAddr>(fd.as_raw_fd())
                    .map_err(std::io::Error::from)?
                    .pid();
            let nonce = fastrand::u32(..u32::MAX);
            nix::sys::socket::send(
                fd.as_raw_fd(),
                &listen_message(port, true, nonce),
                nix::sys::socket::MsgFlags::empty(),
            )
            .map_err(std::io::Error::from)?;
            let counts = Arc::new(Counts::default());
            let (tx, events) = mpsc::channel(QUEUE_BATCHES);
            let mut proc = ProcRoot::open(root)?;
            // Events before the kernel's answer: those of the moment of subscribing.
            let mut uids = Uids::default();
            let mut first = Batch::new(&mut proc, &mut uids);
            first.add_events(first_answer(&fd, nonce + 1)?);
            let first = first.finish();
            if !first.is_empty() {
                let _ = tx.try_send(first);
            }
            let thread_counts = Arc::clone(&counts);
            let starts_at_once = Arc::new(AtomicBool::new(starts_at_once));
            let at_once = Arc::clone(&starts_at_once);
            std::thread::Builder::new()
                .name("proc-connector".into())
                .spawn(move || read_loop(&fd, proc, uids, &tx, &thread_counts, &at_once))?;
            Ok(Self {
                events,
                counts,
                starts_at_once,
            })
        }
    }

    /// How long the kernel may take to answer the subscription.
    const ANSWER_WITHIN: Duration = Duration::from_secs(2);

    /// Reads until the kernel's answer to the subscription (`Ack` with `ack`), keeping the
    /// events that come first. A kernel that ignores requests from other namespaces does not
    /// answer at all.
    fn first_answer(fd: &OwnedFd, ack: u32) -> std::io::Result<Vec<KernelEvent>> {
        let deadline = std::time::Instant::now() + ANSWER_WITHIN;
        let mut buf = vec![0u8; 8192];
        let mut out = Vec::new();
        while std::time::Instant::now() < deadline {
            match nix::sys::socket::recv(
                fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => {
                    let _ = parse(&buf[..n], &mut out);
                    let answer = out.iter().find_map(|e| match *e {
                        KernelEvent::Ack { ack: a, err } if a == ack => Some(err),
                        _ => None,
                    });
                    match answer {
                        Some(0) => return Ok(out),
                        Some(err) => {
                            return Err(std::io::Error::from_raw_os_error(
                                i32::try_from(err).unwrap_or(nix::libc::EPERM),
                            ));
                        }
                        None => {}
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other(
            "the kernel did not answer the subscription to process events: it answers only a \
             listener with CAP_NET_ADMIN in the initial user, pid and network namespaces \
             (procmond in a container?)",
        ))
    }

    /// The real uid of the processes the thread has seen, by pid: a child's is its parent's
    /// (a fork copies it, an exec keeps it), a `setuid` is told by a `Uid` event, so a new
    /// process's `status` is read only when its parent is unknown. Bounded by the processes
    /// alive (an exit removes one) and cleared when events were lost or it holds
    /// [`UIDS_MAX`].
    #[derive(Default)]
    struct Uids(std::collections::HashMap<u32, u32>);

    /// Processes whose uid is kept at most.
    const UIDS_MAX: usize = 1 << 16;

    impl Uids {
        fn get(&self, pid: u32) -> Option<u32> {
            self.0.get(&pid).copied()
        }

        fn set(&mut self, pid: u32, uid: u32) {
            if self.0.len() >= UIDS_MAX {
                self.0.clear();
            }
            self.0.insert(pid, uid);
        }

        fn learn(&mut self, pid: u32, uid: u32) {
            if !self.0.contains_key(&pid) {
                self.set(pid, uid);
            }
        }

        fn forget(&mut self, pid: u32) {
            self.0.remove(&pid);
        }

        fn clear(&mut self) {
            self.0.clear();
        }
    }

    /// Events of interest read from datagrams, with what `/proc` shows of their process: an
    /// exec's process read at once (a short process is soon gone), a fork's at the end of the
    /// batch unless its exec came first (then one read serves both).
    struct Batch<'a> {
        proc: &'a mut ProcRoot,
        uids: &'a mut Uids,
        events: Vec<Observed>,
        /// Forks of this batch not yet read, by pid: their index in `events` and the parent.
        forks: std::collections::HashMap<u32, (usize, u32)>,
    }

    impl<'a> Batch<'a> {
        fn new(proc: &'a mut ProcRoot, uids: &'a mut Uids) -> Self {
            Self {
                proc,
                uids,
                events: Vec::new(),
                forks: std::collections::HashMap::new(),
            }
        }

        fn add(&mut self, datagram: &[u8]) {
            let mut parsed = Vec::new();
            if let Err(e) = parse(datagram, &mut parsed) {
                tracing::debug!(error = %e, "a process-events datagram did not parse");
            }
            self.add_events(parsed);
        }

        fn add_events(&mut self, parsed: Vec<KernelEvent>) {
            for e in parsed {
                match e {
                    KernelEvent::Fork {
                        parent_tgid,
                        child_pid,
                        child_tgid,
                    } if child_pid == child_tgid => {
                        // A new process: what was kept under its pid (a process that
                        // ended unseen, its pid reused) no longer speaks for it.
                        match self.uids.get(parent_tgid) {
                            Some(uid) => self.uids.set(child_pid, uid),
                            None => self.uids.forget(child_pid),
                        }
                        self.forks
                            .insert(child_pid, (self.events.len(), parent_tgid));
                        self.events.push((e, Seen::Nothing));
                    }
                    KernelEvent::Exec { tgid, .. } => {
                        let known = self.uids.get(tgid);
                        let seen = self
                            .proc
                            .process(tgid, known)
                            .map_or(Seen::Nothing, Seen::Execed);
                        let fork = self.forks.remove(&tgid);
                        if let (Seen::Execed(p), None) = (&seen, known)
                            && let Some(uid) = p.uid
                        {
                            self.uids.set(tgid, uid);
                            // Its parent had this real uid when it forked.
                            if let Some((_, parent)) = fork {
                                self.uids.learn(parent, uid);
                            }
                        }
                        match fork {
                            Some((i, _)) => self.events[i].1 = seen,
                            None => self.events.push((e, seen)),
                        }
                    }
                    KernelEvent::Uid {
                        pid, tgid, ruid, ..
                    } if pid == tgid => {
                        self.uids.set(tgid, ruid);
                        self.events.push((e, Seen::Nothing));
                    }
                    KernelEvent::Exit { pid, tgid, .. } if pid == tgid => {
                        self.uids.forget(pid);
                        self.events.push((e, Seen::Nothing));
                    }
                    KernelEvent::Comm { pid, tgid, .. } if pid == tgid => {
                        self.events.push((e, Seen::Nothing));
                    }
                    // Threads, and answers to subscriptions.
                    _ => {}
                }
            }
        }

        /// Whether a fork of this batch could still be followed by its exec.
        fn awaits_exec(&self) -> bool {
            !self.forks.is_empty()
        }

        fn finish(mut self) -> Vec<Observed> {
            for (pid, (i, _)) in self.forks.drain() {
                self.events[i].1 = self.proc.stat(pid).map_or(Seen::Nothing, Seen::Forked);
            }
            self.events
        }
    }

    /// How long a batch holding a fork waits for its exec (usually within a few hundred
    /// microseconds).
    const LINGER: Duration = Duration::from_millis(1);

    /// How a finished batch may wait before procmond's task hears of it.
    fn urgency(batch: &[Observed]) -> Urgency {
        if batch
            .iter()
            .all(|(e, _)| matches!(e, KernelEvent::Exit { .. } | KernelEvent::Comm { .. }))
        {
            Urgency::Exit
        } else {
            Urgency::Start
        }
    }

    /// Datagrams one read takes at most, and the room for each (an event's is under 100
    /// bytes).
    const DATAGRAMS: usize = 64;
    const DATAGRAM_BYTES: usize = 1024;

    /// Buffers for reading many datagrams in one system call (`recvmmsg`).
    struct Datagrams {
        bufs: Vec<Vec<u8>>,
        lens: Vec<usize>,
        headers: nix::sys::socket::MultiHeaders<nix::sys::socket::NetlinkAddr>,
    }

    impl Datagrams {
        fn new() -> Self {
            Self {
                bufs: vec![vec![0u8; DATAGRAM_BYTES]; DATAGRAMS],
                lens: Vec::with_capacity(DATAGRAMS),
                headers: nix::sys::socket::MultiHeaders::preallocate(DATAGRAMS, None),
            }
        }

        /// Reads what is queued, waiting for the first datagram (up to the socket's read
        /// timeout) when `wait`: how many were read.
        fn read(&mut self, fd: &OwnedFd, wait: bool) -> nix::Result<usize> {
            use nix::sys::socket::MsgFlags;
            let flags = if wait {
                MsgFlags::MSG_WAITFORONE
            } else {
                MsgFlags::MSG_DONTWAIT
            };
            let mut bufs = self.bufs.iter_mut();
            let mut iovs: [[std::io::IoSliceMut<'_>; 1]; DATAGRAMS] = std::array::from_fn(|_| {
                [std::io::IoSliceMut::new(
                    bufs.next().expect("one buffer per datagram"),
                )]
            });
            let read = nix::sys::socket::recvmmsg(
                fd.as_raw_fd(),
                &mut self.headers,
                iovs.iter_mut(),
                flags,
                None,
            )?;
            self.lens.clear();
            self.lens.extend(read.map(|m| m.bytes));
            Ok(self.lens.len())
        }

        /// Datagram `i` of the last read.
        fn get(&self, i: usize) -> &[u8] {
            &self.bufs[i][..self.lens[i].min(DATAGRAM_BYTES)]
        }
    }

    fn read_loop(
        fd: &OwnedFd,
        mut proc: ProcRoot,
        mut uids: Uids,
        tx: &mpsc::Sender<Vec<Observed>>,
        counts: &Counts,
        starts_at_once: &AtomicBool,
    ) {
        let mut grams = Datagrams::new();
        let lost = || {
            counts.lost.fetch_add(1, Ordering::Relaxed);
            counts.resync.store(true, Ordering::Release);
        };
        // Events waiting to be handed over (they ride together under load).
        let mut held: Hold<Observed> = Hold::default();
        let send = |batch: Vec<Observed>| {
            counts
                .events
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            match tx.try_send(batch) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    lost();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        };
        // Whether a datagram is there within `wait` (to the microsecond: `ppoll`).
        let readable_within = |wait: Duration| {
            let mut fds = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let wait = nix::sys::time::TimeSpec::from_duration(wait);
            matches!(nix::poll::ppoll(&mut fds, Some(wait), None), Ok(n) if n > 0)
        };
        while !tx.is_closed() {
            if let Some(deadline) = held.deadline() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !readable_within(left) {
                    if !send(held.take(std::time::Instant::now())) {
                        break;
                    }
                    continue;
                }
            }
            match grams.read(fd, true) {
                Ok(n) => {
                    // Everything queued is one batch, so a burst wakes procmond's task once,
                    // not once per event.
                    let mut dropped = false;
                    let mut batch = Batch::new(&mut proc, &mut uids);
                    for i in 0..n {
                        batch.add(grams.get(i));
                    }
                    // A fork whose exec has not come yet is waited for, briefly (what comes
                    // meanwhile joins).
                    let linger = std::time::Instant::now() + LINGER;
                    while batch.awaits_exec() {
                        let left = linger.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() || !readable_within(left) {
                            break;
                        }
                        match grams.read(fd, false) {
                            Ok(n) => {
                                for i in 0..n {
                                    batch.add(grams.get(i));
                                }
                            }
                            Err(nix::errno::Errno::ENOBUFS) => dropped = true,
                            Err(_) => break,
                        }
                    }
                    let batch = batch.finish();
                    if dropped {
                        lost();
                        uids.clear();
                    }
                    let now = std::time::Instant::now();
                    held.set_starts_at_once(starts_at_once.load(Ordering::Relaxed));
                    let urgency = urgency(&batch);
                    held.add(batch, urgency, now);
                    if held.is_due(now) && !send(held.take(now)) {
                        break;
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ENOBUFS) => {
                    // Events were lost, a setuid among them perhaps: uids are learnt again.
                    lost();
                    uids.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading process events failed; stopping");
                    lost();
                    // What was held still goes (procmond then scans /proc).
                    if held.deadline().is_some() {
                        send(held.take(std::time::Instant::now()));
                    }
                    break;
                }
            }
        }
        let _ = nix::sys::socket::send(
            fd.as_raw_fd(),
            &listen_message(0, false, 0),
            nix::sys::socket::MsgFlags::empty(),
        );
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A fake `/proc` entry for `pid` run by real uid `uid`.
        fn entry(root: &Path, pid: u32, uid: u32) {
            let dir = root.join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("stat"),
                format!("{pid} (true) R 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0"),
            )
            .unwrap();
            std::fs::write(dir.join("cmdline"), b"/bin/true\0").unwrap();
            std::fs::write(
                dir.join("status"),
                format!("Name:\ttrue\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
        }

        fn uid_of(events: &[Observed], pid: u32) -> Option<u32> {
            events.iter().find_map(|(_, seen)| match seen {
                Seen::Execed(p) if p.pid == pid => p.uid,
                _ => None,
            })
        }

        #[test]
        fn a_child_has_its_parents_uid_until_a_setuid_says_otherwise() {
            let root = std::env::temp_dir().join(format!("procmond-uids-{}", std::process::id()));
            // The files say 1000 for every child; what the thread knows wins when it knows.
            for pid in [101, 102, 103] {
                entry(&root, pid, 1000);
            }
            let mut uids = Uids::default();
            let mut proc = ProcRoot::open(&root).unwrap();
            let fork = |child| KernelEvent::Fork {
                parent_tgid: 7,
                child_pid: child,
                child_tgid: child,
            };
            let exec = |pid| KernelEvent::Exec { pid, tgid: pid };
            // Parent 7 unknown: its child's status is read, and teaches the parent's uid.
            let mut b = Batch::new(&mut proc, &mut uids);
            b.add_events(vec![fork(101), exec(101)]);
            assert_eq!(uid_of(&b.finish(), 101), Some(1000));
            assert_eq!(uids.get(7), Some(1000));
            // The parent becomes uid 0 (setuid): its next child is 0 without reading status.
            let mut b = Batch::new(&mut proc, &mut uids);
            b.add_events(vec![
                KernelEvent::Uid {
                    pid: 7,
                    tgid: 7,
                    ruid: 0,
                    euid: 0,
                },
                fork(102),
                exec(102),
            ]);
            assert_eq!(uid_of(&b.finish(), 102), Some(0));
            // Exits forget; a loss forgets everything, and status is read again.
            let mut b = Batch::new(&mut proc, &mut uids);
            b.add_events(vec![KernelEvent::Exit {
                pid: 102,
                tgid: 102,
                exit_code: 0,
                parent_tgid: 7,
            }]);
            b.finish();
            assert_eq!(uids.get(102), None);
            uids.clear();
            let mut b = Batch::new(&mut proc, &mut uids);
            b.add_events(vec![fork(103), exec(103)]);
            assert_eq!(uid_of(&b.finish(), 103), Some(1000));
            // A pid kept for a process that ended unseen, reused by a child of an unknown
            // parent: its status is read, not the stale uid taken.
            uids.clear();
            uids.set(101, 0);
            let mut b = Batch::new(&mut proc, &mut uids);
            b.add_events(vec![
                KernelEvent::Fork {
                    parent_tgid: 8,
                    child_pid: 101,
                    child_tgid: 101,
                },
                exec(101),
            ]);
            assert_eq!(uid_of(&b.finish(), 101), Some(1000));
            std::fs::remove_dir_all(&root).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram as the kernel sends it: one message holding one event.
    fn datagram(what: u32, fields: &[u32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&0u32.to_ne_bytes());
        ev.extend_from_slice(&123u64.to_ne_bytes());
        for f in fields {
            ev.extend_from_slice(&f.to_ne_bytes());
        }
        let mut b = listen_message(0, true, 0);
        b.truncate(NLMSG_HDRLEN + CN_MSG_LEN);
        b[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18]
            .copy_from_slice(&u16::try_from(ev.len()).unwrap().to_ne_bytes());
        b.extend_from_slice(&ev);
        let len = u32::try_from(b.len()).unwrap();
        b[..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    /// Runs a classic BPF program over `packet` (the instructions [`thread_filter`] uses):
    /// the bytes kept.
    fn run_filter(prog: &[BpfInsn], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0;
        loop {
            let (code, jt, jf, k) = prog[pc];
            pc += 1;
            match code {
                0x20 => match packet.get(k as usize..k as usize + 4) {
                    Some(w) => a = u32::from_be_bytes(w.try_into().unwrap()),
                    None => return 0,
                },
                0x02 => m[k as usize] = a,
                0x61 => x = m[k as usize],
                0x15 | 0x1d => {
                    let other = if code == 0x15 { k } else { x };
                    pc += usize::from(if a == other { jt } else { jf });
                }
                0x06 => return k,
                other => panic!("opcode {other:#x} not expected"),
            }
        }
    }

    #[test]
    fn the_kernel_filter_keeps_processes_and_answers_and_drops_threads() {
        let prog = thread_filter();
        let kept = |d: Vec<u8>| run_filter(&prog, &d) > 0;
        assert!(kept(datagram(PROC_EVENT_FORK, &[10, 10, 11, 11])));
        assert!(
            !kept(datagram(PROC_EVENT_FORK, &[10, 10, 12, 11])),
            "a new thread"
        );
        for what in [
            PROC_EVENT_EXEC,
            PROC_EVENT_UID,
            PROC_EVENT_COMM,
            PROC_EVENT_EXIT,
        ] {
            assert!(kept(datagram(what, &[11, 11, 0, 0, 0, 0])), "{what:#x}");
            assert!(
                !kept(datagram(what, &[12, 11, 0, 0, 0, 0])),
                "a thread's {what:#x}"
            );
        }
        assert!(
            kept(datagram(PROC_EVENT_NONE, &[0])),
            "answers to subscriptions"
        );
        assert!(
            !kept(datagram(0x80, &[11, 11])),
            "kinds procmond does not read"
        );
        assert!(!kept(vec![0; 20]), "a datagram too short to say");
    }

    #[test]
    fn fork_exec_exit_comm_and_uid_are_read_and_others_skipped() {
        let mut out = Vec::new();
        parse(&datagram(PROC_EVENT_FORK, &[10, 10, 11, 11]), &mut out).unwrap();
        parse(&datagram(PROC_EVENT_EXEC, &[11, 11]), &mut out).unwrap();
        parse(
            &datagram(PROC_EVENT_EXIT, &[11, 11, 256, 0, 10, 10]),
            &mut out,
        )
        .unwrap();
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"true");
        let c = |i: usize| u32::from_ne_bytes(comm[i * 4..i * 4 + 4].try_into().unwrap());
        parse(
            &datagram(PROC_EVENT_COMM, &[11, 11, c(0), c(1), c(2), c(3)]),
            &mut out,
        )
        .unwrap();
        parse(&datagram(PROC_EVENT_UID, &[11, 11, 1000, 0]), &mut out).unwrap();
        // Kinds not followed (a session id change) are skipped.
        parse(&datagram(0x80, &[11, 11]), &mut out).unwrap();
        let mut ack = datagram(PROC_EVENT_NONE, &[1]);
        ack[NLMSG_HDRLEN + 12..NLMSG_HDRLEN + 16].copy_from_slice(&8u32.to_ne_bytes());
        parse(&ack, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                KernelEvent::Fork {
                    parent_tgid: 10,
                    child_pid: 11,
                    child_tgid: 11
                },
                KernelEvent::Exec { pid: 11, tgid: 11 },
                KernelEvent::Exit {
                    pid: 11,
                    tgid: 11,
                    exit_code: 256,
                    parent_tgid: 10
                },
                KernelEvent::Comm {
                    pid: 11,
                    tgid: 11,
                    comm
                },
                KernelEvent::Uid {
                    pid: 11,
                    tgid: 11,
                    ruid: 1000,
                    euid: 0
                },
                KernelEvent::Ack { ack: 8, err: 1 },
            ]
        );
    }

    #[test]
    fn short_and_refused_datagrams_are_errors() {
        let mut out = Vec::new();
        let whole = datagram(PROC_EVENT_FORK, &[1, 1, 2, 2]);
        for cut in [17, 30, whole.len() - 1] {
            assert!(parse(&whole[..cut], &mut out).is_err(), "cut at {cut}");
        }
        // An event shorter than its kind needs.
        assert!(parse(&datagram(PROC_EVENT_EXIT, &[1, 1]), &mut out).is_err());
        let mut err = Vec::new();
        err.extend_from_slice(&20u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(parse(&err, &mut out), Err(ParseError::Refused(1)));
        // Found by the fuzzer: the most negative errno.
        err[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(parse(&err, &mut out), Err(ParseError::Refused(i32::MAX)));
        assert!(out.is_empty());
        // Fewer bytes than a header: nothing, no error.
        assert_eq!(parse(&[0; 8], &mut out), Ok(()));
    }

    #[test]
    fn the_listen_message_is_one_whole_netlink_message() {
        let m = listen_message(42, true, 7);
        assert_eq!(m.len(), 40);
        assert_eq!(u32_at(&m, 0), Some(40));
        assert_eq!(u32_at(&m, 12), Some(42));
        assert_eq!(u32_at(&m, 28), Some(7));
        assert_eq!(u32_at(&m, 36), Some(MCAST_LISTEN));
        assert_eq!(u32_at(&listen_message(0, false, 0), 36), Some(MCAST_IGNORE));
    }
}
