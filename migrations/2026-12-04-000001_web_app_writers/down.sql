-- Reverses 2026-12-04-000001: the previous trigger functions and guard come back, the new
-- trigger and function go. `cancelled_at` and provisiond_adopted stay (the column may hold
-- cancellations; the table is what keeps 2026-11-22-000001's down from dropping the web app's
-- tables).
DROP TRIGGER IF EXISTS provisioning_jobs_other_writer ON provisioning_jobs;
DROP FUNCTION IF EXISTS provisioning_jobs_other_writer();
CREATE OR REPLACE FUNCTION provisioning_jobs_guard_terminal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'failed' AND NEW.status = 'queued'
       AND NEW.operator_retries = OLD.operator_retries + 1 THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'provisioning job % is % and cannot become %', OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'PV001';
END $$;
CREATE OR REPLACE FUNCTION provisioning_jobs_after_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events (job_id, step, message, data)
    SELECT n.id, n.current_step,
           CASE
               WHEN n.status = 'provisioning' AND n.executor = 'daemon' THEN 'claimed'
               WHEN n.status = 'provisioning' THEN 'runner started'
               WHEN n.status = 'queued' AND o.status = 'provisioning'
                    AND n.retry_count > o.retry_count THEN 'retry scheduled'
               WHEN n.status = 'queued' AND o.status = 'provisioning' THEN 'lease handed back'
               WHEN n.status = 'queued' THEN 'requeued'
               WHEN n.status = 'running' THEN 'completed'
               WHEN n.status = 'failed' THEN 'failed'
               ELSE n.status::text
           END,
           jsonb_strip_nulls(jsonb_build_object(
               'from', o.status, 'to', n.status,
               'attempt', n.retry_count + 1,
               'lease_owner', CASE WHEN n.status = 'provisioning' THEN n.lease_owner END,
               'run_after', CASE WHEN n.status = 'queued' THEN n.run_after END,
               'error', CASE WHEN n.status = 'failed' THEN n.error
                             WHEN n.status = 'queued' THEN n.last_error END,
               'failed_step', CASE WHEN n.status = 'failed' THEN n.failed_step END))
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status;
    IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
               WHERE n.status IS DISTINCT FROM o.status AND n.status <> 'provisioning') THEN
        PERFORM provisiond_notify_workers('changed');
    END IF;
    RETURN NULL;
END $$;
DROP FUNCTION IF EXISTS provisiond_writer_is_daemon();
