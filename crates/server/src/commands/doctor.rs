//! `etcd-pg-sync doctor`: checks, with the effective configuration, what
//! the service will need of both stores, one line each, and says how to fix
//! each failure. Changes nothing: etcd's write permissions and limits are
//! tried in the branch of a txn that cannot run, PostgreSQL is only read.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eps_core::Config;
use eps_core::keys::display_key;
use eps_core::mapping::Direction;
use eps_etcd::{EtcdClient, EtcdError};
use eps_store::{Store, StoreError};
use serde::Serialize;

/// Certificates expiring sooner than this are a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Clocks further apart than this are a warning: `newest-wins` compares
/// write times taken on both sides.
const SKEW_WARNING: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
    /// Not run: what it needs failed already.
    Skipped,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
struct Check {
    check: String,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(check, Status::Ok, detail, None)
    }

    fn warn(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Status::Warn, detail, Some(fix.into()))
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Status::Fail, detail, Some(fix.into()))
    }

    fn skipped(check: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(check, Status::Skipped, why, None)
    }

    fn new(
        check: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Check {
            check: check.into(),
            status,
            detail: detail.into(),
            fix,
        }
    }
}

/// Runs every check and prints them; exit 1 when one fails.
pub async fn doctor(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let mut checks = certificates(config);
    let etcd = check_etcd(config, &mut checks).await;
    check_postgres(config, etcd.as_ref(), &mut checks).await;
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "ok": !failed, "checks": checks }))?
        );
    } else {
        let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
        for check in &checks {
            println!(
                "{:<4}  {:<width$}  {}",
                check.status.label(),
                check.check,
                check.detail
            );
            if let Some(fix) = &check.fix {
                println!("{:<4}  {:<width$}  fix: {fix}", "", "");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Every configured certificate file: readable, and not expired or about to.
fn certificates(config: &Config) -> Vec<Check> {
    let files = [
        ("etcd.tls.ca_file", config.etcd.tls.ca_file.as_deref()),
        ("etcd.tls.cert_file", config.etcd.tls.cert_file.as_deref()),
        (
            "postgres.tls.ca_file",
            config.postgres.tls.ca_file.as_deref(),
        ),
        (
            "postgres.tls.cert_file",
            config.postgres.tls.cert_file.as_deref(),
        ),
    ];
    let now = SystemTime::now();
    files
        .into_iter()
        .filter_map(|(setting, path)| Some((setting, path?)))
        .map(|(setting, path)| certificate(setting, path, now))
        .collect()
}

fn certificate(setting: &str, path: &Path, now: SystemTime) -> Check {
    let name = format!("certificate {setting}");
    let expiries = match expiries(path) {
        Ok(expiries) if !expiries.is_empty() => expiries,
        Ok(_) => {
            return Check::fail(
                name,
                format!("{}: no certificate in the file", path.display()),
                format!("point {setting} at a PEM file of certificates"),
            );
        }
        Err(error) => {
            return Check::fail(
                name,
                format!("{}: {error}", path.display()),
                format!("point {setting} at a readable PEM file of certificates"),
            );
        }
    };
    // The first to expire decides.
    let first = expiries.iter().min().copied().unwrap_or(now);
    let renew = format!("renew the certificate in {}", path.display());
    match first.duration_since(now) {
        Err(_) => Check::fail(
            name,
            format!("{}: expired {}", path.display(), days(now, first)),
            renew,
        ),
        Ok(left) if left < EXPIRY_WARNING => Check::warn(
            name,
            format!("{}: expires in {}", path.display(), days(first, now)),
            renew,
        ),
        Ok(_) => Check::ok(
            name,
            format!("{}: expires in {}", path.display(), days(first, now)),
        ),
    }
}

/// "N days" (or hours) between two times, `later` after `earlier`.
fn days(later: SystemTime, earlier: SystemTime) -> String {
    let span = later.duration_since(earlier).unwrap_or_default().as_secs();
    if span >= 2 * 86_400 {
        format!("{} days", span / 86_400)
    } else {
        format!("{} hours", span / 3600)
    }
}

/// When each certificate of a PEM file expires.
fn expiries(path: &Path) -> anyhow::Result<Vec<SystemTime>> {
    use x509_cert::der::Decode;
    let pem = std::fs::read(path)?;
    let mut out = Vec::new();
    for der in rustls_pemfile::certs(&mut pem.as_slice()) {
        let certificate = x509_cert::Certificate::from_der(der?.as_ref())
            .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
        let not_after = certificate
            .tbs_certificate
            .validity
            .not_after
            .to_unix_duration();
        out.push(UNIX_EPOCH + not_after);
    }
    Ok(out)
}

/// How to fix an etcd error, by its kind.
fn etcd_fix(error: &EtcdError) -> String {
    match error {
        EtcdError::Unavailable(_) | EtcdError::Timeout(_) => {
            "check etcd.endpoints, that etcd runs, and that this host reaches it".into()
        }
        EtcdError::Tls(_) => "check etcd.tls.ca_file (it must sign etcd's certificate), \
             etcd.tls.domain (a name in that certificate), and etcd.tls.cert_file/key_file when \
             etcd requires client certificates"
            .into(),
        EtcdError::PermissionDenied(_) => {
            "check etcd.username and etcd.password (or password_file)".into()
        }
        _ => "see etcd's answer above".into(),
    }
}

/// Connects to etcd and checks access and limits; the client, if it
/// connected.
async fn check_etcd(config: &Config, checks: &mut Vec<Check>) -> Option<EtcdClient> {
    let scheme = if config.etcd.tls.ca_file.is_some() {
        "TLS"
    } else {
        "plaintext"
    };
    let auth = match &config.etcd.username {
        Some(user) => format!("user {user}"),
        None => "no authentication".into(),
    };
    let etcd = match EtcdClient::connect(&config.etcd).await {
        Ok(etcd) => etcd,
        Err(error) => {
            let fix = etcd_fix(&error);
            checks.push(Check::fail(
                "etcd.connect",
                format!(
                    "{} ({scheme}, {auth}): {error}",
                    config.etcd.endpoints.join(",")
                ),
                fix,
            ));
            checks.push(Check::skipped("etcd.*", "etcd not reached"));
            return None;
        }
    };
    match etcd.server_status().await {
        Ok(status) => checks.push(Check::ok(
            "etcd.connect",
            format!(
                "etcd {} ({scheme}, {auth}), cluster {:x}, revision {}, database {} MiB",
                status.version,
                status.cluster_id,
                status.revision,
                status.db_size / (1 << 20)
            ),
        )),
        Err(error) => {
            let fix = etcd_fix(&error);
            checks.push(Check::fail("etcd.connect", error.to_string(), fix));
        }
    }
    checks.push(if etcd.progress_requests_ordered().await {
        Check::ok(
            "etcd.progress",
            "every endpoint answers progress requests in order with its watches",
        )
    } else {
        Check::warn(
            "etcd.progress",
            "an endpoint runs etcd older than 3.4.31 (3.5.13 in 3.5), which answers progress \
             requests out of order (or could not be asked): the service ignores those answers, \
             so the checkpoint of an idle mapping moves only with etcd's periodic progress \
             notifications, every 10 minutes by default",
            "upgrade etcd, or start it with --experimental-watch-progress-notify-interval=5s",
        )
    });
    let mappings = match config.validated_mappings() {
        Ok(mappings) => mappings,
        Err(error) => {
            checks.push(Check::fail(
                "etcd.access",
                error.to_string(),
                "fix the mappings",
            ));
            return Some(etcd);
        }
    };
    let grant = |prefix: &str, write: bool| {
        let user = config.etcd.username.as_deref().unwrap_or("<user>");
        format!(
            "grant the role of {user} {} on the prefix: etcdctl role grant-permission <role> \
             --prefix=true {} '{prefix}'",
            if write { "readwrite" } else { "read" },
            if write { "readwrite" } else { "read" },
        )
    };
    for mapping in mappings.iter() {
        let write = mapping.direction != Direction::EtcdToPg;
        let prefix = display_key(&mapping.prefix);
        let name = format!("etcd.access {prefix:?}");
        let what = if write { "read and write" } else { "read" };
        checks.push(match etcd.probe_access(&mapping.prefix, write).await {
            Ok(()) => Check::ok(name, format!("{what} ({})", mapping.table.as_str())),
            Err(error @ EtcdError::PermissionDenied(_)) => {
                Check::fail(name, format!("{what}: {error}"), grant(&prefix, write))
            }
            Err(error) => {
                let fix = etcd_fix(&error);
                Check::fail(name, format!("{what}: {error}"), fix)
            }
        });
    }
    let internal = eps_core::cluster_prefix(&config.cluster.name);
    let shown = display_key(&internal);
    let name = format!("etcd.access {shown:?}");
    checks.push(match etcd.probe_access(&internal, true).await {
        Ok(()) => Check::ok(name, "read and write (election, timeline mark)"),
        Err(error) => Check::fail(
            name,
            format!("read and write: {error}"),
            grant(&shown, true),
        ),
    });
    let probe = mappings
        .iter()
        .next()
        .map(|m| m.prefix.clone())
        .unwrap_or(internal);
    let ops = config.etcd.max_txn_ops;
    checks.push(match etcd.probe_txn_ops(&probe, ops).await {
        Ok(()) => Check::ok(
            "etcd.max_txn_ops",
            format!("etcd takes txns of {ops} operations"),
        ),
        Err(error) => Check::fail(
            "etcd.max_txn_ops",
            format!("a txn of {ops} operations: {error}"),
            format!(
                "start etcd with --max-txn-ops={ops} or more, or lower etcd.max_txn_ops to \
                 etcd's limit (128 by default)"
            ),
        ),
    });
    let configured = config.etcd.max_request_bytes;
    // The largest txn the service sends (the setting less its framing
    // headroom). A write is what etcd checks the size of: probed under the
    // cluster's own prefix, which the service may always write.
    let (_, bytes) = config.etcd.txn_limits(1);
    let probed = etcd
        .probe_request_bytes(&eps_core::cluster_prefix(&config.cluster.name), bytes)
        .await;
    checks.push(match probed {
        Ok(()) => Check::ok(
            "etcd.max_request_bytes",
            format!("etcd takes the service's largest txns ({bytes} bytes, for {configured})"),
        ),
        Err(error) => Check::fail(
            "etcd.max_request_bytes",
            format!("a request of {bytes} bytes: {error}"),
            format!(
                "start etcd with --max-request-bytes={configured} or more, or lower \
                 etcd.max_request_bytes to etcd's limit (1572864 by default)"
            ),
        ),
    });
    Some(etcd)
}

/// How to fix a PostgreSQL connection error, by its kind.
fn postgres_fix(error: &StoreError) -> String {
    match error {
        StoreError::Auth(_) => {
            "check the user and password of postgres.url (or postgres.password_file), and \
             pg_hba.conf"
                .into()
        }
        StoreError::Tls(_) => "check postgres.tls (mode, ca_file, cert_file/key_file) against the \
             server's certificate and ssl settings"
            .into(),
        _ => "check postgres.url, that PostgreSQL runs, and that this host reaches it".into(),
    }
}

async fn check_postgres(config: &Config, etcd: Option<&EtcdClient>, checks: &mut Vec<Check>) {
    let store = match Store::new(config).await {
        Ok(store) => store,
        Err(error) => {
            let fix = postgres_fix(&error);
            checks.push(Check::fail("postgres.connect", error.to_string(), fix));
            return;
        }
    };
    let asked = Instant::now();
    let sent = SystemTime::now();
    let facts = match store.preflight().await {
        Ok(facts) => facts,
        Err(error) => {
            let fix = postgres_fix(&error);
            checks.push(Check::fail(
                "postgres.connect",
                format!("{}: {error}", config.postgres.url.redacted()),
                fix,
            ));
            checks.push(Check::skipped("postgres.*", "PostgreSQL not reached"));
            return;
        }
    };
    let round_trip = asked.elapsed();
    checks.push(Check::ok(
        "postgres.connect",
        format!("{} as {}", config.postgres.url.redacted(), facts.role),
    ));
    // pg_current_xact_id() and xid8 (the outbox's transactions) are 13's.
    checks.push(if facts.version_num >= 130_000 {
        Check::ok("postgres.version", format!("PostgreSQL {}", facts.version))
    } else {
        Check::fail(
            "postgres.version",
            format!("PostgreSQL {}", facts.version),
            "upgrade to PostgreSQL 13 or later",
        )
    });
    let schema = store.schema().as_str().to_owned();
    let migrated = facts.schema_owner.is_some();
    checks.push(match &facts.schema_owner {
        Some(owner) if facts.owns_schema => Check::ok(
            "postgres.rights",
            format!(
                "{} may migrate schema {schema} (owned by {owner})",
                facts.role
            ),
        ),
        Some(owner) => Check::fail(
            "postgres.rights",
            format!(
                "schema {schema} is owned by {owner}, and {} is not a member of it",
                facts.role
            ),
            format!(
                "run the service as {owner} (or GRANT {owner} TO {}): the triggers take only \
                 their owner's writes for the service's",
                facts.role
            ),
        ),
        None if facts.may_create_schema => Check::ok(
            "postgres.rights",
            format!(
                "schema {schema} does not exist yet; {} may create it (migrate)",
                facts.role
            ),
        ),
        None => Check::fail(
            "postgres.rights",
            format!(
                "schema {schema} does not exist, and {} may not create it",
                facts.role
            ),
            format!(
                "GRANT CREATE ON DATABASE <database> TO {}, or create schema {schema} owned by it",
                facts.role
            ),
        ),
    });
    if facts.superuser {
        checks.push(Check::warn(
            "postgres.role",
            format!("{} is a superuser", facts.role),
            "let a dedicated role own the schema (SECURITY.md): the trigger functions run with \
             their owner's rights",
        ));
    }
    checks.push(if !migrated {
        Check::skipped(
            "postgres.triggers",
            "not migrated yet: `etcd-pg-sync migrate` (or `run`) creates the tables",
        )
    } else {
        match store.check_service_role().await {
            Ok(()) => Check::ok(
                "postgres.triggers",
                format!(
                    "every mapped table ({}) has its triggers, enabled",
                    store.mappings().iter().count()
                ),
            ),
            Err(error) => Check::fail(
                "postgres.triggers",
                error.to_string(),
                "`etcd-pg-sync migrate` as the schema's owner",
            ),
        }
    });
    checks.push(connections(config, &facts, etcd).await);
    checks.push(skew(&facts, sent, round_trip));
}

/// The replicas' pools fit under `max_connections` beside the other
/// clients.
async fn connections(
    config: &Config,
    facts: &eps_store::preflight::PgFacts,
    etcd: Option<&EtcdClient>,
) -> Check {
    let election = eps_cluster::election_prefix(&config.cluster.name);
    let registered = match etcd {
        Some(etcd) => etcd.count_under(&election).await.unwrap_or(0),
        None => 0,
    };
    let replicas = registered.max(1);
    // Each replica: its pool, and the LISTEN connection beside it.
    let per_replica = config.postgres.pool_size as i64 + 1;
    let need = replicas * per_replica;
    // This check's connection is the service's too.
    let others = facts.connections - facts.service_connections;
    let room = i64::from(facts.max_connections) - i64::from(facts.reserved_connections) - others;
    let detail = format!(
        "{replicas} replica(s) × (pool_size {} + 1) = {need} connections; max_connections {} \
         ({} reserved), {others} used by other clients",
        config.postgres.pool_size, facts.max_connections, facts.reserved_connections
    );
    if need > room {
        Check::fail(
            "postgres.connections",
            detail,
            "raise max_connections, or lower postgres.pool_size",
        )
    } else {
        Check::ok("postgres.connections", detail)
    }
}

/// This host's clock against PostgreSQL's, allowing for the round trip.
fn skew(facts: &eps_store::preflight::PgFacts, sent: SystemTime, round_trip: Duration) -> Check {
    let local_us = sent
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
        + round_trip.as_micros() as i64 / 2;
    let skew_us = facts.now_us - local_us;
    let uncertainty = round_trip / 2;
    let skew = Duration::from_micros(skew_us.unsigned_abs());
    let detail = format!(
        "PostgreSQL's clock is {:.3} s {} this host's (± {:.3} s)",
        skew.as_secs_f64(),
        if skew_us >= 0 { "ahead of" } else { "behind" },
        uncertainty.as_secs_f64()
    );
    if skew.saturating_sub(uncertainty) > SKEW_WARNING {
        Check::warn(
            "clock",
            detail,
            "synchronize both hosts' clocks (chrony, systemd-timesyncd): newest-wins compares \
             times taken on both",
        )
    } else {
        Check::ok("clock", detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_file(not_after: (i32, u8, u8)) -> tempfile::NamedTempFile {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), cert.pem()).unwrap();
        file
    }

    #[test]
    fn certificates_are_judged_by_their_expiry() {
        let at = |y: i32, m: u8, d: u8| {
            UNIX_EPOCH
                + Duration::from_secs(
                    rcgen::date_time_ymd(y, m, d)
                        .unix_timestamp()
                        .unsigned_abs(),
                )
        };
        let file = certificate_file((2030, 6, 1));
        let status = |now| certificate("etcd.tls.ca_file", file.path(), now).status;
        assert_eq!(status(at(2030, 1, 1)), Status::Ok);
        assert_eq!(status(at(2030, 5, 25)), Status::Warn, "a week left");
        assert_eq!(status(at(2030, 6, 2)), Status::Fail, "expired");
        let missing = certificate(
            "etcd.tls.ca_file",
            Path::new("/nonexistent.pem"),
            at(2030, 1, 1),
        );
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.fix.is_some());
    }
}
