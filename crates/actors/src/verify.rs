//! Drift verification (`verify [--prefix P] [--repair]`, and anti-entropy
//! inside the leader): compares etcd at one revision with the mirror, key by
//! key, page by page, and optionally repairs each difference by the
//! mapping's policy through the fenced paths.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eps_core::mapping::{Direction, Mapping, MappingSet, Policy};
use eps_core::model::Origin;
use eps_core::policy::{PgWrite, Side, decide};
use eps_core::reconcile::KeyInput;
use eps_etcd::EtcdClient;
use eps_store::{ApplyRequest, Fence, KeyInputs, Repair, Store};
use serde::Serialize;

use crate::diff::{DiffCursor, Difference, DifferenceKind};
use crate::shell::ActorError;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only keys under this prefix.
    pub prefix: Option<Vec<u8>>,
    /// Fix differences (needs a fence).
    pub repair: bool,
    pub page_size: usize,
    /// How long to wait for the leader's checkpoint to reach the verify
    /// revision, so lag is not reported as drift.
    pub settle: Duration,
    /// Ticked at every page read (a walk inside the leader reports that it
    /// moves).
    pub progress: Option<std::sync::Arc<crate::shell::Progress>>,
}

/// What happened to one difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Reported only.
    Found,
    /// The mirror was set to etcd's state.
    RepairedFromEtcd,
    /// PostgreSQL's state was queued for etcd.
    RepairedFromPg,
    /// The values agreed; the row took etcd's metadata (a `pg-to-etcd`
    /// row whose metadata a new etcd timeline made unknown).
    MetadataFromEtcd,
    /// `manual` mapping: an operator decides.
    NeedsOperator,
    /// The key changed while verify ran (a user's write, an etcd change
    /// applied since): not repaired, the newer change stands.
    ChangedMeanwhile,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub revision: i64,
    pub etcd_keys: u64,
    pub pg_rows: u64,
    pub missing_in_pg: u64,
    pub missing_in_etcd: u64,
    pub different_values: u64,
    /// Differences explained by changes in flight (outbox rows, rows
    /// changed after the verify revision): not drift.
    pub in_flight: u64,
    pub repaired: u64,
    pub needs_operator: u64,
    pub duration_ms: u64,
}

impl VerifyReport {
    pub fn differences(&self) -> u64 {
        self.missing_in_pg + self.missing_in_etcd + self.different_values
    }
}

