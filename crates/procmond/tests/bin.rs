//! The `procmond` program's own refusals (the collector at work is tested across processes
//! with a broker and the agent in `crates/cli/tests/procmond.rs` and `agent.rs`).
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn procmond_refuses_an_unknown_source_and_names_an_absent_broker() {
    let out = Command::new(env!("CARGO_BIN_EXE_procmond"))
        .args(["--source", "ebpf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ebpf") && err.contains("kernel"), "{err}");
    let socket = std::env::temp_dir().join(format!("procmond-bin-{}.sock", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_procmond"))
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&socket.display().to_string()), "{err}");
}
