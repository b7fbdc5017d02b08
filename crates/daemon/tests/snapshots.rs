//! Snapshots against a real S3-compatible server (MinIO or moto) on loopback.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use harness::s3::S3Server;
use matrixd::config::Config;
use matrixd::layout::DataDir;
use matrixd::snapshot::{self, ChangeCheck, PushOutcome};
use matrixd::store::{Manifest, SnapshotStore};

const BUCKET: &str = "matrix-snapshots";

/// The S3 server and the environment pointing at it.
struct Store {
    server: S3Server,
}

impl Store {
    fn start() -> Option<Self> {
        let server = S3Server::start().unwrap()?;
        server.create_bucket(BUCKET).unwrap();
        Some(Self { server })
    }

    /// The environment of a daemon of [`USER`] on `data` using this store.
    fn env(&self, data: &Path) -> BTreeMap<String, String> {
        let mut env = base_env(data);
        for (name, value) in self.server.env(BUCKET) {
            env.insert(name.into(), value);
        }
        env.insert("MATRIX_SNAPSHOT_INTERVAL_SECS".into(), "0".into());
        env
    }

    fn client(&self) -> SnapshotStore {
        let env = self.env(Path::new("/unused"));
        let config = Config::from_lookup(|name| env.get(name).cloned()).unwrap();
        SnapshotStore::new(config.s3.as_ref().unwrap(), config.user_id).unwrap()
    }

    async fn generations(&self) -> Vec<u64> {
        self.client().generations().await.unwrap()
    }
}

/// Some user files: nested, empty, binary, executable.
fn write_workspace(root: &Path, seed: &str) {
    let workspace = root.join("workspace");
    std::fs::create_dir_all(workspace.join("project/src")).unwrap();
    std::fs::create_dir_all(workspace.join("empty-dir")).unwrap();
    std::fs::write(workspace.join("notes.md"), format!("# notes {seed}\n")).unwrap();
    std::fs::write(workspace.join("project/src/lib.rs"), format!("// {seed}\n")).unwrap();
    let binary: Vec<u8> =
        (0..200_000u32).map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(workspace.join("project/data.bin"), binary).unwrap();
    let script = workspace.join("project/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("cortex/settings.json"), format!("{{\"seed\": \"{seed}\"}}\n"))
        .unwrap();
    // Links: to a file, to a directory, out of the tree, dangling.
    std::os::unix::fs::symlink("notes.md", workspace.join("notes-link")).unwrap();
    std::os::unix::fs::symlink("project/src", workspace.join("src")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/env", workspace.join("project/env")).unwrap();
    std::os::unix::fs::symlink(format!("gone-{seed}"), workspace.join("dangling")).unwrap();
}

fn state_generation(root: &Path) -> u64 {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("state.json")).unwrap()).unwrap();
    state["generation"].as_u64().unwrap()
}

/// A volume at generation 1 in the store, pushed from a fresh directory; returns it.
fn pushed_volume(store: &Store, seed: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let env = store.env(dir.path());
    run_ok(&["init"], &env);
    write_workspace(dir.path(), seed);
    let out = run_ok(&["snapshot", "push"], &env);
    assert!(out.contains("generation"), "{out}");
    dir
}

#[tokio::test]
async fn push_then_restore_on_a_fresh_volume_gives_the_same_tree() {
    let Some(store) = Store::start() else { return };
    let source = pushed_volume(&store, "one");
    assert_eq!(store.generations().await, [1]);

    let fresh = tempfile::tempdir().unwrap();
    let env = store.env(fresh.path());
    let out = run_ok(&["init"], &env);

    assert!(out.contains("restored generation 1"), "{out}");
    assert_eq!(snapshot_tree_hash(fresh.path()), snapshot_tree_hash(source.path()));
    assert!(fresh.path().join("workspace/src").symlink_metadata().unwrap().is_symlink());
    assert_eq!(tree_hash(fresh.path()), tree_hash(source.path()), "state files agree too");
    let before = tree_hash(fresh.path());
    run_ok(&["init"], &env);
    assert_eq!(tree_hash(fresh.path()), before, "a second init changes nothing");

    let out = run_ok(&["snapshot", "push"], &env);
    assert!(out.contains("unchanged since generation 1"), "{out}");
    assert_eq!(store.generations().await, [1]);
}

