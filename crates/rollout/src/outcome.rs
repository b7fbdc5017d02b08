//! What a rollout did, machine by machine, and the table printed at the end.

use std::collections::BTreeMap;
use std::fmt;

use uuid::Uuid;

/// What happened to one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MachineResult {
    /// Updated, restarted, and healthy on the new image.
    Updated,
    /// Updated without being started (it was suspended or stopped).
    UpdatedAsleep,
    /// Already on the target image: untouched.
    Current,
    /// Its update or health check failed.
    Failed,
    /// Left as it was: someone else held its lease (a router wake, another deploy).
    SkippedLeased,
    /// Put back on its previous image after a failed wave.
    RolledBack,
    /// The rollback itself failed: needs a look.
    RollbackFailed,
    /// Not reached: the rollout halted before its wave.
    NotReached,
}

impl MachineResult {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineResult::Updated => "updated",
            MachineResult::UpdatedAsleep => "updated (asleep)",
            MachineResult::Current => "already current",
            MachineResult::Failed => "failed",
            MachineResult::SkippedLeased => "skipped: leased by another",
            MachineResult::RolledBack => "rolled back",
            MachineResult::RollbackFailed => "rollback failed",
            MachineResult::NotReached => "not reached",
        }
    }

    /// Whether this result makes the deploy a failure.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            MachineResult::Failed | MachineResult::SkippedLeased | MachineResult::RollbackFailed
        )
    }
}

/// One row of the final table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineOutcome {
    pub machine_id: String,
    pub result: MachineResult,
    /// Why it failed, when it did.
    pub detail: Option<String>,
}

/// How the rollout as a whole ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutStatus {
    /// Every machine already ran the image.
    NothingToDo,
    Succeeded,
    /// A wave failed; the machines it had touched are back on their previous image.
    RolledBack,
}

/// The result of [`crate::Rollout::run`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub app: String,
    pub image: String,
    pub run: Option<Uuid>,
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
    pub status: RolloutStatus,
    pub machines: Vec<MachineOutcome>,
}

impl Outcome {
    /// Whether the deploy failed (the exit status of `cargo xtask deploy`).
    pub fn failed(&self) -> bool {
        self.status == RolloutStatus::RolledBack
            || self.machines.iter().any(|m| m.result.is_failure())
    }

    /// How many machines ended with `result`.
    pub fn count(&self, result: MachineResult) -> usize {
        self.machines.iter().filter(|m| m.result == result).count()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            RolloutStatus::NothingToDo => "nothing to do",
            RolloutStatus::Succeeded => "succeeded",
            RolloutStatus::RolledBack => "FAILED, rolled back",
        };
        let resumed = if self.resumed { " (resumed)" } else { "" };
        writeln!(f, "rollout of {} to {}: {status}{resumed}", self.image, self.app)?;

        let mut by_result: BTreeMap<MachineResult, Vec<&str>> = BTreeMap::new();
        for machine in &self.machines {
            by_result.entry(machine.result).or_default().push(&machine.machine_id);
        }
        writeln!(f, "{:<26} {:>5}  machines", "outcome", "count")?;
        for (result, ids) in &by_result {
            let mut shown = ids.iter().take(6).copied().collect::<Vec<_>>().join(" ");
            if ids.len() > 6 {
                shown.push_str(&format!(" (+{})", ids.len() - 6));
            }
            writeln!(f, "{:<26} {:>5}  {shown}", result.as_str(), ids.len())?;
        }
        for machine in self.machines.iter().filter(|m| m.detail.is_some()) {
            let detail = machine.detail.as_deref().unwrap_or_default();
            writeln!(f, "  {} {}: {detail}", machine.machine_id, machine.result.as_str())?;
        }
        Ok(())
    }
}
