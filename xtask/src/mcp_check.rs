//! The MCP servers that the daemon image bakes in, proven from their lock files.
//!
//! The image installs the servers from `deploy/daemon/mcp` (npm and uv locks) at build time
//! and the agent manifests in `deploy/daemon/agents` say how to start them. This check does
//! the same outside Nix:
//!
//! 1. check that the agent manifests name existing skills and exactly the servers this file
//!    expects, and that the npm lock records what Nix fetches;
//! 2. install the npm servers with `npm ci` and the Python servers with `uv sync --frozen`
//!    into a temp prefix laid out like `/opt/matrix/mcp` in the image (registries reachable);
//! 3. start each server the manifests name, with the image paths mapped onto the temp
//!    prefix, inside `unshare -n` so that nothing can reach the network;
//! 4. complete an MCP `initialize` + `tools/list` exchange over stdio and compare the tool
//!    names with the ones this file expects for the locked versions.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use xshell::{cmd, Shell};

/// The lock files of the servers, relative to the repository root.
const MCP_DIR: &str = "deploy/daemon/mcp";
/// The agent manifests, relative to the repository root.
const AGENTS_DIR: &str = "deploy/daemon/agents";
/// The skill corpus, relative to the repository root, and where the image puts it.
const SKILLS_DIR: &str = "deploy/daemon/skills";
const IMAGE_SKILLS_DIR: &str = "/opt/matrix/skills";
/// Where the image puts the installed servers; the manifests name paths under it.
const IMAGE_MCP_PREFIX: &str = "/opt/matrix/mcp";
/// The user's volume in the image; manifests pass paths under it as arguments.
const IMAGE_DATA_DIR: &str = "/data";
/// How long one server may take to answer one request (a cold Python start is the slowest).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// The Python minor version the image runs (nixpkgs' `python3`); used here when installed.
const IMAGE_PYTHON: &str = "3.13";
/// The MCP protocol revision the check asks for; servers answer with one they support.
const PROTOCOL_VERSION: &str = "2025-06-18";

/// The tools each server offers at the locked versions. A lock update that changes them
/// fails here, so the agent manifests and skills are reviewed with it.
const EXPECTED_TOOLS: &[(&str, &[&str])] = &[
    (
        "filesystem",
        &[
            "create_directory",
            "directory_tree",
            "edit_file",
            "get_file_info",
            "list_allowed_directories",
            "list_directory",
            "list_directory_with_sizes",
            "move_file",
            "read_file",
            "read_media_file",
            "read_multiple_files",
            "read_text_file",
            "search_files",
            "write_file",
        ],
    ),
    (
        "memory",
        &[
            "add_observations",
            "create_entities",
            "create_relations",
            "delete_entities",
            "delete_observations",
            "delete_relations",
            "open_nodes",
            "read_graph",
            "search_nodes",
        ],
    ),
    ("sequential-thinking", &["sequentialthinking"]),
    ("fetch", &["fetch"]),
    (
        "git",
        &[
            "git_add",
            "git_branch",
            "git_checkout",
            "git_commit",
            "git_create_branch",
            "git_diff",
            "git_diff_staged",
            "git_diff_unstaged",
            "git_log",
            "git_reset",
            "git_show",
            "git_status",
        ],
    ),
    ("time", &["convert_time", "get_current_time"]),
];

/// One agent manifest: only the part this check needs.
#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    skills: Vec<String>,
    #[serde(rename = "mcpServers")]
    mcp_servers: BTreeMap<String, ServerSpec>,
}

/// How a manifest starts one MCP server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct ServerSpec {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// The temp directories that stand in for the image's paths.
struct Prefix {
    /// Stands in for `/opt/matrix/mcp`.
    mcp: PathBuf,
    /// Stands in for `/data`.
    data: PathBuf,
    /// Each server's stderr, shown when it fails.
    logs: PathBuf,
}

