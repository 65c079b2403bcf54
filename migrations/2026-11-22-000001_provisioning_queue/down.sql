-- Reverses 2026-11-22-000001 completely: everything the daemon created, nothing else.
DROP TABLE IF EXISTS job_events;
DROP TABLE IF EXISTS agent_instances;
DROP TABLE IF EXISTS provisioning_jobs;
DROP TABLE IF EXISTS agents;
DROP FUNCTION IF EXISTS provisioning_jobs_after_update();
DROP FUNCTION IF EXISTS provisioning_jobs_after_insert();
DROP FUNCTION IF EXISTS provisioning_jobs_guard_terminal();
DROP FUNCTION IF EXISTS job_events_append_only();
DROP FUNCTION IF EXISTS provisiond_notify_workers(text);
DROP FUNCTION IF EXISTS provisiond_backoff(integer, integer, integer);
DROP TYPE IF EXISTS job_executor;
DROP TYPE IF EXISTS job_status;
