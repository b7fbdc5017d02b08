//! Real local services for tests and for `cargo xtask dev`.
//!
//! Every harness starts a real program (PostgreSQL, an S3-compatible server, a model
//! server, a test upstream) on loopback with a port chosen by the kernel, and stops it
//! when its handle is dropped. Nothing here talks to anything but loopback.

pub mod llm;
pub mod postgres;
pub mod process;
pub mod s3;
pub mod tools;
