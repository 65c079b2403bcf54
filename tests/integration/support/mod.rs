//! Test harness: a fresh PostgreSQL database per test, cloned from a migrated template.
//!
//! Where the server comes from, in order:
//! 1. `DATABASE_URL`, if set (its database is only used to reach the server);
//! 2. `127.0.0.1:5432` as user `postgres` (trust auth), if something listens there;
//! 3. a throwaway cluster started from the system's PostgreSQL binaries in
//!    `$TMPDIR/provisiond-test-pg` on port 55432, run as the `postgres` user when we are root
//!    (initdb refuses root). It is shared by every test process and left running.
//!
//! The template's name carries a hash of `migrations/`, so a changed migration gets a new
//! template. Creating it is serialised across processes with an advisory lock.

#![allow(dead_code)]

pub mod openapi_schema;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use provisiond::secret::Secret;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::sync::OnceCell;

const CLUSTER_PORT: u16 = 55432;

/// The web app's schema as its Drizzle migrations create it.
pub const WEBAPP_SCHEMA: &str = include_str!("../../fixtures/webapp_schema.sql");
/// Its rows, in every state (ids listed at the top of the file).
pub const WEBAPP_ROWS: &str = include_str!("../../fixtures/webapp_rows.sql");

pub struct TestDb {
    pub name: String,
    pub url: Secret,
    server: &'static str,
}

impl TestDb {
    /// A new, migrated, empty database for one test.
    pub async fn new() -> TestDb {
        let server = server_url().await;
        let template = template(server).await;
        Self::create(server, Some(template)).await
    }

    /// A new database with no migrations applied.
    pub async fn empty() -> TestDb {
        Self::create(server_url().await, None).await
    }

    async fn create(server: &'static str, template: Option<&str>) -> TestDb {
        let name = format!("provisiond_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = admin_conn(server).await;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        let mut tries = 0;
        loop {
            match diesel::sql_query(&sql).execute(&mut admin).await {
                Ok(_) => break,
                // Another process may be connected to the template for a moment.
                Err(e) if tries < 50 && e.to_string().contains("being accessed") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        TestDb {
            url: Secret::new(with_database(server, &name)),
            name,
            server,
        }
    }

    pub async fn conn(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(self.url.expose())
            .await
            .expect("connect to test database")
    }

    pub async fn pool(&self) -> provisiond::db::Pool {
        provisiond::db::connect(&self.url, 16, Duration::from_secs(10))
            .await
            .expect("pool for test database")
    }

    /// Runs SQL (tests use it to move time: `lease_expires_at = now() - ...`).
    pub async fn exec(&self, sql: &str) -> usize {
        let mut conn = self.conn().await;
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs several statements (a fixture file) in one round trip.
    pub async fn batch(&self, sql: &str) {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = self.conn().await;
        conn.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("batch: {e}"));
    }

    /// A new database holding the web app's schema as its Drizzle migrations made it, with its
    /// rows (tests/fixtures/webapp_*.sql), and no provisiond migration applied.
    pub async fn web_app() -> TestDb {
        let db = Self::empty().await;
        db.batch(WEBAPP_SCHEMA).await;
        db.batch(WEBAPP_ROWS).await;
        db
    }

    /// Text lines of one statement returning one column (`SELECT`, or `INSERT … RETURNING`).
    pub async fn lines(&self, sql: &str) -> Vec<String> {
        #[derive(diesel::QueryableByName)]
        struct L {
            #[diesel(sql_type = diesel::sql_types::Text)]
            line: String,
        }
        let mut conn = self.conn().await;
        // A CTE, so that `INSERT … RETURNING` works too.
        diesel::sql_query(format!(
            "WITH q(line) AS ({sql}) SELECT line::text AS line FROM q"
        ))
        .load::<L>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .map(|l| l.line)
        .collect()
    }

    /// The schema, described one object a line (provisiond's catalog snapshot).
    pub async fn catalog(&self) -> Vec<String> {
        #[derive(diesel::QueryableByName)]
        struct L {
            #[diesel(sql_type = diesel::sql_types::Text)]
            line: String,
        }
        let mut conn = self.conn().await;
        diesel::sql_query(provisiond::db::catalog::SNAPSHOT_SQL)
            .load::<L>(&mut conn)
            .await
            .expect("catalog snapshot")
            .into_iter()
            .map(|l| l.line)
            .collect()
    }

    /// A checksum of everything: the catalog of `public` and every row of every table in
    /// `public` and `drizzle` (the web app's migration log), sequences' positions aside.
    pub async fn checksum(&self) -> String {
        let tables = self
            .lines(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
                 WHERE schemaname IN ('public', 'drizzle') ORDER BY 1",
            )
            .await;
        let mut h = Sha256::new();
        for line in self.catalog().await {
            h.update(line.as_bytes());
            h.update(b"\n");
        }
        for t in tables {
            h.update(t.as_bytes());
            for row in self
                .lines(&format!("SELECT t::text FROM {t} t ORDER BY 1"))
                .await
            {
                h.update(row.as_bytes());
                h.update(b"\n");
            }
        }
        hex::encode(h.finalize())
    }

    /// A single number from SQL, e.g. `SELECT count(*) FROM ...`.
    pub async fn count(&self, sql: &str) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.conn().await;
        let wrapped = format!("SELECT ({sql})::bigint AS n");
        diesel::sql_query(&wrapped)
            .get_result::<N>(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .n
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server, self.name.clone());
        // Drop runs outside any runtime we may rely on; use a small one of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut admin) = AsyncPgConnection::establish(server).await {
                    let _ =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            })
        })
        .join();
    }
}

