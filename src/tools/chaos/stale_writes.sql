-- The chaos suite's stale-write detector, installed on its scratch database only (never by a
-- migration). It watches every UPDATE of provisioning_jobs made by a daemon connection
-- (application_name 'chaos-d<slot>g<generation>', one per process incarnation) and records a
-- write that a lease-holder could not have made:
--
-- 1. "decided on a lease the row no longer has": the token the writing statement saw in its own
--    snapshot (what its WHERE clause and CTEs were evaluated against) differs from the token of
--    the row version it is about to overwrite. That is exactly a fenced write that waited on a
--    row lock while the lease changed hands and was not re-checked (PostgreSQL re-evaluates only
--    the UPDATE's own WHERE after the wait). The trigger function is STABLE, so its queries run
--    on the calling statement's snapshot rather than a fresh one; OLD is the newest version.
-- 2. "wrote a lease another process holds": the row is provisioning under a live lease that a
--    different process incarnation claimed (recorded in chaos_claims when the token was set),
--    and the writer is not the sweep taking an expired lease.
--
-- A fenced write from a stale worker that correctly matches 0 rows fires no row trigger, so
-- correct code records nothing. Limits: a stale task of the same process writing without any
-- token check and without waiting is invisible to rule 2 (same application_name); rule 1 still
-- catches it if it waited on the row.

CREATE TABLE chaos_claims (
    token  uuid PRIMARY KEY,
    job_id uuid NOT NULL,
    writer text NOT NULL,
    at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE chaos_stale_writes (
    id         bigserial PRIMARY KEY,
    job_id     uuid NOT NULL,
    writer     text NOT NULL,
    rule       text NOT NULL,
    seen_token uuid,
    row_token  uuid,
    row_holder text,
    old_status text,
    new_status text,
    query      text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- VOLATILE helpers: the STABLE trigger may not write itself, but may call functions that do.
CREATE FUNCTION chaos_record_stale(job uuid, writer text, rule text, seen uuid, row_token uuid,
                                   holder text, old_status text, new_status text)
RETURNS void LANGUAGE sql VOLATILE AS $$
    INSERT INTO chaos_stale_writes
        (job_id, writer, rule, seen_token, row_token, row_holder, old_status, new_status, query)
    VALUES (job, writer, rule, seen, row_token, holder, old_status, new_status, current_query())
$$;

CREATE FUNCTION chaos_record_claim(tok uuid, job uuid, who text)
RETURNS void LANGUAGE sql VOLATILE AS $$
    INSERT INTO chaos_claims (token, job_id, writer) VALUES (tok, job, who)
    ON CONFLICT DO NOTHING
$$;

CREATE FUNCTION chaos_check_lease_write() RETURNS trigger LANGUAGE plpgsql STABLE AS $$
DECLARE
    writer text := current_setting('application_name');
    seen uuid;
    holder text;
BEGIN
    IF writer NOT LIKE 'chaos-d%' THEN
        RETURN NEW;
    END IF;
    SELECT j.lease_token INTO seen FROM provisioning_jobs j WHERE j.id = OLD.id;
    SELECT c.writer INTO holder FROM chaos_claims c WHERE c.token = OLD.lease_token;
    IF seen IS NOT NULL AND seen IS DISTINCT FROM OLD.lease_token THEN
        PERFORM chaos_record_stale(OLD.id, writer, 'decided on a lease the row no longer has',
                                   seen, OLD.lease_token, holder, OLD.status::text,
                                   NEW.status::text);
    ELSIF OLD.status = 'provisioning' AND OLD.lease_token IS NOT NULL
          AND holder IS DISTINCT FROM writer AND NOT (OLD.lease_expires_at < now()) THEN
        PERFORM chaos_record_stale(OLD.id, writer, 'wrote a lease another process holds',
                                   seen, OLD.lease_token, holder, OLD.status::text,
                                   NEW.status::text);
    END IF;
    IF NEW.lease_token IS NOT NULL AND NEW.lease_token IS DISTINCT FROM OLD.lease_token THEN
        PERFORM chaos_record_claim(NEW.lease_token, NEW.id, writer);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER chaos_check_lease_write BEFORE UPDATE ON provisioning_jobs
    FOR EACH ROW EXECUTE FUNCTION chaos_check_lease_write();
