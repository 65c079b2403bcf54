//! What must hold before the pending migrations run, checked inside the migration transaction
//! before any DDL: the shape of tables the web app already made (when the first migration adopts
//! them), and existing rows that would violate a constraint or unique index a pending migration
//! adds. A finding stops `migrate` with a report naming the offending rows; nothing is changed.
//!
//! Must not write. Every query here reads the catalog or the web app's rows, and tolerates a
//! missing table (an empty database has none).
//!
//! Adding a constraint in a future migration: add a [`RowCheck`] for it here, keyed by that
//! migration's version, so that existing rows that violate it are reported by id instead of
//! failing the DDL with PostgreSQL's one-line message (docs/MIGRATIONS.md).

use diesel::QueryableByName;
use diesel::RunQueryDsl;
use diesel::sql_types::{BigInt, Bool, Text};
use std::fmt;

/// The migration that creates (or adopts) the seed's tables.
pub const ADOPTING_MIGRATION: &str = "20261122000001";

/// A column the daemon reads or writes in a table the web app may own, and what its type must
/// be there for the daemon's statements to work unchanged.
struct Expect {
    table: &'static str,
    column: &'static str,
    kind: Kind,
    /// The daemon reads it as NOT NULL.
    not_null: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Uuid,
    Text,
    Int,
    Timestamptz,
    /// The seed's `job_status` enum.
    JobStatus,
    /// A status word: text, or an enum that has these labels (the daemon writes them as
    /// literals, which PostgreSQL types from the column).
    Status(&'static [&'static str]),
}

impl Kind {
    fn describe(self) -> String {
        match self {
            Kind::Uuid => "uuid".into(),
            Kind::Text => "text or varchar".into(),
            Kind::Int => "integer".into(),
            Kind::Timestamptz => "timestamp with time zone".into(),
            Kind::JobStatus => "the job_status enum".into(),
            Kind::Status(labels) => format!("text, or an enum with {}", labels.join(", ")),
        }
    }
}

const fn col(table: &'static str, column: &'static str, kind: Kind, not_null: bool) -> Expect {
    Expect {
        table,
        column,
        kind,
        not_null,
    }
}

/// The seed's columns as the daemon uses them (seeds 003, 000, 004). Columns the daemon adds are
/// not listed: the migration adds them, and one of the same name made by the web app must fit too,
/// which [`EXPECT_OWN`] checks.
const EXPECT: &[Expect] = &[
    col("users", "id", Kind::Uuid, true),
    col("agents", "id", Kind::Uuid, true),
    col("agents", "user_id", Kind::Uuid, true),
    col("agents", "status", Kind::Status(&["active"]), true),
    col("agents", "created_at", Kind::Timestamptz, true),
    col("agents", "updated_at", Kind::Timestamptz, true),
    col("provisioning_jobs", "id", Kind::Uuid, true),
    col("provisioning_jobs", "agent_id", Kind::Uuid, true),
    col("provisioning_jobs", "user_id", Kind::Uuid, true),
    col("provisioning_jobs", "stripe_event_id", Kind::Text, false),
    col("provisioning_jobs", "status", Kind::JobStatus, true),
    col("provisioning_jobs", "region", Kind::Text, true),
    col("provisioning_jobs", "workflow_run_id", Kind::Text, false),
    col("provisioning_jobs", "retry_count", Kind::Int, true),
    col("provisioning_jobs", "max_retries", Kind::Int, true),
    col("provisioning_jobs", "error", Kind::Text, false),
    col("provisioning_jobs", "failed_step", Kind::Text, false),
    col("provisioning_jobs", "claimed_at", Kind::Timestamptz, false),
    col(
        "provisioning_jobs",
        "last_heartbeat_at",
        Kind::Timestamptz,
        false,
    ),
    col(
        "provisioning_jobs",
        "completed_at",
        Kind::Timestamptz,
        false,
    ),
    col("provisioning_jobs", "created_at", Kind::Timestamptz, true),
    col("provisioning_jobs", "updated_at", Kind::Timestamptz, true),
    col("agent_instances", "id", Kind::Uuid, true),
    col("agent_instances", "agent_id", Kind::Uuid, true),
    col(
        "agent_instances",
        "status",
        Kind::Status(&["provisioning", "running", "failed"]),
        true,
    ),
    col("agent_instances", "server_id", Kind::Text, false),
    col("agent_instances", "server_ip", Kind::Text, false),
    col("agent_instances", "tailscale_ip", Kind::Text, false),
    col("agent_instances", "region", Kind::Text, false),
    col("agent_instances", "current_step", Kind::Text, false),
    col("agent_instances", "started_at", Kind::Timestamptz, false),
    col("agent_instances", "created_at", Kind::Timestamptz, true),
    col("agent_instances", "updated_at", Kind::Timestamptz, true),
];

