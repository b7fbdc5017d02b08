//! `matrixd serve`: bind, serve the API, snapshot periodically, drain on shutdown; and
//! `matrixd executor`, dual mode's process that runs the intents.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::api::{self, App, Work};
use crate::config::Config;
use crate::datalock::{self, LockError};
use crate::executor::{Executor, ExecutorError, Relay};
use crate::intent::{Runner, Transcript};
use crate::journal::{Journal, JournalError};
use crate::layout::DataDir;
use crate::model::ModelClient;
use crate::snapshot::{self, PushOutcome};
use crate::store::SnapshotStore;
use crate::{link, restore};

/// How long a drain waits, after cancelling, for the intent to record `cancelled`.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("binding {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing a signal handler")]
    Signal(#[source] std::io::Error),
    #[error("recording interrupted intents as failed")]
    Recover(#[source] JournalError),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error(transparent)]
    Lock(#[from] crate::datalock::LockError),
}

/// Whether this process also runs the background work (intents and snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    Run,
    /// In dual mode the executor process does it; this process is the front door.
    Skip,
}

/// Serves until `/shutdown`, SIGTERM or SIGINT, then drains and returns.
pub async fn serve(config: &Config, background: Background) -> Result<(), ServeError> {
    // 1. Everything that can fail on bad config fails before the socket is bound.
    let token = config.daemon_token()?;
    let data = DataDir::new(&config.data_dir);
    // The process that writes the journal holds the volume for its lifetime; the front door
    // only reads it.
    let _writer = match background {
        Background::Run => Some(datalock::acquire(&data).await?),
        Background::Skip => None,
    };
    match background {
        Background::Run => prepare(&data)?,
        Background::Skip => prepare_unless_held(&data)?,
    }
    let journal = Journal::new(data.journal(), data.signing_key()?);
    let store = match (&config.s3, background) {
        (Some(s3), Background::Run) => Some(SnapshotStore::new(s3, config.user_id)?),
        _ => None,
    };
    let executor_socket = (background == Background::Skip).then(|| link::socket_path(&data));
    let app = App::new(config, token, data, journal, executor_socket);
    match &app.work {
        Work::Local(runner) => {
            runner.fail_interrupted().map_err(ServeError::Recover)?;
        }
        Work::Remote(link) => {
            tokio::spawn(Arc::clone(link).maintain());
        }
    }

    // 2. Bind and announce.
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| ServeError::Bind { addr: config.listen_addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr: config.listen_addr, source })?;
    println!("matrixd listening on http://{addr}");
    tracing::info!(
        listen.addr = %addr,
        version = env!("CARGO_PKG_VERSION"),
        user.id = %config.user_id,
        snapshots = store.is_some(),
        model = app.model.is_configured(),
        "matrixd started"
    );

    // 3. Background snapshots.
    let snapshots = match (&store, config.snapshot_interval) {
        (Some(store), Some(interval)) => Some(tokio::spawn(snapshot_loop(
            app.data.clone(),
            store.clone(),
            config.snapshot_keep,
            interval,
        ))),
        _ => None,
    };

    // 4. Serve until asked to stop.
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let mut shutdown = app.shutdown_requested();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let app = Arc::clone(&app);
                tokio::spawn(async move {
                    let service = service_fn(move |request| api::handle(Arc::clone(&app), request));
                    let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        tracing::debug!(
                            client.addr = %peer,
                            error = %e,
                            "connection ended with an error",
                        );
                    }
                });
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = shutdown.wait_for(|requested| *requested) => break,
        }
    }

    // 5. Drain: refuse new work, let the running intent finish or cancel it, take a last
    //    snapshot. Journal envelopes are fsynced as they are written, so the snapshot that
    //    follows holds the intent's final envelope.
    tracing::info!("matrixd draining");
    app.start_draining();
    drop(listener);
    if !wait_idle(&app, config.drain_timeout).await {
        tracing::warn!(
            drain.timeout_secs = config.drain_timeout.as_secs(),
            "an intent was still running at the end of the drain; cancelling it"
        );
        app.cancel_running();
        if !wait_idle(&app, CANCEL_TIMEOUT).await {
            tracing::error!("the running intent did not record its cancellation");
        }
    }
    if let Some(task) = snapshots {
        task.abort();
    }
    if let Some(store) = &store {
        push_once(&app.data, store, config.snapshot_keep).await;
    }
    tracing::info!("matrixd stopped");
    Ok(())
}

/// Finishes an interrupted restore and lays out the volume; the data lock's holder's job.
fn prepare(data: &DataDir) -> Result<(), ServeError> {
    restore::recover(data)?;
    data.ensure_layout()?;
    Ok(())
}

