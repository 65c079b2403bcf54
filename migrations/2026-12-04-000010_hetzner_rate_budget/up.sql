-- One Hetzner request budget per project, shared by every daemon on this database.
--
-- Why: Hetzner limits requests per project (3,600/h by default, refilled continuously). Each
-- daemon used to pace itself alone, so three daemons on one project spent it three times over
-- and met 429s. The bucket lives here instead, as GCRA state: `tat` is the "theoretical arrival
-- time" of the next request; the bucket holds `capacity - (tat - now) / interval` tokens, where
-- interval = 3600 / limit_per_hour seconds. A request reserves its slot by moving `tat` one
-- interval on, in one UPDATE, and waits until its slot comes; reservations are served in the
-- order they commit, so every daemon gets its share. `RateLimit-Remaining` only ever moves
-- `tat` later (the API may know of requests from other tools), a 429 empties the bucket.
-- See src/db/rate_budget.rs.
--
-- Additive: a new table; nothing existing changes, and a daemon of the previous release simply
-- does not use it.
CREATE TABLE IF NOT EXISTS hetzner_rate_budgets (
    project        text PRIMARY KEY,
    limit_per_hour double precision NOT NULL DEFAULT 3600 CHECK (limit_per_hour > 0),
    -- The largest burst the API has let us hold: the highest `remaining + 1` seen, at most the
    -- hourly limit. Starts at one request at a time until the API tells us more.
    capacity       double precision NOT NULL DEFAULT 1 CHECK (capacity >= 1),
    tat            timestamptz NOT NULL DEFAULT now(),
    -- Until the first response we do not know what is left; the first `RateLimit-Remaining`
    -- replaces the guess, later ones only lower the count.
    observed       boolean NOT NULL DEFAULT false,
    rate_limited   bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
