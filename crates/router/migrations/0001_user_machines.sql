-- One row per user: the machine and volume that serve them.
CREATE TABLE user_machines (
    user_id     uuid PRIMARY KEY,
    machine_id  text NOT NULL UNIQUE,
    volume_id   text NOT NULL,
    region      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
