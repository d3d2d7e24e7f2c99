//! Structured logs (STYLE 11): JSON or pretty, one line per event, to stderr.

use eps_core::config::{LogFormat, TelemetryConfig};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber; `RUST_LOG` overrides the configured level.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::try_new(&config.log_level)
            .map_err(|e| anyhow::anyhow!("telemetry.log_level {:?}: {e}", config.log_level))?,
    };
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(false),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
    }
    Ok(())
}
