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
/// `NLMSG_DONE`: the type the connector's messages carry.
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
/// `what`, `cpu`, `timestamp_ns` before the event's own fields.
const EVENT_HEADER: usize = 16;

const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
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
    /// Task `pid` of process `tgid` took the name `comm` (an exec does, before its `Exec`).
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

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Appends the fork, exec and exit events of one datagram to `out` (other connectors' and
/// other kinds of events are skipped).
///
/// # Errors
///
/// [`ParseError`] for a datagram cut short or an error from the kernel; the events before it
/// are kept.
pub fn parse(datagram: &[u8], out: &mut Vec<KernelEvent>) -> Result<(), ParseError> {
    let mut at = 0;
    while datagram.len() - at >= NLMSG_HDRLEN {
        let msg = &datagram[at..];
        let len = u32_at(msg, 0).map_or(0, |l| l as usize);
        if len < NLMSG_HDRLEN || len > msg.len() {
            return Err(ParseError::Truncated {
                have: msg.len(),
                need: len.max(NLMSG_HDRLEN),
            });
        }
        let body = &msg[NLMSG_HDRLEN..len];
        match u16_at(msg, 4) {
            Some(NLMSG_ERROR) => {
                let errno = u32_at(body, 0).map_or(0, |e| e as i32);
                if errno != 0 {
                    // Negative as the kernel writes it; any value read as one.
                    return Err(ParseError::Refused(errno.saturating_neg()));
                }
            }
            Some(NLMSG_DONE) => parse_cn(body, out)?,
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        at += (len + 3) & !3;
        if at > datagram.len() {
            break;
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

#[cfg(target_os = "linux")]
pub use linux::Listener;

/// What `/proc` showed of an event's process when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Nothing: the process was gone, or there is nothing to read (an exit, a name).
    Nothing,
    /// A new process's `stat` alone ([`crate::procfs::read_stat`]): it still runs its
    /// parent's program.
    Forked(crate::procfs::ProcInfo),
    /// Everything ([`crate::procfs::read_process`]), read at its exec. A fork whose exec came
    /// in the same batch carries this, and the exec is not repeated: one start, showing the
    /// new program.
    Execed(crate::procfs::ProcInfo),
}

/// An event and what `/proc` showed of its process.
pub type Observed = (KernelEvent, Seen);

#[cfg(target_os = "linux")]
mod linux {
    use super::{CN_IDX_PROC, KernelEvent, Observed, Seen, listen_message, parse};
    use crate::procfs;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Datagrams read into one batch at most (after the one waited for).
    const BATCH_DATAGRAMS: usize = 63;

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
        /// The events, a batch per datagram read, each with what `/proc` showed at once.
        pub events: mpsc::Receiver<Vec<Observed>>,
        /// What the thread counts.
        pub counts: Arc<Counts>,
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
        pub fn start(root: &Path) -> std::io::Result<Self> {
            let socket = socket2::Socket::new(
                socket2::Domain::from(nix::libc::AF_NETLINK),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::from(nix::libc::NETLINK_CONNECTOR)),
            )?;
            // Room for bursts (the kernel drops what does not fit, and says ENOBUFS).
            let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
            // The thread looks up every so often whether procmond still wants events.
            socket.set_read_timeout(Some(Duration::from_millis(250)))?;
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
            let root = root.to_path_buf();
            // Events before the kernel's answer: those of the moment of subscribing.
            let mut first = Batch::new(&root);
            first.add_events(first_answer(&fd, nonce + 1)?);
            let first = first.finish();
            if !first.is_empty() {
                let _ = tx.try_send(first);
            }
            let thread_counts = Arc::clone(&counts);
            std::thread::Builder::new()
                .name("proc-connector".into())
                .spawn(move || read_loop(&fd, &root, &tx, &thread_counts))?;
            Ok(Self { events, counts })
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
            "the kernel did not answer the subscription to process events (procmond runs \
             outside the initial user or pid namespace?)",
        ))
    }

    /// Events of interest read from datagrams, with what `/proc` shows of their process: an
    /// exec's process read at once (a short process is soon gone), a fork's at the end of the
    /// batch unless its exec came first (then one read serves both).
    struct Batch<'a> {
        root: &'a Path,
        events: Vec<Observed>,
        /// Forks of this batch not yet read, by pid: their index in `events`.
        forks: std::collections::HashMap<u32, usize>,
    }

    impl<'a> Batch<'a> {
        fn new(root: &'a Path) -> Self {
            Self {
                root,
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
                        child_pid,
                        child_tgid,
                        ..
                    } if child_pid == child_tgid => {
                        self.forks.insert(child_pid, self.events.len());
                        self.events.push((e, Seen::Nothing));
                    }
                    KernelEvent::Exec { tgid, .. } => {
                        let seen = procfs::read_process(self.root, tgid)
                            .map_or(Seen::Nothing, Seen::Execed);
                        match self.forks.remove(&tgid) {
                            Some(i) => self.events[i].1 = seen,
                            None => self.events.push((e, seen)),
                        }
                    }
                    KernelEvent::Exit { pid, tgid, .. } | KernelEvent::Comm { pid, tgid, .. }
                        if pid == tgid =>
                    {
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
            for (pid, i) in self.forks.drain() {
                self.events[i].1 =
                    procfs::read_stat(self.root, pid).map_or(Seen::Nothing, Seen::Forked);
            }
            self.events
        }
    }

    /// How long a batch holding a fork waits for more events (its exec, usually within a
    /// few hundred microseconds), once.
    const LINGER_MS: u8 = 1;

    /// How long exits (and name changes) wait for more events before they are sent, when
    /// nothing else came with them: a start never waits for them, and at a steady rate of
    /// processes each exit rides with the next start instead of waking procmond on its own.
    const EXIT_LINGER: Duration = Duration::from_millis(20);

    /// Exits held back at most (then sent at once).
    const EXIT_HOLD: usize = 256;

    /// Whether `batch` holds only exits and name changes.
    fn only_exits(batch: &[Observed]) -> bool {
        batch
            .iter()
            .all(|(e, _)| matches!(e, KernelEvent::Exit { .. } | KernelEvent::Comm { .. }))
    }

    fn read_loop(fd: &OwnedFd, root: &Path, tx: &mpsc::Sender<Vec<Observed>>, counts: &Counts) {
        let mut buf = vec![0u8; 8192];
        let lost = || {
            counts.lost.fetch_add(1, Ordering::Relaxed);
            counts.resync.store(true, Ordering::Release);
        };
        // Exits waiting for company, and since when.
        let mut held: Vec<Observed> = Vec::new();
        let mut held_since = std::time::Instant::now();
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
        while !tx.is_closed() {
            if !held.is_empty() {
                let left = EXIT_LINGER.saturating_sub(held_since.elapsed());
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let timeout =
                    nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::ZERO);
                if left.is_zero() || matches!(nix::poll::poll(&mut fds, timeout), Ok(0)) {
                    if !send(std::mem::take(&mut held)) {
                        break;
                    }
                    continue;
                }
            }
            match nix::sys::socket::recv(
                fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => {
                    // What else is queued joins the batch, so a burst wakes procmond's task
                    // once, not once per event.
                    let mut batch = Batch::new(root);
                    batch.add(&buf[..n]);
                    let mut lingered = false;
                    for _ in 0..BATCH_DATAGRAMS {
                        match nix::sys::socket::recv(
                            fd.as_raw_fd(),
                            &mut buf,
                            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                        ) {
                            Ok(n) => batch.add(&buf[..n]),
                            Err(nix::errno::Errno::ENOBUFS) => lost(),
                            Err(nix::errno::Errno::EAGAIN) if batch.awaits_exec() && !lingered => {
                                lingered = true;
                                let mut fds = [nix::poll::PollFd::new(
                                    fd.as_fd(),
                                    nix::poll::PollFlags::POLLIN,
                                )];
                                let _ = nix::poll::poll(
                                    &mut fds,
                                    nix::poll::PollTimeout::from(LINGER_MS),
                                );
                            }
                            Err(_) => break,
                        }
                    }
                    let mut batch = batch.finish();
                    if batch.is_empty() {
                        continue;
                    }
                    if only_exits(&batch) && held.len() + batch.len() < EXIT_HOLD {
                        if held.is_empty() {
                            held_since = std::time::Instant::now();
                        }
                        held.append(&mut batch);
                        continue;
                    }
                    // Exits held first: events keep their order.
                    held.append(&mut batch);
                    if !send(std::mem::take(&mut held)) {
                        break;
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ENOBUFS) => lost(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading process events failed; stopping");
                    lost();
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

    #[test]
    fn fork_exec_exit_are_read_and_others_skipped() {
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
        parse(&datagram(0x4, &[11, 11, 0, 0]), &mut out).unwrap();
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
