//! The plan of a rollout: which machines change, in which wave. Printed by `--dry-run`.

use std::fmt;

use machines::types::{Machine, MachineState};

/// One machine the rollout will update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMachine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    /// The image it runs now (what a rollback puts back).
    pub image: String,
    /// Its `instance_id` now.
    pub version: String,
}

impl PlannedMachine {
    /// Started machines are updated and health-checked; the others are updated without
    /// being started, so a deploy never wakes a sleeping user's machine.
    pub fn is_running(&self) -> bool {
        self.state == MachineState::Started
    }
}

/// What a rollout will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub app: String,
    /// The target image, by digest.
    pub image: String,
    pub canary: usize,
    pub batch: usize,
    /// The canary first, then waves of at most `batch` machines.
    pub waves: Vec<Vec<PlannedMachine>>,
    /// Machines already on the target image: left alone.
    pub current: Vec<String>,
}

impl Plan {
    /// Orders `machines` into a canary of `canary` and waves of `batch`. Running machines
    /// come first, so that the canary is health-checked; ids break ties so that the plan is
    /// the same on every run.
    pub fn new(app: &str, image: &str, machines: &[Machine], canary: usize, batch: usize) -> Self {
        let batch = batch.max(1);
        let (current, mut todo): (Vec<&Machine>, Vec<&Machine>) =
            machines.iter().partition(|m| m.config.image == image);
        todo.sort_by(|a, b| {
            let running = |m: &Machine| m.state != MachineState::Started;
            running(a).cmp(&running(b)).then_with(|| a.id.cmp(&b.id))
        });
        let mut planned: Vec<PlannedMachine> = todo
            .into_iter()
            .map(|m| PlannedMachine {
                id: m.id.clone(),
                name: m.name.clone(),
                state: m.state,
                image: m.config.image.clone(),
                version: m.instance_id.clone(),
            })
            .collect();

        let mut waves = Vec::new();
        let canary_len = canary.min(planned.len());
        if canary_len > 0 {
            waves.push(planned.drain(..canary_len).collect());
        }
        while !planned.is_empty() {
            let len = batch.min(planned.len());
            waves.push(planned.drain(..len).collect());
        }

        let mut current: Vec<String> = current.into_iter().map(|m| m.id.clone()).collect();
        current.sort();
        Self { app: app.to_owned(), image: image.to_owned(), canary, batch, waves, current }
    }

    /// Machines the rollout will update.
    pub fn machine_count(&self) -> usize {
        self.waves.iter().map(Vec::len).sum()
    }

    /// Whether every machine already runs the image.
    pub fn is_noop(&self) -> bool {
        self.machine_count() == 0
    }

    /// A wave's name in output: `canary` or `wave N`.
    pub fn wave_name(&self, index: usize) -> String {
        wave_name(index, self.canary)
    }
}

/// The name of wave `index` of a rollout with a canary of `canary` machines.
pub(crate) fn wave_name(index: usize, canary: usize) -> String {
    match (index, canary) {
        (0, c) if c > 0 => "canary".to_owned(),
        (i, c) if c > 0 => format!("wave {i}"),
        (i, _) => format!("wave {}", i + 1),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "app {}: roll out {}", self.app, self.image)?;
        if self.is_noop() {
            return writeln!(
                f,
                "nothing to do: all {} machines run this image",
                self.current.len()
            );
        }
        writeln!(
            f,
            "{} machines to update, {} already current; canary {}, waves of {}",
            self.machine_count(),
            self.current.len(),
            self.canary,
            self.batch
        )?;
        for (index, wave) in self.waves.iter().enumerate() {
            writeln!(f, "{}:", self.wave_name(index))?;
            for machine in wave {
                let action = if machine.is_running() {
                    "update, restart, health-check"
                } else {
                    "update, leave asleep"
                };
                writeln!(
                    f,
                    "  {:<16} {:<10} {:<30} {action}",
                    machine.id,
                    machine.state.as_str(),
                    machine.image
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, state: MachineState, image: &str) -> Machine {
        let mut value = serde_json::json!({
            "id": id,
            "state": state.as_str(),
            "instance_id": format!("v-{id}"),
        });
        value["config"] = serde_json::json!({ "image": image });
        serde_json::from_value(value).expect("machine")
    }

    fn check(machines: &[Machine], canary: usize, batch: usize, expected: &str) {
        let plan = Plan::new("app", "img@new", machines, canary, batch);
        let waves: Vec<String> = plan
            .waves
            .iter()
            .map(|w| w.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(","))
            .collect();
        let got = format!("{} | current {}", waves.join(" / "), plan.current.join(","));
        assert_eq!(got, expected);
    }

    #[test]
    fn canary_takes_running_machines_and_waves_follow() {
        let machines = [
            machine("a", MachineState::Suspended, "img@old"),
            machine("b", MachineState::Started, "img@old"),
            machine("c", MachineState::Stopped, "img@old"),
            machine("d", MachineState::Started, "img@new"),
            machine("e", MachineState::Started, "img@old"),
        ];
        check(&machines, 1, 2, "b / e,a / c | current d");
        check(&machines, 0, 3, "b,e,a / c | current d");
        check(&machines, 5, 1, "b,e,a,c | current d");
    }

    #[test]
    fn nothing_to_do_when_current() {
        let machines = [machine("a", MachineState::Started, "img@new")];
        let plan = Plan::new("app", "img@new", &machines, 1, 5);
        assert!(plan.is_noop());
        assert_eq!(
            plan.to_string(),
            "app app: roll out img@new\nnothing to do: all 1 machines run this image\n"
        );
    }
}
