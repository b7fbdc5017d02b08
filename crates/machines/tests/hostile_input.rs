//! Requests no well-behaved client sends: out-of-range numbers, wrong JSON shapes, odd app
//! names. The emulator must answer them the way Fly does, and never drop the connection.

#[allow(dead_code, reason = "the support module serves several test files")]
mod support;

use std::time::Duration;

use machines::emulator::SettingsPatch;
use machines::types::{MachineState, UpdateMachineRequest, WaitState};
use reqwest::Method;
use serde_json::{json, Value};
use support::{request, Env, APP, TOKEN};

const LONG: Duration = Duration::from_secs(30);

/// One request with a JSON body (or none) and a given `Authorization` value.
async fn send(
    env: &Env,
    method: Method,
    path: &str,
    authorization: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let url = format!("{}{path}", env.emulator.url());
    let mut builder =
        reqwest::Client::new().request(method, url).header("authorization", authorization);
    if let Some(body) = body {
        builder = builder.header("content-type", "application/json").body(body);
    }
    let response = builder.send().await.expect("the emulator answers instead of hanging up");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn post(env: &Env, path: &str, body: Value) -> (u16, Value) {
    let body = Some(body.to_string().into_bytes());
    send(env, Method::POST, path, &format!("Bearer {TOKEN}"), body).await
}

fn assert_invalid(what: &str, status: u16, body: &Value) {
    assert_eq!(status, 400, "{what}: {body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("invalid_argument: "), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_ttls_beyond_any_date_are_400() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let lease = format!("/v1/apps/{APP}/machines/{}/lease", machine.id);

    for ttl in [json!(i64::MAX), json!(u64::MAX)] {
        let (status, body) = post(&env, &lease, json!({ "ttl": ttl })).await;
        assert_invalid(&format!("ttl {ttl}"), status, &body);
    }
    let (status, body) = post(&env, &format!("{lease}?ttl=soon"), json!({})).await;
    assert_invalid("ttl=soon", status, &body);
    let (status, body) = env.raw(Method::GET, &lease).await;
    assert_eq!(status, 404, "no lease was taken: {body}");

    let machines = format!("/v1/apps/{APP}/machines");
    let create = json!({"config": {"image": "sleeper"}, "lease_ttl": u64::MAX});
    let (status, body) = post(&env, &machines, create).await;
    assert_invalid("lease_ttl", status, &body);

    let (status, body) = post(&env, &lease, json!({"ttl": 60})).await;
    assert_eq!(status, 201, "{body}");
    let expires_at = body["data"]["expires_at"].as_i64().unwrap();
    assert!(expires_at > chrono::Utc::now().timestamp() + 30, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_beyond_go_s_range_are_400() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let base = format!("/v1/apps/{APP}/machines/{}", machine.id);
    let huge = "99999999999999999h";

    let (status, body) = post(&env, &format!("{base}/stop"), json!({ "timeout": huge })).await;
    assert_invalid("stop timeout", status, &body);
    let (status, body) = env.raw(Method::GET, &format!("{base}/wait?timeout={huge}")).await;
    assert_invalid("wait timeout", status, &body);

    let mut checked = request("sleeper");
    let check = json!({"type": "tcp", "port": 8080, "interval": huge});
    checked.config.checks.insert("alive".into(), serde_json::from_value(check).unwrap());
    let error = env.fly.create_machine(&checked).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(400), "{error}");
    let update = UpdateMachineRequest { config: checked.config.clone(), ..Default::default() };
    let error = env.fly.update_machine(&machine.id, &update, None).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(400), "{error}");

    assert_eq!(env.fly.get_machine(&machine.id).await.unwrap().state, MachineState::Started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_body_that_is_not_an_object_is_refused_like_go_does() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let stop = format!("/v1/apps/{APP}/machines/{}/stop", machine.id);

    let (status, body) = post(&env, &stop, json!([])).await;

    assert_invalid("[]", status, &body);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("cannot unmarshal array into Go value of type main.stopRequest"));
    assert_eq!(env.fly.get_machine(&machine.id).await.unwrap().state, MachineState::Started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_number_as_stop_timeout_is_nanoseconds() {
    let env = Env::start().await;
    let machine = env.started("stubborn").await;
    let stop = format!("/v1/apps/{APP}/machines/{}/stop", machine.id);

    // The process ignores SIGTERM: only the SIGKILL after one second (not 10^9 s) stops it.
    let (status, body) = post(&env, &stop, json!({"signal": "SIGTERM", "timeout": 1e9})).await;

    assert_eq!(status, 200, "{body}");
    let version = machine.instance_id.as_str();
    env.fly.wait_machine(&machine.id, WaitState::Stopped, Some(version), LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_checks_the_version_and_list_checks_the_state() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let wait = format!("/v1/apps/{APP}/machines/{}/wait?state=stopped&timeout=1", machine.id);

    let (status, body) = env.raw(Method::GET, &format!("{wait}&version=garbage")).await;
    assert_invalid("version=garbage", status, &body);
    let unknown = ulid::Ulid::new().to_string();
    let (status, body) = env.raw(Method::GET, &format!("{wait}&version={unknown}")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("not_found: "), "{body}");

    let update = UpdateMachineRequest { config: machine.config.clone(), ..Default::default() };
    env.fly.update_machine(&machine.id, &update, None).await.unwrap();
    let old = machine.instance_id.as_str();
    let (status, body) = env.raw(Method::GET, &format!("{wait}&version={old}")).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("stopped")), "{body}");

    let (status, body) =
        env.raw(Method::GET, &format!("/v1/apps/{APP}/machines?state=bogus")).await;
    assert_invalid("state=bogus", status, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_scheme_is_case_insensitive_and_big_bodies_are_413() {
    let env = Env::start().await;
    let volumes = format!("/v1/apps/{APP}/volumes");

    for scheme in ["bearer", "BEARER", "flyv1"] {
        let (status, body) =
            send(&env, Method::GET, &volumes, &format!("{scheme} {TOKEN}"), None).await;
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    let (status, _) = send(&env, Method::GET, &volumes, &format!("Basic {TOKEN}"), None).await;
    assert_eq!(status, 401);

    let padding = "x".repeat(2 << 20);
    let body = json!({"config": {"image": "sleeper", "env": {"PAD": padding}}});
    let (status, answer) = post(&env, &format!("/v1/apps/{APP}/machines"), body).await;
    assert_eq!(status, 413, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_names_fly_would_refuse_are_404_and_never_stored() {
    let env = Env::start().await;
    let long = "a".repeat(64);
    let refused = ["Upper", "a.b", "a%2Fb", "a%00b", "a%41", "under_score", long.as_str()];

    for name in refused {
        let (status, body) = post(
            &env,
            &format!("/v1/apps/{name}/machines"),
            json!({"config": {"image": "sleeper"}}),
        )
        .await;
        assert_eq!(status, 404, "{name}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with("not_found: "), "{body}");
        let (status, _) = env.raw(Method::GET, &format!("/v1/apps/{name}")).await;
        assert_eq!(status, 404, "{name}");
    }
    let (status, body) = post(&env, "/v1/apps", json!({"app_name": "a.b", "org_slug": "x"})).await;
    assert_invalid("app_name a.b", status, &body);

    let valid = "ok-app-1";
    let (status, body) =
        post(&env, &format!("/v1/apps/{valid}/machines"), json!({"config": {"image": "sleeper"}}))
            .await;
    assert_eq!(status, 200, "{body}");

    let state = std::fs::read_to_string(env.state_dir().join("state.json")).unwrap();
    let stored: Value = serde_json::from_str(&state).unwrap();
    let apps: Vec<&String> = stored["apps"].as_object().unwrap().keys().collect();
    assert_eq!(apps, [valid], "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_retention_keeps_destroyed_machines_instead_of_wrapping_to_none() {
    let env = Env::start().await;
    let patch = SettingsPatch { destroyed_retention_ms: Some(u64::MAX), ..Default::default() };
    env.settings(patch).await;
    let machine = env.started("sleeper").await;

    env.fly.delete_machine(&machine.id, true, None).await.unwrap();

    let shown = env.fly.get_machine(&machine.id).await.unwrap();
    assert_eq!(shown.state, MachineState::Destroyed);
}
