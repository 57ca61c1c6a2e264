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

/// A policy file granting every connection everything (`broker.acl_file`), for tests of
/// other things than the ACL, which have tests of their own: written once per process.
#[allow(dead_code)]
pub fn open_policy() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("eb-open-policy-{}.toml", std::process::id()));
    if !path.exists() {
        // Tests run in parallel: each writes its own file, and the renames agree.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{n}"));
        std::fs::write(
            &tmp,
            "version = 1\n[[rule]]\npublish = [\"#\"]\nsubscribe = [\"#\", \"$sys.#\"]\n\
             request = [\"#\"]\nreply = [\"#\"]\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// `config` with [`open_policy`] unless it names a policy.
#[allow(dead_code)]
pub fn open(
    mut config: daemoneye_eventbus::broker::BrokerConfig,
) -> daemoneye_eventbus::broker::BrokerConfig {
    config.acl_file.get_or_insert_with(open_policy);
    config
}
pub mod pki;
