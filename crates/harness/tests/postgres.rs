//! The throwaway cluster is a real server that stops with its handle.

use std::process::Command;

use harness::postgres::PgCluster;

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql").args([url, "-tAc", sql]).output().expect("run psql");
    assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

#[test]
fn cluster_serves_queries_and_stops_on_drop() {
    let Some(cluster) = PgCluster::start().expect("start cluster") else { return };
    let url = cluster.create_database("harness_check").expect("createdb");

    assert_eq!(psql(&url, "select current_database()"), "harness_check");
    psql(&url, "create table t (v int); insert into t values (41), (1)");
    assert_eq!(psql(&url, "select sum(v) from t"), "42");

    let port = cluster.port();
    drop(cluster);
    let refused = std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
    assert!(refused, "the server still listens on {port} after drop");
}

#[test]
fn kept_cluster_survives_a_restart() {
    if harness::tools::require("initdb", harness::postgres::INSTALL_HINT).is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("pg");
    let port = harness::process::free_port();

    let first = PgCluster::start_in(&data, port).expect("first start");
    psql(&first.url(), "create table kept (v text); insert into kept values ('still here')");
    drop(first);

    let second = PgCluster::start_in(&data, port).expect("second start");
    assert_eq!(psql(&second.url(), "select v from kept"), "still here");
}
