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
    // And as JSON, secrets redacted there too.
    let (code, stdout, stderr) = run_cli(
        &["check-config", "--json"],
        &[
            ("ETCD_PG_SYNC_CONFIG", config.to_str().unwrap()),
            ("ETCD_PG_SYNC__ETCD__PASSWORD", "env-secret"),
            ("ETCD_PG_SYNC__ETCD__USERNAME", "root"),
        ],
    )
    .await?;
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(json["cluster"]["name"], "from-file");
    assert_eq!(json["mappings"][0]["table"], "kv_app");
    for secret in ["file-secret", "url-secret", "env-secret"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
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
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a\"\nvalue_format = \"yaml\"\n",
            &[],
            "mappings[0].value_format",
        ),
        (
            "[[mappings]]\nprefix = \"/a/\"\ntable = \"a\"\njson_index = true\n",
            &[],
            "mappings[0].json_index",
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
    eps_harness::wait_for("/healthz", Duration::from_secs(10), || {
        let service = &service;
        async move { Ok(matches!(service.get("/healthz").await, Ok((200, _))).then_some(())) }
    })
    .await?;
    let (code, _) = service.get("/readyz").await?;
    assert_eq!(code, 503);
    // The container health check says the same.
    world.env.insert(
        "ETCD_PG_SYNC__HTTP__LISTEN".into(),
        format!("0.0.0.0:{}", service.http.port()),
    );
    assert_eq!(world.cli(&["health"]).await?.0, 0);
    let (code, _, stderr) = world.cli(&["health", "--path", "/readyz"]).await?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    world.etcd.restart().await?;
    service.wait_ready(Duration::from_secs(30)).await?;
    assert_eq!(world.cli(&["health", "--path", "/readyz"]).await?.0, 0);
    assert!(service.is_running());
    Ok(())
}

/// `doctor` passes against stores the service can use, and names what is
/// wrong, with a fix, when etcd takes smaller txns than configured or
/// PostgreSQL cannot be reached.
#[tokio::test]
async fn doctor_checks_what_the_service_needs_and_says_how_to_fix_it() -> anyhow::Result<()> {
    let mut world = World::new("[[mappings]]\nprefix = \"/app/\"\ntable = \"kv_app\"\n").await?;
    let (code, stdout, stderr) = world.cli(&["migrate"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, stderr) = world.cli(&["doctor"]).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for check in [
        "etcd.connect",
        "etcd.access \"/app/\"",
        "etcd.max_txn_ops",
        "etcd.max_request_bytes",
        "postgres.connect",
        "postgres.version",
        "postgres.rights",
        "postgres.triggers",
        "postgres.connections",
        "clock",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check} passes:\n{stdout}"
        );
    }
    // etcd older than 3.4.31 answers progress requests out of order: a
    // warning, not a failure.
    assert!(
        stdout.lines().any(|l| l.contains("etcd.progress")),
        "{stdout}"
    );

    // etcd's default --max-txn-ops is 128.
    world
        .env
        .insert("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS".into(), "500".into());
    let (code, stdout, _) = world.cli(&["doctor", "--json"]).await?;
    assert_eq!(code, 1, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["ok"], false);
    let checks = report["checks"].as_array().cloned().unwrap_or_default();
    let failed: Vec<&serde_json::Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["check"], "etcd.max_txn_ops");
    assert!(
        failed[0]["fix"]
            .as_str()
            .is_some_and(|fix| fix.contains("--max-txn-ops=500")),
        "{failed:?}"
    );
    world.env.remove("ETCD_PG_SYNC__ETCD__MAX_TXN_OPS");

    // Requests larger than etcd's default --max-request-bytes (1.5 MiB).
    world.env.insert(
        "ETCD_PG_SYNC__ETCD__MAX_REQUEST_BYTES".into(),
        "4194304".into(),
    );
    let (code, stdout, _) = world.cli(&["doctor"]).await?;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("etcd.max_request_bytes")),
        "{stdout}"
    );
    assert!(stdout.contains("--max-request-bytes=4194304"), "{stdout}");
    world.env.remove("ETCD_PG_SYNC__ETCD__MAX_REQUEST_BYTES");

    // Pools larger than PostgreSQL's connections.
    world
        .env
        .insert("ETCD_PG_SYNC__POSTGRES__POOL_SIZE".into(), "5000".into());
    let (code, stdout, _) = world.cli(&["doctor"]).await?;
    println!("{stdout}");
    assert_eq!(code, 1, "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("postgres.connections"))
        .unwrap_or_default();
    assert!(line.starts_with("FAIL"), "{stdout}");
    assert!(stdout.contains("fix: raise max_connections"), "{stdout}");
    world.env.remove("ETCD_PG_SYNC__POSTGRES__POOL_SIZE");

    // Nothing listens on the port of a stopped etcd.
    world.etcd.stop();
    let (code, stdout, _) = world.cli(&["doctor"]).await?;
    assert_eq!(code, 1, "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("etcd.connect"))
        .unwrap_or_default();
    assert!(line.starts_with("FAIL"), "{stdout}");
    assert!(stdout.contains("fix: check etcd.endpoints"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("postgres.triggers")),
        "PostgreSQL is still checked:\n{stdout}"
    );
    Ok(())
}
