//! Alarms: thresholds on the server's counters that fire once they have held for a set
//! time, and clear when they no longer hold.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::connections::lock;
use crate::error::Error;
use crate::server::ServerHandle;

/// The thresholds of [`Alarms::watch`]; an alarm without one is off.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AlarmSettings {
    /// Open connections, as a fraction of the connection limit (0.9: 90%).
    pub connections: Option<f64>,
    /// Failed `accept()` calls per second.
    pub accept_errors_per_second: Option<f64>,
    /// Connections closed for a full mailbox, per second.
    pub mailbox_overflows_per_second: Option<f64>,
    /// How long a threshold must be reached, sample after sample, before its alarm
    /// fires.
    pub hold: Duration,
    /// How often the counters are read.
    pub interval: Duration,
}

impl Default for AlarmSettings {
    /// Every alarm off; 30 s of hold, a sample a second.
    fn default() -> Self {
        AlarmSettings {
            connections: None,
            accept_errors_per_second: None,
            mailbox_overflows_per_second: None,
            hold: Duration::from_secs(30),
            interval: Duration::from_secs(1),
        }
    }
}

impl AlarmSettings {
    fn check(&self) -> Result<(), Error> {
        let refuse = |setting, value: String, reason| {
            Err(Error::Config {
                setting,
                value,
                reason,
            })
        };
        if let Some(fraction) = self.connections {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return refuse(
                    "alarm connections",
                    fraction.to_string(),
                    "must be above 0 and at most 1",
                );
            }
        }
        for (setting, rate) in [
            (
                "alarm accept_errors_per_second",
                self.accept_errors_per_second,
            ),
            (
                "alarm mailbox_overflows_per_second",
                self.mailbox_overflows_per_second,
            ),
        ] {
            if let Some(rate) = rate.filter(|rate| !(*rate > 0.0 && rate.is_finite())) {
                return refuse(setting, rate.to_string(), "must be above zero");
            }
        }
        if self.interval.is_zero() {
            return refuse("alarm interval", "0s".into(), "must be above zero");
        }
        Ok(())
    }

    /// Sets [`connections`](AlarmSettings::connections).
    pub fn connections(mut self, fraction: f64) -> Self {
        self.connections = Some(fraction);
        self
    }

    /// Sets [`accept_errors_per_second`](AlarmSettings::accept_errors_per_second).
    pub fn accept_errors_per_second(mut self, rate: f64) -> Self {
        self.accept_errors_per_second = Some(rate);
        self
    }

    /// Sets [`mailbox_overflows_per_second`](AlarmSettings::mailbox_overflows_per_second).
    pub fn mailbox_overflows_per_second(mut self, rate: f64) -> Self {
        self.mailbox_overflows_per_second = Some(rate);
        self
    }

    /// Sets [`hold`](AlarmSettings::hold).
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// Sets [`interval`](AlarmSettings::interval).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }
}

/// An alarm that fired or cleared.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AlarmEvent {
    /// `connections`, `accept_errors` or `mailbox_overflows`.
    pub alarm: &'static str,
    /// Whether it fires now (else it has cleared).
    pub firing: bool,
    /// The value that was measured: a fraction of the limit, or a rate per second.
    pub value: f64,
    /// Its threshold.
    pub threshold: f64,
}

/// One alarm as the metrics show it.
#[derive(Debug, Clone)]
pub(super) struct AlarmStatus {
    pub(super) name: &'static str,
    pub(super) firing: bool,
    pub(super) fired: u64,
    pub(super) value: f64,
    pub(super) threshold: f64,
}

/// Alarms watching a server: started by [`Alarms::watch`], they run until the server
/// stops. Clones watch the same alarms.
#[derive(Debug, Clone)]
pub struct Alarms {
    status: Arc<Mutex<Vec<AlarmStatus>>>,
}

/// What the watcher keeps of one alarm between samples.
struct Watch {
    threshold: f64,
    /// Since when the threshold has been reached, sample after sample.
    since: Option<Instant>,
    /// The count at the last sample, for rates.
    last: u64,
}

