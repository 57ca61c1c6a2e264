//! RPC configuration and retry policies per operation class (pure: no clock, no I/O).
//!
//! Seed defaults (`seeds/001_…`, "RPC Timeout and Retry Policies"): lifecycle 30 s, no retry;
//! health checks 5 s, 3 retries; configuration 15 s with exponential backoff; heartbeats 2 s
//! with an immediate retry. Only transient failures are retried (timeout, no responders,
//! communication errors, busy); a refused or failed operation never is.

use daemoneye_eventbus_schema::rpc::CollectorOperation;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long to wait between attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backoff {
    /// Retry at once.
    Immediate {},
    /// Wait `initial_ms`, then multiply by `multiplier` after each retry, up to `max_ms`.
    Exponential {
        /// First delay, milliseconds.
        initial_ms: u64,
        /// Growth per retry (at least 1).
        multiplier: f64,
        /// Largest delay, milliseconds.
        max_ms: u64,
    },
}

/// Timeout and retries of one operation class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Deadline of each attempt, seconds.
    pub timeout_seconds: u64,
    /// Attempts after the first one.
    pub max_retries: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// The deadline of each attempt.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }

    /// The delay before retry number `retry` (0 = the first retry), or `None` when the policy
    /// allows no more retries.
    pub fn delay_before_retry(&self, retry: u32) -> Option<Duration> {
        if retry >= self.max_retries {
            return None;
        }
        Some(match &self.backoff {
            Backoff::Immediate {} => Duration::ZERO,
            Backoff::Exponential {
                initial_ms,
                multiplier,
                max_ms,
            } => {
                let m = if multiplier.is_finite() {
                    multiplier.max(1.0)
                } else {
                    1.0
                };
                let ms = (*initial_ms as f64) * m.powi(i32::try_from(retry.min(64)).unwrap_or(64));
                Duration::from_millis(ms.min(*max_ms as f64) as u64)
            }
        })
    }

    /// Checks the policy; returns what is wrong, naming the field.
    ///
    /// # Errors
    ///
    /// A sentence naming the field when a value is out of range.
    pub fn validate(&self, class: &str) -> Result<(), String> {
        if self.timeout_seconds == 0 {
            return Err(format!(
                "rpc.policies.{class}.timeout_seconds must be at least 1"
            ));
        }
        if self.max_retries > 100 {
            return Err(format!(
                "rpc.policies.{class}.max_retries is {}, the limit is 100",
                self.max_retries
            ));
        }
        if let Backoff::Exponential {
            multiplier,
            max_ms,
            initial_ms,
            ..
        } = &self.backoff
        {
            if !multiplier.is_finite() || *multiplier < 1.0 {
                return Err(format!(
                    "rpc.policies.{class}.backoff.multiplier must be a number ≥ 1"
                ));
            }
            if max_ms < initial_ms {
                return Err(format!(
                    "rpc.policies.{class}.backoff.max_ms must be ≥ initial_ms"
                ));
            }
        }
        Ok(())
    }
}

/// Which policy an operation follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationClass {
    /// start, stop, restart, status, shutdown.
    Lifecycle,
    /// health check, metrics, capabilities.
    HealthCheck,
    /// get, validate and update configuration.
    Configuration,
    /// heartbeat.
    Heartbeat,
}

impl OperationClass {
    /// The class of `op`.
    pub fn of(op: CollectorOperation) -> Self {
        use CollectorOperation as O;
        match op {
            // Collection tasks read, like health checks: retrying one is harmless.
            O::HealthCheck | O::GetMetrics | O::GetCapabilities | O::ExecuteTask => {
                Self::HealthCheck
            }
            O::GetConfig | O::ValidateConfig | O::UpdateConfig => Self::Configuration,
            O::Heartbeat => Self::Heartbeat,
            O::Start
            | O::Stop
            | O::Restart
            | O::Status
            | O::Shutdown
            | O::Pause
            | O::Resume
            | O::Unspecified => Self::Lifecycle,
        }
    }
}

/// Retry policies per operation class (the `rpc.policies` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicies {
    /// Lifecycle operations: 30 s, no retry (default).
    pub lifecycle: RetryPolicy,
    /// Health checks: 5 s, 3 retries, 100 ms apart growing ×2 (default).
    pub health_check: RetryPolicy,
    /// Configuration: 15 s, 3 retries with exponential backoff from 500 ms to 5 s (default).
    pub configuration: RetryPolicy,
    /// Heartbeats: 2 s, one immediate retry (default).
    pub heartbeat: RetryPolicy,
}

impl Default for RetryPolicies {
    fn default() -> Self {
        Self {
            lifecycle: RetryPolicy {
                timeout_seconds: 30,
                max_retries: 0,
                backoff: Backoff::Immediate {},
            },
            health_check: RetryPolicy {
                timeout_seconds: 5,
                max_retries: 3,
                backoff: Backoff::Exponential {
                    initial_ms: 100,
                    multiplier: 2.0,
                    max_ms: 1_000,
                },
            },
            configuration: RetryPolicy {
                timeout_seconds: 15,
                max_retries: 3,
                backoff: Backoff::Exponential {
                    initial_ms: 500,
                    multiplier: 2.0,
                    max_ms: 5_000,
                },
            },
            heartbeat: RetryPolicy {
                timeout_seconds: 2,
                max_retries: 1,
                backoff: Backoff::Immediate {},
            },
        }
    }
}

