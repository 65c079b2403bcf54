-- The provisioning queue and the tables the web app reads.
--
-- Expand only (docs/MIGRATIONS.md): nothing is dropped or rewritten; every column the daemon
-- adds is additive, so the web app's queries keep working unchanged.
-- Adoptable: the seed's objects (`job_status`, `agents`, `agent_instances`, `provisioning_jobs`)
-- may already exist, created by the web app's Drizzle migrations, with rows in them. So each of
-- them is created only if missing, and every column, constraint and index the daemon needs is
-- added only if missing (`IF NOT EXISTS`, `pg_temp.ensure_*`, installed by the migration runner).
-- On an empty database this creates exactly what it always did. What an adopted table must
-- already look like, and which existing rows would violate what is added here, the runner's
-- preflight checks before anything runs (src/db/preflight.rs); the whole run is one transaction.
--
-- Why this shape: `agents`, `agent_instances` and `provisioning_jobs` keep the seed's table names,
-- column names and status words, because the existing web app reads them to show progress.
-- The invariants that money depends on are enforced here, by the database, not by
-- check-then-insert in application code:
--   * one job per Stripe event and one job per business key (unique constraints);
--   * at most one `provisioning` job per user (a partial unique index);
--   * a terminal job never goes back (a trigger);
--   * a lease exists exactly while a daemon-run job is `provisioning` (check constraints).

-- Which of the seed's objects the web app made before provisiond came: they are the web app's,
-- and the down migration refuses to drop them.
CREATE TABLE IF NOT EXISTS provisiond_adopted (
    object     text PRIMARY KEY,
    kind       text NOT NULL,
    adopted_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO provisiond_adopted (object, kind)
SELECT o.name, o.kind
FROM (VALUES ('job_status', 'type'), ('users', 'table'), ('agents', 'table'),
             ('agent_instances', 'table'), ('provisioning_jobs', 'table')) AS o (name, kind)
WHERE CASE o.kind WHEN 'type' THEN to_regtype(o.name) IS NOT NULL
                  ELSE to_regclass(o.name) IS NOT NULL END
ON CONFLICT DO NOTHING;

-- `cancelled` is ours (a web app's enum has the seed's four words only). The daemon no longer
-- writes it (a cancelled job is `failed` with `cancelled_at`), and no statement names it as a
-- `job_status` literal, which would fail on the web app's enum: compare `status::text` instead.
SELECT pg_temp.ensure_enum('job_status',
                           ARRAY['queued', 'provisioning', 'running', 'failed', 'cancelled']);
-- Who executes a job: this daemon's step machine, or an external runner that posts the seed's
-- HMAC callbacks (the old GitHub Actions workflow, or a VM's own cloud-init).
SELECT pg_temp.ensure_enum('job_executor', ARRAY['daemon', 'external']);

-- A table is created with its key only; each column is added if missing, so one definition
-- serves both an empty database and the web app's table.
CREATE TABLE IF NOT EXISTS agents (id uuid PRIMARY KEY DEFAULT gen_random_uuid());
ALTER TABLE agents
    ADD COLUMN IF NOT EXISTS user_id    uuid NOT NULL,
    -- The web app's is an enum (`draft` → `active`); the daemon only ever writes `active`, as a
    -- literal PostgreSQL types from the column.
    ADD COLUMN IF NOT EXISTS status     text NOT NULL DEFAULT 'draft',
    ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();
-- Lets provisioning_jobs reference (agent, user) together: a job can only be for an agent that
-- belongs to the paying user.
SELECT pg_temp.ensure_constraint('agents', 'agents_id_user_id_key', 'UNIQUE (id, user_id)');
CREATE INDEX IF NOT EXISTS agents_user_id_idx ON agents (user_id);

CREATE TABLE IF NOT EXISTS provisioning_jobs (id uuid PRIMARY KEY DEFAULT gen_random_uuid());
ALTER TABLE provisioning_jobs
    -- seed columns (seed 003), names and meaning unchanged
    ADD COLUMN IF NOT EXISTS agent_id          uuid NOT NULL,
    ADD COLUMN IF NOT EXISTS user_id           uuid NOT NULL,
    ADD COLUMN IF NOT EXISTS stripe_event_id   text,
    ADD COLUMN IF NOT EXISTS status            job_status NOT NULL DEFAULT 'queued',
    ADD COLUMN IF NOT EXISTS region            text NOT NULL DEFAULT 'us-east',
    ADD COLUMN IF NOT EXISTS workflow_run_id   text,
    ADD COLUMN IF NOT EXISTS retry_count       integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS max_retries       integer NOT NULL DEFAULT 3,
    ADD COLUMN IF NOT EXISTS error             text,
    ADD COLUMN IF NOT EXISTS failed_step       text,
    ADD COLUMN IF NOT EXISTS claimed_at        timestamptz,
    ADD COLUMN IF NOT EXISTS last_heartbeat_at timestamptz,
    ADD COLUMN IF NOT EXISTS completed_at      timestamptz,
    ADD COLUMN IF NOT EXISTS created_at        timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at        timestamptz NOT NULL DEFAULT now(),

    -- ours: idempotency, scheduling, lease
    -- The purchase itself (Checkout Session / PaymentIntent id): Stripe may send several events
    -- for one purchase, and they must not provision twice.
    ADD COLUMN IF NOT EXISTS business_key      text,
    -- Rows that exist when this column is added were made by the web app for its runners, so
    -- they are `external` (a constant default: no rewrite); new rows default to the daemon.
    ADD COLUMN IF NOT EXISTS executor          job_executor NOT NULL DEFAULT 'external',
    -- Backoff: a queued job is not claimable before this time.
    ADD COLUMN IF NOT EXISTS run_after         timestamptz NOT NULL DEFAULT now(),
    -- Fencing: every worker write carries the token it got when it claimed the job.
    ADD COLUMN IF NOT EXISTS lease_token       uuid,
    ADD COLUMN IF NOT EXISTS lease_owner       text,
    ADD COLUMN IF NOT EXISTS lease_expires_at  timestamptz,
    -- The error of the last retryable failure; `error` stays the seed's terminal error.
    ADD COLUMN IF NOT EXISTS last_error        text,
    -- Incremented by an explicit operator retry of a failed job; the only way out of `failed`.
    ADD COLUMN IF NOT EXISTS operator_retries  integer NOT NULL DEFAULT 0,
    -- The last step this job reached (its checkpoints are below).
    ADD COLUMN IF NOT EXISTS current_step      text,

    -- ours: step checkpoints, so a resumed attempt finds what an earlier one did
    ADD COLUMN IF NOT EXISTS tailscale_key_id  text,
    ADD COLUMN IF NOT EXISTS server_name       text,
    ADD COLUMN IF NOT EXISTS server_id         bigint,
    ADD COLUMN IF NOT EXISTS server_ip         text,
    ADD COLUMN IF NOT EXISTS location          text,
    ADD COLUMN IF NOT EXISTS pending_action_ids bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS device_id         text,
    ADD COLUMN IF NOT EXISTS tailscale_ip      text;
ALTER TABLE provisioning_jobs ALTER COLUMN executor SET DEFAULT 'daemon';

-- The web app's own UNIQUE (stripe_event_id) and foreign keys count as these (same definition).
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'provisioning_jobs_stripe_event_id_key',
                                 'UNIQUE (stripe_event_id)');
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'provisioning_jobs_business_key_key',
                                 'UNIQUE (business_key)');
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'provisioning_jobs_retry_count_check',
                                 'CHECK (retry_count >= 0)');
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'provisioning_jobs_max_retries_check',
                                 'CHECK (max_retries >= 0)');
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'provisioning_jobs_agent_of_user',
    'FOREIGN KEY (agent_id, user_id) REFERENCES agents(id, user_id) ON DELETE CASCADE');
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'lease_only_while_provisioning',
                                 'CHECK (lease_token IS NULL OR status = ''provisioning'')');
