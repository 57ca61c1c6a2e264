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
    for pid in pids {
        let dir = root.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        walk.processes += 1;
        let mut name = None;
        for fd in fds.flatten() {
            walk.descriptors += 1;
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(target.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            if !wanted.contains(&inode) || found.contains_key(&inode) {
                continue;
            }
            let name = name
                .get_or_insert_with(|| {
                    std::fs::read_to_string(dir.join("comm"))
                        .map(|c| c.trim_end().to_owned())
                        .unwrap_or_default()
                })
                .clone();
            found.insert(inode, Owner { pid, name });
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    Ok((found, walk))
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
}
