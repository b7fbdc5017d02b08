//! User -> machine records in PostgreSQL.
//!
//! Migrations are embedded and applied at start under a session advisory lock, so replicas
//! that start together apply each one once. Provisioning serialises per user with
//! [`Store::lock_user`], an advisory lock held on a dedicated connection. Machine activity is
//! shared between replicas through [`Store::record_activity`] and [`Store::claim_idle`].

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// Embedded migrations, applied in order; the number is the schema version.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_user_machines.sql")),
    (2, include_str!("../migrations/0002_machine_activity.sql")),
    (3, include_str!("../migrations/0003_orphaned_volumes.sql")),
];

/// Advisory lock key for migrations ("matrix-router migrations").
const MIGRATION_LOCK: i64 = 0x6d61_7472_6978_0001;

const POOL_SIZE: usize = 32;

/// Bound on waiting for a user's provisioning lock, which another replica holds while it
/// creates the user's volume and machine.
const PROVISIONING_LOCK_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL")]
    Url(#[source] tokio_postgres::Error),
    #[error("building the connection pool")]
    Pool(#[source] deadpool_postgres::BuildError),
    #[error("getting a database connection")]
    Connect(#[source] deadpool_postgres::PoolError),
    #[error("applying migration {version}")]
    Migrate { version: i32, source: tokio_postgres::Error },
    #[error("{operation}")]
    Query { operation: &'static str, source: tokio_postgres::Error },
    #[error("reading the app's desired image")]
    DesiredImage(#[source] Box<rollout::RolloutError>),
    #[error("database TLS")]
    Tls(#[source] rollout::pg_tls::PgTlsError),
    #[error("{operation}: the database did not answer within {timeout:?}")]
    Timeout { operation: &'static str, timeout: Duration },
}

/// Runs one database operation, failing with [`StoreError::Timeout`] after `timeout`. A query
/// abandoned this way leaves its connection usable: tokio-postgres discards the late answer.
async fn bounded<T>(
    timeout: Duration,
    operation: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| StoreError::Timeout { operation, timeout })?
}

/// A user's machine and volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UserMachine {
    pub user_id: Uuid,
    pub machine_id: String,
    pub volume_id: String,
    pub region: String,
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Bound on one operation, waiting for a connection included.
    timeout: Duration,
}

/// A per-user advisory lock. `release` returns the connection; dropping the guard without it
/// closes the connection, which releases the lock on the server.
pub struct UserLock {
    conn: Option<Object>,
    key: String,
    timeout: Duration,
}

impl Store {
    /// A pool for `url`; no connection is made yet. Every operation but the wait for a
    /// user's provisioning lock (which another replica may hold while it provisions) fails
    /// after `timeout`, so a database that stops answering cannot hold requests forever.
    ///
    /// The URL's `sslmode=require` connects over TLS only, checking the server's certificate
    /// against the Mozilla roots and `root_cert` ([`rollout::pg_tls`]).
    pub fn new(
        url: &str,
        timeout: Duration,
        root_cert: Option<&std::path::Path>,
    ) -> Result<Self, StoreError> {
        let pg_config: tokio_postgres::Config = url.parse().map_err(StoreError::Url)?;
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let tls = rollout::pg_tls::connector(&pg_config, root_cert).map_err(StoreError::Tls)?;
        let manager = match tls {
            Some(tls) => Manager::from_config(pg_config, tls, recycling),
            None => Manager::from_config(pg_config, NoTls, recycling),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(StoreError::Pool)?;
        Ok(Self { pool, timeout })
    }

    async fn conn(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(StoreError::Connect)
    }

    /// Applies every migration not applied yet, under an advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let query = |operation| move |source| StoreError::Query { operation, source };
        conn.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(query("taking the migration lock"))?;
        let result = apply_migrations(&conn).await;
        // Unlock even after a failure; the session ends with the connection anyway.
        let _ = conn.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
        result
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        bounded(self.timeout, "pinging the database", async {
            let conn = self.conn().await?;
            conn.simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(|source| StoreError::Query { operation: "pinging the database", source })
        })
        .await
    }

    pub async fn get(&self, user_id: Uuid) -> Result<Option<UserMachine>, StoreError> {
        bounded(self.timeout, "reading a user's machine", async {
            read_user(&*self.conn().await?, user_id).await
        })
        .await
    }

    pub async fn list(&self) -> Result<Vec<UserMachine>, StoreError> {
        bounded(self.timeout, "listing machines", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT user_id, machine_id, volume_id, region FROM user_machines ORDER BY \
                        created_at",
                    &[],
                )
                .await
                .map_err(|source| StoreError::Query { operation: "listing machines", source })?;
            Ok(rows.iter().map(from_row).collect())
        })
        .await
    }

    /// Records a user's machine; a second insert for the same user keeps the first record.
    pub async fn insert(&self, record: &UserMachine) -> Result<UserMachine, StoreError> {
        bounded(self.timeout, "recording a user's machine", async {
            let conn = self.conn().await?;
            insert_user(&conn, record).await?;
            Ok(read_user(&conn, record.user_id).await?.unwrap_or_else(|| record.clone()))
        })
        .await
    }

    pub async fn delete(&self, user_id: Uuid) -> Result<bool, StoreError> {
        bounded(self.timeout, "deleting a user's machine", async {
            let conn = self.conn().await?;
            let n = conn
                .execute("DELETE FROM user_machines WHERE user_id = $1", &[&user_id])
                .await
                .map_err(|source| StoreError::Query {
                    operation: "deleting a user's machine",
                    source,
                })?;
            Ok(n > 0)
        })
        .await
    }

    /// Waits for the per-user lock that serialises provisioning across replicas, at most
    /// [`PROVISIONING_LOCK_TIMEOUT`]: the holder may be creating the user's machine.
    pub async fn lock_user(&self, user_id: Uuid) -> Result<UserLock, StoreError> {
        let conn = bounded(self.timeout, "getting a database connection", self.conn()).await?;
        let key = format!("matrix-router:user:{user_id}");
        bounded(PROVISIONING_LOCK_TIMEOUT, "locking a user", async {
            conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key])
                .await
                .map_err(|source| StoreError::Query { operation: "locking a user", source })
        })
        .await?;
        Ok(UserLock { conn: Some(conn), key, timeout: self.timeout })
    }
}

