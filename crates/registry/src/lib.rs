//! A client of the OCI distribution API that pushes an OCI image layout to a registry.
//!
//! The steps of a push (see [`Client::push_layout`]):
//!
//! 1. read the layout's `index.json` and the manifest it names ([`layout`]);
//! 2. ask the registry for its auth scheme (`GET /v2/`) and learn anonymous, basic or a
//!    Bearer token challenge ([`auth`]);
//! 3. for every blob: `HEAD` it and skip it when the registry has it, else try a
//!    cross-repository mount, else upload it in one request (small) or in chunks read
//!    from disk (large) ([`upload`]);
//! 4. put each manifest with its exact media type and report the pushed digest.
//!
//! Every request is retried with backoff on 5xx, 429 and dropped connections; an
//! interrupted blob upload is cancelled and started again from its first byte. This crate
//! does no tar and no compression: it moves bytes that the image assembler wrote.

#![forbid(unsafe_code)]

pub mod auth;
mod error;
pub mod layout;
mod push;
mod reference;
mod stats;
mod transport;
mod upload;

pub use auth::Credentials;
pub use error::{Error, RegistryErrorBody};
pub use push::{BlobOutcome, Client, ClientConfig, Pushed, RetryPolicy, UploadConfig};
pub use reference::Reference;
pub use stats::{PushStats, StatsSnapshot};
