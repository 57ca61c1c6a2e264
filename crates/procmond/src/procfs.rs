//! Reading `/proc`: pure parsers for the files, and a thin reader around them.

use std::collections::BTreeMap;
use std::path::Path;

/// What procmond knows of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Name (`comm`, at most 15 bytes).
    pub name: String,
    /// Command line, arguments joined with spaces (`None` for kernel threads and zombies).
    pub command_line: Option<String>,
    /// Executable path (`None` when unreadable, e.g. another user's process).
    pub executable_path: Option<String>,
    /// Start time in clock ticks since boot (with `pid`, identifies the process even when
    /// its pid is reused).
    pub start_ticks: u64,
    /// Real user id.
    pub uid: Option<u32>,
    /// State letter (R, S, D, Z, T…).
    pub state: char,
}

impl ProcInfo {
    /// A process known only by its pid (and parent, when known: else 0): it ended before
    /// `/proc` could be read.
    pub fn gone(pid: u32, ppid: u32) -> Self {
        Self {
            pid,
            ppid,
            name: String::new(),
            command_line: None,
            executable_path: None,
            start_ticks: 0,
            uid: None,
            state: '?',
        }
    }

    /// Whether this is [`ProcInfo::gone`]'s.
    pub fn is_gone(&self) -> bool {
        self.state == '?'
    }
}

/// The fields of `/proc/<pid>/stat` procmond uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// `comm`.
    pub name: String,
    /// State letter.
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Start time, clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The name is between the first `(` and the **last** `)` (it may
/// itself contain parentheses and spaces).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state), rest[1] field 4 (ppid), rest[19] field 22 (starttime).
    Some(Stat {
        name,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        start_ticks: rest.get(19)?.parse().ok()?,
    })
}