impl UserLock {
    /// The user's record, read on the locked connection.
    pub async fn get(&self, user_id: Uuid) -> Result<Option<UserMachine>, StoreError> {
        bounded(self.timeout, "reading a user's machine", async {
            let conn = self.conn.as_ref().expect("lock connection held until release");
            read_user(conn, user_id).await
        })
        .await
    }

    /// Records the user's machine on the locked connection.
    pub async fn insert(&self, record: &UserMachine) -> Result<UserMachine, StoreError> {
        bounded(self.timeout, "recording a user's machine", async {
            let conn = self.conn.as_ref().expect("lock connection held until release");
            insert_user(conn, record).await?;
            Ok(read_user(conn, record.user_id).await?.unwrap_or_else(|| record.clone()))
        })
        .await
    }

    /// The image the last deploy of `app` recorded for new machines, read now on the locked
    /// connection (never cached: a deploy that finished a moment ago applies to the next
    /// machine; and no second connection per provisioning, so the pool cannot run dry).
    ///
    /// Read through `rollout`'s store API rather than by querying its table here: the table's
    /// name and shape stay owned by the crate that migrates them, and its dependencies are the
    /// router's already. Those migrations run on the first deploy: until then the table is
    /// missing, which means no deploy has recorded an image.
    pub async fn desired_image(&self, app: &str) -> Result<Option<String>, StoreError> {
        bounded(self.timeout, "reading the app's desired image", async {
            let conn = self.conn.as_ref().expect("lock connection held until release");
            match rollout::desired_image(conn, app).await {
                Ok(image) => Ok(image),
                Err(e) if is_undefined_table(&e) => Ok(None),
                Err(e) => Err(StoreError::DesiredImage(Box::new(e))),
            }
        })
        .await
    }

    pub async fn release(mut self) {
        let Some(conn) = self.conn.take() else { return };
        let unlocked =
            conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&self.key]).await;
        if unlocked.is_err() {
            // Close the session so the server drops the lock.
            drop(Object::take(conn));
        }
    }
}

