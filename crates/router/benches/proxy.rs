//! Router overhead, measured in one run side by side: the same upstream on loopback, asked
//! straight and through the router; and a wake through the router against the emulator's
//! own resume time.
//!
//! `cargo build --workspace --bins && cargo bench -p matrix-router --bench proxy`
//!
//! Everything runs on loopback and stops by itself (a few seconds per phase). The load
//! generator, the router, the upstream and the emulator share the machine's cores, so the
//! figures are for comparing, not absolute capacities.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use machines::emulator::{Emulator, EmulatorConfig, ImageMap, ImageSpec};
use machines::types::{MachineState, WaitState};
use machines::FlyClient;
use matrix_router::config::{self, Config};

const FLY_TOKEN: &str = "bench-token";
const APP: &str = "matrix-bench";
const IMAGE: &str = "matrix/bench-daemon:latest";
const JWT_SECRET: &str = "bench-legacy-jwt-secret-with-at-least-32-chars";
const ISSUER: &str = "https://benchbench.supabase.co/auth/v1";
const LATENCY_REQUESTS: usize = 2000;
const THROUGHPUT_CONNECTIONS: usize = 16;
const THROUGHPUT_TIME: Duration = Duration::from_secs(4);
const WAKES: usize = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(pg) = harness::postgres::PgCluster::start()? else { return Ok(()) };

    let upstream = upstream_binary();
    let image = ImageSpec {
        command: vec![upstream.display().to_string()],
        env: BTreeMap::from([("MATRIX_LISTEN_ADDR".into(), "{private_ip}:{port}".into())]),
        fail_health: false,
    };
    let images =
        ImageMap { images: BTreeMap::from([(IMAGE.to_owned(), image)]), ..ImageMap::default() };
    let state = tempfile::tempdir()?;
    let mut emulator_config = EmulatorConfig::new(FLY_TOKEN, images, state.path());
    emulator_config.settings.created_ms = 50;
    let emulator = Emulator::start(emulator_config).await?;
    let fly = FlyClient::new(&emulator.url(), FLY_TOKEN, APP)?;

    let config = router_config(&pg.url(), &emulator.url())?;
    let router = matrix_router::start(config).await?;
    let user = uuid::Uuid::new_v4();
    let jwt = user_token(user)?;

    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .http1_only()
        .pool_max_idle_per_host(64)
        .build()?;
    let routed = Target {
        url: format!("https://{}/echo", router.addr),
        authorization: format!("Bearer {jwt}"),
    };
    // The first request provisions the machine; its daemon token is what the router sends.
    let echo: serde_json::Value = client
        .get(&routed.url)
        .header("authorization", &routed.authorization)
        .send()
        .await?
        .json()
        .await?;
    let machine_id = echo["machine_id"].as_str().unwrap_or_default().to_owned();
    let machine = fly.get_machine(&machine_id).await?;
    let daemon_auth = header_value(&echo, "authorization").unwrap_or_default();
    let direct = Target {
        url: format!("http://{}:8080/echo", machine.private_ip),
        authorization: daemon_auth,
    };

    println!("| measure | direct | through the router |");
    println!("| --- | --- | --- |");
    let direct_latency = latency(&client, &direct).await?;
    let routed_latency = latency(&client, &routed).await?;
    println!(
        "| p50 latency, 1 connection, {LATENCY_REQUESTS} requests | {:.3} ms | {:.3} ms |",
        ms(direct_latency.p50),
        ms(routed_latency.p50)
    );
    println!(
        "| p99 latency | {:.3} ms | {:.3} ms |",
        ms(direct_latency.p99),
        ms(routed_latency.p99)
    );
    let direct_rps = throughput(&client, &direct).await;
    let routed_rps = throughput(&client, &routed).await;
    println!(
        "| requests/s, {THROUGHPUT_CONNECTIONS} connections, {}s | {direct_rps:.0} | \
            {routed_rps:.0} |",
        THROUGHPUT_TIME.as_secs()
    );
    println!();
    println!(
        "added p50 latency: {:.3} ms; router throughput: {:.0}% of direct",
        ms(routed_latency.p50.saturating_sub(direct_latency.p50)),
        100.0 * routed_rps / direct_rps
    );

    let (resume, wake) =
        wakes(&client, &fly, &routed, &machine_id, &pg.url(), &emulator.url()).await?;
    println!();
    println!("| wake ({WAKES} runs, median) | time |");
    println!("| --- | --- |");
    println!(
        "| emulator resume: start + wait + first healthy /healthz, straight | {:.1} ms |",
        ms(resume)
    );
    println!("| first request through the router to a suspended machine | {:.1} ms |", ms(wake));
    println!("| wake overhead of the router | {:.1} ms |", ms(wake.saturating_sub(resume)));
    Ok(())
}

