//! Protocol Buffers schemas of daemoneye-eventbus (`proto/` in this crate), compiled with
//! protox and prost at build time. Unknown fields are tolerated, so schemas evolve compatibly.

/// `daemoneye.events.v1`: event payloads.
#[allow(missing_docs, clippy::all)]
pub mod events {
    include!(concat!(env!("OUT_DIR"), "/daemoneye.events.v1.rs"));
}
