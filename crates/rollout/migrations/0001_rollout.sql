-- One row per deploy of an image to an app.
CREATE TABLE rollout_runs (
    id          UUID PRIMARY KEY,
    app         TEXT NOT NULL,
    image       TEXT NOT NULL,
    canary      INTEGER NOT NULL,
    batch       INTEGER NOT NULL,
    -- running | succeeded | rolled_back | failed
    status      TEXT NOT NULL,
    -- the app's desired image before this run: put back when the run rolls back
    previous_desired_image TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ
);

-- At most one unfinished rollout per app: a re-run resumes it.
CREATE UNIQUE INDEX rollout_runs_one_running ON rollout_runs (app) WHERE status = 'running';

-- Every machine a rollout plans to touch, with what it ran before.
CREATE TABLE rollout_machines (
    rollout_id       UUID NOT NULL REFERENCES rollout_runs (id),
    machine_id       TEXT NOT NULL,
    wave             INTEGER NOT NULL,
    position         INTEGER NOT NULL,
    previous_image   TEXT NOT NULL,
    previous_version TEXT NOT NULL,
    -- started when planned: updated with a restart and health-checked; else left asleep
    was_running      BOOLEAN NOT NULL,
    -- pending | updating | updated | failed | rolled_back | rollback_failed
    status           TEXT NOT NULL,
    new_version      TEXT,
    detail           TEXT,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, machine_id)
);

-- The image every machine of an app should run, by digest; what new machines get.
CREATE TABLE rollout_desired_images (
    app        TEXT PRIMARY KEY,
    image      TEXT NOT NULL,
    rollout_id UUID NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
