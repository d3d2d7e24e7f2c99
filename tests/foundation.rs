//! The foundation: configuration on the command line, migrations through
//! the binary, and the service's lifecycle.
#![allow(clippy::type_complexity, clippy::unwrap_used)] // test tables and setup

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("pg-password");
    write_secret(&secret, b"file-secret\n")?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nname = \"from-file\"\n[postgres]\nurl = \"postgres://app:url-secret@db/app\"\npassword_file = \"{}\"\n[[mappings]]\nprefix = \"/app/\"\ntable = \"kv_app\"\n",
            secret.display()
        ),
    )?;
    let (code, stdout, stderr) = run_cli(
        &["check-config", "--config", config.to_str().unwrap()],
        &[
            ("ETCD_PG_SYNC__CLUSTER__NAME", "from-env"),
            ("ETCD_PG_SYNC__ETCD__USERNAME", "root"),
            ("ETCD_PG_SYNC__ETCD__PASSWORD", "env-secret"),
        ],
    )
    .await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("name = \"from-env\""),
        "env overrides the file:\n{stdout}"
    );
    assert!(stdout.contains("table = \"kv_app\""));
    for secret in ["file-secret", "url-secret", "env-secret"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked:\n{stdout}{stderr}"
        );
    }
    // The config file can also come from ETCD_PG_SYNC_CONFIG.
    let (code, stdout, _) = run_cli(
        &["check-config"],
        &[("ETCD_PG_SYNC_CONFIG", config.to_str().unwrap())],
    )
    .await?;
    assert_eq!(code, 0);
    assert!(stdout.contains("name = \"from-file\""));
    Ok(())
}

#[tokio::test]
async fn an_invalid_config_exits_2_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: &[(&str, &[(&str, &str)], &str)] = &[
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a\"\n[[mappings]]\nprefix = \"/a/b/\"\ntable = \"b\"\n",
            &[],
            "mappings[1].prefix",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a\"\npolicy = \"coin-flip\"\n",
            &[],
            "mappings[0].policy",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a; DROP TABLE x\"\n",
            &[],
            "mappings[0].table",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__POSTGRES__URL", "not a url")],
            "postgres.url",
        ),
        (
            "",
            &[("ETCD_PG_SYNC__ETCD__ENDPOINTS", "localhost:2379")],
            "etcd.endpoints[0]",
        ),
        (
            "[cluster]\nlease_ttl_secs = \"long\"\n",
            &[],
            "lease_ttl_secs",
        ),
    ];
    for (i, (content, env, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, content)?;
        for command in ["check-config", "run", "migrate"] {
            let (code, _, stderr) =
                run_cli(&[command, "--config", path.to_str().unwrap()], env).await?;
            assert_eq!(code, 2, "{command} with {content:?} {env:?}: {stderr}");
            assert!(
                stderr.contains(key),
                "{command}: expected {key} in {stderr:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn migrate_applies_the_schema_once() -> anyhow::Result<()> {
    let db = eps_harness::Postgres::fresh_database().await?;
    let url = db.url();
    let env = [("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())];
    let (code, stdout, stderr) = run_cli(&["migrate"], &env).await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("applied migrations"), "{stdout}");
    let (code, stdout, _) = run_cli(&["migrate"], &env).await?;
    assert_eq!(code, 0);
    assert!(stdout.contains("up to date"), "{stdout}");
    Ok(())
}

/// A command that cannot reach a store exits 3, not 1: a script tells "the
/// check found a problem" from "the check could not run".
#[tokio::test]
async fn a_command_that_cannot_reach_a_store_exits_3() -> anyhow::Result<()> {
    let db = eps_harness::Postgres::fresh_database().await?;
    let url = db.url();
    let (code, _, stderr) = run_cli(
        &["migrate"],
        &[("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())],
    )
    .await?;
    assert_eq!(code, 0, "{stderr}");
    // Nothing listens there.
    let closed = format!("http://127.0.0.1:{}", eps_harness::free_port()?);
    let env = [
        ("ETCD_PG_SYNC__POSTGRES__URL", url.as_str()),
        ("ETCD_PG_SYNC__ETCD__ENDPOINTS", closed.as_str()),
        ("ETCD_PG_SYNC__ETCD__CONNECT_TIMEOUT_MS", "500"),
    ];
    let (code, _, stderr) = run_cli(&["verify"], &env).await?;
    assert_eq!(code, 3, "etcd unreachable: {stderr}");
    let closed_pg = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        eps_harness::free_port()?
    );
    let env = [
        ("ETCD_PG_SYNC__POSTGRES__URL", closed_pg.as_str()),
        ("ETCD_PG_SYNC__POSTGRES__CONNECT_TIMEOUT_MS", "500"),
    ];
    let (code, _, stderr) = run_cli(&["conflicts", "list"], &env).await?;
    assert_eq!(code, 3, "PostgreSQL unreachable: {stderr}");
    Ok(())
}

#[tokio::test]
async fn run_becomes_ready_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let world = World::new("").await?;
    let mut service = world.start("n1").await?;
    let (code, body) = service.get("/healthz").await?;
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, _) = service.get("/readyz").await?;
    assert_eq!(code, 200);
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let status = status(&service).await?;
    for field in [
        "node_id",
        "role",
        "term",
        "applied_revision",
        "etcd_revision",
        "lag_revisions",
        "outbox_pending",
        "conflicts_pending",
        "dead_letters",
        "last_error",
    ] {
        assert!(
            status.get(field).is_some(),
            "/status lacks {field}: {status}"
        );
    }
    assert_eq!(status["node_id"], "n1");
    assert!(status["term"].as_i64().unwrap() > 0);
    let exit = service.terminate(Duration::from_secs(10)).await?;
    assert_eq!(exit.code(), Some(0), "{}", service.log_tail(20));
    Ok(())
}

#[tokio::test]
async fn readiness_follows_the_stores() -> anyhow::Result<()> {
    // A replica without etcd is alive but not ready; it becomes ready when
    // etcd appears, without a restart.
    let mut world = World::new("").await?;
    world.etcd.stop();
    let mut service = eps_harness::Service::spawn(world.config("n1"), "n1")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = service.get("/healthz").await {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no /healthz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = service.get("/readyz").await?;
    assert_eq!(code, 503);
    world.etcd.restart().await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    assert!(service.is_running());
    Ok(())
}
