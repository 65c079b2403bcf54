//! Who owns `agents` and `users`: the web app (an adopted database) or the daemon (standalone:
//! the demo, an empty database). Decided once per process from `database.mode` and, for `auto`,
//! from the catalog. Read-only.
//!
//! Standalone, the daemon creates an agent's row on its first order (its own `agents` table has
//! nothing else to fill in). Adopted, it never inserts into `agents` or `users`: an order for an
//! agent or user that does not exist, or an agent of another user, is refused with the reason.

use super::DbError;
use crate::config::ModeSetting;
use diesel::QueryableByName;
use diesel::sql_types::Bool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatabaseMode {
    /// The daemon's own schema: agents are created on demand.
    #[default]
    Standalone,
    /// The web app's schema: agents and users are its rows. `users_table`: whether a `users`
    /// table exists to check a user against.
    Adopted { users_table: bool },
}

impl DatabaseMode {
    pub fn adopted(self) -> bool {
        matches!(self, DatabaseMode::Adopted { .. })
    }
}

impl fmt::Display for DatabaseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatabaseMode::Standalone => "standalone",
            DatabaseMode::Adopted { .. } => "adopted",
        })
    }
}

/// The mode in force and why (for `check-config` and the startup log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub mode: DatabaseMode,
    pub reason: String,
}

#[derive(QueryableByName)]
struct Facts {
    #[diesel(sql_type = Bool)]
    users: bool,
    #[diesel(sql_type = Bool)]
    marker: bool,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    yes: bool,
}

/// Resolves `setting` against the database. `auto` is adopted when a `users` table exists (the
/// daemon never creates one) or when the first migration found `agents` already there; else
/// standalone. An explicit `standalone` where the web app owns those tables is an error: the
/// daemon's agent inserts would fail there (the web app's `agents.name` is NOT NULL).
pub async fn resolve(
    conn: &mut AsyncPgConnection,
    setting: ModeSetting,
) -> Result<Resolved, DbError> {
    let facts: Facts = diesel::sql_query(
        "SELECT to_regclass('users') IS NOT NULL AS users,
                to_regclass('provisiond_adopted') IS NOT NULL AS marker",
    )
    .get_result(conn)
    .await?;
    let agents_adopted = facts.marker
        && diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM provisiond_adopted WHERE object = 'agents') AS yes",
        )
        .get_result::<Flag>(conn)
        .await?
        .yes;
    let web_app = match (facts.users, agents_adopted) {
        (true, _) => Some("a users table exists, which provisiond never creates"),
        (false, true) => Some("the agents table existed before provisiond's first migration"),
        (false, false) => None,
    };
    let adopted = DatabaseMode::Adopted {
        users_table: facts.users,
    };
    Ok(match (setting, web_app) {
        (ModeSetting::Adopted, _) => Resolved {
            mode: adopted,
            reason: "database.mode = \"adopted\"".into(),
        },
        (ModeSetting::Standalone, Some(why)) => {
            return Err(DbError::Migration(format!(
                "database.mode = \"standalone\", but this database's agents and users belong to \
                 the web app ({why}); set database.mode = \"adopted\" (or \"auto\")"
            )));
        }
        (ModeSetting::Standalone, None) => Resolved {
            mode: DatabaseMode::Standalone,
            reason: "database.mode = \"standalone\"".into(),
        },
        (ModeSetting::Auto, Some(why)) => Resolved {
            mode: adopted,
            reason: format!("database.mode = \"auto\": {why}"),
        },
        (ModeSetting::Auto, None) => Resolved {
            mode: DatabaseMode::Standalone,
            reason: "database.mode = \"auto\": no users table and no adopted agents table".into(),
        },
    })
}
