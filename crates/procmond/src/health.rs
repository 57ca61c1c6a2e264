//! procmond's health, from what it observed (pure: the caller measures, this decides).
//!
//! Unhealthy while reading `/proc` fails; Degraded for [`RECENT`] after process events were
//! lost (then read again from `/proc`), an event could not be published, or an executable was
//! not hashed because the hasher fell behind; Healthy otherwise. The message names the source
//! of process events in use either way.

use daemoneye_eventbus_collector::rpc::HealthStatus;
use std::time::Duration;

pub use daemoneye_eventbus_collector::services::RECENT;

/// Where process events come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The kernel's process-events connector; `/proc` read again every `reconcile`.
    Kernel {
        /// How often `/proc` is read to fill in and check.
        reconcile: Duration,
    },
    /// `/proc` scanned every `every`; `why` the connector is not used (`None`: not asked for).
    Proc {
        /// The scan interval.
        every: Duration,
        /// Why not the connector.
        why: Option<String>,
    },
}

impl Source {
    /// The source's name in metrics, status and event metadata: `kernel` or `proc`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kernel { .. } => "kernel",
            Self::Proc { .. } => "proc",
        }
    }

    /// A sentence for a person.
    pub fn describe(&self) -> String {
        match self {
            Self::Kernel { reconcile } => format!(
                "process events from the kernel (proc connector), /proc read every {} ms",
                reconcile.as_millis()
            ),
            Self::Proc { every, why: None } => {
                format!("scanning /proc every {} ms", every.as_millis())
            }
            Self::Proc {
                every,
                why: Some(why),
            } => format!(
                "scanning /proc every {} ms (a process living less may be missed): the proc \
                 connector is not used: {why}",
                every.as_millis()
            ),
        }
    }
}

pub use daemoneye_eventbus_collector::services::Losses;

/// What procmond measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The source in use.
    pub source: Source,
    /// The last read of `/proc` failed with this, and none succeeded since.
    pub scan_failing: Option<String>,
    /// Times process events were lost (the kernel's buffer or procmond's queue overflowed).
    pub events_lost: Losses,
    /// Events that could not be published (the broker away with the outbox full, refused…).
    pub publish_failures: Losses,
    /// Executables not hashed because the hasher's queue was full.
    pub hashes_skipped: Losses,
}

/// The status and its reason.
pub fn assess(o: &Observed) -> (HealthStatus, String) {
    let source = o.source.describe();
    if let Some(err) = &o.scan_failing {
        return (
            HealthStatus::Unhealthy,
            format!("reading /proc fails: {err}; {source}"),
        );
    }
    let mut problems = Vec::new();
    let ago = Losses::ago_secs;
    if o.events_lost.recent() {
        problems.push(format!(
            "process events were lost {} times, the last {} s ago (read again from /proc)",
            o.events_lost.count,
            ago(&o.events_lost)
        ));
    }
    if o.publish_failures.recent() {
        problems.push(format!(
            "{} events could not be published, the last {} s ago",
            o.publish_failures.count,
            ago(&o.publish_failures)
        ));
    }
    if o.hashes_skipped.recent() {
        problems.push(format!(
            "{} executables not hashed (the hasher fell behind), the last {} s ago",
            o.hashes_skipped.count,
            ago(&o.hashes_skipped)
        ));
    }
    if problems.is_empty() {
        (HealthStatus::Healthy, source)
    } else {
        (
            HealthStatus::Degraded,
            format!("{}; {source}", problems.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> Observed {
        Observed {
            source: Source::Kernel {
                reconcile: Duration::from_secs(5),
            },
            scan_failing: None,
            events_lost: Losses::default(),
            publish_failures: Losses::default(),
            hashes_skipped: Losses::default(),
        }
    }

    #[test]
    fn healthy_names_its_source() {
        let (s, why) = assess(&fine());
        assert_eq!(s, HealthStatus::Healthy);
        assert!(why.contains("proc connector"), "{why}");
        let mut o = fine();
        o.source = Source::Proc {
            every: Duration::from_millis(500),
            why: Some("EPERM".into()),
        };
        let (s, why) = assess(&o);
        assert_eq!(s, HealthStatus::Healthy);
        assert!(why.contains("scanning /proc every 500 ms") && why.contains("EPERM"));
    }

    #[test]
    fn recent_losses_degrade_and_old_ones_do_not() {
        for set in [
            |o: &mut Observed, l| o.events_lost = l,
            |o: &mut Observed, l| o.publish_failures = l,
            |o: &mut Observed, l| o.hashes_skipped = l,
        ] {
            let mut o = fine();
            set(
                &mut o,
                Losses {
                    count: 3,
                    since_last: Some(Duration::from_secs(2)),
                },
            );
            let (s, why) = assess(&o);
            assert_eq!(s, HealthStatus::Degraded, "{why}");
            assert!(why.contains('3') && why.contains("2 s ago"), "{why}");
            set(
                &mut o,
                Losses {
                    count: 3,
                    since_last: Some(RECENT),
                },
            );
            assert_eq!(assess(&o).0, HealthStatus::Healthy);
        }
    }

    #[test]
    fn a_failing_scan_is_unhealthy() {
        let mut o = fine();
        o.scan_failing = Some("permission denied".into());
        o.events_lost = Losses {
            count: 1,
            since_last: Some(Duration::ZERO),
        };
        let (s, why) = assess(&o);
        assert_eq!(s, HealthStatus::Unhealthy);
        assert!(why.contains("permission denied"), "{why}");
    }
}
