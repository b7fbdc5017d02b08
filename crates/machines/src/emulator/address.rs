//! Private addresses: one 127.x.y.z per machine, like Fly's per-machine 6PN address.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use rand::Rng;

/// A random loopback address other than 127.0.0.1, not in `taken`, on which `port` is free.
///
/// Linux routes all of 127.0.0.0/8 to the loopback interface, so any of these addresses
/// can be bound without configuration.
pub(crate) fn allocate(taken: &BTreeSet<Ipv4Addr>, port: u16) -> Option<Ipv4Addr> {
    let mut rng = rand::thread_rng();
    (0..1000).find_map(|_| {
        let candidate =
            Ipv4Addr::new(127, rng.gen_range(1..=254), rng.gen(), rng.gen_range(2..=254));
        let usable = !taken.contains(&candidate) && is_free(candidate, port);
        usable.then_some(candidate)
    })
}

fn is_free(address: Ipv4Addr, port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(address, port)).is_ok()
}
