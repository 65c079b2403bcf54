//! Completion with VM metadata and step recording, as the web app sees them.

use crate::support::TestDb;
use provisiond::domain::{Executor, JobStatus};
use provisiond::queue::{Fence, NewJob, Queue, QueueError, QueueSettings, VmMetadata};
use uuid::Uuid;

fn meta() -> VmMetadata {
    VmMetadata {
        server_id: "42".into(),
        server_ip: "203.0.113.7".into(),
        tailscale_ip: "100.64.0.7".into(),
    }
}

fn job(executor: Executor) -> NewJob {
    NewJob {
        agent_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        region: "eu-central".into(),
        stripe_event_id: None,
        business_key: None,
        executor,
        max_retries: None,
    }
}

#[tokio::test]
async fn daemon_completion_writes_job_instance_and_agent_in_one_go() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, QueueSettings::default());
    let id = q.enqueue(&job(Executor::Daemon)).await.unwrap().job().id;
    let claimed = q.claim("w", 1).await.unwrap().remove(0);
    let lease = claimed.lease().unwrap();
    let j = q
        .record_step(
            id,
            Fence::Lease(lease),
            "vm_created",
            "server 42",
            serde_json::json!({"server_id": 42}),
        )
        .await
        .unwrap();
    assert_eq!(j.current_step.as_deref(), Some("vm_created"));
    assert_eq!(db.count("SELECT count(*) FROM agent_instances WHERE status = 'provisioning' AND current_step = 'vm_created'").await, 1);

    let done = q
        .complete_with_metadata(id, Fence::Lease(lease), &meta())
        .await
        .unwrap();
    assert_eq!(done.status(), JobStatus::Running);
    assert!(
        done.completed_at.is_some() && done.current_step.is_none() && done.lease_token.is_none()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM agent_instances WHERE status = 'running' AND server_id = '42' AND server_ip = '203.0.113.7' AND tailscale_ip = '100.64.0.7' AND region = 'eu-central' AND started_at IS NOT NULL AND current_step IS NULL").await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM agents WHERE status = 'active'")
            .await,
        1
    );
    // The lease is spent: a second completion by the same worker is refused.
    let again = q
        .complete_with_metadata(id, Fence::Lease(lease), &meta())
        .await;
    assert!(matches!(again, Err(QueueError::LeaseLost(_))));
}

#[tokio::test]
async fn external_completion_updates_the_agents_pending_instance_and_repeats_harmlessly() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, QueueSettings::default());
    let new = job(Executor::External);
    let id = q.enqueue(&new).await.unwrap().job().id;
    // The web app created a pending instance for the agent, as the seed's UI did.
    db.exec(&format!(
        "INSERT INTO agent_instances (agent_id, status) VALUES ('{}', 'pending')",
        new.agent_id
    ))
    .await;

    // Not provisioning yet: completing is an illegal transition and writes nothing.
    let early = q.complete_with_metadata(id, Fence::External, &meta()).await;
    assert!(
        matches!(
            early,
            Err(QueueError::IllegalTransition {
                from: JobStatus::Queued,
                ..
            })
        ),
        "{early:?}"
    );
    db.exec("UPDATE provisioning_jobs SET status = 'provisioning', claimed_at = now()")
        .await;

    q.complete_with_metadata(id, Fence::External, &meta())
        .await
        .unwrap();
    q.complete_with_metadata(id, Fence::External, &meta())
        .await
        .unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM agent_instances").await,
        1,
        "the pending row was updated, not duplicated"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM agent_instances WHERE status = 'running' AND job_id = '{id}'"
        ))
        .await,
        1
    );

    // A daemon job cannot be completed by an external callback.
    let d = q.enqueue(&job(Executor::Daemon)).await.unwrap().job().id;
    q.claim("w", 1).await.unwrap();
    let refused = q.complete_with_metadata(d, Fence::External, &meta()).await;
    assert!(
        matches!(refused, Err(QueueError::IllegalTransition { .. })),
        "{refused:?}"
    );
    let missing = q
        .record_step(
            Uuid::new_v4(),
            Fence::External,
            "vm_created",
            "x",
            serde_json::json!({}),
        )
        .await;
    assert!(matches!(missing, Err(QueueError::NotFound(_))));
}
