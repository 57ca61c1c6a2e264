//! Restart policy and backoff: pure decisions, time given as a parameter (no clock).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The `process_manager` section (seed names and defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessManagerConfig {
    /// After the shutdown request, how long a collector may take to exit before SIGTERM
    /// (default 60 s).
    pub graceful_shutdown_timeout_seconds: u64,
    /// After SIGTERM, how long before SIGKILL (default 5 s).
    pub force_shutdown_timeout_seconds: u64,
    /// A collector whose heartbeats stop for this long is Unhealthy (default 120 s).
    pub health_check_interval_seconds: u64,
    /// Restart collectors that exit or turn Unhealthy (default true).
    pub enable_auto_restart: bool,
    /// Restarts in a row before a collector is Failed (default 3).
    pub max_restart_attempts: u32,
    /// Delay before the first restart; doubled for each further one, up to 64× (default 5 s).
    pub restart_backoff_seconds: u64,
}

impl Default for ProcessManagerConfig {
    fn default() -> Self {
        Self {
            graceful_shutdown_timeout_seconds: 60,
            force_shutdown_timeout_seconds: 5,
            health_check_interval_seconds: 120,
            enable_auto_restart: true,
            max_restart_attempts: 3,
            restart_backoff_seconds: 5,
        }
    }
}

impl ProcessManagerConfig {
    /// Checks every value; the error names the field.
    ///
    /// # Errors
    ///
    /// A sentence naming the first field out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.force_shutdown_timeout_seconds == 0 {
            return Err("process_manager.force_shutdown_timeout_seconds must be at least 1".into());
        }
        if self.health_check_interval_seconds == 0 {
            return Err("process_manager.health_check_interval_seconds must be at least 1".into());
        }
        if self.max_restart_attempts > 1000 {
            return Err("process_manager.max_restart_attempts is at most 1000".into());
        }
        if self.restart_backoff_seconds > 3600 {
            return Err("process_manager.restart_backoff_seconds is at most 3600".into());
        }
        Ok(())
    }

    /// The restart policy these settings describe.
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy {
            enabled: self.enable_auto_restart,
            max_attempts: self.max_restart_attempts,
            backoff: Duration::from_secs(self.restart_backoff_seconds),
            // A run this long proves the restart worked: the count starts again.
            stable_after: Duration::from_secs(self.health_check_interval_seconds.max(60)),
        }
    }
}

/// What to do after a collector stopped on its own (crashed, exited, or was killed for being
/// unhealthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this delay; this is restart number `attempt` in a row (from 1).
    Restart {
        /// Delay before the restart.
        after: Duration,
        /// Restart number in a row.
        attempt: u32,
    },
    /// Leave it stopped: Failed with this reason.
    GiveUp(String),
}

/// When and how often to restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restart at all.
    pub enabled: bool,
    /// Restarts in a row before giving up.
    pub max_attempts: u32,
    /// First delay; doubled per further restart, up to 64×.
    pub backoff: Duration,
    /// A run at least this long resets the count of restarts in a row.
    pub stable_after: Duration,
}

impl RestartPolicy {
    /// The delay before restart number `attempt` (from 1): `backoff × 2^(attempt-1)`, capped
    /// at 64 × `backoff`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(6);
        self.backoff.saturating_mul(factor)
    }

    /// Decides after a collector stopped on its own, having run for `ran` since its last
    /// start, with `restarts` restarts in a row before this one; `why` says how it ended.
    pub fn decide(&self, restarts: u32, ran: Duration, why: &str) -> Decision {
        if !self.enabled {
            return Decision::GiveUp(format!("{why}; auto restart is disabled"));
        }
        let restarts = if ran >= self.stable_after {
            0
        } else {
            restarts
        };
        if restarts >= self.max_attempts {
            return Decision::GiveUp(format!(
                "{why}; gave up after {restarts} restarts in a row (max_restart_attempts)"
            ));
        }
        let attempt = restarts + 1;
        Decision::Restart {
            after: self.delay(attempt),
            attempt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        ProcessManagerConfig::default().restart_policy()
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let p = policy();
        let delays: Vec<u64> = (1..=9).map(|a| p.delay(a).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 320, 320]);
    }

    #[test]
    fn restarts_until_the_limit_then_fails_with_the_reason() {
        let p = policy();
        let quick = Duration::from_secs(1);
        assert_eq!(
            p.decide(0, quick, "exit status 3"),
            Decision::Restart {
                after: Duration::from_secs(5),
                attempt: 1
            }
        );
        assert_eq!(
            p.decide(2, quick, "exit status 3"),
            Decision::Restart {
                after: Duration::from_secs(20),
                attempt: 3
            }
        );
        let Decision::GiveUp(why) = p.decide(3, quick, "killed by SIGSEGV") else {
            panic!("the fourth crash in a row gives up");
        };
        assert!(
            why.starts_with("killed by SIGSEGV; gave up after 3 restarts"),
            "{why}"
        );
        // A long, healthy run starts the count again.
        assert!(matches!(
            p.decide(3, Duration::from_secs(600), "exit status 1"),
            Decision::Restart { attempt: 1, .. }
        ));
        let off = RestartPolicy {
            enabled: false,
            ..policy()
        };
        assert!(
            matches!(off.decide(0, quick, "exit"), Decision::GiveUp(w) if w.contains("disabled"))
        );
    }

    #[test]
    fn configuration_is_checked() {
        assert_eq!(ProcessManagerConfig::default().validate(), Ok(()));
        let bad = ProcessManagerConfig {
            force_shutdown_timeout_seconds: 0,
            ..ProcessManagerConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("force_shutdown_timeout_seconds")
        );
    }
}
