//! Routes a user must not reach through the router, and what the router says when the
//! user's machine fails: nothing about its address or the HTTP client's internals.

use machines::types::MachineState;
use uuid::Uuid;

use crate::support::{Options, TestEnv, ADMIN_TOKEN, WAKE_TOKEN};

/// The daemon's operator routes answer 404 through the router, whatever the method and
/// spelling, and neither wake nor reach the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_internal_routes_are_not_forwarded() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let token = env.token(user);
    env.echo(user).await;
    let machine = env.machine_of(user).await;
    let served = env.served(&machine).await;
    let starts = env.count("start").await;
    // A user without a machine yet: the refused routes must not provision one.
    let newcomer = Uuid::new_v4();

    // The HTTP client resolves `.` segments itself; the unit tests cover those spellings.
    for path in ["/shutdown", "//shutdown", "/shutdown/", "/%73hutdown", "/%2Fshutdown"] {
        for method in [reqwest::Method::POST, reqwest::Method::GET, reqwest::Method::DELETE] {
            for token in [&token, &env.token(newcomer)] {
                let url = format!("{}{path}", env.base);
                let response = env
                    .http
                    .request(method.clone(), url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 404, "{method} {path}");
                let body: serde_json::Value = response.json().await.expect("JSON error body");
                assert_eq!(body["error"], "not_found", "{method} {path}");
            }
        }
    }

    assert_eq!(env.count("start").await, starts, "a refused route started a machine");
    assert!(env.machines_of(newcomer).await.is_empty(), "a refused route provisioned a machine");
    assert_eq!(env.served(&machine).await, served, "a refused route reached the daemon");
    // The daemon is still there and answers.
    let echo = env.echo(user).await;
    assert_eq!(echo["user_id"], user.to_string());
    assert_eq!(env.served(&machine).await, served + 1);
}

/// A machine stopped behind the router's back: the request that finds nothing listening
/// gets 503 with `Retry-After` (it never reached the daemon), naming neither the machine's
/// private address nor the HTTP client's error, and the retry wakes the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_do_not_leak_addresses() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let machine = env.machine_of(user).await;

    // The machine stops behind the router's back, which still holds its address as ready.
    let stop = machines::types::StopRequest::default();
    env.fly.stop_machine(&machine.id, &stop, None).await.expect("stop");
    env.wait_state(&machine.id, MachineState::Stopped).await;
    let response = env.get("/echo", &env.token(user)).send().await.expect("request");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body = response.text().await.expect("body");
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    let message = json["message"].as_str().expect("message");
    assert!(!message.contains(&machine.private_ip), "{message}");
    for internal in ["127.", "client error", "Connect", "hyper", "error trying"] {
        assert!(!message.contains(internal), "{message}");
    }

    let retried = env.get("/echo", &env.token(user)).send().await.expect("retry");
    assert_eq!(retried.status(), 200);
    assert!(retried.headers().contains_key("x-matrix-woke-ms"), "the retry woke the machine");
}

/// The router's own 405s say which methods its route accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_405_carries_allow() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let url = format!("{}/internal/wake", env.base);
    let response = env.http.get(url).bearer_auth(WAKE_TOKEN).send().await.expect("request");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers().get("allow").map(|v| v.to_str().ok()), Some(Some("POST")));
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_fails_requests_instead_of_holding_them() {
    let options = Options { database_timeout_secs: 1, ..Options::default() };
    let Some(env) = TestEnv::start(options).await else { return };
    let known = Uuid::new_v4();
    env.echo(known).await;

    env.freeze_database(true);
    let ready = env.http.get(format!("{}/readyz", env.base)).send().await;
    let admin = env.http.get(format!("{}/admin/users", env.base)).bearer_auth(ADMIN_TOKEN);
    let admin = admin.send().await;
    // A user whose record the router already read is served without the database.
    let served = env.get("/echo", &env.token(known)).send().await;
    env.freeze_database(false);

    assert_eq!(ready.expect("readyz").status(), 503);
    let admin = admin.expect("admin");
    assert_eq!(admin.status(), 503);
    assert!(admin.headers().contains_key("retry-after"));
    assert_eq!(served.expect("known user").status(), 200);
    let ready = env.http.get(format!("{}/readyz", env.base)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "the pool recovers once the database answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_metrics_token_when_one_is_set() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let open = env.http.get(format!("{}/metrics", env.base)).send().await.expect("metrics");
    assert_eq!(open.status(), 200, "without a token the metrics are public");

    let mut config = env.config.clone();
    config.metrics_token = Some("metrics-token-for-tests".into());
    let router = matrix_router::start(config).await.expect("router with a metrics token");
    let url = format!("https://{}/metrics", router.addr);
    let refused = env.http.get(&url).send().await.expect("metrics without the token");
    assert_eq!(refused.status(), 401);
    let wrong = env.http.get(&url).bearer_auth(ADMIN_TOKEN).send().await.expect("wrong token");
    assert_eq!(wrong.status(), 401);
    let allowed = env.http.get(&url).bearer_auth("metrics-token-for-tests").send().await;
    let allowed = allowed.expect("metrics with the token");
    assert_eq!(allowed.status(), 200);
    assert!(allowed.text().await.expect("text").contains("matrix_router_requests_total"));
}
