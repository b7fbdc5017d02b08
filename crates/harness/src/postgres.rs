//! A throwaway PostgreSQL cluster, made with `initdb` in a directory of its own and
//! served on a loopback port. Never a shared server.
//!
//! PostgreSQL refuses to run as root; when this process is root the cluster runs as the
//! `postgres` system user (created by Debian's server package), switched to with `setpriv`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;

use crate::process::{free_port, ChildGuard};
use crate::tools;

/// How to install the server on Debian, for messages.
pub const INSTALL_HINT: &str = "install it with `apt-get install postgresql`";

/// The system user a root process runs the cluster as.
const SERVICE_USER: &str = "postgres";

/// A running cluster; stopped (fast shutdown) when dropped. Its directory is removed too
/// unless it was given by the caller.
#[derive(Debug)]
pub struct PgCluster {
    port: u16,
    bin_dir: PathBuf,
    run_as: Option<String>,
    log_path: PathBuf,
    server: ChildGuard,
    /// With TLS on: the server's self-signed certificate (PEM), which clients must trust.
    tls_cert: Option<PathBuf>,
    _temp: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// Starts a fresh cluster in a temporary directory on a free loopback port.
    ///
    /// `Ok(None)` means PostgreSQL is not installed and the caller should skip (this is
    /// said loudly; under CI it is a panic instead, see [`tools::require`]).
    pub fn start() -> anyhow::Result<Option<Self>> {
        let Some(initdb) = tools::require("initdb", INSTALL_HINT) else { return Ok(None) };
        let temp = tempfile::Builder::new().prefix("matrix-pg-").tempdir()?;
        let data = temp.path().join("data");
        let mut cluster = Self::start_with(&initdb, &data, free_port(), false)?;
        cluster._temp = Some(temp);
        Ok(Some(cluster))
    }

    /// Like [`Self::start`], with TLS on: the server presents a certificate for
    /// `localhost` and `127.0.0.1`, self-signed, whose PEM is [`Self::tls_cert`].
    pub fn start_tls() -> anyhow::Result<Option<Self>> {
        let Some(initdb) = tools::require("initdb", INSTALL_HINT) else { return Ok(None) };
        let temp = tempfile::Builder::new().prefix("matrix-pg-").tempdir()?;
        let data = temp.path().join("data");
        let mut cluster = Self::start_with(&initdb, &data, free_port(), true)?;
        cluster._temp = Some(temp);
        Ok(Some(cluster))
    }

    /// Starts the cluster kept in `data_dir`, creating it on first use; the data stays
    /// when the cluster stops. Used by `cargo xtask dev` to keep state between runs.
    pub fn start_in(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let initdb = tools::find("initdb")
            .with_context(|| format!("`initdb` is not installed; {INSTALL_HINT}"))?;
        Self::start_with(&initdb, data_dir, port, false)
    }

    fn start_with(initdb: &Path, data: &Path, port: u16, tls: bool) -> anyhow::Result<Self> {
        // Resolve links (`/usr/local/bin/initdb` may point into Debian's versioned
        // directory): the server's other programs live beside the real file.
        let initdb =
            initdb.canonicalize().with_context(|| format!("resolving {}", initdb.display()))?;
        let bin_dir = initdb.parent().context("initdb has no parent directory")?.to_owned();
        let run_as = is_root().then(|| SERVICE_USER.to_owned());

        // 1. Make the cluster once; a directory with PG_VERSION is already one.
        std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
        if let Some(user) = &run_as {
            chown_tree_to(user, data.parent().unwrap_or(data))?;
        }
        if !data.join("PG_VERSION").exists() {
            let status = command_as(&run_as, &initdb)
                .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-sync"])
                .arg("--pgdata")
                .arg(data)
                .stdout(Stdio::null())
                .status()
                .context("running initdb")?;
            if !status.success() {
                bail!("initdb of {} failed: {status}", data.display());
            }
        }

        let tls_cert = if tls { Some(write_server_certificate(data, &run_as)?) } else { None };

        // 2. Serve it on loopback only, with its socket in its own directory and its log
        //    beside the data (a pipe nobody reads would block the server once full).
        let log_path = data.with_extension("log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let postgres = bin_dir.join("postgres");
        let mut command = command_as(&run_as, &postgres);
        command
            .arg("-D")
            .arg(data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(data)
            // A throwaway cluster trades durability for speed.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log);
        if tls {
            command.args(["-c", "ssl=on", "-c", "ssl_cert_file=server.crt"]);
            command.args(["-c", "ssl_key_file=server.key"]);
        }
        let server = ChildGuard::spawn("postgres", &mut command)?.with_stop_signal(Signal::SIGINT);
        let mut cluster = Self { port, bin_dir, run_as, log_path, server, tls_cert, _temp: None };

        // 3. Wait until it accepts connections; on failure show why.
        if let Err(error) = cluster.wait_ready(Duration::from_secs(30)) {
            let log = std::fs::read_to_string(&cluster.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(error.context(format!("server log:\n{}", tail.join("\n"))));
        }
        Ok(cluster)
    }

    /// The loopback port the cluster listens on.
    /// The server's process id; its backends share its process group.
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    /// The PEM certificate a client must trust to reach a cluster started with TLS.
    pub fn tls_cert(&self) -> Option<&Path> {
        self.tls_cert.as_deref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL of the cluster's default database.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// A URL of database `name` (which [`Self::create_database`] makes).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database and returns its URL; for tests that share a cluster.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let status = Command::new(self.bin_dir.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", name])
            .status()
            .context("running createdb")?;
        if !status.success() {
            bail!("createdb {name} failed: {status}");
        }
        Ok(self.database_url(name))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let pg_isready = self.bin_dir.join("pg_isready");
        loop {
            self.server.check_running().context("PostgreSQL did not start")?;
            let ready = Command::new(&pg_isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("PostgreSQL on port {} not ready within {timeout:?}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The user the server runs as, when it is not this process's user.
    pub fn service_user(&self) -> Option<&str> {
        self.run_as.as_deref()
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn command_as(user: &Option<String>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .arg("--init-groups")
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Writes `server.crt` and `server.key` (readable by the server's user only, as PostgreSQL
/// requires) into the data directory, and a copy of the certificate beside it for clients.
fn write_server_certificate(data: &Path, run_as: &Option<String>) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).context("making a certificate")?;
    let cert = certified.cert.pem();
    let key_path = data.join("server.key");
    std::fs::write(data.join("server.crt"), &cert)?;
    std::fs::write(&key_path, certified.key_pair.serialize_pem())?;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(user) = run_as {
        chown_tree_to(user, data)?;
    }
    let client_copy = data.with_extension("crt");
    std::fs::write(&client_copy, cert)?;
    Ok(client_copy)
}

fn chown_tree_to(user: &str, dir: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status()
        .context("running chown")?;
    if !status.success() {
        bail!(
            "chown -R {user} {} failed (is there a `{user}` user? {INSTALL_HINT})",
            dir.display()
        );
    }
    Ok(())
}
