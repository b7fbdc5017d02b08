//! Living with deploys: new machines get the image the last deploy recorded, and a wake
//! waits for a deploy's lease instead of starting the machine under it.

use std::time::Duration;

use machines::types::Machine;
use uuid::Uuid;

use crate::support::{Options, TestEnv, APP, BROKEN_IMAGE, DEPLOYED_IMAGE, IMAGE};

/// The rollout store on the router's database, its migrations applied as a deploy does.
async fn rollout_store(env: &TestEnv) -> rollout::Store {
    rollout::Store::connect(&env.config.database_url).await.expect("rollout store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_machine_gets_the_image_the_last_deploy_recorded() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    // Recorded after the router started: it is read when the machine is provisioned.
    let store = rollout_store(&env).await;
    store.set_desired_image(APP, DEPLOYED_IMAGE, Uuid::new_v4()).await.expect("record");
    store.set_desired_image("another-app", BROKEN_IMAGE, Uuid::new_v4()).await.expect("record");

    let user = Uuid::new_v4();
    env.echo(user).await;
    assert_eq!(env.machine_of(user).await.config.image, DEPLOYED_IMAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_recorded_image_a_new_machine_gets_router_daemon_image() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };

    // No deploy ever ran on this database: the rollout tables do not exist.
    let first = Uuid::new_v4();
    env.echo(first).await;
    assert_eq!(env.machine_of(first).await.config.image, IMAGE);

    // The tables exist, but nothing is recorded for this app.
    let store = rollout_store(&env).await;
    store.set_desired_image("another-app", BROKEN_IMAGE, Uuid::new_v4()).await.expect("record");
    let second = Uuid::new_v4();
    env.echo(second).await;
    assert_eq!(env.machine_of(second).await.config.image, IMAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_desired_image_fails_provisioning_instead_of_guessing() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    // A table of that name the router cannot read (no `image` column): not "none recorded".
    let (client, connection) =
        tokio_postgres::connect(&env.config.database_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
    let connection = tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE rollout_desired_images (app TEXT PRIMARY KEY)")
        .await
        .expect("create table");
    drop(client);
    connection.await.expect("connection task").expect("connection");

    let user = Uuid::new_v4();
    let response = env.get("/echo", &env.token(user)).send().await.expect("request");
    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "internal");
    assert!(env.machines_of(user).await.is_empty(), "a machine was created anyway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_waits_for_a_deploys_lease_and_never_takes_it() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    env.suspend(&machine.id).await;
    let accepted_before = accepted_starts(&env.fly.get_machine(&machine.id).await.expect("get"));
    let starts_before = env.count("start").await;

    // A deploy holds the machine's lease, and lets go after about a second.
    let lease = env.fly.acquire_lease(&machine.id, Duration::from_secs(60), "deploy").await;
    let nonce = lease.expect("acquire the lease").data.nonce;
    let deploy = tokio::spawn({
        let (fly, id, nonce) = (env.fly.clone(), machine.id.clone(), nonce.clone());
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let held = fly.get_lease(&id).await.expect("the deploy's lease is still there");
            assert_eq!(held.data.nonce, nonce, "someone else took the lease");
            fly.release_lease(&id, &nonce).await.expect("release the lease");
        }
    });

    // A fresh replica does not believe the machine is running: it wakes it.
    let replica = env.replica().await;
    let url = format!("https://{}/echo", replica.addr);
    let response = env.http.get(url).bearer_auth(env.token(user)).send().await.expect("request");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    deploy.await.expect("the deploy's lease was held until it released it");

    let after = env.fly.get_machine(&machine.id).await.expect("get");
    assert_eq!(accepted_starts(&after) - accepted_before, 1, "starts accepted: {:?}", after.events);
    let starts = env.count("start").await - starts_before;
    assert!(starts >= 2, "no start was refused under the lease ({starts} start calls)");
    assert_eq!(env.count("lease_acquire").await, 1, "the router took a lease");
    assert_eq!(env.count("lease_release").await, 1, "the router released a lease");
}

/// `start` calls the machine accepted: each leaves a `start` event from the user.
fn accepted_starts(machine: &Machine) -> usize {
    machine.events.iter().filter(|e| e.kind == "start" && e.source == "user").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_past_the_wake_deadline_is_a_timeout_and_stays_held() {
    let options = Options { wake_timeout_secs: 2, ..Options::default() };
    let Some(env) = TestEnv::start(options).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    env.suspend(&machine.id).await;
    let accepted_before = accepted_starts(&env.fly.get_machine(&machine.id).await.expect("get"));
    let lease = env.fly.acquire_lease(&machine.id, Duration::from_secs(60), "deploy").await;
    let nonce = lease.expect("acquire the lease").data.nonce;

    let replica = env.replica().await;
    let url = format!("https://{}/echo", replica.addr);
    let response = env.http.get(url).bearer_auth(env.token(user)).send().await.expect("request");
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "wake_timeout");

    let held = env.fly.get_lease(&machine.id).await.expect("the deploy's lease is still there");
    assert_eq!(held.data.nonce, nonce, "someone else took the lease");
    let after = env.fly.get_machine(&machine.id).await.expect("get");
    assert_eq!(accepted_starts(&after), accepted_before, "started under the deploy's lease");
    assert_eq!(env.count("lease_release").await, 0, "the router released a lease");
}
