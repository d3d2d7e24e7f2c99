//! Observability (docs/design.md G7; README "Observability"):
//! endpoints, metrics that move, traces that reach a real OTLP receiver,
//! the audit trail, and secrets that never leak.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use support::*;

const MAPPINGS: &str = r#"
[[mappings]]
prefix = "/o/"
table = "kv_o"
policy = "etcd-wins"
"#;

/// One exported span, decoded.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: String,
    resource: Vec<(String, String)>,
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource: Vec<(String, String)> = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .into_iter()
                .map(|kv| {
                    let value = match kv.value.and_then(|v| v.value) {
                        Some(Value::StringValue(s)) => s,
                        other => format!("{other:?}"),
                    };
                    (kv.key, value)
                })
                .collect();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(ReceivedSpan {
                        name: span.name,
                        trace_id: span.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test]
async fn endpoints_answer_and_metrics_move_when_changes_flow() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let (code, before) = service.get("/metrics").await?;
    assert_eq!(code, 200);
    for name in [
        "etcd_pg_sync_is_leader",
        "etcd_pg_sync_applied_revision",
        "etcd_pg_sync_changes_total",
        "etcd_pg_sync_apply_latency_seconds",
        "etcd_pg_sync_conflicts_total",
        "etcd_pg_sync_retries_total",
        "etcd_pg_sync_dead_letters",
        "etcd_pg_sync_compaction_recoveries_total",
        "etcd_pg_sync_outbox_depth",
        "etcd_pg_sync_actor_restarts_total",
        "etcd_pg_sync_batch_size",
        "etcd_pg_sync_pg_pool_connections",
        "etcd_pg_sync_watch_lag_revisions",
        "etcd_pg_sync_watch_lag_seconds",
        "etcd_pg_sync_store_up",
        "etcd_pg_sync_build_info{",
        "cluster=\"test\"",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(before.contains(name), "/metrics lacks {name}");
    }
    let rss = before
        .lines()
        .find(|l| l.starts_with("process_resident_memory_bytes"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(rss > 1e6, "resident memory {rss}");
    let sample = |text: &str, series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let mut etcd = world.etcd_client().await?;
    for i in 0..10 {
        etcd.put(format!("/o/e{i}"), "x", None).await?;
    }
    let pg = world.pg().await?;
    for i in 0..5 {
        pg.execute(
            "INSERT INTO kv_o_text (key, value) VALUES ($1, 'y')",
            &[&format!("/o/p{i}")],
        )
        .await?;
    }
    wait_converged(&world, "kv_o", b"/o/", Duration::from_secs(10)).await?;
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;
    let (_, after) = service.get("/metrics").await?;
    let etcd_puts = "etcd_pg_sync_changes_total{direction=\"etcd_to_pg\",op=\"put\"}";
    let pg_puts = "etcd_pg_sync_changes_total{direction=\"pg_to_etcd\",op=\"put\"}";
    assert!(
        sample(&after, etcd_puts) >= sample(&before, etcd_puts) + 15.0,
        "{after}"
    );
    assert!(sample(&after, pg_puts) >= sample(&before, pg_puts) + 5.0);
    assert!(
        sample(&after, "etcd_pg_sync_applied_revision")
            > sample(&before, "etcd_pg_sync_applied_revision")
    );
    assert!(
        sample(
            &after,
            "etcd_pg_sync_apply_latency_seconds_count{direction=\"etcd_to_pg\"}"
        ) > 0.0
    );
    assert_eq!(sample(&after, "etcd_pg_sync_is_leader"), 1.0);
    let status = status(&service).await?;
    assert_eq!(status["outbox_pending"], 0);
    assert!(
        status["actors"]["etcd_watcher"]["state"] == "running",
        "{status}"
    );
    Ok(())
}

#[tokio::test]
async fn traces_of_both_directions_reach_an_otlp_receiver() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let mut world = World::new(MAPPINGS).await?;
    world.env.insert(
        "ETCD_PG_SYNC__TELEMETRY__OTLP_ENDPOINT".into(),
        format!("http://{address}"),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/o/traced-from-etcd", "e", None).await?;
    let pg = world.pg().await?;
    pg.execute(
        "INSERT INTO kv_o_text (key, value) VALUES ('/o/traced-from-pg', 'p')",
        &[],
    )
    .await?;
    wait_converged(&world, "kv_o", b"/o/", Duration::from_secs(10)).await?;
    wait_outbox_empty(&world, Duration::from_secs(10)).await?;

    // The batch exporter sends every few seconds.
    let (txn, echo) = eps_harness::wait_for("the spans", Duration::from_secs(20), || {
        let spans = receiver.spans.lock().unwrap().clone();
        async move {
            let txn = spans.iter().find(|s| s.name == "pg_to_etcd.txn").cloned();
            let echo = txn.as_ref().and_then(|t| {
                spans
                    .iter()
                    .find(|s| s.name == "pg_to_etcd.echo_recognized" && s.trace_id == t.trace_id)
                    .cloned()
            });
            let batch = spans.iter().any(|s| s.name == "etcd_to_pg.batch");
            match (txn, echo, batch) {
                (Some(txn), Some(echo), true) => Ok(Some((txn, echo))),
                _ => anyhow::bail!(
                    "spans received: {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                ),
            }
        }
    })
    .await?;
    assert_eq!(
        txn.trace_id, echo.trace_id,
        "etcd txn and echo recognition are one trace"
    );
    let attribute = |name: &str| {
        txn.resource
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attribute("service.name").as_deref(), Some("etcd-pg-sync"));
    assert_eq!(attribute("service.instance.id").as_deref(), Some("n1"));
    assert_eq!(attribute("etcd_pg_sync.cluster").as_deref(), Some("test"));
    // The trace ids are in the history and the audit trail.
    let pg_trace: Option<String> = pg
        .query_one(
            "SELECT trace_id FROM history WHERE key = '/o/traced-from-pg'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(pg_trace.as_deref(), Some(txn.trace_id.as_str()));
    let etcd_trace: Option<String> = pg
        .query_one(
            "SELECT trace_id FROM history WHERE key = '/o/traced-from-etcd'",
            &[],
        )
        .await?
        .get(0);
    let batch_traces: Vec<String> = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.name == "etcd_to_pg.batch")
        .map(|s| s.trace_id.clone())
        .collect();
    assert!(
        etcd_trace
            .as_ref()
            .is_some_and(|t| batch_traces.contains(t)),
        "{etcd_trace:?} not in {batch_traces:?}"
    );
    let traced_batches = count(
        &pg,
        "SELECT count(*) FROM sync_events WHERE kind = 'batch-applied' AND trace_id IS NOT NULL",
    )
    .await?;
    let batches: Vec<String> = pg
        .query("SELECT coalesce(trace_id, '-') || ' ' || detail::text FROM sync_events WHERE kind = 'batch-applied'", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(traced_batches > 0, "{batches:?}");
    server.abort();
    Ok(())
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_core_stream::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures_core_stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

mod futures_core_stream {
    pub use futures_util::stream::{Stream, unfold};
}

#[tokio::test]
async fn a_collector_that_is_down_never_blocks_the_sync() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    // Nothing listens there.
    world.env.insert(
        "ETCD_PG_SYNC__TELEMETRY__OTLP_ENDPOINT".into(),
        "http://127.0.0.1:9".into(),
    );
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let mut etcd = world.etcd_client().await?;
    for i in 0..50 {
        etcd.put(format!("/o/k{i}"), "v", None).await?;
    }
    wait_converged(&world, "kv_o", b"/o/", Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn the_audit_trail_records_every_kind_of_event() -> anyhow::Result<()> {
    let world = World::new(MAPPINGS).await?;
    let mut etcd = world.etcd_client().await?;
    etcd.put("/o/a", "1", None).await?;
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    wait_synced(&world).await?;
    let pg = world.pg().await?;
    etcd.put("/o/b", "2", None).await?;
    pg.execute(
        "INSERT INTO kv_o (key, value) VALUES ('/o/x-big', $1)",
        &[&vec![0u8; 2 << 20]],
    )
    .await?;
    wait_converged(&world, "kv_o", b"/o/b", Duration::from_secs(10)).await?;
    wait_count(
        &pg,
        "the oversize value was not dead-lettered",
        "SELECT count(*) FROM dead_letters",
        |n| n != 0,
        Duration::from_secs(10),
    )
    .await?;
    service.terminate(Duration::from_secs(10)).await?;
    // A conflict, settled by etcd-wins, and a compaction gap.
    pg.execute("UPDATE kv_o_text SET value = 'pg' WHERE key = '/o/a'", &[])
        .await?;
    etcd.put("/o/a", "etcd", None).await?;
    world.etcd.compact(etcd_revision(&world).await?).await?;
    service.restart()?;
    service.wait_ready(Duration::from_secs(30)).await?;
    // The resync runs beside the poller, which may settle the conflict on
    // /o/a first: verify only once the recovery is on record.
    let recoveries =
        awaited_event_details(&pg, "compaction-recovery", Duration::from_secs(20)).await?;
    anyhow::ensure!(!recoveries.is_empty(), "no compaction recovery recorded");
    wait_converged(&world, "kv_o", b"/o/a", Duration::from_secs(10)).await?;
    let env = [
        ("ETCD_PG_SYNC__POSTGRES__URL", world.db.url()),
        ("ETCD_PG_SYNC__ETCD__ENDPOINTS", world.etcd.endpoint()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = tempfile::NamedTempFile::new()?;
    std::fs::write(config.path(), MAPPINGS)?;
    let (code, stdout, stderr) = run_cli(
        &["verify", "--config", config.path().to_str().unwrap()],
        &env,
    )
    .await?;
    // The compaction resync made the mirror etcd's again (the rejected value
    // lives on in dead_letters).
    assert_eq!(code, 0, "{stdout}{stderr}");
    service.terminate(Duration::from_secs(10)).await?;

    let kinds: Vec<(String, String, i64)> = pg
        .query("SELECT kind, node, term FROM sync_events ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let has = |kind: &str| kinds.iter().any(|(k, _, _)| k == kind);
    for kind in [
        "snapshot",
        "leadership",
        "batch-applied",
        "dead-letter",
        "conflict",
        "resolution",
        "compaction-recovery",
        "verify",
    ] {
        assert!(has(kind), "no {kind} event in {kinds:?}");
    }
    for (kind, node, term) in &kinds {
        assert!(!node.is_empty() && *term > 0, "{kind} lacks node or term");
    }
    let resigned = count(&pg, "SELECT count(*) FROM sync_events WHERE kind = 'leadership' AND detail->>'event' = 'resigned'").await?;
    assert_eq!(resigned, 2);
    Ok(())
}

#[tokio::test]
async fn secrets_never_reach_logs_status_or_errors() -> anyhow::Result<()> {
    let mut world = World::new(MAPPINGS).await?;
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("pg-password");
    write_secret(&secret_file, b"file-secret-5309\n")?;
    // PostgreSQL trusts local connections in the harness, so passwords are
    // accepted and ignored: the point is where they show up.
    let url = world
        .db
        .url()
        .replace("postgres@", "postgres:url-secret-8675@");
    world.env.insert("ETCD_PG_SYNC__POSTGRES__URL".into(), url);
    world.env.insert(
        "ETCD_PG_SYNC__POSTGRES__PASSWORD_FILE".into(),
        secret_file.display().to_string(),
    );
    world.env.insert("RUST_LOG".into(), "debug".into());
    let mut service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let status = service.status().await?;
    // Make it fail and log errors: etcd goes away under it.
    world.etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    service.terminate(Duration::from_secs(15)).await?;
    let logs = service.logs();
    assert!(logs.len() > 1000, "debug logs were written");
    for secret in ["url-secret-8675", "file-secret-5309"] {
        assert!(!logs.contains(secret), "{secret} in the logs");
        assert!(!status.contains(secret), "{secret} in /status");
    }
    Ok(())
}