impl Drop for UserLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }
}

async fn apply_migrations(conn: &Object) -> Result<(), StoreError> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS router_schema_migrations (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|source| StoreError::Migrate { version: 0, source })?;

    for (version, sql) in MIGRATIONS {
        let applied = conn
            .query_opt("SELECT 1 FROM router_schema_migrations WHERE version = $1", &[version])
            .await
            .map_err(|source| StoreError::Migrate { version: *version, source })?
            .is_some();
        if applied {
            continue;
        }
        let statements = format!(
            "BEGIN; {sql}; INSERT INTO router_schema_migrations (version) VALUES ({version}); \
                COMMIT;"
        );
        if let Err(source) = conn.batch_execute(&statements).await {
            let _ = conn.batch_execute("ROLLBACK").await;
            return Err(StoreError::Migrate { version: *version, source });
        }
        tracing::info!(version, "applied migration");
    }
    Ok(())
}

async fn read_user(
    conn: &tokio_postgres::Client,
    user_id: Uuid,
) -> Result<Option<UserMachine>, StoreError> {
    let row = conn
        .query_opt(
            "SELECT user_id, machine_id, volume_id, region FROM user_machines WHERE user_id = $1",
            &[&user_id],
        )
        .await
        .map_err(|source| StoreError::Query { operation: "reading a user's machine", source })?;
    Ok(row.map(|r| from_row(&r)))
}

async fn insert_user(
    conn: &tokio_postgres::Client,
    record: &UserMachine,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO user_machines (user_id, machine_id, volume_id, region)
         VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) DO NOTHING",
        &[&record.user_id, &record.machine_id, &record.volume_id, &record.region],
    )
    .await
    .map(drop)
    .map_err(|source| StoreError::Query { operation: "recording a user's machine", source })
}

/// What [`Store::claim_idle`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleClaim {
    /// Idle fleet-wide: this replica suspends it, and no other will until it is active again.
    Claimed,
    /// Another replica saw traffic on it within the idle time.
    Busy,
    /// Another replica already suspended it after its last activity.
    AlreadySuspended,
}

impl Store {
    /// Records when machines last saw traffic at this replica: `(machine id, seconds ago)`.
    /// A time never moves back, so a slow replica cannot hide another's newer activity.
    pub async fn record_activity(&self, seen: &[(String, f64)]) -> Result<(), StoreError> {
        bounded(self.timeout, "recording machine activity", async {
            let mut seen = seen.to_vec();
            // One order for every replica, so concurrent upserts cannot deadlock on row locks.
            seen.sort_by(|a, b| a.0.cmp(&b.0));
            let (ids, ages): (Vec<String>, Vec<f64>) = seen.into_iter().unzip();
            let conn = self.conn().await?;
            conn.execute(
                "INSERT INTO machine_activity AS a (machine_id, last_active)
                 SELECT id, now() - make_interval(secs => age)
                 FROM unnest($1::text[], $2::float8[]) AS t(id, age)
                 ON CONFLICT (machine_id) DO UPDATE
                 SET last_active = GREATEST(a.last_active, EXCLUDED.last_active)",
                &[&ids, &ages],
            )
            .await
            .map(drop)
            .map_err(|source| StoreError::Query { operation: "recording machine activity", source })
        })
        .await
    }

    /// Claims the suspend of a machine when no replica recorded traffic on it within `idle`
    /// and nobody suspended it since. The claim is one conditional upsert, so of replicas
    /// that ask at once, at most one gets it.
    pub async fn claim_idle(
        &self,
        machine_id: &str,
        idle: Duration,
    ) -> Result<IdleClaim, StoreError> {
        bounded(self.timeout, "claiming an idle machine", async {
            let query = |operation| move |source| StoreError::Query { operation, source };
            let conn = self.conn().await?;
            let idle_secs = idle.as_secs_f64();
            let claimed = conn
                .query_opt(
                    "INSERT INTO machine_activity AS a (machine_id, last_active, suspended_at)
                     VALUES ($1, now() - make_interval(secs => $2), now())
                     ON CONFLICT (machine_id) DO UPDATE SET suspended_at = now()
                     WHERE a.last_active <= now() - make_interval(secs => $2)
                       AND (a.suspended_at IS NULL OR a.suspended_at < a.last_active)
                     RETURNING machine_id",
                    &[&machine_id, &idle_secs],
                )
                .await
                .map_err(query("claiming an idle machine"))?;
            if claimed.is_some() {
                return Ok(IdleClaim::Claimed);
            }
            let row = conn
                .query_opt(
                    "SELECT suspended_at IS NOT NULL AND suspended_at >= last_active
                     FROM machine_activity WHERE machine_id = $1",
                    &[&machine_id],
                )
                .await
                .map_err(query("reading machine activity"))?;
            Ok(match row.map(|r| r.get::<_, bool>(0)) {
                Some(true) => IdleClaim::AlreadySuspended,
                _ => IdleClaim::Busy,
            })
        })
        .await
    }
}