/// Daemon columns in the web app's tables: absent there (the migration adds them), or, if the
/// web app happens to have one of the same name, of a type the daemon can use.
const EXPECT_OWN: &[Expect] = &[
    col("provisioning_jobs", "business_key", Kind::Text, false),
    col("provisioning_jobs", "lease_token", Kind::Uuid, false),
    col("provisioning_jobs", "lease_owner", Kind::Text, false),
    col(
        "provisioning_jobs",
        "lease_expires_at",
        Kind::Timestamptz,
        false,
    ),
    col("provisioning_jobs", "last_error", Kind::Text, false),
    col("provisioning_jobs", "current_step", Kind::Text, false),
    col("provisioning_jobs", "tailscale_key_id", Kind::Text, false),
    col("provisioning_jobs", "server_name", Kind::Text, false),
    col("provisioning_jobs", "server_ip", Kind::Text, false),
    col("provisioning_jobs", "location", Kind::Text, false),
    col("provisioning_jobs", "device_id", Kind::Text, false),
    col("provisioning_jobs", "tailscale_ip", Kind::Text, false),
    col("agent_instances", "job_id", Kind::Uuid, false),
];

/// Columns the daemon sets when it inserts a row: any other NOT NULL column of the web app's
/// table needs a default, or the daemon's inserts would fail.
const INSERTED: &[(&str, &[&str])] = &[
    (
        "provisioning_jobs",
        &[
            "agent_id",
            "user_id",
            "stripe_event_id",
            "business_key",
            "region",
            "executor",
            "max_retries",
        ],
    ),
    (
        "agent_instances",
        &[
            "agent_id",
            "job_id",
            "status",
            "current_step",
            "region",
            "server_id",
            "server_ip",
            "tailscale_ip",
            "started_at",
        ],
    ),
];

/// Objects only provisiond creates: one that exists before the first migration belongs to
/// someone else, and the daemon would misuse it.
const OURS_ONLY: &[(&str, &str)] = &[
    ("table", "job_events"),
    ("table", "stripe_events"),
    ("table", "provisiond_adopted"),
    ("table", "hetzner_rate_budgets"),
    ("type", "job_executor"),
    ("function", "provisiond_backoff"),
    ("function", "provisiond_notify_workers"),
    ("function", "provisioning_jobs_guard_terminal"),
    ("function", "provisioning_jobs_after_insert"),
    ("function", "provisioning_jobs_after_update"),
    ("function", "job_events_append_only"),
];

/// Existing rows that would violate something a migration adds.
struct RowCheck {
    /// The migration (version) that adds it; checked only while that migration is pending.
    migration: &'static str,
    /// The constraint or index that would refuse these rows.
    guards: &'static str,
    /// What must hold, in a few words.
    rule: &'static str,
    /// Tables the query reads; the check is skipped while one is missing (nothing to violate).
    tables: &'static [&'static str],
    /// One text row per offending row (or group), naming ids.
    sql: &'static str,
}

