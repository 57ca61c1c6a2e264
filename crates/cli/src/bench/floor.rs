//! The raw Unix-socket floor: two processes, one stream socket, u32-length-prefixed frames,
//! 64 KiB buffered blocking I/O. Every bus figure is reported next to it.

use super::mono_ns;
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

const BUF: usize = 64 * 1024;

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    if let Err(e) = r.read_exact(&mut len) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(false)
        } else {
            Err(e)
        };
    }
    buf.resize(u32::from_le_bytes(len) as usize, 0);
    r.read_exact(buf)?;
    Ok(true)
}

fn write_frame(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(payload)
}

/// Serves one client: frames with a leading 0 byte are counted, frames with a leading 1 byte
/// are echoed; prints the time the last counted frame arrived.
pub(crate) fn server(path: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
    println!("ready");
    let (stream, _) = listener.accept()?;
    let mut r = BufReader::with_capacity(BUF, stream.try_clone()?);
    let mut w = BufWriter::with_capacity(BUF, stream);
    let (mut buf, mut counted, mut last) = (Vec::new(), 0u64, 0u64);
    while read_frame(&mut r, &mut buf)? {
        if buf.first() == Some(&1) {
            write_frame(&mut w, &buf)?;
            w.flush()?;
        } else {
            counted += 1;
            last = mono_ns();
        }
    }
    println!("{}", json!({"received": counted, "last_ns": last}));
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Streams `count` frames of `size` bytes, then runs `pingpong` echo round trips.
pub(crate) fn client(path: &str, count: u64, pingpong: u64, size: usize) -> Result<()> {
    let stream = UnixStream::connect(path).with_context(|| format!("connecting to {path}"))?;
    let mut r = BufReader::with_capacity(BUF, stream.try_clone()?);
    let mut w = BufWriter::with_capacity(BUF, stream.try_clone()?);
    let mut payload = vec![0u8; size.max(1)];
    let start = mono_ns();
    for _ in 0..count {
        write_frame(&mut w, &payload)?;
    }
    w.flush()?;
    payload[0] = 1;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut buf = Vec::new();
    let mut ping_start = 0;
    for i in 0..pingpong + 1000 {
        if i == 1000 {
            ping_start = mono_ns();
        }
        let t0 = mono_ns();
        write_frame(&mut w, &payload)?;
        w.flush()?;
        read_frame(&mut r, &mut buf)?;
        if i >= 1000 {
            hist.record(((mono_ns() - t0) / 1000).max(1))?;
        }
    }
    let end = mono_ns();
    stream.shutdown(std::net::Shutdown::Write)?;
    println!(
        "{}",
        json!({"start_ns": start, "ping_start_ns": ping_start, "end_ns": end,
            "p50_us": hist.value_at_quantile(0.5), "p99_us": hist.value_at_quantile(0.99),
            "p999_us": hist.value_at_quantile(0.999), "max_us": hist.max()})
    );
    Ok(())
}
