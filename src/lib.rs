//! snapsync: keep replicas of block volumes up to date across hosts,
//! shipping only the blocks that changed. This crate is the binary's glue:
//! commands, configuration, the replication engine that ties the `wire`
//! protocol to `snapshot` volumes and `blockdiff` decisions, target state
//! and the write-ahead journal.

pub mod bwlimit;
pub mod cbt;
pub mod cli;
pub mod commands;
pub mod config;
pub mod engine;
pub mod exit;
pub mod job;
pub mod journal;
pub mod metrics;
pub mod progress;
pub mod state;
pub mod transport;

/// This build's version, exchanged in the handshake for messages.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
