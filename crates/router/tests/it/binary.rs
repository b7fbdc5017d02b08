//! The `matrix-router` binary: bad configuration stops it before anything is bound, its logs
//! are plain text when they do not go to a terminal, and SIGTERM drains open streams.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::support::{Options, TestEnv};

/// Runs the binary with only `vars` in its environment.
fn run(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let binary = harness::tools::workspace_binary("matrix-router");
    let output = Command::new(binary).env_clear().envs(vars.iter().copied()).output().expect("run");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("ROUTER_TLS_CERT is not set"), "{stderr}");

    let (code, stderr) = run(&[("ROUTER_DEV_MODE", "true"), ("SUPABASE_URL", "not a url")]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("SUPABASE_URL is malformed"), "{stderr}");

    let secret = "a-secret-that-is-too-short";
    let (code, stderr) = run(&[
        ("ROUTER_DEV_MODE", "true"),
        ("SUPABASE_URL", "https://abcd.supabase.co"),
        ("DATABASE_URL", "postgres://127.0.0.1:1/matrix"),
        ("FLY_API_TOKEN", "token"),
        ("FLY_APP_NAME", "app"),
        ("FLY_REGION", "ams"),
        ("ROUTER_DAEMON_IMAGE", "image"),
        ("ROUTER_DAEMON_TOKEN_SECRET", secret),
    ]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("ROUTER_DAEMON_TOKEN_SECRET is malformed"), "{stderr}");
    assert!(!stderr.contains(secret), "the secret is printed: {stderr}");

    // Not UTF-8: an error, not "unset" (which would mean the self-signed certificate).
    use std::os::unix::ffi::OsStrExt;
    let binary = harness::tools::workspace_binary("matrix-router");
    let output = Command::new(binary)
        .env_clear()
        .env("ROUTER_TLS_CERT", std::ffi::OsStr::from_bytes(b"/etc/cert\xff.pem"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("ROUTER_TLS_CERT is not valid UTF-8"), "{stderr}");
}

/// Configured files that cannot be used (TLS certificate and key, machine template) stop the
/// router with 64 and the variable's name, before it binds or connects anywhere.
#[test]
fn unusable_configured_files_exit_64_naming_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let make =
        || rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let (first, second) = (make(), make());
    let cert = write("cert.pem", &first.cert.pem());
    let key = write("key.pem", &first.key_pair.serialize_pem());
    let other_key = write("other-key.pem", &second.key_pair.serialize_pem());
    let garbage = write("garbage.pem", "not a PEM file\n");
    let bad_template = write("bad.tmpl", "image = \"{{ no_such_placeholder }}\"\n");
    let missing = dir.path().join("missing").display().to_string();

    let base = [
        ("ROUTER_LISTEN_ADDR", "127.0.0.1:0"),
        ("SUPABASE_URL", "https://abcd.supabase.co"),
        ("DATABASE_URL", "postgres://127.0.0.1:1/matrix"),
        ("FLY_API_URL", "http://127.0.0.1:1"),
        ("FLY_API_TOKEN", "token"),
        ("FLY_APP_NAME", "app"),
        ("FLY_REGION", "ams"),
        ("ROUTER_DAEMON_IMAGE", "image"),
        ("ROUTER_DAEMON_TOKEN_SECRET", "daemon-token-secret-for-tests-0123456789"),
    ];
    let cases: &[(&str, &str, &str, &str)] = &[
        // (cert, key, template, variable named)
        (&missing, &key, "", "ROUTER_TLS_CERT"),
        (&garbage, &key, "", "ROUTER_TLS_CERT"),
        (&cert, &garbage, "", "ROUTER_TLS_KEY"),
        (&cert, &other_key, "", "ROUTER_TLS_KEY"),
        (&cert, &key, &missing, "ROUTER_DAEMON_TEMPLATE"),
        (&cert, &key, &bad_template, "ROUTER_DAEMON_TEMPLATE"),
    ];
    for (cert, key, template, variable) in cases {
        let mut vars = base.to_vec();
        vars.extend([("ROUTER_TLS_CERT", *cert), ("ROUTER_TLS_KEY", *key)]);
        if !template.is_empty() {
            vars.push(("ROUTER_DAEMON_TEMPLATE", template));
        }
        let (code, stderr) = run(&vars);
        assert_eq!(code, Some(64), "{variable}: {stderr}");
        assert!(stderr.contains(variable), "{variable}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_logs_carry_no_colour_codes() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let binary = harness::tools::workspace_binary("matrix-router");
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .envs(&env.vars)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn matrix-router");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();

    let mut logged = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            let started = line.contains("matrix-router started");
            logged.push(line);
            if started {
                return;
            }
        }
    })
    .await;
    child.kill().await.expect("stop matrix-router");

    assert!(read.is_ok(), "no start line within 30 s; logged: {logged:?}");
    assert!(logged.iter().any(|l| l.contains("matrix-router started")), "{logged:?}");
    assert!(logged.iter().all(|l| !l.contains('\x1b')), "colour codes in piped logs: {logged:?}");
}