async fn admin_conn(server: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(server)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL server: {e}"))
}

fn with_database(server: &str, db: &str) -> String {
    let mut url = url::Url::parse(server).expect("server URL");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

static SERVER: OnceCell<String> = OnceCell::const_new();
static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// The URL of the server's `postgres` database.
pub async fn server_url() -> &'static str {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("DATABASE_URL")
                && !url.is_empty()
            {
                return with_database(&url, "postgres");
            }
            let local = "postgres://postgres@127.0.0.1:5432/postgres".to_owned();
            if std::env::var_os("PROVISIOND_TEST_THROWAWAY_CLUSTER").is_none()
                && AsyncPgConnection::establish(&local).await.is_ok()
            {
                return local;
            }
            tokio::task::spawn_blocking(start_throwaway_cluster)
                .await
                .expect("cluster task")
        })
        .await
}

async fn template(server: &'static str) -> &'static str {
    TEMPLATE
        .get_or_init(|| async move {
            let name = format!("provisiond_tpl_{}", migrations_hash());
            let mut admin = admin_conn(server).await;
            // Serialise template creation across test processes.
            diesel::sql_query("SELECT pg_advisory_lock(7002)")
                .execute(&mut admin)
                .await
                .expect("lock");
            let exists = diesel::sql_query(format!(
                "SELECT 1 AS n FROM pg_database WHERE datname = '{name}'"
            ))
            .execute(&mut admin)
            .await
            .expect("look up template")
                > 0;
            if !exists {
                // Build under a temporary name and rename: a half-migrated template is never
                // visible under the real name.
                let building = format!("{name}_building");
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .expect("drop stale template");
                diesel::sql_query(format!("CREATE DATABASE {building}"))
                    .execute(&mut admin)
                    .await
                    .expect("create template");
                let url = Secret::new(with_database(server, &building));
                provisiond::db::migrate(&url, Duration::from_secs(10))
                    .await
                    .expect("migrate template");
                diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("publish template");
            }
            diesel::sql_query("SELECT pg_advisory_unlock(7002)")
                .execute(&mut admin)
                .await
                .expect("unlock");
            name
        })
        .await
}

fn migrations_hash() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<PathBuf> = walk(&dir);
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.strip_prefix(&dir).unwrap().to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).expect("read migration"));
    }
    hex::encode(&h.finalize()[..6])
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("migrations dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Starts (or finds running) a throwaway cluster from the system's binaries.
fn start_throwaway_cluster() -> String {
    let url = format!("postgres://postgres@127.0.0.1:{CLUSTER_PORT}/postgres");
    let base = std::env::temp_dir().join("provisiond-test-pg");
    let lock_path = std::env::temp_dir().join("provisiond-test-pg.lock");
    let lock = std::fs::File::create(&lock_path).expect("cluster lock file");
    lock.lock().expect("lock cluster");
    if std::net::TcpStream::connect(("127.0.0.1", CLUSTER_PORT)).is_ok() {
        return url;
    }
    let bin =
        provisiond::tools::chaos::cluster::postgres_bindir().unwrap_or_else(|e| panic!("{e}"));
    let as_root = provisiond::tools::chaos::cluster::running_as_root();
    let run = |program: &str, args: &[&str]| {
        let mut cmd =
            provisiond::tools::chaos::cluster::postgres_command(&bin.join(program), as_root);
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data = base.join("data");
    if !data.join("PG_VERSION").exists() {
        std::fs::create_dir_all(&base).expect("cluster dir");
        if as_root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&base)
                .status()
                .expect("chown");
            assert!(ok.success(), "chown of {} failed", base.display());
        }
        run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
    }
    let opts = format!(
        "-p {CLUSTER_PORT} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
        base.display()
    );
    let log = base.join("server.log");
    run(
        "pg_ctl",
        &[
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "start",
        ],
    );
    url
}