/// The front door prepares the volume only while no executor holds it: a running executor
/// did so under the lock, and two processes finishing one restore would trip each other.
fn prepare_unless_held(data: &DataDir) -> Result<(), ServeError> {
    match datalock::try_acquire(data) {
        Ok(_lock) => prepare(data),
        Err(LockError::Held { .. }) => {
            tracing::debug!("the executor holds the data directory and has prepared it");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits up to `timeout` for no intent to be running; whether none is.
async fn wait_idle(app: &App, timeout: Duration) -> bool {
    wait_until_idle(|| app.is_busy(), timeout).await
}

async fn wait_until_idle(is_busy: impl Fn() -> bool, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while is_busy() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !is_busy()
}

/// `matrixd executor`: dual mode's intents and snapshots, until SIGTERM or SIGINT; then it
/// drains as `serve` does: no new intent, the running one finishes or is cancelled, a last
/// snapshot.
pub async fn run_executor(config: &Config) -> Result<(), ServeError> {
    // 1. Everything that can fail on bad config fails before the socket is bound. A
    //    previous executor still draining holds the volume: wait for it before touching the
    //    socket or the journal.
    let data = DataDir::new(&config.data_dir);
    let _writer = datalock::acquire(&data).await?;
    prepare(&data)?;
    let store = match &config.s3 {
        Some(s3) => Some(SnapshotStore::new(s3, config.user_id)?),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;

    // 2. Listen for the front door.
    let journal = Journal::new(data.journal(), data.signing_key()?);
    let relay = Relay::new();
    let runner = Runner::new(
        journal,
        ModelClient::new(&config.model),
        Transcript::new(data.clone()),
        relay.clone(),
    );
    let (executor, listener) = Executor::start(runner, relay, link::socket_path(&data))?;
    let serving = tokio::spawn(Arc::clone(&executor).serve(listener));
    tracing::info!(
        pid = std::process::id(),
        snapshots = store.is_some(),
        "matrixd executor started"
    );

    // 3. Background snapshots.
    let work = async {
        match (&store, config.snapshot_interval) {
            (Some(store), Some(interval)) => {
                snapshot_loop(data.clone(), store.clone(), config.snapshot_keep, interval).await
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        () = work => {}
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }

    // 4. Drain.
    tracing::info!("matrixd executor draining");
    executor.start_draining();
    let runner = executor.runner();
    if !wait_until_idle(|| runner.is_busy(), config.drain_timeout).await {
        tracing::warn!(
            drain.timeout_secs = config.drain_timeout.as_secs(),
            "an intent was still running at the end of the drain; cancelling it"
        );
        runner.cancel();
        if !wait_until_idle(|| runner.is_busy(), CANCEL_TIMEOUT).await {
            tracing::error!("the running intent did not record its cancellation");
        }
    }
    serving.abort();
    executor.close().await;
    if let Some(store) = &store {
        push_once(&data, store, config.snapshot_keep).await;
    }
    tracing::info!("matrixd executor stopped");
    Ok(())
}

async fn snapshot_loop(data: DataDir, store: SnapshotStore, keep: usize, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    // After a suspend (SIGSTOP) one push catches up; missed ticks are not replayed.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // Remembers the tree's metadata at the last snapshot, so an unchanged tree is not read.
    let mut changes = snapshot::ChangeCheck::default();
    loop {
        ticker.tick().await;
        // A task of its own, so that aborting this loop at shutdown never stops a push
        // between claiming a generation and recording it; the shutdown push waits for it.
        let (data, store, mut moved) = (data.clone(), store.clone(), std::mem::take(&mut changes));
        let push = tokio::spawn(async move {
            let pushed = snapshot::push_with(&data, &store, keep, &mut moved).await;
            (pushed, moved)
        });
        match push.await {
            Ok((pushed, kept)) => {
                changes = kept;
                log_push(pushed);
            }
            Err(e) => tracing::warn!(error = %e, "snapshot push task failed"),
        }
    }
}

async fn push_once(data: &DataDir, store: &SnapshotStore, keep: usize) {
    log_push(snapshot::push(data, store, keep).await);
}

fn log_push(pushed: Result<PushOutcome, snapshot::SnapshotError>) {
    match pushed {
        Ok(PushOutcome::Pushed { generation, size }) => {
            tracing::debug!(generation, size, "periodic snapshot pushed");
        }
        Ok(PushOutcome::Unchanged { .. }) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "snapshot push failed")
        }
    }
}
