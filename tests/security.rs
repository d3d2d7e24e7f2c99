//! Security (docs/design.md G8, G9; SECURITY.md): mutual TLS to both stores, SCRAM and
//! etcd passwords, RBAC limited to the mapped prefix; wrong CAs, missing or
//! expired certificates and wrong passwords fail once, clearly, without a
//! retry storm; hostile input.

mod support;

use anyhow::Context as _;
use eps_harness::etcd::EtcdOptions;
use eps_harness::{Etcd, Postgres, PostgresOptions, Service, ServiceConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

/// A throwaway certificate authority and the certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(name: &str) -> anyhow::Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        Ok(Pki { dir, ca })
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn issue(&self, name: &str, common_name: &str, expired: bool) -> anyhow::Result<Issued> {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if expired {
            params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
            params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        write_secret(&issued.key, key.serialize_pem().as_bytes())?;
        Ok(issued)
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// etcd requiring client certificates signed by `pki`.
async fn etcd_with_mtls(pki: &Pki) -> anyhow::Result<Etcd> {
    let server = pki.issue("etcd-server", "etcd", false)?;
    let client = pki.issue("harness", "root", false)?;
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(pki.ca())?))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&client.cert)?,
            std::fs::read(&client.key)?,
        ));
    Etcd::start_with(EtcdOptions {
        extra_args: vec![
            "--cert-file".into(),
            path(&server.cert),
            "--key-file".into(),
            path(&server.key),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            path(&pki.ca()),
        ],
        https: true,
        connect_options: Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    })
    .await
}

/// PostgreSQL with TLS: `certuser` authenticates with a client certificate,
/// `scramuser` with a SCRAM password; the harness itself stays on trust.
async fn postgres_with_tls(pki: &Pki) -> anyhow::Result<Postgres> {
    let server = pki.issue("pg-server", "postgres", false)?;
    let hba = "local all all trust\n\
               hostssl all certuser 127.0.0.1/32 cert\n\
               hostssl all scramuser 127.0.0.1/32 scram-sha-256\n\
               hostssl all cleartextuser 127.0.0.1/32 password\n\
               host all postgres 127.0.0.1/32 trust\n";
    let postgres = Postgres::start_custom(PostgresOptions {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), "server.crt".into()),
            ("ssl_key_file".into(), "server.key".into()),
            ("ssl_ca_file".into(), "ca.crt".into()),
            ("password_encryption".into(), "scram-sha-256".into()),
        ],
        hba: Some(hba.into()),
        files: vec![
            ("server.crt".into(), std::fs::read(&server.cert)?),
            ("server.key".into(), std::fs::read(&server.key)?),
            ("ca.crt".into(), std::fs::read(pki.ca())?),
        ],
    })
    .await?;
    let admin = eps_harness::postgres::connect(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        postgres.port()
    ))
    .await?;
    admin
        .batch_execute("CREATE ROLE certuser LOGIN SUPERUSER; CREATE ROLE scramuser LOGIN SUPERUSER PASSWORD 'right-password'; \
                        CREATE ROLE cleartextuser LOGIN SUPERUSER PASSWORD 'right-password';")
        .await?;
    Ok(postgres)
}

fn config(etcd: &Etcd, pg_url: &str, node: &str, extra: &str) -> ServiceConfig {
    let mappings = "\n[[mappings]]\nprefix = \"/app/\"\ntable = \"kv_app\"\n";
    ServiceConfig::new(
        BIN,
        &etcd.endpoint(),
        pg_url,
        node,
        &format!("{mappings}{extra}"),
    )
}

/// Starts a replica that must fail at start-up; returns its log.
async fn expect_startup_failure(config: ServiceConfig, node: &str) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut service = Service::spawn(config, node)?;
    let exit = service.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(exit.code(), Some(1), "{}", service.log_tail(20));
    let logs = service.logs();
    // Refused once, not retried in a storm.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    Ok(logs)
}

