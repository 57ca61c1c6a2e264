//! Starting collector processes: their own process group, resource limits, and (on Linux) a
//! parent-death signal, from one long-lived thread.
//!
//! The parent-death signal is tied to the *thread* that forked the child, so children are
//! forked by a dedicated spawner thread that lives as long as the supervisor, never by a
//! runtime thread that may come and go. Each child gets a waiter thread that reaps it and
//! reports how it ended.

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
}

struct Job {
    spec: CollectorSpec,
    extra_env: Vec<(String, String)>,
    reply: oneshot::Sender<io::Result<Spawned>>,
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
                    let _ = job.reply.send(spawn_one(&job.spec, &job.extra_env));
                }
            })?;
        Ok(Self {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Starts `spec` with `extra_env` added to its environment.
    pub(crate) async fn spawn(
        &self,
        spec: &CollectorSpec,
        extra_env: Vec<(String, String)>,
    ) -> io::Result<Spawned> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            spec: spec.clone(),
            extra_env,
            reply,
        };
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| io::Error::other("the spawner thread has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the spawner thread has stopped"))?
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

fn spawn_one(spec: &CollectorSpec, extra_env: &[(String, String)]) -> io::Result<Spawned> {
    let mut cmd = Command::new(&spec.binary);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    configure(&mut cmd, spec);
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", spec.binary.display()),
        )
    })?;
    let pid = child.id();
    let (tx, exit) = watch::channel(None);
    std::thread::Builder::new()
        .name(format!("reap-{}", spec.id))
        .spawn(move || {
            let status = child.wait();
            // A wait error leaves `None`: the supervisor then learns of the end from the
            // sender being dropped.
            if let Ok(s) = status {
                let _ = tx.send(Some(s));
            }
        })?;
    Ok(Spawned { pid, exit })
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn configure(cmd: &mut Command, spec: &CollectorSpec) {
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
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec. It only makes system calls
    // that are async-signal-safe (prctl, getppid, setrlimit), allocates nothing, and touches
    // no lock: the limits were copied into the closure before the fork.
    unsafe {
        cmd.pre_exec(hook);
    }
}

#[cfg(unix)]
fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

#[cfg(not(unix))]
fn configure(_cmd: &mut Command, _spec: &CollectorSpec) {}