pub fn run(sh: &Shell) -> Result<()> {
    let root = project_root();
    let servers = servers_from_manifests(&root.join(AGENTS_DIR))?;
    check_expectations_cover(&servers)?;
    check_npm_lock_is_fetchable(&root.join(MCP_DIR).join("package-lock.json"))?;
    require_programs(sh)?;

    let temp = sh.create_temp_dir().context("creating the temp prefix")?;
    let prefix = Prefix {
        mcp: temp.path().join("mcp"),
        data: temp.path().join("data"),
        logs: temp.path().join("logs"),
    };
    for dir in
        [&prefix.mcp, &prefix.logs, &prefix.data.join("workspace"), &prefix.data.join("cortex")]
    {
        sh.create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    install_npm_servers(sh, &root, &prefix.mcp)?;
    install_python_servers(sh, &root, &prefix.mcp, temp.path())?;

    let mut failed = Vec::new();
    for (name, spec) in &servers {
        match check_server(name, spec, &prefix) {
            Ok(tools) => println!("mcp  {name:<20} ok      {} tools", tools.len()),
            Err(err) => {
                println!("mcp  {name:<20} FAILED  {err:#}");
                failed.push(name.clone());
            }
        }
    }

    let passed = servers.len() - failed.len();
    println!("mcp  {passed} passed, {} failed", failed.len());
    ensure!(failed.is_empty(), "MCP servers failed the offline check: {}", failed.join(", "));
    Ok(())
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// Stops early with an install hint when a program the check runs is missing.
fn require_programs(sh: &Shell) -> Result<()> {
    let hints = [
        ("node", "apt-get install nodejs npm"),
        ("npm", "apt-get install npm"),
        ("uv", "pip install uv"),
        ("unshare", "apt-get install util-linux"),
    ];
    for (program, hint) in hints {
        if harness::tools::find(program).is_none() {
            bail!("`{program}` is not installed; {hint}");
        }
    }
    cmd!(sh, "unshare -n true")
        .quiet()
        .run()
        .context("`unshare -n` cannot make a network namespace here (it needs root)")?;
    Ok(())
}

/// Nix (`importNpmLock`) fetches exactly what the lock's `resolved` and `integrity` name:
/// a package without them could not be built there, even though `npm ci` copes.
fn check_npm_lock_is_fetchable(lock_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(lock_path).context("reading package-lock.json")?;
    let lock: Value = serde_json::from_str(&text).context("parsing package-lock.json")?;
    let packages = lock.get("packages").and_then(Value::as_object).context("no `packages`")?;

    let unfetchable: Vec<&str> = packages
        .iter()
        .filter(|(key, entry)| !key.is_empty() && entry.get("link").is_none())
        .filter(|(_, entry)| {
            let resolved = entry.get("resolved").and_then(Value::as_str).unwrap_or_default();
            !resolved.starts_with("https://") || entry.get("integrity").is_none()
        })
        .map(|(key, _)| key.as_str())
        .collect();
    ensure!(
        unfetchable.is_empty(),
        "package-lock.json has no https `resolved` URL or no `integrity` for {} package(s), \
         e.g. {}; regenerate it with \
         `npm install --package-lock-only --omit-lockfile-registry-resolved=false`",
        unfetchable.len(),
        unfetchable.iter().take(3).copied().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// `npm ci` from the committed lock: exact versions, integrity hashes checked.
fn install_npm_servers(sh: &Shell, root: &Path, mcp: &Path) -> Result<()> {
    let npm_dir = mcp.join("npm");
    sh.create_dir(&npm_dir)?;
    for file in ["package.json", "package-lock.json"] {
        sh.copy_file(root.join(MCP_DIR).join(file), &npm_dir)
            .with_context(|| format!("copying {MCP_DIR}/{file}"))?;
    }

    let _cd = sh.push_dir(&npm_dir);
    cmd!(sh, "npm ci --no-audit --no-fund --loglevel=error")
        .run()
        .context("installing the npm MCP servers from package-lock.json")?;
    Ok(())
}

/// `uv sync --frozen` from the committed lock into a virtualenv at `<mcp>/python`.
fn install_python_servers(sh: &Shell, root: &Path, mcp: &Path, temp: &Path) -> Result<()> {
    let project = temp.join("python-project");
    sh.create_dir(&project)?;
    for file in ["pyproject.toml", "uv.lock"] {
        sh.copy_file(root.join(MCP_DIR).join(file), &project)
            .with_context(|| format!("copying {MCP_DIR}/{file}"))?;
    }

    let venv = mcp.join("python");
    let _cd = sh.push_dir(&project);
    let _venv = sh.push_env("UV_PROJECT_ENVIRONMENT", &venv);
    // Only interpreters already on the machine: nothing but the locked wheels is fetched.
    let _downloads = sh.push_env("UV_PYTHON_DOWNLOADS", "never");
    // The image's Python when this machine has it, so the same wheels are proven.
    let found = cmd!(sh, "uv python find {IMAGE_PYTHON}").quiet().ignore_stderr().read();
    let python = match found {
        Ok(path) => path,
        Err(_) => {
            println!("mcp  Python {IMAGE_PYTHON} is not installed: checking with uv's default");
            String::new()
        }
    };
    let _python = (!python.is_empty()).then(|| sh.push_env("UV_PYTHON", python.trim()));
    cmd!(sh, "uv sync --frozen --no-dev --quiet")
        .run()
        .context("installing the Python MCP servers from uv.lock")?;
    Ok(())
}

/// Every server named by any manifest; one name must mean one way of starting it.
fn servers_from_manifests(agents: &Path) -> Result<BTreeMap<String, ServerSpec>> {
    let mut servers: BTreeMap<String, ServerSpec> = BTreeMap::new();
    let entries = std::fs::read_dir(agents).with_context(|| format!("reading {AGENTS_DIR}"))?;
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {AGENTS_DIR}"))?;
    paths.retain(|p| p.extension().is_some_and(|ext| ext == "json"));
    paths.sort();
    ensure!(!paths.is_empty(), "no agent manifests (*.json) in {AGENTS_DIR}");

    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing the agent manifest {}", path.display()))?;
        check_skills_exist(&path, &manifest.skills)?;
        for (name, spec) in manifest.mcp_servers {
            match servers.get(&name) {
                Some(known) if *known != spec => bail!(
                    "{} starts the MCP server `{name}` differently from another manifest",
                    path.display()
                ),
                Some(_) => {}
                None => {
                    servers.insert(name, spec);
                }
            }
        }
    }
    Ok(servers)
}

/// Every skill a manifest names is a file of the corpus that the image carries.
fn check_skills_exist(manifest: &Path, skills: &[String]) -> Result<()> {
    let corpus = project_root().join(SKILLS_DIR);
    for skill in skills {
        let file = skill.strip_prefix(IMAGE_SKILLS_DIR).and_then(|rest| rest.strip_prefix('/'));
        let Some(file) = file.filter(|f| !f.is_empty() && !f.contains('/')) else {
            bail!("{}: the skill {skill} is not under {IMAGE_SKILLS_DIR}", manifest.display());
        };
        ensure!(
            corpus.join(file).is_file(),
            "{}: the skill {skill} has no file {SKILLS_DIR}/{file}",
            manifest.display()
        );
    }
    Ok(())
}

/// The manifests and this check must name the same servers: no server goes unchecked.
fn check_expectations_cover(servers: &BTreeMap<String, ServerSpec>) -> Result<()> {
    let named: BTreeSet<&str> = servers.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = EXPECTED_TOOLS.iter().map(|(name, _)| *name).collect();
    ensure!(
        named == expected,
        "the agent manifests name the MCP servers {named:?}, but the check expects {expected:?}"
    );
    Ok(())
}

/// Starts one server offline and returns its tool names once they match the expected ones.
fn check_server(name: &str, spec: &ServerSpec, prefix: &Prefix) -> Result<Vec<String>> {
    let log_path = prefix.logs.join(format!("{name}.log"));
    let mut server = McpProcess::start(spec, prefix, &log_path)?;
    let outcome = exchange(&mut server);
    server.stop();

    let tools = outcome.map_err(|err| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: String = last_lines(&log, 15);
        err.context(format!("server stderr (last lines):\n{tail}"))
    })?;

    let expected: BTreeSet<&str> = EXPECTED_TOOLS
        .iter()
        .find(|(server, _)| *server == name)
        .map(|(_, tools)| tools.iter().copied().collect())
        .unwrap_or_default();
    let offered: BTreeSet<&str> = tools.iter().map(String::as_str).collect();
    ensure!(offered == expected, "tools/list offered {offered:?}, expected {expected:?}");
    Ok(tools)
}

/// `initialize`, `notifications/initialized`, then `tools/list` until the last page.
fn exchange(server: &mut McpProcess) -> Result<Vec<String>> {
    let init = server.request(
        1,
        "initialize",
        json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": { "name": "xtask-mcp-check", "version": env!("CARGO_PKG_VERSION") },
        }),
    )?;
    ensure!(
        init.get("protocolVersion").and_then(Value::as_str).is_some(),
        "initialize result has no protocolVersion: {init}"
    );
    server.notify("notifications/initialized")?;

    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for id in 2.. {
        let params = match &cursor {
            Some(cursor) => json!({ "cursor": cursor }),
            None => json!({}),
        };
        let page = server.request(id, "tools/list", params)?;
        let listed = page.get("tools").and_then(Value::as_array).context("tools/list: no tools")?;
        for tool in listed {
            let name = tool.get("name").and_then(Value::as_str).context("a tool without a name")?;
            tools.push(name.to_owned());
        }
        cursor = page.get("nextCursor").and_then(Value::as_str).map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    Ok(tools)
}

/// A server process in its own network namespace, spoken to with JSON-RPC lines on stdio.
struct McpProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl McpProcess {
    fn start(spec: &ServerSpec, prefix: &Prefix, log_path: &Path) -> Result<Self> {
        let command = map_image_path(&spec.command, prefix);
        let args: Vec<String> = spec.args.iter().map(|a| map_image_path(a, prefix)).collect();
        let env = spec.env.iter().map(|(k, v)| (k, map_image_path(v, prefix)));
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;

        let mut child = Command::new("unshare")
            .arg("-n")
            .arg("--")
            .arg(&command)
            .args(&args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting `{command}` under `unshare -n`"))?;

        let stdout = child.stdout.take().context("child stdout")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { stdin: child.stdin.take(), child, lines })
    }

    fn send(&mut self, message: &Value) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        writeln!(stdin, "{message}").and_then(|()| stdin.flush()).context("writing to the server")
    }

    fn notify(&mut self, method: &str) -> Result<()> {
        self.send(&json!({ "jsonrpc": "2.0", "method": method }))
    }

    /// Sends one request and waits for the response with the same id; other lines
    /// (server notifications, requests) are skipped.
    fn request(&mut self, id: u64, method: &str, params: Value) -> Result<Value> {
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))?;
        loop {
            let line = self.lines.recv_timeout(REPLY_TIMEOUT).map_err(|_| {
                anyhow::anyhow!("no answer to `{method}` within {}s", REPLY_TIMEOUT.as_secs())
            })?;
            let Ok(message) = serde_json::from_str::<Value>(&line) else {
                bail!("the server wrote a line that is not JSON-RPC on stdout: {line}");
            };
            if message.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(error) = message.get("error") {
                bail!("`{method}` failed: {error}");
            }
            return message
                .get("result")
                .cloned()
                .with_context(|| format!("`{method}`: no result"));
        }
    }

    fn stop(mut self) {
        // Closing stdin is how an stdio MCP client says goodbye; kill covers the rest.
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Maps a path the image uses onto the temp prefix that stands in for it.
fn map_image_path(value: &str, prefix: &Prefix) -> String {
    let mapped = [(IMAGE_MCP_PREFIX, &prefix.mcp), (IMAGE_DATA_DIR, &prefix.data)]
        .into_iter()
        .find_map(|(image, local)| {
            let rest = value.strip_prefix(image)?;
            (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", local.display()))
        });
    mapped.unwrap_or_else(|| value.to_owned())
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Prefix {
        Prefix {
            mcp: PathBuf::from("/tmp/x/mcp"),
            data: PathBuf::from("/tmp/x/data"),
            logs: PathBuf::from("/tmp/x/logs"),
        }
    }

    fn check(input: &str, expected: &str) {
        assert_eq!(map_image_path(input, &prefix()), expected, "mapping {input}");
    }

    #[test]
    fn image_paths_map_onto_the_prefix() {
        check("/opt/matrix/mcp/python/bin/mcp-server-git", "/tmp/x/mcp/python/bin/mcp-server-git");
        check("/data/workspace", "/tmp/x/data/workspace");
        check("/data", "/tmp/x/data");
    }

    #[test]
    fn other_values_stay_as_they_are() {
        check("/database", "/database");
        check("/opt/matrix/mcpx", "/opt/matrix/mcpx");
        check("--local-timezone", "--local-timezone");
        check("true", "true");
    }

    #[test]
    fn the_committed_manifests_name_exactly_the_checked_servers() {
        let servers = servers_from_manifests(&project_root().join(AGENTS_DIR)).unwrap();
        check_expectations_cover(&servers).unwrap();
    }
}
