//! Which process holds a socket: the `socket:[INODE]` links under `/proc/<pid>/fd`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The inode a `/proc/<pid>/fd/<n>` link's target names, if it is a socket.
#[must_use]
pub fn socket_inode(target: &[u8]) -> Option<u64> {
    let rest = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Its name (`comm`).
    pub name: String,
}

/// What a walk for owners did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Processes whose descriptors were read.
    pub processes: u64,
    /// Descriptors read.
    pub descriptors: u64,
}

/// Finds the holders of the `wanted` socket inodes under `root` (normally `/proc`), newest
/// processes first, stopping once every one is found. A process that ended, or whose
/// descriptors may not be read, is passed over.
///
/// A socket held by a process and by its parent running the same executable is the parent's:
/// the child inherited it (a pre-forked worker, or a child between its fork and its exec,
/// which closes it), and the newest-first walk would otherwise name the child. So is one the
/// child no longer holds when its program is compared (it ran another and closed it).
///
/// # Errors
///
/// When `root` itself cannot be listed.
pub fn find(root: &Path, wanted: &HashSet<u64>) -> std::io::Result<(HashMap<u64, Owner>, Walk)> {
    let mut found = HashMap::new();
    let mut walk = Walk::default();
    if wanted.is_empty() {
        return Ok((found, walk));
    }
    let mut pids: Vec<u32> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable_by(|a, b| b.cmp(a));
    let mut kin = Kin::default();
    for pid in pids {
        let Some(sockets) = kin.sockets(root, pid, &mut walk) else {
            continue;
        };
        let hits: Vec<(u64, u32)> = sockets
            .iter()
            .filter(|(inode, _)| wanted.contains(inode) && !found.contains_key(*inode))
            .map(|(&inode, &fd)| (inode, fd))
            .collect();
        for (inode, fd) in hits {
            let holder = kin.inherited_from(root, pid, fd, inode, &mut walk);
            let name = kin.name(root, holder);
            found.insert(inode, Owner { pid: holder, name });
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    Ok((found, walk))
}

/// The sockets process `pid` holds, by inode, each with a descriptor holding it; `None` when
/// its descriptors cannot be read.
fn sockets_of(root: &Path, pid: u32, walk: &mut Walk) -> Option<HashMap<u64, u32>> {
    let fds = std::fs::read_dir(root.join(pid.to_string()).join("fd")).ok()?;
    walk.processes += 1;
    let mut out = HashMap::new();
    for fd in fds.flatten() {
        walk.descriptors += 1;
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let number = fd.file_name().to_str().and_then(|n| n.parse().ok());
        if let (Some(inode), Some(number)) =
            (socket_inode(target.as_os_str().as_encoded_bytes()), number)
        {
            out.entry(inode).or_insert(number);
        }
    }
    Some(out)
}

/// Whether descriptor `fd` of process `pid` holds socket `inode` now.
fn still_holds(root: &Path, pid: u32, fd: u32, inode: u64) -> bool {
    std::fs::read_link(root.join(pid.to_string()).join("fd").join(fd.to_string()))
        .is_ok_and(|t| socket_inode(t.as_os_str().as_encoded_bytes()) == Some(inode))
}

/// Ancestors looked at, at most, for one socket.
const ANCESTORS: usize = 16;

/// What one walk read of processes, each once however many sockets they hold: sockets,
/// parent, executable, name.
#[derive(Default)]
struct Kin {
    sockets: HashMap<u32, Option<HashMap<u64, u32>>>,
    parents: HashMap<u32, Option<u32>>,
    exes: HashMap<u32, Option<std::path::PathBuf>>,
    names: HashMap<u32, String>,
}

impl Kin {
    fn sockets(&mut self, root: &Path, pid: u32, walk: &mut Walk) -> Option<&HashMap<u64, u32>> {
        self.sockets
            .entry(pid)
            .or_insert_with(|| sockets_of(root, pid, walk))
            .as_ref()
    }

    fn parent(&mut self, root: &Path, pid: u32) -> Option<u32> {
        *self.parents.entry(pid).or_insert_with(|| {
            let stat = std::fs::read_to_string(root.join(pid.to_string()).join("stat")).ok()?;
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid > 0).then_some(ppid)
        })
    }

    /// Whether `a` and `b` run the same executable (both readable).
    fn same_program(&mut self, root: &Path, a: u32, b: u32) -> bool {
        for pid in [a, b] {
            self.exes
                .entry(pid)
                .or_insert_with(|| std::fs::read_link(root.join(pid.to_string()).join("exe")).ok());
        }
        matches!((&self.exes[&a], &self.exes[&b]), (Some(x), Some(y)) if x == y)
    }

    fn name(&mut self, root: &Path, pid: u32) -> String {
        self.names
            .entry(pid)
            .or_insert_with(|| {
                std::fs::read_to_string(root.join(pid.to_string()).join("comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_default()
            })
            .clone()
    }

    /// The oldest of `pid` (holding `inode` on descriptor `fd`) and its ancestors that holds
    /// it and that its child inherited it from: the child runs the same executable, or no
    /// longer holds it (it closed it at its exec meanwhile, or ended; its descriptor is read
    /// again for that). A parent's descriptors are read only then.
    fn inherited_from(
        &mut self,
        root: &Path,
        pid: u32,
        fd: u32,
        inode: u64,
        walk: &mut Walk,
    ) -> u32 {
        let (mut holder, mut fd) = (pid, fd);
        for _ in 0..ANCESTORS {
            let Some(up) = self.parent(root, holder) else {
                break;
            };
            let same_program = self.same_program(root, holder, up);
            if !same_program && still_holds(root, holder, fd, inode) {
                break;
            }
            let Some(&up_fd) = self
                .sockets(root, up, walk)
                .and_then(|sockets| sockets.get(&inode))
            else {
                break;
            };
            (holder, fd) = (up, up_fd);
        }
        holder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_socket_links_name_an_inode() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_holds_its_own_socket() {
        use std::os::unix::fs::MetadataExt as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let (found, walk) = find(Path::new("/proc"), &[inode].into()).unwrap();
        assert_eq!(found[&inode].pid, std::process::id());
        assert!(walk.descriptors > 0);
    }

    /// A fake process under `root`: its parent, executable and sockets.
    #[cfg(unix)]
    fn fake(root: &Path, pid: u32, ppid: u32, exe: &str, sockets: &[u64]) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        std::fs::write(dir.join("stat"), format!("{pid} (p {pid}) S {ppid} 0 0")).unwrap();
        std::fs::write(dir.join("comm"), format!("p{pid}\n")).unwrap();
        std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        for (fd, inode) in sockets.iter().enumerate() {
            std::os::unix::fs::symlink(
                format!("socket:[{inode}]"),
                dir.join("fd").join(fd.to_string()),
            )
            .unwrap();
        }
    }

    #[test]
    #[cfg(unix)]
    fn an_inherited_socket_is_its_parents_when_both_run_one_program() {
        let root = std::env::temp_dir().join(format!("netmond-owners-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // 10 a server holding 100; 20 its worker (same program) holding it too, and 200 of
        // its own; 30 a service started by 10 (another program) holding 100 as well, passed
        // on; 40 a child of 1 (not a holder) running the server's program, holding 300.
        fake(&root, 1, 0, "/sbin/init", &[]);
        fake(&root, 10, 1, "/usr/sbin/server", &[100]);
        fake(&root, 20, 10, "/usr/sbin/server", &[100, 200]);
        fake(&root, 30, 10, "/usr/bin/other", &[100, 300]);
        fake(&root, 40, 1, "/usr/sbin/server", &[400]);
        let want: HashSet<u64> = [100, 200, 300, 400].into();
        let (found, _) = find(&root, &want).unwrap();
        // Newest first finds 100 in 30 (another program than its parent: its own), …
        assert_eq!(found[&100].pid, 30);
        assert_eq!(found[&300].pid, 30);
        // … 200 only in the worker, 400 in 40 whose parent does not hold it.
        assert_eq!(found[&200].pid, 20);
        assert_eq!(found[&400].pid, 40);
        assert_eq!(found[&200].name, "p20");
        // Without the other program, the worker's copy of 100 is the server's.
        std::fs::remove_dir_all(root.join("30")).unwrap();
        let (found, _) = find(&root, &[100].into()).unwrap();
        assert_eq!(found[&100].pid, 10);
        assert_eq!(found[&100].name, "p10");
        // A child whose parent's entry is gone keeps it.
        fake(&root, 50, 49, "/usr/sbin/server", &[500]);
        let (found, _) = find(&root, &[500].into()).unwrap();
        assert_eq!(found[&500].pid, 50);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    #[cfg(unix)]
    fn the_search_up_stops_at_the_first_process_and_after_sixteen_ancestors() {
        let root = std::env::temp_dir().join(format!("netmond-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // pid 1 and its child, one program, one socket: pid 1's (whose parent is 0).
        fake(&root, 1, 0, "/sbin/init", &[7]);
        fake(&root, 2, 1, "/sbin/init", &[7]);
        // A chain 100 ← 101 ← … ← 120 of one program, all holding 9: found in 120 first,
        // it goes up sixteen.
        for pid in 100..=120 {
            fake(
                &root,
                pid,
                if pid == 100 { 1 } else { pid - 1 },
                "/bin/w",
                &[9],
            );
        }
        let (found, _) = find(&root, &[7, 9].into()).unwrap();
        assert_eq!(found[&7].pid, 1);
        assert_eq!(found[&9].pid, 120 - 16);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
