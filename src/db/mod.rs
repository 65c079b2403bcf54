//! The connection pool, embedded migrations, and the row types.
//!
//! Everything speaks PostgreSQL through diesel-async (tokio-postgres underneath): no libpq is
//! linked anywhere, migrations included. Nothing here holds a transaction across an await on
//! anything but the database itself.

pub mod catalog;
pub mod migrate;
pub mod mode;
pub mod models;
pub mod preflight;
pub mod rate_budget;
pub mod schema;

pub use migrate::{MigrateOptions, Outcome, Plan, SchemaState};
pub use mode::DatabaseMode;

use crate::secret::Secret;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::RunQueryDsl;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::bb8;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use futures::FutureExt;
use std::time::Duration;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type Pool = bb8::Pool<AsyncPgConnection>;
pub type PooledConn<'a> = bb8::PooledConnection<'a, AsyncPgConnection>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unreachable: {0}")]
    Connect(String),
    #[error("no database connection available: {0}")]
    Pool(String),
    #[error("database error: {0}")]
    Query(#[from] DieselError),
    #[error("migration failed: {0}")]
    Migration(String),
    /// The preflight found a schema that does not fit or rows that would violate a new
    /// constraint; nothing was changed. The report names them.
    #[error("migrate {0}")]
    Refused(preflight::Report),
    /// A newer release migrated this database; this binary must not migrate it.
    #[error("refusing to migrate: the database is {0}")]
    SchemaAhead(String),
}

impl From<bb8::RunError> for DbError {
    fn from(e: bb8::RunError) -> Self {
        DbError::Pool(e.to_string())
    }
}

impl DbError {
    /// A unique violation (23505), which our queue treats as "lost a race, try again".
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            DbError::Query(DieselError::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                _
            ))
        )
    }
}

/// Opens one connection, with a deadline, so that a wrong URL or a stopped server is one clear
/// error instead of a pool retrying in the background.
pub async fn establish(url: &Secret, timeout: Duration) -> Result<AsyncPgConnection, DbError> {
    match tokio::time::timeout(timeout, AsyncPgConnection::establish(url.expose())).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(DbError::Connect(connect_failure_detail(url, e).await)),
        Err(_) => Err(DbError::Connect(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// diesel-async flattens the connect error to its first line ("error connecting to server");
/// one more attempt through tokio-postgres gives the cause ("Connection refused") for the
/// operator. Neither message contains the password.
async fn connect_failure_detail(url: &Secret, e: diesel::ConnectionError) -> String {
    let Ok(config) = url.expose().parse::<tokio_postgres::Config>() else {
        return e.to_string();
    };
    match config.connect(tokio_postgres::NoTls).await {
        Err(detailed) => error_chain(&detailed),
        Ok(_) => e.to_string(),
    }
}

/// An error and its sources on one line ("error connecting to server: Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// Checks that the database answers, then builds the pool.
pub async fn connect(url: &Secret, size: u32, timeout: Duration) -> Result<Pool, DbError> {
    drop(establish(url, timeout).await?);
    let mut config = ManagerConfig::<AsyncPgConnection>::default();
    config.custom_setup = Box::new(|url| {
        async move {
            let mut conn = AsyncPgConnection::establish(url).await?;
            // Our writes are announced by the queue's coalescing notifier after commit, not by
            // the triggers inside the transaction (see the migration for why).
            diesel::sql_query("SET provisiond.defer_notify = on")
                .execute(&mut conn)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        }
        .boxed()
    });
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url.expose(), config);
    bb8::Pool::builder()
        .max_size(size)
        // bb8 would otherwise run a query on every checkout, doubling our round trips; a broken
        // connection is detected on return (`is_broken`) and replaced instead.
        .test_on_check_out(false)
        .connection_timeout(timeout)
        .build(manager)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))
}

/// Applies pending migrations (one transaction, after the preflight); returns the versions
/// applied. Refuses when a newer release migrated the database.
pub async fn migrate(url: &Secret, timeout: Duration) -> Result<Vec<String>, DbError> {
    match migrate_with(url, timeout, MigrateOptions::default()).await? {
        Outcome::Applied(v) => Ok(v),
        Outcome::Planned(_) => unreachable!("not a dry run"),
    }
}

/// [`migrate`] with options: a dry run returns the plan and changes nothing.
pub async fn migrate_with(
    url: &Secret,
    timeout: Duration,
    opts: MigrateOptions,
) -> Result<Outcome, DbError> {
    let conn = establish(url, timeout).await?;
    run_blocking_harness(conn, move |h| migrate::run(h, &opts)).await
}

/// Reverts every migration in one transaction (used by tests to prove the down migrations
/// work); refused on a database whose seed tables the web app made.
pub async fn revert_all(url: &Secret, timeout: Duration) -> Result<Vec<String>, DbError> {
    let conn = establish(url, timeout).await?;
    run_blocking_harness(conn, migrate::revert_all).await
}

/// Where the database stands against this binary's migrations. Read-only.
pub async fn schema_state(url: &Secret, timeout: Duration) -> Result<SchemaState, DbError> {
    let conn = establish(url, timeout).await?;
    run_blocking_harness(conn, migrate::schema_state).await
}

/// Whether migrations of this binary are pending (readiness reports this). A database a newer
/// release migrated has none pending: an older daemon keeps serving during a rolling upgrade.
pub async fn pending_migrations(url: &Secret, timeout: Duration) -> Result<bool, DbError> {
    Ok(!schema_state(url, timeout).await?.pending.is_empty())
}

async fn run_blocking_harness<T: Send + 'static>(
    conn: AsyncPgConnection,
    f: impl FnOnce(&mut migrate::Harness) -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    // diesel_migrations is synchronous; the wrapper blocks on the async connection, which must
    // happen off the async worker threads.
    tokio::task::spawn_blocking(move || {
        let mut harness: migrate::Harness = AsyncConnectionWrapper::from(conn);
        f(&mut harness)
    })
    .await
    .map_err(|e| DbError::Migration(format!("migration task failed: {e}")))?
}
