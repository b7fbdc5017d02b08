//! The client against a real emulator: every call, every error case, retries, processes.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use machines::client::CREATE_KEY_METADATA;
use machines::emulator::{RateLimit, SettingsPatch};
use machines::types::{
    CreateVolumeRequest, MachineState, Mount, RestartPolicy, StopRequest, UpdateMachineRequest,
    WaitState,
};
use machines::{FlyClient, ListMachines, RetryPolicy};
use reqwest::Method;
use serde_json::json;
use support::{eventually, http_get, request, Env, APP, TOKEN};

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_created_then_the_machine_starts_on_its_own_address() {
    let env = Env::start().await;

    let created = env.fly.create_machine(&request("sleeper")).await.unwrap();
    assert_eq!(created.state, MachineState::Created);
    assert_eq!(created.instance_id.len(), 26, "a ULID");
    assert_eq!(created.id.len(), 14);
    assert_eq!(created.events[0].kind, "launch");
    let other = env.fly.create_machine(&request("sleeper")).await.unwrap();

    for machine in [&created, &other] {
        let address: std::net::Ipv4Addr = machine.private_ip.parse().unwrap();
        assert!(address.is_loopback() && address != std::net::Ipv4Addr::LOCALHOST, "{address}");
    }
    assert_ne!(created.private_ip, other.private_ip);

    let reached = env.fly.wait_machine(&created.id, WaitState::Started, None, LONG).await.unwrap();
    assert!(reached.ok);
    assert_eq!(reached.state, "started");
    assert_eq!(reached.version, created.instance_id);
    assert_eq!(env.fly.get_machine(&created.id).await.unwrap().state, MachineState::Started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_metadata_and_state() {
    let env = Env::start().await;
    let mut alice = request("sleeper");
    alice.config.metadata.insert("user".into(), "alice".into());
    let mut bob = request("sleeper");
    bob.config.metadata.insert("user".into(), "bob".into());
    bob.skip_launch = true;
    let alice = env.fly.create_machine(&alice).await.unwrap();
    let bob = env.fly.create_machine(&bob).await.unwrap();
    env.fly.wait_machine(&alice.id, WaitState::Started, None, LONG).await.unwrap();
    let version = bob.instance_id.as_str();
    env.fly.wait_machine(&bob.id, WaitState::Stopped, Some(version), LONG).await.unwrap();

    let found = env.fly.list_machines(&ListMachines::with_metadata("user", "bob")).await.unwrap();
    assert_eq!(found.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [bob.id.as_str()]);
    let nobody = env.fly.list_machines(&ListMachines::with_metadata("user", "carol")).await;
    assert!(nobody.unwrap().is_empty());

    let started = ListMachines { states: vec![MachineState::Started], ..Default::default() };
    let found = env.fly.list_machines(&started).await.unwrap();
    assert_eq!(found.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [alice.id.as_str()]);
    assert_eq!(env.fly.list_machines(&ListMachines::default()).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_while_created_is_412_and_the_error_names_call_and_machine() {
    let env = Env::start().await;
    env.settings(SettingsPatch { created_ms: Some(3000), ..Default::default() }).await;
    let machine = env.fly.create_machine(&request("sleeper")).await.unwrap();

    let error = env.fly.start_machine(&machine.id, None).await.unwrap_err();

    assert!(error.is_precondition_failed(), "{error}");
    let text = error.to_string();
    assert!(text.contains("start_machine"), "{text}");
    assert!(text.contains(&machine.id), "{text}");
    assert!(
        text.contains("failed_precondition: unable to start machine from current state: 'created'"),
        "{text}"
    );
    assert!(!text.contains(TOKEN));
    let stats = env.stats().await;
    assert_eq!(stats.get("start"), Some(&1), "a 412 is not retried: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_asks_again_after_408_and_reports_a_timeout_when_it_runs_out() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;

    env.fault(json!({"action": "wait", "status": 408, "count": 2})).await;
    let reached = env.fly.wait_machine(&machine.id, WaitState::Started, None, LONG).await.unwrap();
    assert_eq!(reached.state, "started");
    assert_eq!(env.stats().await.get("wait").copied(), Some(4), "1 + two 408s + the answer");

    let error = env
        .fly
        .wait_machine(&machine.id, WaitState::Suspended, None, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    assert!(matches!(error, machines::FlyError::WaitTimeout { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_rejects_bad_timeouts_and_stopped_without_a_version() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let base = format!("/v1/apps/{APP}/machines/{}/wait", machine.id);

    for query in ["?timeout=0", "?timeout=61", "?state=stopped", "?state=sleeping"] {
        let (status, body) = env.raw(Method::GET, &format!("{base}{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with("invalid_argument: "), "{body}");
    }
    let (status, body) = env.raw(Method::GET, &format!("{base}?state=suspended&timeout=1")).await;
    assert_eq!(status, 408, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_freezes_the_process_and_start_resumes_it() {
    if !support::have_python() {
        return;
    }
    let env = Env::start().await;
    let machine = env.started("web:1").await;
    eventually("the web server answers", 100, || async {
        http_get(&machine, "/").await.filter(|s| *s == 200)
    })
    .await;

    env.fly.suspend_machine(&machine.id, None).await.unwrap();
    env.fly.wait_machine(&machine.id, WaitState::Suspended, None, LONG).await.unwrap();
    assert_eq!(http_get(&machine, "/").await, None, "a frozen process does not answer");

    let started = env.fly.start_machine(&machine.id, None).await.unwrap();
    assert_eq!(started.previous_state, "suspended");
    assert_eq!(env.fly.get_machine(&machine.id).await.unwrap().state, MachineState::Started);
    assert_eq!(http_get(&machine, "/").await, Some(200), "the same process answers again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_process_and_start_spawns_a_new_one() {
    if !support::have_python() {
        return;
    }
    let env = Env::start().await;
    let machine = env.started("web:1").await;
    eventually("the web server answers", 100, || async { http_get(&machine, "/").await }).await;

    let stop = StopRequest { signal: Some("SIGTERM".into()), timeout: Some("2s".into()) };
    env.fly.stop_machine(&machine.id, &stop, None).await.unwrap();
    let version = machine.instance_id.as_str();
    env.fly.wait_machine(&machine.id, WaitState::Stopped, Some(version), LONG).await.unwrap();
    assert_eq!(http_get(&machine, "/").await, None);
    let stopped = env.fly.get_machine(&machine.id).await.unwrap();
    assert_eq!(stopped.events[0].kind, "exit");

    env.fly.start_machine(&machine.id, None).await.unwrap();
    eventually("the new process answers", 100, || async { http_get(&machine, "/").await }).await;

    let bad = StopRequest { signal: Some("SIGSEGV".into()), timeout: None };
    let error = env.fly.stop_machine(&machine.id, &bad, None).await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(400), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_at_boot_leaves_the_machine_failed() {
    let env = Env::start().await;
    let machine = env.fly.create_machine(&request("crash")).await.unwrap();

    env.fly.wait_machine(&machine.id, WaitState::Failed, None, LONG).await.unwrap();

    let failed = env.fly.get_machine(&machine.id).await.unwrap();
    assert_eq!(failed.state, MachineState::Failed);
    let exit = failed.events_of("exit").next().expect("an exit event");
    assert_eq!(exit.request.as_ref().unwrap()["exit_event"]["exit_code"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_boot_is_restarted_up_to_max_retries_by_the_on_failure_policy() {
    let env = Env::start().await;
    let mut create = request("crash-later");
    create.config.restart = Some(RestartPolicy {
        policy: Some("on-failure".into()),
        max_retries: Some(2),
        ..RestartPolicy::default()
    });
    let machine = env.fly.create_machine(&create).await.unwrap();

    // Three runs (the first and two restarts), each ending in an exit event.
    let stopped = eventually("three exits", 200, || async {
        let machine = env.fly.get_machine(&machine.id).await.unwrap();
        (machine.events_of("exit").count() == 3).then_some(machine)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = env.fly.get_machine(&machine.id).await.unwrap();
    assert_eq!(settled.state, MachineState::Stopped, "no fourth run: {:?}", stopped.events);
    assert_eq!(settled.events_of("exit").count(), 3);

    // A start by a user gives the policy its retries back.
    env.fly.start_machine(&machine.id, None).await.unwrap();
    eventually("three more exits", 200, || async {
        let machine = env.fly.get_machine(&machine.id).await.unwrap();
        (machine.events_of("exit").count() == 6).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_or_the_no_policy_leaves_the_machine_stopped() {
    let env = Env::start().await;
    let clean = env.fly.create_machine(&request("done-later")).await.unwrap();
    let mut never = request("crash-later");
    never.config.restart = Some(RestartPolicy { policy: Some("no".into()), ..Default::default() });
    let never = env.fly.create_machine(&never).await.unwrap();

    for machine in [&clean, &never] {
        let version = Some(machine.instance_id.as_str());
        env.fly.wait_machine(&machine.id, WaitState::Stopped, version, LONG).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let settled = env.fly.get_machine(&machine.id).await.unwrap();
        assert_eq!(settled.state, MachineState::Stopped, "{}", machine.config.image);
        assert_eq!(settled.events_of("exit").count(), 1, "{}", machine.config.image);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_replaces_the_whole_config_and_start_while_replacing_is_412_until_done() {
    let env = Env::start().await;
    env.settings(SettingsPatch { replacing_ms: Some(1500), ..Default::default() }).await;
    let machine = env.started("sleeper").await;
    env.fly.stop_machine(&machine.id, &StopRequest::default(), None).await.unwrap();
    let version = machine.instance_id.as_str();
    env.fly.wait_machine(&machine.id, WaitState::Stopped, Some(version), LONG).await.unwrap();

    let mut config = machine.config.clone();
    config.env.insert("RELEASE".into(), "2".into());
    config.extra.insert("dns".into(), json!({"skip_registration": true}));
    let update = UpdateMachineRequest {
        config,
        current_version: Some(machine.instance_id.clone()),
        ..Default::default()
    };
    let updated = env.fly.update_machine(&machine.id, &update, None).await.unwrap();

    assert_eq!(updated.state, MachineState::Replacing);
    assert_ne!(updated.instance_id, machine.instance_id);
    assert_eq!(updated.instance_id.len(), 26);
    let again = env.fly.update_machine(&machine.id, &update, None).await.unwrap_err();
    assert!(again.is_precondition_failed(), "stale current_version: {again}");
    let error = env.fly.start_machine(&machine.id, None).await.unwrap_err();
    assert!(error.is_precondition_failed(), "{error}");
    assert!(error.to_string().contains("'replacing'"), "{error}");

    // What the router does: a 412 on start is retried until the machine has settled.
    let started = eventually("start after replacing", 200, || async {
        match env.fly.start_machine(&machine.id, None).await {
            Ok(started) => Some(started),
            Err(e) if e.is_precondition_failed() => None,
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert_eq!(started.previous_state, "stopped", "the update left the stopped machine stopped");
    let now = env.fly.get_machine(&machine.id).await.unwrap();
    assert_eq!(now.state, MachineState::Started);
    assert_eq!(now.config.env.get("RELEASE").map(String::as_str), Some("2"));
    assert_eq!(now.config.extra["dns"], json!({"skip_registration": true}), "unknown fields kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_started_machine_restarts_it_unless_skip_launch() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let update = UpdateMachineRequest { config: machine.config.clone(), ..Default::default() };
    let updated = env.fly.update_machine(&machine.id, &update, None).await.unwrap();
    let concurrent = env.fly.update_machine(&machine.id, &update, None).await.unwrap_err();
    assert!(concurrent.is_conflict(), "{concurrent}");
    assert!(concurrent.to_string().contains("aborted: machine is replacing"), "{concurrent}");

    let reached = env.fly.wait_machine(&machine.id, WaitState::Started, None, LONG).await.unwrap();
    assert_eq!(reached.version, updated.instance_id);

    let skip = UpdateMachineRequest { skip_launch: true, ..update };
    let skipped = env.fly.update_machine(&machine.id, &skip, None).await.unwrap();
    let version = skipped.instance_id.as_str();
    env.fly.wait_machine(&machine.id, WaitState::Stopped, Some(version), LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_conflict_and_guard_mutating_calls_with_their_nonce() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let ttl = Duration::from_secs(30);

    let lease = env.fly.acquire_lease(&machine.id, ttl, "rollout").await.unwrap();
    assert_eq!(lease.status, "success");
    let nonce = lease.data.nonce.clone();
    assert_eq!(env.fly.get_lease(&machine.id).await.unwrap().data.nonce, nonce);

    let taken = env.fly.acquire_lease(&machine.id, ttl, "another").await.unwrap_err();
    assert!(taken.is_conflict(), "{taken}");
    assert!(taken.to_string().contains("lease currently held by"), "{taken}");

    let refused = env.fly.suspend_machine(&machine.id, None).await.unwrap_err();
    assert!(refused.is_conflict(), "no nonce: {refused}");
    let wrong = env.fly.suspend_machine(&machine.id, Some("not-the-nonce")).await.unwrap_err();
    assert!(wrong.is_conflict(), "wrong nonce: {wrong}");
    env.fly.suspend_machine(&machine.id, Some(&nonce)).await.unwrap();

    let refreshed =
        env.fly.refresh_lease(&machine.id, &nonce, Duration::from_secs(120)).await.unwrap();
    assert_eq!(refreshed.data.nonce, nonce);
    assert!(refreshed.data.expires_at > lease.data.expires_at);

    let path = format!("/v1/apps/{APP}/machines/{}/lease", machine.id);
    let (status, _) = env.raw(Method::DELETE, &path).await;
    assert_eq!(status, 400, "release without a nonce");
    env.fly.release_lease(&machine.id, &nonce).await.unwrap();
    assert!(env.fly.get_lease(&machine.id).await.unwrap_err().is_not_found());
    env.fly.release_lease(&machine.id, &nonce).await.expect("a released lease stays released");
    env.fly.start_machine(&machine.id, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_absorb_429_and_503_without_creating_a_second_machine() {
    let env = Env::start().await;
    env.fault(json!({"action": "create", "status": 503, "count": 2})).await;
    env.fault(json!({"action": "create", "status": 429, "count": 1, "retry_after": 1})).await;

    let machine = env.fly.create_machine(&request("sleeper")).await.unwrap();

    assert_eq!(env.stats().await.get("create"), Some(&4));
    let all = env.fly.list_machines(&ListMachines::default()).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, machine.id);

    // The machine is created but the answer is lost: the retry finds it by its key.
    env.fault(json!({"action": "create", "status": 503, "count": 1, "after": true})).await;
    let second = env.fly.create_machine(&request("sleeper")).await.unwrap();
    let all = env.fly.list_machines(&ListMachines::default()).await.unwrap();
    assert_eq!(all.len(), 2, "no duplicate: {:?}", all.iter().map(|m| &m.id).collect::<Vec<_>>());
    assert!(second.config.metadata.contains_key(CREATE_KEY_METADATA));

    // Reads and starts are retried on 5xx too.
    env.fault(json!({"action": "get", "status": 502, "count": 2})).await;
    env.fly.get_machine(&machine.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_and_the_client_backs_off() {
    let env = Env::start().await;
    let limit = RateLimit { per_second: 2.0, burst: 2.0, ..RateLimit::default() };
    env.settings(SettingsPatch { rate_limit: Some(Some(limit)), ..Default::default() }).await;

    let retry = RetryPolicy {
        max_attempts: 10,
        base_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(2),
    };
    let options = machines::ClientOptions { retry, ..support::fast_options() };
    let patient = FlyClient::with_options(&env.emulator.url(), TOKEN, APP, options).unwrap();
    for _ in 0..5 {
        patient.list_volumes().await.unwrap();
    }
    let calls = env.stats().await["volume_list"];
    assert!(calls > 5, "some calls were refused and retried: {calls}");

    let options = machines::ClientOptions { retry: RetryPolicy::none(), ..support::fast_options() };
    let impatient = FlyClient::with_options(&env.emulator.url(), TOKEN, APP, options).unwrap();
    let mut errors = Vec::new();
    for _ in 0..4 {
        if let Err(e) = impatient.list_volumes().await {
            errors.push(e);
        }
    }
    assert!(errors.iter().any(|e| e.is_rate_limited()), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_macaroons_use_the_flyv1_scheme() {
    let env = Env::start().await;
    let stranger =
        FlyClient::with_options(&env.emulator.url(), "wrong", APP, support::fast_options());
    let error = stranger.unwrap().list_volumes().await.unwrap_err();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(401));
    assert!(!format!("{error:?}").contains("wrong"), "the token is not in the error");

    let state = tempfile::tempdir().unwrap();
    let mut config =
        machines::emulator::EmulatorConfig::new("fm2_macaroon", support::image_map(), state.path());
    config.settings = support::fast_settings();
    let emulator = machines::emulator::Emulator::start(config).await.unwrap();
    let client = FlyClient::new(&emulator.url(), "fm2_macaroon", APP).unwrap();
    client.list_volumes().await.unwrap();
    assert!(!format!("{client:?}").contains("macaroon"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_see_their_environment_and_volume_and_survive_an_emulator_restart() {
    let env = Env::start().await;
    let volume = env
        .fly
        .create_volume(&CreateVolumeRequest { name: "data".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(volume.state, "created");
    let mut create = request("recorder");
    create.config.env.insert("CONFIG_VAR".into(), "ip={private_ip}".into());
    create.config.mounts =
        vec![Mount { volume: volume.id.clone(), path: "/data".into(), ..Default::default() }];
    let machine = env.fly.create_machine(&create).await.unwrap();
    env.fly.wait_machine(&machine.id, WaitState::Started, None, LONG).await.unwrap();
    assert_eq!(
        env.fly.get_volume(&volume.id).await.unwrap().attached_machine_id.as_deref(),
        Some(machine.id.as_str())
    );

    let env_file = env.volume_dir(&volume.id).join("env.txt");
    let recorded = eventually("the machine writes its env", 100, || async {
        std::fs::read_to_string(&env_file).ok().filter(|t| t.contains("FLY_IMAGE_REF"))
    })
    .await;
    let vars: BTreeMap<&str, &str> = recorded.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars["FLY_MACHINE_ID"], machine.id);
    assert_eq!(vars["FLY_APP_NAME"], APP);
    assert_eq!(vars["FLY_REGION"], "local");
    assert_eq!(vars["FLY_PRIVATE_IP"], machine.private_ip);
    assert_eq!(vars["FLY_IMAGE_REF"], "recorder");
    assert_eq!(vars["APP_SECRET"], "s3cr3t");
    assert_eq!(vars["IMAGE_VAR"], "from-image");
    assert_eq!(vars["CONFIG_VAR"], format!("ip={}", machine.private_ip));
    // The recorder writes env.txt before args.txt: wait for the second file as well.
    let args_file = env.volume_dir(&volume.id).join("args.txt");
    let args = eventually("the machine writes its arguments", 100, || async {
        std::fs::read_to_string(&args_file).ok().filter(|t| t.ends_with('\n'))
    })
    .await;
    assert_eq!(args.trim(), format!("{} {APP} 8080", machine.id));

    let env = env.restart().await;

    let back = env.fly.get_machine(&machine.id).await.unwrap();
    assert_eq!(back.state, MachineState::Stopped);
    assert_eq!(back.instance_id, machine.instance_id);
    assert!(env.volume_dir(&volume.id).join("env.txt").exists(), "volume files kept");
    assert_eq!(env.fly.list_volumes().await.unwrap().len(), 1);
    env.fly.start_machine(&machine.id, None).await.unwrap();
    assert_eq!(env.fly.get_machine(&machine.id).await.unwrap().state, MachineState::Started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_needs_force_while_running_and_frees_the_volume() {
    let env = Env::start().await;
    let volume = env
        .fly
        .create_volume(&CreateVolumeRequest { name: "data".into(), ..Default::default() })
        .await
        .unwrap();
    let mut create = request("sleeper");
    create.config.mounts =
        vec![Mount { volume: volume.id.clone(), path: "/data".into(), ..Default::default() }];
    let machine = env.fly.create_machine(&create).await.unwrap();
    env.fly.wait_machine(&machine.id, WaitState::Started, None, LONG).await.unwrap();

    let attached = env.fly.delete_volume(&volume.id).await.unwrap_err();
    assert!(attached.is_precondition_failed(), "{attached}");
    let again = env.fly.create_machine(&create).await.unwrap_err();
    assert!(again.is_precondition_failed(), "one machine per volume: {again}");
    let running = env.fly.delete_machine(&machine.id, false, None).await.unwrap_err();
    assert!(running.is_precondition_failed(), "{running}");

    env.fly.delete_machine(&machine.id, true, None).await.unwrap();

    assert_eq!(env.fly.get_machine(&machine.id).await.unwrap().state, MachineState::Destroyed);
    assert!(env.fly.list_machines(&ListMachines::default()).await.unwrap().is_empty());
    let deleted = env.fly.delete_volume(&volume.id).await.unwrap();
    assert_eq!(deleted.state, "destroyed");
    assert!(env.fly.get_volume(&volume.id).await.unwrap_err().is_not_found());
    assert!(!env.volume_dir(&volume.id).exists());
    assert!(env.fly.get_machine("00000000000000").await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_report_passing_and_critical() {
    if !support::have_python() {
        return;
    }
    let env = Env::start().await;
    let check = machines::types::Check {
        kind: Some("http".into()),
        port: Some(8080),
        path: Some("/".into()),
        interval: Some("200ms".into()),
        grace_period: Some("0s".into()),
        ..Default::default()
    };
    let mut healthy = request("web:2");
    healthy.config.checks.insert("alive".into(), check.clone());
    let mut unhealthy = request("unhealthy");
    unhealthy.config.checks.insert("alive".into(), check);
    let healthy = env.fly.create_machine(&healthy).await.unwrap();
    let unhealthy = env.fly.create_machine(&unhealthy).await.unwrap();

    for (machine, expected) in [(&healthy, "passing"), (&unhealthy, "critical")] {
        eventually("the check result", 200, || async {
            let machine = env.fly.get_machine(&machine.id).await.unwrap();
            let status = machine.checks.first().map(|c| serde_json::to_value(c.status).unwrap());
            (status == Some(json!(expected))).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_can_change_across_restarts() {
    let env = Env::start().await;
    env.settings(SettingsPatch { reassign_address_on_start: Some(true), ..Default::default() })
        .await;
    let machine = env.started("sleeper").await;
    let stop = StopRequest { signal: Some("SIGKILL".into()), timeout: None };
    env.fly.stop_machine(&machine.id, &stop, None).await.unwrap();
    let version = machine.instance_id.as_str();
    env.fly.wait_machine(&machine.id, WaitState::Stopped, Some(version), LONG).await.unwrap();

    env.fly.start_machine(&machine.id, None).await.unwrap();

    let moved = env.fly.get_machine(&machine.id).await.unwrap();
    assert_ne!(moved.private_ip, machine.private_ip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_writes_answer_204_and_apps_can_be_created() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    env.fly.set_metadata(&machine.id, "user", "alice", None).await.unwrap();
    let found = env.fly.list_machines(&ListMachines::with_metadata("user", "alice")).await.unwrap();
    assert_eq!(found.len(), 1);

    let path = format!("/v1/apps/{APP}/machines/{}/metadata/user", machine.id);
    let (status, _) = env.raw(Method::DELETE, &path).await;
    assert_eq!(status, 204);
    let (status, metadata) =
        env.raw(Method::GET, &format!("/v1/apps/{APP}/machines/{}/metadata", machine.id)).await;
    assert_eq!(status, 200);
    assert!(metadata.get("user").is_none(), "{metadata}");

    let url = format!("{}/v1/apps", env.emulator.url());
    let http = reqwest::Client::new();
    let body = json!({"app_name": "user-1234", "org_slug": "personal"});
    let created = http.post(&url).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let taken = http.post(&url).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    assert_eq!(taken.status(), 422);
    let (status, events) =
        env.raw(Method::GET, &format!("/v1/apps/{APP}/machines/{}/events", machine.id)).await;
    assert_eq!(status, 200);
    assert_eq!(events[0]["type"], "start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_a_lease_ttl_answers_the_nonce_and_holds_the_lease() {
    let env = Env::start().await;
    let mut leased = request("sleeper");
    leased.lease_ttl = Some(30);

    let machine = env.fly.create_machine(&leased).await.unwrap();

    let nonce = machine.nonce.clone().expect("a nonce in the create answer");
    assert_eq!(env.fly.get_lease(&machine.id).await.unwrap().data.nonce, nonce);
    env.fly.wait_machine(&machine.id, WaitState::Started, None, LONG).await.unwrap();
    let refused = env.fly.delete_machine(&machine.id, true, None).await.unwrap_err();
    assert!(refused.is_conflict(), "{refused}");
    env.fly.delete_machine(&machine.id, true, Some(&nonce)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_has_a_timeout() {
    // A server that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let options = machines::ClientOptions {
        timeout: Duration::from_millis(300),
        retry: RetryPolicy { max_attempts: 2, ..RetryPolicy::default() },
        ..support::fast_options()
    };
    let fly = FlyClient::with_options(&url, TOKEN, APP, options).unwrap();

    let error = fly.get_machine("148e1d3b2d9e89").await.unwrap_err();

    assert!(error.is_timeout(), "{error:?}");
    assert!(error.is_transient());
    let text = error.to_string();
    assert!(text.contains("get_machine on 148e1d3b2d9e89"), "{text}");
    let lease = fly.acquire_lease("148e1d3b2d9e89", LONG, "x").await.unwrap_err();
    assert!(lease.is_timeout(), "{lease:?}");
    accept.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_refused_while_stopping_or_suspending_and_stop_ends_with_sigkill() {
    let env = Env::start().await;
    env.settings(SettingsPatch { suspending_ms: Some(1000), ..Default::default() }).await;
    let stubborn = env.started("stubborn").await;
    let sleeper = env.started("sleeper").await;

    // The process ignores SIGINT: the machine stays `stopping` until the SIGKILL.
    let stop = StopRequest { signal: None, timeout: Some("1500ms".into()) };
    env.fly.stop_machine(&stubborn.id, &stop, None).await.unwrap();
    env.fly.suspend_machine(&sleeper.id, None).await.unwrap();

    for (machine, state) in [(&stubborn, "'stopping'"), (&sleeper, "'suspending'")] {
        let error = env.fly.start_machine(&machine.id, None).await.unwrap_err();
        assert!(error.is_precondition_failed(), "{error}");
        assert!(error.to_string().contains(state), "{error}");
    }
    let version = stubborn.instance_id.as_str();
    env.fly.wait_machine(&stubborn.id, WaitState::Stopped, Some(version), LONG).await.unwrap();
    let exit = env.fly.get_machine(&stubborn.id).await.unwrap().events[0].clone();
    assert_eq!(exit.request.unwrap()["exit_event"]["signal"], 9, "killed by SIGKILL");
    env.fly.wait_machine(&sleeper.id, WaitState::Suspended, None, LONG).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_update_whose_answer_is_lost_is_not_sent_twice() {
    let env = Env::start().await;
    let machine = env.started("sleeper").await;
    let update = UpdateMachineRequest {
        config: machine.config.clone(),
        current_version: Some(machine.instance_id.clone()),
        ..Default::default()
    };
    env.fault(json!({"action": "update", "status": 503, "count": 1, "after": true})).await;

    let error = env.fly.update_machine(&machine.id, &update, None).await.unwrap_err();

    assert_eq!(error.status().map(|s| s.as_u16()), Some(503), "{error}");
    assert_eq!(env.stats().await.get("update"), Some(&1));
    let now = env.fly.get_machine(&machine.id).await.unwrap();
    assert_ne!(now.instance_id, machine.instance_id, "the update did happen");

    // Without a version, sending it again is harmless, so it is retried.
    env.fault(json!({"action": "update", "status": 503, "count": 1})).await;
    env.fly.wait_machine(&machine.id, WaitState::Started, None, LONG).await.unwrap();
    let unversioned = UpdateMachineRequest { current_version: None, ..update };
    env.fly.update_machine(&machine.id, &unversioned, None).await.unwrap();
    assert_eq!(env.stats().await.get("update"), Some(&3));
}