/// SQLSTATE 42P01: the rollout tables were never created on this database.
fn is_undefined_table(error: &rollout::RolloutError) -> bool {
    matches!(
        error,
        rollout::RolloutError::Database { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    )
}

fn from_row(row: &tokio_postgres::Row) -> UserMachine {
    UserMachine {
        user_id: row.get(0),
        machine_id: row.get(1),
        volume_id: row.get(2),
        region: row.get(3),
    }
}

/// A volume a deprovision left behind, waiting for the sweep.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OrphanedVolume {
    pub volume_id: String,
    pub machine_id: String,
    pub user_id: Uuid,
    pub attempts: i32,
}

impl Store {
    /// Records a volume the deprovision of `user_id` could not delete. Recording it twice
    /// keeps the first record.
    pub async fn record_orphaned_volume(
        &self,
        volume_id: &str,
        machine_id: &str,
        user_id: Uuid,
    ) -> Result<(), StoreError> {
        bounded(self.timeout, "recording an orphaned volume", async {
            let conn = self.conn().await?;
            conn.execute(
                "INSERT INTO orphaned_volumes (volume_id, machine_id, user_id, attempts)
                 VALUES ($1, $2, $3, 1) ON CONFLICT (volume_id) DO NOTHING",
                &[&volume_id, &machine_id, &user_id],
            )
            .await
            .map(drop)
            .map_err(|source| StoreError::Query {
                operation: "recording an orphaned volume",
                source,
            })
        })
        .await
    }

    /// Up to `limit` orphaned volumes, the least recently tried first.
    pub async fn orphaned_volumes(&self, limit: i64) -> Result<Vec<OrphanedVolume>, StoreError> {
        bounded(self.timeout, "listing orphaned volumes", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT volume_id, machine_id, user_id, attempts FROM orphaned_volumes
                     ORDER BY last_tried_at LIMIT $1",
                    &[&limit],
                )
                .await
                .map_err(|source| StoreError::Query {
                    operation: "listing orphaned volumes",
                    source,
                })?;
            Ok(rows
                .iter()
                .map(|row| OrphanedVolume {
                    volume_id: row.get(0),
                    machine_id: row.get(1),
                    user_id: row.get(2),
                    attempts: row.get(3),
                })
                .collect())
        })
        .await
    }

    /// The volume is gone: forget it.
    pub async fn forget_orphaned_volume(&self, volume_id: &str) -> Result<(), StoreError> {
        bounded(self.timeout, "forgetting an orphaned volume", async {
            let conn = self.conn().await?;
            conn.execute("DELETE FROM orphaned_volumes WHERE volume_id = $1", &[&volume_id])
                .await
                .map(drop)
                .map_err(|source| StoreError::Query {
                    operation: "forgetting an orphaned volume",
                    source,
                })
        })
        .await
    }

    /// One more failed delete of an orphaned volume.
    pub async fn orphaned_volume_failed(&self, volume_id: &str) -> Result<(), StoreError> {
        bounded(self.timeout, "recording a failed volume delete", async {
            let conn = self.conn().await?;
            conn.execute(
                "UPDATE orphaned_volumes SET attempts = attempts + 1, last_tried_at = now()
                 WHERE volume_id = $1",
                &[&volume_id],
            )
            .await
            .map(drop)
            .map_err(|source| StoreError::Query {
                operation: "recording a failed volume delete",
                source,
            })
        })
        .await
    }
}
