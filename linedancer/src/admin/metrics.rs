//! The Prometheus metrics: a `prometheus-client` collector that reads the server's
//! counters when scraped, so that serving does no work for them.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::Snapshot;
use crate::stats::LIFETIME_BUCKETS;

/// A server's counters as read for one scrape.
struct ServerCollector(Snapshot);

impl fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCollector").finish_non_exhaustive()
    }
}

/// The metrics in `snapshot`, then those of `collectors`, in the OpenMetrics text format
/// (which Prometheus reads).
pub(super) fn encode(snapshot: Snapshot, collectors: &[Arc<dyn Collector>]) -> String {
    let mut registry = Registry::with_prefix("linedancer");
    registry.register_collector(Box::new(ServerCollector(snapshot)));
    for collector in collectors {
        registry.register_collector(Box::new(Shared(Arc::clone(collector))));
    }
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// A collector shared between scrapes.
#[derive(Debug)]
struct Shared(Arc<dyn Collector>);

impl Collector for Shared {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        self.0.encode(encoder)
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Snapshot {
            stats,
            states,
            listeners,
            max_connections,
            accepting,
            alarms,
            unauthorized,
        } = &self.0;
        let closed = &stats.closed;

        let mut open = gauge(
            &mut encoder,
            "connections_open",
            "Connections open now, by listener.",
        )?;
        for (listener, count) in listeners {
            let label = [("listener", listener.to_string())];
            ConstGauge::new(*count as i64).encode(open.encode_family(&label)?)?;
        }
        single_gauge(
            &mut encoder,
            "connections_max",
            "The connection limit.",
            *max_connections as i64,
        )?;
        single_gauge(
            &mut encoder,
            "connections_peak",
            "The most connections open at once.",
            stats.peak_active as i64,
        )?;
        single_gauge(
            &mut encoder,
            "accepting",
            "1 while the server accepts connections, 0 while suspended or draining.",
            i64::from(*accepting),
        )?;
        let mut by_state = gauge(
            &mut encoder,
            "connections_by_state",
            "Connections open now, by protocol state (empty for raw handlers).",
        )?;
        for (state, count) in states {
            ConstGauge::new(*count as i64).encode(by_state.encode_family(&[("state", *state)])?)?;
        }
        single_counter(
            &mut encoder,
            "connections_accepted",
            "Connections accepted.",
            None,
            stats.accepted,
        )?;
        let mut reasons = counter(
            &mut encoder,
            "connections_closed",
            "Connections closed, by reason.",
            None,
        )?;
        for (reason, count) in closed.by_reason() {
            ConstCounter::new(count).encode(reasons.encode_family(&[("reason", reason)])?)?;
        }
        single_counter(
            &mut encoder,
            "connection_limit_waits",
            "Connections accepted at the connection limit, which waited for a slot.",
            None,
            stats.limit_waits,
        )?;
        let mut accept_errors = counter(&mut encoder, "accept_errors", "Failed accept() calls, by class: resource (out of descriptors or memory), connection (one connection failed), other.", None)?;
        for (class, count) in stats.accept_errors_by_class.by_class() {
            ConstCounter::new(count).encode(accept_errors.encode_family(&[("class", class)])?)?;
        }
        single_counter(
            &mut encoder,
            "received",
            "Bytes read from peers by the protocol driver.",
            Some(&Unit::Bytes),
            stats.bytes_in,
        )?;
        single_counter(
            &mut encoder,
            "sent",
            "Bytes written to peers by the protocol driver.",
            Some(&Unit::Bytes),
            stats.bytes_out,
        )?;
        single_counter(
            &mut encoder,
            "frames_received",
            "Frames decoded by the protocol driver.",
            None,
            stats.frames_in,
        )?;
        single_counter(
            &mut encoder,
            "replies_sent",
            "Replies encoded by the protocol driver.",
            None,
            stats.replies_out,
        )?;
        single_counter(
            &mut encoder,
            "panics",
            "Connections ended by a panic of their protocol or handler.",
            None,
            closed.panic,
        )?;
        let mut timeouts = counter(
            &mut encoder,
            "timeouts",
            "Connections closed by a timeout, by kind.",
            None,
        )?;
        for (kind, count) in [
            ("idle", closed.idle_timeout),
            ("frame", closed.frame_timeout),
            ("state", closed.state_timeout),
            ("send", closed.send_timeout),
        ] {
            ConstCounter::new(count).encode(timeouts.encode_family(&[("kind", kind)])?)?;
        }
        single_counter(
            &mut encoder,
            "mailbox_overflows",
            "Connections closed because their mailbox was full.",
            None,
            closed.mailbox_overflow,
        )?;
        let mut tls = counter(
            &mut encoder,
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason.",
            None,
        )?;
        for (reason, count) in stats.tls_handshake_failures.by_reason() {
            ConstCounter::new(count).encode(tls.encode_family(&[("reason", reason)])?)?;
        }
        single_counter(
            &mut encoder,
            "proxy_header_errors",
            "Connections closed for a missing, bad, late or untrusted PROXY header.",
            None,
            closed.proxy_header,
        )?;
        let lifetimes = &stats.lifetimes;
        let mut per_bucket = Vec::with_capacity(LIFETIME_BUCKETS.len() + 1);
        let mut below = 0;
        for (bound, cumulative) in LIFETIME_BUCKETS.iter().zip(lifetimes.buckets) {
            per_bucket.push((*bound, cumulative - below));
            below = cumulative;
        }
        per_bucket.push((f64::INFINITY, lifetimes.count - below));
        encoder
            .encode_descriptor(
                "connection_lifetime",
                "How long closed connections lived.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                lifetimes.sum_seconds,
                lifetimes.count,
                &per_bucket,
                None,
            )?;
        let mut active = gauge(&mut encoder, "alarm_active", "1 while an alarm fires.")?;
        for alarm in alarms {
            ConstGauge::new(i64::from(alarm.firing))
                .encode(active.encode_family(&[("alarm", alarm.name)])?)?;
        }
        let mut fired = counter(
            &mut encoder,
            "alarms_fired",
            "Times each alarm fired.",
            None,
        )?;
        for alarm in alarms {
            ConstCounter::new(alarm.fired)
                .encode(fired.encode_family(&[("alarm", alarm.name)])?)?;
        }
        single_counter(
            &mut encoder,
            "admin_unauthorized",
            "Admin requests refused for a missing or wrong token.",
            None,
            *unauthorized,
        )?;
        Ok(())
    }
}

fn gauge<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, fmt::Error> {
    encoder.encode_descriptor(name, help, None, MetricType::Gauge)
}

fn counter<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    unit: Option<&'a Unit>,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, fmt::Error> {
    encoder.encode_descriptor(name, help, unit, MetricType::Counter)
}

fn single_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), fmt::Error> {
    ConstGauge::new(value).encode(gauge(encoder, name, help)?)
}

fn single_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), fmt::Error> {
    ConstCounter::new(value).encode(counter(encoder, name, help, unit)?)
}
