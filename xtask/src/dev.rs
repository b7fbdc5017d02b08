//! `cargo xtask dev`: the whole Matrix topology on this machine.
//!
//! Steps, in order:
//! 1. install what is missing (Debian, root) or say what to install;
//! 2. build `matrix-router`, `matrixd` and `fly-emulator`;
//! 3. start PostgreSQL (kept under the state directory, or `DATABASE_URL`), an S3 server,
//!    and, when no model provider key is set, the local OpenAI-compatible model server;
//! 4. start the Fly Machines emulator, whose machines run `deploy/daemon/entrypoint.sh`
//!    (so real `matrixd` processes), then the router on https://localhost:8443;
//! 5. print two dev tokens and `curl` lines, and wait for Ctrl-C;
//! 6. stop everything; the data stays under the state directory for the next run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use harness::process::{free_port, ChildGuard};
use serde_json::json;
use xshell::{cmd, Shell};

use crate::setup;

/// The two users whose tokens `dev` prints. Fixed, so that their machines and state are
/// found again on the next run.
const DEV_USERS: [(&str, &str); 2] = [
    ("alice", "5b0e3a52-3c1d-4a53-9d1e-0a7c1f2e9a01"),
    ("bob", "8f4c2d7e-61b0-4e0f-8b5a-2d9c3e7f1b02"),
];

/// Dev defaults; each can be overridden by the variable of the same name (or `.env`).
const DEFAULT_JWT_SECRET: &str = "matrix-dev-jwt-secret-not-for-production-use-000000";
const DEFAULT_ISSUER: &str = "http://127.0.0.1:54321/auth/v1";
const DEFAULT_ROUTER_ADDR: &str = "127.0.0.1:8443";
const DEV_APP: &str = "matrix-dev";
const DEV_IMAGE: &str = "matrix-daemon:dev";
const SNAPSHOT_BUCKET: &str = "matrix-snapshots";

#[derive(clap::Args)]
pub struct Args {
    /// Wipe the state directory (database, volumes, certificates) before starting.
    #[arg(long)]
    fresh: bool,
    /// Where the topology keeps its data between runs.
    #[arg(long, default_value = "target/dev")]
    state_dir: PathBuf,
    /// Seconds without a request or an open stream before the router suspends a machine.
    #[arg(long, env = "ROUTER_IDLE_SUSPEND_SECS", default_value_t = 300)]
    idle_suspend_secs: u64,
    /// Write the router URL, tokens and CA path as JSON to this file once everything is up
    /// (for scripts and the end-to-end test).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Do not install missing programs; report them instead.
    #[arg(long)]
    no_install: bool,
    /// Use the binaries already built in the target directory.
    #[arg(long)]
    no_build: bool,
}

/// Settings taken from the environment (or `.env`), with dev defaults.
struct Settings {
    jwt_secret: String,
    issuer: String,
    router_addr: String,
    database_url: Option<String>,
    provider_keys: Vec<(&'static str, String)>,
}

impl Settings {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let provider_keys =
            ["FIREWORKS_API_KEY", "TOGETHER_API_KEY", "MATRIX_LLM_BASE_URL", "MATRIX_LLM_MODEL"]
                .into_iter()
                .filter_map(|name| var(name).map(|value| (name, value)))
                .collect();
        Self {
            jwt_secret: var("SUPABASE_JWT_SECRET").unwrap_or_else(|| DEFAULT_JWT_SECRET.into()),
            issuer: var("SUPABASE_JWT_ISSUER").unwrap_or_else(|| DEFAULT_ISSUER.into()),
            router_addr: var("ROUTER_LISTEN_ADDR").unwrap_or_else(|| DEFAULT_ROUTER_ADDR.into()),
            database_url: var("DATABASE_URL"),
            provider_keys,
        }
    }

    /// A provider key, or a model server of the user's own (`MATRIX_LLM_BASE_URL`): either
    /// way the daemons do not get the local echo model.
    fn has_provider(&self) -> bool {
        self.provider_keys
            .iter()
            .any(|(name, _)| name.ends_with("_API_KEY") || *name == "MATRIX_LLM_BASE_URL")
    }
}

