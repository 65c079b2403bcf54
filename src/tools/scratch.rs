//! A scratch database on the configured server for the demo, the benchmarks and the chaos
//! suite: created with a random name, dropped when the run ends. Must not: touch any other
//! database on the server.

use crate::db;
use crate::secret::Secret;
use anyhow::Context;
use diesel_async::RunQueryDsl;
use std::time::Duration;
use uuid::Uuid;

/// A scratch database on the configured server, dropped when the benchmark or demo ends.
pub(crate) struct Scratch {
    admin: Secret,
    name: String,
    pub(crate) url: Secret,
}

impl Scratch {
    pub(crate) async fn create(server: &Secret) -> anyhow::Result<Scratch> {
        let name = format!(
            "provisiond_bench_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let mut conn = db::establish(server, Duration::from_secs(5)).await?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .context("create scratch database")?;
        let mut url = url::Url::parse(server.expose()).context("database URL")?;
        url.set_path(&format!("/{name}"));
        Ok(Scratch {
            admin: server.clone(),
            name,
            url: Secret::new(url.to_string()),
        })
    }

    /// Runs `f` on a fresh scratch database and drops it afterwards, whatever `f` returned.
    pub(crate) async fn with<T, F, Fut>(server: &Secret, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Secret) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let scratch = Scratch::create(server).await?;
        let result = f(scratch.url.clone()).await;
        scratch.drop_now().await;
        result
    }

    pub(crate) async fn drop_now(self) {
        if let Ok(mut conn) = db::establish(&self.admin, Duration::from_secs(5)).await {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}
