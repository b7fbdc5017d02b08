//! End to end: `cargo xtask dev` as a user runs it.
//!
//! Two users chat through the router (against the local model), read their SSE
//! transcript, are suspended by the router's idle timer, are woken by their next request
//! and find their state intact; neither reaches the other's daemon.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harness::process::ChildGuard;
use serde_json::Value;

/// Seconds without traffic before the router suspends a machine, in this test.
const IDLE_SECS: u64 = 3;

struct Topology {
    _dev: ChildGuard,
    _state: tempfile::TempDir,
    ready: Value,
    https: reqwest::Client,
    fly: reqwest::Client,
}

struct User {
    id: String,
    token: String,
}

impl Topology {
    fn start() -> Option<Self> {
        harness::tools::require("initdb", harness::postgres::INSTALL_HINT)?;
        harness::tools::require("moto_server", harness::s3::INSTALL_HINT)?;
        let _ = rustls::crypto::ring::default_provider().install_default();

        let state = tempfile::Builder::new().prefix("matrix-dev-e2e-").tempdir().expect("tempdir");
        let ready_file = state.path().join("ready.json");
        let mut command = Command::new(harness::tools::workspace_binary("xtask"));
        command
            .args(["dev", "--fresh", "--no-install", "--no-build"])
            .arg("--state-dir")
            .arg(state.path().join("dev"))
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--idle-suspend-secs")
            .arg(IDLE_SECS.to_string())
            .env("ROUTER_LISTEN_ADDR", "127.0.0.1:0")
            .env_remove("DATABASE_URL")
            .env_remove("FIREWORKS_API_KEY")
            .env_remove("TOGETHER_API_KEY")
            .stdin(Stdio::null());
        let mut dev = ChildGuard::spawn("xtask dev", &mut command).expect("spawn xtask dev");

        let ready = wait_for_file(&ready_file, &mut dev, Duration::from_secs(180));
        let ca = std::fs::read(ready["ca_cert"].as_str().expect("ca_cert")).expect("read CA");
        let https = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA pem"))
            .build()
            .expect("client");
        Some(Self { _dev: dev, _state: state, ready, https, fly: reqwest::Client::new() })
    }