struct Target {
    url: String,
    authorization: String,
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

async fn latency(client: &reqwest::Client, target: &Target) -> anyhow::Result<Latency> {
    // Warm the connection and both processes first.
    for _ in 0..200 {
        send(client, target).await?;
    }
    let mut samples = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        let started = Instant::now();
        send(client, target).await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(Latency { p50: samples[samples.len() / 2], p99: samples[samples.len() * 99 / 100] })
}

async fn throughput(client: &reqwest::Client, target: &Target) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + THROUGHPUT_TIME;
    let workers: Vec<_> = (0..THROUGHPUT_CONNECTIONS)
        .map(|_| {
            let (client, done) = (client.clone(), done.clone());
            let target =
                Target { url: target.url.clone(), authorization: target.authorization.clone() };
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if send(&client, &target).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    done.load(Ordering::Relaxed) as f64 / THROUGHPUT_TIME.as_secs_f64()
}

async fn send(client: &reqwest::Client, target: &Target) -> anyhow::Result<()> {
    let response =
        client.get(&target.url).header("authorization", &target.authorization).send().await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{} answered {}",
        target.url,
        response.status()
    );
    response.bytes().await?;
    Ok(())
}

/// Median resume time straight through the Fly API, and median time of a request through
/// the router to the machine the router itself suspended for idleness.
async fn wakes(
    client: &reqwest::Client,
    fly: &FlyClient,
    routed: &Target,
    machine_id: &str,
    database_url: &str,
    fly_url: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let mut config = router_config(database_url, fly_url)?;
    config.wake.idle_suspend = Duration::from_secs(1);
    let router = matrix_router::start(config).await?;
    let target = Target {
        url: format!("https://{}/echo", router.addr),
        authorization: routed.authorization.clone(),
    };
    let health = reqwest::Client::new();
    let mut resumes = Vec::new();
    let mut routed_wakes = Vec::new();
    send(client, &target).await?;
    for _ in 0..WAKES {
        // The emulator's own resume time, with the same calls the router makes.
        wait_suspended(fly, machine_id).await?;
        let started = Instant::now();
        fly.start_machine(machine_id, None).await?;
        fly.wait_machine(machine_id, WaitState::Started, None, Duration::from_secs(30)).await?;
        let machine = fly.get_machine(machine_id).await?;
        let url = format!("http://{}:8080/healthz", machine.private_ip);
        while !health.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        resumes.push(started.elapsed());

        // Let the router see the machine running again, then idle it out and wake it with
        // one request on the warm connection.
        send(client, &target).await?;
        wait_suspended(fly, machine_id).await?;
        let started = Instant::now();
        send(client, &target).await?;
        routed_wakes.push(started.elapsed());
    }
    Ok((median(resumes), median(routed_wakes)))
}

/// Waits (bounded) until the router's idle suspender has suspended the machine.
async fn wait_suspended(fly: &FlyClient, machine_id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fly.get_machine(machine_id).await?.state != MachineState::Suspended {
        anyhow::ensure!(Instant::now() < deadline, "machine {machine_id} was never suspended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn header_value(echo: &serde_json::Value, name: &str) -> Option<String> {
    echo["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
        .map(str::to_owned)
}

fn upstream_binary() -> std::path::PathBuf {
    let release = harness::tools::workspace_root().join("target/release/test-upstream");
    if release.exists() {
        return release;
    }
    harness::tools::workspace_binary("test-upstream")
}

fn user_token(user: uuid::Uuid) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": "authenticated", "sub": user.to_string(),
        "role": "authenticated", "exp": now + 3600, "iat": now,
    });
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?)
}

fn router_config(database_url: &str, fly_url: &str) -> anyhow::Result<Config> {
    let template = harness::tools::workspace_root().join("deploy/daemon/fly.toml.tmpl");
    let vars: HashMap<String, String> = [
        (config::ROUTER_LISTEN_ADDR, "127.0.0.1:0".to_owned()),
        (config::ROUTER_DEV_MODE, "true".to_owned()),
        (config::SUPABASE_URL, "https://benchbench.supabase.co".to_owned()),
        (config::SUPABASE_JWT_SECRET, JWT_SECRET.to_owned()),
        // Nothing listens here; HS256 tokens never need the key set.
        (config::SUPABASE_JWKS_URL, "http://127.0.0.1:9/jwks.json".to_owned()),
        (config::DATABASE_URL, database_url.to_owned()),
        (config::FLY_API_URL, fly_url.to_owned()),
        (config::FLY_API_TOKEN, FLY_TOKEN.to_owned()),
        (config::FLY_APP_NAME, APP.to_owned()),
        (config::FLY_REGION, "local".to_owned()),
        (config::ROUTER_DAEMON_IMAGE, IMAGE.to_owned()),
        (config::ROUTER_DAEMON_TEMPLATE, template.display().to_string()),
        (
            config::ROUTER_DAEMON_TOKEN_SECRET,
            "bench-daemon-token-secret-0123456789abcdef".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Ok(Config::from_map(&vars)?)
}
