//! Starting collector processes: their own process group, resource limits, and (on Linux) a
//! parent-death signal, from one long-lived thread.
//!
//! The parent-death signal is tied to the *thread* that forked the child, so children are
//! forked by a dedicated spawner thread that lives as long as the supervisor, never by a
//! runtime thread that may come and go. Each child gets a waiter thread that reaps it and
//! reports how it ended.
//!
//! A child may be *gated*: between fork and exec it tells its pid through a pipe and waits
//! until the supervisor has told the broker that this pid is the collector, so the collector
//! never connects, publishes or serves before the broker knows who it is.

use super::CollectorSpec;
use std::io;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use tokio::sync::{oneshot, watch};

/// A started child.
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    /// `Some` once the child has ended (set by its waiter thread).
    pub(crate) exit: watch::Receiver<Option<ExitStatus>>,
    /// What signals it.
    pub(crate) handle: Handle,
}

/// What the supervisor asks of a running child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sig {
    /// Suspend (SIGSTOP; Unix only).
    Stop,
    /// Resume (SIGCONT; Unix only).
    Continue,
    /// Ask to end (SIGTERM; off Unix, the same as [`Sig::Kill`]).
    Terminate,
    /// End now (SIGKILL; off Unix, `TerminateProcess` through the standard library).
    Kill,
}

/// Signals one child: on Unix its process group (collectors lead their own), elsewhere the
/// process itself through its waiter thread, which holds it.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    #[cfg(unix)]
    pid: u32,
    /// Set to have the waiter thread kill the child.
    #[cfg(not(unix))]
    kill: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Handle {
    /// Sends `sig`; `false` when this platform cannot (suspending and resuming off Unix).
    pub(crate) fn signal(&self, sig: Sig) -> bool {
        #[cfg(unix)]
        {
            use nix::sys::signal::Signal;
            let sig = match sig {
                Sig::Stop => Signal::SIGSTOP,
                Sig::Continue => Signal::SIGCONT,
                Sig::Terminate => Signal::SIGTERM,
                Sig::Kill => Signal::SIGKILL,
            };
            if let Ok(pid) = i32::try_from(self.pid) {
                // ESRCH: already gone.
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
            }
            true
        }
        #[cfg(not(unix))]
        match sig {
            Sig::Stop | Sig::Continue => false,
            Sig::Terminate | Sig::Kill => {
                self.kill.store(true, std::sync::atomic::Ordering::Release);
                true
            }
        }
    }
}

/// How often a waiter thread off Unix looks whether its child ended or is to be killed.
#[cfg(not(unix))]
const WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(20);

/// Run with the child's pid after its fork and before its exec (the child waits for it).
pub(crate) type BeforeExec = Box<dyn FnOnce(u32) + Send>;

/// A start that failed, with the pid `BeforeExec` was given if the child got that far.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub(crate) error: io::Error,
    pub(crate) pid: Option<u32>,
}

impl From<io::Error> for SpawnError {
    fn from(error: io::Error) -> Self {
        Self { error, pid: None }
    }
}

struct Job {
    spec: CollectorSpec,
    extra_env: Vec<(String, String)>,
    before_exec: Option<BeforeExec>,
    reply: oneshot::Sender<Result<Spawned, SpawnError>>,
}