pub fn run(sh: &Shell, args: Args) -> anyhow::Result<()> {
    // Ctrl-C at any moment, start-up included, must stop what has started: from here on
    // SIGINT and SIGTERM only raise a flag, checked between steps and while running.
    let stop = StopSignal::install()?;
    let settings = Settings::from_env();
    let root = crate::project_root();
    let state =
        if args.state_dir.is_absolute() { args.state_dir } else { root.join(args.state_dir) };

    // 1-2. Programs and binaries.
    if !args.no_install {
        setup::ensure(sh, setup::DEV)?;
    }
    if !args.no_build {
        say("building matrix-router, matrixd and fly-emulator");
        cmd!(sh, "cargo build --quiet -p matrix-router -p matrixd -p machines --bins")
            .run()
            .context("building the binaries")?;
    }
    let bin_dir = target_dir(&root).join("debug");

    if args.fresh && state.exists() {
        say(&format!("--fresh: removing {}", state.display()));
        std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;

    // Lines from every component go through one channel, so they never interleave mid-line.
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let printer = std::thread::spawn(move || {
        for line in lines_rx {
            println!("{line}");
        }
    });

    // 3. Shared services.
    let _postgres;
    let database_url = match &settings.database_url {
        Some(url) => url.clone(),
        None => {
            say("starting PostgreSQL (data kept in the state directory)");
            let cluster =
                harness::postgres::PgCluster::start_in(&state.join("postgres/data"), free_port())
                    .context("starting PostgreSQL")?;
            let url = cluster.url();
            _postgres = cluster;
            url
        }
    };

    say("starting the S3-compatible snapshot store");
    stop.check()?;
    let s3 = harness::s3::S3Server::start()
        .context("starting the S3 server")?
        .context("no S3 server: install MinIO or `pip install 'moto[server]'`")?;
    s3.create_bucket(SNAPSHOT_BUCKET).context("creating the snapshot bucket")?;

    stop.check()?;
    let _model;
    let mut app_env: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in s3.env(SNAPSHOT_BUCKET) {
        app_env.insert(name.to_owned(), value);
    }
    for (name, value) in &settings.provider_keys {
        app_env.insert((*name).to_owned(), value.clone());
    }
    if !settings.has_provider() {
        let model = harness::llm::ModelServer::start().context("starting the local model")?;
        say(&format!(
            "no FIREWORKS_API_KEY, TOGETHER_API_KEY or MATRIX_LLM_BASE_URL: daemons use the \
             local echo model at {}",
            model.base_url()
        ));
        app_env.insert("MATRIX_LLM_BASE_URL".into(), model.base_url());
        _model = model;
    }

    // 4. The emulator, whose machines run the real entrypoint and daemon, then the router.
    stop.check()?;
    let fly_dir = state.join("fly");
    std::fs::create_dir_all(&fly_dir)?;
    let image_map = fly_dir.join("images.json");
    write_image_map(&image_map, &root, &bin_dir, &app_env)?;
    let fly_token = "matrix-dev-fly-token";

    let mut emulator_cmd = Command::new(bin_dir.join("fly-emulator"));
    emulator_cmd
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--image-map")
        .arg(&image_map)
        .arg("--state-dir")
        .arg(&fly_dir)
        .env("FLY_API_TOKEN", fly_token);
    let (mut emulator, fly_url) =
        spawn_announced("fly", &mut emulator_cmd, "fly-emulator listening on ", &lines_tx)?;

    stop.check()?;
    let tls = dev_certificate(&state.join("tls"))?;
    let wake_token = "matrix-dev-wake-token";
    let admin_token = "matrix-dev-admin-token";
    let mut router_cmd = Command::new(bin_dir.join("matrix-router"));
    router_cmd
        .current_dir(&root)
        .env("ROUTER_LISTEN_ADDR", &settings.router_addr)
        .env("ROUTER_DEV_MODE", "true")
        .env("ROUTER_TLS_CERT", &tls.cert)
        .env("ROUTER_TLS_KEY", &tls.key)
        .env("SUPABASE_URL", settings.issuer.trim_end_matches("/auth/v1"))
        .env("SUPABASE_JWT_SECRET", &settings.jwt_secret)
        .env("SUPABASE_JWT_ISSUER", &settings.issuer)
        .env("DATABASE_URL", &database_url)
        .env("FLY_API_URL", &fly_url)
        .env("FLY_API_TOKEN", fly_token)
        .env("FLY_APP_NAME", DEV_APP)
        .env("FLY_REGION", "local")
        .env("ROUTER_DAEMON_IMAGE", DEV_IMAGE)
        .env("ROUTER_DAEMON_TOKEN_SECRET", "matrix-dev-daemon-token-secret-not-for-production")
        .env("ROUTER_IDLE_SUSPEND_SECS", args.idle_suspend_secs.to_string())
        .env("ROUTER_WAKE_TOKEN", wake_token)
        .env("ROUTER_ADMIN_TOKEN", admin_token);
    let (mut router, router_url) =
        spawn_announced("router", &mut router_cmd, "matrix-router listening on ", &lines_tx)?;
    let router_url = router_url.replace("127.0.0.1", "localhost");
    stop.check()?;

    // 5. What a person needs to try it.
    let tokens: Vec<(String, String, String)> = DEV_USERS
        .iter()
        .map(|(name, id)| {
            let token = mint_token(&settings.jwt_secret, &settings.issuer, id)?;
            Ok(((*name).to_owned(), (*id).to_owned(), token))
        })
        .collect::<anyhow::Result<_>>()?;
    print_banner(&router_url, &tls.cert, &tokens, &fly_url);
    if let Some(path) = &args.ready_file {
        let users: Vec<_> = tokens
            .iter()
            .map(|(name, id, token)| json!({"name": name, "user_id": id, "token": token}))
            .collect();
        let ready = json!({
            "router_url": router_url,
            "ca_cert": tls.cert,
            "fly_api_url": fly_url,
            "fly_api_token": fly_token,
            "fly_app": DEV_APP,
            "database_url": database_url,
            "wake_token": wake_token,
            "admin_token": admin_token,
            "users": users,
        });
        write_atomically(path, &serde_json::to_vec_pretty(&ready)?)?;
    }

    // Until Ctrl-C, or until a component dies.
    let interrupted = stop.wait(&mut [&mut emulator, &mut router]);

    // 6. Stop the router first (no new wakes), then the machines, then the stores.
    say("stopping: router, machines, S3, PostgreSQL");
    router.stop(Duration::from_secs(10));
    // Each daemon drains and pushes its last snapshot within its machine's stop grace (30 s
    // in the template); the emulator waits for them, so it gets longer than that.
    emulator.stop(Duration::from_secs(40));
    drop(s3);
    drop(lines_tx);
    let _ = printer.join();
    say(&format!("stopped; state kept in {}", state.display()));
    interrupted
}

/// The image map tells the emulator how to run `DEV_IMAGE`: the real entrypoint, with the
/// machine's address, port and volume filled in by the emulator.
fn write_image_map(
    path: &Path,
    root: &Path,
    bin_dir: &Path,
    app_env: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let path_var = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let map = json!({
        "images": {
            DEV_IMAGE: {
                "command": ["bash", root.join("deploy/daemon/entrypoint.sh")],
                "env": {
                    "PATH": path_var,
                    "MATRIX_LISTEN_ADDR": "{private_ip}:{port}",
                    "MATRIX_DATA_DIR": "{mount:/data}",
                    "RUST_LOG": std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                }
            }
        },
        "app_env": app_env,
    });
    write_atomically(path, &serde_json::to_vec_pretty(&map)?)
}

struct DevCertificate {
    cert: PathBuf,
    key: PathBuf,
}

/// A self-signed certificate for localhost, made once and kept, so that `curl --cacert`
/// lines stay valid across runs.
fn dev_certificate(dir: &Path) -> anyhow::Result<DevCertificate> {
    let cert = dir.join("localhost.pem");
    let key = dir.join("localhost-key.pem");
    if cert.exists() && key.exists() {
        return Ok(DevCertificate { cert, key });
    }
    std::fs::create_dir_all(dir)?;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let generated =
        rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    write_atomically(&key, generated.key_pair.serialize_pem().as_bytes())?;
    write_atomically(&cert, generated.cert.pem().as_bytes())?;
    Ok(DevCertificate { cert, key })
}

/// An HS256 Supabase-shaped access token for `user_id`, valid for a day.
fn mint_token(secret: &str, issuer: &str, user_id: &str) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "iss": issuer,
        "aud": "authenticated",
        "sub": user_id,
        "role": "authenticated",
        "aal": "aal1",
        "is_anonymous": false,
        "iat": now,
        "exp": now + 24 * 3600,
        "session_id": uuid::Uuid::new_v4().to_string(),
    });
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).context("signing a token")
}

