//! Helpers for tests that run real `eventbus` processes and raw socket peers.
#![allow(dead_code, clippy::unwrap_used)]

use bytes::BytesMut;
use daemoneye_eventbus::core::Frame;
use daemoneye_eventbus::core::codec::{
    FrameDecoder, Hello, SlowReaderPolicy, Version, max_frame_len,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn eventbus() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eventbus"));
    c.env_remove("EVENTBUS_SOCKET").env_remove("EVENTBUS_LOG");
    c
}

/// A bundled collector's program (`procmond`, `netmond`): built beside `eventbus` by the
/// workspace (`cargo test --workspace` builds every package's binaries).
pub fn collector_bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_eventbus")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: build the collectors first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "eb-{tag}-{}-{:x}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ u128::from(rand_u32())
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(1);
    h.finish() as u32
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines of a child's stream, read on a thread so waits can be bounded.
pub fn lines_of(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line satisfying `pred`, returning it; panics at the deadline.
pub fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// The connection `pred` picks in the statistics of the broker at `socket`.
pub fn connection(socket: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut stats = eventbus();
    stats
        .args(["stats", "--json"])
        .env("EVENTBUS_SOCKET", socket);
    let mut stats = Proc::spawn(stats);
    assert_eq!(stats.wait(), 0);
    let stats: serde_json::Value = serde_json::from_str(&stats.stdout_lines()[0]).unwrap();
    stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| pred(c))
        .cloned()
        .unwrap_or_else(|| panic!("no such connection: {stats}"))
}

/// A child process killed (SIGKILL) and reaped on drop if still running.
pub struct Proc {
    pub child: Child,
    pub stdout: Option<mpsc::Receiver<String>>,
    pub stderr: Option<mpsc::Receiver<String>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().map(lines_of);
        let stderr = child.stderr.take().map(lines_of);
        Self {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to this process (only ours, by PID).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for exit within the deadline; returns the exit code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit in time",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Collects the remaining stdout lines after exit.
    pub fn stdout_lines(&mut self) -> Vec<String> {
        self.stdout
            .take()
            .map(|rx| rx.iter().collect())
            .unwrap_or_default()
    }

    /// Collects the remaining stderr lines after exit.
    pub fn stderr_lines(&mut self) -> Vec<String> {
        self.stderr
            .take()
            .map(|rx| rx.iter().collect())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A broker started with `eventbus serve`, ready when it printed its endpoint.
pub struct Broker {
    pub proc: Proc,
    pub socket: PathBuf,
}

impl Broker {
    pub fn start(dir: &Path, config: Option<&str>) -> Self {
        let socket = dir.join("bus.sock");
        Self::start_at(&socket, dir, config)
    }

    pub fn start_at(socket: &Path, dir: &Path, config: Option<&str>) -> Self {
        let mut args = Vec::new();
        if let Some(text) = config {
            let file = dir.join("broker.toml");
            std::fs::write(&file, text).unwrap();
            args.push("--config".into());
            args.push(file.into_os_string());
        }
        Self::serve(socket, &args)
    }

    /// `eventbus serve --socket SOCKET ARGS…`, once it is listening.
    pub fn serve(socket: &Path, args: &[std::ffi::OsString]) -> Self {
        let mut cmd = eventbus();
        cmd.arg("serve").arg("--socket").arg(socket).args(args);
        let proc = Proc::spawn(cmd);
        let ready = wait_line(proc.stdout.as_ref().unwrap(), "listening line", |l| {
            l.starts_with("listening on unix:")
        });
        assert_eq!(ready, format!("listening on unix:{}", socket.display()));
        Self {
            proc,
            socket: socket.to_owned(),
        }
    }

    pub fn socket_arg(&self) -> String {
        self.socket.display().to_string()
    }

    /// Runs an `eventbus` client command against this broker to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = eventbus();
        cmd.args(args).env("EVENTBUS_SOCKET", &self.socket);
        let mut p = Proc::spawn(cmd);
        let code = p.wait();
        Output {
            code,
            stdout: p.stdout_lines(),
            stderr: p.stderr_lines(),
        }
    }

    /// Starts `eventbus sub` and waits until it printed `ready`.
    pub fn sub(&self, args: &[&str]) -> Proc {
        let mut cmd = eventbus();
        cmd.arg("sub")
            .args(args)
            .env("EVENTBUS_SOCKET", &self.socket);
        let p = Proc::spawn(cmd);
        wait_line(p.stderr.as_ref().unwrap(), "sub ready", |l| l == "ready");
        p
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = self.run(&["stats", "--json"]);
        assert_eq!(out.code, 0, "{out:?}");
        serde_json::from_str(&out.stdout[0]).unwrap()
    }
}

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// A hand-driven peer speaking raw frames, for bad input and stalled readers.
pub struct RawPeer {
    pub stream: UnixStream,
    buf: BytesMut,
}

impl RawPeer {
    pub fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub fn hello(name: &str, major: u16) -> Frame {
        Self::hello_version(name, Version { major, minor: 0 })
    }

    pub fn hello_version(name: &str, version: Version) -> Frame {
        Frame::Hello(Hello {
            version,
            capabilities: 0,
            max_message_size: 1 << 20,
            keepalive_ms: 60_000,
            slow_reader: SlowReaderPolicy::DropOldest,
            client_name: name.into(),
        })
    }

    /// Connects and completes the handshake as a 1.0 client.
    pub fn handshake(socket: &Path, name: &str) -> Self {
        Self::handshake_version(socket, name, Version { major: 1, minor: 0 })
    }

    /// Connects and completes the handshake speaking `version`.
    pub fn handshake_version(socket: &Path, name: &str, version: Version) -> Self {
        let mut p = Self::connect(socket);
        p.send(&Self::hello_version(name, version));
        match p.recv() {
            Some(Frame::Welcome(_)) => p,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub fn send(&mut self, frame: &Frame) {
        let mut b = BytesMut::new();
        frame.encode(&mut b);
        self.stream.write_all(&b).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Next frame, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<Frame> {
        let dec = FrameDecoder::new(max_frame_len(64 << 20));
        loop {
            if let Some(f) = dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            let n = self
                .stream
                .read(&mut chunk)
                .expect("read within the deadline");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Skips frames until one matches, returning it.
    pub fn recv_until(&mut self, pred: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            match self.recv() {
                Some(f) if pred(&f) => return f,
                Some(_) => {}
                None => panic!("stream ended before the expected frame"),
            }
        }
    }
}

/// A `[broker]` configuration whose `acl_file` grants every connection everything (written in
/// `dir`), for tests of other things than the ACL, which have tests of their own.
pub fn open_policy_config(dir: &Path) -> String {
    let policy = dir.join("open-acl.toml");
    std::fs::write(
        &policy,
        "version = 1\n[[rule]]\npublish = [\"#\"]\nsubscribe = [\"#\", \"$sys.#\"]\n\
         request = [\"#\"]\nreply = [\"#\"]\n",
    )
    .unwrap();
    format!("[broker]\nacl_file = \"{}\"\n", policy.display())
}
