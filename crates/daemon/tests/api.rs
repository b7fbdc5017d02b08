//! The HTTP API of a real `matrixd serve` process, with the local model server.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::time::Duration;

use common::*;
use harness::llm::{expected_reply, ModelServer};
use matrixd::journal::Kind;
use reqwest::StatusCode;
use serde_json::{json, Value};

const PROVIDER_KEY: &str = "fw-test-key";

struct Running {
    _data: tempfile::TempDir,
    daemon: Daemon,
    model: Option<ModelServer>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.daemon.url)
    }

    fn data(&self) -> std::path::PathBuf {
        self._data.path().to_owned()
    }

    fn model(&self) -> &ModelServer {
        self.model.as_ref().unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = http().get(self.url(path)).bearer_auth(TOKEN).send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response =
            http().post(self.url(path)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn events(&self, last_event_id: Option<u64>) -> reqwest::Response {
        let mut request = http().get(self.url("/events")).bearer_auth(TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response
    }

    async fn wait_for_intent(&self, id: &str) -> Value {
        let mut last = Value::Null;
        eventually("the intent finishes", async || {
            let (status, body) = self.get(&format!("/intents/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            last = body;
            last["envelopes"].as_array().unwrap().len() == 3
        })
        .await;
        last
    }
}

/// A daemon on a fresh volume, with the local model server as its provider when `model`.
fn start(model: bool) -> Running {
    start_with(model, &[])
}

/// As [`start`], with `extra` environment variables.
fn start_with(model: bool, extra: &[(&str, &str)]) -> Running {
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let model = model.then(|| ModelServer::start().unwrap());
    if let Some(server) = &model {
        env.insert("MATRIX_LLM_BASE_URL".into(), server.base_url());
        env.insert("FIREWORKS_API_KEY".into(), PROVIDER_KEY.into());
    }
    run_ok(&["init"], &env);
    let daemon = Daemon::start(&env);
    Running { _data: data, daemon, model }
}

#[tokio::test]
async fn healthz_answers_without_auth_with_broker_stats() {
    let daemon = start(false);
    let response = http().get(daemon.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    for field in ["subscribers", "events_sent", "events_dropped"] {
        assert!(body["broker"][field].is_u64(), "{field} missing from {body}");
    }
}

#[tokio::test]
async fn every_other_route_needs_the_daemon_token() {
    let daemon = start(true);
    let routes = [
        ("POST", "/chat"),
        ("GET", "/events"),
        ("POST", "/messages"),
        ("GET", "/intents/abc"),
        ("GET", "/me"),
        ("POST", "/shutdown"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token"), Some("")] {
            let mut request = http()
                .request(method.parse().unwrap(), daemon.url(path))
                .json(&json!({"message": "x"}));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
    }
    // Still serving: nothing above shut it down.
    assert_eq!(daemon.get("/me").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_request_routed_for_another_user_is_refused() {
    let daemon = start(false);
    for claimed in [OTHER_USER, "not-a-uuid"] {
        let response = http()
            .get(daemon.url("/me"))
            .bearer_auth(TOKEN)
            .header("X-Matrix-User-Id", claimed)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "wrong_user");
    }
    let response = http()
        .get(daemon.url("/me"))
        .bearer_auth(TOKEN)
        .header("X-Matrix-User-Id", USER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_bodies_get_json_errors() {
    let daemon = start(true);
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        (br#"{"message": "hi", "extra": 1}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        (br#"{"text": "hi"}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        (br#"{"message": "  "}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_request"),
        (
            format!(r#"{{"message": "{}"}}"#, "a".repeat(70_000)).into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for path in ["/chat", "/messages"] {
        for (body, status, code) in &cases {
            let response = http()
                .post(daemon.url(path))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                *status,
                "{path} {}",
                String::from_utf8_lossy(&body[..20.min(body.len())])
            );
            assert_eq!(response.json::<Value>().await.unwrap()["error"], *code);
        }
    }
    assert_eq!(daemon.model().request_count(), 0, "no bad request reached the model");
}

#[tokio::test]
async fn a_large_body_gets_its_413_even_while_the_client_is_still_sending() {
    // A refused body is read to its end before the answer, so a sender that is still
    // writing (as the router is, streaming) gets the 413 instead of a reset connection.
    let daemon = start(true);
    let big = vec![b'a'; 8 << 20];
    for attempt in 0..5 {
        let declared = http()
            .post(daemon.url("/chat"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("declared length, attempt {attempt}: {e}"));
        assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);

        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..128).map(|_| Ok(vec![b'a'; 64 << 10])).collect();
        let streamed = http()
            .post(daemon.url("/chat"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("chunked, attempt {attempt}: {e}"));
        assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(streamed.json::<Value>().await.unwrap()["error"], "body_too_large");
    }
}

#[tokio::test]
async fn without_a_provider_chat_and_messages_answer_503_naming_the_keys() {
    let daemon = start(false);
    for path in ["/chat", "/messages"] {
        let (status, body) = daemon.post(path, json!({"message": "hello"})).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("FIREWORKS_API_KEY") && message.contains("TOGETHER_API_KEY"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn chat_streams_the_reply_as_say_events_and_returns_it() {
    let daemon = start(true);
    let mut events = daemon.events(None).await;

    let (status, body) = daemon.post("/chat", json!({"message": "hello daemon world"})).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], expected_reply("hello daemon world"));
    let mut buffer = String::new();
    let seen = read_events_until(&mut events, &mut buffer, |events| {
        events.iter().any(|e| e.event == "status" && e.data["state"] == "idle")
    })
    .await;
    let said: String = seen
        .iter()
        .filter(|e| e.event == "say")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, expected_reply("hello daemon world"));
    assert!(seen.windows(2).all(|pair| pair[0].id < pair[1].id), "ids increase");

    let model = daemon.model();
    assert_eq!(model.last_header("authorization").as_deref(), Some("Bearer fw-test-key"));
    assert_eq!(model.last_body().unwrap()["stream"], true);
    let transcript =
        std::fs::read_to_string(daemon.data().join("cortex/transcript.jsonl")).unwrap();
    assert!(transcript.contains("hello daemon world"), "{transcript}");
}

#[tokio::test]
async fn a_message_becomes_an_intent_with_a_signed_chain() {
    let daemon = start(true);
    let (status, body) = daemon.post("/messages", json!({"message": "plan my week"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["intent_id"].as_str().unwrap().to_owned();

    let intent = daemon.wait_for_intent(&id).await;

    let kinds: Vec<&str> = intent["envelopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["drafting", "running", "completed"]);
    assert_eq!(intent["verified"], true);
    assert_eq!(intent["envelopes"][2]["body"]["reply"], expected_reply("plan my week"));
    assert_eq!(intent["envelopes"][0]["body"]["message"], "plan my week");
    for (seq, kind) in kinds.iter().enumerate() {
        let file = daemon.data().join(format!("cortex/journal/{id}/{seq}-{kind}.json"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
    let (_, me) = daemon.get("/me").await;
    assert_eq!(intent["public_key"], me["public_key"]);
}

#[tokio::test]
async fn a_second_message_while_one_runs_gets_409_busy() {
    let daemon = start(true);
    let hold = daemon.model().hold();
    let (status, first) = daemon.post("/messages", json!({"message": "first"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually("the first intent reaches the model", async || daemon.model().request_count() == 1)
        .await;

    let (status, body) = daemon.post("/messages", json!({"message": "second"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "busy");

    drop(hold);
    daemon.wait_for_intent(first["intent_id"].as_str().unwrap()).await;
    eventually("the daemon is idle", async || {
        let (_, health) = daemon.get("/healthz").await;
        health["busy"] == false
    })
    .await;
    let (status, _) = daemon.post("/messages", json!({"message": "third"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn concurrent_messages_let_exactly_one_through() {
    let daemon = start(true);
    let hold = daemon.model().hold();
    let requests = (0..8).map(|n| daemon.post("/messages", json!({"message": format!("m{n}")})));
    let statuses: Vec<StatusCode> =
        futures_util::future::join_all(requests).await.into_iter().map(|(s, _)| s).collect();
    drop(hold);
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::ACCEPTED).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 7, "{statuses:?}");
}

#[tokio::test]
async fn events_resume_after_last_event_id() {
    let daemon = start(true);
    let (status, _) = daemon.post("/chat", json!({"message": "one two three four"})).await;
    assert_eq!(status, StatusCode::OK);

    let mut all = daemon.events(Some(0)).await;
    let everything = read_events(&mut all, 7).await;
    let ids: Vec<u64> = everything.iter().map(|e| e.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7], "thinking, five words, idle");

    let mut resumed = daemon.events(Some(4)).await;
    let rest = read_events(&mut resumed, 3).await;
    assert_eq!(rest, everything[4..].to_vec());
}

#[tokio::test]
async fn a_slow_subscriber_does_not_stall_a_fast_one() {
    let daemon = start(true);
    // Opened and never read from: its socket and queue fill up.
    let _slow = daemon.events(None).await;
    let mut fast = daemon.events(None).await;
    let mut buffer = String::new();
    let word = "w".repeat(200);

    for turn in 0..10 {
        let message = format!("{turn} {}", vec![word.as_str(); 200].join(" "));
        let (status, body) = daemon.post("/chat", json!({ "message": message })).await;
        assert_eq!(status, StatusCode::OK, "turn {turn}");
        assert_eq!(body["reply"], expected_reply(&message));

        let seen = read_events_until(&mut fast, &mut buffer, |events| {
            events.iter().any(|e| e.event == "status" && e.data["state"] == "idle")
        })
        .await;
        let said: String = seen
            .iter()
            .filter(|e| e.event == "say")
            .map(|e| e.data["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            said,
            expected_reply(&message),
            "turn {turn}: the fast subscriber got every event"
        );
    }
    let (_, health) = daemon.get("/healthz").await;
    assert_eq!(health["broker"]["subscribers"], 2);
}

#[tokio::test]
async fn a_tampered_envelope_is_reported_not_served() {
    let daemon = start(true);
    let (_, body) = daemon.post("/messages", json!({"message": "pay the bill"})).await;
    let id = body["intent_id"].as_str().unwrap().to_owned();
    daemon.wait_for_intent(&id).await;

    let file = daemon.data().join(format!("cortex/journal/{id}/2-completed.json"));
    let original = std::fs::read_to_string(&file).unwrap();
    let tampered = original.replace("echo: pay the bill", "echo: pay the attacker");
    assert_ne!(original, tampered);
    std::fs::write(&file, tampered).unwrap();

    let (status, body) = daemon.get(&format!("/intents/{id}")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"], "intent_chain_invalid");
    assert!(body["message"].as_str().unwrap().contains("envelope 2"), "{body}");

    // A removed middle envelope breaks the chain too.
    std::fs::write(&file, original).unwrap();
    assert_eq!(daemon.get(&format!("/intents/{id}")).await.0, StatusCode::OK);
    std::fs::remove_file(daemon.data().join(format!("cortex/journal/{id}/1-running.json")))
        .unwrap();
    assert_eq!(daemon.get(&format!("/intents/{id}")).await.1["error"], "intent_chain_invalid");

    let unknown = "0".repeat(64);
    assert_eq!(daemon.get(&format!("/intents/{unknown}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(daemon.get("/intents/..%2F..%2Fetc").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn me_reports_the_user_and_the_public_key() {
    let daemon = start(false);
    let (status, me) = daemon.get("/me").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user_id"], USER);
    assert_eq!(me["public_key"].as_str().unwrap().len(), 64);
    assert_eq!(me["settings"], json!({}));
    assert_eq!(me["mode"], "standalone");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_and_exits_zero() {
    let mut daemon = start(true);
    let (status, body) = daemon.post("/shutdown", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["status"], "draining");
    let exit = tokio::task::block_in_place(|| daemon.daemon.wait_exit());
    assert!(exit.success(), "{exit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_that_runs_out_of_time_cancels_the_intent_in_its_signed_chain() {
    let mut daemon = start_with(true, &[("MATRIX_DRAIN_TIMEOUT_SECS", "1")]);
    let hold = daemon.model().hold();
    let (status, body) = daemon.post("/messages", json!({"message": "never answered"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = body["intent_id"].as_str().unwrap().to_owned();
    eventually("the intent reaches the model", async || daemon.model().request_count() == 1).await;

    let (status, _) = daemon.post("/shutdown", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let exit = tokio::task::block_in_place(|| daemon.daemon.wait_exit());
    assert!(exit.success(), "{exit}");
    drop(hold);

    // Read the chain from disk with the daemon's own key: it verifies and ends cancelled.
    let data = matrixd::layout::DataDir::new(daemon.data());
    let journal = matrixd::journal::Journal::new(data.journal(), data.signing_key().unwrap());
    let chain = journal.read(&id).unwrap();
    let kinds: Vec<Kind> = chain.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [Kind::Drafting, Kind::Running, Kind::Cancelled]);
    assert!(chain[2].body.reply.is_none());
    assert!(chain[2].body.error.as_deref().unwrap().contains("shut down"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_daemon_serves_again_after_sigcont() {
    use nix::sys::signal::{kill, Signal};
    let daemon = start(true);
    let pid = nix::unistd::Pid::from_raw(daemon.daemon.pid());

    kill(pid, Signal::SIGSTOP).unwrap();
    let frozen =
        http().get(daemon.url("/healthz")).timeout(Duration::from_millis(300)).send().await;
    assert!(frozen.is_err(), "a stopped process does not answer");
    kill(pid, Signal::SIGCONT).unwrap();

    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = daemon.post("/chat", json!({"message": "still here"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["reply"], expected_reply("still here"));
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let data = tempfile::tempdir().unwrap();
    let cases: [(&str, Option<&str>); 5] = [
        ("MATRIX_DAEMON_TOKEN", None),
        ("MATRIX_USER_ID", None),
        ("MATRIX_USER_ID", Some("user-7")),
        ("MATRIX_LISTEN_ADDR", Some("everywhere")),
        ("S3_ENDPOINT", Some("http://127.0.0.1:9")),
    ];
    for (name, value) in cases {
        let mut env = base_env(data.path());
        match value {
            Some(value) => env.insert(name.into(), value.into()),
            None => env.remove(name),
        };
        let output = run(&["serve"], &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{name}: {stderr}");
        let named = if name == "S3_ENDPOINT" { "S3_BUCKET" } else { name };
        assert!(stderr.contains(named), "{name}: {stderr}");
        assert!(!stderr.contains(TOKEN), "the token never appears: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_mode_restarts_a_crashed_front_door_and_drains_on_sigterm() {
    use nix::sys::signal::{kill, Signal};
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    let port = harness::process::free_port();
    env.insert("MATRIX_LISTEN_ADDR".into(), format!("127.0.0.1:{port}"));
    env.insert("MATRIX_MODE".into(), "dual".into());
    run_ok(&["init"], &env);
    let mut supervisor = Daemon::start_with(&["dual"], &env);
    let health = format!("{}/healthz", supervisor.url);

    let first: Value = http().get(&health).send().await.unwrap().json().await.unwrap();
    let front_door = first["pid"].as_i64().unwrap() as i32;
    assert_ne!(front_door, supervisor.pid());
    kill(nix::unistd::Pid::from_raw(front_door), Signal::SIGKILL).unwrap();

    eventually("a new front door answers", async || match http().get(&health).send().await {
        Ok(response) => {
            let body: Value = response.json().await.unwrap();
            body["pid"].as_i64().unwrap() as i32 != front_door
        }
        Err(_) => false,
    })
    .await;

    kill(nix::unistd::Pid::from_raw(supervisor.pid()), Signal::SIGTERM).unwrap();
    let exit = tokio::task::block_in_place(|| supervisor.wait_exit());
    assert!(exit.success(), "{exit}");
    assert!(http().get(&health).send().await.is_err(), "the children are gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_mode_stops_after_a_shutdown_request() {
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    env.insert("MATRIX_LISTEN_ADDR".into(), format!("127.0.0.1:{}", harness::process::free_port()));
    env.insert("MATRIX_MODE".into(), "dual".into());
    run_ok(&["init"], &env);
    let mut supervisor = Daemon::start_with(&["dual"], &env);

    let response = http()
        .post(format!("{}/shutdown", supervisor.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let exit = tokio::task::block_in_place(|| supervisor.wait_exit());
    assert!(exit.success(), "{exit}");
}