/// The binary running against a test topology, with its stderr lines on a channel.
struct Router {
    child: tokio::process::Child,
    base: String,
    logs: mpsc::UnboundedReceiver<String>,
}

impl Router {
    async fn spawn(env: &TestEnv, grace_secs: u64) -> Self {
        let binary = harness::tools::workspace_binary("matrix-router");
        let mut child = tokio::process::Command::new(binary)
            .env_clear()
            .envs(&env.vars)
            .env(matrix_router::config::ROUTER_SHUTDOWN_GRACE_SECS, grace_secs.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn matrix-router");
        let (tx, logs) = mpsc::unbounded_channel();
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line()).await;
        let line = line.expect("no listening line within 30 s").expect("stdout").expect("line");
        let base = line.rsplit(' ').next().expect("address").to_owned();
        assert!(base.starts_with("https://"), "{line}");
        Self { child, base, logs }
    }

    /// Sends SIGTERM and waits until the router logged that it is shutting down.
    async fn terminate(&mut self) {
        let pid = self.child.id().expect("pid") as i32;
        kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
        let logged = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.logs.recv().await {
                if line.contains("matrix-router shutting down") {
                    return;
                }
            }
            panic!("the router's stderr closed before it logged the shutdown");
        });
        logged.await.expect("no shutdown line within 30 s of SIGTERM");
    }

    /// The exit code, waiting at most 60 s (far beyond any grace period the tests set).
    async fn exit_code(&mut self) -> Option<i32> {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        status.expect("the router did not exit").expect("wait").code()
    }
}

/// Opens `/events` on `router` as `user` and forwards every chunk read to a channel.
async fn open_events(
    env: &TestEnv,
    router: &Router,
    user: Uuid,
) -> mpsc::UnboundedReceiver<String> {
    let url = format!("{}/events", router.base);
    let response = env.http.get(url).bearer_auth(env.token(user)).send().await.expect("events");
    assert_eq!(response.status(), 200);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut stream = response.bytes_stream();
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = stream.next().await {
            if tx.send(String::from_utf8_lossy(&chunk).into_owned()).is_err() {
                return;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_an_open_stream_until_the_grace_period_ends_then_exits_0() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    let mut router = Router::spawn(&env, 3).await;
    let mut events = open_events(&env, &router, user).await;
    let first = events.recv().await.expect("first event");
    assert!(first.contains("data: hello"), "{first:?}");

    router.terminate().await;
    // The daemon writes a keep-alive every second and never ends the stream: two more chunks
    // can only arrive if the router still forwards after the signal.
    for n in 0..2 {
        let chunk = events.recv().await;
        let chunk = chunk.unwrap_or_else(|| panic!("the stream was cut after {n} chunks"));
        assert!(chunk.contains("keep-alive"), "{chunk:?}");
    }
    // Meanwhile the listener is closed: no new connections.
    let addr = router.base.trim_start_matches("https://");
    let connect = tokio::net::TcpStream::connect(addr).await;
    assert!(connect.is_err(), "a new connection was accepted while draining");

    // The stream never ends by itself: the grace period runs out, the router exits 0 and
    // the stream is closed.
    assert_eq!(router.exit_code().await, Some(0));
    while events.recv().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_once_the_last_open_stream_closes() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    env.echo(user).await;
    // A grace period far beyond the test's own bound: an exit means the drain finished.
    let mut router = Router::spawn(&env, 3600).await;
    let mut events = open_events(&env, &router, user).await;
    events.recv().await.expect("first event");

    router.terminate().await;
    let chunk = events.recv().await.expect("the stream was cut by the signal");
    assert!(chunk.contains("keep-alive"), "{chunk:?}");
    // The client goes away: nothing is open any more.
    drop(events);
    assert_eq!(router.exit_code().await, Some(0));
}
