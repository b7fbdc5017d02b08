//! Debian's `docker-registry` (distribution 2.8) started on a loopback port, with its
//! storage in a temporary directory, and optionally basic or token auth.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::process::{free_port, wait_for_port, ChildGuard};

pub const INSTALL_HINT: &str = "install it with `apt-get install docker-registry`";

/// How the registry authenticates.
pub enum Auth {
    Anonymous,
    /// Basic auth from an htpasswd file with this one user.
    Htpasswd {
        user: String,
        password: String,
    },
    /// Bearer tokens from `realm`, signed by the key of `cert` (a PEM certificate).
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert: PathBuf,
    },
}

pub struct RegistryServer {
    pub port: u16,
    pub storage: PathBuf,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl RegistryServer {
    /// `None` when `docker-registry` (or `htpasswd` for basic auth) is not installed.
    pub fn start(auth: Auth) -> Option<Self> {
        let program = harness::tools::require("docker-registry", INSTALL_HINT)?;
        let dir = tempfile::Builder::new().prefix("registry-test-").tempdir().expect("temp dir");
        let storage = dir.path().join("storage");
        let auth_section = match &auth {
            Auth::Anonymous => String::new(),
            Auth::Htpasswd { user, password } => {
                let file = write_htpasswd(dir.path(), user, password)?;
                format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", file.display())
            }
            Auth::Token { realm, service, issuer, cert } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: \
                    {issuer}\n    rootcertbundle: {}\n",
                cert.display()
            ),
        };

        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: test-upload-state-secret\n{auth_section}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("registry config");

        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let mut command = Command::new(program);
        command
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let mut child =
            ChildGuard::spawn("docker-registry", &mut command).expect("start docker-registry");
        if let Err(e) = wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(20)) {
            let _ = child.check_running();
            let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
            panic!("docker-registry did not start: {e}\n{log}");
        }
        Some(Self { port, storage, _child: child, _dir: dir })
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn write_htpasswd(dir: &Path, user: &str, password: &str) -> Option<PathBuf> {
    let htpasswd =
        harness::tools::require("htpasswd", "install it with `apt-get install apache2-utils`")?;
    // distribution accepts bcrypt entries only.
    let output =
        Command::new(htpasswd).args(["-Bbn", user, password]).output().expect("run htpasswd");
    assert!(
        output.status.success(),
        "htpasswd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.join("htpasswd");
    std::fs::write(&path, output.stdout).expect("write htpasswd");
    Some(path)
}
