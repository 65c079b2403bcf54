-- A job's rollback as a recorded, fenced decision.
--
-- Why: a worker that gives a job up used to delete the job's servers first and write `failed`
-- after, so a worker whose lease had just been taken over could delete the new owner's server.
-- Now the decision to roll back is written first, fenced by the lease (status stays
-- `provisioning`, the lease is kept and renewed); the rollback runs while that lease is held;
-- a last fenced write makes the job `failed` with the error and step recorded here. If the
-- worker dies mid-rollback, the sweep requeues the job and the next claimer sees these columns
-- and resumes the rollback instead of provisioning. The sweep's "no retries left" case takes the
-- same path, so a job it gives up is cleaned up too.
--
-- Additive only: nullable columns and one counter with a default; nothing the web app reads
-- changes meaning (it still sees `error` and `failed_step` only once the job is `failed`).
ALTER TABLE provisioning_jobs
    -- When the rollback was decided; NULL: the job is not rolling back.
    ADD COLUMN rollback_started_at timestamptz,
    -- The error and step the job fails with once its rollback is done.
    ADD COLUMN rollback_error text,
    ADD COLUMN rollback_step text,
    -- How often the sweep requeued the rollback because its holder died: bounded, so that a
    -- rollback that kills its worker every time ends `failed` (the reaper finishes it).
    ADD COLUMN rollback_resumes integer NOT NULL DEFAULT 0;