/// Runs a verification; `on_difference` sees each drifted key.
pub async fn verify(
    etcd: &EtcdClient,
    store: &Store,
    mappings: &MappingSet,
    fence: Option<&Fence>,
    options: &VerifyOptions,
    mut on_difference: impl FnMut(&Mapping, &Difference, Outcome),
    mut on_progress: impl FnMut(u64),
) -> Result<VerifyReport, ActorError> {
    let started = Instant::now();
    // Before etcd's revision is read: an etcd change the mirror records
    // after this is newer than what the diff sees.
    let since = store.clock().await?;
    let revision = etcd.current_revision().await?;
    // Give a running leader the chance to apply everything up to `revision`.
    let deadline = Instant::now() + options.settle;
    let mut applied = store.state().await?.applied_revision;
    while applied < revision && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        applied = store.state().await?.applied_revision;
    }
    let mut report = VerifyReport {
        revision,
        ..VerifyReport::default()
    };
    let wanted = |m: &Mapping| {
        options
            .prefix
            .as_deref()
            .is_none_or(|p| eps_core::mapping::prefixes_overlap(p, &m.prefix))
    };
    for mapping in mappings.iter().filter(|m| wanted(m)) {
        let within = options
            .prefix
            .as_deref()
            .filter(|p| p.starts_with(&mapping.prefix));
        let mut cursor = DiffCursor::new(
            etcd,
            store,
            mapping,
            revision,
            options.page_size.max(1),
            within,
        );
        if let Some(progress) = &options.progress {
            cursor = cursor.with_progress(progress.clone());
        }
        // A narrower prefix than the mapping's: keys outside it are not ours.
        let in_scope = |key: &[u8]| options.prefix.as_deref().is_none_or(|p| key.starts_with(p));
        while let Some(difference) = cursor.next().await.map_err(ActorError::from)? {
            on_progress(cursor.etcd_keys);
            if !in_scope(&difference.key) {
                continue;
            }
            // A `pg-to-etcd` mapping never applies etcd's side to the
            // mirror: there is no lag to wait for.
            let lagging =
                mapping.direction.etcd_to_pg() && not_applied_yet(&difference, applied, revision);
            if lagging
                || store
                    .has_pending(mapping.table.as_str(), &difference.key)
                    .await?
                || difference
                    .pg
                    .as_ref()
                    .is_some_and(|row| row.mod_revision > revision)
                // Deleted by a change after the diff's revision (a lease
                // that expired meanwhile): the mirror is ahead, not behind.
                || (difference.pg.is_none()
                    && store.changed_after(&difference.key, revision).await?)
            {
                report.in_flight += 1;
                continue;
            }
            match difference.kind() {
                DifferenceKind::MissingInPg => report.missing_in_pg += 1,
                DifferenceKind::MissingInEtcd => report.missing_in_etcd += 1,
                DifferenceKind::DifferentValue => report.different_values += 1,
            }
            let outcome = match (options.repair, fence) {
                (true, Some(fence)) => {
                    repair(etcd, store, fence, mapping, &difference, (revision, since)).await?
                }
                _ => Outcome::Found,
            };
            match outcome {
                Outcome::RepairedFromEtcd | Outcome::RepairedFromPg | Outcome::MetadataFromEtcd => {
                    report.repaired += 1
                }
                Outcome::NeedsOperator => report.needs_operator += 1,
                Outcome::ChangedMeanwhile => report.in_flight += 1,
                Outcome::Found => {}
            }
            on_difference(mapping, &difference, outcome);
        }
        on_progress(cursor.etcd_keys);
        report.etcd_keys += cursor.etcd_keys;
        report.pg_rows += cursor.pg_rows;
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// True when the difference may be an etcd change the leader has not
/// applied yet (its checkpoint `applied` is behind the verify `revision`):
/// etcd's side changed after the checkpoint, or etcd lacks the key and may
/// have deleted it after the checkpoint. Lag is not drift — "repairing" it
/// would push the mirror's older value over etcd's newer one.
fn not_applied_yet(difference: &Difference, applied: i64, revision: i64) -> bool {
    if applied >= revision {
        return false;
    }
    match &difference.etcd {
        Some(kv) => kv.meta.mod_revision > applied,
        None => true,
    }
}

/// True when etcd's state now is not the one the diff saw.
fn etcd_moved(
    seen: Option<&eps_core::model::KeyValue>,
    now: Option<&eps_core::model::KeyValue>,
) -> bool {
    seen.map(|kv| kv.meta.mod_revision) != now.map(|kv| kv.meta.mod_revision)
}

/// Which side's state a repair keeps, by the mapping's policy. For
/// `newest-wins`, a row written in PostgreSQL is compared with when etcd's
/// value was made (the revision clock), as a conflict would be; a row the
/// mirror wrote from etcd is not a local change, and etcd's state wins.
/// `diff_revision`: the etcd revision the diff read.
async fn repair_side(
    store: &Store,
    mapping: &Mapping,
    difference: &Difference,
    diff_revision: i64,
) -> Result<Option<Side>, ActorError> {
    match mapping.policy {
        Policy::EtcdWins => return Ok(Some(Side::Etcd)),
        Policy::PgWins => return Ok(Some(Side::Pg)),
        Policy::Manual => return Ok(None),
        Policy::NewestWins => {}
    }
    let Some(row) = difference.pg.as_ref().filter(|row| row.origin == Side::Pg) else {
        return Ok(Some(Side::Etcd));
    };
    let now = store.clock().await?;
    // etcd's change: its value's revision, or for a key etcd lacks, a
    // delete after the row's base revision (none: etcd never had it).
    let (span, seen) = match &difference.etcd {
        Some(kv) => {
            let revision = kv.meta.mod_revision;
            // It existed when the mirror recorded it, or at the latest now.
            let recorded = store.recorded_at(&kv.key, revision).await?;
            ((revision, revision), recorded.unwrap_or(now))
        }
        None if row.mod_revision > 0 => ((row.mod_revision + 1, diff_revision), now),
        None => return Ok(Some(Side::Pg)),
    };
    let window = store.change_window(span, seen).await?;
    // The row was committed before the diff read it.
    let pg = PgWrite {
        written_us: row.updated_at.timestamp_micros(),
        committed_by_us: now.timestamp_micros(),
    };
    Ok(decide(mapping.policy, pg, window, mapping.tie).side())
}

/// `at`: the diff's etcd revision and PostgreSQL's clock before it.
async fn repair(
    etcd: &EtcdClient,
    store: &Store,
    fence: &Fence,
    mapping: &Mapping,
    difference: &Difference,
    at: (i64, chrono::DateTime<chrono::Utc>),
) -> Result<Outcome, ActorError> {
    // A one-way mapping repairs towards its target; `both` by policy.
    let side = match mapping.direction {
        Direction::EtcdToPg => Side::Etcd,
        Direction::PgToEtcd => Side::Pg,
        Direction::Both => match repair_side(store, mapping, difference, at.0).await? {
            Some(side) => side,
            None => return Ok(Outcome::NeedsOperator),
        },
    };
    let same_value = match (&difference.etcd, &difference.pg) {
        (Some(kv), Some(row)) => kv.value == row.value,
        _ => false,
    };
    match side {
        Side::Pg if same_value => adopt_etcd_meta(etcd, store, fence, mapping, difference).await,
        Side::Etcd => repair_from_etcd(store, fence, difference, at).await,
        Side::Pg => repair_from_pg(etcd, store, fence, mapping, difference).await,
    }
}

/// etcd holds PostgreSQL's value already, under other metadata: the row
/// takes etcd's (rewriting the value would be a change every etcd client
/// sees, for nothing).
async fn adopt_etcd_meta(
    etcd: &EtcdClient,
    store: &Store,
    fence: &Fence,
    mapping: &Mapping,
    difference: &Difference,
) -> Result<Outcome, ActorError> {
    let Some(etcd_now) = etcd_as_seen(etcd, difference).await? else {
        return Ok(Outcome::ChangedMeanwhile);
    };
    let (Some(kv), Some(seen)) = (etcd_now.as_ref(), difference.pg.as_ref()) else {
        return Ok(Outcome::ChangedMeanwhile);
    };
    let adopted = store.adopt_etcd_meta(fence, &mapping.table, kv, seen).await;
    done_unless_held(adopted, Outcome::MetadataFromEtcd)
}

/// etcd's current state of the difference's key, if it is still the one
/// the diff saw (`None`: it moved, and a write etcd took since is newer
/// than the drift).
async fn etcd_as_seen(
    etcd: &EtcdClient,
    difference: &Difference,
) -> Result<Option<Option<eps_core::model::KeyValue>>, ActorError> {
    let (etcd_now, _) = etcd.get(&difference.key).await?;
    Ok((!etcd_moved(difference.etcd.as_ref(), etcd_now.as_ref())).then_some(etcd_now))
}

/// `outcome` if the repair's store call did it; a row a user's transaction
/// holds is changing, not drifting.
fn done_unless_held(
    done: Result<bool, eps_store::StoreError>,
    outcome: Outcome,
) -> Result<Outcome, ActorError> {
    let done = match done {
        Err(eps_store::StoreError::RowHeld(_)) => false,
        other => other?,
    };
    Ok(if done {
        outcome
    } else {
        Outcome::ChangedMeanwhile
    })
}

async fn repair_from_etcd(
    store: &Store,
    fence: &Fence,
    difference: &Difference,
    (revision, since): (i64, chrono::DateTime<chrono::Utc>),
) -> Result<Outcome, ActorError> {
    let keys = [KeyInputs {
        key: difference.key.clone(),
        inputs: vec![KeyInput::Observed {
            state: difference.etcd.clone(),
            revision,
            origin: Origin::Resync,
        }],
    }];
    let seen = HashMap::from([(difference.key.clone(), difference.pg.clone())]);
    let mut request = ApplyRequest::new(fence, &keys, Instant::now());
    request.repair = Some(Repair {
        revision,
        since,
        seen: &seen,
    });
    let report = store.apply(&request).await?;
    Ok(if report.repair_skipped.is_empty() {
        Outcome::RepairedFromEtcd
    } else {
        Outcome::ChangedMeanwhile
    })
}

async fn repair_from_pg(
    etcd: &EtcdClient,
    store: &Store,
    fence: &Fence,
    mapping: &Mapping,
    difference: &Difference,
) -> Result<Outcome, ActorError> {
    // Based on etcd's current state, which must still be the one the diff
    // saw: queued on top of a newer write, the repair would overwrite it
    // without a trace.
    let Some(etcd_now) = etcd_as_seen(etcd, difference).await? else {
        return Ok(Outcome::ChangedMeanwhile);
    };
    let value = difference.pg.as_ref().map(|row| row.value.as_slice());
    let queued = store
        .enqueue_change(
            fence,
            &mapping.table,
            &difference.key,
            value,
            etcd_now.as_ref(),
            difference.pg.as_ref(),
        )
        .await;
    done_unless_held(queued, Outcome::RepairedFromPg)
}

#[cfg(test)]
mod tests {
    use eps_core::model::{KeyMeta, KeyValue};
    use eps_store::mirror::MirrorRow;

    use super::*;

    fn difference(etcd_mod_revision: Option<i64>) -> Difference {
        Difference {
            key: b"/k".to_vec(),
            etcd: etcd_mod_revision.map(|mod_revision| KeyValue {
                key: b"/k".to_vec(),
                value: b"etcd".to_vec(),
                meta: KeyMeta {
                    create_revision: 1,
                    mod_revision,
                    version: 1,
                    lease: 0,
                },
            }),
            pg: Some(MirrorRow {
                key: b"/k".to_vec(),
                value: b"older".to_vec(),
                mod_revision: 3,
                lease: 0,
                origin: Side::Etcd,
                updated_at: chrono::Utc::now(),
            }),
        }
    }

    #[test]
    fn a_repair_from_postgres_yields_to_an_etcd_write_made_since_the_diff() {
        let seen = difference(Some(15)).etcd;
        let later = difference(Some(105)).etcd;
        assert!(!etcd_moved(seen.as_ref(), seen.as_ref()));
        assert!(etcd_moved(seen.as_ref(), later.as_ref()));
        assert!(etcd_moved(None, later.as_ref()), "created since");
        assert!(etcd_moved(seen.as_ref(), None), "deleted since");
        assert!(!etcd_moved(None, None));
    }

    #[test]
    fn a_lagging_leader_is_not_drift() {
        // Checkpoint 10, verify at 20: etcd's change at 15 may be unapplied.
        assert!(not_applied_yet(&difference(Some(15)), 10, 20));
        // ... and so may a delete after 10.
        assert!(not_applied_yet(&difference(None), 10, 20));
        // A key etcd last changed at 8 should be in the mirror by now.
        assert!(!not_applied_yet(&difference(Some(8)), 10, 20));
        // A leader caught up: every difference is drift.
        assert!(!not_applied_yet(&difference(Some(15)), 20, 20));
        assert!(!not_applied_yet(&difference(None), 25, 20));
    }
}
