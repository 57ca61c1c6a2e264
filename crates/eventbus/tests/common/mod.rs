//! Helpers shared by the tests of durable subscriptions and the client's spool.

#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use daemoneye_eventbus::client::{Client, Publish};
use daemoneye_eventbus::{Qos, Topic};
use std::path::PathBuf;
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(10);

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Publishes `range` Processed on `jobs.a`, each payload its number's bytes.
pub async fn publish_numbered(
    client: &Client,
    range: std::ops::Range<u32>,
) -> Vec<daemoneye_eventbus::MessageId> {
    let mut ids = Vec::with_capacity(range.len());
    for i in range {
        let p = Publish::new(
            Topic::new("jobs.a").unwrap(),
            Bytes::copy_from_slice(&i.to_le_bytes()),
        )
        .qos(Qos::Processed);
        ids.push(client.publish_with(p).await.unwrap());
    }
    ids
}
