//! Test support: a real registry, deterministic images, a token endpoint, a faulty proxy.
#![allow(dead_code)]

pub mod images;
pub mod proxy;
pub mod rewrite;
pub mod server;
pub mod token;
