//! The NATS bus: a cluster's messages as NATS subjects, through `async-nats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tracing::{info, warn};

use super::{Bus, BusError};

/// How many messages a subscription holds for its task before NATS counts it a slow
/// consumer and drops what comes next.
const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// The longest wait between two attempts to reconnect.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A [`Bus`] over a NATS server (`nats://host:port`): one connection per node, which
/// reconnects on its own, forever, and subscribes again to what it had. A node does
/// not hear its own messages (`no_echo`). Disconnections and reconnections are logged;
/// [`Bus::reconnects`] counts the latter.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: Client,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// `Connected` events, the first one included.
    connected: AtomicU64,
    /// Messages NATS dropped because a subscription's task fell behind.
    slow: AtomicU64,
}

impl NatsBus {
    /// Connects to the NATS server at `url` as node `node` (the name the server shows
    /// for the connection).
    ///
    /// # Errors
    ///
    /// [`BusError`] naming the URL when it is not one, or the server does not answer
    /// within five seconds.
    pub async fn connect(url: &str, node: &str) -> Result<NatsBus, BusError> {
        let counts = Arc::new(Counts::default());
        let events = Arc::clone(&counts);
        let options = ConnectOptions::new()
            .name(format!("linedancer {node}"))
            .no_echo()
            .connection_timeout(Duration::from_secs(5))
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                MAX_RECONNECT_DELAY.min(Duration::from_millis(100) * attempts as u32)
            })
            .event_callback(move |event| {
                let counts = Arc::clone(&events);
                async move {
                    match event {
                        Event::Connected => {
                            if counts.connected.fetch_add(1, Ordering::Relaxed) > 0 {
                                info!("cluster bus: reconnected");
                            }
                        }
                        Event::Disconnected => warn!(
                            "cluster bus: disconnected; messages to other nodes are \
                             dropped until it is back"
                        ),
                        Event::SlowConsumer(_) => {
                            counts.slow.fetch_add(1, Ordering::Relaxed);
                            warn!("cluster bus: a subscription fell behind, messages dropped");
                        }
                        other => info!("cluster bus: {other}"),
                    }
                }
            });
        let client = options
            .connect(url)
            .await
            .map_err(|e| BusError(format!("cannot connect to {url}: {e}")))?;
        Ok(NatsBus { client, counts })
    }
}

impl Bus for NatsBus {
    fn publish(&self, topic: String, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            (self.client.publish(topic, payload).await).map_err(|e| BusError(e.to_string()))
        }
        .boxed()
    }

    fn subscribe(
        &self,
        topic: String,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Bytes>, BusError>> {
        async move {
            let subscriber =
                (self.client.subscribe(topic).await).map_err(|e| BusError(e.to_string()))?;
            Ok(subscriber.map(|message| message.payload).boxed())
        }
        .boxed()
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        async move { (self.client.flush().await).map_err(|e| BusError(e.to_string())) }.boxed()
    }

    fn reconnects(&self) -> u64 {
        self.counts
            .connected
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }

    fn dropped(&self) -> u64 {
        self.counts.slow.load(Ordering::Relaxed)
    }
}
