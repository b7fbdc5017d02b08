//! Dual mode with real processes: `matrixd dual` supervises the front door and the
//! executor; intents run in the executor, with the local model server as the provider.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use common::*;
use harness::llm::{expected_reply, ModelServer};
use matrixd::journal::{Envelope, Kind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Dual {
    data: tempfile::TempDir,
    env: std::collections::BTreeMap<String, String>,
    supervisor: Daemon,
    model: ModelServer,
}

/// The pids `/healthz` reports: the front door's and the executor's (when the link is up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pids {
    front_door: i32,
    executor: Option<i32>,
}

impl Dual {
    /// `matrixd dual` on a fresh volume, once the executor link is up.
    async fn start(extra: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let model = ModelServer::start().unwrap();
        let mut env = base_env(data.path());
        // A fixed port: a restarted front door listens where the first one did.
        let port = harness::process::free_port();
        env.insert("MATRIX_LISTEN_ADDR".into(), format!("127.0.0.1:{port}"));
        env.insert("MATRIX_MODE".into(), "dual".into());
        env.insert("MATRIX_LLM_BASE_URL".into(), model.base_url());
        env.insert("FIREWORKS_API_KEY".into(), "fw-test-key".into());
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        run_ok(&["init"], &env);
        let supervisor = Daemon::start_with(&["dual"], &env);
        let dual = Self { data, env, supervisor, model };
        dual.wait_for_link(|_| true).await;
        dual
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.supervisor.url)
    }

    async fn health(&self) -> Option<Value> {
        let response = http().get(self.url("/healthz")).send().await.ok()?;
        response.json().await.ok()
    }

    async fn pids(&self) -> Pids {
        let health = self.health().await.unwrap();
        Pids {
            front_door: health["pid"].as_i64().unwrap() as i32,
            executor: health["executor"]["pid"].as_i64().map(|pid| pid as i32),
        }
    }

    /// Waits until a front door answers with the executor link up and `accept` likes the pids.
    async fn wait_for_link(&self, mut accept: impl FnMut(Pids) -> bool) -> Pids {
        let mut seen = None;
        eventually("the executor link is up", async || {
            let Some(health) = self.health().await else { return false };
            if health["executor"]["link"] != "up" {
                return false;
            }
            let pids = Pids {
                front_door: health["pid"].as_i64().unwrap() as i32,
                executor: health["executor"]["pid"].as_i64().map(|pid| pid as i32),
            };
            seen = Some(pids);
            accept(pids)
        })
        .await;
        seen.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response =
            http().post(self.url(path)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn submit(&self, message: &str) -> String {
        let (status, body) = self.post("/messages", json!({ "message": message })).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["intent_id"].as_str().unwrap().to_owned()
    }

    /// `GET /intents/{id}` once the chain has a terminal envelope; fails on an invalid chain.
    async fn wait_for_outcome(&self, id: &str) -> Vec<Envelope> {
        let mut chain = Vec::new();
        eventually("the intent reaches a terminal state", async || {
            let Ok(response) =
                http().get(self.url(&format!("/intents/{id}"))).bearer_auth(TOKEN).send().await
            else {
                return false; // A front door being restarted.
            };
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["verified"], true, "{body}");
            chain = serde_json::from_value(body["envelopes"].clone()).unwrap();
            chain.last().is_some_and(|last: &Envelope| last.kind.is_terminal())
        })
        .await;
        chain
    }

    /// The chain read from disk with the volume's own key.
    fn chain_on_disk(&self, id: &str) -> Vec<Envelope> {
        let data = matrixd::layout::DataDir::new(self.data.path());
        let journal = matrixd::journal::Journal::new(data.journal(), data.signing_key().unwrap());
        journal.read(id).unwrap()
    }
}

fn kinds(chain: &[Envelope]) -> Vec<Kind> {
    chain.iter().map(|e| e.kind).collect()
}

/// Whether `pid` is gone, or a zombie waiting for its new parent to reap it.
fn exited(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z'))
}

