//! Router overhead, measured in one run side by side: the same upstream on loopback, asked
//! straight and through the router; and a wake through the router against the emulator's
//! own resume time.
//!
//! `cargo build --release -p matrix-router -p harness --bins && cargo bench -p matrix-router \
//! --bench proxy`
//!
//! The router runs as its own process (the release `matrix-router`), as in production; the
//! load generator (this process), the router, the upstream and the emulator share the
//! machine's cores, so besides requests per second the bench prints the CPU time each process
//! spent per request (from `/proc/<pid>/stat`), which does not depend on who else runs.
//! Everything runs on loopback and stops by itself (a few seconds per phase).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use machines::emulator::{Emulator, EmulatorConfig, ImageMap, ImageSpec};
use machines::types::{MachineState, WaitState};
use machines::FlyClient;
use matrix_router::config;

const FLY_TOKEN: &str = "bench-token";
const APP: &str = "matrix-bench";
const IMAGE: &str = "matrix/bench-daemon:latest";
const JWT_SECRET: &str = "bench-legacy-jwt-secret-with-at-least-32-chars";
const ISSUER: &str = "https://benchbench.supabase.co/auth/v1";
const LATENCY_REQUESTS: usize = 2000;
const THROUGHPUT_CONNECTIONS: usize = 64;
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

    let router = RouterProcess::start(&pg.url(), &emulator.url(), None, None)?;
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
    let upstream_pid = pid_of(&upstream)?;
    let processes = [std::process::id(), router.guard.id(), upstream_pid];
    let direct_run = throughput(&client, &direct, processes).await?;
    let routed_run = throughput(&client, &routed, processes).await?;
    println!(
        "| requests/s, {THROUGHPUT_CONNECTIONS} connections, {}s | {:.0} | {:.0} |",
        THROUGHPUT_TIME.as_secs(),
        direct_run.rps,
        routed_run.rps
    );
    for (i, name) in ["load generator", "router", "upstream"].iter().enumerate() {
        println!(
            "| CPU per request: {name} | {:.1} µs | {:.1} µs |",
            direct_run.cpu_us_per_request[i], routed_run.cpu_us_per_request[i]
        );
    }
    println!();
    // The same runs with a router on a core of its own and one worker thread, as on a
    // one-CPU machine of its own in production, and everything else (load generator,
    // upstream) on the other core.
    let cpus = std::thread::available_parallelism()?.get();
    if cpus >= 2 {
        let single = RouterProcess::start(&pg.url(), &emulator.url(), None, Some(1))?;
        let routed_single =
            Target { url: format!("https://{}/echo", single.addr), ..routed.clone() };
        for _ in 0..200 {
            send(&client, &routed_single).await?;
        }
        let processes = [std::process::id(), single.guard.id(), upstream_pid];
        pin(&processes, cpus)?;
        let direct_pinned = throughput(&client, &direct, processes).await?;
        let routed_pinned = throughput(&client, &routed_single, processes).await?;
        unpin(&processes, cpus)?;
        println!(
            "| requests/s, router on a core of its own, the rest on the other | {:.0} | {:.0} |",
            direct_pinned.rps, routed_pinned.rps
        );
        println!(
            "| CPU per request: router on its own core | | {:.1} µs |",
            routed_pinned.cpu_us_per_request[1]
        );
        println!();
        println!(
            "router on its own core: {:.0}% of direct",
            100.0 * routed_pinned.rps / direct_pinned.rps
        );
    } else {
        println!("one CPU: the pinned runs are skipped");
    }
    let router_cpu = routed_run.cpu_us_per_request[1];
    let upstream_cpu = direct_run.cpu_us_per_request[2];
    println!(
        "added p50 latency: {:.3} ms; router throughput: {:.0}% of direct; one core serves \
         {:.0} requests/s through the router, {:.0} straight from the upstream",
        ms(routed_latency.p50.saturating_sub(direct_latency.p50)),
        100.0 * routed_run.rps / direct_run.rps,
        1e6 / router_cpu,
        1e6 / upstream_cpu,
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

#[derive(Clone)]
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

struct Run {
    rps: f64,
    /// CPU time (user + system) per successful request, for each process measured.
    cpu_us_per_request: Vec<f64>,
}

async fn throughput(
    client: &reqwest::Client,
    target: &Target,
    processes: [u32; 3],
) -> anyhow::Result<Run> {
    let cpu_before = processes.map(cpu_time);
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
    let requests = done.load(Ordering::Relaxed) as f64;
    anyhow::ensure!(requests > 0.0, "no request to {} succeeded", target.url);
    let cpu_us_per_request = processes
        .iter()
        .zip(cpu_before)
        .map(|(&pid, before)| Ok((cpu_time(pid)? - before?).as_secs_f64() * 1e6 / requests))
        .collect::<anyhow::Result<_>>()?;
    Ok(Run { rps: requests / THROUGHPUT_TIME.as_secs_f64(), cpu_us_per_request })
}

/// User plus system CPU time a process (all its threads) has used so far.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are space-separated.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?.parse()?)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let total = ticks(11)? + ticks(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// Puts the router (`[_, router, _]`) on the last CPU and the other processes on the rest.
fn pin(processes: &[u32; 3], cpus: usize) -> anyhow::Result<()> {
    let mut router_set = nix::sched::CpuSet::new();
    router_set.set(cpus - 1)?;
    let mut rest = nix::sched::CpuSet::new();
    for cpu in 0..cpus - 1 {
        rest.set(cpu)?;
    }
    let [bench, router, upstream] = *processes;
    set_affinity(router, &router_set)?;
    set_affinity(bench, &rest)?;
    set_affinity(upstream, &rest)?;
    Ok(())
}

fn unpin(pids: &[u32], cpus: usize) -> anyhow::Result<()> {
    let mut all = nix::sched::CpuSet::new();
    for cpu in 0..cpus {
        all.set(cpu)?;
    }
    for &pid in pids {
        set_affinity(pid, &all)?;
    }
    Ok(())
}

/// Sets the CPU affinity of every thread of a process.
fn set_affinity(pid: u32, cpus: &nix::sched::CpuSet) -> anyhow::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), cpus)?;
    }
    Ok(())
}

