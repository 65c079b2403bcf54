//! The migration runner: every pending migration in one transaction, after a preflight, with the
//! helpers migrations call (`pg_temp.ensure_*`), under a lock timeout; or the same run rolled
//! back, as a plan (`migrate --dry-run`). Also: where the database stands against this binary's
//! migrations (pending, or migrated by a newer release).
//!
//! Why one transaction: on the web app's database, `migrate` either adopts the schema entirely or
//! changes nothing (a violation found by PostgreSQL itself, or a lock not granted, rolls back the
//! migrations that ran before it too). Why a lock timeout: an `ALTER TABLE` waiting behind a long
//! web app transaction would queue every later query on that table behind itself; giving up
//! after a few seconds (and changing nothing) is better than stalling the web app.
//!
//! Must not: run a migration outside a transaction (docs/MIGRATIONS.md says why none needs to),
//! or run anything when the database knows migrations this binary does not.

use super::catalog::{self, Diff};
use super::preflight::{self, Report};
use super::{DbError, MIGRATIONS};
use diesel::connection::SimpleConnection;
use diesel::migration::{Migration, MigrationSource};
use diesel::pg::Pg;
use diesel::sql_types::Text;
use diesel::{Connection, QueryableByName, RunQueryDsl};
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::MigrationHarness;
use std::fmt;
use std::time::Duration;

pub type Harness = AsyncConnectionWrapper<AsyncPgConnection>;

/// The helper functions migrations call, installed for the migration transaction only.
const HELPERS: &str = include_str!("migration_helpers.sql");

/// How long a migration waits for a lock before it gives up (and changes nothing).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Run everything, describe what changed, roll back.
    pub dry_run: bool,
    pub lock_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            dry_run: false,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }
}

/// Where the database stands against this binary's migrations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaState {
    /// This binary's migrations the database has not run (versions).
    pub pending: Vec<String>,
    /// Migrations the database ran that this binary does not know: a newer release migrated it.
    pub unknown: Vec<String>,
    /// Applied migrations (versions), oldest first.
    pub applied: Vec<String>,
}

impl SchemaState {
    /// A newer release migrated this database (a rolling upgrade in progress, or this binary is
    /// older than the database).
    pub fn ahead(&self) -> bool {
        !self.unknown.is_empty()
    }

    /// One line for logs and `check-config`.
    pub fn describe(&self) -> String {
        match (self.pending.is_empty(), self.unknown.is_empty()) {
            (true, true) => "up to date".into(),
            (false, true) => format!(
                "pending (run `provisiond migrate`): {}",
                self.pending.join(", ")
            ),
            (true, false) => format!(
                "migrated past this binary by a newer release (unknown: {}); this binary runs as \
                 an older release during a rolling upgrade, and must not run `migrate`",
                self.unknown.join(", ")
            ),
            (false, false) => format!(
                "diverged: the database has migrations this binary does not know ({}) and lacks \
                 ones it needs ({})",
                self.unknown.join(", "),
                self.pending.join(", ")
            ),
        }
    }
}

/// What a dry run found: what the migrations would do, without doing it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Migration names (`2026-11-22-000001_provisioning_queue`) that would run, in order.
    pub migrations: Vec<String>,
    /// The seed's objects found before the first migration (empty: nothing to adopt).
    pub adopting: Vec<String>,
    pub diff: Diff,
    pub lock_timeout: Duration,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dry run: nothing was changed (the migrations ran in a transaction that was rolled back)."
        )?;
        if self.migrations.is_empty() {
            return writeln!(f, "migrations: up to date; nothing to do");
        }
        writeln!(f, "would apply, in one transaction:")?;
        for m in &self.migrations {
            writeln!(f, "  {m}")?;
        }
        if !self.adopting.is_empty() {
            writeln!(
                f,
                "adopting the web app's {} (kept with their rows; only additions below)",
                self.adopting.join(", ")
            )?;
        }
        writeln!(f, "preflight: no conflicting schema, no offending rows")?;
        writeln!(f, "would add ({}):", self.diff.added.len())?;
        for l in &self.diff.added {
            writeln!(f, "  + {l}")?;
        }
        if !self.diff.changed.is_empty() {
            writeln!(f, "would change ({}):", self.diff.changed.len())?;
            for (before, after) in &self.diff.changed {
                writeln!(f, "  - {before}\n  + {after}")?;
            }
        }
        if !self.diff.removed.is_empty() {
            writeln!(
                f,
                "WOULD REMOVE ({}) — a migration must not remove anything (docs/MIGRATIONS.md):",
                self.diff.removed.len()
            )?;
            for l in &self.diff.removed {
                writeln!(f, "  - {l}")?;
            }
        }
        writeln!(
            f,
            "locks: each table altered is locked until the transaction commits; a lock not \
             granted within {} aborts the run and changes nothing",
            humantime::format_duration(self.lock_timeout)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The migrations applied (versions), in order; empty when up to date.
    Applied(Vec<String>),
    Planned(Plan),
}

/// Why the migration transaction ended without committing.
enum Abort {
    Db(diesel::result::Error),
    Refused(Box<Report>),
    Failed(String),
    Planned(Box<Plan>),
}