/// The spawner thread's handle. Dropping it ends the thread (children keep running; the
/// supervisor stops them first).
pub(crate) struct Spawner {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawner {
    pub(crate) fn start() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("collector-spawner".into())
            .spawn(move || {
                for job in rx {
                    let _ = job
                        .reply
                        .send(spawn_one(&job.spec, &job.extra_env, job.before_exec));
                }
            })?;
        Ok(Self {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Starts `spec` with `extra_env` added to its environment; `before_exec` runs with the
    /// child's pid before the child runs its program (on Unix; elsewhere just after).
    pub(crate) async fn spawn(
        &self,
        spec: &CollectorSpec,
        extra_env: Vec<(String, String)>,
        before_exec: Option<BeforeExec>,
    ) -> Result<Spawned, SpawnError> {
        let stopped = || SpawnError::from(io::Error::other("the spawner thread has stopped"));
        let (reply, rx) = oneshot::channel();
        let job = Job {
            spec: spec.clone(),
            extra_env,
            before_exec,
            reply,
        };
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(stopped)?;
        rx.await.map_err(|_| stopped())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_one(
    spec: &CollectorSpec,
    extra_env: &[(String, String)],
    before_exec: Option<BeforeExec>,
) -> Result<Spawned, SpawnError> {
    let mut cmd = Command::new(&spec.binary);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    #[cfg(unix)]
    let gate = before_exec.map(Gate::open).transpose()?;
    #[cfg(not(unix))]
    let gate: Option<Gate> = None;
    configure(&mut cmd, spec, gate.as_ref().map(Gate::child_ends));
    let spawned = cmd.spawn();
    // The gate's thread has run `before_exec` if the child got as far as telling its pid.
    let gated = gate.and_then(Gate::close);
    let mut child = spawned.map_err(|e| SpawnError {
        error: io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", spec.binary.display()),
        ),
        pid: gated,
    })?;
    let pid = child.id();
    #[cfg(not(unix))]
    if let Some(f) = before_exec {
        f(pid);
    }
    let (tx, exit) = watch::channel(None);
    #[cfg(unix)]
    let handle = Handle { pid };
    #[cfg(not(unix))]
    let handle = Handle {
        kill: std::sync::Arc::default(),
    };
    #[cfg(not(unix))]
    let kill = std::sync::Arc::clone(&handle.kill);
    std::thread::Builder::new()
        .name(format!("reap-{}", spec.id))
        .spawn(move || {
            #[cfg(unix)]
            let status = child.wait();
            // No process groups or signals: the waiter holds the child, looks every step
            // whether it ended, and kills it when asked.
            #[cfg(not(unix))]
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break Ok(s),
                    Ok(None) if kill.load(std::sync::atomic::Ordering::Acquire) => {
                        let _ = child.kill();
                        break child.wait();
                    }
                    Ok(None) => std::thread::sleep(WAIT_STEP),
                    Err(e) => break Err(e),
                }
            };
            // A wait error leaves `None`: the supervisor then learns of the end from the
            // sender being dropped.
            if let Ok(s) = status {
                let _ = tx.send(Some(s));
            }
        })?;
    Ok(Spawned { pid, exit, handle })
}

/// The two pipes between a forked child and a thread of ours: the child writes its pid on
/// one and waits for a byte on the other, which the thread sends once `before_exec` ran.
#[cfg(unix)]
struct Gate {
    /// The child's ends (its pid goes out on `pid_w`; it waits on `go_r`), closed here once
    /// the child has exec'd or failed, so that the thread sees the end of `pid_r`.
    pid_w: std::os::fd::OwnedFd,
    go_r: std::os::fd::OwnedFd,
    /// The thread's ends, which the child closes so that only the thread holds them.
    ours: (i32, i32),
    thread: std::thread::JoinHandle<Option<u32>>,
}

#[cfg(unix)]
impl Gate {
    fn open(before_exec: BeforeExec) -> io::Result<Self> {
        use nix::fcntl::OFlag;
        use std::io::{Read, Write};
        let (pid_r, pid_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(errno)?;
        let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(errno)?;
        let ours = {
            use std::os::fd::AsRawFd;
            (pid_r.as_raw_fd(), go_w.as_raw_fd())
        };
        let thread = std::thread::Builder::new()
            .name("collector-gate".into())
            .spawn(move || {
                let mut pid = [0u8; 4];
                // The end of the pipe before 4 bytes: the child failed before telling.
                std::fs::File::from(pid_r).read_exact(&mut pid).ok()?;
                let pid = u32::from_ne_bytes(pid);
                before_exec(pid);
                // The child may have died meanwhile: nothing to tell then.
                let _ = std::fs::File::from(go_w).write_all(&[1]);
                Some(pid)
            })?;
        Ok(Self {
            pid_w,
            go_r,
            ours,
            thread,
        })
    }

    /// The descriptors for the pre-exec hook.
    fn child_ends(&self) -> GateFds {
        use std::os::fd::AsRawFd;
        GateFds {
            pid_w: self.pid_w.as_raw_fd(),
            go_r: self.go_r.as_raw_fd(),
            pid_r: self.ours.0,
            go_w: self.ours.1,
        }
    }

    /// After the spawn: the pid given to `before_exec`, if it ran.
    fn close(self) -> Option<u32> {
        drop(self.pid_w);
        drop(self.go_r);
        self.thread.join().ok().flatten()
    }
}

/// The gate's descriptors as the child sees them after the fork (off Unix, never made).
#[derive(Clone, Copy)]
#[cfg_attr(not(unix), allow(dead_code))]
struct GateFds {
    pid_w: i32,
    go_r: i32,
    pid_r: i32,
    go_w: i32,
}

/// Off Unix there is no gate: `before_exec` runs just after the spawn.
#[cfg(not(unix))]
enum Gate {}

#[cfg(not(unix))]
impl Gate {
    fn child_ends(&self) -> GateFds {
        match *self {}
    }
    fn close(self) -> Option<u32> {
        match self {}
    }
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn configure(cmd: &mut Command, spec: &CollectorSpec, gate: Option<GateFds>) {
    use std::os::unix::process::CommandExt;
    // Its own process group: signals reach the collector and everything it started.
    cmd.process_group(0);
    let limits = spec.limits.clone();
    let parent = std::process::id();
    let hook = move || -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use nix::sys::signal::Signal;
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL)).map_err(errno)?;
            // The parent may have died between fork and prctl: then no signal will come.
            if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
        }
        let _ = parent;
        use nix::sys::resource::{Resource, setrlimit};
        if let Some(bytes) = limits.max_memory_bytes {
            setrlimit(Resource::RLIMIT_AS, bytes, bytes).map_err(errno)?;
        }
        if let Some(files) = limits.max_open_files {
            setrlimit(Resource::RLIMIT_NOFILE, files, files).map_err(errno)?;
        }
        if let Some(secs) = limits.max_cpu_seconds {
            setrlimit(Resource::RLIMIT_CPU, secs, secs).map_err(errno)?;
        }
        if let Some(fds) = gate {
            wait_at_gate(fds)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec. It only makes system calls
    // that are async-signal-safe (prctl, getppid, setrlimit, getpid, write, read), allocates
    // nothing, and touches no lock: the limits and descriptors were copied into the closure
    // before the fork.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// In the child: tells its pid on `pid_w` and waits for the go byte on `go_r` (after closing
/// its copies of the other ends, so that a thread that gives up is seen as the end of `go_r`).
#[cfg(unix)]
#[allow(unsafe_code)]
fn wait_at_gate(fds: GateFds) -> io::Result<()> {
    use nix::libc;
    let GateFds {
        pid_w,
        go_r,
        pid_r,
        go_w,
    } = fds;
    let pid = std::process::id().to_ne_bytes();
    // SAFETY: the four descriptors are open in the child (inherited, closed only at exec,
    // and the two closed here are never used again in it), and the buffers are live locals of
    // the right length; close, write and read are async-signal-safe.
    unsafe {
        libc::close(pid_r);
        libc::close(go_w);
        loop {
            let n = libc::write(pid_w, pid.as_ptr().cast(), pid.len());
            if n == 4 {
                break;
            }
            if n >= 0 || nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
        }
        let mut go = [0u8; 1];
        loop {
            match libc::read(go_r, go.as_mut_ptr().cast(), 1) {
                1 => return Ok(()),
                // The supervisor went away without opening the gate.
                0 => return Err(io::Error::from_raw_os_error(libc::ECANCELED)),
                _ if nix::errno::Errno::last() == nix::errno::Errno::EINTR => {}
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }
}

#[cfg(unix)]
fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

#[cfg(not(unix))]
fn configure(_cmd: &mut Command, _spec: &CollectorSpec, _gate: Option<GateFds>) {}
