//! `verify` and `restore-etcd`: long operations over the whole keyspace,
//! with a progress bar on a terminal (periodic lines otherwise).

use eps_core::audit::AuditKind;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use eps_actors::verify::{Outcome, VerifyOptions, verify};
use eps_core::Config;
use eps_core::keys::display_key;
use eps_etcd::txn::compare_and_swap;
use eps_etcd::{CasOutcome, CasWrite, EtcdClient};
use eps_store::{Fence, Store};

/// Progress for humans: a bar on a terminal, a line every 5 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: &'static str,
    last_line: Instant,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(total) => indicatif::ProgressBar::new(total),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = match total {
                Some(_) => "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta})",
                None => "{spinner} {msg}: {pos} ({per_sec})",
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what);
            bar
        });
        Progress {
            bar,
            what,
            last_line: Instant::now(),
        }
    }

    fn set(&mut self, position: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(position),
            None if self.last_line.elapsed() > Duration::from_secs(5) => {
                eprintln!("{}: {position} keys so far", self.what);
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    /// Prints a line on stdout now (above the bar on a terminal).
    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What a repair did, in words.
fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Found => "found",
        Outcome::RepairedFromEtcd => "repaired: PostgreSQL takes etcd's value",
        Outcome::RepairedFromPg => "repaired: etcd takes PostgreSQL's value",
        Outcome::MetadataFromEtcd => "repaired: same value, PostgreSQL takes etcd's metadata",
        Outcome::NeedsOperator => "not repaired: manual policy",
        Outcome::ChangedMeanwhile => {
            "not repaired: changed while verify ran (the newer change stands)"
        }
    }
}

fn difference_line(
    mapping: &eps_core::Mapping,
    difference: &eps_actors::diff::Difference,
    outcome: Outcome,
) -> String {
    let etcd_side = difference
        .etcd
        .as_ref()
        .map(|kv| format!("{} @{}", show(Some(&kv.value)), kv.meta.mod_revision))
        .unwrap_or_else(|| show(None));
    let pg_side = difference
        .pg
        .as_ref()
        .map(|row| format!("{} @{}", show(Some(&row.value)), row.mod_revision))
        .unwrap_or_else(|| show(None));
    let outcome = match outcome {
        Outcome::Found => String::new(),
        other => format!(" → {}", outcome_text(other)),
    };
    format!(
        "{kind:<16} table={table} key={key}  etcd: {etcd_side}  pg: {pg_side}{outcome}",
        kind = difference.kind(),
        table = mapping.table,
        key = display_key(&difference.key),
    )
}

/// One difference as a JSON object (keys and values escaped as in every
/// command's JSON: printable ASCII as is, other bytes as `\xNN`).
fn difference_json(
    mapping: &eps_core::Mapping,
    difference: &eps_actors::diff::Difference,
    outcome: Outcome,
) -> serde_json::Value {
    let side = |value: Option<(&[u8], i64)>| {
        value.map(|(value, revision)| {
            serde_json::json!({ "value": display_key(value), "mod_revision": revision })
        })
    };
    serde_json::json!({
        "kind": difference.kind().to_string(),
        "table": mapping.table.as_str(),
        "key": display_key(&difference.key),
        "etcd": side(difference.etcd.as_ref().map(|kv| (kv.value.as_slice(), kv.meta.mod_revision))),
        "pg": side(difference.pg.as_ref().map(|row| (row.value.as_slice(), row.mod_revision))),
        "outcome": outcome_text(outcome),
    })
}

/// The fence for a command: the current term (commands do not lead; their
/// writes are serialized with a term change like the leader's).
async fn command_fence(store: &Store, config: &Config, what: &str) -> anyhow::Result<Fence> {
    let state = store.state().await.context("reading sync_state")?;
    Ok(Fence {
        term: state.term,
        node: format!("{what}@{}", config.cluster.node_id),
    })
}

fn show(value: Option<&[u8]>) -> String {
    match value {
        None => "(absent)".into(),
        Some(v) if v.len() > 40 => format!("{}… ({} bytes)", display_key(&v[..40]), v.len()),
        Some(v) => display_key(v),
    }
}

