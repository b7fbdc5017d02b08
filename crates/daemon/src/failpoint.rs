//! Crash points for tests: when `MATRIX_FAILPOINT` names a step, the process kills itself
//! with SIGKILL on reaching it, exactly as an out-of-memory kill or a power cut would stop
//! it there. Unset in production, where this is one environment lookup per step.

/// Kills the process with SIGKILL when the failpoint variable names `step`.
pub fn hit(step: &str) {
    if crate::config::failpoint().as_deref() == Some(step) {
        tracing::warn!(step, "failpoint reached: killing the process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
