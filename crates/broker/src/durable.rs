//! Durable subscriptions in the data directory: `durable/<name>/meta.json` (the
//! subscription's definition, written once, atomically) and `durable/<name>/log/` (what it
//! keeps: a [`DiskStore`]). The broker reads them back when it starts.

use crate::delivery::DiskStore;
use daemoneye_eventbus_core::{DurableName, TopicFilter};
use daemoneye_eventbus_store::{Recovery, StoreError, ensure_private_dir};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The definition's format version.
const META_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    name: String,
    filters: Vec<String>,
}

/// A durable subscription read back from the data directory.
pub(crate) struct Restored {
    pub(crate) name: DurableName,
    pub(crate) filters: Vec<TopicFilter>,
    pub(crate) store: DiskStore,
    pub(crate) recovery: Recovery,
    pub(crate) undecodable: u64,
}

/// What the data directory held.
pub(crate) struct Found {
    pub(crate) durables: Vec<Restored>,
    /// Durable subscription directories set aside (their definition could not be read).
    pub(crate) damaged: Vec<String>,
}

/// Writes the definition of durable subscription `name` into `dir` (made, private).
pub(crate) fn write_meta(
    dir: &Path,
    name: &DurableName,
    filters: &[TopicFilter],
) -> Result<(), StoreError> {
    ensure_private_dir(dir)?;
    let meta = Meta {
        format: META_FORMAT,
        name: name.as_str().to_string(),
        filters: filters.iter().map(|f| f.as_str().to_string()).collect(),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("a definition serialises");
    let tmp = dir.join("meta.json.tmp");
    let path = dir.join("meta.json");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p, source }
    };
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Reads every durable subscription of data directory `data` back.
///
/// # Errors
///
/// The directory is unsafe, a log is held by another process or was written by a newer
/// build, or an I/O error. A definition that cannot be read sets its subscription aside
/// (`Found::damaged`) instead.
pub(crate) fn restore(data: &Path, segment_bytes: u64) -> Result<Found, StoreError> {
    ensure_private_dir(data)?;
    let root = data.join("durable");
    ensure_private_dir(&root)?;
    let mut found = Found {
        durables: Vec::new(),
        damaged: Vec::new(),
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|source| StoreError::Io {
            path: root.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.extension().is_none_or(|e| e != "damaged"))
        .collect();
    dirs.sort();
    for dir in dirs {
        let (name, filters) = match read_meta(&dir) {
            Ok(Some(def)) => def,
            Ok(None) => continue,
            Err(MetaError::Newer(found)) => {
                return Err(StoreError::NewerFormat {
                    path: dir.join("meta.json"),
                    found,
                    supported: META_FORMAT as u8,
                });
            }
            Err(MetaError::Damaged(why)) => {
                let aside = dir.with_extension("damaged");
                let _ = std::fs::remove_dir_all(&aside);
                std::fs::rename(&dir, &aside).map_err(|source| StoreError::Io {
                    path: dir.clone(),
                    source,
                })?;
                found.damaged.push(format!(
                    "{} ({why}), moved to {}",
                    dir.display(),
                    aside.display()
                ));
                continue;
            }
        };
        let opened = DiskStore::open(&dir.join("log"), segment_bytes)?;
        found.durables.push(Restored {
            name,
            filters,
            store: opened.store,
            recovery: opened.recovery,
            undecodable: opened.undecodable,
        });
    }
    Ok(found)
}

enum MetaError {
    Newer(u32),
    Damaged(String),
}

/// The definition in `dir`, or `None` when it has none (a subscription whose making was cut
/// short before its definition was written: nothing was promised for it).
fn read_meta(dir: &Path) -> Result<Option<(DurableName, Vec<TopicFilter>)>, MetaError> {
    let bytes = match daemoneye_eventbus_store::read_regular(&dir.join("meta.json")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(MetaError::Damaged(e.to_string())),
    };
    let meta: Meta = serde_json::from_slice(&bytes)
        .map_err(|e| MetaError::Damaged(format!("meta.json: {e}")))?;
    if meta.format > META_FORMAT {
        return Err(MetaError::Newer(meta.format));
    }
    let name = DurableName::new(&meta.name)
        .map_err(|e| MetaError::Damaged(format!("meta.json: name: {e}")))?;
    if dir.file_name().and_then(|n| n.to_str()) != Some(name.as_str()) {
        return Err(MetaError::Damaged(
            "meta.json names another subscription".into(),
        ));
    }
    let filters = meta
        .filters
        .iter()
        .map(TopicFilter::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MetaError::Damaged(format!("meta.json: filter: {e}")))?;
    if filters.is_empty() {
        return Err(MetaError::Damaged("meta.json: no filter".into()));
    }
    Ok(Some((name, filters)))
}
