//! Provisioning, waking, idle suspension, isolation between users, and Fly API failures.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use machines::types::{MachineState, UpdateMachineRequest};
use uuid::Uuid;

use crate::support::{concurrently, Options, TestEnv, ADMIN_TOKEN, BROKEN_IMAGE, WAKE_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_happens_once_under_50_concurrent_first_requests_at_two_replicas() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let replica = env.replica().await;
    let bases = Arc::new([env.base.clone(), format!("https://{}", replica.addr)]);
    let user = Uuid::new_v4();
    let token = Arc::new(env.token(user));
    let http = env.http.clone();

    let statuses = concurrently(50, |i| {
        let (bases, token, http) = (bases.clone(), token.clone(), http.clone());
        async move {
            let url = format!("{}/echo", bases[i % 2]);
            http.get(url).bearer_auth(&*token).send().await.expect("request").status().as_u16()
        }
    })
    .await;

    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    assert_eq!(env.machines_of(user).await.len(), 1);
    assert_eq!(env.count("create").await, 1);
    assert_eq!(env.count("volume_create").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_machine_is_woken_once_for_100_concurrent_requests() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    env.suspend(&machine.id).await;
    let starts_before = env.count("start").await;

    // The router still believes the machine is running; a fresh replica does not, which is
    // the state after a router restart or a suspend by someone else.
    let replica = env.replica().await;
    let base = format!("https://{}", replica.addr);
    let token = Arc::new(env.token(user));
    let http = env.http.clone();
    let responses = concurrently(100, |_| {
        let (base, token, http) = (base.clone(), token.clone(), http.clone());
        async move {
            let response = http.get(format!("{base}/echo")).bearer_auth(&*token).send().await;
            let response = response.expect("request");
            (response.status().as_u16(), response.headers().contains_key("x-matrix-woke-ms"))
        }
    })
    .await;

    assert!(responses.iter().all(|(s, _)| *s == 200), "responses: {responses:?}");
    // Requests that arrived once the daemon was ready did not wait; the others shared one wake.
    assert!(responses.iter().any(|(_, woke)| *woke), "no request waited for the wake");
    assert_eq!(env.count("start").await - starts_before, 1);
    env.wait_state(&machine.id, MachineState::Started).await;

    let metrics = env.http.get(format!("{base}/metrics")).send().await.expect("metrics");
    let text = metrics.text().await.expect("metrics text");
    assert!(text.contains("matrix_router_wake_seconds_count 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_refused_while_replacing_is_retried() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    env.fly.stop_machine(&machine.id, &Default::default(), None).await.expect("stop");
    env.wait_state(&machine.id, MachineState::Stopped).await;

    // An update of a stopped machine leaves it `replacing` for a while; `start` answers 412.
    env.emulator_post("settings", serde_json::json!({"replacing_ms": 1500})).await;
    let update = UpdateMachineRequest { config: machine.config.clone(), ..Default::default() };
    env.fly.update_machine(&machine.id, &update, None).await.expect("update");
    let replica = env.replica().await;

    let url = format!("https://{}/echo", replica.addr);
    let response = env.http.get(url).bearer_auth(env.token(user)).send().await.expect("request");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let starts = env.count("start").await;
    assert!(starts >= 2, "the start should have been refused at least once, saw {starts} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_machines_are_suspended_but_not_while_a_stream_is_open() {
    let Some(env) = TestEnv::start(Options { idle_suspend_secs: 1, ..Options::default() }).await
    else {
        return;
    };
    let streaming = Uuid::new_v4();
    let idle = Uuid::new_v4();
    env.echo(streaming).await;
    env.echo(idle).await;
    let streaming_machine = env.machine_of(streaming).await;
    let idle_machine = env.machine_of(idle).await;

    let response = env.get("/events", &env.token(streaming)).send().await.expect("SSE request");
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream();
    events.next().await.expect("first event").expect("first event bytes");

    // The idle machine goes; the one with the open stream stays while the stream is read.
    env.wait_state(&idle_machine.id, MachineState::Suspended).await;
    for _ in 0..3 {
        events.next().await.expect("keep-alive").expect("keep-alive bytes");
    }
    let machine = env.fly.get_machine(&streaming_machine.id).await.expect("get");
    assert_eq!(machine.state, MachineState::Started, "suspended under an open stream");

    // Once the stream closes, the machine idles out too, and the next request wakes it.
    drop(events);
    env.wait_state(&streaming_machine.id, MachineState::Suspended).await;
    let response = env.get("/echo", &env.token(streaming)).send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-matrix-woke-ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_does_not_suspend_a_machine_another_replica_streams_to() {
    let Some(env) = TestEnv::start(Options { idle_suspend_secs: 1, ..Options::default() }).await
    else {
        return;
    };
    let user = Uuid::new_v4();
    // Replica B (the first router) serves one request for the user, then nothing.
    env.echo(user).await;
    let machine = env.machine_of(user).await;

    // Replica A holds a stream open to the same machine.
    let replica_a = env.replica().await;
    let url = format!("https://{}/events", replica_a.addr);
    let response =
        env.http.get(url).bearer_auth(env.token(user)).send().await.expect("SSE request");
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream();
    events.next().await.expect("first event").expect("first event bytes");

    // B finds the machine idle locally for several idle windows (one keep-alive per second),
    // but A's stream keeps it running.
    for _ in 0..4 {
        events.next().await.expect("keep-alive").expect("keep-alive bytes");
        let now = env.fly.get_machine(&machine.id).await.expect("get");
        assert_eq!(now.state, MachineState::Started, "suspended under another replica's stream");
    }
    assert_eq!(env.count("suspend").await, 0);

    // Once the stream closes, the machine idles out, suspended once.
    drop(events);
    env.wait_state(&machine.id, MachineState::Suspended).await;
    assert_eq!(env.count("suspend").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_requests_never_reach_another_users_machine() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    env.echo(b).await;
    let machine_b = env.machine_of(b).await;
    let served_b = env.served(&machine_b).await;

    // A claims to be B in every header spelling the router must distrust.
    let response = env
        .get("/echo", &env.token(a))
        .header("x-matrix-user-id", b.to_string())
        .header("x_matrix_user_id", b.to_string())
        .header("x-forwarded-for", "10.0.0.1")
        .header("forwarded", "for=10.0.0.1")
        .header("connection", "x-matrix-user-id")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.expect("JSON");

    let machine_a = env.machine_of(a).await;
    assert_eq!(echo["machine_id"], machine_a.id);
    assert_eq!(echo["user_id"], a.to_string());
    let headers: Vec<(String, String)> = echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| {
            (h[0].as_str().expect("name").to_owned(), h[1].as_str().expect("value").to_owned())
        })
        .collect();
    let values = |name: &str| -> Vec<&str> {
        headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    };
    assert_eq!(values("x-matrix-user-id"), [a.to_string()]);
    assert!(values("x_matrix_user_id").is_empty());
    assert_eq!(values("x-forwarded-for"), ["127.0.0.1"]);
    assert!(values("forwarded").is_empty());
    assert_eq!(values("x-forwarded-proto"), ["https"]);
    assert_eq!(values("x-request-id").len(), 1);
    // The daemon saw its own token (the upstream checked it), never the user's JWT.
    assert!(values("authorization").iter().all(|v| !v.contains(&env.token(a)[..20])));

    assert_eq!(env.served(&machine_b).await, served_b, "B's machine saw A's request");

    // B's machine refuses A's daemon token: tokens are per machine.
    let url = format!("http://{}:8080/echo", machine_b.private_ip);
    let a_token = values("authorization")[0].to_owned();
    let direct = reqwest::Client::new().get(url).header("authorization", a_token).send().await;
    assert_eq!(direct.expect("direct request").status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_429_and_503_are_retried_without_a_duplicate_machine() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    env.emulator_post(
        "faults",
        serde_json::json!({"action": "create", "status": 429, "count": 1, "retry_after": 1}),
    )
    .await;
    // A lost response: the machine is created, the client sees 503 and must not create another.
    env.emulator_post(
        "faults",
        serde_json::json!({"action": "create", "status": 503, "count": 1, "after": true}),
    )
    .await;
    env.emulator_post(
        "faults",
        serde_json::json!({"action": "volume_create", "status": 503, "count": 1}),
    )
    .await;

    let user = Uuid::new_v4();
    env.echo(user).await;
    assert_eq!(env.machines_of(user).await.len(), 1);
    let pending = reqwest::get(format!("{}/_emulator/faults", env.emulator.url())).await;
    let pending: serde_json::Value = pending.expect("faults").json().await.expect("JSON");
    assert_eq!(pending, serde_json::json!([]), "the faults were not all met");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_wake_and_admin_routes() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let wake = |token: &str| {
        env.http
            .post(format!("{}/internal/wake", env.base))
            .bearer_auth(token)
            .json(&serde_json::json!({"user_id": user}))
            .send()
    };
    assert_eq!(wake("wrong").await.expect("request").status(), 401);
    assert!(env.machines_of(user).await.is_empty());
    let response = wake(WAKE_TOKEN).await.expect("request");
    assert_eq!(response.status(), 200);
    let machine = env.machine_of(user).await;
    env.wait_state(&machine.id, MachineState::Started).await;

    let admin = |method: reqwest::Method, path: String, token: &str| {
        env.http.request(method, format!("{}{path}", env.base)).bearer_auth(token).send()
    };
    let list = admin(reqwest::Method::GET, "/admin/users".into(), ADMIN_TOKEN).await.expect("list");
    let list: serde_json::Value = list.json().await.expect("JSON");
    assert_eq!(list["users"][0]["machine_id"], machine.id);
    let denied =
        admin(reqwest::Method::GET, "/admin/users".into(), WAKE_TOKEN).await.expect("list");
    assert_eq!(denied.status(), 401);

    let path = format!("/admin/users/{user}");
    let deleted = admin(reqwest::Method::DELETE, path.clone(), ADMIN_TOKEN).await.expect("delete");
    assert_eq!(deleted.status(), 200);
    let gone = admin(reqwest::Method::GET, path, ADMIN_TOKEN).await.expect("get");
    assert_eq!(gone.status(), 404);

    let ready = env.http.get(format!("{}/readyz", env.base)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_wakes_are_bounded() {
    let Some(env) = TestEnv::start(Options { max_pending_wakes: 2, ..Options::default() }).await
    else {
        return;
    };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    env.suspend(&machine.id).await;
    // Three refused starts keep the wake going for a few hundred milliseconds.
    let fault = serde_json::json!({"action": "start", "status": 412, "count": 3});
    env.emulator_post("faults", fault).await;

    let replica = env.replica().await;
    let base = format!("https://{}", replica.addr);
    let token = Arc::new(env.token(user));
    let http = env.http.clone();
    let responses = concurrently(10, |_| {
        let (base, token, http) = (base.clone(), token.clone(), http.clone());
        async move {
            let response = http.get(format!("{base}/echo")).bearer_auth(&*token).send().await;
            let response = response.expect("request");
            (response.status().as_u16(), response.headers().contains_key("retry-after"))
        }
    })
    .await;

    let refused: Vec<_> = responses.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "no request was turned away: {responses:?}");
    assert!(refused.iter().all(|(_, retry_after)| *retry_after), "503 without Retry-After");
    assert!(responses.iter().all(|(s, _)| *s == 200 || *s == 503), "{responses:?}");
    assert!(responses.iter().any(|(s, _)| *s == 200), "{responses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_machine_is_reported_with_its_events() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    let mut config = machine.config.clone();
    config.image = BROKEN_IMAGE.to_owned();
    let update = UpdateMachineRequest { config, ..Default::default() };
    env.fly.update_machine(&machine.id, &update, None).await.expect("update");
    env.wait_state(&machine.id, MachineState::Failed).await;
    let starts = env.count("start").await;

    let replica = env.replica().await;
    let url = format!("https://{}/echo", replica.addr);
    let response = env.http.get(url).bearer_auth(env.token(user)).send().await.expect("request");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "machine_unavailable");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains(&machine.id) && message.contains("recent events"), "{message}");
    assert_eq!(env.count("start").await, starts, "a failed machine was started blindly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_reports_work_in_progress_is_not_suspended() {
    let Some(env) = TestEnv::start(Options { idle_suspend_secs: 1, ..Options::default() }).await
    else {
        return;
    };
    let user = Uuid::new_v4();
    let token = env.token(user);
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    let busy = env.http.post(format!("{}/busy?on=true", env.base)).bearer_auth(&token);
    assert_eq!(busy.send().await.expect("busy").status(), 200);

    // Four idle times with no request open: the daemon's own work keeps it running.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let running = env.fly.get_machine(&machine.id).await.expect("get");
    assert_eq!(running.state, MachineState::Started, "suspended while the daemon was busy");

    let done = env.http.post(format!("{}/busy?on=false", env.base)).bearer_auth(&token);
    assert_eq!(done.send().await.expect("not busy").status(), 200);
    env.wait_state(&machine.id, MachineState::Suspended).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_is_still_suspended_after_its_daemon_failed_a_request() {
    let Some(env) = TestEnv::start(Options { idle_suspend_secs: 1, ..Options::default() }).await
    else {
        return;
    };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;

    let dropped = env.get("/drop", &env.token(user)).send().await.expect("request");
    assert_eq!(dropped.status(), 502);

    env.wait_state(&machine.id, MachineState::Suspended).await;
}
