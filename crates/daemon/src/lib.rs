//! `matrixd`: the per-user daemon. The HTTP API and SSE broker, the signed intent journal,
//! the model client, the `/data` layout, snapshots to S3-compatible storage, and dual
//! mode's supervisor, executor and the link between them.
//!
//! `main.rs` only calls [`cli::main`]; everything else lives here so tests can drive it.

#![forbid(unsafe_code)]

pub mod api;
pub mod archive;
pub mod broker;
pub mod cli;
pub mod config;
pub mod datalock;
pub mod executor;
pub mod failpoint;
pub mod init;
pub mod intent;
pub mod journal;
pub mod layout;
pub mod link;
pub mod model;
pub mod restore;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod supervisor;