    fn users(&self) -> Vec<User> {
        self.ready["users"]
            .as_array()
            .expect("users")
            .iter()
            .map(|u| User {
                id: u["user_id"].as_str().expect("user_id").to_owned(),
                token: u["token"].as_str().expect("token").to_owned(),
            })
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.ready["router_url"].as_str().expect("router_url"))
    }

    async fn get(&self, user: &User, path: &str) -> reqwest::Response {
        self.https.get(self.url(path)).bearer_auth(&user.token).send().await.expect("GET")
    }

    async fn chat(&self, user: &User, message: &str) -> Value {
        let response = self
            .https
            .post(self.url("/chat"))
            .bearer_auth(&user.token)
            .json(&serde_json::json!({ "message": message }))
            .send()
            .await
            .expect("POST /chat");
        assert_eq!(response.status(), 200, "POST /chat");
        response.json().await.expect("chat JSON")
    }

    /// The user's machine, as the Fly API (the emulator) reports it.
    async fn machine_of(&self, user: &User) -> Value {
        let url = format!(
            "{}/v1/apps/{}/machines?metadata.matrix_user_id={}",
            self.ready["fly_api_url"].as_str().expect("fly url"),
            self.ready["fly_app"].as_str().expect("fly app"),
            user.id
        );
        let token = self.ready["fly_api_token"].as_str().expect("fly token");
        let machines: Vec<Value> = self
            .fly
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("list machines")
            .json()
            .await
            .expect("machines JSON");
        assert_eq!(machines.len(), 1, "exactly one machine for user {}", user.id);
        machines.into_iter().next().expect("one machine")
    }

    async fn wait_for_state(&self, user: &User, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let machine = self.machine_of(user).await;
            if machine["state"] == state {
                return machine;
            }
            assert!(
                Instant::now() < deadline,
                "machine of {} is {} after {within:?}, expected {state}",
                user.id,
                machine["state"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn wait_for_file(path: &Path, dev: &mut ChildGuard, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            return serde_json::from_slice(&bytes).expect("ready file is JSON");
        }
        dev.check_running().expect("xtask dev exited before it was ready");
        assert!(Instant::now() < deadline, "xtask dev not ready within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads SSE events from `response` until the `say` events, joined, contain `needle`.
/// Returns the ids of the events read, which must all be present.
async fn read_said(response: reqwest::Response, needle: impl AsRef<str>) -> Vec<u64> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut said = String::new();
    let mut ids = Vec::new();
    let needle = needle.as_ref();
    let read = async {
        while let Some(chunk) = stream.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk.expect("SSE chunk")));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                if event.starts_with(':') {
                    continue; // a comment: keep-alive or greeting
                }
                let field = |name: &str| {
                    event.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned)
                };
                let id = field("id: ").expect("every event has an id");
                ids.push(id.parse::<u64>().expect("numeric id"));
                if field("event: ").as_deref() == Some("say") {
                    let data: Value =
                        serde_json::from_str(&field("data: ").expect("data")).expect("JSON data");
                    said.push_str(data["text"].as_str().expect("say text"));
                    if said.contains(needle) {
                        return ids;
                    }
                }
            }
        }
        panic!("SSE stream ended before the transcript said {needle:?}; it said {said:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("SSE event in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_sleep_wake_and_stay_apart() {
    let Some(topology) = Topology::start() else { return };
    let users = topology.users();
    assert_eq!(users.len(), 2);

    // Each user's first request provisions and boots their own machine.
    for user in &users {
        let me = topology.get(user, "/me").await;
        assert_eq!(me.status(), 200, "GET /me for {}", user.id);
        let me: Value = me.json().await.expect("/me JSON");
        assert_eq!(me["user_id"], user.id.as_str(), "/me answers for its own user");
    }

    // Chat, and see the reply stream on the transcript.
    for user in &users {
        let events = topology.get(user, "/events").await;
        assert_eq!(events.status(), 200);
        let message = format!("hello from {}", user.id);
        let expected = harness::llm::expected_reply(&message);
        let reader = tokio::spawn(read_said(events, expected.clone()));
        let reply = topology.chat(user, &message).await;
        assert_eq!(reply["reply"], expected.as_str(), "the model's reply comes back");
        let ids = reader.await.expect("SSE reader");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids increase: {ids:?}");
    }

    // Isolation: one machine's daemon token is refused by the other user's daemon.
    let a = topology.machine_of(&users[0]).await;
    let b = topology.machine_of(&users[1]).await;
    assert_ne!(a["id"], b["id"], "each user has a machine of their own");
    let a_token = a["config"]["env"]["MATRIX_DAEMON_TOKEN"].as_str().expect("daemon token");
    let b_addr = b["private_ip"].as_str().expect("private_ip");
    let direct = reqwest::Client::new()
        .get(format!("http://{b_addr}:8080/me"))
        .bearer_auth(a_token)
        .send()
        .await
        .expect("direct request to B's daemon");
    assert_eq!(direct.status(), 401, "A's daemon token must not open B's daemon");

    // With no traffic and no open stream, the router suspends both machines.
    for user in &users {
        topology.wait_for_state(user, "suspended", Duration::from_secs(IDLE_SECS * 10)).await;
    }

    // The next request wakes the machine, and the state is still there.
    for user in &users {
        let me = topology.get(user, "/me").await;
        assert_eq!(me.status(), 200, "GET /me after suspension");
        assert!(me.headers().contains_key("x-matrix-woke-ms"), "the response says it woke");
        let events = topology
            .https
            .get(topology.url("/events"))
            .bearer_auth(&user.token)
            .header("Last-Event-ID", "0")
            .send()
            .await
            .expect("GET /events");
        let message = format!("hello from {}", user.id);
        read_said(events, &harness::llm::expected_reply(&message)).await;
        topology.wait_for_state(user, "started", Duration::from_secs(5)).await;
    }
}
