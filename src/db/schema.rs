// Mirrors migrations/ (diesel print-schema output, kept by hand because print-schema needs libpq;
// `tests/integration/migrations.rs` loads every column through these definitions to keep them true).

pub mod sql_types {
    #[derive(diesel::query_builder::QueryId, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "job_status"))]
    pub struct JobStatus;

    #[derive(diesel::query_builder::QueryId, diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "job_executor"))]
    pub struct JobExecutor;
}

diesel::table! {
    agents (id) {
        id -> Uuid,
        user_id -> Uuid,
        status -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::{JobStatus, JobExecutor};

    provisioning_jobs (id) {
        id -> Uuid,
        agent_id -> Uuid,
        user_id -> Uuid,
        stripe_event_id -> Nullable<Text>,
        status -> JobStatus,
        region -> Text,
        workflow_run_id -> Nullable<Text>,
        retry_count -> Int4,
        max_retries -> Int4,
        error -> Nullable<Text>,
        failed_step -> Nullable<Text>,
        claimed_at -> Nullable<Timestamptz>,
        last_heartbeat_at -> Nullable<Timestamptz>,
        completed_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        business_key -> Nullable<Text>,
        executor -> JobExecutor,
        run_after -> Timestamptz,
        lease_token -> Nullable<Uuid>,
        lease_owner -> Nullable<Text>,
        lease_expires_at -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        operator_retries -> Int4,
        current_step -> Nullable<Text>,
        tailscale_key_id -> Nullable<Text>,
        server_name -> Nullable<Text>,
        server_id -> Nullable<Int8>,
        server_ip -> Nullable<Text>,
        location -> Nullable<Text>,
        pending_action_ids -> Array<Int8>,
        device_id -> Nullable<Text>,
        tailscale_ip -> Nullable<Text>,
        rollback_started_at -> Nullable<Timestamptz>,
        rollback_error -> Nullable<Text>,
        rollback_step -> Nullable<Text>,
        rollback_resumes -> Int4,
        cancelled_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    agent_instances (id) {
        id -> Uuid,
        agent_id -> Uuid,
        job_id -> Nullable<Uuid>,
        status -> Text,
        server_id -> Nullable<Text>,
        server_ip -> Nullable<Text>,
        tailscale_ip -> Nullable<Text>,
        region -> Nullable<Text>,
        current_step -> Nullable<Text>,
        started_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    job_events (id) {
        id -> Int8,
        job_id -> Uuid,
        at -> Timestamptz,
        step -> Nullable<Text>,
        message -> Text,
        data -> Jsonb,
    }
}

diesel::joinable!(provisioning_jobs -> agents (agent_id));
diesel::joinable!(agent_instances -> agents (agent_id));
diesel::joinable!(job_events -> provisioning_jobs (job_id));

diesel::allow_tables_to_appear_in_same_query!(
    agents,
    provisioning_jobs,
    agent_instances,
    job_events
);
