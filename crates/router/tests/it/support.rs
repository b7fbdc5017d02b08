//! One test topology: a throwaway PostgreSQL cluster, the Fly Machines emulator running
//! `test-upstream` as the daemon image, a JWKS endpoint, and the router itself, all on
//! loopback with kernel-chosen ports.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use harness::postgres::PgCluster;
use machines::emulator::{Emulator, EmulatorConfig, EmulatorHandle, ImageMap, ImageSpec};
use machines::types::{Machine, MachineState};
use machines::{FlyClient, ListMachines};
use matrix_router::config::{self, Config};
use matrix_router::RunningRouter;
use uuid::Uuid;

use crate::keys::{JwksServer, Keys, HS256_SECRET};

pub const FLY_TOKEN: &str = "emulator-test-token";
pub const APP: &str = "matrix-users";
pub const IMAGE: &str = "matrix/test-daemon:latest";
pub const BROKEN_IMAGE: &str = "matrix/broken-daemon:latest";
/// What a deploy records: the daemon image pinned by digest (the emulator runs the same
/// program for it as for `IMAGE`).
pub const DEPLOYED_IMAGE: &str =
    "matrix/test-daemon@sha256:5b0e8f2b9d3c4a1e6f7081920a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d";
pub const SUPABASE_URL: &str = "https://abcdefgh.supabase.co";
pub const WAKE_TOKEN: &str = "wake-token-for-tests";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
pub const TOKEN_SECRET: &str = "daemon-token-secret-for-tests-0123456789";
pub const ALLOWED_ORIGIN: &str = "https://app.example";

/// Settings a test may change.
pub struct Options {
    pub idle_suspend_secs: u64,
    pub max_pending_wakes: usize,
    pub wake_timeout_secs: u64,
    pub max_body_bytes: u64,
    pub body_idle_timeout_secs: u64,
    /// Also how long a connection with no open stream is kept.
    pub header_read_timeout_secs: u64,
    pub database_timeout_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            idle_suspend_secs: 3600,
            max_pending_wakes: 1000,
            wake_timeout_secs: 120,
            max_body_bytes: 10 << 20,
            body_idle_timeout_secs: 30,
            header_read_timeout_secs: 30,
            database_timeout_secs: 10,
        }
    }
}

pub struct TestEnv {
    pub keys: Keys,
    pub jwks: JwksServer,
    pub emulator: EmulatorHandle,
    pub fly: FlyClient,
    pub router: RunningRouter,
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    /// The router's environment, for running the binary against this topology.
    pub vars: HashMap<String, String>,
    _pg: PgCluster,
    _state: tempfile::TempDir,
}

impl TestEnv {
    /// The whole topology, or `None` (skipped loudly) when PostgreSQL is not installed.
    pub async fn start(options: Options) -> Option<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pg = PgCluster::start().expect("starting PostgreSQL")?;

        let upstream = harness::tools::workspace_binary("test-upstream");
        let image = ImageSpec {
            command: vec![upstream.display().to_string()],
            // The image's environment wins over the machine's: bind the emulated private
            // address instead of the template's `[::]:8080`, which every machine shares.
            env: BTreeMap::from([("MATRIX_LISTEN_ADDR".into(), "{private_ip}:{port}".into())]),
            fail_health: false,
        };
        // An image whose process exits at boot: its machine ends `failed`.
        let broken = ImageSpec { command: vec!["false".into()], ..ImageSpec::default() };
        let images = ImageMap {
            images: BTreeMap::from([
                (IMAGE.to_owned(), image.clone()),
                (DEPLOYED_IMAGE.to_owned(), image),
                (BROKEN_IMAGE.to_owned(), broken),
            ]),
            ..ImageMap::default()
        };
        let state = tempfile::tempdir().expect("emulator state dir");
        let mut emulator_config = EmulatorConfig::new(FLY_TOKEN, images, state.path());
        emulator_config.settings.created_ms = 100;
        let emulator = Emulator::start(emulator_config).await.expect("starting the emulator");
        let fly = FlyClient::new(&emulator.url(), FLY_TOKEN, APP).expect("Fly client");

        let keys = Keys::new(&format!("{SUPABASE_URL}/auth/v1"));
        let jwks = JwksServer::start(keys.jwks.clone()).await;

        let vars = router_vars(&pg.url(), &emulator.url(), &jwks.url, &options);
        let config = Config::from_map(&vars).expect("test router config");
        let router = matrix_router::start(config.clone()).await.expect("starting the router");
        let base = format!("https://{}", router.addr);
        let http = reqwest::Client::builder()
            // The router serves a self-signed certificate in dev mode.
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("HTTP client");

