//! Rollouts against the Fly Machines emulator, with progress in a throwaway PostgreSQL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use machines::emulator::{Emulator, EmulatorConfig, EmulatorHandle, ImageMap, ImageSpec};
use machines::types::{CreateMachineRequest, Machine, MachineConfig, MachineState, WaitState};
use machines::FlyClient;
use rollout::{MachineResult, Progress, Rollout, RolloutConfig, RolloutStatus, Store};

const TOKEN: &str = "emulator-test-token";
const APP: &str = "matrix-users";
const OLD: &str = "registry.example/daemon@sha256:0001";
const NEW: &str = "registry.example/daemon@sha256:0002";
const BAD: &str = "registry.example/daemon@sha256:0bad";

/// An emulated app with per-user machines in mixed states, and a database.
struct Fleet {
    fly: FlyClient,
    emulator: EmulatorHandle,
    database_url: String,
    started: Vec<String>,
    asleep: Vec<String>,
    _pg: harness::postgres::PgCluster,
    _state: tempfile::TempDir,
}

impl Fleet {
    async fn start(started: usize, suspended: usize, stopped: usize) -> Option<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pg = harness::postgres::PgCluster::start().expect("start postgres")?;
        let database_url = pg.create_database("rollout").expect("create database");
        let upstream = harness::tools::workspace_binary("test-upstream");

        let daemon = |fail_health| ImageSpec {
            command: vec![upstream.display().to_string()],
            env: BTreeMap::from([
                ("PORT".to_owned(), "8080".to_owned()),
                ("MATRIX_DAEMON_TOKEN".to_owned(), "daemon-token".to_owned()),
            ]),
            fail_health,
        };
        let images = ImageMap {
            images: BTreeMap::from([
                (OLD.to_owned(), daemon(false)),
                (NEW.to_owned(), daemon(false)),
                (BAD.to_owned(), daemon(true)),
            ]),
            app_env: BTreeMap::new(),
        };
        let state = tempfile::tempdir().expect("state dir");
        let mut config = EmulatorConfig::new(TOKEN, images, state.path());
        config.settings.created_ms = 50;
        config.settings.replacing_ms = 100;
        let emulator = Emulator::start(config).await.expect("start emulator");
        let fly = FlyClient::new(&emulator.url(), TOKEN, APP).expect("fly client");

        // Create everything started, then put some to sleep the way idle users' are.
        let total = started + suspended + stopped;
        let creates = (0..total).map(|i| create(&fly, i));
        let machines: Vec<Machine> = futures_util::future::join_all(creates).await;
        let mut fleet = Self {
            fly,
            emulator,
            database_url,
            started: vec![],
            asleep: vec![],
            _pg: pg,
            _state: state,
        };
        for (i, machine) in machines.iter().enumerate() {
            let id = machine.id.as_str();
            if i < started {
                fleet.started.push(machine.id.clone());
            } else if i < started + suspended {
                fleet.fly.suspend_machine(id, None).await.expect("suspend");
                fleet.wait(id, WaitState::Suspended, None).await;
                fleet.asleep.push(machine.id.clone());
            } else {
                fleet.fly.stop_machine(id, &Default::default(), None).await.expect("stop");
                fleet.wait(id, WaitState::Stopped, Some(&machine.instance_id)).await;
                fleet.asleep.push(machine.id.clone());
            }
        }
        Some(fleet)
    }

    async fn wait(&self, id: &str, state: WaitState, version: Option<&str>) {
        self.fly.wait_machine(id, state, version, Duration::from_secs(30)).await.expect("wait");
    }

    async fn rollout(&self, config: RolloutConfig) -> Rollout {
        let store = Store::connect(&self.database_url).await.expect("connect store");
        Rollout::new(self.fly.clone(), store, config)
    }

    async fn machine(&self, id: &str) -> Machine {
        self.fly.get_machine(id).await.expect("get machine")
    }

    /// Updates the user asked for on this machine (not Fly's own follow-up events).
    async fn updates_of(&self, id: &str) -> usize {
        self.machine(id)
            .await
            .events
            .iter()
            .filter(|e| e.kind == "update" && e.source == "user")
            .count()
    }

    async fn stats(&self) -> BTreeMap<String, u64> {
        let url = format!("{}/_emulator/stats", self.emulator.url());
        reqwest::get(url).await.expect("stats").json().await.expect("stats json")
    }

    async fn fault(&self, body: serde_json::Value) {
        let url = format!("{}/_emulator/faults", self.emulator.url());
        let response = reqwest::Client::new().post(url).json(&body).send().await.expect("fault");
        assert!(response.status().is_success(), "fault not accepted: {}", response.status());
    }

    async fn pending_faults(&self) -> usize {
        let url = format!("{}/_emulator/faults", self.emulator.url());
        let faults: Vec<serde_json::Value> =
            reqwest::get(url).await.expect("faults").json().await.expect("json");
        faults.len()
    }

    fn all(&self) -> impl Iterator<Item = &String> {
        self.started.iter().chain(self.asleep.iter())
    }
}

