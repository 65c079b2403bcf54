-- The provisioning queue and the tables the web app reads.
--
-- Why this shape: `agents`, `agent_instances` and `provisioning_jobs` keep the seed's table names,
-- column names and status words, because the existing web app reads them to show progress. Every
-- column the daemon adds is additive, so the web app's queries keep working unchanged.
-- The invariants that money depends on are enforced here, by the database, not by
-- check-then-insert in application code:
--   * one job per Stripe event and one job per business key (unique constraints);
--   * at most one `provisioning` job per user (a partial unique index);
--   * a terminal job never goes back (a trigger);
--   * a lease exists exactly while a daemon-run job is `provisioning` (check constraints).

CREATE TYPE job_status AS ENUM ('queued', 'provisioning', 'running', 'failed', 'cancelled');
-- Who executes a job: this daemon's step machine, or an external runner that posts the seed's
-- HMAC callbacks (the old GitHub Actions workflow, or a VM's own cloud-init).
CREATE TYPE job_executor AS ENUM ('daemon', 'external');

CREATE TABLE agents (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL,
    status     text NOT NULL DEFAULT 'draft',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Lets provisioning_jobs reference (agent, user) together: a job can only be for an agent
    -- that belongs to the paying user.
    UNIQUE (id, user_id)
);
CREATE INDEX agents_user_id_idx ON agents (user_id);

CREATE TABLE provisioning_jobs (
    -- seed columns (seed 003), names and meaning unchanged
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id          uuid NOT NULL,
    user_id           uuid NOT NULL,
    stripe_event_id   text UNIQUE,
    status            job_status NOT NULL DEFAULT 'queued',
    region            text NOT NULL DEFAULT 'us-east',
    workflow_run_id   text,
    retry_count       integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    max_retries       integer NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    error             text,
    failed_step       text,
    claimed_at        timestamptz,
    last_heartbeat_at timestamptz,
    completed_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),

    -- ours: idempotency, scheduling, lease
    -- The purchase itself (Checkout Session / PaymentIntent id): Stripe may send several events
    -- for one purchase, and they must not provision twice.
    business_key      text UNIQUE,
    executor          job_executor NOT NULL DEFAULT 'daemon',
    -- Backoff: a queued job is not claimable before this time.
    run_after         timestamptz NOT NULL DEFAULT now(),
    -- Fencing: every worker write carries the token it got when it claimed the job.
    lease_token       uuid,
    lease_owner       text,
    lease_expires_at  timestamptz,
    -- The error of the last retryable failure; `error` stays the seed's terminal error.
    last_error        text,
    -- Incremented by an explicit operator retry of a failed job; the only way out of `failed`.
    operator_retries  integer NOT NULL DEFAULT 0,
    -- The last step this job reached (its checkpoints are below).
    current_step      text,

    -- ours: step checkpoints, so a resumed attempt finds what an earlier one did
    tailscale_key_id  text,
    server_name       text,
    server_id         bigint,
    server_ip         text,
    location          text,
    pending_action_ids bigint[] NOT NULL DEFAULT '{}',
    device_id         text,
    tailscale_ip      text,

    CONSTRAINT provisioning_jobs_agent_of_user FOREIGN KEY (agent_id, user_id)
        REFERENCES agents (id, user_id) ON DELETE CASCADE,
    CONSTRAINT lease_only_while_provisioning
        CHECK (lease_token IS NULL OR status = 'provisioning'),
    CONSTRAINT daemon_provisioning_has_lease
        CHECK (executor <> 'daemon' OR status <> 'provisioning' OR lease_token IS NOT NULL)
);

-- At most one job per user is provisioning: a second purchase waits in `queued`.
CREATE UNIQUE INDEX provisioning_jobs_one_provisioning_per_user
    ON provisioning_jobs (user_id) WHERE status = 'provisioning';
-- The claim scans this in created_at order.
CREATE INDEX provisioning_jobs_claimable
    ON provisioning_jobs (created_at, id) WHERE status = 'queued' AND executor = 'daemon';
-- The sweep looks for expired leases and silent external runners.
CREATE INDEX provisioning_jobs_in_flight
    ON provisioning_jobs (lease_expires_at) WHERE status = 'provisioning';
-- The status API finds an agent's latest job.
CREATE INDEX provisioning_jobs_agent_idx ON provisioning_jobs (agent_id, created_at DESC);
CREATE INDEX provisioning_jobs_status_idx ON provisioning_jobs (status);

CREATE TABLE agent_instances (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id     uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    -- ours: the job that made this instance, so completion is an idempotent upsert
    job_id       uuid UNIQUE REFERENCES provisioning_jobs (id) ON DELETE SET NULL,
    status       text NOT NULL DEFAULT 'pending',
    server_id    text,
    server_ip    text,
    tailscale_ip text,
    region       text,
    current_step text,
    started_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_instances_agent_idx ON agent_instances (agent_id);

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
    WHEN (OLD.status IN ('running', 'failed', 'cancelled') AND NEW.status IS DISTINCT FROM OLD.status)
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
