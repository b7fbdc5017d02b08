//! Rollout progress in PostgreSQL: runs, the machines each run touches, and the image
//! each app should run. Every table is prefixed `rollout_`.

use tokio_postgres::{Client, NoTls, Row};

use crate::pg_tls;
use uuid::Uuid;

use crate::plan::Plan;
use crate::RolloutError;

/// Embedded migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_rollout.sql"))];

/// The advisory lock key that serialises migrations ("rollout" in ASCII).
const MIGRATION_LOCK: i64 = 0x0072_6f6c_6c6f_7574;

/// A machine's row in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRecord {
    pub machine_id: String,
    pub wave: usize,
    pub previous_image: String,
    pub previous_version: String,
    pub was_running: bool,
    pub status: MachineStatus,
    pub new_version: Option<String>,
    pub detail: Option<String>,
}

/// Where a machine is in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineStatus {
    Pending,
    /// The update may have been sent: a resume looks at the machine before sending again.
    Updating,
    Updated,
    Failed,
    /// Left untouched: someone else held its lease.
    Skipped,
    RolledBack,
    RollbackFailed,
}

impl MachineStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineStatus::Pending => "pending",
            MachineStatus::Updating => "updating",
            MachineStatus::Updated => "updated",
            MachineStatus::Failed => "failed",
            MachineStatus::Skipped => "skipped",
            MachineStatus::RolledBack => "rolled_back",
            MachineStatus::RollbackFailed => "rollback_failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "updating" => MachineStatus::Updating,
            "updated" => MachineStatus::Updated,
            "failed" => MachineStatus::Failed,
            "skipped" => MachineStatus::Skipped,
            "rolled_back" => MachineStatus::RolledBack,
            "rollback_failed" => MachineStatus::RollbackFailed,
            _ => MachineStatus::Pending,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Succeeded,
    RolledBack,
    Failed,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::RolledBack => "rolled_back",
            RunStatus::Failed => "failed",
        }
    }
}

/// An unfinished run found in the database.
#[derive(Debug, Clone)]
pub struct ActiveRun {
    pub id: Uuid,
    pub image: String,
    pub previous_desired_image: Option<String>,
    pub machines: Vec<MachineRecord>,
}

/// A connection to the rollout tables.
pub struct Store {
    client: Client,
    /// Whether the rollout tables exist (always after [`Store::connect`]).
    schema: bool,
    _connection: tokio::task::JoinHandle<()>,
}

