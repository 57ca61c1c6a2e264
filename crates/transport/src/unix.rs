//! Unix domain sockets with safe paths (DESIGN §6).
//!
//! - The default socket lives in a directory of ours with mode 0700 (`$XDG_RUNTIME_DIR/daemoneye`,
//!   or for root `/run/daemoneye`; never a shared temporary directory); an existing directory
//!   must be ours and not a symlink.
//! - Broker and client check the directory chain of every socket path (no symlink, each
//!   directory ours or root's, none writable by others unless sticky), and a client the
//!   socket's owner (us or root), before binding or connecting.
//! - An existing socket path is replaced only when it is a socket of ours that nobody answers
//!   on (stale); a live broker's socket is never stolen; symlinks are never followed.
//! - The socket is bound inside a fresh 0700 staging directory, set to 0600, then renamed into
//!   place, so no other user can connect during the window before `chmod`.
//! - The listener's guard removes the socket file on drop if it is still the one we bound.

use crate::error::TransportError;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the socket file.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of the socket's private directory.
pub const DIR_MODE: u32 = 0o700;
/// File name of the default socket.
pub const DEFAULT_SOCKET_NAME: &str = "eventbus.sock";

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Where root's default socket lives when `XDG_RUNTIME_DIR` is not set: a directory only root
/// can create.
pub const ROOT_SOCKET_DIR: &str = "/run/daemoneye";

/// The default socket path: `$XDG_RUNTIME_DIR/daemoneye/eventbus.sock` when that variable
/// names an existing directory (one only its user can create in), else for root
/// `/run/daemoneye/eventbus.sock`. Other users have none: a shared temporary directory is
/// one another user could create first.
///
/// # Errors
///
/// [`TransportError::NoDefaultPath`].
pub fn default_socket_path() -> Result<PathBuf, TransportError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .map(|p| p.join("daemoneye"));
    match base {
        Some(b) => Ok(b.join(DEFAULT_SOCKET_NAME)),
        None if uid() == 0 => Ok(Path::new(ROOT_SOCKET_DIR).join(DEFAULT_SOCKET_NAME)),
        None => Err(TransportError::NoDefaultPath),
    }
}

/// `path` made absolute (from the working directory), or why not.
/// What `path` itself is (a link is not followed); `None` when nothing is there.
fn inspect(path: &Path) -> Result<Option<fs::Metadata>, TransportError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TransportError::io(
            format!("inspecting {}", path.display()),
            e,
        )),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, TransportError> {
    std::path::absolute(path)
        .map_err(|e| TransportError::io(format!("resolving {}", path.display()), e))
}

/// Checks every directory from `/` down to `dir` (absolute): none a symbolic link, each owned
/// by us or root, none writable by its group or others unless sticky (like `/tmp`, where only
/// an entry's owner may remove it). Another user could otherwise put their own socket, or a
/// link elsewhere, where ours is expected.
///
/// # Errors
///
/// [`TransportError::UnsafePath`] naming the first unsafe component and what to do, or an
/// I/O error.
pub fn check_dir_chain(dir: &Path) -> Result<(), TransportError> {
    let me = uid();
    let dir = absolute(dir)?;
    let mut at = PathBuf::new();
    for part in dir.components() {
        at.push(part);
        // Missing: nothing further to trust or distrust; binding or connecting will say so.
        let Some(meta) = inspect(&at)? else {
            return Ok(());
        };
        let unsafe_because = |reason: String| TransportError::UnsafePath {
            path: at.clone(),
            reason,
        };
        if meta.file_type().is_symlink() {
            let to = fs::read_link(&at).map_or_else(|_| "?".into(), |t| t.display().to_string());
            return Err(unsafe_because(format!(
                "it is a symbolic link (to {to}), which is never followed; give the real path"
            )));
        }
        if !meta.is_dir() {
            return Err(unsafe_because("it is not a directory".into()));
        }
        if meta.uid() != me && meta.uid() != 0 {
            return Err(unsafe_because(format!(
                "it is owned by uid {}, neither this user ({me}) nor root: that user could put another socket there; use a directory of your own",
                meta.uid()
            )));
        }
        let mode = meta.mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(unsafe_because(format!(
                "its mode {:o} lets others write to it, and it is not sticky: they could replace the socket; chmod go-w it",
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Checks a socket before connecting to it: its directory chain ([`check_dir_chain`]), and
/// the socket itself, a socket (not a link) owned by us or root.
///
/// # Errors
///
/// As [`check_dir_chain`]; [`TransportError::UnsafePath`] for the socket.
pub fn check_socket(path: &Path) -> Result<(), TransportError> {
    let path = absolute(path)?;
    if let Some(parent) = path.parent() {
        check_dir_chain(parent)?;
    }
    // Missing: connecting will say there is no broker.
    let Some(meta) = inspect(&path)? else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        return Err(TransportError::Symlink(path));
    }
    let me = uid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(TransportError::UnsafePath {
            path,
            reason: format!(
                "the socket is owned by uid {}, neither this user ({me}) nor root: it is not a broker of ours",
                meta.uid()
            ),
        });
    }
    Ok(())
}

/// Creates `dir` with mode 0700, or checks an existing one: a real directory (not a symlink)
/// owned by us; a wider mode is tightened to 0700.
///
/// # Errors
///
/// [`TransportError::Symlink`], [`TransportError::ForeignOwner`], or an I/O error naming the
/// path.
pub fn ensure_private_dir(dir: &Path) -> Result<(), TransportError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(DIR_MODE)
                .create(dir)
                .or_else(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| TransportError::io(format!("creating {}", dir.display()), e))?;
            check_private_dir(dir)
        }
        Err(e) => Err(TransportError::io(
            format!("inspecting {}", dir.display()),
            e,
        )),
        Ok(_) => check_private_dir(dir),
    }
}

