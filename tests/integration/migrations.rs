//! Migrations apply on an empty database, roll back cleanly, and apply again.

use crate::support::TestDb;
use std::time::Duration;

const OUR_OBJECTS: &str = "SELECT (SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations')
     + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype = 'e')
     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public')";

#[tokio::test]
async fn migrations_apply_roll_back_and_reapply() {
    let db = TestDb::empty().await;
    let t = Duration::from_secs(10);
    assert_eq!(db.count(OUR_OBJECTS).await, 0);
    let applied = provisiond::db::migrate(&db.url, t).await.unwrap();
    assert!(!applied.is_empty());
    assert!(db.count(OUR_OBJECTS).await > 5);
    assert!(
        !provisiond::db::pending_migrations(&db.url, t)
            .await
            .unwrap()
    );

    let reverted = provisiond::db::revert_all(&db.url, t).await.unwrap();
    assert_eq!(reverted.len(), applied.len());
    assert_eq!(
        db.count(OUR_OBJECTS).await,
        0,
        "down migrations leave nothing behind"
    );
    assert!(
        provisiond::db::pending_migrations(&db.url, t)
            .await
            .unwrap()
    );

    provisiond::db::migrate(&db.url, t).await.unwrap();
    assert!(db.count(OUR_OBJECTS).await > 5);
}

#[tokio::test]
async fn the_diesel_schema_matches_the_migrated_tables() {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use provisiond::db::models::{AgentInstance, Job, JobEvent};
    use provisiond::db::schema::*;
    let db = TestDb::new().await;
    // Every column of every table, loaded through schema.rs: a name or type that drifted from
    // the migration fails here.
    db.exec("INSERT INTO agents (id, user_id) VALUES (gen_random_uuid(), gen_random_uuid())")
        .await;
    db.exec("INSERT INTO provisioning_jobs (agent_id, user_id, pending_action_ids, server_id) SELECT id, user_id, '{1,2}', 42 FROM agents").await;
    db.exec("INSERT INTO agent_instances (agent_id, job_id, status) SELECT agent_id, id, 'running' FROM provisioning_jobs").await;
    let mut conn = db.conn().await;
    let jobs: Vec<Job> = provisioning_jobs::table
        .select(Job::as_select())
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(jobs[0].pending_action_ids, vec![1, 2]);
    let events: Vec<JobEvent> = job_events::table
        .select(JobEvent::as_select())
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    let instances: Vec<AgentInstance> = agent_instances::table
        .select(AgentInstance::as_select())
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(instances[0].job_id, Some(jobs[0].id));
    let a: i64 = agents::table.count().get_result(&mut conn).await.unwrap();
    assert_eq!(a, 1);
}