fn print_banner(router: &str, ca: &Path, tokens: &[(String, String, String)], fly: &str) {
    let ca = ca.display();
    let mut out = String::new();
    out.push_str("\n================ Matrix dev topology is up ================\n");
    out.push_str(&format!("router:   {router}   (CA: {ca})\n"));
    out.push_str(&format!("fly API:  {fly}   (emulator)\n\n"));
    for (name, id, token) in tokens {
        let var = format!("{}_TOKEN", name.to_uppercase());
        out.push_str(&format!("{name} ({id}):\n  export {var}='{token}'\n"));
    }
    let (first, _, _) = &tokens[0];
    let var = format!("${}_TOKEN", first.to_uppercase());
    out.push_str("\ntry it (the first request provisions and boots the user's machine):\n");
    out.push_str(&format!("  curl --cacert {ca} -H \"Authorization: Bearer {var}\" {router}/me\n"));
    out.push_str(&format!(
        "  curl --cacert {ca} -N -H \"Authorization: Bearer {var}\" {router}/events &\n"
    ));
    out.push_str(&format!(
        "  curl --cacert {ca} -H \"Authorization: Bearer {var}\" -H 'Content-Type: \
            application/json' \\\n      -d '{{\"message\": \"hello\"}}' {router}/chat\n"
    ));
    out.push_str(
        "\nCtrl-C stops everything; the state stays for the next run (--fresh wipes it).\n",
    );
    out.push_str("============================================================\n");
    println!("{out}");
}