fn sigkill(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_intent_runs_in_the_executor_and_streams_to_the_front_doors_events() {
    let dual = Dual::start(&[]).await;
    let pids = dual.pids().await;
    let executor = pids.executor.unwrap();
    assert_ne!(executor, pids.front_door);
    assert_ne!(executor, dual.supervisor.pid());

    let mut events = http().get(dual.url("/events")).bearer_auth(TOKEN).send().await.unwrap();
    let id = dual.submit("hello from the front door").await;

    // The transcript events reach the front door's broker live, with its ids.
    let mut buffer = String::new();
    let seen = read_events_until(&mut events, &mut buffer, |events| {
        events.iter().any(|e| e.event == "notice" && e.data["done"] == true)
    })
    .await;
    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "ids count up from 1");
    assert_eq!(seen.first().unwrap().event, "status");
    let said: String = seen
        .iter()
        .filter(|e| e.event == "say")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, expected_reply("hello from the front door"));
    assert_eq!(seen.last().unwrap().data["intent_id"], id.as_str());

    let chain = dual.wait_for_outcome(&id).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Completed]);
    assert_eq!(
        chain[2].body.reply.as_deref(),
        Some(expected_reply("hello from the front door").as_str())
    );
    assert_eq!(dual.chain_on_disk(&id), chain, "the served chain is the verified one on disk");
    let transcript = std::fs::read_to_string(dual.data.path().join("cortex/transcript.jsonl"));
    assert!(transcript.unwrap().contains("hello from the front door"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_executor_killed_mid_intent_is_restarted_and_the_intent_fails_with_a_reason() {
    let dual = Dual::start(&[]).await;
    let before = dual.pids().await;
    let hold = dual.model.hold();
    let id = dual.submit("interrupted").await;
    eventually("the intent reaches the model", async || dual.model.request_count() == 1).await;
    let (status, body) = dual.post("/messages", json!({"message": "second"})).await;
    assert_eq!((status, &body["error"]), (StatusCode::CONFLICT, &json!("busy")));

    // The work is the executor's: killing it, and only it, ends the intent.
    sigkill(before.executor.unwrap());
    let after = dual.wait_for_link(|pids| pids.executor != before.executor).await;
    assert_eq!(after.front_door, before.front_door, "the front door kept running");

    let chain = dual.wait_for_outcome(&id).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Failed]);
    let reason = chain[2].body.error.as_deref().unwrap();
    assert!(reason.contains("executor stopped"), "{reason}");
    assert_eq!(dual.health().await.unwrap()["busy"], false, "the front door is not stuck busy");

    // The new executor takes new work.
    drop(hold);
    let next = dual.submit("after the crash").await;
    let chain = dual.wait_for_outcome(&next).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Completed]);
    assert_eq!(chain[2].body.reply.as_deref(), Some(expected_reply("after the crash").as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_front_door_killed_mid_intent_comes_back_busy_and_the_intent_completes() {
    let dual = Dual::start(&[]).await;
    let before = dual.pids().await;
    let hold = dual.model.hold();
    let id = dual.submit("outlives the front door").await;
    eventually("the intent reaches the model", async || dual.model.request_count() == 1).await;

    sigkill(before.front_door);
    let after = dual.wait_for_link(|pids| pids.front_door != before.front_door).await;
    assert_eq!(after.executor, before.executor, "the executor kept running");

    // The new front door learnt from the executor that an intent runs.
    let (status, body) = dual.post("/messages", json!({"message": "too soon"})).await;
    assert_eq!((status, &body["error"]), (StatusCode::CONFLICT, &json!("busy")), "{body}");

    drop(hold);
    let chain = dual.wait_for_outcome(&id).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Completed]);
    let next = dual.submit("and another").await;
    let chain = dual.wait_for_outcome(&next).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Completed]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_refuses_new_work_finishes_the_intent_and_every_process_exits_zero() {
    let mut dual = Dual::start(&[]).await;
    let pids = dual.pids().await;
    let hold = dual.model.hold();
    let id = dual.submit("finish me").await;
    eventually("the intent reaches the model", async || dual.model.request_count() == 1).await;

    kill(Pid::from_raw(dual.supervisor.pid()), Signal::SIGTERM).unwrap();
    // The draining front door closes its listener; a request that still gets in is refused.
    eventually("new work is refused", async || {
        let request = http().post(dual.url("/messages")).bearer_auth(TOKEN);
        match request.json(&json!({"message": "too late"})).send().await {
            Ok(response) => response.status() == StatusCode::SERVICE_UNAVAILABLE,
            Err(_) => true,
        }
    })
    .await;

    drop(hold);
    let exit = tokio::task::block_in_place(|| dual.supervisor.wait_exit());
    assert!(exit.success(), "{exit}");
    for pid in [pids.front_door, pids.executor.unwrap()] {
        assert!(kill(Pid::from_raw(pid), None).is_err(), "process {pid} is gone");
    }
    let chain = dual.chain_on_disk(&id);
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Completed]);
    assert!(!dual.data.path().join(".run/executor.sock").exists(), "the socket is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_that_runs_out_of_time_cancels_the_intent_in_the_executor() {
    let mut dual = Dual::start(&[("MATRIX_DRAIN_TIMEOUT_SECS", "1")]).await;
    let hold = dual.model.hold();
    let id = dual.submit("never answered").await;
    eventually("the intent reaches the model", async || dual.model.request_count() == 1).await;

    let (status, _) = dual.post("/shutdown", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let exit = tokio::task::block_in_place(|| dual.supervisor.wait_exit());
    assert!(exit.success(), "{exit}");
    drop(hold);

    let chain = dual.chain_on_disk(&id);
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Cancelled]);
    assert!(chain[2].body.error.as_deref().unwrap().contains("shut down"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_supervisor_takes_its_children_with_it() {
    let mut dual = Dual::start(&[]).await;
    let pids = dual.pids().await;

    sigkill(dual.supervisor.pid());
    let _ = tokio::task::block_in_place(|| dual.supervisor.wait_exit());

    // Each child got SIGTERM from the kernel and drained; init reaps them.
    eventually("both children exit", async || {
        [pids.front_door, pids.executor.unwrap()].iter().all(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for its new parent to reap it.
            stat.is_empty() || stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z'))
        })
    })
    .await;
}

/// A supervisor killed mid-intent leaves its executor draining; a `matrixd dual` started on
/// the same volume at once waits for it instead of recording the running intent `failed`
/// under it, so the chain gets exactly one outcome.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_dual_on_the_volume_waits_for_the_draining_executor() {
    let mut dual = Dual::start(&[("MATRIX_DRAIN_TIMEOUT_SECS", "4")]).await;
    let before = dual.pids().await;
    let old_executor = before.executor.unwrap();
    let hold = dual.model.hold();
    let id = dual.submit("outlived by its supervisor").await;
    eventually("the intent reaches the model", async || dual.model.request_count() == 1).await;

    sigkill(dual.supervisor.pid());
    let _ = tokio::task::block_in_place(|| dual.supervisor.wait_exit());
    dual.supervisor = Daemon::start_with(&["dual"], &dual.env);

    let after = dual.wait_for_link(|pids| pids.executor != Some(old_executor)).await;
    assert!(exited(old_executor), "the new executor started after the old one exited");
    drop(hold);
    let chain = dual.wait_for_outcome(&id).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Cancelled]);
    assert_eq!(dual.chain_on_disk(&id), chain);

    // The new executor runs intents.
    let next = dual.submit("after the handover").await;
    let chain = dual.wait_for_outcome(&next).await;
    assert_eq!(kinds(&chain), [Kind::Drafting, Kind::Running, Kind::Completed]);
    assert_ne!(after.executor, Some(old_executor));
}

