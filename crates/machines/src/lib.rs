//! The Fly Machines API: typed bodies ([`types`]), an async client ([`client::FlyClient`])
//! and a local emulator of the same API that runs every machine as a local process
//! ([`emulator`], binary `fly-emulator`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod emulator;
pub mod types;

pub use client::{ClientOptions, FlyClient, FlyError, ListMachines, RetryPolicy};
