-- Reverses 2026-11-22-000001 completely: everything the daemon created, nothing else. On a
-- database whose seed tables the web app made (provisiond_adopted lists them) it refuses: those
-- tables, and their rows, are the web app's.
DO $$
BEGIN
    IF to_regclass('provisiond_adopted') IS NOT NULL
       AND EXISTS (SELECT 1 FROM provisiond_adopted) THEN
        RAISE EXCEPTION 'refusing to revert: % existed before provisiond (the web app''s); reverting would drop them',
            (SELECT string_agg(object, ', ' ORDER BY object) FROM provisiond_adopted)
            USING ERRCODE = 'PV004';
    END IF;
END $$;
DROP TABLE IF EXISTS job_events;
DROP TABLE IF EXISTS agent_instances;
DROP TABLE IF EXISTS provisioning_jobs;
DROP TABLE IF EXISTS agents;
DROP TABLE IF EXISTS provisiond_adopted;
DROP FUNCTION IF EXISTS provisioning_jobs_after_update();
DROP FUNCTION IF EXISTS provisioning_jobs_after_insert();
DROP FUNCTION IF EXISTS provisioning_jobs_guard_terminal();
DROP FUNCTION IF EXISTS job_events_append_only();
DROP FUNCTION IF EXISTS provisiond_notify_workers(text);
DROP FUNCTION IF EXISTS provisiond_backoff(integer, integer, integer);
DROP TYPE IF EXISTS job_executor;
DROP TYPE IF EXISTS job_status;