/// The machine's entrypoint in dual mode: boots, serves, stops on `/shutdown`; a second
/// boot leaves the same volume.
#[test]
fn the_entrypoint_runs_dual_mode_and_a_second_boot_leaves_the_same_volume() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    env.insert("MATRIX_MODE".into(), "dual".into());
    let script = harness::tools::workspace_root().join("deploy/daemon/entrypoint.sh");
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", matrixd().parent().unwrap().display());

    let mut hashes = Vec::new();
    for _ in 0..2 {
        let mut child = std::process::Command::new("bash")
            .arg(&script)
            .env_clear()
            .envs(&env)
            .env("PATH", &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().unwrap().unwrap();
        let url = line.strip_prefix("matrixd listening on ").expect(&line).to_owned();
        let health = (0..1000)
            .find_map(|_| {
                let health: Value =
                    ureq::get(&format!("{url}/healthz")).call().unwrap().into_json().unwrap();
                if health["executor"]["link"] == "up" {
                    return Some(health);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                None
            })
            .expect("the executor link comes up within 20 s");
        assert_ne!(health["executor"]["pid"], health["pid"]);

        let response = ureq::post(&format!("{url}/shutdown"))
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap();
        assert_eq!(response.status(), 202);
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
        hashes.push(tree_hash(data.path()));
    }
    assert_eq!(hashes[0], hashes[1]);
}

#[test]
fn a_child_whose_supervisor_is_already_gone_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let mut env = base_env(data.path());
    // This test's process is not the named supervisor: as if the supervisor had died and the
    // child had been handed to another parent before it could ask to die with it.
    env.insert("MATRIX_SUPERVISOR_PID".into(), "1".into());
    run_ok(&["init"], &env);
    for args in [&["executor"][..], &["serve", "--front-door"][..]] {
        let output = run(args, &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started: {stderr}");
        assert!(stderr.contains("supervisor exited"), "{args:?}: {stderr}");
    }
}
