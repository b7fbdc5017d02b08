//! Integration tests of matrix-router against real parts: a throwaway PostgreSQL cluster,
//! the Fly Machines emulator running `test-upstream` as each user's daemon, and a JWKS
//! endpoint, all on loopback. Run `cargo build --workspace --bins` first.

mod binary;
mod bodies;
mod database_tls;
mod deploys;
mod deprovision;
mod fleet;
mod http2;
mod hygiene;
mod keys;
mod routes;
mod streams;
mod support;
mod tokens;