impl Store {
    /// Connects to `url` and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, RolloutError> {
        let mut store = Self::open(url).await?;
        store.migrate().await?;
        store.schema = true;
        Ok(store)
    }

    /// Connects to `url` for reading only (what `--dry-run` uses): no migration runs, the
    /// session refuses every write, and when the rollout tables do not exist there is
    /// simply no unfinished run and no desired image.
    pub async fn connect_read_only(url: &str) -> Result<Self, RolloutError> {
        let mut store = Self::open(url).await?;
        store
            .client
            .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            .await
            .map_err(db("make the session read-only"))?;
        let row = store
            .client
            .query_one(
                "SELECT to_regclass('rollout_runs') IS NOT NULL
                    AND to_regclass('rollout_machines') IS NOT NULL
                    AND to_regclass('rollout_desired_images') IS NOT NULL",
                &[],
            )
            .await
            .map_err(db("look for the rollout tables"))?;
        store.schema = row.get(0);
        Ok(store)
    }

    /// Checks that `url` is a PostgreSQL connection string, without connecting.
    pub fn check_url(url: &str) -> Result<(), tokio_postgres::Error> {
        url.parse::<tokio_postgres::Config>().map(drop)
    }

    /// Connects over TLS when the URL's `sslmode` is `require` ([`crate::pg_tls`]), trusting
    /// the certificates in `PGSSLROOTCERT` too, as libpq does.
    async fn open(url: &str) -> Result<Self, RolloutError> {
        let config: tokio_postgres::Config = url.parse().map_err(db("read the database URL"))?;
        let root_cert = std::env::var_os(pg_tls::PGSSLROOTCERT).map(std::path::PathBuf::from);
        let tls =
            pg_tls::connector(&config, root_cert.as_deref()).map_err(RolloutError::DatabaseTls)?;
        let connect = db("connect to the database");
        let (client, task) = match tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls).await.map_err(connect)?;
                (client, tokio::spawn(drive(connection)))
            }
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(connect)?;
                (client, tokio::spawn(drive(connection)))
            }
        };
        Ok(Self { client, schema: false, _connection: task })
    }

    async fn migrate(&mut self) -> Result<(), RolloutError> {
        self.client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS rollout_schema_migrations (
                     version INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await
            .map_err(db("create the migrations table"))?;
        for (version, sql) in MIGRATIONS {
            // One transaction per migration; the lock keeps two deploys from racing.
            let tx = self.client.transaction().await.map_err(db("begin a migration"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db("lock the migrations"))?;
            let applied = tx
                .query_opt("SELECT 1 FROM rollout_schema_migrations WHERE version = $1", &[version])
                .await
                .map_err(db("read the applied migrations"))?;
            if applied.is_none() {
                tx.batch_execute(sql).await.map_err(db("apply a migration"))?;
                tx.execute(
                    "INSERT INTO rollout_schema_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await
                .map_err(db("record a migration"))?;
            }
            tx.commit().await.map_err(db("commit a migration"))?;
        }
        Ok(())
    }

    /// Takes the app's deploy lock for as long as this connection lives; false when
    /// another deploy holds it. A killed deploy loses its connection, and so the lock.
    pub async fn try_lock_app(&self, app: &str) -> Result<bool, RolloutError> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock(hashtext('rollout:' || $1))", &[&app])
            .await
            .map_err(db("take the deploy lock"))?;
        Ok(row.get(0))
    }

    /// The app's unfinished run, if there is one.
    pub async fn active_run(&self, app: &str) -> Result<Option<ActiveRun>, RolloutError> {
        if !self.schema {
            return Ok(None);
        }
        let row = self
            .client
            .query_opt(
                "SELECT id, image, previous_desired_image FROM rollout_runs
                 WHERE app = $1 AND status = 'running'",
                &[&app],
            )
            .await
            .map_err(db("read the running rollout"))?;
        let Some(row) = row else { return Ok(None) };
        let id: Uuid = row.get(0);
        let machines = self.machines(id).await?;
        Ok(Some(ActiveRun { id, image: row.get(1), previous_desired_image: row.get(2), machines }))
    }

    /// The machines of run `id`, in plan order.
    pub async fn machines(&self, id: Uuid) -> Result<Vec<MachineRecord>, RolloutError> {
        let rows = self
            .client
            .query(
                "SELECT machine_id, wave, previous_image, previous_version, was_running, status,
                        new_version, detail
                 FROM rollout_machines WHERE rollout_id = $1 ORDER BY wave, position",
                &[&id],
            )
            .await
            .map_err(db("read the rollout's machines"))?;
        Ok(rows.iter().map(machine_record).collect())
    }

    /// Records a new run and every machine of its plan, all pending.
    pub async fn create_run(&mut self, plan: &Plan) -> Result<Uuid, RolloutError> {
        let id = Uuid::new_v4();
        let previous = self.desired_image(&plan.app).await?;
        let tx = self.client.transaction().await.map_err(db("begin"))?;
        tx.execute(
            "INSERT INTO rollout_runs
                 (id, app, image, canary, batch, status, previous_desired_image)
             VALUES ($1, $2, $3, $4, $5, 'running', $6)",
            &[&id, &plan.app, &plan.image, &(plan.canary as i32), &(plan.batch as i32), &previous],
        )
        .await
        .map_err(db("record the rollout"))?;
        for (wave_index, wave) in plan.waves.iter().enumerate() {
            for (position, machine) in wave.iter().enumerate() {
                tx.execute(
                    "INSERT INTO rollout_machines
                       (rollout_id, machine_id, wave, position, previous_image, previous_version,
                        was_running, status)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending')",
                    &[
                        &id,
                        &machine.id,
                        &(wave_index as i32),
                        &(position as i32),
                        &machine.image,
                        &machine.version,
                        &machine.is_running(),
                    ],
                )
                .await
                .map_err(db("record a planned machine"))?;
            }
        }
        tx.commit().await.map_err(db("commit the plan"))?;
        Ok(id)
    }

    /// Sets a machine's status, with its new version and a detail when known.
    pub async fn mark(
        &self,
        run: Uuid,
        machine: &str,
        status: MachineStatus,
        new_version: Option<&str>,
        detail: Option<&str>,
    ) -> Result<(), RolloutError> {
        self.client
            .execute(
                "UPDATE rollout_machines
                 SET status = $3, new_version = COALESCE($4, new_version), detail = $5,
                     updated_at = now()
                 WHERE rollout_id = $1 AND machine_id = $2",
                &[&run, &machine, &status.as_str(), &new_version, &detail],
            )
            .await
            .map_err(db("record a machine's progress"))?;
        Ok(())
    }

    /// Ends a run.
    pub async fn finish_run(&self, run: Uuid, status: RunStatus) -> Result<(), RolloutError> {
        self.client
            .execute(
                "UPDATE rollout_runs SET status = $2, finished_at = now() WHERE id = $1",
                &[&run, &status.as_str()],
            )
            .await
            .map_err(db("finish the rollout"))?;
        Ok(())
    }

    /// The image new machines of `app` should run, when a rollout set one.
    pub async fn desired_image(&self, app: &str) -> Result<Option<String>, RolloutError> {
        if !self.schema {
            return Ok(None);
        }
        desired_image(&self.client, app).await
    }

    /// Records `image` as what `app`'s machines (present and future) should run.
    pub async fn set_desired_image(
        &self,
        app: &str,
        image: &str,
        run: Uuid,
    ) -> Result<(), RolloutError> {
        self.client
            .execute(
                "INSERT INTO rollout_desired_images (app, image, rollout_id) VALUES ($1, $2, $3)
                 ON CONFLICT (app) DO UPDATE SET image = $2, rollout_id = $3, updated_at = now()",
                &[&app, &image, &run],
            )
            .await
            .map_err(db("record the desired image"))?;
        Ok(())
    }

    /// Puts back the desired image a run replaced (or removes it when there was none).
    pub async fn restore_desired_image(
        &self,
        app: &str,
        previous: Option<&str>,
        run: Uuid,
    ) -> Result<(), RolloutError> {
        match previous {
            Some(image) => self.set_desired_image(app, image, run).await,
            None => {
                self.client
                    .execute(
                        "DELETE FROM rollout_desired_images WHERE app = $1 AND rollout_id = $2",
                        &[&app, &run],
                    )
                    .await
                    .map_err(db("remove the desired image"))?;
                Ok(())
            }
        }
    }
}

/// The image new machines of `app` should run, read with any client of the database
/// (the router calls this when it provisions a machine).
pub async fn desired_image(client: &Client, app: &str) -> Result<Option<String>, RolloutError> {
    let row = client
        .query_opt("SELECT image FROM rollout_desired_images WHERE app = $1", &[&app])
        .await
        .map_err(db("read the desired image"))?;
    Ok(row.map(|r| r.get(0)))
}

fn machine_record(row: &Row) -> MachineRecord {
    let wave: i32 = row.get(1);
    MachineRecord {
        machine_id: row.get(0),
        wave: wave as usize,
        previous_image: row.get(2),
        previous_version: row.get(3),
        was_running: row.get(4),
        status: MachineStatus::parse(row.get(5)),
        new_version: row.get(6),
        detail: row.get(7),
    }
}

/// Runs a connection until it ends, saying why when it fails.
async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(error) = connection.await {
        tracing::warn!(%error, "rollout database connection ended");
    }
}

fn db(op: &'static str) -> impl Fn(tokio_postgres::Error) -> RolloutError {
    move |source| RolloutError::Database { op, source }
}
