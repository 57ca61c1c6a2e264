//! The `netmond` program's own refusals (the collector at work is tested across processes
//! with the agent and a broker in `crates/cli/tests/netmond.rs`).
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn netmond_names_a_broker_it_cannot_reach_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("netmond-bin-{}", std::process::id()));
    let socket = dir.join("absent.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_netmond"))
        .arg("--socket")
        .arg(&socket)
        .env_remove("EVENTBUS_TLS_CERT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&socket.display().to_string()), "{err}");
    // tls:// without the client's certificate is refused before any connection.
    let out = Command::new(env!("CARGO_BIN_EXE_netmond"))
        .args(["--socket", "tls://127.0.0.1:1"])
        .env_remove("EVENTBUS_TLS_CERT")
        .env_remove("EVENTBUS_TLS_KEY")
        .env_remove("EVENTBUS_TLS_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --tls-cert"), "{err}");
    // An out-of-range scan interval is refused by name.
    let out = Command::new(env!("CARGO_BIN_EXE_netmond"))
        .args(["--scan-interval-ms", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scan-interval-ms"));
}
