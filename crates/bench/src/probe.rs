//! Latency probes: marker changes timed from acknowledgement on one side to
//! visibility on the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

/// Latency samples (seconds).
#[derive(Debug, Default, Clone)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        Some(sorted[index])
    }

    pub fn max(&self) -> Option<f64> {
        self.0.iter().copied().reduce(f64::max)
    }

    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "samples": self.0.len(),
            "p50_ms": self.quantile(0.5).map(|s| s * 1e3),
            "p99_ms": self.quantile(0.99).map(|s| s * 1e3),
            "max_ms": self.max().map(|s| s * 1e3),
        })
    }
}

/// Installs a trigger that NOTIFYs `bench_visible` with the key of every
/// committed mirror row under `prefix` (whoever wrote it).
pub async fn install_visibility_trigger(
    pg: &tokio_postgres::Client,
    table: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    pg.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION etcd_sync.bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_notify('bench_visible', encode(NEW.key, 'escape')); RETURN NULL; END $$; \
         DROP TRIGGER IF EXISTS bench_visible ON etcd_sync.{table}; \
         CREATE TRIGGER bench_visible AFTER INSERT OR UPDATE ON etcd_sync.{table} FOR EACH ROW \
         WHEN (substring(NEW.key FROM 1 FOR {len}) = '{prefix}'::bytea) EXECUTE FUNCTION etcd_sync.bench_notify();",
        len = prefix.len()
    ))
    .await?;
    Ok(())
}

/// Receives `bench_visible` notifications: key → arrival instant.
pub async fn listen_visible(
    url: &str,
) -> anyhow::Result<(tokio_postgres::Client, Arc<Mutex<HashMap<String, Instant>>>)> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(n.payload().to_owned(), Instant::now());
            }
        }
    });
    client.batch_execute("LISTEN bench_visible").await?;
    Ok((client, seen))
}

/// Puts `/probe/N` markers every `every` until stopped; returns the
/// acknowledgement instant of each.
pub fn etcd_markers(
    endpoint: String,
    prefix: &'static str,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<HashMap<String, Instant>>> {
    tokio::spawn(async move {
        let mut client = etcd_client::Client::connect([endpoint], None).await?;
        let mut acked = HashMap::new();
        let mut n = 0u64;
        let mut tick = tokio::time::interval(every);
        while !stop.is_cancelled() {
            tick.tick().await;
            let key = format!("{prefix}{n:08}");
            client.put(key.clone(), "probe", None).await?;
            acked.insert(key, Instant::now());
            n += 1;
        }
        Ok(acked)
    })
}

/// Pairs acknowledgement and visibility times.
pub fn latencies(acked: &HashMap<String, Instant>, seen: &HashMap<String, Instant>) -> Samples {
    Samples(
        acked
            .iter()
            .filter_map(|(key, at)| {
                seen.get(key)
                    .map(|v| v.saturating_duration_since(*at).as_secs_f64())
            })
            .collect(),
    )
}