#[tokio::test]
async fn syncs_over_mutual_tls_with_both_stores() -> anyhow::Result<()> {
    let pki = Pki::new("test-ca")?;
    let etcd = etcd_with_mtls(&pki).await?;
    let postgres = postgres_with_tls(&pki).await?;
    let db = postgres.create_database().await?;
    let client = pki.issue("sync-client", "certuser", false)?;
    let url = format!("postgres://certuser@127.0.0.1:{}/{}", db.port, db.name);
    let extra = format!(
        "\n[etcd.tls]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
         \n[postgres.tls]\nmode = \"verify-full\"\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n",
        ca = path(&pki.ca()),
        cert = path(&client.cert),
        key = path(&client.key),
    );
    let service = Service::start(config(&etcd, &url, "n1", &extra), "n1").await?;
    let mut leader = false;
    for _ in 0..200 {
        if status(&service).await?["role"] == "leader" {
            leader = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(leader, "{}", service.log_tail(30));
    let mut kv = etcd.client().await?;
    kv.put("/app/over-tls", "from etcd", None).await?;
    let pg = db.client().await?;
    eps_harness::wait_for("the etcd change over TLS", Duration::from_secs(10), || {
        let pg = &pg;
        async move {
            let rows = pg
                .query(
                    "SELECT value FROM etcd_sync.kv_app WHERE key = '/app/over-tls'",
                    &[],
                )
                .await?;
            Ok((rows.len() == 1).then_some(()))
        }
    })
    .await?;
    pg.execute(
        "INSERT INTO etcd_sync.kv_app_text (key, value) VALUES ('/app/from-pg', 'over tls')",
        &[],
    )
    .await?;
    wait_etcd_has(&kv, "/app/from-pg", Duration::from_secs(10))
        .await
        .context("the PostgreSQL change over TLS")?;
    // The service's PostgreSQL sessions are encrypted.
    let encrypted = pg
        .query_one("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND usename = 'certuser'", &[])
        .await?
        .get::<_, i64>(0);
    assert!(encrypted > 0);
    Ok(())
}

#[tokio::test]
async fn a_wrong_ca_fails_at_start_with_a_clear_error() -> anyhow::Result<()> {
    let pki = Pki::new("real-ca")?;
    let other = Pki::new("some-other-ca")?;
    let etcd = etcd_with_mtls(&pki).await?;
    let postgres = postgres_with_tls(&pki).await?;
    let db = postgres.create_database().await?;
    let client = pki.issue("client", "certuser", false)?;

    // etcd's certificate is checked against the wrong CA.
    let plain_db = Postgres::fresh_database().await?;
    let extra = format!(
        "\n[etcd.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        path(&other.ca()),
        path(&client.cert),
        path(&client.key)
    );
    let wrong_etcd_ca = config(&etcd, &plain_db.url(), "n1", &extra);
    // `doctor` names it beforehand, with the setting to check.
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &wrong_etcd_ca.toml)?;
    let (code, stdout, stderr) = run_cli(&["doctor", "--config", &path(file.path())], &[]).await?;
    println!("{stdout}");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("etcd.connect") && l.contains("TLS")),
        "{stdout}"
    );
    assert!(stdout.contains("fix: check etcd.tls.ca_file"), "{stdout}");
    let logs = expect_startup_failure(wrong_etcd_ca, "n1").await?;
    assert!(
        logs.contains("etcd TLS handshake failed") && logs.contains("certificate"),
        "{logs}"
    );

    // PostgreSQL's certificate is checked against the wrong CA.
    let url = format!("postgres://certuser@127.0.0.1:{}/{}", db.port, db.name);
    let extra = format!(
        "\n[postgres.tls]\nmode = \"verify-ca\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        path(&other.ca()),
        path(&client.cert),
        path(&client.key)
    );
    let plain_etcd = Etcd::start().await?;
    let logs = expect_startup_failure(config(&plain_etcd, &url, "n2", &extra), "n2").await?;
    assert!(logs.contains("postgres TLS handshake failed"), "{logs}");
    Ok(())
}