fn check_private_dir(dir: &Path) -> Result<(), TransportError> {
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| TransportError::io(format!("inspecting {}", dir.display()), e))?;
    if meta.file_type().is_symlink() {
        return Err(TransportError::Symlink(dir.to_owned()));
    }
    if !meta.is_dir() {
        let e = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
        return Err(TransportError::io(format!("using {}", dir.display()), e));
    }
    if meta.uid() != uid() {
        return Err(TransportError::ForeignOwner {
            path: dir.to_owned(),
            owner: meta.uid(),
            expected: uid(),
        });
    }
    if meta.mode() & 0o777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(|e| {
            TransportError::io(format!("setting mode 0700 on {}", dir.display()), e)
        })?;
    }
    Ok(())
}

/// Removes a stale socket at `path`, or explains why the path cannot be used.
fn clear_stale(path: &Path) -> Result<(), TransportError> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(TransportError::io(
                format!("inspecting {}", path.display()),
                e,
            ));
        }
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() {
        return Err(TransportError::Symlink(path.to_owned()));
    }
    if !meta.file_type().is_socket() {
        return Err(TransportError::NotASocket(path.to_owned()));
    }
    if meta.uid() != uid() {
        return Err(TransportError::ForeignOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            expected: uid(),
        });
    }
    let remove = || {
        fs::remove_file(path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| TransportError::io(format!("removing stale {}", path.display()), e))
    };
    match std::os::unix::net::UnixStream::connect(path) {
        // A process killed a moment ago still holds its listening socket until its exit has
        // released its files (its address space goes first): the socket accepts connections
        // that nobody will ever answer. Its owner is told apart from a live broker by the
        // kernel's record of it, so a restart right after `kill -9` takes the path over.
        Ok(probe) if listener_is_dead(&probe) => remove(),
        Ok(_) => Err(TransportError::AddressInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => remove(),
        Err(e) => Err(TransportError::io(format!("probing {}", path.display()), e)),
    }
}

/// Whether the process that listens on the other end of `probe` is dead or dying: gone, a
/// zombie, exiting, or with SIGKILL pending. `false` when it cannot be told (then the socket
/// counts as live: a live broker is never replaced).
#[cfg(target_os = "linux")]
fn listener_is_dead(probe: &std::os::unix::net::UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let Ok(cred) = getsockopt(probe, PeerCredentials) else {
        return false;
    };
    let pid = cred.pid();
    if pid <= 0 {
        return false;
    }
    let read = |what: &str| fs::read_to_string(format!("/proc/{pid}/{what}"));
    match (read("stat"), read("status")) {
        (Ok(stat), Ok(status)) => process_is_dying(&stat, &status),
        (Err(e), _) | (_, Err(e)) => e.kind() == io::ErrorKind::NotFound,
    }
}

#[cfg(not(target_os = "linux"))]
fn listener_is_dead(_probe: &std::os::unix::net::UnixStream) -> bool {
    false
}

/// The task is exiting (`PF_EXITING` in `/proc/PID/stat`'s flags).
const PF_EXITING: u64 = 0x4;
/// SIGKILL's bit in `/proc/PID/status`'s pending-signal masks.
const SIGKILL_BIT: u64 = 1 << (9 - 1);