/// Spawns a component whose stdout announces its address with `marker`; every line it
/// writes is forwarded with a `name |` prefix.
fn spawn_announced(
    name: &'static str,
    command: &mut Command,
    marker: &'static str,
    lines: &mpsc::Sender<String>,
) -> anyhow::Result<(ChildGuard, String)> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(name, command)?;
    let (stdout, stderr) = child.take_output();
    let (found_tx, found_rx) = mpsc::channel::<String>();
    if let Some(stdout) = stdout {
        forward(name, stdout, lines.clone(), Some((marker, found_tx)));
    }
    if let Some(stderr) = stderr {
        forward(name, stderr, lines.clone(), None);
    }
    match found_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            child.check_running()?;
            bail!("{name} did not announce its address within 60 s")
        }
    }
}

fn forward(
    name: &'static str,
    stream: impl Read + Send + 'static,
    lines: mpsc::Sender<String>,
    mut announce: Option<(&'static str, mpsc::Sender<String>)>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some((marker, tx)) = &announce {
                if let Some(rest) = line.split(marker).nth(1) {
                    let _ = tx.send(rest.trim().to_owned());
                    announce = None;
                }
            }
            if lines.send(format!("{name:>7} | {line}")).is_err() {
                break;
            }
        }
    });
}

/// SIGINT and SIGTERM, caught from the start of `dev` so that an interrupted start-up
/// still stops (drops) every component it had started.
struct StopSignal {
    raised: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl StopSignal {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the signal runtime")?;
        let raised = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut int, mut term) = runtime.block_on(async {
            anyhow::Ok((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?))
        })?;
        let flag = raised.clone();
        runtime.spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(Self { raised, _runtime: runtime })
    }

    fn raised(&self) -> bool {
        self.raised.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Fails when a stop was asked for, so that `?` unwinds and drops what started.
    fn check(&self) -> anyhow::Result<()> {
        if self.raised() {
            bail!("interrupted during start-up; stopped what had started");
        }
        Ok(())
    }

    /// Blocks until a stop is asked for, or until one of `children` exits on its own.
    fn wait(&self, children: &mut [&mut ChildGuard]) -> anyhow::Result<()> {
        while !self.raised() {
            for child in children.iter_mut() {
                child.check_running()?;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

fn say(message: &str) {
    eprintln!("  xtask | {message}");
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(provider_keys: Vec<(&'static str, String)>) -> Settings {
        Settings {
            jwt_secret: DEFAULT_JWT_SECRET.into(),
            issuer: DEFAULT_ISSUER.into(),
            router_addr: DEFAULT_ROUTER_ADDR.into(),
            database_url: None,
            provider_keys,
        }
    }

    #[test]
    fn a_key_or_a_model_url_of_ones_own_replaces_the_echo_model() {
        assert!(!settings(vec![]).has_provider());
        assert!(!settings(vec![("MATRIX_LLM_MODEL", "m".into())]).has_provider());
        assert!(settings(vec![("FIREWORKS_API_KEY", "k".into())]).has_provider());
        let own = settings(vec![("MATRIX_LLM_BASE_URL", "http://127.0.0.1:8000/v1".into())]);
        assert!(own.has_provider());
    }
}