impl From<diesel::result::Error> for Abort {
    fn from(e: diesel::result::Error) -> Self {
        Abort::Db(e)
    }
}

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

fn embedded() -> Result<Vec<Box<dyn Migration<Pg>>>, DbError> {
    MigrationSource::<Pg>::migrations(&MIGRATIONS).map_err(|e| DbError::Migration(e.to_string()))
}

/// Reads where the database stands. Read-only: a database never migrated has nothing applied.
pub fn schema_state(conn: &mut Harness) -> Result<SchemaState, DbError> {
    let applied: Vec<String> = if preflight::table_exists(conn, "__diesel_schema_migrations")? {
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations ORDER BY version")
            .load::<Version>(conn)?
            .into_iter()
            .map(|v| v.version)
            .collect()
    } else {
        Vec::new()
    };
    let ours: Vec<String> = embedded()?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    Ok(SchemaState {
        pending: ours
            .iter()
            .filter(|v| !applied.contains(v))
            .cloned()
            .collect(),
        unknown: applied
            .iter()
            .filter(|v| !ours.contains(v))
            .cloned()
            .collect(),
        applied,
    })
}

fn snapshot(conn: &mut Harness) -> diesel::QueryResult<Vec<String>> {
    Ok(diesel::sql_query(catalog::SNAPSHOT_SQL)
        .load::<catalog::Line>(conn)?
        .into_iter()
        .map(|l| l.line)
        .collect())
}

/// Runs (or plans) the pending migrations: refuses when a newer release migrated the database,
/// checks the preflight, then applies all of them in one transaction.
pub fn run(conn: &mut Harness, opts: &MigrateOptions) -> Result<Outcome, DbError> {
    let state = schema_state(conn)?;
    if state.ahead() {
        return Err(DbError::SchemaAhead(state.describe()));
    }
    if state.pending.is_empty() {
        return Ok(if opts.dry_run {
            Outcome::Planned(Plan {
                lock_timeout: opts.lock_timeout,
                ..Plan::default()
            })
        } else {
            Outcome::Applied(Vec::new())
        });
    }
    let names: Vec<String> = embedded()?
        .iter()
        .filter(|m| state.pending.contains(&m.name().version().to_string()))
        .map(|m| m.name().to_string())
        .collect();
    let result = conn.transaction::<Vec<String>, Abort, _>(|conn| {
        // The lock timeout and the helpers last as long as this transaction.
        conn.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            opts.lock_timeout.as_millis()
        ))?;
        conn.batch_execute(HELPERS)?;
        let report = preflight::check(conn, &state.pending)?;
        if !report.is_empty() {
            return Err(Abort::Refused(Box::new(report)));
        }
        let adopting = if state.applied.is_empty() {
            preflight::adopting(conn)?
        } else {
            Vec::new()
        };
        let before = snapshot(conn)?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| Abort::Failed(e.to_string()))?
            .iter()
            .map(ToString::to_string)
            .collect();
        if opts.dry_run {
            let after = snapshot(conn)?;
            return Err(Abort::Planned(Box::new(Plan {
                migrations: names.clone(),
                adopting,
                diff: Diff::between(&before, &after),
                lock_timeout: opts.lock_timeout,
            })));
        }
        Ok(applied)
    });
    match result {
        Ok(applied) => Ok(Outcome::Applied(applied)),
        Err(Abort::Planned(plan)) => Ok(Outcome::Planned(*plan)),
        Err(Abort::Refused(report)) => Err(DbError::Refused(*report)),
        Err(Abort::Failed(e)) => Err(DbError::Migration(explain(&e, opts.lock_timeout))),
        Err(Abort::Db(e)) => Err(DbError::Migration(explain(
            &e.to_string(),
            opts.lock_timeout,
        ))),
    }
}

/// Says what a failure means for the operator: always that nothing changed.
fn explain(error: &str, lock_timeout: Duration) -> String {
    if error.contains("lock timeout") {
        format!(
            "{error}: a lock was not granted within {} (a long transaction holds one of the \
             tables); nothing was changed. Run migrate again when it has finished, or with a \
             longer --lock-timeout",
            humantime::format_duration(lock_timeout)
        )
    } else {
        format!("{error} (the whole run was rolled back; nothing was changed)")
    }
}

/// Reverts every migration, in one transaction (tests prove the down migrations; on an adopted
/// database the first migration's down refuses, and so nothing is reverted).
pub fn revert_all(conn: &mut Harness) -> Result<Vec<String>, DbError> {
    let state = schema_state(conn)?;
    if state.ahead() {
        return Err(DbError::SchemaAhead(state.describe()));
    }
    conn.transaction::<_, Abort, _>(|conn| {
        conn.revert_all_migrations(MIGRATIONS)
            .map(|v| v.iter().map(ToString::to_string).collect())
            .map_err(|e| Abort::Failed(e.to_string()))
    })
    .map_err(|e| match e {
        Abort::Db(e) => DbError::Migration(e.to_string()),
        Abort::Failed(e) => DbError::Migration(format!("{e} (nothing was reverted)")),
        Abort::Refused(r) => DbError::Refused(*r),
        Abort::Planned(_) => DbError::Migration("unexpected plan".into()),
    })
}