const ROW_CHECKS: &[RowCheck] = &[
    RowCheck {
        migration: ADOPTING_MIGRATION,
        guards: "provisioning_jobs_one_provisioning_per_user",
        rule: "at most one provisioning job per user",
        tables: &["provisioning_jobs"],
        sql: "SELECT 'user ' || user_id || ' has ' || count(*) || ' provisioning jobs: '
                     || string_agg(id::text, ', ' ORDER BY created_at, id) AS line
              FROM provisioning_jobs WHERE status::text = 'provisioning'
              GROUP BY user_id HAVING count(*) > 1 ORDER BY user_id",
    },
    RowCheck {
        migration: ADOPTING_MIGRATION,
        guards: "provisioning_jobs_agent_of_user",
        rule: "a job's agent belongs to the job's user",
        tables: &["provisioning_jobs", "agents"],
        sql: "SELECT 'job ' || j.id || ': agent ' || j.agent_id
                     || CASE WHEN a.id IS NULL THEN ' does not exist'
                             ELSE ' belongs to user ' || a.user_id END
                     || ', the job names user ' || j.user_id AS line
              FROM provisioning_jobs j LEFT JOIN agents a ON a.id = j.agent_id
              WHERE a.id IS NULL OR a.user_id <> j.user_id ORDER BY j.id",
    },
    RowCheck {
        migration: ADOPTING_MIGRATION,
        guards: "provisioning_jobs_stripe_event_id_key",
        rule: "one job per Stripe event",
        tables: &["provisioning_jobs"],
        sql: "SELECT 'stripe_event_id ' || stripe_event_id || ' has ' || count(*) || ' jobs: '
                     || string_agg(id::text, ', ' ORDER BY id) AS line
              FROM provisioning_jobs WHERE stripe_event_id IS NOT NULL
              GROUP BY stripe_event_id HAVING count(*) > 1 ORDER BY stripe_event_id",
    },
    RowCheck {
        migration: ADOPTING_MIGRATION,
        guards: "provisioning_jobs_retry_count_check, provisioning_jobs_max_retries_check",
        rule: "retry_count and max_retries are not negative",
        tables: &["provisioning_jobs"],
        sql: "SELECT 'job ' || id || ': retry_count ' || retry_count || ', max_retries '
                     || max_retries AS line
              FROM provisioning_jobs WHERE retry_count < 0 OR max_retries < 0 ORDER BY id",
    },
    RowCheck {
        migration: ADOPTING_MIGRATION,
        guards: "agent_instances_agent_id_fkey",
        rule: "an instance's agent exists",
        tables: &["agent_instances", "agents"],
        sql: "SELECT 'instance ' || i.id || ': agent ' || i.agent_id || ' does not exist' AS line
              FROM agent_instances i WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE a.id = i.agent_id)
              ORDER BY i.id",
    },
];

/// Offending rows shown per check; the total is always given.
const SHOWN: usize = 10;

/// Why `migrate` refused. Displayed as the operator's report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The schema the web app made does not fit (a column's type, a foreign object).
    pub conflicts: Vec<String>,
    pub violations: Vec<Violation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub guards: &'static str,
    pub rule: &'static str,
    pub total: usize,
    /// The first few offending rows, described with their ids.
    pub rows: Vec<String>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.conflicts.is_empty() && self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "refused before any change; nothing was changed.")?;
        if !self.conflicts.is_empty() {
            writeln!(f, "The existing schema does not fit what provisiond needs:")?;
            for c in &self.conflicts {
                writeln!(f, "  - {c}")?;
            }
        }
        if !self.violations.is_empty() {
            writeln!(
                f,
                "Existing rows violate what the migrations would add (they are the web app's \
                 data: decide with its owners, fix them, then run migrate again):"
            )?;
            for v in &self.violations {
                writeln!(
                    f,
                    "  {} ({}): {} offending row{}",
                    v.guards,
                    v.rule,
                    v.total,
                    if v.total == 1 { "" } else { "s" }
                )?;
                for r in &v.rows {
                    writeln!(f, "    {r}")?;
                }
                if v.total > v.rows.len() {
                    writeln!(f, "    … and {} more", v.total - v.rows.len())?;
                }
            }
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct LineRow {
    #[diesel(sql_type = Text)]
    line: String,
}

#[derive(QueryableByName)]
struct ColumnRow {
    #[diesel(sql_type = Text)]
    data_type: String,
    #[diesel(sql_type = Bool)]
    is_enum: bool,
    #[diesel(sql_type = Text)]
    labels: String,
    #[diesel(sql_type = Bool)]
    not_null: bool,
}

#[derive(QueryableByName)]
struct Num {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

type Conn = crate::db::migrate::Harness;

fn exists(conn: &mut Conn, kind: &str, name: &str) -> diesel::QueryResult<bool> {
    let sql = match kind {
        "table" => "SELECT count(*) AS n FROM pg_class
                    WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
                      AND relname = $1 AND relkind IN ('r', 'p', 'v', 'm', 'f')",
        "type" => "SELECT count(*) AS n FROM pg_type
                   WHERE typnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
                     AND typname = $1",
        _ => "SELECT count(*) AS n FROM pg_proc
              WHERE pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
                AND proname = $1",
    };
    let n: Num = diesel::sql_query(sql)
        .bind::<Text, _>(name)
        .get_result(conn)?;
    Ok(n.n > 0)
}

pub fn table_exists(conn: &mut Conn, name: &str) -> diesel::QueryResult<bool> {
    exists(conn, "table", name)
}

fn column(conn: &mut Conn, table: &str, column: &str) -> diesel::QueryResult<Option<ColumnRow>> {
    use diesel::OptionalExtension;
    diesel::sql_query(
        "SELECT format_type(a.atttypid, a.atttypmod) AS data_type,
                t.typtype = 'e' AS is_enum,
                coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder)
                          FROM pg_enum WHERE enumtypid = t.oid), '') AS labels,
                a.attnotnull AS not_null
         FROM pg_attribute a
         JOIN pg_class c ON c.oid = a.attrelid
         JOIN pg_type t ON t.oid = a.atttypid
         WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
           AND c.relname = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind::<Text, _>(table)
    .bind::<Text, _>(column)
    .get_result(conn)
    .optional()
}

