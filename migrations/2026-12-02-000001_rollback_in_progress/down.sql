ALTER TABLE provisioning_jobs
    DROP COLUMN rollback_resumes,
    DROP COLUMN rollback_step,
    DROP COLUMN rollback_error,
    DROP COLUMN rollback_started_at;
