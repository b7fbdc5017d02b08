-- Volumes a deprovision could not delete (Fly keeps a volume bound until its machine's
-- destroy finishes). The router's sweep deletes them and removes the row.
CREATE TABLE orphaned_volumes (
    volume_id      text PRIMARY KEY,
    machine_id     text NOT NULL,
    user_id        uuid NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    last_tried_at  timestamptz NOT NULL DEFAULT now()
)