fn fits(kind: Kind, c: &ColumnRow) -> bool {
    let text =
        matches!(c.data_type.as_str(), "text") || c.data_type.starts_with("character varying");
    let labels: Vec<&str> = c.labels.split(',').collect();
    match kind {
        Kind::Uuid => c.data_type == "uuid",
        Kind::Text => text,
        Kind::Int => c.data_type == "integer",
        Kind::Timestamptz => c.data_type == "timestamp with time zone",
        Kind::JobStatus => c.data_type == "job_status",
        Kind::Status(need) => text || (c.is_enum && need.iter().all(|l| labels.contains(l))),
    }
}

/// The schema checks of adoption: only meaningful while the first migration is pending.
fn schema_conflicts(conn: &mut Conn) -> diesel::QueryResult<Vec<String>> {
    let mut out = Vec::new();
    let version: Num =
        diesel::sql_query("SELECT current_setting('server_version_num')::bigint AS n")
            .get_result(conn)?;
    if version.n < 130_000 {
        out.push(format!(
            "PostgreSQL 13 or later is needed (gen_random_uuid() in core); this server is {}",
            version.n
        ));
    }
    for (kind, name) in OURS_ONLY {
        if exists(conn, kind, name)? {
            out.push(format!(
                "{kind} {name} exists but provisiond did not create it: rename or remove it \
                 (provisiond would use it as its own)"
            ));
        }
    }
    if exists(conn, "type", "job_status")? {
        let labels: Vec<LineRow> = diesel::sql_query(
            "SELECT e.enumlabel AS line FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
             WHERE t.typname = 'job_status'
               AND t.typnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
        )
        .load(conn)?;
        let have: Vec<&str> = labels.iter().map(|l| l.line.as_str()).collect();
        let missing: Vec<&str> = ["queued", "provisioning", "running", "failed"]
            .into_iter()
            .filter(|l| !have.contains(l))
            .collect();
        if have.is_empty() || !missing.is_empty() {
            out.push(format!(
                "type job_status must be an enum with queued, provisioning, running, failed; \
                 missing: {}",
                if have.is_empty() {
                    "it is not an enum".to_owned()
                } else {
                    missing.join(", ")
                }
            ));
        }
    }
    for e in EXPECT.iter().chain(EXPECT_OWN) {
        if !table_exists(conn, e.table)? {
            continue;
        }
        let own = EXPECT_OWN.iter().any(|o| std::ptr::eq(o, e));
        match column(conn, e.table, e.column)? {
            // The migration adds the daemon's own columns, and the seed's of a table it creates.
            None if own => {}
            None => out.push(format!(
                "{}.{} is missing (the seed has it; expected {})",
                e.table,
                e.column,
                e.kind.describe()
            )),
            Some(c) if !fits(e.kind, &c) => out.push(format!(
                "{}.{} is {}{}; provisiond needs {}",
                e.table,
                e.column,
                c.data_type,
                if c.is_enum {
                    format!(" (labels {})", c.labels)
                } else {
                    String::new()
                },
                e.kind.describe()
            )),
            Some(c) if e.not_null && !c.not_null => out.push(format!(
                "{}.{} allows NULL; provisiond reads it as NOT NULL (the seed declares it so)",
                e.table, e.column
            )),
            Some(_) => {}
        }
    }
    for (table, inserted) in INSERTED {
        if !table_exists(conn, table)? {
            continue;
        }
        let required: Vec<LineRow> = diesel::sql_query(
            "SELECT a.attname AS line FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
               AND c.relname = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull
               AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
             ORDER BY a.attnum",
        )
        .bind::<Text, _>(*table)
        .load(conn)?;
        for r in required {
            if !inserted.contains(&r.line.as_str()) {
                out.push(format!(
                    "{table}.{} is NOT NULL without a default, and provisiond's inserts do not \
                     set it: give it a default",
                    r.line
                ));
            }
        }
    }
    let invalid: Vec<LineRow> = diesel::sql_query(
        "SELECT i.relname || ' on ' || c.relname AS line
         FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
         WHERE NOT x.indisvalid
           AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
         ORDER BY 1",
    )
    .load(conn)?;
    for r in invalid {
        out.push(format!(
            "index {} is INVALID (a CREATE INDEX CONCURRENTLY that failed): \
             DROP INDEX CONCURRENTLY it, then build it again or let migrate build it",
            r.line
        ));
    }
    Ok(out)
}

