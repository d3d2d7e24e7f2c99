//! Operator commands that run once and exit.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use eps_core::Config;
use eps_core::keys::display_key;
use eps_core::policy::Side;
use eps_etcd::EtcdClient;
use eps_store::{Store, ledger};

use crate::cli::{Command, ConflictsCommand, DeadLettersCommand, TimelineCommand};

pub fn check_config(config: &Config, json: bool) -> ExitCode {
    if !json {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    match serde_json::to_string_pretty(config) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: cannot print the configuration as JSON: {error}");
            ExitCode::FAILURE
        }
    }
}

/// GETs `path` from the replica at `http.listen` (its loopback address
/// when it listens on all): 0 on a 200, 1 otherwise. The slim image has no
/// HTTP client; one request needs none.
pub fn health(config: &Config, path: &str) -> ExitCode {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut address: std::net::SocketAddr = config
            .http
            .listen
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if address.ip().is_unspecified() {
            address.set_ip(match address {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
        let mut response = String::new();
        stream.take(64 * 1024).read_to_string(&mut response)?;
        Ok(response)
    })();
    match answer {
        Ok(response)
            if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") =>
        {
            ExitCode::SUCCESS
        }
        Ok(response) => {
            eprintln!(
                "unhealthy: {}",
                response.lines().next().unwrap_or("(empty answer)")
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("unhealthy: {path} on {}: {error}", config.http.listen);
            ExitCode::FAILURE
        }
    }
}

/// Runs a one-shot command on a small runtime and maps its result to an
/// exit code (errors printed with their context).
pub fn run_blocking(command: Command, config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(command, config)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exit_code_of(&error))
        }
    }
}