        Some(Self {
            keys,
            jwks,
            emulator,
            fly,
            router,
            base,
            http,
            config,
            vars,
            _pg: pg,
            _state: state,
        })
    }

    /// Freezes (`true`) or resumes (`false`) PostgreSQL and its backends (each of which is
    /// a process group of its own): a database that keeps its connections and never answers.
    pub fn freeze_database(&self, frozen: bool) {
        use nix::sys::signal::{kill, Signal};
        let signal = if frozen { Signal::SIGSTOP } else { Signal::SIGCONT };
        let server = self._pg.pid() as i32;
        let mut pids = vec![server];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // The parent pid is the second field after the parenthesised command name.
            let parent = stat.rsplit_once(')').and_then(|(_, rest)| {
                rest.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok())
            });
            let pid = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok());
            if let (Some(pid), Some(parent)) = (pid, parent) {
                if parent == server {
                    pids.push(pid);
                }
            }
        }
        for pid in pids {
            let _ = kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// A second router replica on the same database and Fly app.
    pub async fn replica(&self) -> RunningRouter {
        matrix_router::start(self.config.clone()).await.expect("starting a replica")
    }

    /// A valid HS256 token for `user`.
    pub fn token(&self, user: Uuid) -> String {
        self.keys.hs256(&self.keys.claims(user))
    }

    pub fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.base)).bearer_auth(token)
    }

    /// `GET /echo` as `user`, expecting 200; the daemon's view of the request.
    pub async fn echo(&self, user: Uuid) -> serde_json::Value {
        let response = self.get("/echo", &self.token(user)).send().await.expect("request");
        assert_eq!(response.status(), 200, "echo for {user}: {:?}", response.text().await);
        response.json().await.expect("echo JSON")
    }

    /// The user's machines on Fly, found by metadata as the router finds them.
    pub async fn machines_of(&self, user: Uuid) -> Vec<Machine> {
        let filter = ListMachines::with_metadata("matrix_user_id", user.to_string());
        self.fly.list_machines(&filter).await.expect("list machines")
    }

    /// The user's only machine.
    pub async fn machine_of(&self, user: Uuid) -> Machine {
        let mut machines = self.machines_of(user).await;
        assert_eq!(machines.len(), 1, "user {user} should have exactly one machine");
        machines.remove(0)
    }

    /// Calls received by the emulator per action.
    pub async fn stats(&self) -> HashMap<String, u64> {
        let url = format!("{}/_emulator/stats", self.emulator.url());
        reqwest::get(url).await.expect("stats").json().await.expect("stats JSON")
    }

    pub async fn count(&self, action: &str) -> u64 {
        self.stats().await.get(action).copied().unwrap_or(0)
    }

    pub async fn emulator_post(&self, control: &str, body: serde_json::Value) {
        let url = format!("{}/_emulator/{control}", self.emulator.url());
        let response = reqwest::Client::new().post(url).json(&body).send().await.expect("control");
        assert!(
            response.status().is_success(),
            "emulator control {control}: {}",
            response.status()
        );
    }

    /// Requests the test upstream on `machine` served (authenticated routes only).
    pub async fn served(&self, machine: &Machine) -> u64 {
        let url = format!("http://{}:8080/_upstream/stats", machine.private_ip);
        let stats: serde_json::Value =
            reqwest::get(url).await.expect("upstream stats").json().await.expect("JSON");
        stats["served"].as_u64().expect("served count")
    }

    /// Suspends the machine and waits until it is.
    pub async fn suspend(&self, machine_id: &str) {
        self.fly.suspend_machine(machine_id, None).await.expect("suspend");
        self.wait_state(machine_id, MachineState::Suspended).await;
    }

    /// Polls until the machine is in `state` (bounded; fails after 30 s).
    pub async fn wait_state(&self, machine_id: &str, state: MachineState) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let machine = self.fly.get_machine(machine_id).await.expect("get machine");
            if machine.state == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "machine {machine_id} never became {state}; it is {}",
                machine.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn router_vars(
    database_url: &str,
    fly_url: &str,
    jwks_url: &str,
    options: &Options,
) -> HashMap<String, String> {
    let template = harness::tools::workspace_root().join("deploy/daemon/fly.toml.tmpl");
    [
        (config::ROUTER_LISTEN_ADDR, "127.0.0.1:0".to_owned()),
        (config::ROUTER_DEV_MODE, "true".to_owned()),
        (config::SUPABASE_URL, SUPABASE_URL.to_owned()),
        (config::SUPABASE_JWT_SECRET, HS256_SECRET.to_owned()),
        (config::SUPABASE_JWKS_URL, jwks_url.to_owned()),
        (config::ROUTER_ALLOWED_ORIGINS, ALLOWED_ORIGIN.to_owned()),
        (config::DATABASE_URL, database_url.to_owned()),
        (config::FLY_API_URL, fly_url.to_owned()),
        (config::FLY_API_TOKEN, FLY_TOKEN.to_owned()),
        (config::FLY_APP_NAME, APP.to_owned()),
        (config::FLY_REGION, "local".to_owned()),
        (config::ROUTER_DAEMON_IMAGE, IMAGE.to_owned()),
        (config::ROUTER_DAEMON_TEMPLATE, template.display().to_string()),
        (config::ROUTER_DAEMON_TOKEN_SECRET, TOKEN_SECRET.to_owned()),
        (config::ROUTER_IDLE_SUSPEND_SECS, options.idle_suspend_secs.to_string()),
        (config::ROUTER_MAX_PENDING_WAKES, options.max_pending_wakes.to_string()),
        (config::ROUTER_WAKE_TIMEOUT_SECS, options.wake_timeout_secs.to_string()),
        (config::ROUTER_MAX_BODY_BYTES, options.max_body_bytes.to_string()),
        (config::ROUTER_BODY_IDLE_TIMEOUT_SECS, options.body_idle_timeout_secs.to_string()),
        (config::ROUTER_HEADER_READ_TIMEOUT_SECS, options.header_read_timeout_secs.to_string()),
        (config::ROUTER_DATABASE_TIMEOUT_SECS, options.database_timeout_secs.to_string()),
        (config::ROUTER_WAKE_TOKEN, WAKE_TOKEN.to_owned()),
        (config::ROUTER_ADMIN_TOKEN, ADMIN_TOKEN.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Runs `n` copies of `make(i)` at once and collects their results in order.
pub async fn concurrently<F, Fut, T>(n: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}
