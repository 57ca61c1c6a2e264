//! Windows named pipes (`\\.\pipe\NAME`). Compiled only on Windows.

use crate::error::TransportError;
use crate::{Connection, PeerInfo, TransportKind};
use std::time::Duration;
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer, ServerOptions};

/// Windows error code for "all pipe instances are busy".
const ERROR_PIPE_BUSY: i32 = 231;

fn full_name(name: &str) -> String {
    format!(r"\\.\pipe\{name}")
}

/// Accepts pipe clients, keeping one server instance ready at all times.
pub(crate) struct PipeListener {
    name: String,
    next: NamedPipeServer,
}

impl PipeListener {
    pub(crate) fn bind(name: &str) -> Result<Self, TransportError> {
        let name = full_name(name);
        // `first_pipe_instance` refuses to start when another broker owns the name.
        let next = ServerOptions::new()
            .first_pipe_instance(true)
            .reject_remote_clients(true)
            .create(&name)
            .map_err(|e| TransportError::io(format!("creating pipe {name}"), e))?;
        Ok(Self { name, next })
    }

    pub(crate) async fn accept(&mut self) -> std::io::Result<Connection> {
        self.next.connect().await?;
        let fresh = ServerOptions::new()
            .reject_remote_clients(true)
            .create(&self.name)?;
        let connected = std::mem::replace(&mut self.next, fresh);
        Ok(pipe_connection(connected))
    }
}

/// A connection over either end of a pipe.
fn pipe_connection<S>(stream: S) -> Connection
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    crate::split_stream(
        stream,
        PeerInfo {
            transport: TransportKind::NamedPipe,
            ..PeerInfo::default()
        },
    )
}

pub(crate) async fn connect(name: &str) -> Result<Connection, TransportError> {
    let name = full_name(name);
    let mut attempts = 0;
    let client = loop {
        match ClientOptions::new().open(&name) {
            Ok(c) => break c,
            // Bounded: 50 × 20 ms while every instance is busy.
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(TransportError::io(format!("connecting to pipe {name}"), e)),
        }
    };
    Ok(pipe_connection(client))
}