#[tokio::test]
async fn missing_or_expired_client_certificates_are_refused_clearly() -> anyhow::Result<()> {
    let pki = Pki::new("ca")?;
    let etcd = etcd_with_mtls(&pki).await?;
    let postgres = postgres_with_tls(&pki).await?;
    let db = postgres.create_database().await?;
    let plain_db = Postgres::fresh_database().await?;

    // No client certificate for an etcd that requires one.
    let extra = format!("\n[etcd.tls]\nca_file = \"{}\"\n", path(&pki.ca()));
    let logs = expect_startup_failure(config(&etcd, &plain_db.url(), "n1", &extra), "n1").await?;
    assert!(logs.contains("etcd TLS handshake failed"), "{logs}");

    // An expired client certificate for PostgreSQL's `cert` authentication.
    let expired = pki.issue("expired", "certuser", true)?;
    let url = format!("postgres://certuser@127.0.0.1:{}/{}", db.port, db.name);
    let extra = format!(
        "\n[postgres.tls]\nmode = \"verify-full\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        path(&pki.ca()),
        path(&expired.cert),
        path(&expired.key)
    );
    let plain_etcd = Etcd::start().await?;
    let logs = expect_startup_failure(config(&plain_etcd, &url, "n2", &extra), "n2").await?;
    assert!(
        logs.contains("postgres TLS handshake failed")
            || logs.contains("postgres refused the connection"),
        "{logs}"
    );
    assert!(logs.to_lowercase().contains("certificate"), "{logs}");
    Ok(())
}

#[tokio::test]
async fn sslmode_in_the_url_is_honoured_and_never_falls_back_to_plaintext() -> anyhow::Result<()> {
    let pki = Pki::new("ca")?;
    let etcd = Etcd::start().await?;
    // A server without TLS: `sslmode=require` must refuse it, not connect in
    // plaintext.
    let plain = Postgres::fresh_database().await?;
    let url = format!("{}?sslmode=require", plain.url());
    let logs = expect_startup_failure(config(&etcd, &url, "n1", ""), "n1").await?;
    assert!(logs.contains("TLS"), "{logs}");

    // A server with TLS: verify-full with the CA from the URL, as libpq
    // reads it; a password over SCRAM.
    let postgres = postgres_with_tls(&pki).await?;
    let db = postgres.create_database().await?;
    let url = format!(
        "postgres://scramuser@127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}",
        db.port,
        db.name,
        path(&pki.ca())
    );
    let mut verified = config(&etcd, &url, "n2", "");
    verified.env.insert(
        "ETCD_PG_SYNC__POSTGRES__PASSWORD".into(),
        "right-password".into(),
    );
    let service = Service::start(verified, "n2").await?;
    wait_leader(&[&service], Duration::from_secs(15)).await?;
    let pg = db.client().await?;
    let encrypted: i64 = pg
        .query_one("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND usename = 'scramuser'", &[])
        .await?
        .get(0);
    assert!(encrypted > 0);
    let unencrypted: i64 = pg
        .query_one("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE NOT ssl AND usename = 'scramuser'", &[])
        .await?
        .get(0);
    assert_eq!(unencrypted, 0);
    Ok(())
}

#[tokio::test]
async fn a_password_sent_without_verifying_the_server_needs_channel_binding() -> anyhow::Result<()>
{
    let pki = Pki::new("ca")?;
    let postgres = postgres_with_tls(&pki).await?;
    let db = postgres.create_database().await?;
    let etcd = Etcd::start().await?;
    let require = "\n[postgres.tls]\nmode = \"require\"\n";
    // A server (or an attacker posing as it: `require` does not check the
    // certificate) that asks for the password in cleartext is refused.
    let url = format!("postgres://cleartextuser@127.0.0.1:{}/{}", db.port, db.name);
    let mut cleartext = config(&etcd, &url, "n1", require);
    cleartext.env.insert(
        "ETCD_PG_SYNC__POSTGRES__PASSWORD".into(),
        "right-password".into(),
    );
    let logs = expect_startup_failure(cleartext, "n1").await?;
    assert!(logs.contains("channel binding"), "{logs}");
    assert!(!logs.contains("right-password"));
    // SCRAM with channel binding passes.
    let url = format!("postgres://scramuser@127.0.0.1:{}/{}", db.port, db.name);
    let mut scram = config(&etcd, &url, "n2", require);
    scram.env.insert(
        "ETCD_PG_SYNC__POSTGRES__PASSWORD".into(),
        "right-password".into(),
    );
    let service = Service::start(scram, "n2").await?;
    wait_leader(&[&service], Duration::from_secs(15)).await?;
    Ok(())
}