/// Checks what the `pending` migrations (versions) need, before any of them runs.
pub fn check(conn: &mut Conn, pending: &[String]) -> diesel::QueryResult<Report> {
    let mut report = Report::default();
    if pending.iter().any(|v| v == ADOPTING_MIGRATION) {
        report.conflicts = schema_conflicts(conn)?;
        if !report.conflicts.is_empty() {
            // Row checks read columns whose shape was just found wrong.
            return Ok(report);
        }
    }
    for check in ROW_CHECKS {
        if !pending.iter().any(|v| v == check.migration) {
            continue;
        }
        let mut present = true;
        for t in check.tables {
            present &= table_exists(conn, t)?;
        }
        if !present {
            continue;
        }
        let rows: Vec<LineRow> = diesel::sql_query(check.sql).load(conn)?;
        if !rows.is_empty() {
            report.violations.push(Violation {
                guards: check.guards,
                rule: check.rule,
                total: rows.len(),
                rows: rows.into_iter().take(SHOWN).map(|r| r.line).collect(),
            });
        }
    }
    Ok(report)
}

/// Whether the seed objects found before the first migration make this an adoption (the web app
/// made them), for the plan's wording.
pub fn adopting(conn: &mut Conn) -> diesel::QueryResult<Vec<String>> {
    let mut found = Vec::new();
    for (kind, name) in [
        ("type", "job_status"),
        ("table", "users"),
        ("table", "agents"),
        ("table", "agent_instances"),
        ("table", "provisioning_jobs"),
    ] {
        if exists(conn, kind, name)? {
            found.push(format!("{kind} {name}"));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_check_names_a_migration_of_this_binary() {
        let dirs: Vec<String> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
        for c in ROW_CHECKS {
            assert!(
                dirs.iter()
                    .any(|d| d.split('_').next().unwrap().replace('-', "") == c.migration),
                "{} names migration {}, which does not exist",
                c.guards,
                c.migration
            );
        }
    }

    #[test]
    fn the_report_names_rows_and_says_nothing_changed() {
        let r = Report {
            conflicts: vec![],
            violations: vec![Violation {
                guards: "provisioning_jobs_one_provisioning_per_user",
                rule: "at most one provisioning job per user",
                total: 12,
                rows: vec!["user u has 2 provisioning jobs: a, b".into()],
            }],
        };
        let text = r.to_string();
        assert!(text.contains("nothing was changed"), "{text}");
        assert!(text.contains("12 offending rows"), "{text}");
        assert!(
            text.contains("user u has 2 provisioning jobs: a, b"),
            "{text}"
        );
        assert!(text.contains("… and 11 more"), "{text}");
    }

    #[test]
    fn a_status_column_may_be_text_or_an_enum_with_the_labels_written() {
        let enum_col = |labels: &str| ColumnRow {
            data_type: "instance_status".into(),
            is_enum: true,
            labels: labels.into(),
            not_null: true,
        };
        let need = Kind::Status(&["running", "failed"]);
        assert!(fits(need, &enum_col("pending,running,stopped,failed")));
        assert!(!fits(need, &enum_col("pending,running")));
        let text = ColumnRow {
            data_type: "character varying(32)".into(),
            is_enum: false,
            labels: String::new(),
            not_null: true,
        };
        assert!(fits(need, &text) && fits(Kind::Text, &text));
        assert!(!fits(Kind::Uuid, &text));
    }
}