impl Alarms {
    /// Reads `server`'s counters every [`interval`](AlarmSettings::interval) and fires an
    /// alarm once its threshold has been reached for [`hold`](AlarmSettings::hold):
    /// logged at warn, shown in the metrics (`linedancer_alarm_active`,
    /// `linedancer_alarms_fired_total`), and passed to `on_event`; it clears (logged
    /// at info, passed to `on_event`) at the first sample under its threshold. Call it
    /// within a tokio runtime, where the watcher runs.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a threshold that is not above zero (or a connections
    /// fraction over 1), or a zero hold or interval, naming it.
    pub fn watch<M: Send + 'static>(
        server: &ServerHandle<M>,
        settings: AlarmSettings,
        on_event: impl Fn(&AlarmEvent) + Send + Sync + 'static,
    ) -> Result<Alarms, Error> {
        settings.check()?;
        let chosen = [
            ("connections", settings.connections),
            ("accept_errors", settings.accept_errors_per_second),
            ("mailbox_overflows", settings.mailbox_overflows_per_second),
        ];
        let status: Vec<AlarmStatus> = (chosen.iter())
            .filter_map(|(name, threshold)| {
                Some(AlarmStatus {
                    name,
                    firing: false,
                    fired: 0,
                    value: 0.0,
                    threshold: (*threshold)?,
                })
            })
            .collect();
        let alarms = Alarms {
            status: Arc::new(Mutex::new(status)),
        };
        let (server, shared) = (server.clone(), Arc::clone(&alarms.status));
        tokio::spawn(async move {
            let stats = server.stats();
            let mut watches: Vec<Watch> = (lock(&shared).iter())
                .map(|alarm| Watch {
                    threshold: alarm.threshold,
                    since: None,
                    last: counted(alarm.name, &stats),
                })
                .collect();
            let mut ticks = tokio::time::interval(settings.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            let mut last_tick = Instant::now();
            while !server.is_shutting_down() {
                ticks.tick().await;
                let now = Instant::now();
                let elapsed = (now - last_tick).as_secs_f64().max(f64::EPSILON);
                last_tick = now;
                let stats = server.stats();
                let max = server.max_connections() as f64;
                let mut status = lock(&shared);
                for (alarm, watch) in status.iter_mut().zip(&mut watches) {
                    let value = if alarm.name == "connections" {
                        stats.active as f64 / max
                    } else {
                        let count = counted(alarm.name, &stats);
                        let rate = count.saturating_sub(watch.last) as f64 / elapsed;
                        watch.last = count;
                        rate
                    };
                    alarm.value = value;
                    let event = step(alarm, watch, value, now, settings.hold);
                    if let Some(event) = event {
                        on_event(&event);
                    }
                }
            }
        });
        Ok(alarms)
    }

    /// Each alarm's status now.
    pub(super) fn status(&self) -> Vec<AlarmStatus> {
        lock(&self.status).clone()
    }
}

/// The counter behind a rate alarm.
fn counted(alarm: &str, stats: &crate::Stats) -> u64 {
    match alarm {
        "accept_errors" => stats.accept_errors,
        "mailbox_overflows" => stats.closed.mailbox_overflow,
        _ => 0,
    }
}

/// Moves one alarm on by a sample of `value` at `now`; returns the event if it fired or
/// cleared.
fn step(
    alarm: &mut AlarmStatus,
    watch: &mut Watch,
    value: f64,
    now: Instant,
    hold: Duration,
) -> Option<AlarmEvent> {
    let (name, threshold) = (alarm.name, watch.threshold);
    let event = |firing| AlarmEvent {
        alarm: name,
        firing,
        value,
        threshold,
    };
    if value < watch.threshold {
        watch.since = None;
        if !alarm.firing {
            return None;
        }
        alarm.firing = false;
        info!(
            alarm = alarm.name,
            value,
            threshold = watch.threshold,
            "alarm cleared"
        );
        return Some(event(false));
    }
    let since = *watch.since.get_or_insert(now);
    if alarm.firing || now - since < hold {
        return None;
    }
    alarm.firing = true;
    alarm.fired += 1;
    warn!(alarm = alarm.name, value, threshold = watch.threshold, held = ?hold, "alarm");
    Some(event(true))
}
