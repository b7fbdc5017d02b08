//! A real emulator on loopback, a client for it, and the image map the tests use.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use machines::emulator::{
    Emulator, EmulatorConfig, EmulatorHandle, ImageMap, ImageSpec, SettingsPatch,
};
use machines::types::{CreateMachineRequest, Machine, MachineConfig, Service, WaitState};
use machines::{ClientOptions, FlyClient, RetryPolicy};
use serde_json::Value;

pub const TOKEN: &str = "test-token-3f9a";
pub const APP: &str = "matrix-users";

/// An emulator with its state directory, and a client of it.
pub struct Env {
    pub state: tempfile::TempDir,
    pub emulator: EmulatorHandle,
    pub fly: FlyClient,
    controls: reqwest::Client,
}

fn spec(command: &[&str]) -> ImageSpec {
    ImageSpec { command: command.iter().map(|s| s.to_string()).collect(), ..ImageSpec::default() }
}

/// The images the tests create machines from.
pub fn image_map() -> ImageMap {
    let mut images = BTreeMap::new();
    images.insert("sleeper".to_owned(), spec(&["sleep", "600"]));
    images.insert(
        "web:*".to_owned(),
        spec(&["python3", "-m", "http.server", "--bind", "{private_ip}", "{port}"]),
    );
    images.insert(
        "web-data".to_owned(),
        spec(&[
            "python3",
            "-m",
            "http.server",
            "--bind",
            "{private_ip}",
            "{port}",
            "--directory",
            "{mount:/data}",
        ]),
    );
    images.insert("stubborn".to_owned(), spec(&["sh", "-c", "trap '' INT TERM; sleep 600"]));
    images.insert("crash".to_owned(), spec(&["sh", "-c", "echo booting; exit 3"]));
    // Exit after the boot window (500 ms here): a crash, or work that finished.
    images.insert("crash-later".to_owned(), spec(&["sh", "-c", "sleep 0.8; exit 5"]));
    images.insert("done-later".to_owned(), spec(&["sh", "-c", "sleep 0.8; exit 0"]));
    let mut unhealthy = spec(&["sleep", "600"]);
    unhealthy.fail_health = true;
    images.insert("unhealthy".to_owned(), unhealthy);
    let record = "env > {mount:/data}/env.txt; \
                  echo {machine_id} {app} {port} > {mount:/data}/args.txt; \
                  exec sleep 600";
    let mut recorder = spec(&["sh", "-c", record]);
    recorder.env.insert("IMAGE_VAR".to_owned(), "from-image".to_owned());
    images.insert("recorder".to_owned(), recorder);
    ImageMap { images, app_env: BTreeMap::from([("APP_SECRET".to_owned(), "s3cr3t".to_owned())]) }
}

/// Quick timings so that tests do not sleep through Fly's real ones.
pub fn fast_settings() -> machines::emulator::Settings {
    machines::emulator::Settings {
        created_ms: 100,
        replacing_ms: 200,
        boot_window_ms: 500,
        ..Default::default()
    }
}

/// Short backoff so that retries are quick; same shape as the default.
pub fn fast_options() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(2),
        },
    }
}

/// Whether `python3` is installed; tests of HTTP machine processes skip without it.
pub fn have_python() -> bool {
    harness::tools::require("python3", "install Debian's python3").is_some()
}

impl Env {
    pub async fn start() -> Env {
        let state = tempfile::tempdir().expect("temp dir");
        Self::start_in(state).await
    }

    pub async fn start_in(state: tempfile::TempDir) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = EmulatorConfig::new(TOKEN, image_map(), state.path());
        config.settings = fast_settings();
        let emulator = Emulator::start(config).await.expect("emulator starts");
        let fly =
            FlyClient::with_options(&emulator.url(), TOKEN, APP, fast_options()).expect("client");
        Env { state, emulator, fly, controls: reqwest::Client::new() }
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.state_dir().canonicalize().expect("state dir").join("volumes").join(volume)
    }

    /// Restarts the emulator on the same state directory.
    pub async fn restart(self) -> Env {
        let Env { state, emulator, .. } = self;
        emulator.shutdown().await;
        Self::start_in(state).await
    }

    pub async fn settings(&self, patch: SettingsPatch) {
        let url = format!("{}/_emulator/settings", self.emulator.url());
        let response = self.controls.post(url).json(&patch).send().await.expect("settings");
        assert!(response.status().is_success(), "settings: {}", response.status());
    }

    pub async fn fault(&self, fault: Value) {
        let url = format!("{}/_emulator/faults", self.emulator.url());
        let response = self.controls.post(url).json(&fault).send().await.expect("fault");
        assert_eq!(response.status(), 204, "fault {fault}");
    }

    pub async fn stats(&self) -> BTreeMap<String, u64> {
        let url = format!("{}/_emulator/stats", self.emulator.url());
        self.controls.get(url).send().await.expect("stats").json().await.expect("stats json")
    }

    /// A raw authenticated request, for what the client does not send on purpose.
    pub async fn raw(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.emulator.url());
        let response = self
            .controls
            .request(method, url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("raw request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a machine of `image` and waits until it is started.
    pub async fn started(&self, image: &str) -> Machine {
        let machine = self.fly.create_machine(&request(image)).await.expect("create");
        self.fly
            .wait_machine(&machine.id, WaitState::Started, None, Duration::from_secs(30))
            .await
            .expect("machine starts");
        self.fly.get_machine(&machine.id).await.expect("get")
    }
}

/// A create request for `image` with one service on 8080.
pub fn request(image: &str) -> CreateMachineRequest {
    CreateMachineRequest {
        config: MachineConfig {
            image: image.to_owned(),
            services: vec![Service { internal_port: Some(8080), ..Service::default() }],
            ..MachineConfig::default()
        },
        ..CreateMachineRequest::default()
    }
}

/// Retries `check` every 50 ms, at most `attempts` times, until it returns `Some`.
pub async fn eventually<T, F, Fut>(what: &str, attempts: u32, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..attempts {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached after {attempts} attempts");
}

/// GETs `/` on the machine's private address; `None` when nothing answers in time.
pub async fn http_get(machine: &Machine, path: &str) -> Option<u16> {
    let client = reqwest::Client::builder().timeout(Duration::from_millis(800)).build().ok()?;
    let url = format!("http://{}:{}{path}", machine.private_ip, machine.internal_port());
    client.get(url).send().await.ok().map(|r| r.status().as_u16())
}