/// From `/proc/PID/stat` and `/proc/PID/status`: whether the process is a zombie or dead,
/// exiting, or has SIGKILL pending (it will never answer again).
fn process_is_dying(stat: &str, status: &str) -> bool {
    // The fields after the command name, which is in parentheses and may hold anything.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let state = fields.first().copied().unwrap_or("");
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    let kill_pending = status.lines().any(|l| {
        l.strip_prefix("SigPnd:")
            .or_else(|| l.strip_prefix("ShdPnd:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & SIGKILL_BIT != 0)
    });
    matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0 || kill_pending
}

/// Removes the socket file on drop if it is still the one this listener bound.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    ino: u64,
}

impl SocketGuard {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && meta.ino() == self.ino
            && meta.file_type().is_socket()
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds a listening socket at `path` with the rules of this module. When `path` is the
/// default path, its directory is created or checked as private first.
///
/// # Errors
///
/// Any [`TransportError`] naming the path and the reason.
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, SocketGuard), TransportError> {
    let path = &absolute(path)?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    if default_socket_path().is_ok_and(|d| d == *path) {
        ensure_private_dir(parent)?;
    }
    check_dir_chain(parent)?;
    clear_stale(path)?;
    let staging = parent.join(format!(
        ".eventbus-bind-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(&staging)
        .map_err(|e| TransportError::io(format!("creating {}", staging.display()), e))?;
    let result = bind_staged(&staging, path);
    let _ = fs::remove_dir_all(&staging);
    result
}

fn bind_staged(
    staging: &Path,
    path: &Path,
) -> Result<(tokio::net::UnixListener, SocketGuard), TransportError> {
    let tmp = staging.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| TransportError::io(format!("binding {}", path.display()), e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| TransportError::io(format!("setting mode 0600 on {}", path.display()), e))?;
    // Re-check, then link (not rename): linking fails if anything appeared at the path
    // meanwhile, so a broker that started in between is never replaced.
    clear_stale(path)?;
    fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => TransportError::AddressInUse(path.to_owned()),
        _ => TransportError::io(format!("moving socket into {}", path.display()), e),
    })?;
    let ino = fs::symlink_metadata(path)
        .map_err(|e| TransportError::io(format!("inspecting {}", path.display()), e))?
        .ino();
    listener
        .set_nonblocking(true)
        .map_err(|e| TransportError::io("setting the socket non-blocking", e))?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| TransportError::io("registering the socket with tokio", e))?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            ino,
        },
    ))
}

/// The executable of the process at the other end of `stream`, whose pid the kernel gave as
/// `pid` (Linux): read from `/proc/PID/exe`, then kept only if the pidfd the kernel gave for
/// the connecting process still names `pid` (it stayed alive, so the pid was not reused by
/// another process meanwhile). `None` where pidfds are missing (before Linux 6.5) or the peer
/// is gone.
#[cfg(target_os = "linux")]
pub(crate) fn peer_exe(stream: &tokio::net::UnixStream, pid: i32) -> Option<std::path::PathBuf> {
    use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
    use std::os::fd::AsRawFd;
    let pidfd = getsockopt(stream, PeerPidfd).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    let alive_as = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())?;
    (alive_as == pid).then_some(exe)
}

/// Executables are read on Linux only.
#[cfg(not(target_os = "linux"))]
pub(crate) fn peer_exe(_: &tokio::net::UnixStream, _: i32) -> Option<std::path::PathBuf> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIVE_STATUS: &str =
        "Name:\teventbus\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n";

    #[test]
    fn a_dying_listener_is_told_from_a_live_one() {
        // The command name may hold spaces and parentheses.
        let stat = |state: &str, flags: u64| {
            format!("4242 (event bus (x)) {state} 1 4242 4242 0 -1 {flags} 0 0 0 0")
        };
        assert!(!process_is_dying(&stat("S", 0x0040_0000), ALIVE_STATUS));
        assert!(!process_is_dying(&stat("R", 0x0040_0000), ALIVE_STATUS));
        assert!(process_is_dying(&stat("Z", 0x0040_0000), ALIVE_STATUS));
        assert!(process_is_dying(&stat("X", 0), ALIVE_STATUS));
        assert!(
            process_is_dying(&stat("R", 0x0040_0004), ALIVE_STATUS),
            "exiting"
        );
        let killed = "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n";
        assert!(process_is_dying(&stat("S", 0), killed), "SIGKILL pending");
        let termed = "SigPnd:\t0000000000004000\nShdPnd:\t0000000000000000\n";
        assert!(
            !process_is_dying(&stat("S", 0), termed),
            "only SIGTERM pending"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_live_listener_is_not_dead_and_a_refused_path_is_stale() {
        let dir = std::env::temp_dir().join(format!("eb-unix-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let probe = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(!listener_is_dead(&probe), "this very process listens");
        assert!(matches!(
            clear_stale(&path),
            Err(TransportError::AddressInUse(_))
        ));
        drop(probe);
        drop(listener);
        clear_stale(&path).unwrap();
        assert!(!path.exists(), "the stale socket was removed");
        let _ = fs::remove_dir_all(&dir);
    }
}
