-- One row per machine: when any replica last saw traffic on it, and when one last suspended
-- it for idleness. Shared so that no replica suspends a machine another is still serving.
CREATE TABLE machine_activity (
    machine_id    text PRIMARY KEY,
    last_active   timestamptz NOT NULL,
    suspended_at  timestamptz
);
