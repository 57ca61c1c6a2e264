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
    // Fields 3 (state), 4 (ppid) and 22 (starttime) after the name.
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let start_ticks = rest.nth(17)?.parse().ok()?;
    Some(Stat {
        name,
        state,
        ppid,
        start_ticks,
    })
}

/// Parses `/proc/<pid>/cmdline` (NUL-separated arguments); `None` when empty.
pub fn parse_cmdline(bytes: &[u8]) -> Option<String> {
    let mut line = String::new();
    for arg in bytes.split(|b| *b == 0).filter(|a| !a.is_empty()) {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&String::from_utf8_lossy(arg));
    }
    (!line.is_empty()).then_some(line)
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

/// The proc file system, opened once: a process's files are read relative to it
/// (`<pid>/<file>`: no descriptor per process), each in one `read` into a buffer kept from one
/// process to the next (on Unix).
///
/// Each file is looked up by pid, so two files read microseconds apart could belong to two
/// processes only if the first ended and the kernel handed its pid out again in between (for
/// a process just made, as at an exec the connector reports, only after every other pid up
/// to `pid_max`).
pub struct ProcRoot {
    #[cfg(unix)]
    dir: std::os::fd::OwnedFd,
    #[cfg(not(unix))]
    dir: std::path::PathBuf,
    path: String,
    buf: Vec<u8>,
}

impl ProcRoot {
    /// Opens `root` (normally `/proc`).
    ///
    /// # Errors
    ///
    /// When `root` is not a directory that can be opened.
    #[cfg(unix)]
    pub fn open(root: &Path) -> std::io::Result<Self> {
        use nix::fcntl::{OFlag, open};
        let dir = open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(Self {
            dir,
            path: String::with_capacity(32),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Opens `root`.
    ///
    /// # Errors
    ///
    /// When `root` is not a directory.
    #[cfg(not(unix))]
    pub fn open(root: &Path) -> std::io::Result<Self> {
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(Self {
            dir: root.to_path_buf(),
            path: String::new(),
            buf: Vec::new(),
        })
    }

    /// Makes the kept path `<pid>/<name>`.
    fn path_of(&mut self, pid: u32, name: &str) {
        use std::fmt::Write as _;
        self.path.clear();
        let _ = write!(self.path, "{pid}/{name}");
    }

    /// The whole file `name` of process `pid`, `None` if it cannot be read.
    #[cfg(unix)]
    fn read(&mut self, pid: u32, name: &str) -> Option<&[u8]> {
        use nix::fcntl::{OFlag, openat};
        self.path_of(pid, name);
        let fd = openat(
            &self.dir,
            self.path.as_str(),
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
    fn read(&mut self, pid: u32, name: &str) -> Option<&[u8]> {
        self.path_of(pid, name);
        self.buf = std::fs::read(self.dir.join(&self.path)).ok()?;
        Some(&self.buf)
    }

    #[cfg(unix)]
    fn link(&mut self, pid: u32, name: &str) -> Option<String> {
        self.path_of(pid, name);
        let target = nix::fcntl::readlinkat(&self.dir, self.path.as_str()).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    #[cfg(not(unix))]
    fn link(&mut self, pid: u32, name: &str) -> Option<String> {
        self.path_of(pid, name);
        let target = std::fs::read_link(self.dir.join(&self.path)).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    fn parsed_stat(&mut self, pid: u32) -> Option<Stat> {
        parse_stat(std::str::from_utf8(self.read(pid, "stat")?).ok()?)
    }

    /// Process `pid`'s `stat` only (name, parent, start, state; no command line, executable
    /// or user); `None` when it vanished meanwhile.
    pub fn stat(&mut self, pid: u32) -> Option<ProcInfo> {
        let stat = self.parsed_stat(pid)?;
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

    /// Process `pid`, its real uid `uid` when the caller knows it (`status` is then not
    /// read); `None` when it vanished meanwhile (or is unreadable).
    pub fn process(&mut self, pid: u32, uid: Option<u32>) -> Option<ProcInfo> {
        let stat = self.parsed_stat(pid)?;
        let program = self.program(pid, uid);
        Some(ProcInfo {
            pid,
            ppid: stat.ppid,
            name: stat.name,
            command_line: program.command_line,
            executable_path: program.executable_path,
            start_ticks: stat.start_ticks,
            uid: program.uid,
            state: stat.state,
        })
    }

    /// What process `pid` runs, without its `stat`: its command line, executable and (unless
    /// the caller knows it: `uid`) real uid, each `None` when unreadable.
    fn program(&mut self, pid: u32, uid: Option<u32>) -> Program {
        let command_line = self.read(pid, "cmdline").and_then(parse_cmdline);
        let executable_path = self.link(pid, "exe");
        let uid = uid.or_else(|| {
            self.read(pid, "status")
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(parse_uid)
        });
        Program {
            command_line,
            executable_path,
            uid,
        }
    }
}

/// What a process runs ([`ProcRoot::program`]).
struct Program {
    command_line: Option<String>,
    executable_path: Option<String>,
    uid: Option<u32>,
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
    let mut proc = ProcRoot::open(root)?;
    for entry in std::fs::read_dir(root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(p) = proc.process(pid, None) {
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
        assert_eq!(parse_cmdline(b"\0\0"), None);
        assert_eq!(
            parse_cmdline(b"a\0\0b\xff\0").as_deref(),
            Some("a b\u{fffd}")
        );
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