SELECT pg_temp.ensure_constraint('provisioning_jobs', 'daemon_provisioning_has_lease',
    'CHECK (executor <> ''daemon'' OR status <> ''provisioning'' OR lease_token IS NOT NULL)');

-- At most one job per user is provisioning: a second purchase waits in `queued`.
CREATE UNIQUE INDEX IF NOT EXISTS provisioning_jobs_one_provisioning_per_user
    ON provisioning_jobs (user_id) WHERE status = 'provisioning';
-- The claim scans this in created_at order.
CREATE INDEX IF NOT EXISTS provisioning_jobs_claimable
    ON provisioning_jobs (created_at, id) WHERE status = 'queued' AND executor = 'daemon';
-- The sweep looks for expired leases and silent external runners.
CREATE INDEX IF NOT EXISTS provisioning_jobs_in_flight
    ON provisioning_jobs (lease_expires_at) WHERE status = 'provisioning';
-- The status API finds an agent's latest job.
CREATE INDEX IF NOT EXISTS provisioning_jobs_agent_idx ON provisioning_jobs (agent_id, created_at DESC);
CREATE INDEX IF NOT EXISTS provisioning_jobs_status_idx ON provisioning_jobs (status);

CREATE TABLE IF NOT EXISTS agent_instances (id uuid PRIMARY KEY DEFAULT gen_random_uuid());
ALTER TABLE agent_instances
    ADD COLUMN IF NOT EXISTS agent_id     uuid NOT NULL,
    -- ours: the job that made this instance, so completion is an idempotent upsert
    ADD COLUMN IF NOT EXISTS job_id       uuid,
    -- The web app's is an enum (seeds 000/004); the daemon writes literals that fit both.
    ADD COLUMN IF NOT EXISTS status       text NOT NULL DEFAULT 'pending',
    ADD COLUMN IF NOT EXISTS server_id    text,
    ADD COLUMN IF NOT EXISTS server_ip    text,
    ADD COLUMN IF NOT EXISTS tailscale_ip text,
    ADD COLUMN IF NOT EXISTS region       text,
    ADD COLUMN IF NOT EXISTS current_step text,
    ADD COLUMN IF NOT EXISTS started_at   timestamptz,
    ADD COLUMN IF NOT EXISTS created_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at   timestamptz NOT NULL DEFAULT now();