#[tokio::test]
async fn wrong_passwords_are_refused_clearly_and_secrets_stay_hidden() -> anyhow::Result<()> {
    let pki = Pki::new("ca")?;
    let postgres = postgres_with_tls(&pki).await?;
    let db = postgres.create_database().await?;
    let etcd = Etcd::start().await?;
    let url = format!("postgres://scramuser@127.0.0.1:{}/{}", db.port, db.name);
    let tls = format!(
        "\n[postgres.tls]\nmode = \"verify-full\"\nca_file = \"{}\"\n",
        path(&pki.ca())
    );

    let mut wrong = config(&etcd, &url, "n1", &tls);
    wrong.env.insert(
        "ETCD_PG_SYNC__POSTGRES__PASSWORD".into(),
        "wrong-password-1234".into(),
    );
    let logs = expect_startup_failure(wrong, "n1").await?;
    assert!(logs.contains("password authentication failed"), "{logs}");
    assert!(!logs.contains("wrong-password-1234"));

    // The right password (SCRAM over TLS) from a file works.
    let dir = tempfile::tempdir()?;
    write_secret(&dir.path().join("pw"), b"right-password\n")?;
    let mut right = config(&etcd, &url, "n2", &tls);
    right.env.insert(
        "ETCD_PG_SYNC__POSTGRES__PASSWORD_FILE".into(),
        path(&dir.path().join("pw")),
    );
    let service = Service::start(right, "n2").await?;
    let status = service.status().await?;
    assert!(!status.contains("right-password") && !service.logs().contains("right-password"));

    // etcd with authentication: a wrong password is refused at start.
    let mut root = etcd.client().await?;
    root.user_add("root", "root-password", None).await?;
    root.user_grant_role("root", "root").await?;
    root.auth_enable().await?;
    let mut wrong = config(&etcd, &Postgres::fresh_database().await?.url(), "n3", "");
    wrong
        .env
        .insert("ETCD_PG_SYNC__ETCD__USERNAME".into(), "root".into());
    wrong.env.insert(
        "ETCD_PG_SYNC__ETCD__PASSWORD".into(),
        "not-the-etcd-password".into(),
    );
    let logs = expect_startup_failure(wrong, "n3").await?;
    assert!(logs.contains("authentication failed"), "{logs}");
    assert!(!logs.contains("not-the-etcd-password"));
    Ok(())
}

