-- Writers that are not the daemon: the web app's own queue module (seeds 003, 000, 004) keeps
-- working on the database a daemon serves.
--
-- Expand only (docs/MIGRATIONS.md): one nullable column, one table created if missing, functions
-- and triggers replaced or added. Nothing is dropped, no row is rewritten, and nothing the web
-- app reads changes name or meaning. Adoptable: every statement is safe on an empty database, on
-- the web app's adopted tables and on a database the previous release migrated.
--
-- What changes for a writer that is not the daemon (the daemon's pool sets
-- `provisiond.defer_notify = on`; every other session is "another writer"):
--   * it ends a job the daemon holds (the web app's on-read `checkJobTimeout` after 900 s
--     without a heartbeat, a late `updateJobStatus`): the lease ends with it, instead of the
--     update failing on `lease_only_while_provisioning`. The worker that held the job finds 0
--     rows at its next fenced write and stops; whatever it created is the reaper's;
--   * it moves a job that is already terminal (a late `updateJobStatus`): the terminal row is
--     kept as it is and the attempt is recorded in `job_events`, instead of raising PV001 in the
--     web app's callback handler. The daemon still gets PV001 (its own writes are fenced in
--     their WHERE clauses and never get there);
--   * it starts a queued job nobody ever claimed (`updateJobStatus('provisioning')` from the
--     web app's runner callback): the job becomes `external`, as the daemon's own runner route
--     does, instead of failing `daemon_provisioning_has_lease`.
-- And cancellation is expressed in words the web app knows: `failed`, with `cancelled_at` set
-- and an error saying so (the `cancelled` label stays readable for rows an older daemon wrote).

-- When an operator cancelled the job; NULL otherwise. A cancelled job is `failed`.
ALTER TABLE provisioning_jobs ADD COLUMN IF NOT EXISTS cancelled_at timestamptz;

-- A database migrated before adoption existed adopted nothing (see 2026-11-22-000001).
CREATE TABLE IF NOT EXISTS provisiond_adopted (
    object     text PRIMARY KEY,
    kind       text NOT NULL,
    adopted_at timestamptz NOT NULL DEFAULT now()
);

-- Whether the current session is a provisiond daemon (its pool sets this; see
-- provisiond_notify_workers). Older daemons set it too.
CREATE OR REPLACE FUNCTION provisiond_writer_is_daemon() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('provisiond.defer_notify', true), '') = 'on'
$$;

-- Terminal states never regress, whoever writes. The one way out of `failed` is an explicit
-- operator retry, which must bump `operator_retries` in the same update. The daemon is told
-- (PV001); any other writer's late update is ignored: the row stays as it was, the statement
-- succeeds (RETURNING shows the terminal row), and `job_events` says what was ignored.
CREATE OR REPLACE FUNCTION provisioning_jobs_guard_terminal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status::text = 'failed' AND NEW.status::text = 'queued'
       AND NEW.operator_retries = OLD.operator_retries + 1 THEN
        RETURN NEW;
    END IF;
    IF provisiond_writer_is_daemon() THEN
        RAISE EXCEPTION 'provisioning job % is % and cannot become %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'PV001';
    END IF;
    INSERT INTO job_events (job_id, step, message, data)
    VALUES (OLD.id, OLD.current_step, 'late update ignored',
            jsonb_build_object('status', OLD.status, 'ignored', NEW.status,
                               'writer', coalesce(nullif(current_setting('application_name', true), ''),
                                                  current_user)));
    RETURN OLD;
END $$;
-- Recreated so that its condition compares text: on the web app's enum a `cancelled` literal
-- would not even parse.
DROP TRIGGER IF EXISTS provisioning_jobs_terminal_guard ON provisioning_jobs;
CREATE TRIGGER provisioning_jobs_terminal_guard BEFORE UPDATE OF status ON provisioning_jobs
    FOR EACH ROW
    WHEN (OLD.status::text IN ('running', 'failed', 'cancelled')
          AND NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION provisioning_jobs_guard_terminal();

-- Another writer's update that the lease constraints would refuse. The daemon's own writes are
-- left to the constraints (a daemon write that trips them is a bug to surface, not to mend).
CREATE OR REPLACE FUNCTION provisioning_jobs_other_writer() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A terminal job is the guard's (provisioning_jobs_terminal_guard keeps it as it is).
    IF provisiond_writer_is_daemon() OR OLD.status::text IN ('running', 'failed', 'cancelled') THEN
        RETURN NEW;
    END IF;
    IF NEW.status::text <> 'provisioning' THEN
        -- The job ended (or was requeued) under a daemon's lease: the lease ends with it.
        NEW.lease_token := NULL;
        NEW.lease_owner := NULL;
        NEW.lease_expires_at := NULL;
        RETURN NEW;
    END IF;
    -- `provisioning` without a lease on a daemon job: a runner (through the web app) takes it.
    -- Only a job no one ever claimed, as the daemon's own runner route allows: one the daemon
    -- worked on may have a server, whose checkpoints only the daemon resumes.
    IF OLD.status::text = 'queued' AND OLD.claimed_at IS NULL AND OLD.operator_retries = 0 THEN
        NEW.executor := 'external';
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'provisioning job % is run by provisiond (it was claimed before): a runner cannot take it', OLD.id
        USING ERRCODE = 'PV003';
END $$;
CREATE TRIGGER provisioning_jobs_other_writer BEFORE UPDATE ON provisioning_jobs
    FOR EACH ROW
    WHEN ((NEW.lease_token IS NOT NULL AND NEW.status::text <> 'provisioning')
          OR (NEW.status::text = 'provisioning' AND NEW.lease_token IS NULL
              AND NEW.executor::text = 'daemon'))
    EXECUTE FUNCTION provisioning_jobs_other_writer();

-- The audit row now names a cancellation, and who wrote when it was not the daemon.
CREATE OR REPLACE FUNCTION provisioning_jobs_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
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
               WHEN n.status = 'failed' AND n.cancelled_at IS NOT NULL THEN 'cancelled'
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
               'failed_step', CASE WHEN n.status = 'failed' THEN n.failed_step END,
               'writer', CASE WHEN NOT provisiond_writer_is_daemon()
                              THEN coalesce(nullif(current_setting('application_name', true), ''),
                                            current_user) END))
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status;
    -- A job became claimable (queued), or a provisioning job ended and may have freed its user's
    -- next purchase.
    IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
               WHERE n.status IS DISTINCT FROM o.status AND n.status <> 'provisioning') THEN
        PERFORM provisiond_notify_workers('changed');
    END IF;
    RETURN NULL;
END $$;