/// The process running `program` (the emulator started it for the machine).
fn pid_of(program: &std::path::Path) -> anyhow::Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe == program) {
            return Ok(pid);
        }
    }
    anyhow::bail!("no process runs {}", program.display())
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
    let router = RouterProcess::start(database_url, fly_url, Some(Duration::from_secs(1)), None)?;
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

/// The release `matrix-router` as its own process, configured through its environment.
struct RouterProcess {
    addr: std::net::SocketAddr,
    guard: harness::process::ChildGuard,
}

impl RouterProcess {
    fn start(
        database_url: &str,
        fly_url: &str,
        idle_suspend: Option<Duration>,
        worker_threads: Option<usize>,
    ) -> anyhow::Result<Self> {
        let binary = harness::tools::workspace_root().join("target/release/matrix-router");
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: run `cargo build --release -p matrix-router -p harness --bins`",
            binary.display()
        );
        let addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", harness::process::free_port()).parse()?;
        let template = harness::tools::workspace_root().join("deploy/daemon/fly.toml.tmpl");
        let mut command = std::process::Command::new(binary);
        command
            .env_clear()
            .env("RUST_LOG", "warn")
            .env(config::ROUTER_LISTEN_ADDR, addr.to_string())
            .env(config::ROUTER_DEV_MODE, "true")
            .env(config::SUPABASE_URL, "https://benchbench.supabase.co")
            .env(config::SUPABASE_JWT_SECRET, JWT_SECRET)
            // Nothing listens here; HS256 tokens never need the key set.
            .env(config::SUPABASE_JWKS_URL, "http://127.0.0.1:9/jwks.json")
            .env(config::DATABASE_URL, database_url)
            .env(config::FLY_API_URL, fly_url)
            .env(config::FLY_API_TOKEN, FLY_TOKEN)
            .env(config::FLY_APP_NAME, APP)
            .env(config::FLY_REGION, "local")
            .env(config::ROUTER_DAEMON_IMAGE, IMAGE)
            .env(config::ROUTER_DAEMON_TEMPLATE, template)
            .env(config::ROUTER_DAEMON_TOKEN_SECRET, "bench-daemon-token-secret-0123456789abcdef")
            .stdout(std::process::Stdio::null());
        if let Some(idle) = idle_suspend {
            command.env(config::ROUTER_IDLE_SUSPEND_SECS, idle.as_secs().to_string());
        }
        if let Some(threads) = worker_threads {
            // Read by tokio's runtime builder.
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        let mut guard = harness::process::ChildGuard::spawn("matrix-router", &mut command)?;
        harness::process::wait_for_port(addr, Duration::from_secs(30))?;
        guard.check_running()?;
        Ok(Self { addr, guard })
    }
}
