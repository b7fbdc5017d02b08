//! The health-gated, resumable rollout of a new image to every per-user machine of an app.
//!
//! A rollout ([`Rollout::run`]):
//!
//! 1. takes the app's deploy lock (a PostgreSQL advisory lock held by its connection);
//! 2. resumes the app's unfinished run for the same image, or plans a new one ([`Plan`]):
//!    a canary of N machines, then waves of M; machines already on the image are left alone;
//! 3. updates each machine of a wave: lease -> read -> replace `config.image` in the whole
//!    config -> update with the nonce and `current_version` (`skip_launch` when the machine
//!    is suspended or stopped, so it is never woken) -> wait -> check that `instance_id`
//!    changed -> health (started, checks passing, the daemon's `/healthz`) -> release;
//! 4. after the canary passes, records the image as the app's desired image (what newly
//!    provisioned machines get);
//! 5. halts on the first failing wave and puts every machine it touched back on its
//!    previous image.
//!
//! Progress is recorded before and after each update, so a killed rollout run again
//! continues where it stopped and never updates a machine twice.

#![forbid(unsafe_code)]

mod engine;
mod error;
mod outcome;
pub mod pg_tls;
mod plan;
pub mod store;

pub use engine::{NoProgress, Progress, Rollout, RolloutConfig};
pub use error::RolloutError;
pub use outcome::{MachineOutcome, MachineResult, Outcome, RolloutStatus};
pub use plan::{Plan, PlannedMachine};
pub use store::{desired_image, Store};