#[tokio::test]
async fn a_restore_killed_at_any_step_is_finished_by_the_next_run() {
    let Some(store) = Store::start() else { return };
    let source = pushed_volume(&store, "new");
    let expected = snapshot_tree_hash(source.path());
    let steps = [
        "restore.unpacked",
        "restore.ready",
        "restore.retired.cortex",
        "restore.swapped.cortex",
        "restore.retired.workspace",
        "restore.swapped.workspace",
        "restore.state",
    ];

    for step in steps {
        // An old volume at generation 0 with files of its own, unchanged since init.
        let dir = tempfile::tempdir().unwrap();
        let mut env = base_env(dir.path());
        run_ok(&["init"], &env);
        let old = snapshot_tree_hash(dir.path());
        env.extend(store.env(dir.path()));

        env.insert("MATRIX_FAILPOINT".into(), step.into());
        let killed = run(&["init"], &env);
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "{step}: {}",
            String::from_utf8_lossy(&killed.stderr)
        );
        if !dir.path().join(".restore/READY").exists() {
            let after_kill = snapshot_tree_hash(dir.path());
            assert_eq!(after_kill, old, "{step}: before the commit point the old state is intact");
        }

        env.remove("MATRIX_FAILPOINT");
        run_ok(&["init"], &env);
        assert_eq!(
            snapshot_tree_hash(dir.path()),
            expected,
            "{step}: the re-run finished the restore"
        );
        assert_eq!(state_generation(dir.path()), 1, "{step}");
        assert!(!dir.path().join(".restore").exists(), "{step}: no staging left");
    }
}