/// Exit code of a failed command: 3 when a store could not be reached or
/// refused this service (network, credentials, TLS), 1 otherwise — so a
/// script tells "the check found a problem" from "the check could not run".
fn exit_code_of(error: &anyhow::Error) -> u8 {
    let unreachable = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<eps_store::StoreError>(),
            Some(
                eps_store::StoreError::Unavailable(_)
                    | eps_store::StoreError::Auth(_)
                    | eps_store::StoreError::Tls(_)
            )
        ) || matches!(
            cause.downcast_ref::<eps_etcd::EtcdError>(),
            Some(
                eps_etcd::EtcdError::Unavailable(_)
                    | eps_etcd::EtcdError::Timeout(_)
                    | eps_etcd::EtcdError::PermissionDenied(_)
                    | eps_etcd::EtcdError::Tls(_)
            )
        )
    });
    if unreachable {
        crate::EXIT_UNREACHABLE
    } else {
        1
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    if let Command::Doctor { json } = command {
        // Reports an unreachable store as a failed check, not an error.
        return super::doctor::doctor(&config, json).await;
    }
    let store = Store::new(&config).await.context("opening PostgreSQL")?;
    match command {
        Command::Migrate => {
            let report = store.migrate().await.context("applying migrations")?;
            if report.applied.is_empty() {
                println!("schema {} is up to date", store.schema());
            } else {
                println!("applied migrations: {}", report.applied.join(", "));
            }
            println!("mirror tables: {}", report.mirror_tables.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => status(&config, &store, json).await,
        Command::Conflicts { command } => conflicts(&store, command).await,
        Command::DeadLetters { command } => dead_letters(&store, command).await,
        Command::Verify {
            prefix,
            repair,
            json,
        } => super::repair::run_verify(&config, &store, prefix, repair, json).await,
        Command::Rollback {
            prefix,
            to_revision,
            to_time,
            apply,
            json,
        } => {
            let target = match (to_revision, to_time) {
                (Some(revision), _) => super::repair::Target::Revision(revision),
                (None, Some(at)) => super::repair::Target::Time(at),
                (None, None) => anyhow::bail!("--to-revision or --to-time is required"),
            };
            super::repair::run_rollback(&config, &store, &prefix, target, apply, json).await
        }
        Command::RestoreEtcd {
            prefix,
            leased_keys_ttl,
            at_revision,
            at_time,
            set_aside_queued,
        } => {
            let at = match (at_revision, at_time) {
                (Some(revision), _) => Some(super::repair::Target::Revision(revision)),
                (None, Some(at)) => Some(super::repair::Target::Time(at)),
                (None, None) => None,
            };
            super::repair::run_restore(
                &config,
                &store,
                prefix,
                leased_keys_ttl,
                at,
                set_aside_queued,
            )
            .await
        }
        Command::Timeline {
            command: TimelineCommand::Resume { take },
        } => resume_timeline(&store, take.into()).await,
        Command::Run { .. }
        | Command::CheckConfig { .. }
        | Command::Health { .. }
        | Command::Doctor { .. } => {
            unreachable!("dispatched elsewhere")
        }
    }
}

/// What etcd says for `status`: its revision and the election's
/// candidates (node, lease seconds left), the first leading.
struct EtcdView {
    revision: i64,
    replicas: Vec<(String, Option<i64>)>,
}

async fn etcd_view(config: &Config) -> anyhow::Result<EtcdView> {
    let etcd = EtcdClient::connect(&config.etcd)
        .await
        .context("connecting to etcd")?;
    let revision = etcd
        .current_revision()
        .await
        .context("reading etcd's revision")?;
    let prefix = eps_cluster::election_prefix(&config.cluster.name);
    let replicas = etcd
        .candidates_under(&prefix)
        .await
        .context("reading the election")?
        .into_iter()
        .map(|(kv, ttl)| (String::from_utf8_lossy(&kv.value).into_owned(), ttl))
        .collect();
    Ok(EtcdView { revision, replicas })
}

/// The cluster as PostgreSQL and etcd see it. With etcd unreachable it
/// still shows what PostgreSQL knows, says so, and exits 3.
async fn status(config: &Config, store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    let state = store.state().await.context("reading sync_state")?;
    let counts = store.counts().await.context("counting the ledgers")?;
    let recent = ledger::recent_events(
        &mut *store
            .connection()
            .await
            .context("connecting to PostgreSQL")?,
    )
    .await?;
    let etcd = etcd_view(config).await;
    let (etcd_revision, replicas, etcd_error) = match &etcd {
        Ok(view) => (Some(view.revision), view.replicas.clone(), None),
        Err(error) => (None, Vec::new(), Some(format!("{error:#}"))),
    };
    let leader_node = replicas.first().map(|(node, _)| node.clone());
    let lag = etcd_revision.map(|r| (r - state.applied_revision).max(0));
    let replica_list: Vec<serde_json::Value> = replicas
        .iter()
        .enumerate()
        .map(|(i, (node, ttl))| {
            serde_json::json!({
                "node_id": node,
                "role": if i == 0 { "leader" } else { "standby" },
                "lease_ttl_secs": ttl,
            })
        })
        .collect();
    let events: std::collections::BTreeMap<String, i64> =
        recent.iter().map(|(k, n)| (k.clone(), *n)).collect();
    if json {
        let document = serde_json::json!({
            "cluster": config.cluster.name,
            "leader": leader_node,
            "replicas": replica_list,
            "etcd_reachable": etcd_error.is_none(),
            "etcd_error": etcd_error,
            "term": state.term,
            "leader_in_postgres": state.leader_node,
            "applied_revision": state.applied_revision,
            "etcd_revision": etcd_revision,
            "lag_revisions": lag,
            "outbox_pending": counts.outbox_pending,
            "conflicts_pending": counts.conflicts_pending,
            "dead_letters": counts.dead_letters,
            "timeline": state.timeline,
            "timeline_paused": state.timeline_hold,
            "events_last_hour": events,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        let unknown = || "(etcd unreachable)".to_owned();
        println!("cluster:           {}", config.cluster.name);
        match &etcd_error {
            Some(error) => println!("etcd:              UNREACHABLE: {error}"),
            None => println!("etcd:              reachable"),
        }
        println!(
            "leader:            {}",
            match (&etcd_error, &leader_node) {
                (Some(_), _) => format!(
                    "{} (etcd unreachable; the last leader PostgreSQL knows)",
                    state.leader_node.as_deref().unwrap_or("(none)")
                ),
                (None, Some(node)) => node.clone(),
                (None, None) => "(none)".into(),
            }
        );
        for (i, (node, ttl)) in replicas.iter().enumerate() {
            println!(
                "replica:           {node:<24} {:<8} lease {}",
                if i == 0 { "leader" } else { "standby" },
                ttl.map_or("expiring".into(), |t| format!("{t} s left"))
            );
        }
        println!("term:              {}", state.term);
        println!("applied revision:  {}", state.applied_revision);
        println!(
            "etcd revision:     {}",
            etcd_revision.map_or_else(unknown, |r| r.to_string())
        );
        println!(
            "lag (revisions):   {}",
            lag.map_or_else(unknown, |l| l.to_string())
        );
        println!("outbox pending:    {}", counts.outbox_pending);
        println!("conflicts pending: {}", counts.conflicts_pending);
        println!("dead letters:      {}", counts.dead_letters);
        println!("etcd timeline:     {}", state.timeline);
        if let Some(held) = &state.timeline_hold {
            println!(
                "PAUSED:            etcd was restored or replaced ({held}); resume with `etcd-pg-sync timeline resume --take etcd|pg`"
            );
        }
        let summary: Vec<String> = events
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        println!(
            "last hour:         {}",
            if summary.is_empty() {
                "no events".into()
            } else {
                summary.join(", ")
            }
        );
    }
    Ok(match etcd {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => ExitCode::from(exit_code_of(&error)),
    })
}

/// When etcd's side of a conflict was made, as the revision clock knew it.
fn change_window(
    after: Option<chrono::DateTime<chrono::Utc>>,
    by: Option<chrono::DateTime<chrono::Utc>>,
) -> String {
    match (after, by) {
        (_, None) => "unknown".into(),
        (None, Some(by)) => format!("by {} (no earlier bound)", by.to_rfc3339()),
        (Some(after), Some(by)) => {
            format!("between {} and {}", after.to_rfc3339(), by.to_rfc3339())
        }
    }
}

/// A conflict as `conflicts list --json` prints it.
fn conflict_json(c: &ledger::ConflictRow) -> serde_json::Value {
    serde_json::json!({
        "id": c.id,
        "status": c.status.as_str(),
        "table": c.mirror_table,
        "key": display_key(&c.key),
        "policy": c.policy.as_str(),
        "winner": c.winner.map(Side::as_str),
        "decided_by_tie": c.decided_by_tie,
        "requested_take": c.requested_take.map(Side::as_str),
        "resolved_by": c.resolved_by.map(|r| r.as_str()),
        "etcd": {
            "value": c.etcd_value.as_deref().map(display_key),
            "revision": c.etcd_revision,
            "changed_after": c.etcd_changed_after.map(|t| t.to_rfc3339()),
            "changed_by": c.etcd_changed_by.map(|t| t.to_rfc3339()),
            "observed_at": c.etcd_observed_at.to_rfc3339(),
        },
        "pg": {
            "value": c.pg_value.as_deref().map(display_key),
            "base_revision": c.pg_revision,
            "changed_at": c.pg_changed_at.to_rfc3339(),
        },
        "detected_at": c.detected_at.to_rfc3339(),
        "resolved_at": c.resolved_at.map(|t| t.to_rfc3339()),
    })
}

fn show_value(value: Option<&[u8]>) -> String {
    match value {
        None => "(deleted)".into(),
        Some(v) if v.len() > 60 => format!("{}… ({} bytes)", display_key(&v[..60]), v.len()),
        Some(v) => display_key(v),
    }
}

async fn conflicts(store: &Store, command: ConflictsCommand) -> anyhow::Result<ExitCode> {
    let mut conn = store
        .connection()
        .await
        .context("connecting to PostgreSQL")?;
    match command {
        ConflictsCommand::List { all, limit, json } => {
            let rows = ledger::list_conflicts(&mut conn, !all, limit).await?;
            if json {
                let list: Vec<serde_json::Value> = rows.iter().map(conflict_json).collect();
                println!("{}", serde_json::Value::Array(list));
                return Ok(ExitCode::SUCCESS);
            }
            if rows.is_empty() {
                println!("no {}conflicts", if all { "" } else { "pending " });
            }
            for c in rows {
                println!(
                    "#{id} {status} table={table} key={key} policy={policy} winner={winner}{tie}\n    etcd: {ev} (revision {er}, made {made}, seen {eo})\n    pg:   {pv} (based on revision {pr}, written {pc}){req}",
                    id = c.id,
                    status = c.status,
                    table = c.mirror_table,
                    key = display_key(&c.key),
                    policy = c.policy,
                    winner = c.winner.map_or("-", Side::as_str),
                    tie = if c.decided_by_tie { " (a tie)" } else { "" },
                    made = change_window(c.etcd_changed_after, c.etcd_changed_by),
                    ev = show_value(c.etcd_value.as_deref()),
                    er = c.etcd_revision,
                    eo = c.etcd_observed_at.to_rfc3339(),
                    pv = show_value(c.pg_value.as_deref()),
                    pr = c.pg_revision,
                    pc = c.pg_changed_at.to_rfc3339(),
                    req = c
                        .requested_take
                        .map(|t| format!("\n    requested: take {t}"))
                        .unwrap_or_default(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ConflictsCommand::Resolve {
            id,
            timeline_changes,
            take,
        } => {
            let side = Side::from(take);
            let Some(id) = id.filter(|_| !timeline_changes) else {
                return resolve_timeline_changes(store, side).await;
            };
            let before = ledger::conflict(&mut conn, id)
                .await?
                .with_context(|| format!("no conflict #{id}"))?;
            if !ledger::request_resolution(&mut conn, id, side).await? {
                anyhow::bail!("no conflict #{id}");
            }
            println!(
                "requested: take {} for conflict #{id}; waiting for the leader…",
                side.as_str()
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let row = ledger::conflict(&mut conn, id)
                    .await?
                    .with_context(|| format!("conflict #{id} vanished"))?;
                if row.requested_take.is_none()
                    && (row.resolved_at != before.resolved_at || row.status != before.status)
                {
                    println!(
                        "conflict #{id} resolved: {} wins",
                        row.winner.map_or("?", Side::as_str)
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "error: the request is recorded but no leader carried it out within 30 s: is a replica running?"
                    );
                    return Ok(ExitCode::FAILURE);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn dead_letters(store: &Store, command: DeadLettersCommand) -> anyhow::Result<ExitCode> {
    let mut conn = store
        .connection()
        .await
        .context("connecting to PostgreSQL")?;
    match command {
        DeadLettersCommand::List { all, limit, json } => {
            let rows = ledger::list_dead_letters(&mut conn, all, limit).await?;
            if json {
                let list: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "id": d.id,
                            "direction": d.direction,
                            "kind": d.kind.as_str(),
                            "table": d.mirror_table,
                            "key": display_key(&d.key),
                            "op": d.op.as_str(),
                            "value": d.value.as_deref().map(display_key),
                            "attempts": d.attempts,
                            "reason": d.reason,
                            "created_at": d.created_at.to_rfc3339(),
                            "retried_at": d.retried_at.map(|t| t.to_rfc3339()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
                return Ok(ExitCode::SUCCESS);
            }
            if rows.is_empty() {
                println!("no dead letters");
            }
            for d in rows {
                println!(
                    "#{id} {direction} {kind} table={table} key={key} op={op} value={value} attempts={attempts} at {at}{retried}\n    reason: {reason}",
                    id = d.id,
                    direction = d.direction,
                    kind = d.kind,
                    table = d.mirror_table.as_deref().unwrap_or("-"),
                    key = display_key(&d.key),
                    op = d.op,
                    value = show_value(d.value.as_deref()),
                    attempts = d.attempts,
                    at = d.created_at.to_rfc3339(),
                    retried = d
                        .retried_at
                        .map(|t| format!(" (retried {})", t.to_rfc3339()))
                        .unwrap_or_default(),
                    reason = d.reason,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLettersCommand::Retry { ids, all } => {
            if ids.is_empty() && !all {
                eprintln!("error: name dead-letter ids or pass --all");
                return Ok(ExitCode::from(crate::EXIT_CONFIG));
            }
            let selection = if all { None } else { Some(ids.as_slice()) };
            let count = ledger::retry_dead_letters(&mut conn, store.schema(), selection).await?;
            println!("{count} dead letter(s) put back into the outbox");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `timeline resume --take SIDE`: answers a paused timeline; the leader
/// carries it out. Waits until it has (the hold is gone and the decision
/// carried out).
async fn resume_timeline(store: &Store, side: Side) -> anyhow::Result<ExitCode> {
    let Some((held, recorded)) = store.decide_timeline(side).await? else {
        eprintln!("nothing to resume: sync is not paused on a new etcd timeline");
        return Ok(ExitCode::FAILURE);
    };
    if recorded != side {
        eprintln!(
            "error: another answer was recorded first: take {}; it stands",
            recorded.as_str()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "etcd was restored or replaced ({held}); the leader resumes with take {}…",
        side.as_str()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = store.state().await?;
        if state.timeline_hold.is_none() {
            println!(
                "resumed: following etcd timeline {}; the resync runs now{}",
                state.timeline,
                match side {
                    Side::Etcd =>
                        "; what it rolls back: `conflicts list --all` (reason timeline-change)",
                    Side::Pg => "; every value it rolls back is then put back into etcd",
                }
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: recorded, but no leader resumed within 120 s: is a replica running? (the answer stays recorded)"
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `conflicts resolve --timeline-changes --take SIDE`: every value a new
/// etcd timeline rolled back (and nobody resolved since), carried out by
/// the leader.
async fn resolve_timeline_changes(store: &Store, side: Side) -> anyhow::Result<ExitCode> {
    let ids = store.request_timeline_resolutions(side).await?;
    let requested = ids.len();
    println!(
        "requested: take {} for {requested} value(s) a new etcd timeline rolled back; waiting for the leader…",
        side.as_str()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = store.requested_resolutions().await?.len();
        if waiting == 0 {
            let carried = store.resolved_by_operator(&ids).await?;
            println!("{carried} resolved: {} wins", side.as_str());
            if carried < requested {
                println!(
                    "{} skipped: the key changed since the rollback (audit events `resolution` with `skipped`)",
                    requested - carried
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            eprintln!(
                "error: {waiting} request(s) recorded but not carried out within 60 s: is a replica running?"
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