async fn create(fly: &FlyClient, index: usize) -> Machine {
    let config: MachineConfig = serde_json::from_value(serde_json::json!({
        "image": OLD,
        "metadata": { "matrix_user_id": format!("user-{index}") },
        "services": [{ "protocol": "tcp", "internal_port": 8080 }],
        "checks": { "alive": {
            "type": "http", "port": 8080, "path": "/healthz",
            "interval": "200ms", "grace_period": "0s"
        } },
        "stop_config": { "signal": "SIGTERM", "timeout": "1s" },
    }))
    .expect("config");
    let request = CreateMachineRequest { config, ..Default::default() };
    let machine = fly.create_machine(&request).await.expect("create machine");
    fly.wait_machine(&machine.id, WaitState::Started, None, Duration::from_secs(30))
        .await
        .expect("boot");
    machine
}

fn config(canary: usize, batch: usize) -> RolloutConfig {
    RolloutConfig {
        canary,
        batch,
        lease_ttl: Duration::from_secs(3),
        lease_wait: Duration::from_secs(15),
        wait_timeout: Duration::from_secs(30),
        health_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(100),
        ..RolloutConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_image_reaches_every_machine_without_waking_the_sleeping_ones() {
    let Some(fleet) = Fleet::start(20, 15, 15).await else { return };
    let mut rollout = fleet.rollout(config(2, 10)).await;

    let plan = rollout.plan(NEW).await.expect("plan");
    assert_eq!(plan.machine_count(), 50);
    assert_eq!(plan.waves.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 10, 10, 10, 10, 8]);
    assert!(plan.waves[0].iter().all(|m| m.is_running()), "the canary is health-checked");

    let outcome = rollout.run(NEW, &rollout::NoProgress).await.expect("rollout");
    assert_eq!(outcome.status, RolloutStatus::Succeeded, "{outcome}");
    assert!(!outcome.failed());
    assert_eq!(outcome.count(MachineResult::Updated), 20, "{outcome}");
    assert_eq!(outcome.count(MachineResult::UpdatedAsleep), 30, "{outcome}");

    for id in &fleet.started {
        let machine = fleet.machine(id).await;
        assert_eq!(machine.config.image, NEW);
        assert_eq!(machine.state, MachineState::Started, "{id}");
    }
    for id in &fleet.asleep {
        let machine = fleet.machine(id).await;
        assert_eq!(machine.config.image, NEW);
        assert_ne!(machine.state, MachineState::Started, "{id} was woken by the deploy");
    }
    for id in fleet.all() {
        assert_eq!(fleet.updates_of(id).await, 1, "{id}");
    }
    assert_eq!(rollout.store().desired_image(APP).await.expect("desired"), Some(NEW.to_owned()));

    // Again: everything is current, nothing is updated.
    let updates_before = fleet.stats().await.get("update").copied();
    let again = rollout.run(NEW, &rollout::NoProgress).await.expect("second rollout");
    assert_eq!(again.status, RolloutStatus::NothingToDo);
    assert_eq!(again.count(MachineResult::Current), 50);
    assert_eq!(fleet.stats().await.get("update").copied(), updates_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_image_halts_after_the_canary_and_rolls_it_back() {
    let Some(fleet) = Fleet::start(6, 2, 2).await else { return };
    let mut rollout = fleet.rollout(config(2, 4)).await;

    let outcome = rollout.run(BAD, &rollout::NoProgress).await.expect("rollout");
    assert_eq!(outcome.status, RolloutStatus::RolledBack, "{outcome}");
    assert!(outcome.failed());
    assert_eq!(outcome.count(MachineResult::RolledBack), 2, "{outcome}");
    assert_eq!(outcome.count(MachineResult::NotReached), 8, "{outcome}");
    let table = outcome.to_string();
    assert!(table.contains("check alive is Critical"), "{table}");

    let canary: Vec<&str> = outcome
        .machines
        .iter()
        .filter(|m| m.result == MachineResult::RolledBack)
        .map(|m| m.machine_id.as_str())
        .collect();
    for id in fleet.all() {
        let machine = fleet.machine(id).await;
        assert_eq!(machine.config.image, OLD, "{id} is not on the old image");
        let expected_updates = if canary.contains(&id.as_str()) { 2 } else { 0 };
        assert_eq!(fleet.updates_of(id).await, expected_updates, "{id}");
    }
    for id in &canary {
        fleet.wait(id, WaitState::Started, None).await;
    }
    assert_eq!(rollout.store().desired_image(APP).await.expect("desired"), None);
}

/// Counts finished machines and cancels the rollout after `limit` of them.
struct KillAfter {
    finished: AtomicUsize,
    limit: usize,
    kill: tokio::sync::Notify,
}

impl Progress for KillAfter {
    fn machine_finished(&self, _machine: &str, _result: MachineResult) {
        if self.finished.fetch_add(1, Ordering::SeqCst) + 1 == self.limit {
            self.kill.notify_one();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_killed_mid_wave_finishes_on_rerun_updating_each_machine_once() {
    let Some(fleet) = Fleet::start(12, 4, 4).await else { return };

    // Canary 1, then waves of 6: killed after 4 machines, in the middle of the first wave.
    let progress =
        Arc::new(KillAfter { finished: AtomicUsize::new(0), limit: 4, kill: Default::default() });
    let mut first = fleet.rollout(config(1, 6)).await;
    let watched = progress.clone();
    let task = tokio::spawn(async move { first.run(NEW, watched.as_ref()).await });
    progress.kill.notified().await;
    task.abort();
    assert!(task.await.expect_err("the rollout was cancelled").is_cancelled());

    let mut updated_before = 0;
    for id in fleet.all() {
        updated_before += usize::from(fleet.machine(id).await.config.image == NEW);
    }
    assert!((4..20).contains(&updated_before), "killed too early or too late: {updated_before}");

    // The re-run resumes the same run and finishes it.
    let mut second = fleet.rollout(config(1, 6)).await;
    let outcome = second.run(NEW, &rollout::NoProgress).await.expect("resumed rollout");
    assert!(outcome.resumed, "{outcome}");
    assert_eq!(outcome.status, RolloutStatus::Succeeded, "{outcome}");
    for id in fleet.all() {
        assert_eq!(fleet.machine(id).await.config.image, NEW, "{id}");
        assert_eq!(fleet.updates_of(id).await, 1, "{id} was updated more than once");
    }
    for id in &fleet.asleep {
        assert_ne!(fleet.machine(id).await.state, MachineState::Started, "{id} was woken");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_api_429s_are_absorbed_by_retries() {
    let Some(fleet) = Fleet::start(4, 1, 1).await else { return };
    for action in ["list", "lease_acquire", "get", "update", "wait", "lease_release"] {
        fleet.fault(serde_json::json!({ "action": action, "status": 429, "count": 2 })).await;
    }

    let mut rollout = fleet.rollout(config(1, 3)).await;
    let outcome = rollout.run(NEW, &rollout::NoProgress).await.expect("rollout");
    assert_eq!(outcome.status, RolloutStatus::Succeeded, "{outcome}");
    assert_eq!(fleet.pending_faults().await, 0, "every injected 429 was met and retried");
    for id in fleet.all() {
        assert_eq!(fleet.machine(id).await.config.image, NEW);
        assert_eq!(fleet.updates_of(id).await, 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_leased_by_someone_else_is_skipped_untouched_and_the_deploy_fails() {
    let Some(fleet) = Fleet::start(3, 0, 0).await else { return };
    let mut settings = config(1, 2);
    settings.lease_wait = Duration::from_secs(1);
    let mut rollout = fleet.rollout(settings).await;
    let canary = rollout.plan(NEW).await.expect("plan").waves[0][0].id.clone();
    // A router wake holds the canary's lease for longer than the deploy waits.
    fleet.fly.acquire_lease(&canary, Duration::from_secs(120), "wake").await.expect("lease");

    let outcome = rollout.run(NEW, &rollout::NoProgress).await.expect("rollout");
    assert!(outcome.failed(), "a skipped machine means the deploy did not finish: {outcome}");
    let canary_outcome = outcome.machines.iter().find(|m| m.machine_id == canary).expect("row");
    assert_eq!(canary_outcome.result, MachineResult::SkippedLeased, "{outcome}");
    assert_eq!(outcome.count(MachineResult::RolledBack), 0, "{outcome}");
    assert!(outcome.to_string().contains("skipped: leased by another"), "{outcome}");
    for id in fleet.all() {
        assert_eq!(fleet.machine(id).await.config.image, OLD, "{id}");
        assert_eq!(fleet.updates_of(id).await, 0, "{id} was not touched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_never_creates_or_writes_the_tables() {
    let Some(pg) = harness::postgres::PgCluster::start().expect("start postgres") else { return };
    let url = pg.create_database("dry_run").expect("create database");
    let tables = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'rollout_%'",
                &[],
            )
            .await
            .expect("count tables");
        row.get::<_, i64>(0)
    };
    let connect = || async {
        let (client, connection) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        client
    };

    // A database no deploy has used: nothing unfinished, no desired image, no tables made.
    let store = Store::connect_read_only(&url).await.expect("read-only store");
    assert!(store.active_run(APP).await.expect("active run").is_none());
    assert!(store.desired_image(APP).await.expect("desired image").is_none());
    assert_eq!(tables(connect().await).await, 0, "a dry run created tables");

    // After a real deploy recorded an image, the read-only view sees it and cannot write.
    let writer = Store::connect(&url).await.expect("store");
    writer.set_desired_image(APP, OLD, uuid::Uuid::nil()).await.expect("set desired");
    let store = Store::connect_read_only(&url).await.expect("read-only store");
    assert_eq!(store.desired_image(APP).await.expect("desired").as_deref(), Some(OLD));
    assert!(store.set_desired_image(APP, NEW, uuid::Uuid::nil()).await.is_err());
    assert_eq!(writer.desired_image(APP).await.expect("desired").as_deref(), Some(OLD));
}