#[tokio::test]
async fn a_restore_killed_at_random_moments_ends_consistent() {
    let Some(store) = Store::start() else { return };
    let source = pushed_volume(&store, "timing");
    // Enough data that the restore takes a while.
    let big: Vec<u8> =
        (0..24_000_000u32).map(|n| (n.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    std::fs::write(source.path().join("workspace/big.bin"), big).unwrap();
    run_ok(&["snapshot", "push"], &store.env(source.path()));
    let expected = snapshot_tree_hash(source.path());

    for delay_ms in [5, 40, 120, 250, 500, 900] {
        let dir = tempfile::tempdir().unwrap();
        let env = store.env(dir.path());
        let mut child = command(&["snapshot", "restore"], &env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();

        run_ok(&["init"], &env);
        assert_eq!(snapshot_tree_hash(dir.path()), expected, "killed after {delay_ms} ms");
        assert!(!dir.path().join(".restore").exists());
    }
}

#[tokio::test]
async fn a_stale_snapshot_never_overwrites_newer_local_state() {
    let Some(store) = Store::start() else { return };
    let a = pushed_volume(&store, "a");
    let env_a = store.env(a.path());

    // Another machine of the same user restores generation 1 and pushes generation 2.
    let b = tempfile::tempdir().unwrap();
    let env_b = store.env(b.path());
    run_ok(&["init"], &env_b);
    std::fs::write(b.path().join("workspace/from-b.txt"), "b").unwrap();
    run_ok(&["snapshot", "push"], &env_b);
    assert_eq!(store.generations().await, [1, 2]);

    // A has unsaved work of its own: init keeps it, push refuses to overwrite generation 2.
    std::fs::write(a.path().join("workspace/unsaved.txt"), "mine").unwrap();
    let before = tree_hash(a.path());
    let out = run_ok(&["init"], &env_a);
    assert!(out.contains("kept local changes"), "{out}");
    assert_eq!(tree_hash(a.path()), before);
    let refused = run(&["snapshot", "push"], &env_a);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("generation 1") && stderr.contains("generation 2"), "{stderr}");
    assert_eq!(store.generations().await, [1, 2]);

    // B is ahead of the store (its newest manifest is gone): init leaves B alone.
    store.client().delete(&store.client().manifest_key(2)).await.unwrap();
    let before = tree_hash(b.path());
    let out = run_ok(&["init"], &env_b);
    assert!(out.contains("ready at generation 2"), "{out}");
    assert_eq!(tree_hash(b.path()), before);
}

#[tokio::test]
async fn two_writers_of_one_user_cannot_lose_a_generation() {
    let Some(store) = Store::start() else { return };
    let _origin = pushed_volume(&store, "origin");
    let writers: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (n, dir) in writers.iter().enumerate() {
        run_ok(&["init"], &store.env(dir.path()));
        std::fs::write(dir.path().join("workspace/writer.txt"), format!("writer {n}")).unwrap();
    }

    // Both push generation 2 at once.
    let children: Vec<_> = writers
        .iter()
        .map(|dir| {
            command(&["snapshot", "push"], &store.env(dir.path()))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();

    let winners: Vec<usize> = (0..2).filter(|&n| outputs[n].status.success()).collect();
    assert_eq!(winners.len(), 1, "exactly one push wins: {outputs:?}");
    let (winner, loser) = (winners[0], 1 - winners[0]);
    let stderr = String::from_utf8_lossy(&outputs[loser].stderr);
    assert!(stderr.contains("generation 2"), "the loser says why: {stderr}");
    assert!(!stderr.contains("<?xml"), "no raw store answer in the log: {stderr}");
    assert_eq!(store.generations().await, [1, 2]);
    assert_eq!(state_generation(writers[loser].path()), 1, "the loser did not record a push");

    // Generation 2 is the winner's tree, whole.
    let reader = tempfile::tempdir().unwrap();
    run_ok(&["init"], &store.env(reader.path()));
    assert_eq!(snapshot_tree_hash(reader.path()), snapshot_tree_hash(writers[winner].path()));
}

#[tokio::test]
async fn a_generation_once_claimed_cannot_be_claimed_again() {
    let Some(store) = Store::start() else { return };
    let _origin = pushed_volume(&store, "origin");
    let client = store.client();
    let original = client.manifest(1).await.unwrap();

    let intruder = Manifest::new(1, client.new_archive_key(1), "0".repeat(64), 1);
    let error = client.commit(&intruder).await.unwrap_err();

    assert!(error.to_string().contains("generation 1 was already written"), "{error}");
    assert_eq!(client.manifest(1).await.unwrap(), original);
}

#[tokio::test]
async fn old_generations_are_pruned_to_the_configured_count() {
    let Some(store) = Store::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut env = store.env(dir.path());
    env.insert("MATRIX_SNAPSHOT_KEEP".into(), "2".into());
    run_ok(&["init"], &env);
    for n in 0..4 {
        std::fs::write(dir.path().join("workspace/n.txt"), n.to_string()).unwrap();
        run_ok(&["snapshot", "push"], &env);
    }
    assert_eq!(store.generations().await, [3, 4]);
    let bucket = store.server.bucket(BUCKET).unwrap();
    let listed = bucket.list(format!("users/{USER}/snapshots/"), None).await.unwrap();
    let objects: usize = listed.iter().map(|page| page.contents.len()).sum();
    assert_eq!(objects, 4, "two manifests and their two archives");
}

#[tokio::test]
async fn a_corrupted_archive_is_refused_and_the_volume_kept() {
    let Some(store) = Store::start() else { return };
    let _origin = pushed_volume(&store, "origin");
    let client = store.client();
    let manifest = client.manifest(1).await.unwrap();
    let bucket = store.server.bucket(BUCKET).unwrap();
    bucket.put_object(&manifest.archive_key, b"not the archive").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut env = base_env(dir.path());
    run_ok(&["init"], &env);
    let before = tree_hash(dir.path());
    env.extend(store.env(dir.path()));

    let output = run(&["init"], &env);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bytes, the manifest says"), "{stderr}");
    run_ok(&["init"], &{
        let mut plain = env.clone();
        for name in
            ["S3_ENDPOINT", "S3_BUCKET", "S3_REGION", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"]
        {
            plain.remove(name);
        }
        plain
    });
    assert_eq!(tree_hash(dir.path()), before, "the volume is as it was");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_pushes_periodically_and_on_shutdown() {
    let Some(store) = Store::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut env = store.env(dir.path());
    env.insert("MATRIX_SNAPSHOT_INTERVAL_SECS".into(), "1".into());
    run_ok(&["init"], &env);
    let mut daemon = Daemon::start(&env);

    std::fs::write(dir.path().join("workspace/first.txt"), "1").unwrap();
    eventually("a periodic snapshot is pushed", async || store.generations().await == [1]).await;

    std::fs::write(dir.path().join("workspace/second.txt"), "2").unwrap();
    let response =
        http().post(format!("{}/shutdown", daemon.url)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let exit = tokio::task::block_in_place(|| daemon.wait_exit());
    assert!(exit.success(), "{exit}");

    let last = store.generations().await.last().copied().unwrap();
    assert!(last >= 2, "the shutdown pushed the last change");
    let reader = tempfile::tempdir().unwrap();
    run_ok(&["init"], &store.env(reader.path()));
    assert_eq!(snapshot_tree_hash(reader.path()), snapshot_tree_hash(dir.path()));
}

/// Rewrites `name` in place until `stop`: truncate, then one byte value repeated, its
/// length a function of the value, so every state the file has is recognisable.
fn rewrite_until(path: std::path::PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let mut round = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let value = (round % 250) as u8 + 1;
        std::fs::write(&path, vec![value; state_length(value)]).unwrap();
        round += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn state_length(value: u8) -> usize {
    (1 + usize::from(value) % 5) * 64 * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn files_written_during_pushes_restore_each_as_one_state() {
    let Some(store) = Store::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = store.env(dir.path());
    run_ok(&["init"], &env);
    let (data, client) = (DataDir::new(dir.path()), store.client());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let path = dir.path().join("workspace/rewritten.bin");
    std::fs::write(&path, vec![1; state_length(1)]).unwrap();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || rewrite_until(path, stop))
    };

    let mut changes = ChangeCheck::default();
    let mut restored = 0;
    for _ in 0..6 {
        let PushOutcome::Pushed { generation, .. } =
            snapshot::push_with(&data, &client, 10, &mut changes).await.unwrap()
        else {
            continue;
        };
        let target = tempfile::tempdir().unwrap();
        let manifest = client.manifest(generation).await.unwrap();
        matrixd::restore::restore(&DataDir::new(target.path()), &client, &manifest).await.unwrap();

        let bytes = std::fs::read(target.path().join("workspace/rewritten.bin")).unwrap();
        if let Some(&first) = bytes.first() {
            assert!(
                bytes.iter().all(|&b| b == first) && bytes.len() <= state_length(first),
                "generation {generation} mixes states ({} bytes, first {first})",
                bytes.len()
            );
        }
        restored += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(restored >= 3, "the writer kept the tree changing, so most checks pushed");
}

#[tokio::test]
async fn a_periodic_check_of_an_unchanged_tree_reads_no_file() {
    let Some(store) = Store::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    run_ok(&["init"], &store.env(dir.path()));
    write_workspace(dir.path(), "periodic");
    let (data, client) = (DataDir::new(dir.path()), store.client());
    let mut changes = ChangeCheck::default();

    let first = snapshot::push_with(&data, &client, 5, &mut changes).await.unwrap();
    assert!(matches!(first, PushOutcome::Pushed { generation: 1, .. }), "{first:?}");
    for _ in 0..5 {
        let again = snapshot::push_with(&data, &client, 5, &mut changes).await.unwrap();
        assert_eq!(again, PushOutcome::Unchanged { generation: 1 });
    }
    assert_eq!(changes.full_reads(), 0, "unchanged metadata: no file was read");

    // A change of the same size, written in place, as an editor without renames does.
    std::fs::write(dir.path().join("workspace/notes.md"), "# notes periodix\n").unwrap();
    let changed = snapshot::push_with(&data, &client, 5, &mut changes).await.unwrap();
    assert!(matches!(changed, PushOutcome::Pushed { generation: 2, .. }), "{changed:?}");

    // A fresh checker (a restarted daemon) reads the tree once, then settles.
    let mut restarted = ChangeCheck::default();
    for _ in 0..3 {
        let again = snapshot::push_with(&data, &client, 5, &mut restarted).await.unwrap();
        assert_eq!(again, PushOutcome::Unchanged { generation: 2 });
    }
    assert_eq!(restarted.full_reads(), 1);
}

#[tokio::test]
async fn a_push_killed_after_claiming_its_generation_is_recorded_by_the_next_run() {
    let Some(store) = Store::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut env = store.env(dir.path());
    run_ok(&["init"], &env);
    write_workspace(dir.path(), "claimed");

    // Killed after the store took generation 1, before the state file said so.
    let kill_after_claim = |env: &mut BTreeMap<String, String>| {
        env.insert("MATRIX_FAILPOINT".into(), "push.committed".into());
        let killed = run(&["snapshot", "push"], env);
        assert_eq!(killed.status.signal(), Some(9), "{}", String::from_utf8_lossy(&killed.stderr));
        env.remove("MATRIX_FAILPOINT");
    };
    kill_after_claim(&mut env);
    assert_eq!(store.generations().await, [1]);
    assert_eq!(state_generation(dir.path()), 0);

    // The next push knows generation 1 for its own, instead of refusing it as newer.
    let out = run_ok(&["snapshot", "push"], &env);
    assert!(out.contains("unchanged since generation 1"), "{out}");
    assert_eq!(state_generation(dir.path()), 1);

    // So does the next init, instead of keeping "local changes" against it.
    std::fs::write(dir.path().join("workspace/second.txt"), "2").unwrap();
    kill_after_claim(&mut env);
    assert_eq!(store.generations().await, [1, 2]);
    let out = run_ok(&["init"], &env);
    assert!(out.contains("ready at generation 2"), "{out}");

    std::fs::write(dir.path().join("workspace/third.txt"), "3").unwrap();
    run_ok(&["snapshot", "push"], &env);
    assert_eq!(store.generations().await, [1, 2, 3]);
    assert!(!dir.path().join(".push-pending.json").exists());
}

/// The uid the daemon runs as in permission tests when the test is root, whom permission
/// bits do not stop.
const NOBODY: u32 = 65534;

/// A data directory the daemon can write to when it runs as [`NOBODY`].
fn nobody_volume() -> (tempfile::TempDir, std::path::PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = parent.path().join("data");
    std::fs::create_dir(&data).unwrap();
    give_to_nobody(&data);
    (parent, data)
}

/// Gives `path` and everything under it to [`NOBODY`] when the test is root.
fn give_to_nobody(path: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    for entry in walkdir::WalkDir::new(path) {
        let entry = entry.unwrap();
        std::os::unix::fs::lchown(entry.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

/// Runs `matrixd args` as [`NOBODY`] when the test is root.
fn run_as_nobody(args: &[&str], env: &BTreeMap<String, String>) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut command = command(args, env);
    if nix::unistd::geteuid().is_root() {
        command.uid(NOBODY).gid(NOBODY);
    }
    command.output().unwrap()
}

fn assert_ok(output: &std::process::Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed: {}\nstderr: {stderr}", output.status);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn a_push_of_a_workspace_that_is_a_link_fails_and_uploads_nothing() {
    let Some(store) = Store::start() else { return };
    let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let env = store.env(dir.path());
    run_ok(&["init"], &env);
    std::fs::write(outside.path().join("secret.txt"), "not the volume's").unwrap();
    let workspace = dir.path().join("workspace");
    std::fs::rename(&workspace, dir.path().join("w.orig")).unwrap();
    std::os::unix::fs::symlink(outside.path(), &workspace).unwrap();

    let output = run(&["snapshot", "push"], &env);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the push is refused: {stderr}");
    assert!(stderr.contains(&workspace.display().to_string()), "names the link: {stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
    assert!(store.generations().await.is_empty(), "nothing was uploaded");
    let fresh = tempfile::tempdir().unwrap();
    run_ok(&["init"], &store.env(fresh.path()));
}

#[tokio::test]
async fn a_read_only_directory_in_the_workspace_does_not_wedge_restore() {
    let Some(store) = Store::start() else { return };
    let ((_source, source), (_target, target)) = (nobody_volume(), nobody_volume());
    let (source_env, target_env) = (store.env(&source), store.env(&target));
    assert_ok(&run_as_nobody(&["init"], &source_env), "init");
    // A Go module cache: read-only directories holding files.
    let module = source.join("workspace/go/pkg/mod/example.com/m@v1.0.0");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(module.join("go.mod"), "module m\n").unwrap();
    give_to_nobody(&source);
    for dir in [&module, module.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    assert_ok(&run_as_nobody(&["snapshot", "push"], &source_env), "push 1");
    let out = assert_ok(&run_as_nobody(&["init"], &target_env), "init of the target");
    assert!(out.contains("restored generation 1"), "{out}");

    std::fs::write(source.join("workspace/notes.md"), "two\n").unwrap();
    give_to_nobody(&source.join("workspace/notes.md"));
    assert_ok(&run_as_nobody(&["snapshot", "push"], &source_env), "push 2");
    // Retires the target's tree, read-only directories and all.
    let out = assert_ok(&run_as_nobody(&["init"], &target_env), "restore over read-only dirs");

    assert!(out.contains("restored generation 2"), "{out}");
    assert!(!target.join(".restore").exists(), "the retired tree is gone");
    assert_eq!(snapshot_tree_hash(&target), snapshot_tree_hash(&source));
    let out = assert_ok(&run_as_nobody(&["init"], &target_env), "a second init");
    assert!(out.contains("ready at generation 2"), "{out}");
}

#[tokio::test]
async fn an_unreadable_workspace_entry_is_left_out_and_the_push_succeeds() {
    let Some(store) = Store::start() else { return };
    let (_source, source) = nobody_volume();
    let env = store.env(&source);
    assert_ok(&run_as_nobody(&["init"], &env), "init");
    let workspace = source.join("workspace");
    std::fs::write(workspace.join("notes.md"), "kept\n").unwrap();
    std::fs::write(workspace.join("secret.txt"), "unreadable\n").unwrap();
    std::fs::create_dir(workspace.join("locked")).unwrap();
    std::fs::write(workspace.join("locked/inner.txt"), "unlistable\n").unwrap();
    // Listable but not searchable: its entries' names can be read, nothing else.
    std::fs::create_dir(workspace.join("nosearch")).unwrap();
    std::fs::write(workspace.join("nosearch/inner.txt"), "unreachable\n").unwrap();
    give_to_nobody(&source);
    std::fs::set_permissions(workspace.join("secret.txt"), std::fs::Permissions::from_mode(0o000))
        .unwrap();
    std::fs::set_permissions(workspace.join("locked"), std::fs::Permissions::from_mode(0o300))
        .unwrap();
    std::fs::set_permissions(workspace.join("nosearch"), std::fs::Permissions::from_mode(0o600))
        .unwrap();

    let output = run_as_nobody(&["snapshot", "push"], &env);

    let out = assert_ok(&output, "push with unreadable entries");
    assert!(out.contains("generation 1"), "{out}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for skipped in
        ["workspace/secret.txt", "workspace/locked", "nosearch/inner.txt", "unreadable=3"]
    {
        assert!(stderr.contains(skipped), "the push warns of {skipped}: {stderr}");
    }
    let out = assert_ok(&run_as_nobody(&["snapshot", "push"], &env), "a second push");
    assert!(out.contains("unchanged since generation 1"), "digests agree: {out}");

    // The daemon's own user restores it, directories it may not enter included.
    let (_fresh, fresh) = nobody_volume();
    let out = assert_ok(&run_as_nobody(&["init"], &store.env(&fresh)), "restore as nobody");
    assert!(out.contains("restored generation 1"), "{out}");
    let restored = fresh.join("workspace");
    assert_eq!(std::fs::read_to_string(restored.join("notes.md")).unwrap(), "kept\n");
    assert!(!restored.join("secret.txt").exists());
    assert!(restored.join("locked").is_dir() && !restored.join("locked/inner.txt").exists());
    assert!(restored.join("nosearch").is_dir() && !restored.join("nosearch/inner.txt").exists());

    // cortex/ is the daemon's own state: an unreadable file there still fails the push.
    let settings = source.join("cortex/settings.json");
    std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o000)).unwrap();
    let output = run_as_nobody(&["snapshot", "push"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cortex/settings.json"), "{stderr}");
}
