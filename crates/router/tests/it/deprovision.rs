//! Deprovisioning converges: a volume Fly still holds bound is deleted after the machine's
//! destroy finishes, or left to the orphaned-volume sweep, never forgotten.

use uuid::Uuid;

use crate::support::{Options, TestEnv, ADMIN_TOKEN};

/// Provisions `user` and returns the id of their volume.
async fn provisioned_volume(env: &TestEnv, user: Uuid) -> String {
    env.echo(user).await;
    let path = format!("{}/admin/users/{user}", env.base);
    let record = env.http.get(path).bearer_auth(ADMIN_TOKEN).send().await.expect("get");
    let record: serde_json::Value = record.json().await.expect("JSON");
    let volume = record["user"]["volume_id"].as_str().expect("volume id").to_owned();
    assert!(volume_exists(env, &volume).await);
    volume
}

async fn volume_exists(env: &TestEnv, id: &str) -> bool {
    env.fly.list_volumes().await.expect("list volumes").iter().any(|v| v.id == id)
}

/// `DELETE /admin/users/{user}`, expecting 200; the answer's body.
async fn deprovision(env: &TestEnv, user: Uuid) -> serde_json::Value {
    let path = format!("{}/admin/users/{user}", env.base);
    let response = env.http.delete(path).bearer_auth(ADMIN_TOKEN).send().await.expect("delete");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

/// Refuses the next `count` volume deletes as Fly does while the machine's destroy runs.
async fn refuse_volume_deletes(env: &TestEnv, count: u32) {
    let fault = serde_json::json!({"action": "volume_delete", "status": 412, "count": count});
    env.emulator_post("faults", fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_volume_delete_is_retried_once_the_machine_is_destroyed() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let volume = provisioned_volume(&env, user).await;
    let waits = env.count("wait").await;

    refuse_volume_deletes(&env, 1).await;
    let answer = deprovision(&env, user).await;

    assert_eq!(answer["volume"], "deleted");
    assert!(!volume_exists(&env, &volume).await, "the volume was left behind");
    assert_eq!(env.count("volume_delete").await, 2);
    assert!(env.count("wait").await > waits, "no wait for the machine's destroy");
    assert!(env.router.metrics.render().contains("matrix_router_volumes_orphaned_total 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_still_bound_is_recorded_and_swept_later() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let volume = provisioned_volume(&env, user).await;

    // Every attempt of the deprovision is refused: the user is gone, the volume is recorded.
    refuse_volume_deletes(&env, 3).await;
    let answer = deprovision(&env, user).await;
    assert_eq!(answer["volume"], "orphaned");
    assert_eq!(env.count("volume_delete").await, 3);
    assert!(volume_exists(&env, &volume).await);
    assert!(env.machines_of(user).await.is_empty());
    let metrics = env.router.metrics.render();
    assert!(metrics.contains("matrix_router_volumes_orphaned_total 1"), "{metrics}");

    // The next admin call sweeps it away.
    let list = env.http.get(format!("{}/admin/users", env.base)).bearer_auth(ADMIN_TOKEN);
    assert_eq!(list.send().await.expect("list").status(), 200);
    assert!(!volume_exists(&env, &volume).await, "the sweep did not delete the orphan");
    let metrics = env.router.metrics.render();
    assert!(metrics.contains("matrix_router_orphaned_volumes_deleted_total 1"), "{metrics}");

    // And forgot it: a further sweep tries nothing.
    let deletes = env.count("volume_delete").await;
    let list = env.http.get(format!("{}/admin/users", env.base)).bearer_auth(ADMIN_TOKEN);
    assert_eq!(list.send().await.expect("list").status(), 200);
    assert_eq!(env.count("volume_delete").await, deletes);
}
