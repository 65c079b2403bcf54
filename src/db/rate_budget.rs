//! The Hetzner request budget of one project, kept in PostgreSQL so that every daemon on the
//! database shares it (table `hetzner_rate_budgets`, GCRA state; the migration explains the
//! arithmetic).
//!
//! Each statement is one short autocommit UPDATE on the project's row: the row lock orders
//! concurrent reservations, nothing is held across the HTTP call the reservation is for, and
//! the times come from the database's clock (`clock_timestamp()`), so daemons whose clocks
//! differ still agree. It knows nothing about HTTP; `clients::rate_budget` decides what to do
//! with the answers.

use super::Pool;
use crate::clients::rate_budget::{SharedBucket, SharedBudgetStore};
use diesel::QueryableByName;
use diesel::sql_types::{Double, Nullable, Text};
use diesel_async::RunQueryDsl;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::time::Duration;

/// One project's shared bucket.
#[derive(Clone)]
pub struct PgRateBudget {
    pool: Pool,
    project: String,
}

impl std::fmt::Debug for PgRateBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRateBudget")
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

#[derive(QueryableByName)]
struct BucketRow {
    #[diesel(sql_type = Double)]
    wait_secs: f64,
    #[diesel(sql_type = Double)]
    tokens: f64,
    #[diesel(sql_type = Double)]
    limit_per_hour: f64,
    #[diesel(sql_type = Double)]
    capacity: f64,
}

// `now` is read once per statement; the interval between requests is 3600 / limit seconds.
// RETURNING sees the row as updated: for a reservation, `tat` is already one interval on, so the
// slot it took begins at tat - capacity * interval.
const RETURNING: &str = "\
RETURNING greatest(0, extract(epoch FROM b.tat - now.t) - b.capacity * 3600.0 / b.limit_per_hour)
              ::float8 AS wait_secs,
          (b.capacity - greatest(0, extract(epoch FROM b.tat - now.t)) * b.limit_per_hour / 3600.0)
              ::float8 AS tokens,
          b.limit_per_hour, b.capacity";

fn reserve_sql() -> String {
    format!(
        "WITH now AS (SELECT clock_timestamp() AS t)
UPDATE hetzner_rate_budgets b
SET tat = greatest(b.tat, now.t) + 3600.0 / b.limit_per_hour * interval '1 second',
    updated_at = now.t
FROM now WHERE b.project = $1
{RETURNING}"
    )
}

// The first `remaining` replaces the initial guess; later ones only ever lower our count (the
// API's bucket is the truth, and a response to an earlier request may arrive late). The capacity
// grows to the largest `remaining + 1` seen, up to the hourly limit; `tat` moves on by the same
// amount so that a larger bucket does not by itself hand out tokens.
fn observe_sql() -> String {
    format!(
        "WITH now AS (SELECT clock_timestamp() AS t),
new AS (
    SELECT b.project, coalesce($2, b.limit_per_hour) AS lim,
           CASE WHEN $3 IS NULL THEN b.capacity
                ELSE greatest(1, least(greatest(b.capacity, $3 + 1), coalesce($2, b.limit_per_hour)))
           END AS cap
    FROM hetzner_rate_budgets b WHERE b.project = $1
)
UPDATE hetzner_rate_budgets b
SET limit_per_hour = new.lim, capacity = new.cap,
    tat = CASE WHEN $3 IS NULL THEN b.tat
               WHEN NOT b.observed
                    THEN now.t + (new.cap - $3) * 3600.0 / new.lim * interval '1 second'
               ELSE greatest(greatest(b.tat, now.t)
                                 + (new.cap - b.capacity) * 3600.0 / new.lim * interval '1 second',
                             now.t + (new.cap - $3) * 3600.0 / new.lim * interval '1 second')
          END,
    observed = b.observed OR $3 IS NOT NULL,
    updated_at = now.t
FROM now, new WHERE b.project = new.project
{RETURNING}"
    )
}

// Empty: the next reservation waits one interval (one token's refill), not for a full bucket.
fn rate_limited_sql() -> String {
    format!(
        "WITH now AS (SELECT clock_timestamp() AS t)
UPDATE hetzner_rate_budgets b
SET tat = greatest(b.tat, now.t + b.capacity * 3600.0 / b.limit_per_hour * interval '1 second'),
    rate_limited = b.rate_limited + 1, observed = true, updated_at = now.t
FROM now WHERE b.project = $1
{RETURNING}"
    )
}

impl PgRateBudget {
    /// The bucket of `project`, created (empty of history, one request at a time) if no daemon
    /// has used it yet.
    pub async fn open(pool: Pool, project: &str) -> Result<PgRateBudget, super::DbError> {
        let mut conn = pool.get().await?;
        diesel::sql_query(
            "INSERT INTO hetzner_rate_budgets (project) VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(project)
        .execute(&mut conn)
        .await?;
        drop(conn);
        Ok(PgRateBudget {
            pool,
            project: project.to_owned(),
        })
    }

    async fn run(
        &self,
        sql: String,
        limit: Option<f64>,
        remaining: Option<f64>,
    ) -> Result<SharedBucket, String> {
        let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
        let q = diesel::sql_query(sql).bind::<Text, _>(&self.project);
        let rows: Vec<BucketRow> = if limit.is_some() || remaining.is_some() {
            q.bind::<Nullable<Double>, _>(limit)
                .bind::<Nullable<Double>, _>(remaining)
                .load(&mut conn)
                .await
        } else {
            q.load(&mut conn).await
        }
        .map_err(|e| e.to_string())?;
        let row = rows.into_iter().next().ok_or_else(|| {
            format!(
                "no rate budget row for project {:?} (deleted while running?)",
                self.project
            )
        })?;
        Ok(SharedBucket {
            wait: Duration::try_from_secs_f64(row.wait_secs).unwrap_or(Duration::ZERO),
            tokens: row.tokens,
            limit_per_hour: row.limit_per_hour,
            capacity: row.capacity,
        })
    }
}

impl SharedBudgetStore for PgRateBudget {
    fn reserve(&self) -> BoxFuture<'_, Result<SharedBucket, String>> {
        self.run(reserve_sql(), None, None).boxed()
    }

    fn observe(
        &self,
        limit: Option<u64>,
        remaining: Option<u64>,
    ) -> BoxFuture<'_, Result<SharedBucket, String>> {
        let limit = limit.filter(|l| *l > 0).map(|l| l as f64);
        let remaining = remaining.map(|r| r as f64);
        async move {
            if limit.is_none() && remaining.is_none() {
                return self.run(read_sql(), None, None).await;
            }
            self.run(observe_sql(), limit, remaining).await
        }
        .boxed()
    }

    fn rate_limited(&self) -> BoxFuture<'_, Result<SharedBucket, String>> {
        self.run(rate_limited_sql(), None, None).boxed()
    }
}

/// Reads the bucket without changing it (an observe with no headers).
fn read_sql() -> String {
    format!(
        "WITH now AS (SELECT clock_timestamp() AS t)
UPDATE hetzner_rate_budgets b SET updated_at = b.updated_at
FROM now WHERE b.project = $1
{RETURNING}"
    )
}