#[tokio::test]
async fn an_etcd_role_limited_to_the_mapped_prefix_is_enough_and_denied_elsewhere()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let mut root = etcd.client().await?;
    // The minimal role (README "Security"): the mapped prefix and the
    // cluster's election prefix. Here writes are allowed only under
    // /app/rw/, so a change under /app/ro/ is refused by etcd.
    root.role_add("etcd-pg-sync").await?;
    for permission in [
        etcd_client::Permission::read("/app/").with_prefix(),
        etcd_client::Permission::read_write("/app/rw/").with_prefix(),
        etcd_client::Permission::read_write("__etcd_pg_sync/test/").with_prefix(),
    ] {
        root.role_grant_permission("etcd-pg-sync", permission)
            .await?;
    }
    root.user_add("sync", "sync-password", None).await?;
    root.user_grant_role("sync", "etcd-pg-sync").await?;
    root.user_add("root", "root-password", None).await?;
    root.user_grant_role("root", "root").await?;
    root.auth_enable().await?;
    let root_options = etcd_client::ConnectOptions::new().with_user("root", "root-password");
    let mut root = etcd_client::Client::connect([etcd.endpoint()], Some(root_options)).await?;
    root.put("/app/rw/existing", "from etcd", None).await?;

    let db = Postgres::fresh_database().await?;
    let mut service_config = config(&etcd, &db.url(), "n1", "");
    service_config
        .env
        .insert("ETCD_PG_SYNC__RETRY__MAX_ATTEMPTS".into(), "3".into());
    service_config
        .env
        .insert("ETCD_PG_SYNC__ETCD__USERNAME".into(), "sync".into());
    service_config.env.insert(
        "ETCD_PG_SYNC__ETCD__PASSWORD".into(),
        "sync-password".into(),
    );
    let service = Service::start(service_config, "n1").await?;
    wait_leader(&[&service], Duration::from_secs(15))
        .await
        .with_context(|| service.log_tail(30))?;
    let pg = db.client().await?;
    wait_count(
        &pg,
        "the mapped prefix is read with the limited role",
        "SELECT count(*) FROM etcd_sync.kv_app WHERE key = '/app/rw/existing'",
        |n| n == 1,
        Duration::from_secs(10),
    )
    .await?;
    pg.execute(
        "INSERT INTO etcd_sync.kv_app_text (key, value) VALUES ('/app/ro/refused', 'x')",
        &[],
    )
    .await?;
    pg.execute(
        "INSERT INTO etcd_sync.kv_app_text (key, value) VALUES ('/app/rw/allowed', 'y')",
        &[],
    )
    .await?;
    let dead = eps_harness::wait_for("the dead letter", Duration::from_secs(20), || {
        let (pg, mut root) = (&pg, root.clone());
        async move {
            let dead: Vec<(String, String)> = pg
                .query("SELECT kind, reason FROM etcd_sync.dead_letters", &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let allowed = !root.get("/app/rw/allowed", None).await?.kvs().is_empty();
            anyhow::ensure!(
                allowed && dead.len() == 1,
                "dead letters {dead:?}, allowed flowed: {allowed}"
            );
            Ok(Some(dead))
        }
    })
    .await?;
    // Refused for good: dead-lettered at once, not retried (a retry cannot
    // help, and later transactions would wait).
    assert_eq!(dead[0].0, "refused");
    assert!(dead[0].1.contains("permission denied"), "{dead:?}");
    let retries = count(
        &pg,
        "SELECT count(*) FROM etcd_sync.sync_events WHERE kind = 'retry-exhausted'",
    )
    .await?;
    assert_eq!(retries, 0, "a refusal is not retried");
    // Once the operator grants the permission, retrying the dead letter
    // delivers the change.
    root.role_grant_permission(
        "etcd-pg-sync",
        etcd_client::Permission::read_write("/app/ro/").with_prefix(),
    )
    .await?;
    let url = db.url();
    let (code, stdout, stderr) = run_cli(
        &["dead-letters", "retry", "--all"],
        &[("ETCD_PG_SYNC__POSTGRES__URL", url.as_str())],
    )
    .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 dead letter(s) put back"), "{stdout}");
    wait_etcd_has(&root, "/app/ro/refused", Duration::from_secs(15))
        .await
        .context("the retried change")?;
    // `doctor` says so beforehand: reads of /app/ and the cluster's prefix
    // pass, writes to all of /app/ do not.
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &config(&etcd, &url, "doctor", "").toml)?;
    let (code, stdout, stderr) = run_cli(
        &["doctor", "--config", &path(file.path())],
        &[
            ("ETCD_PG_SYNC__ETCD__USERNAME", "sync"),
            ("ETCD_PG_SYNC__ETCD__PASSWORD", "sync-password"),
        ],
    )
    .await?;
    assert_eq!(code, 1, "{stdout}{stderr}");
    let line = |check: &str| {
        stdout
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("etcd.access \"/app/\"").starts_with("FAIL"),
        "{stdout}"
    );
    assert!(
        stdout.contains("etcdctl role grant-permission <role> --prefix=true readwrite '/app/'"),
        "{stdout}"
    );
    assert!(
        line("etcd.access \"__etcd_pg_sync/test/\"").starts_with("ok"),
        "{stdout}"
    );
    // Elsewhere the service's user is denied.
    let sync_options = etcd_client::ConnectOptions::new().with_user("sync", "sync-password");
    let mut sync = etcd_client::Client::connect([etcd.endpoint()], Some(sync_options)).await?;
    assert!(sync.put("/other/key", "x", None).await.is_err());
    assert!(sync.get("/other/key", None).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_ten_thousand_row_statement_propagates_whole() -> anyhow::Result<()> {
    let world = World::new("[[mappings]]\nprefix = \"/h/\"\ntable = \"kv_h\"\n").await?;
    let service = world.start("n1").await?;
    wait_leader(&[&service], Duration::from_secs(10)).await?;
    let pg = world.pg().await?;
    pg.execute(
        "INSERT INTO kv_h (key, value) SELECT convert_to('/h/' || g, 'UTF8'), convert_to(repeat('v', g % 100), 'UTF8') \
         FROM generate_series(1, 10000) g",
        &[],
    )
    .await?;
    let state = wait_converged(&world, "kv_h", b"/h/", Duration::from_secs(60)).await?;
    assert_eq!(state.len(), 10_000);
    Ok(())
}
