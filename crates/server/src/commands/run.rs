//! `run`: one replica. Serves HTTP from the first moment, migrates, connects
//! to both stores (retrying while they are unreachable), watches their
//! health, and campaigns; the sync actors run while it leads. The first
//! SIGTERM/SIGINT steps down (resigning the lease so a standby takes over
//! at once) and exits 0; a second one exits at once.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use eps_actors::{StatusBoard, telemetry};
use eps_cluster::{Node, NodeStatus};
use eps_core::{Classify, Config};
use eps_etcd::EtcdClient;
use eps_store::Store;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::monitor::{self, Health};

pub fn run(config: Config, no_migrate: bool) -> ExitCode {
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("eps-worker")
            .build()
            .expect("building the tokio runtime")
    });
    match system.block_on(serve(Arc::new(config), no_migrate)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Retries `attempt` with backoff while it fails retryably, until it
/// succeeds, fails for good, or `shutdown`.
async fn until_ready<T, E, F, Fut>(
    what: &str,
    config: &Config,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> anyhow::Result<Option<T>>
where
    E: std::error::Error + Classify + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let backoff = config.backoff();
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(value) => return Ok(Some(value)),
            Err(error) if error.retryable() => {
                tracing::warn!(%error, failures, "{what} failed, retrying");
                let delay = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => return Err(anyhow::Error::new(error).context(format!("{what} failed"))),
        }
    }
}

async fn serve(config: Arc<Config>, no_migrate: bool) -> anyhow::Result<()> {
    let telemetry = crate::logging::init(&config)?;
    let result = serve_logged(config, no_migrate).await;
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "exiting");
    }
    telemetry.shutdown();
    result
}

async fn serve_logged(config: Arc<Config>, no_migrate: bool) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));

    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(telemetry::APPLY_LATENCY_SECONDS.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .install_recorder()?;
    telemetry::describe();
    telemetry::init(
        config
            .validated_mappings()?
            .iter()
            .map(|m| m.policy.as_str())
            .collect::<Vec<_>>(),
    );
    metrics::gauge!(telemetry::PG_POOL_MAX).set(config.postgres.pool_size as f64);
    metrics::gauge!(
        telemetry::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "git_revision" => env!("ETCD_PG_SYNC_GIT_REVISION"),
        // The dashboards select a cluster's replicas by it.
        "cluster" => config.cluster.name.clone(),
    )
    .set(1.0);
    // Histograms are drained only by a scrape; without one they grow.
    let upkeep = prometheus.clone();
    actix_rt::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });

    let store = Store::new(&config).await?;
    let board = Arc::new(StatusBoard::default());
    let node_status = Arc::new(eps_cluster::NodeStatus::default());
    let health = Arc::new(Health::default());
    let state = web::Data::new(AppState {
        node_id: config.cluster.node_id.clone(),
        cluster: config.cluster.name.clone(),
        health: health.clone(),
        node: node_status.clone(),
        board: board.clone(),
        prometheus,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(crate::http::configure)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .bind(&config.http.listen)
    .map_err(|e| anyhow::anyhow!("http.listen {}: {e}", config.http.listen))?
    .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);
    tracing::info!(listen = %config.http.listen, node = %config.cluster.node_id, cluster = %config.cluster.name, "serving HTTP");

    let result = start_and_lead(
        config.clone(),
        no_migrate,
        store,
        board,
        node_status,
        health,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    server_handle.stop(true).await;
    result
}

async fn start_and_lead(
    config: Arc<Config>,
    no_migrate: bool,
    store: Store,
    board: Arc<StatusBoard>,
    node_status: Arc<NodeStatus>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let monitor_store = store.clone();
    // Wrong credentials or certificates fail here, once, with the reason;
    // an unreachable server is waited for.
    if until_ready("connecting to PostgreSQL", &config, &shutdown, || {
        store.check_connection()
    })
    .await?
    .is_none()
    {
        return Ok(());
    }
    if !no_migrate {
        let report = until_ready("migration", &config, &shutdown, || store.migrate()).await?;
        match report {
            Some(report) if !report.applied.is_empty() => {
                tracing::info!(applied = ?report.applied, "schema migrated")
            }
            Some(_) => {}
            None => return Ok(()),
        }
    }
    if until_ready("checking the service's role", &config, &shutdown, || {
        store.check_service_role()
    })
    .await?
    .is_none()
    {
        return Ok(());
    }
    let Some(etcd) = until_ready("connecting to etcd", &config, &shutdown, || {
        EtcdClient::connect(&config.etcd)
    })
    .await?
    else {
        return Ok(());
    };
    actix_rt::spawn(monitor::run(
        health,
        board.clone(),
        monitor_store,
        Some(etcd.clone()),
        shutdown.clone(),
    ));
    // The same probe key as the watcher's identity check.
    let probe = store
        .mappings()
        .iter()
        .next()
        .map_or_else(Vec::new, |m| m.prefix.clone());
    actix_rt::spawn(crate::clock::run(
        store.clone(),
        etcd.clone(),
        probe,
        Duration::from_millis(config.sync.clock_interval_ms),
        shutdown.clone(),
    ));
    let node = Node {
        config: config.clone(),
        store,
        etcd,
        board,
        status: node_status,
        leftover_leases: Arc::default(),
    };
    let node_task = actix_rt::spawn(node.run(shutdown.clone()));
    shutdown.cancelled().await;
    tracing::info!("shutting down: stepping down and resigning");
    if tokio::time::timeout(Duration::from_secs(15), node_task)
        .await
        .is_err()
    {
        tracing::warn!("the node did not stop within 15 s");
    }
    Ok(())
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit now.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received, shutting down (again to force)");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal, exiting now");
    std::process::exit(130);
}