SELECT pg_temp.ensure_constraint('agent_instances', 'agent_instances_agent_id_fkey',
    'FOREIGN KEY (agent_id) REFERENCES agents(id) ON DELETE CASCADE');
SELECT pg_temp.ensure_constraint('agent_instances', 'agent_instances_job_id_key', 'UNIQUE (job_id)');
SELECT pg_temp.ensure_constraint('agent_instances', 'agent_instances_job_id_fkey',
    'FOREIGN KEY (job_id) REFERENCES provisioning_jobs(id) ON DELETE SET NULL');
CREATE INDEX IF NOT EXISTS agent_instances_agent_idx ON agent_instances (agent_id);

-- Append-only audit trail and the timeline the status API returns.
CREATE TABLE job_events (
    id      bigserial PRIMARY KEY,
    job_id  uuid NOT NULL REFERENCES provisioning_jobs (id) ON DELETE CASCADE,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    step    text,
    message text NOT NULL,
    data    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX job_events_job_idx ON job_events (job_id, id);

CREATE FUNCTION job_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job_events is append-only' USING ERRCODE = 'PV002';
END $$;
CREATE TRIGGER job_events_no_update BEFORE UPDATE ON job_events
    FOR EACH ROW EXECUTE FUNCTION job_events_append_only();

-- Terminal states never regress, whoever writes (a late runner callback, the web app, a stale
-- worker). The one way out of `failed` is an explicit operator retry, which must bump
-- `operator_retries` in the same update so that it is deliberate and recorded.
CREATE FUNCTION provisioning_jobs_guard_terminal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'failed' AND NEW.status = 'queued'
       AND NEW.operator_retries = OLD.operator_retries + 1 THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'provisioning job % is % and cannot become %', OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'PV001';
END $$;
CREATE TRIGGER provisioning_jobs_terminal_guard BEFORE UPDATE OF status ON provisioning_jobs
    FOR EACH ROW
    WHEN (OLD.status::text IN ('running', 'failed', 'cancelled')
          AND NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION provisioning_jobs_guard_terminal();

-- Exponential backoff with "equal jitter": half the capped delay is guaranteed, half is random,
-- so retries of many jobs spread out but none comes back immediately. One definition, used by the
-- worker's retry and by the sweep alike.
CREATE FUNCTION provisiond_backoff(retry_count integer, base_ms integer, cap_ms integer)
RETURNS interval LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => d / 2000.0 + random() * d / 2000.0)
    FROM (SELECT least(cap_ms::float8, base_ms::float8 * power(2, least(retry_count, 30))) AS d) AS s
$$;

-- Status transitions are recorded and announced by the database, so that every writer (this
-- daemon, the web app, an operator with psql) leaves an audit row, and workers wake when a job
-- may have become claimable. Statement-level triggers with transition tables keep this to one
-- INSERT per statement, which matters for batched claims and completions.
--
-- Why NOTIFY is skipped for the daemon's own connections: PostgreSQL serialises the commits of
-- all transactions that NOTIFY (a cluster-wide lock held through the commit's fsync), which cut
-- enqueue throughput about six-fold. The daemon's pool sets `provisiond.defer_notify = on`, and
-- the daemon sends one coalesced NOTIFY right after its commits instead (queue.rs, `Notifier`).
-- Any other writer still notifies inside its own transaction.
CREATE FUNCTION provisiond_notify_workers(reason text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('provisiond.defer_notify', true), '') <> 'on' THEN
        PERFORM pg_notify('provisiond_jobs', reason);
    END IF;
END $$;

CREATE FUNCTION provisioning_jobs_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events (job_id, message, data)
    SELECT n.id, 'enqueued',
           jsonb_strip_nulls(jsonb_build_object(
               'executor', n.executor, 'region', n.region,
               'stripe_event_id', n.stripe_event_id, 'business_key', n.business_key))
    FROM new_rows n;
    IF EXISTS (SELECT 1 FROM new_rows WHERE status = 'queued') THEN
        PERFORM provisiond_notify_workers('enqueued');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER provisioning_jobs_inserted AFTER INSERT ON provisioning_jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning_jobs_after_insert();

CREATE FUNCTION provisioning_jobs_after_update() RETURNS trigger LANGUAGE plpgsql AS $$
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
    -- A job became claimable (queued), or a provisioning job ended and may have freed its user's
    -- next purchase.
    IF EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
               WHERE n.status IS DISTINCT FROM o.status AND n.status <> 'provisioning') THEN
        PERFORM provisiond_notify_workers('changed');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER provisioning_jobs_updated AFTER UPDATE ON provisioning_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION provisioning_jobs_after_update();
