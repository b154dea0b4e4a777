//! A circuit breaker per organization: after `threshold` consecutive
//! transient provider failures, that organization's messages are delayed
//! without calling its provider for a cool-down; then one message probes
//! the provider (half-open) and its outcome closes or reopens the circuit.
//! Other organizations are not affected: each has its own state.
//!
//! In process only: each extractor replica learns on its own, which costs a
//! few calls per replica and needs no coordination.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out since `since`; a probe that never reports (its task
    /// died) is replaced after a cool-down.
    HalfOpen {
        since: Instant,
    },
}

/// What the breaker says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// Do not call the provider; try again after this long.
    Reject {
        retry_in: Duration,
    },
}

pub struct CircuitBreakers {
    threshold: u32,
    cooldown: Duration,
    states: Mutex<HashMap<Uuid, State>>,
}

impl CircuitBreakers {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            states: Mutex::default(),
        }
    }

    pub fn admit(&self, organization_id: Uuid) -> Admission {
        let now = Instant::now();
        let mut states = self.states.lock().expect("breaker lock");
        let state = states
            .entry(organization_id)
            .or_insert(State::Closed { failures: 0 });
        match *state {
            State::Closed { .. } => Admission::Call,
            State::Open { until } if now < until => Admission::Reject {
                retry_in: until - now,
            },
            State::HalfOpen { since } if now < since + self.cooldown => Admission::Reject {
                retry_in: since + self.cooldown - now,
            },
            // Cool-down over (or the probe vanished): this message probes.
            State::Open { .. } | State::HalfOpen { .. } => {
                *state = State::HalfOpen { since: now };
                Admission::Call
            }
        }
    }

    /// The provider answered (even with output that failed validation).
    pub fn record_success(&self, organization_id: Uuid) {
        let mut states = self.states.lock().expect("breaker lock");
        states.insert(organization_id, State::Closed { failures: 0 });
    }

    /// A transient failure after the call's own retries. Returns whether
    /// the circuit opened.
    pub fn record_failure(&self, organization_id: Uuid) -> bool {
        let now = Instant::now();
        let mut states = self.states.lock().expect("breaker lock");
        let state = states
            .entry(organization_id)
            .or_insert(State::Closed { failures: 0 });
        let next = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            State::Closed { .. } | State::HalfOpen { .. } => State::Open {
                until: now + self.cooldown,
            },
            // Messages admitted before it opened fail too; keep the cool-down.
            open @ State::Open { .. } => open,
        };
        let opened = matches!(next, State::Open { .. }) && !matches!(*state, State::Open { .. });
        *state = next;
        opened
    }

    /// Organizations whose circuit is open or probing.
    pub fn open_count(&self) -> usize {
        let states = self.states.lock().expect("breaker lock");
        states
            .values()
            .filter(|state| !matches!(state, State::Closed { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_for_one_organization_only() {
        let breakers = CircuitBreakers::new(2, Duration::from_secs(60));
        let (failing, healthy) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(breakers.admit(failing), Admission::Call);
        assert!(!breakers.record_failure(failing));
        assert_eq!(breakers.admit(failing), Admission::Call);
        assert!(breakers.record_failure(failing));
        assert!(
            matches!(breakers.admit(failing), Admission::Reject { retry_in } if retry_in <= Duration::from_secs(60))
        );
        assert_eq!(breakers.admit(healthy), Admission::Call);
        assert_eq!(breakers.open_count(), 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let breakers = CircuitBreakers::new(2, Duration::from_secs(60));
        let organization = Uuid::new_v4();
        breakers.record_failure(organization);
        breakers.record_success(organization);
        assert!(!breakers.record_failure(organization));
        assert_eq!(breakers.admit(organization), Admission::Call);
    }

    #[test]
    fn after_the_cooldown_one_probe_decides() {
        let breakers = CircuitBreakers::new(1, Duration::ZERO);
        let organization = Uuid::new_v4();
        assert!(breakers.record_failure(organization));
        // Zero cool-down: the next message is the probe.
        assert_eq!(breakers.admit(organization), Admission::Call);
        assert!(
            breakers.record_failure(organization),
            "a failed probe reopens"
        );
        assert_eq!(breakers.admit(organization), Admission::Call);
        breakers.record_success(organization);
        assert_eq!(breakers.open_count(), 0);

        let slow = CircuitBreakers::new(1, Duration::from_secs(60));
        slow.record_failure(organization);
        assert!(matches!(slow.admit(organization), Admission::Reject { .. }));
    }
}