pub async fn run_verify(
    config: &Config,
    store: &Store,
    prefix: Option<String>,
    repair: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let etcd = EtcdClient::connect(&config.etcd)
        .await
        .context("connecting to etcd")?;
    let mappings = config.validated_mappings()?;
    let fence = command_fence(store, config, "verify").await?;
    let options = VerifyOptions {
        prefix: prefix.map(String::into_bytes),
        repair,
        page_size: config.sync.snapshot_page_size,
        settle: Duration::from_secs(5),
        progress: None,
    };
    let progress = std::cell::RefCell::new(Progress::new("verifying", None));
    // Each difference is printed as it is found: memory stays bounded by
    // the diff's pages, whatever the drift.
    let report = verify(
        &etcd,
        store,
        &mappings,
        Some(&fence),
        &options,
        |mapping, difference, outcome| {
            let line = if json {
                difference_json(mapping, difference, outcome).to_string()
            } else {
                difference_line(mapping, difference, outcome)
            };
            progress.borrow().println(&line);
        },
        |keys| progress.borrow_mut().set(keys),
    )
    .await?;
    progress.into_inner().finish();
    if json {
        println!("{}", serde_json::json!({ "summary": report }));
    } else {
        println!(
            "compared {} etcd keys and {} PostgreSQL rows at etcd revision {}: {} difference(s) ({} missing in PostgreSQL, {} missing in etcd, {} different values), {} in flight{}",
            report.etcd_keys,
            report.pg_rows,
            report.revision,
            report.differences(),
            report.missing_in_pg,
            report.missing_in_etcd,
            report.different_values,
            report.in_flight,
            if repair {
                format!(", {} repaired", report.repaired)
            } else {
                String::new()
            }
        );
    }
    let detail = serde_json::json!({"source": "command", "repair": repair, "report": report});
    if let Err(error) = store
        .record_event(&fence, AuditKind::Verify, None, &detail)
        .await
    {
        eprintln!("warning: cannot record the verify run: {error}");
    }
    let clean = report.differences() == 0 || (repair && report.repaired == report.differences());
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run_restore(
    config: &Config,
    store: &Store,
    prefix: Option<String>,
    leased_keys_ttl: i64,
    at: Option<Target>,
    set_aside_queued: bool,
) -> anyhow::Result<ExitCode> {
    let etcd = EtcdClient::connect(&config.etcd)
        .await
        .context("connecting to etcd")?;
    let prefix = prefix.map(String::into_bytes);
    let mappings = config.validated_mappings()?;
    let selected = restorable(config, &etcd, &mappings, prefix.as_deref()).await?;
    let at_revision = match at {
        None => None,
        Some(at) => match restore_point(store, &etcd, &selected, at).await? {
            Ok(revision) => Some(revision),
            Err(refusal) => {
                eprintln!("error: {refusal}");
                return Ok(ExitCode::from(crate::EXIT_CONFIG));
            }
        },
    };
    let fence = command_fence(store, config, "restore-etcd").await?;
    let deferred = apply_deferred(store, &fence, &selected, prefix.as_deref()).await?;
    if deferred.held > 0 {
        eprintln!(
            "error: {} etcd change(s) of the lost etcd wait behind users' open transactions on their \
             rows ({}): end those transactions and run restore-etcd again (restoring now would lose \
             them)",
            deferred.held,
            deferred.first_held.as_deref().unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut rewound = (0i64, 0i64, 0i64);
    if let Some(revision) = at_revision {
        let bounds: Vec<(Vec<u8>, Option<Vec<u8>>)> = selected
            .iter()
            .map(|m| m.range_within(prefix.as_deref()))
            .collect();
        let ranges: Vec<eps_store::rollback::RewindRange> = selected
            .iter()
            .zip(&bounds)
            .map(|(m, (start, end))| eps_store::rollback::RewindRange {
                table: &m.table,
                start,
                end: end.as_deref(),
            })
            .collect();
        match store
            .rewind(&fence, &ranges, revision, set_aside_queued)
            .await?
        {
            eps_store::rollback::Rewound::Done {
                changed,
                deleted,
                set_aside,
            } => rewound = (changed, deleted, set_aside),
            eps_store::rollback::Rewound::Queued(queued) => {
                eprintln!("error: {}", queued_refusal(queued, revision));
                return Ok(ExitCode::from(crate::EXIT_CONFIG));
            }
        }
    }
    let start = adopt_restored_etcd(store, &fence, &etcd, &selected, prefix.as_deref()).await?;
    let started = Instant::now();
    let mut leases = RestoredLease {
        ttl: leased_keys_ttl,
        id: None,
        keys: 0,
        keeper: None,
    };
    let copied = copy_mirror(
        config,
        store,
        &fence,
        &etcd,
        &selected,
        prefix.as_deref(),
        &mut leases,
    )
    .await?;
    // etcd held none of a wholly restored mapping's keys at `start`, and
    // the watch replays everything since into the history.
    let whole: Vec<&str> = selected
        .iter()
        .filter(|m| prefix.as_deref().is_none_or(|p| m.prefix.starts_with(p)))
        .map(|m| m.table.as_str())
        .collect();
    store.history_whole_from(&fence, &whole, start).await?;
    let head = etcd.current_revision().await?;
    let detail = serde_json::json!({
        "keys": copied.keys, "txns": copied.txns, "queued_changes_consumed": copied.consumed,
        "checkpoint": start, "head": head, "duration_ms": started.elapsed().as_millis() as u64,
        "leased_keys": leases.keys, "lease": leases.id, "lease_ttl_secs": leases.ttl,
        "at_revision": at_revision, "mirror_rows_set_back": rewound.0, "mirror_rows_removed": rewound.1,
        "queued_changes_set_aside": rewound.2, "deferred_etcd_changes_applied": deferred.applied,
    });
    store
        .record_event(&fence, AuditKind::RestoreEtcd, None, &detail)
        .await?;
    if let Some(revision) = at_revision {
        println!(
            "the mirror was set back to the state of revision {revision}: {} row(s) written, {} removed",
            rewound.0, rewound.1
        );
        if rewound.2 > 0 {
            println!(
                "{} queued PostgreSQL change(s) were set aside as dead letters (kind set-aside-by-restore); \
                 `dead-letters retry` sends them to etcd on top of the restored state",
                rewound.2
            );
        }
    }
    println!(
        "restored {} keys into etcd in {} txns ({:.1} s); sync resumes from etcd revision {start} at the latest",
        copied.keys,
        copied.txns,
        started.elapsed().as_secs_f64()
    );
    if copied.consumed > 0 {
        println!(
            "{} queued PostgreSQL change(s) were already part of the restored values",
            copied.consumed
        );
    }
    if let Some(id) = leases.id {
        println!(
            "{} key(s) that had a lease were restored under the new lease {id:x}, which expires in {} s \
             unless their owners write them again",
            leases.keys, leases.ttl
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The mappings `prefix` restores, once it is safe: no replica runs
/// against this etcd, and etcd is empty under each of them (nothing there
/// may be overwritten).
async fn restorable<'m>(
    config: &Config,
    etcd: &EtcdClient,
    mappings: &'m eps_core::mapping::MappingSet,
    prefix: Option<&[u8]>,
) -> anyhow::Result<Vec<&'m eps_core::Mapping>> {
    let election = eps_cluster::election_prefix(&config.cluster.name);
    if let Some(leader) = etcd.oldest_under(&election).await? {
        anyhow::bail!(
            "replica {} is running against this etcd: stop every replica before restore-etcd",
            String::from_utf8_lossy(&leader.value)
        );
    }
    let selected: Vec<_> = mappings
        .iter()
        .filter(|m| prefix.is_none_or(|p| eps_core::mapping::prefixes_overlap(p, &m.prefix)))
        .collect();
    anyhow::ensure!(!selected.is_empty(), "no mapping covers the prefix");
    for mapping in &selected {
        let (start, end) = mapping.range_within(prefix);
        let page = etcd.range_page(&start, end.as_deref(), 0, 1).await?;
        anyhow::ensure!(
            page.kvs.is_empty(),
            "etcd is not empty under {:?}: restore-etcd only rebuilds an empty etcd (or prefix)",
            String::from_utf8_lossy(&start)
        );
    }
    Ok(selected)
}

/// What [`apply_deferred`] did.
struct Deferred {
    /// Keys whose deferred changes went into the mirror.
    applied: usize,
    /// Keys whose rows users still hold.
    held: usize,
    first_held: Option<String>,
}

/// etcd changes deferred behind a user's open transaction on their rows
/// are writes the lost etcd committed, newer than the mirror's values:
/// they go into the mirror (and the history) before it is copied, waiting
/// up to 30 s for the rows; discarding them would lose them.
async fn apply_deferred(
    store: &Store,
    fence: &Fence,
    selected: &[&eps_core::Mapping],
    prefix: Option<&[u8]>,
) -> anyhow::Result<Deferred> {
    let tables: Vec<&str> = selected.iter().map(|m| m.table.as_str()).collect();
    let ours = |key: &eps_store::deferred::DeferredKey| {
        tables.contains(&key.mirror_table.as_str()) && prefix.is_none_or(|p| key.key.starts_with(p))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut applied = 0;
    loop {
        let mut keys = Vec::new();
        let mut after = None;
        loop {
            let page = store.deferred_keys(after.as_ref(), 1000).await?;
            let done = page.len() < 1000;
            after = page.last().cloned();
            keys.extend(page.into_iter().filter(|k| ours(k)));
            if done {
                break;
            }
        }
        if keys.is_empty() || Instant::now() > deadline {
            return Ok(Deferred {
                applied,
                held: keys.len(),
                first_held: keys.first().map(|k| display_key(&k.key)),
            });
        }
        for chunk in keys.chunks(500) {
            let inputs: Vec<eps_store::KeyInputs> = chunk
                .iter()
                .map(|k| eps_store::KeyInputs {
                    key: k.key.clone(),
                    inputs: Vec::new(),
                })
                .collect();
            let report = store
                .apply(&eps_store::ApplyRequest::new(
                    fence,
                    &inputs,
                    Instant::now(),
                ))
                .await?;
            applied += report.drained_keys;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The revision `restore-etcd --at-revision/--at-time` restores, or why it
/// cannot: the history must know every selected mapping whole at it, on the
/// timeline of the lost etcd.
async fn restore_point(
    store: &Store,
    etcd: &EtcdClient,
    selected: &[&eps_core::Mapping],
    at: Target,
) -> anyhow::Result<Result<i64, String>> {
    let revision = match at {
        Target::Revision(revision) => revision,
        Target::Time(at) => store
            .revision_at(at)
            .await
            .context("reading the revision clock")?,
    };
    let state = store.state().await.context("reading sync_state")?;
    let (cluster_id, _) = etcd.identity(&selected[0].prefix).await?;
    if state.timeline_resync || state.etcd_cluster_id == Some(cluster_id as i64) {
        // Either this very etcd is the mirror's (not lost: its revisions are
        // the history's), or an earlier restore or resync adopted it.
        for mapping in selected {
            let adopted = store
                .table_record(&mapping.table)
                .await?
                .is_some_and(|r| r.history_floor.is_none());
            if adopted || state.timeline_resync {
                return Ok(Err(format!(
                    "the mirror already follows this etcd (an earlier restore-etcd or resync adopted \
                     it), so the history of {} before it is another timeline's: restore every prefix at \
                     a revision in the run that adopts the new etcd. (If an earlier restore-etcd \
                     --at-revision stopped after setting the mirror back, empty the prefix in etcd and \
                     run restore-etcd without --at-revision: the mirror holds that state.)",
                    mapping.table
                )));
            }
        }
    }
    // (Changes queued for etcd are checked by the rewind, under its locks.)
    Ok(history_refusal(store, &state, selected, revision)
        .await?
        .map_or(Ok(revision), Err))
}

fn queued_refusal(queued: i64, revision: i64) -> String {
    format!(
        "{queued} change(s) written in PostgreSQL under the prefix are queued for etcd; they are \
         newer than revision {revision}, and restoring it would drop them. Run again with \
         --set-aside-queued to move them to the dead-letter list (`dead-letters retry` then sends \
         them on top of the restored state), or without --at-revision to restore them with the \
         newest state"
    )
}

/// Makes the rebuilt etcd the mirror's timeline: sync continues from its
/// revision (returned), or an earlier point of it after an earlier restore
/// of another prefix. Whatever happens in etcd while the restore runs (a
/// client's write, a restored lease ending) is replayed by the watch, and
/// the restored puts themselves come back as no-ops. A checkpoint past it
/// is the lost etcd's.
async fn adopt_restored_etcd(
    store: &Store,
    fence: &Fence,
    etcd: &EtcdClient,
    selected: &[&eps_core::Mapping],
    prefix: Option<&[u8]>,
) -> anyhow::Result<i64> {
    let (cluster_id, start) = etcd.identity(&selected[0].prefix).await?;
    // The watch resumes after `start`: a key a client wrote since the
    // emptiness check, before it, would reach neither the mirror nor the
    // history.
    for mapping in selected {
        let (first, end) = mapping.range_within(prefix);
        let page = etcd.range_page(&first, end.as_deref(), start, 1).await?;
        if let Some(kv) = page.kvs.first() {
            anyhow::bail!(
                "a client wrote {} into etcd before the restore began: stop the clients writing under \
                 the prefix, empty it, and run restore-etcd again",
                display_key(&kv.key)
            );
        }
    }
    let state = store.state().await.context("reading sync_state")?;
    let detail = serde_json::json!({
        "reason": "restore-etcd",
        "old_cluster_id": state.etcd_cluster_id.map(|id| format!("{:x}", id as u64)),
        "new_cluster_id": format!("{cluster_id:x}"),
        "checkpoint": state.applied_revision,
        "etcd_revision": start,
        "old_timeline": state.timeline,
    });
    // (A second prefix restored into the same new etcd is the same one.)
    if state.etcd_cluster_id != Some(cluster_id as i64) || state.applied_revision > start {
        store
            .adopt_timeline(fence, cluster_id as i64, &detail)
            .await?;
    }
    store.lower_checkpoint(fence, start).await?;
    // The rebuilt etcd holds no timeline mark (the next leader writes one).
    store.forget_timeline_mark(fence).await?;
    // Changes deferred for held rows came from the lost etcd.
    let tables: Vec<&str> = selected.iter().map(|m| m.table.as_str()).collect();
    store.discard_deferred(fence, &tables).await?;
    Ok(start)
}

/// What [`copy_mirror`] wrote.
struct Copied {
    keys: u64,
    txns: u64,
    /// Queued PostgreSQL changes the restored values already held.
    consumed: usize,
}

/// Writes the mirror rows of `selected` under `prefix` into etcd, page by
/// page at one snapshot, in txns etcd takes.
async fn copy_mirror(
    config: &Config,
    store: &Store,
    fence: &Fence,
    etcd: &EtcdClient,
    selected: &[&eps_core::Mapping],
    prefix: Option<&[u8]>,
    leases: &mut RestoredLease,
) -> anyhow::Result<Copied> {
    let mut total = 0u64;
    for mapping in selected {
        total += store.mirror_rows(&mapping.table).await? as u64;
    }
    let mut progress = Progress::new("restoring", Some(total));
    let mut copied = Copied {
        keys: 0,
        txns: 0,
        consumed: 0,
    };
    // No fence compare: the restore writes an empty etcd, no leader runs.
    let (max_ops, max_bytes) = config.etcd.txn_limits(0);
    for mapping in selected {
        let (start, end) = mapping.range_within(prefix);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store
                .mirror_page_at_snapshot(
                    &mapping.table,
                    eps_store::mirror::PageRequest {
                        start: &start,
                        end: end.as_deref(),
                        after: after.as_deref(),
                        rows: config.sync.snapshot_page_size,
                        bytes: eps_actors::diff::PAGE_BYTES,
                    },
                )
                .await?;
            let rows = &page.rows;
            let Some(last) = rows.last() else { break };
            after = Some(last.key.clone());
            let rows: Vec<&eps_store::mirror::MirrorRow> =
                rows.iter().filter(|r| mapping.contains(&r.key)).collect();
            for batch in txn_batches(&rows, max_ops, max_bytes) {
                copied.consumed +=
                    write_batch(etcd, store, fence, mapping, batch, &page.snapshot, leases).await?;
                copied.keys += batch.len() as u64;
                copied.txns += 1;
                progress.set(copied.keys);
            }
            if !page.more {
                break;
            }
        }
    }
    progress.finish();
    Ok(copied)
}

/// Consecutive runs of `rows` that fit one etcd txn (`max_ops` puts, about
/// `max_bytes` of request).
fn txn_batches<'a, 'r>(
    rows: &'a [&'r eps_store::mirror::MirrorRow],
    max_ops: usize,
    max_bytes: usize,
) -> Vec<&'a [&'r eps_store::mirror::MirrorRow]> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, row) in rows.iter().enumerate() {
        let size = eps_core::keys::put_request_bytes(row.key.len(), row.value.len());
        if i > start && (i - start >= max_ops || bytes + size > max_bytes) {
            batches.push(&rows[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < rows.len() {
        batches.push(&rows[start..]);
    }
    batches
}

/// The lease that keys restored from a leased row get: the old lease ids
/// died with the old etcd, and a key restored without a lease would never
/// expire (a stale lock or registration held forever). Granted when the
/// first such key is restored and kept alive while the restore runs (a
/// lease that ended mid-way would fail the next txn); from then on its TTL
/// runs out.
struct RestoredLease {
    ttl: i64,
    id: Option<i64>,
    keys: u64,
    /// Keeps the lease alive while the restore runs.
    keeper: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

/// Renews `lease` every third of its TTL until aborted.
async fn keep_lease_alive(etcd: EtcdClient, lease: i64, ttl: i64) {
    let interval = Duration::from_secs_f64((ttl as f64 / 3.0).max(0.5));
    let mut keeper = None;
    loop {
        tokio::time::sleep(interval).await;
        if keeper.is_none() {
            keeper = etcd.keep_alive(lease).await.ok();
        }
        if let Some(k) = keeper.as_mut()
            && k.renew().await.is_err()
        {
            keeper = None;
        }
    }
}

impl RestoredLease {
    async fn for_row(
        &mut self,
        etcd: &EtcdClient,
        row: &eps_store::mirror::MirrorRow,
    ) -> anyhow::Result<i64> {
        if row.lease == 0 {
            return Ok(0);
        }
        let id = match self.id {
            Some(id) => id,
            None => {
                let id = etcd.grant_lease(self.ttl).await?;
                self.id = Some(id);
                self.keeper = Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                    keep_lease_alive(etcd.clone(), id, self.ttl),
                )));
                id
            }
        };
        self.keys += 1;
        Ok(id)
    }
}

/// One txn of puts that each require the key to be absent, then the
/// mirror rows take the new revision (rows read at `snapshot`).
async fn write_batch(
    etcd: &EtcdClient,
    store: &Store,
    fence: &Fence,
    mapping: &eps_core::Mapping,
    rows: &[&eps_store::mirror::MirrorRow],
    snapshot: &str,
    leases: &mut RestoredLease,
) -> anyhow::Result<usize> {
    let mut writes: Vec<CasWrite> = Vec::with_capacity(rows.len());
    for row in rows {
        writes.push(CasWrite {
            key: row.key.clone(),
            value: Some(row.value.clone()),
            expect_mod_revision: 0,
            lease: leases.for_row(etcd, row).await?,
        });
    }
    let revision = match compare_and_swap(etcd, None, &writes).await? {
        CasOutcome::Applied { revision, .. } => revision,
        CasOutcome::Conflicts { conflicts, .. } => anyhow::bail!(
            "{} key(s) appeared in etcd during the restore (first: {}): stopping",
            conflicts.len(),
            display_key(&writes[conflicts[0].0].key)
        ),
        CasOutcome::Fenced => unreachable!("no leader fence used"),
    };
    let restored: Vec<(&[u8], i64, i64)> = rows
        .iter()
        .zip(&writes)
        .map(|(r, w)| (r.key.as_slice(), r.mod_revision, w.lease))
        .collect();
    Ok(store
        .mark_restored(fence, &mapping.table, &restored, revision, snapshot)
        .await?)
}

/// What `rollback` puts back: the state at a revision, or at a time.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Revision(i64),
    Time(chrono::DateTime<chrono::Utc>),
}

/// Prints (and with `apply` writes) the changes that bring every key under
/// `prefix` back to its state at the target revision. The writes are SQL
/// writes of the mirror tables, in transactions of at most one etcd txn's
/// keys: the leader sends each as one txn, compared like any user's change.
pub async fn run_rollback(
    config: &Config,
    store: &Store,
    prefix: &str,
    target: Target,
    apply: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let prefix_bytes = prefix.as_bytes();
    let mappings = config.validated_mappings()?;
    let selected: Vec<_> = mappings
        .iter()
        .filter(|m| eps_core::mapping::prefixes_overlap(prefix_bytes, &m.prefix))
        .collect();
    let revision = match target {
        Target::Revision(revision) => revision,
        Target::Time(at) => store
            .revision_at(at)
            .await
            .context("reading the revision clock")?,
    };
    if let Some(refusal) = rollback_refusal(store, &selected, prefix, revision, apply).await? {
        eprintln!("error: {refusal}");
        return Ok(ExitCode::from(crate::EXIT_CONFIG));
    }
    // The changes are planned against the mirror: it must hold what etcd
    // holds now, or they would be based on older values.
    if let Some(behind) = mirror_lag(config, store).await? {
        eprintln!(
            "error: the mirror is {behind} revision(s) behind etcd (is a leader running?); rollback plans against the mirror"
        );
        return Ok(ExitCode::FAILURE);
    }
    let fence = command_fence(store, config, "rollback").await?;
    let mut tally = RollbackTally::default();
    let outcome = plan_and_write(
        config,
        store,
        &selected,
        prefix_bytes,
        revision,
        apply,
        json,
        &mut tally,
    )
    .await;
    let summary = serde_json::json!({
        "prefix": prefix,
        "to_revision": revision,
        "puts": tally.puts,
        "deletes": tally.deletes,
        "leased_skipped": tally.leased,
        "applied": apply,
        "written": tally.written,
        "changed_meanwhile": tally.changed_meanwhile,
        "error": outcome.as_ref().err().map(|e| format!("{e:#}")),
        "node": config.cluster.node_id,
    });
    if apply {
        // Also after a failed batch: what was written is on record.
        store
            .record_event(&fence, AuditKind::Rollback, None, &summary)
            .await?;
    }
    outcome?;
    // The writes went the way of any SQL change: see where they ended.
    let left = if apply && tally.written > 0 {
        Some(rollback_result(store, &selected, prefix_bytes, revision).await?)
    } else {
        None
    };
    let mut summary = summary;
    if let Some(left) = &left {
        summary["queued"] = left.queued.into();
        summary["differing_after"] = left.differing.into();
    }
    let unfinished = left
        .as_ref()
        .is_some_and(|l| l.queued > 0 || l.differing > 0);
    if json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else if apply {
        println!(
            "{} change(s) written under {prefix:?} to go back to revision {revision} ({} put(s), {} delete(s){}{}); the leader sends them to etcd, compared and settled like any other write",
            tally.written,
            tally.puts,
            tally.deletes,
            if tally.changed_meanwhile > 0 {
                format!(
                    ", {} skipped: changed since they were read",
                    tally.changed_meanwhile
                )
            } else {
                String::new()
            },
            leased_note(tally.leased),
        );
    } else {
        println!(
            "{} change(s) would bring {prefix:?} back to revision {revision} ({} put(s), {} delete(s){}); --apply writes them",
            tally.puts + tally.deletes,
            tally.puts,
            tally.deletes,
            leased_note(tally.leased),
        );
    }
    if let Some(left) = &left
        && !json
    {
        if left.queued > 0 {
            println!(
                "{} change(s) still queued for etcd after {} s: is a leader running? (`status`)",
                left.queued,
                ROLLBACK_WAIT.as_secs()
            );
        } else if left.differing > 0 {
            println!(
                "{} key(s) under {prefix:?} differ from revision {revision} now: changed meanwhile, or \
                 settled against the rollback by their policy (`conflicts list`)",
                left.differing
            );
        } else {
            println!("etcd and PostgreSQL hold the state of revision {revision} under {prefix:?}");
        }
    }
    Ok(if unfinished {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How long `rollback --apply` waits for its changes to reach etcd.
const ROLLBACK_WAIT: Duration = Duration::from_secs(60);

/// Where a rollback's writes ended.
struct RollbackResult {
    /// Changes still queued for etcd after the wait.
    queued: i64,
    /// Keys that differ from the target state once nothing is queued.
    differing: usize,
}

/// Waits (up to [`ROLLBACK_WAIT`]) for the changes under `prefix` to leave
/// the outbox, then plans again: what is left differs from the target.
async fn rollback_result(
    store: &Store,
    selected: &[&eps_core::Mapping],
    prefix: &[u8],
    revision: i64,
) -> anyhow::Result<RollbackResult> {
    let deadline = Instant::now() + ROLLBACK_WAIT;
    loop {
        let mut queued = 0;
        for mapping in selected {
            let (start, end) = mapping.range_within(Some(prefix));
            queued += store
                .queued_in_range(&mapping.table, (&start, end.as_deref()))
                .await?;
        }
        if queued == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Ok(RollbackResult {
                queued,
                differing: 0,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut differing = 0;
    for mapping in selected {
        let (start, end) = mapping.range_within(Some(prefix));
        differing += store
            .rollback_plan(&mapping.table, (&start, end.as_deref()), revision)
            .await?
            .iter()
            .filter(|c| !c.target_leased)
            .count();
    }
    Ok(RollbackResult {
        queued: 0,
        differing,
    })
}

fn leased_note(leased: u64) -> String {
    if leased == 0 {
        String::new()
    } else {
        format!(
            "; {leased} key(s) that had a lease at that revision left out: they would come back without one"
        )
    }
}

#[derive(Debug, Default)]
struct RollbackTally {
    puts: u64,
    deletes: u64,
    leased: u64,
    written: usize,
    changed_meanwhile: usize,
}

/// Why a rollback to `revision` cannot be planned exactly, if it cannot:
/// no mapping covers the prefix; a table whose recorded range is not the
/// configured one, that is not synced, or whose history does not reach
/// back to `revision`; a revision the mirror has not applied, or sync
/// paused on a restored etcd. With `apply`, also a mapping that cannot
/// write etcd.
async fn rollback_refusal(
    store: &Store,
    selected: &[&eps_core::Mapping],
    prefix: &str,
    revision: i64,
    apply: bool,
) -> anyhow::Result<Option<String>> {
    if selected.is_empty() {
        return Ok(Some(format!("no mapping covers the prefix {prefix:?}")));
    }
    let state = store.state().await.context("reading sync_state")?;
    if state.timeline_hold.is_some() || state.timeline_resync {
        return Ok(Some(
            "sync is paused on, or resyncing onto, a restored or replaced etcd: settle that first"
                .into(),
        ));
    }
    if apply && let Some(mapping) = selected.iter().find(|m| !m.direction.pg_to_etcd()) {
        return Ok(Some(format!(
            "mapping {} is {}: its changes cannot go to etcd",
            mapping.table,
            mapping.direction.as_str()
        )));
    }
    history_refusal(store, &state, selected, revision).await
}

/// Why the history cannot give the state of every selected mapping at
/// `revision` on the current timeline (`None`: it can).
async fn history_refusal(
    store: &Store,
    state: &eps_store::SyncState,
    selected: &[&eps_core::Mapping],
    revision: i64,
) -> anyhow::Result<Option<String>> {
    if revision <= 0 || revision > state.applied_revision {
        return Ok(Some(format!(
            "revision {revision} is not one the mirror has applied (checkpoint {})",
            state.applied_revision
        )));
    }
    for mapping in selected {
        let Some(record) = store.table_record(&mapping.table).await? else {
            return Ok(Some(format!(
                "mirror table {} does not exist (run migrate)",
                mapping.table
            )));
        };
        if record.prefix.as_deref() != Some(mapping.prefix.as_slice()) {
            return Ok(Some(format!(
                "mirror table {} was migrated for another prefix than this configuration's: run migrate with it",
                mapping.table
            )));
        }
        match record.history_floor {
            None => {
                return Ok(Some(format!(
                    "mirror table {} is not synced yet: its history starts with its first sync",
                    mapping.table
                )));
            }
            Some(floor) if revision < floor => {
                return Ok(Some(format!(
                    "revision {revision} is before what the history of {} knows whole (from revision {floor}: its first sync, or history retention)",
                    mapping.table
                )));
            }
            Some(_) if !record.synced => {
                return Ok(Some(format!(
                    "mirror table {} is being filled again",
                    mapping.table
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

/// How far the mirror's checkpoint stays behind etcd's revision of now,
/// after waiting up to 10 s for the leader to catch up (`None`: caught up).
async fn mirror_lag(config: &Config, store: &Store) -> anyhow::Result<Option<i64>> {
    let etcd = EtcdClient::connect(&config.etcd)
        .await
        .context("connecting to etcd")?;
    let head = etcd.current_revision().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let applied = store.state().await?.applied_revision;
        if applied >= head {
            return Ok(None);
        }
        if Instant::now() > deadline {
            return Ok(Some(head - applied));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints the changes of every selected mapping and, with `apply`, writes
/// them in transactions of at most one etcd txn's keys and bytes.
#[allow(clippy::too_many_arguments)]
async fn plan_and_write(
    config: &Config,
    store: &Store,
    selected: &[&eps_core::Mapping],
    prefix: &[u8],
    revision: i64,
    apply: bool,
    json: bool,
    tally: &mut RollbackTally,
) -> anyhow::Result<()> {
    let (max_ops, max_bytes) = config.etcd.txn_limits(1);
    for mapping in selected {
        let (start, end) = mapping.range_within(Some(prefix));
        let changes = store
            .rollback_plan(&mapping.table, (&start, end.as_deref()), revision)
            .await
            .context("reading the history")?;
        let mut batch: Vec<eps_store::rollback::RollbackChange> = Vec::new();
        let mut bytes = 0;
        for change in changes {
            if change.target_leased {
                tally.leased += 1;
                continue;
            }
            match &change.target {
                Some(_) => tally.puts += 1,
                None => tally.deletes += 1,
            }
            println!("{}", rollback_line(mapping, &change, json));
            if !apply {
                continue;
            }
            let size = eps_core::keys::put_request_bytes(
                change.key.len(),
                change.target.as_ref().map_or(0, Vec::len),
            );
            if !batch.is_empty() && (batch.len() >= max_ops || bytes + size > max_bytes) {
                write_rollback_batch(store, mapping, &batch, tally).await?;
                batch.clear();
                bytes = 0;
            }
            bytes += size;
            batch.push(change);
        }
        if !batch.is_empty() {
            write_rollback_batch(store, mapping, &batch, tally).await?;
        }
    }
    Ok(())
}

async fn write_rollback_batch(
    store: &Store,
    mapping: &eps_core::Mapping,
    batch: &[eps_store::rollback::RollbackChange],
    tally: &mut RollbackTally,
) -> anyhow::Result<()> {
    let written = store
        .rollback_apply(&mapping.table, batch)
        .await
        .with_context(|| format!("writing {} change(s) to {}", batch.len(), mapping.table))?;
    tally.written += written;
    tally.changed_meanwhile += batch.len().saturating_sub(written);
    Ok(())
}

fn rollback_line(
    mapping: &eps_core::Mapping,
    change: &eps_store::rollback::RollbackChange,
    json: bool,
) -> String {
    if json {
        return serde_json::json!({
            "op": if change.target.is_some() { "put" } else { "delete" },
            "table": mapping.table.as_str(),
            "key": display_key(&change.key),
            "current": change.current.as_deref().map(display_key),
            "target": change.target.as_deref().map(display_key),
        })
        .to_string();
    }
    match &change.target {
        Some(target) => format!(
            "put    {}  {} → {}",
            display_key(&change.key),
            show(change.current.as_deref()),
            show(Some(target))
        ),
        None => format!(
            "delete {}  {}",
            display_key(&change.key),
            show(change.current.as_deref())
        ),
    }
}