/// Parses `/proc/<pid>/cmdline` (NUL-separated arguments); `None` when empty.
pub fn parse_cmdline(bytes: &[u8]) -> Option<String> {
    let args: Vec<String> = bytes
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// The real uid from `/proc/<pid>/status` (`Uid:` line, first number).
pub fn parse_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Boot time, seconds since the Unix epoch, from `/proc/stat` (`btime` line).
pub fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// One process's directory under `/proc`, opened once: its files are read relative to it
/// (one lookup of the pid, not one per file), each in one `read` into a reused buffer.
struct ProcDir {
    #[cfg(unix)]
    dir: std::os::fd::OwnedFd,
    #[cfg(not(unix))]
    dir: std::path::PathBuf,
    buf: Vec<u8>,
}

impl ProcDir {
    #[cfg(unix)]
    fn open(root: &Path, pid: u32) -> Option<Self> {
        use nix::fcntl::{OFlag, open};
        let dir = open(
            &root.join(pid.to_string()),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()?;
        Some(Self {
            dir,
            buf: Vec::with_capacity(4096),
        })
    }

    #[cfg(not(unix))]
    fn open(root: &Path, pid: u32) -> Option<Self> {
        Some(Self {
            dir: root.join(pid.to_string()),
            buf: Vec::new(),
        })
    }

    /// The whole file `name`, `None` if it cannot be read.
    #[cfg(unix)]
    fn read(&mut self, name: &str) -> Option<&[u8]> {
        use nix::fcntl::{OFlag, openat};
        let fd = openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()?;
        self.buf.clear();
        loop {
            let len = self.buf.len();
            if self.buf.capacity() - len < 1024 {
                self.buf.reserve(4096);
            }
            let spare = self.buf.capacity() - len;
            self.buf.resize(len + spare, 0);
            match nix::unistd::read(&fd, &mut self.buf[len..]) {
                Ok(0) => {
                    self.buf.truncate(len);
                    break;
                }
                Ok(n) => {
                    self.buf.truncate(len + n);
                    // A file of /proc gives all it has in one read when there is room: a
                    // short read is its end.
                    if n < spare {
                        break;
                    }
                }
                Err(nix::errno::Errno::EINTR) => self.buf.truncate(len),
                Err(_) => return None,
            }
        }
        Some(&self.buf)
    }

    #[cfg(not(unix))]
    fn read(&mut self, name: &str) -> Option<&[u8]> {
        self.buf = std::fs::read(self.dir.join(name)).ok()?;
        Some(&self.buf)
    }

    #[cfg(unix)]
    fn link(&self, name: &str) -> Option<String> {
        let target = nix::fcntl::readlinkat(&self.dir, name).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    #[cfg(not(unix))]
    fn link(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.dir.join(name)).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    fn stat(&mut self) -> Option<Stat> {
        parse_stat(std::str::from_utf8(self.read("stat")?).ok()?)
    }
}

/// Reads one process's `stat` only (name, parent, start, state; no command line, executable
/// or user); `None` when it vanished meanwhile.
pub fn read_stat(root: &Path, pid: u32) -> Option<ProcInfo> {
    let stat = ProcDir::open(root, pid)?.stat()?;
    Some(ProcInfo {
        pid,
        ppid: stat.ppid,
        name: stat.name,
        command_line: None,
        executable_path: None,
        start_ticks: stat.start_ticks,
        uid: None,
        state: stat.state,
    })
}

/// Reads one process; `None` when it vanished meanwhile (or is unreadable).
pub fn read_process(root: &Path, pid: u32) -> Option<ProcInfo> {
    read_process_with(root, pid, None)
}

/// Reads one process, its real uid `uid` when the caller knows it (`status` is then not
/// read); `None` when it vanished meanwhile (or is unreadable).
pub fn read_process_with(root: &Path, pid: u32, uid: Option<u32>) -> Option<ProcInfo> {
    let mut dir = ProcDir::open(root, pid)?;
    let stat = dir.stat()?;
    let command_line = dir.read("cmdline").and_then(parse_cmdline);
    let executable_path = dir.link("exe");
    let uid = uid.or_else(|| {
        dir.read("status")
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(parse_uid)
    });
    Some(ProcInfo {
        pid,
        ppid: stat.ppid,
        name: stat.name,
        command_line,
        executable_path,
        start_ticks: stat.start_ticks,
        uid,
        state: stat.state,
    })
}

/// A snapshot: every process by (pid, start ticks).
pub type Snapshot = BTreeMap<(u32, u64), ProcInfo>;

/// Reads every process under `root` (normally `/proc`).
///
/// # Errors
///
/// When `root` cannot be listed.
pub fn snapshot(root: &Path) -> std::io::Result<Snapshot> {
    let mut out = Snapshot::new();
    for entry in std::fs::read_dir(root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(p) = read_process(root, pid) {
            out.insert((p.pid, p.start_ticks), p);
        }
    }
    Ok(out)
}

/// Processes that appeared and disappeared between two snapshots (a reused pid with a new
/// start time counts as one exit and one start).
pub fn diff<'a>(
    before: &'a Snapshot,
    after: &'a Snapshot,
) -> (Vec<&'a ProcInfo>, Vec<&'a ProcInfo>) {
    let started = after
        .iter()
        .filter(|(k, _)| !before.contains_key(k))
        .map(|(_, p)| p)
        .collect();
    let exited = before
        .iter()
        .filter(|(k, _)| !after.contains_key(k))
        .map(|(_, p)| p)
        .collect();
    (started, exited)
}

/// Processes present in both snapshots that now run another program: the same pid and start
/// time (an `exec` keeps both) with another executable, or, when the executable is unreadable,
/// another name and command line.
pub fn execs<'a>(before: &'a Snapshot, after: &'a Snapshot) -> Vec<&'a ProcInfo> {
    after
        .iter()
        .filter_map(|(k, now)| {
            let was = before.get(k)?;
            let exe_changed = match (&was.executable_path, &now.executable_path) {
                (Some(a), Some(b)) => a != b,
                _ => was.name != now.name && was.command_line != now.command_line,
            };
            exe_changed.then_some(now)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 2457600 300 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";

    #[test]
    fn stat_names_may_hold_parentheses_and_spaces() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.name, "my (odd) name");
        assert_eq!((s.state, s.ppid, s.start_ticks), ('S', 1, 987_654));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn cmdline_uid_and_boot_time() {
        assert_eq!(
            parse_cmdline(b"sleep\x0030\x00").as_deref(),
            Some("sleep 30")
        );
        assert_eq!(parse_cmdline(b""), None);
        assert_eq!(
            parse_uid("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    fn p(pid: u32, start: u64) -> ProcInfo {
        ProcInfo {
            pid,
            ppid: 1,
            name: format!("p{pid}"),
            command_line: None,
            executable_path: None,
            start_ticks: start,
            uid: None,
            state: 'S',
        }
    }

    #[test]
    fn diff_sees_starts_exits_and_pid_reuse() {
        let before: Snapshot = [p(1, 10), p(2, 20), p(3, 30)]
            .into_iter()
            .map(|p| ((p.pid, p.start_ticks), p))
            .collect();
        let after: Snapshot = [p(1, 10), p(3, 31), p(4, 40)]
            .into_iter()
            .map(|p| ((p.pid, p.start_ticks), p))
            .collect();
        let (started, exited) = diff(&before, &after);
        let s: Vec<_> = started.iter().map(|p| (p.pid, p.start_ticks)).collect();
        let e: Vec<_> = exited.iter().map(|p| (p.pid, p.start_ticks)).collect();
        assert_eq!(s, [(3, 31), (4, 40)]);
        assert_eq!(e, [(2, 20), (3, 30)]);
    }

    #[test]
    fn an_exec_is_a_new_program_under_the_same_key() {
        let mut shell = p(7, 70);
        shell.executable_path = Some("/bin/sh".into());
        let mut sleep = shell.clone();
        sleep.executable_path = Some("/bin/sleep".into());
        sleep.name = "sleep".into();
        let mut renamed = p(8, 80);
        renamed.command_line = Some("worker: idle".into());
        let mut retitled = renamed.clone();
        retitled.command_line = Some("worker: busy".into());
        let snap = |ps: Vec<ProcInfo>| -> Snapshot {
            ps.into_iter()
                .map(|p| ((p.pid, p.start_ticks), p))
                .collect()
        };
        let before = snap(vec![shell, renamed]);
        let after = snap(vec![sleep, retitled]);
        let e: Vec<_> = execs(&before, &after).iter().map(|p| p.pid).collect();
        assert_eq!(e, [7], "a new title alone is not an exec");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let snap = snapshot(Path::new("/proc")).unwrap();
        let me = std::process::id();
        let mine = snap.values().find(|p| p.pid == me).unwrap();
        assert!(mine.executable_path.is_some());
        assert!(mine.command_line.is_some());
    }
}