impl RetryPolicies {
    /// The policy of `op`.
    pub fn for_operation(&self, op: CollectorOperation) -> &RetryPolicy {
        match OperationClass::of(op) {
            OperationClass::Lifecycle => &self.lifecycle,
            OperationClass::HealthCheck => &self.health_check,
            OperationClass::Configuration => &self.configuration,
            OperationClass::Heartbeat => &self.heartbeat,
        }
    }
}

/// The `rpc` section of the configuration (seed names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Deadline of a whole call (retries included) given as zero, seconds (default 30).
    pub default_timeout_seconds: u64,
    /// How often the agent health-checks each collector, seconds (default 60).
    pub health_check_interval_seconds: u64,
    /// Attach correlation metadata to every call (default true; when false a call still
    /// carries a fresh correlation id, required to match replies, but no caller metadata).
    pub enable_correlation_tracking: bool,
    /// Calls waiting for replies at once per client (default 1000).
    pub max_pending_requests: usize,
    /// Retry policies per operation class.
    pub policies: RetryPolicies,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            default_timeout_seconds: 30,
            health_check_interval_seconds: 60,
            enable_correlation_tracking: true,
            max_pending_requests: 1000,
            policies: RetryPolicies::default(),
        }
    }
}

impl RpcConfig {
    /// Sets the client options this section governs (`max_pending_requests`).
    pub fn apply_to(&self, options: &mut daemoneye_eventbus_client::ClientOptions) {
        options.max_pending_requests = self.max_pending_requests;
    }

    /// Checks every value; the error names the field.
    ///
    /// # Errors
    ///
    /// A sentence naming the first field out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_timeout_seconds == 0 {
            return Err("rpc.default_timeout_seconds must be at least 1".into());
        }
        if self.health_check_interval_seconds == 0 {
            return Err("rpc.health_check_interval_seconds must be at least 1".into());
        }
        if self.max_pending_requests == 0 {
            return Err("rpc.max_pending_requests must be at least 1".into());
        }
        let p = &self.policies;
        p.lifecycle.validate("lifecycle")?;
        p.health_check.validate("health_check")?;
        p.configuration.validate("configuration")?;
        p.heartbeat.validate("heartbeat")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_defaults() {
        let p = RetryPolicies::default();
        let o = CollectorOperation::Start;
        assert_eq!(p.for_operation(o).timeout(), Duration::from_secs(30));
        assert_eq!(
            p.for_operation(o).delay_before_retry(0),
            None,
            "lifecycle: no retry"
        );
        let h = p.for_operation(CollectorOperation::HealthCheck);
        assert_eq!(h.timeout(), Duration::from_secs(5));
        assert!(h.delay_before_retry(2).is_some() && h.delay_before_retry(3).is_none());
        let c = p.for_operation(CollectorOperation::UpdateConfig);
        assert_eq!(c.timeout(), Duration::from_secs(15));
        let delays: Vec<_> = (0..3).map(|r| c.delay_before_retry(r).unwrap()).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000].map(Duration::from_millis),
            "exponential"
        );
        let hb = p.for_operation(CollectorOperation::Heartbeat);
        assert_eq!(hb.timeout(), Duration::from_secs(2));
        assert_eq!(
            hb.delay_before_retry(0),
            Some(Duration::ZERO),
            "immediate retry"
        );
        assert_eq!(hb.delay_before_retry(1), None);
        assert_eq!(RpcConfig::default().validate(), Ok(()));
    }

    #[test]
    fn backoff_is_capped() {
        let p = RetryPolicy {
            timeout_seconds: 1,
            max_retries: 50,
            backoff: Backoff::Exponential {
                initial_ms: 100,
                multiplier: 3.0,
                max_ms: 2_000,
            },
        };
        assert_eq!(p.delay_before_retry(40), Some(Duration::from_millis(2_000)));
    }

    #[test]
    fn configuration_is_read_and_checked() {
        let c: RpcConfig = serde_json::from_str(
            r#"{"max_pending_requests": 10,
                "policies": {"heartbeat": {"timeout_seconds": 1, "max_retries": 2,
                                           "backoff": {"kind": "immediate"}}}}"#,
        )
        .unwrap();
        assert_eq!(c.max_pending_requests, 10);
        assert_eq!(c.policies.heartbeat.max_retries, 2);
        assert_eq!(c.policies.lifecycle, RetryPolicies::default().lifecycle);
        let extra = r#"{"policies": {"heartbeat": {"timeout_seconds": 1, "max_retries": 2,
                        "backoff": {"kind": "immediate", "initial_ms": 5}}}}"#;
        assert!(
            serde_json::from_str::<RpcConfig>(extra).is_err(),
            "extra backoff keys refused"
        );
        let unknown = serde_json::from_str::<RpcConfig>(r#"{"max_pending": 1}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `max_pending`"),
            "{unknown}"
        );
        let bad = RpcConfig {
            max_pending_requests: 0,
            ..RpcConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err(),
            "rpc.max_pending_requests must be at least 1"
        );
    }
}
