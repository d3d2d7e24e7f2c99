//! Structured logs (one JSON object per event, fields not prose) and, with `telemetry.otlp_endpoint` set,
//! OpenTelemetry traces exported over OTLP/gRPC.
//!
//! Spans of the sync (`etcd_to_pg.batch`, `pg_to_etcd.txn`,
//! `pg_to_etcd.echo_recognized`) become traces; their ids are written to
//! `history.trace_id` and `sync_events.trace_id`. Export is batched in the
//! background with a bounded queue: a collector that is down costs dropped
//! spans, never a blocked sync. The exporter's own crates (opentelemetry,
//! tonic, h2, hyper) are kept out of the trace layer.

use std::time::Duration;

use eps_core::config::{Config, LogFormat};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter, fmt};

/// Keeps the trace exporter alive; flush it with [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes pending spans (bounded in time) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(3))
        {
            tracing::debug!(%error, "trace exporter shutdown");
        }
    }
}

/// Installs the global subscriber. Must run inside the tokio runtime when
/// traces are exported (the gRPC channel lives on it). `RUST_LOG` overrides
/// the configured level.
pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
    let telemetry = &config.telemetry;
    let level = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => directives,
        _ => telemetry.log_level.clone(),
    };
    let env_filter = EnvFilter::try_new(&level)
        .map_err(|e| anyhow::anyhow!("telemetry.log_level {level:?}: {e}"))?;
    let logs = match telemetry.log_format {
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .boxed(),
        LogFormat::Pretty => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let (traces, provider) = match &telemetry.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint {endpoint:?}: {e}"))?;
            let resource = Resource::builder()
                .with_service_name("etcd-pg-sync")
                .with_attributes([
                    KeyValue::new("service.instance.id", config.cluster.node_id.clone()),
                    KeyValue::new("etcd_pg_sync.node", config.cluster.node_id.clone()),
                    KeyValue::new("etcd_pg_sync.cluster", config.cluster.name.clone()),
                ])
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer("etcd-pg-sync");
            let ours = filter::filter_fn(|meta| meta.target().starts_with("eps_"));
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(ours);
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(env_filter)
        .with(logs)
        .with(traces)
        .try_init()?;
    Ok(Telemetry { provider })
}
