use proptest::prelude::*;

use super::*;
use crate::model::PrevKv;

const KEY: &[u8] = b"/app/k";

fn ctx(policy: Policy) -> PlanContext {
    PlanContext {
        policy,
        direction: Direction::Both,
        observed_at_us: 1_000,
        tie: Side::Etcd,
    }
}

fn put(revision: i64, value: &str, prev: Option<(i64, &str)>) -> KeyInput {
    KeyInput::Event(EtcdEvent {
        op: Op::Put,
        key: KEY.to_vec(),
        revision,
        value: value.as_bytes().to_vec(),
        meta: KeyMeta {
            create_revision: prev.map_or(revision, |_| 2),
            mod_revision: revision,
            version: 1,
            lease: 0,
        },
        prev: prev.map(|(rev, v)| PrevKv {
            value: v.as_bytes().to_vec(),
            mod_revision: rev,
        }),
    })
}

fn delete(revision: i64, prev: (i64, &str)) -> KeyInput {
    KeyInput::Event(EtcdEvent {
        op: Op::Delete,
        key: KEY.to_vec(),
        revision,
        value: Vec::new(),
        meta: KeyMeta::default(),
        prev: Some(PrevKv {
            value: prev.1.as_bytes().to_vec(),
            mod_revision: prev.0,
        }),
    })
}

fn pending_put(id: i64, value: &str, base: i64, at: i64) -> PendingChange {
    PendingChange {
        id,
        op: Op::Put,
        value: Some(value.as_bytes().to_vec()),
        base_revision: base,
        changed_at_us: at,
        committed_by_us: at,
        conflict_id: None,
        sent: true,
        xact: None,
        dropped: false,
    }
}

fn pending_delete(id: i64, base: i64, at: i64) -> PendingChange {
    PendingChange {
        id,
        op: Op::Delete,
        value: None,
        base_revision: base,
        changed_at_us: at,
        committed_by_us: at,
        conflict_id: None,
        sent: true,
        xact: None,
        dropped: false,
    }
}

fn set_value(plan: &KeyPlan) -> Option<Option<&[u8]>> {
    match &plan.mirror.0 {
        MirrorAction::Set { value, .. } => Some(value.as_deref()),
        _ => None,
    }
}

#[test]
fn plain_etcd_changes_go_to_the_mirror_and_history() {
    let plan = plan_key(
        ctx(Policy::NewestWins),
        &[],
        &[put(5, "a", None), put(6, "b", Some((5, "a")))],
    );
    assert_eq!(plan.history.len(), 2);
    assert!(plan.history.iter().all(|h| h.origin == Origin::Etcd));
    assert_eq!(plan.history[1].prev_value.as_deref(), Some(&b"a"[..]));
    assert_eq!(set_value(&plan), Some(Some(&b"b"[..])));
    assert!(plan.conflicts.is_empty() && plan.consumed.is_empty());
}

#[test]
fn delete_leaves_a_tombstone_and_removes_the_row() {
    let plan = plan_key(ctx(Policy::NewestWins), &[], &[delete(9, (5, "a"))]);
    assert_eq!(plan.history[0].op, Op::Delete);
    assert_eq!(plan.history[0].prev_value.as_deref(), Some(&b"a"[..]));
    assert_eq!(set_value(&plan), Some(None));
}

#[test]
fn echo_of_own_write_is_consumed_without_conflict() {
    let pending = [pending_put(1, "local", 5, 500)];
    let plan = plan_key(
        ctx(Policy::Manual),
        &pending,
        &[put(7, "local", Some((5, "old")))],
    );
    assert_eq!(plan.consumed, vec![1]);
    assert!(plan.conflicts.is_empty());
    assert_eq!(plan.history[0].origin, Origin::Pg);
    assert_eq!(set_value(&plan), Some(Some(&b"local"[..])));
}

/// Insert, delete, insert again and update in PostgreSQL, the first insert
/// echoed: the re-created row is not the one etcd has, so neither its
/// metadata nor the base of its queued update may move (found by the 10k
/// SQL-writes test: the update's echo was taken for a conflict).
#[test]
fn an_echo_does_not_touch_a_row_re_created_after_a_local_delete() {
    let pending = [
        pending_put(1, "v1", 0, 500),
        pending_delete(2, 0, 501),
        pending_put(3, "v2", 0, 502),
        pending_put(4, "v3", 0, 503),
    ];
    let plan = plan_key(ctx(Policy::NewestWins), &pending, &[put(25, "v1", None)]);
    assert_eq!(plan.consumed, vec![1]);
    assert_eq!(
        plan.rebased,
        vec![(2, 25)],
        "only the delete was made on revision 25"
    );
    assert!(
        !matches!(plan.mirror.0, MirrorAction::Meta { .. }),
        "the re-created row keeps its metadata: {:?}",
        plan.mirror.0
    );

    // The poller then deletes at 31, creates at 32 and updates at 37.
    let pending = [
        pending_delete(2, 25, 501),
        pending_put(3, "v2", 0, 502),
        pending_put(4, "v3", 0, 503),
    ];
    let plan = plan_key(
        ctx(Policy::NewestWins),
        &pending,
        &[
            delete(31, (25, "v1")),
            put(32, "v2", None),
            put(37, "v3", Some((32, "v2"))),
        ],
    );
    assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
    assert_eq!(plan.consumed, vec![2, 3, 4]);
}

/// The fault suite's sequence: a local put, delete and re-create queued;
/// etcd changes meanwhile and pg wins. Only the changes up to the delete go
/// onto etcd's revision; the re-created row's changes keep base 0, so the
/// poller's write of it (compare: absent) is recognized as its echo.
#[test]
fn a_pg_win_does_not_rebase_changes_made_after_a_local_delete() {
    let pending = [
        pending_put(1, "v1", 40, 500),
        pending_delete(2, 40, 501),
        pending_put(3, "v2", 0, 502),
        pending_put(4, "v3", 0, 503),
    ];
    let plan = plan_key(
        ctx(Policy::PgWins),
        &pending,
        &[put(48, "e", Some((40, "x")))],
    );
    assert_eq!(plan.conflicts.len(), 1);
    assert_eq!(plan.rebased, vec![(1, 48), (2, 48)]);
    assert!(
        !matches!(plan.mirror.0, MirrorAction::Meta { .. }),
        "the re-created row keeps its metadata: {:?}",
        plan.mirror.0
    );

    // The poller puts v1 at 50, deletes at 51, creates v2 at 55, updates
    // to v3 at 56: all echoes.
    let pending = [
        pending_put(1, "v1", 48, 500),
        pending_delete(2, 48, 501),
        pending_put(3, "v2", 0, 502),
        pending_put(4, "v3", 0, 503),
    ];
    let plan = plan_key(
        ctx(Policy::PgWins),
        &pending,
        &[
            put(50, "v1", Some((48, "e"))),
            delete(51, (50, "v1")),
            put(55, "v2", None),
            put(56, "v3", Some((55, "v2"))),
        ],
    );
    assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
    assert_eq!(plan.consumed, vec![1, 2, 3, 4]);
}

fn observed_absent(revision: i64) -> KeyInput {
    KeyInput::Observed {
        state: None,
        revision,
        origin: Origin::Resync,
    }
}

/// The fault suite's seed 14: a local delete landed at 30 just before a
/// compaction at 30; a put and a delete were queued behind it and never
/// left. The resync sees the key absent, like the final local state: the
/// states agree, but the put must not vanish unrecorded.
#[test]
fn a_resync_agreeing_with_the_last_of_several_changes_records_the_others() {
    let pending = [
        pending_delete(1, 20, 500),
        pending_put(2, "v", 0, 501),
        pending_delete(3, 0, 502),
    ];
    for policy in [
        Policy::PgWins,
        Policy::EtcdWins,
        Policy::NewestWins,
        Policy::Manual,
    ] {
        let plan = plan_key(ctx(policy), &pending, &[observed_absent(30)]);
        assert_eq!(plan.consumed, vec![1, 2, 3], "{policy:?}");
        assert_eq!(plan.conflicts.len(), 1, "{policy:?}");
        let conflict = &plan.conflicts[0];
        assert_eq!(conflict.pg_superseded, vec![None, Some(b"v".to_vec())]);
        assert_eq!(conflict.pg_value, None);
        assert_eq!(conflict.winner, Some(Side::Etcd), "settled, never parked");
        assert_eq!(plan.history[0].origin, Origin::Pg);
    }

    // A single change etcd already holds landed: consumed, nothing to record.
    let plan = plan_key(
        ctx(Policy::PgWins),
        &[pending_delete(1, 20, 500)],
        &[observed_absent(30)],
    );
    assert_eq!(plan.consumed, vec![1]);
    assert!(plan.conflicts.is_empty());
    assert_eq!(plan.history[0].origin, Origin::Pg);
}

#[test]
fn chained_local_changes_are_echoed_one_by_one_and_rebased() {
    // Three local writes on a row at revision 5; the poller applied the first
    // two (revisions 7 and 8); the third is still queued.
    let pending = [
        pending_put(1, "v1", 5, 500),
        pending_put(2, "v2", 5, 501),
        pending_put(3, "v3", 5, 502),
    ];
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &pending,
        &[
            put(7, "v1", Some((5, "old"))),
            put(8, "v2", Some((7, "v1"))),
        ],
    );
    assert_eq!(plan.consumed, vec![1, 2]);
    assert_eq!(plan.rebased, vec![(3, 8)]);
    assert!(plan.conflicts.is_empty());
    assert_eq!(
        plan.mirror.0,
        MirrorAction::Meta {
            expect_mod_revision: Some(5),
            meta: KeyMeta {
                create_revision: 2,
                mod_revision: 8,
                version: 1,
                lease: 0
            }
        },
        "the row keeps v3 and moves its metadata only"
    );
}

#[test]
fn local_delete_echo_and_reinsert() {
    let pending = [pending_delete(1, 5, 500), pending_put(2, "again", 0, 501)];
    let plan = plan_key(ctx(Policy::EtcdWins), &pending, &[delete(7, (5, "old"))]);
    assert_eq!(plan.consumed, vec![1]);
    assert!(
        plan.rebased.is_empty(),
        "the re-insert is already based on 'absent'"
    );
    assert_eq!(plan.mirror.0, MirrorAction::Leave);
}

#[test]
fn events_the_writer_already_saw_are_history_only() {
    let pending = [pending_put(1, "local", 9, 500)];
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &pending,
        &[put(9, "seen", Some((5, "x")))],
    );
    assert!(plan.conflicts.is_empty() && plan.consumed.is_empty());
    assert_eq!(plan.history.len(), 1);
    assert_eq!(plan.mirror.0, MirrorAction::Leave);
}

#[test]
fn etcd_wins_drops_every_local_change_and_records_the_loser() {
    let pending = [pending_put(1, "l1", 5, 500), pending_put(2, "l2", 5, 600)];
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &pending,
        &[put(7, "remote", Some((5, "old")))],
    );
    assert_eq!(plan.consumed, vec![1, 2]);
    assert_eq!(set_value(&plan), Some(Some(&b"remote"[..])));
    let conflict = &plan.conflicts[0];
    assert_eq!(conflict.winner, Some(Side::Etcd));
    assert_eq!(conflict.pg_value.as_deref(), Some(&b"l2"[..]));
    assert_eq!(
        conflict.pg_superseded,
        vec![Some(b"l1".to_vec())],
        "the earlier local change is recorded too"
    );
    assert_eq!(conflict.pg_changed_at_us, 600);
    assert_eq!(conflict.etcd.value.as_deref(), Some(&b"remote"[..]));
    assert_eq!(conflict.etcd.revision, 7);
}

#[test]
fn pg_wins_rebases_local_changes_onto_etcd() {
    let pending = [pending_put(1, "l1", 5, 500), pending_delete(2, 5, 600)];
    let plan = plan_key(
        ctx(Policy::PgWins),
        &pending,
        &[put(7, "remote", Some((5, "old")))],
    );
    assert!(plan.consumed.is_empty());
    assert_eq!(plan.rebased, vec![(1, 7), (2, 7)]);
    assert_eq!(plan.conflicts[0].winner, Some(Side::Pg));
    // The row is gone locally: no metadata to move.
    assert_eq!(plan.mirror.0, MirrorAction::Leave);

    let pending = [pending_put(1, "l1", 5, 500), pending_put(2, "l2", 5, 600)];
    let plan = plan_key(
        ctx(Policy::PgWins),
        &pending,
        &[put(7, "remote", Some((5, "old")))],
    );
    assert_eq!(plan.rebased, vec![(1, 7), (2, 7)]);
    assert!(matches!(
        plan.mirror.0,
        MirrorAction::Meta {
            expect_mod_revision: None,
            ..
        }
    ));
    assert_eq!(
        plan.history[0].origin,
        Origin::Etcd,
        "etcd's write still happened"
    );
}

#[test]
fn pg_wins_over_an_etcd_delete_rebases_onto_absent() {
    let pending = [pending_put(1, "l1", 5, 500)];
    let plan = plan_key(ctx(Policy::PgWins), &pending, &[delete(7, (5, "old"))]);
    assert_eq!(plan.rebased, vec![(1, 0)]);
}

#[test]
fn newest_wins_compares_pg_write_time_with_etcd_observation() {
    let older_local = [pending_put(1, "l", 5, 900)];
    let plan = plan_key(
        ctx(Policy::NewestWins),
        &older_local,
        &[put(7, "r", Some((5, "o")))],
    );
    assert_eq!(plan.conflicts[0].winner, Some(Side::Etcd));
    let newer_local = [pending_put(1, "l", 5, 1_100)];
    let plan = plan_key(
        ctx(Policy::NewestWins),
        &newer_local,
        &[put(7, "r", Some((5, "o")))],
    );
    assert_eq!(plan.conflicts[0].winner, Some(Side::Pg));
}

#[test]
fn manual_parks_and_later_events_refresh_the_same_conflict() {
    let pending = [pending_put(1, "l", 5, 500)];
    let plan = plan_key(
        ctx(Policy::Manual),
        &pending,
        &[put(7, "r1", Some((5, "o"))), put(8, "r2", Some((7, "r1")))],
    );
    assert_eq!(plan.conflicts.len(), 1, "one conflict for one divergence");
    assert_eq!(plan.conflicts[0].winner, None);
    assert_eq!(plan.conflicts[0].parks, vec![1]);
    assert_eq!(plan.conflicts[0].etcd.revision, 8);
    assert_eq!(
        plan.mirror.0,
        MirrorAction::Leave,
        "manual leaves both sides"
    );
    assert!(plan.consumed.is_empty());
    assert_eq!(plan.history.len(), 2);

    let mut parked = pending_put(1, "l", 5, 500);
    parked.conflict_id = Some(42);
    let plan = plan_key(
        ctx(Policy::Manual),
        &[parked],
        &[put(9, "r3", Some((8, "r2")))],
    );
    assert!(plan.conflicts.is_empty());
    assert_eq!(plan.refreshed_conflicts.len(), 1);
    assert_eq!(plan.refreshed_conflicts[0].0, 42);
}

#[test]
fn resync_state_equal_to_local_state_consumes_and_records_what_it_cannot_vouch_for() {
    let pending = [pending_put(1, "l1", 5, 500), pending_put(2, "l2", 5, 501)];
    let observed = KeyInput::Observed {
        state: Some(KeyValue {
            key: KEY.to_vec(),
            value: b"l2".to_vec(),
            meta: KeyMeta {
                create_revision: 2,
                mod_revision: 20,
                version: 4,
                lease: 0,
            },
        }),
        revision: 30,
        origin: Origin::Resync,
    };
    let plan = plan_key(
        ctx(Policy::Manual),
        &pending,
        std::slice::from_ref(&observed),
    );
    assert_eq!(plan.consumed, vec![1, 2]);
    // l1's fate is unknown (etcd shows only l2): recorded, not parked.
    assert_eq!(plan.conflicts.len(), 1);
    assert_eq!(plan.conflicts[0].pg_superseded, vec![Some(b"l1".to_vec())]);
    assert_eq!(plan.conflicts[0].winner, Some(Side::Etcd));

    let plan = plan_key(ctx(Policy::Manual), &pending[1..], &[observed]);
    assert_eq!(plan.consumed, vec![2]);
    assert!(plan.conflicts.is_empty());
}

fn observed_value(value: &str, mod_revision: i64) -> KeyInput {
    KeyInput::Observed {
        state: Some(KeyValue {
            key: KEY.to_vec(),
            value: value.as_bytes().to_vec(),
            meta: KeyMeta {
                create_revision: 2,
                mod_revision,
                version: 4,
                lease: 0,
            },
        }),
        revision: mod_revision + 10,
        origin: Origin::Resync,
    }
}

/// SQL writes v1, the leader puts it to etcd and dies before its echo is
/// applied, the user writes v2 during the failover, etcd compacts past the
/// echo: the resync finds v1, the service's own earlier write. v1 landed;
/// v2 is still to be sent — under every policy, never dropped for v1.
#[test]
fn a_resync_agreeing_with_an_earlier_local_change_keeps_the_later_ones() {
    let pending = [pending_put(1, "v1", 5, 500), pending_put(2, "v2", 5, 900)];
    for policy in [
        Policy::NewestWins,
        Policy::EtcdWins,
        Policy::PgWins,
        Policy::Manual,
    ] {
        let plan = plan_key(ctx(policy), &pending, &[observed_value("v1", 20)]);
        assert_eq!(plan.consumed, vec![1], "{policy:?}");
        assert_eq!(
            plan.rebased,
            vec![(2, 20)],
            "v2 goes on top of v1's revision"
        );
        assert!(
            plan.conflicts.is_empty(),
            "{policy:?}: {:?}",
            plan.conflicts
        );
        assert_eq!(plan.history[0].origin, Origin::Pg);
        assert_eq!(
            plan.mirror.0,
            MirrorAction::Meta {
                expect_mod_revision: Some(5),
                meta: KeyMeta {
                    create_revision: 2,
                    mod_revision: 20,
                    version: 4,
                    lease: 0
                }
            },
            "the row keeps v2 and moves its base"
        );
    }
    // Three changes, etcd at the second: the first's fate is unknown
    // (recorded), the third is carried.
    let pending = [
        pending_put(1, "v1", 5, 500),
        pending_put(2, "v2", 5, 600),
        pending_put(3, "v3", 5, 700),
    ];
    let plan = plan_key(ctx(Policy::EtcdWins), &pending, &[observed_value("v2", 21)]);
    assert_eq!(plan.consumed, vec![1, 2]);
    assert_eq!(plan.rebased, vec![(3, 21)]);
    assert_eq!(plan.conflicts.len(), 1);
    assert_eq!(plan.conflicts[0].pg_value.as_deref(), Some(&b"v2"[..]));
    assert_eq!(plan.conflicts[0].pg_superseded, vec![Some(b"v1".to_vec())]);
    // A local delete that landed, then a re-insert still to be sent.
    let pending = [pending_delete(1, 5, 500), pending_put(2, "again", 0, 600)];
    let plan = plan_key(ctx(Policy::EtcdWins), &pending, &[observed_absent(40)]);
    assert_eq!(plan.consumed, vec![1]);
    assert!(plan.rebased.is_empty() && plan.conflicts.is_empty());
    assert_eq!(plan.mirror.0, MirrorAction::Leave);
}

/// The old leader sent A then B (chained: B is based on A's revision) and
/// died before applying either echo or sending the user's third change, A
/// again; etcd compacted past A. The resync at A's revision must not take
/// the unsent third change for landed: B is still to come from the watch,
/// and A must follow it.
#[test]
fn agreement_never_takes_an_unsent_change_for_landed() {
    let mut third = pending_put(3, "A", 10, 700);
    third.sent = false;
    let pending = [
        pending_put(1, "A", 10, 500),
        pending_put(2, "B", 10, 600),
        third,
    ];
    let plan = plan_key(ctx(Policy::EtcdWins), &pending, &[observed_value("A", 20)]);
    assert_eq!(plan.consumed, vec![1], "only the sent A landed");
    assert_eq!(plan.rebased, vec![(2, 20), (3, 20)]);
    // Then the watch brings B at 21, the echo of the second change.
    let mut rest = [pending_put(2, "B", 20, 600), pending_put(3, "A", 20, 700)];
    rest[1].sent = false;
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &rest,
        &[put(21, "B", Some((20, "A")))],
    );
    assert_eq!(plan.consumed, vec![2]);
    assert_eq!(
        plan.rebased,
        vec![(3, 21)],
        "the user's last A still goes to etcd"
    );
    assert!(plan.conflicts.is_empty());
}

#[test]
fn resync_finding_etcd_at_the_local_base_is_not_a_conflict() {
    // A key inserted locally (base 0) is absent in etcd: nothing to reconcile.
    let pending = [pending_put(1, "new", 0, 500)];
    let absent = KeyInput::Observed {
        state: None,
        revision: 40,
        origin: Origin::Resync,
    };
    let plan = plan_key(ctx(Policy::EtcdWins), &pending, &[absent]);
    assert!(plan.conflicts.is_empty() && plan.consumed.is_empty() && plan.history.is_empty());
    assert_eq!(plan.mirror.0, MirrorAction::Leave);
}

#[test]
fn etcd_to_pg_mappings_ignore_local_changes() {
    let mut context = ctx(Policy::PgWins);
    context.direction = Direction::EtcdToPg;
    let plan = plan_key(
        context,
        &[pending_put(1, "l", 5, 500)],
        &[put(7, "r", Some((5, "o")))],
    );
    assert!(plan.conflicts.is_empty());
    assert_eq!(set_value(&plan), Some(Some(&b"r"[..])));
}

#[test]
fn pg_to_etcd_mappings_leave_foreign_etcd_changes_out_of_the_mirror() {
    let mut context = ctx(Policy::NewestWins);
    context.direction = Direction::PgToEtcd;
    let plan = plan_key(context, &[], &[put(7, "r", None)]);
    assert_eq!(plan.mirror.0, MirrorAction::Leave);
    assert_eq!(plan.history.len(), 1);
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::NewestWins),
        Just(Policy::EtcdWins),
        Just(Policy::PgWins),
        Just(Policy::Manual)
    ]
}

/// A random etcd history for the key: (revision, Some(value) | None).
fn arb_inputs() -> impl Strategy<Value = Vec<KeyInput>> {
    proptest::collection::vec(proptest::option::of("[a-c]"), 0..6).prop_map(|ops| {
        let mut inputs = Vec::new();
        let mut prev: Option<(i64, String)> = Some((5, "base".into()));
        for (i, op) in ops.into_iter().enumerate() {
            let revision = 10 + i as i64;
            match op {
                Some(value) => {
                    let p = prev.as_ref().map(|(r, v)| (*r, v.as_str()));
                    inputs.push(put(revision, &value, p));
                    prev = Some((revision, value));
                }
                None => {
                    if let Some((r, v)) = prev.take() {
                        inputs.push(delete(revision, (r, &v)));
                    }
                }
            }
        }
        inputs
    })
}

fn arb_pending() -> impl Strategy<Value = Vec<PendingChange>> {
    proptest::collection::vec((proptest::option::of("[a-c]"), 0i64..2_000), 0..4).prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (value, at))| match value {
                Some(v) => pending_put(i as i64 + 1, &v, 5, at),
                None => pending_delete(i as i64 + 1, 5, at),
            })
            .collect()
    })
}

/// Local changes as the outbox trigger writes them: on the row's etcd
/// revision 5 until a local delete, on a re-created row (base 0) after it.
fn arb_pending_realistic() -> impl Strategy<Value = Vec<PendingChange>> {
    proptest::collection::vec((proptest::option::of("[a-c]"), 0i64..2_000), 0..5).prop_map(|rows| {
        let mut base = 5;
        rows.into_iter()
            .enumerate()
            .map(|(i, (value, at))| {
                let change = match &value {
                    Some(v) => pending_put(i as i64 + 1, v, base, at),
                    None => pending_delete(i as i64 + 1, base, at),
                };
                if value.is_none() {
                    base = 0;
                }
                change
            })
            .collect()
    })
}

/// Watch events, then maybe the key's state as a resync or the arbiter
/// reads it (absent, or a value, at a revision past the events).
fn arb_inputs_and_observation() -> impl Strategy<Value = Vec<KeyInput>> {
    (
        arb_inputs(),
        proptest::option::of(proptest::option::of("[a-c]")),
    )
        .prop_map(|(mut inputs, observed)| {
            if let Some(state) = observed {
                inputs.push(KeyInput::Observed {
                    state: state.map(|value| KeyValue {
                        key: KEY.to_vec(),
                        value: value.into_bytes(),
                        meta: KeyMeta {
                            create_revision: 2,
                            mod_revision: 25,
                            version: 3,
                            lease: 0,
                        },
                    }),
                    revision: 30,
                    origin: Origin::Resync,
                });
            }
            inputs
        })
}

proptest! {
    #[test]
    fn every_event_gets_exactly_one_history_row(policy in arb_policy(), pending in arb_pending(), inputs in arb_inputs()) {
        let plan = plan_key(ctx(policy), &pending, &inputs);
        let revisions: Vec<i64> = plan.history.iter().map(|h| h.revision).collect();
        let expected: Vec<i64> = inputs.iter().map(KeyInput::revision).collect();
        prop_assert_eq!(revisions, expected);
    }

    #[test]
    fn every_pending_change_is_accounted_for_once(policy in arb_policy(), pending in arb_pending(), inputs in arb_inputs()) {
        let plan = plan_key(ctx(policy), &pending, &inputs);
        for change in &pending {
            let consumed = plan.consumed.iter().filter(|id| **id == change.id).count();
            prop_assert!(consumed <= 1);
            let parked = plan.conflicts.iter().any(|c| c.parks.contains(&change.id));
            if consumed == 1 {
                prop_assert!(!parked, "a consumed change cannot be parked");
            }
        }
        // Rows are consumed in outbox order: a prefix, or all of them.
        let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
        prop_assert_eq!(&plan.consumed[..], &ids[..plan.consumed.len()]);
    }

    /// docs/design.md G3 at the planner: a consumed local change either came back
    /// as an echo (a history row of origin `pg` with its op and value) or
    /// is in a conflict record (`pg_value` or `pg_superseded`).
    #[test]
    fn no_local_change_is_consumed_unrecorded(policy in arb_policy(), pending in arb_pending_realistic(), inputs in arb_inputs_and_observation()) {
        let plan = plan_key(ctx(policy), &pending, &inputs);
        for id in &plan.consumed {
            let change = pending.iter().find(|p| p.id == *id).expect("consumed ids are pending ids");
            let echoed = plan.history.iter().any(|h| {
                h.origin == Origin::Pg && h.op == change.op && (change.op == Op::Delete || h.value == change.value)
            });
            let recorded = plan.conflicts.iter().any(|c| {
                c.pg_value == change.value || c.pg_superseded.contains(&change.value)
            });
            prop_assert!(echoed || recorded, "change {:?} consumed unrecorded: {:?}", change, plan);
        }
    }

    /// Agreement with a local change (a resync or the arbiter finds etcd
    /// holding its value) means it landed: it and the ones before it are
    /// consumed, and nothing written after it is dropped.
    #[test]
    fn agreement_with_a_local_change_never_drops_the_later_ones(policy in arb_policy(),
                                                               pending in arb_pending_realistic(),
                                                               pick in 0usize..5) {
        prop_assume!(!pending.is_empty());
        let agreed = &pending[pick % pending.len()];
        let observed = match &agreed.value {
            Some(value) => observed_value(std::str::from_utf8(value).unwrap_or("?"), 25),
            None => observed_absent(30),
        };
        let plan = plan_key(ctx(policy), &pending, &[observed]);
        let last_match = pending.iter().rposition(|p| p.value == agreed.value).unwrap_or(0);
        let kept: Vec<i64> = pending[last_match + 1..].iter().map(|p| p.id).collect();
        let agreed_ids: Vec<i64> = pending[..=last_match].iter().map(|p| p.id).collect();
        prop_assert_eq!(&plan.consumed, &agreed_ids, "{:?}", plan);
        for id in kept {
            prop_assert!(!plan.consumed.contains(&id), "change {} written after the agreed one was dropped: {:?}", id, plan);
        }
    }

    #[test]
    fn without_local_changes_the_mirror_ends_at_etcds_state(inputs in arb_inputs()) {
        let plan = plan_key(ctx(Policy::NewestWins), &[], &inputs);
        match inputs.last() {
            None => prop_assert_eq!(plan.mirror.0, MirrorAction::Leave),
            Some(last) => prop_assert_eq!(set_value(&plan), Some(last.final_value())),
        }
        prop_assert!(plan.conflicts.is_empty());
    }

    #[test]
    fn automatic_policies_never_leave_a_conflict_pending(policy in prop_oneof![Just(Policy::NewestWins), Just(Policy::EtcdWins), Just(Policy::PgWins)],
                                                         pending in arb_pending(), inputs in arb_inputs()) {
        let plan = plan_key(ctx(policy), &pending, &inputs);
        prop_assert!(plan.conflicts.iter().all(|c| c.winner.is_some() && c.parks.is_empty()));
    }
}

/// Each input is judged by when its etcd change was made: e1 (made by
/// 100) loses to the user's write at 300, e2 (made after 350) wins over it.
#[test]
fn newest_wins_judges_each_input_by_its_own_change_time() {
    let pending = [pending_put(1, "user", 5, 300)];
    let inputs = [put(7, "e1", Some((5, "o"))), put(8, "e2", Some((7, "e1")))];
    let times = [
        InputTime {
            observed_at_us: 2_000,
            changed: ChangeWindow {
                after_us: Some(50),
                by_us: 100,
            },
        },
        InputTime {
            observed_at_us: 2_000,
            changed: ChangeWindow {
                after_us: Some(350),
                by_us: 400,
            },
        },
    ];
    let plan = plan_key_timed(ctx(Policy::NewestWins), &pending, &inputs, &times);
    assert_eq!(plan.conflicts.len(), 2);
    assert_eq!(plan.conflicts[0].winner, Some(Side::Pg));
    assert_eq!(plan.conflicts[1].winner, Some(Side::Etcd));
    assert!(!plan.conflicts[1].decided_by_tie);
    assert_eq!(plan.conflicts[1].etcd.changed, times[1].changed);
    assert_eq!(plan.conflicts[1].etcd.observed_at_us, 2_000);
    assert_eq!(plan.consumed, vec![1]);
    assert_eq!(set_value(&plan), Some(Some(&b"e2"[..])));
}

/// A user's write inside the etcd change's window cannot be ordered: the
/// tie rule decides, and the conflict says so.
#[test]
fn newest_wins_inside_the_window_is_a_tie_decided_by_the_rule() {
    let pending = [pending_put(1, "user", 5, 300)];
    let inputs = [put(7, "e1", Some((5, "o")))];
    let times = [InputTime {
        observed_at_us: 2_000,
        changed: ChangeWindow {
            after_us: Some(200),
            by_us: 1_500,
        },
    }];
    for (tie, value) in [(Side::Etcd, &b"e1"[..]), (Side::Pg, &b"user"[..])] {
        let context = PlanContext {
            tie,
            ..ctx(Policy::NewestWins)
        };
        let plan = plan_key_timed(context, &pending, &inputs, &times);
        assert_eq!(plan.conflicts.len(), 1);
        assert_eq!(plan.conflicts[0].winner, Some(tie));
        assert!(plan.conflicts[0].decided_by_tie);
        match tie {
            Side::Etcd => assert_eq!(set_value(&plan), Some(Some(value))),
            Side::Pg => assert_eq!(plan.consumed, Vec::<i64>::new()),
        }
    }
}

fn dropped(mut change: PendingChange) -> PendingChange {
    change.dropped = true;
    change.xact = Some(77);
    change
}

#[test]
fn a_dropped_change_is_put_back_from_etcds_observed_state_at_its_own_revision() {
    // The row shows a dropped put based on revision 9; etcd is still there.
    let pending = [dropped(pending_put(1, "dropped", 9, 500))];
    for policy in [Policy::EtcdWins, Policy::PgWins, Policy::Manual] {
        let plan = plan_key(ctx(policy), &pending, &[observed_value("etcd", 9)]);
        assert_eq!(plan.consumed, vec![1], "{policy:?}");
        assert_eq!(set_value(&plan), Some(Some(b"etcd".as_slice())));
        assert_eq!(
            plan.restore,
            Restore::Etcd,
            "written at an equal revision too"
        );
        assert!(
            plan.conflicts.is_empty(),
            "no conflict: the transaction lost already"
        );
    }
    // Also for a mapping that does not take etcd's changes otherwise.
    let mut pg_only = ctx(Policy::EtcdWins);
    pg_only.direction = Direction::PgToEtcd;
    let plan = plan_key(pg_only, &pending, &[observed_absent(20)]);
    assert_eq!(set_value(&plan), Some(None));
}

#[test]
fn a_dropped_change_is_left_alone_by_watch_events() {
    // A watch event may be older than the row: only an observation of the
    // current state puts it back.
    let pending = [dropped(pending_put(1, "dropped", 9, 500))];
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &pending,
        &[put(12, "etcd", Some((9, "old")))],
    );
    assert!(plan.consumed.is_empty());
    assert_eq!(plan.restore, Restore::None);
    assert!(
        plan.conflicts.is_empty(),
        "a dropped change is in no conflict"
    );
    assert_eq!(set_value(&plan), Some(Some(b"etcd".as_slice())));
}

#[test]
fn a_dropped_change_behind_a_kept_one_leaves_the_row_with_the_kept_value() {
    let pending = [
        pending_put(1, "kept", 9, 400),
        dropped(pending_put(2, "dropped", 9, 500)),
    ];
    let plan = plan_key(
        ctx(Policy::PgWins),
        &pending,
        &[observed_value("etcd-9", 9)],
    );
    assert_eq!(plan.consumed, vec![2]);
    assert_eq!(
        plan.restore,
        Restore::Local {
            value: Some(b"kept".to_vec()),
            base: 9
        }
    );
    // A dropped change before a kept one: consumed, the row is the kept one's.
    let pending = [
        dropped(pending_put(1, "dropped", 9, 400)),
        pending_put(2, "kept", 9, 500),
    ];
    let plan = plan_key(
        ctx(Policy::PgWins),
        &pending,
        &[observed_value("etcd-9", 9)],
    );
    assert_eq!(plan.consumed, vec![1]);
    assert_eq!(plan.restore, Restore::None);
}

#[test]
fn a_conflict_decides_for_the_transactions_of_every_pending_change() {
    let mut first = pending_put(1, "a", 9, 400);
    first.xact = Some(70);
    let mut second = pending_put(2, "b", 9, 500);
    second.xact = Some(71);
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &[first, second],
        &[put(12, "etcd", Some((9, "old")))],
    );
    assert_eq!(plan.conflicts.len(), 1);
    assert_eq!(plan.conflicts[0].xacts, vec![70, 71]);
    assert_eq!(plan.conflicts[0].pg_xact, Some(71));
}

#[test]
fn the_echo_of_a_dropped_change_that_had_landed_is_recognized() {
    // A transaction split over two txns: its change of this key landed
    // (revision 12), then the rest lost a conflict and the whole
    // transaction was dropped. A later local change waits behind it.
    let mut landed = dropped(pending_put(1, "landed", 9, 400));
    landed.sent = true;
    let later = pending_put(2, "later", 9, 500);
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &[landed, later],
        &[put(12, "landed", Some((9, "old")))],
    );
    assert!(
        plan.conflicts.is_empty(),
        "no conflict with our own write: {plan:?}"
    );
    assert_eq!(plan.consumed, vec![1]);
    assert_eq!(
        plan.rebased,
        vec![(2, 12)],
        "the later change goes on top of it"
    );
}

#[test]
fn changes_after_a_dropped_delete_are_based_on_what_the_delete_removed() {
    // The dropped transaction deleted the key (at 9); users then created
    // it again and changed it (base 0, the row was absent): etcd is
    // observed still holding it at 9.
    let delete = dropped(pending_delete(1, 9, 400));
    let insert = pending_put(2, "again", 0, 500);
    let update = pending_put(3, "and again", 0, 600);
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &[delete, insert, update],
        &[observed_value("etcd-9", 9)],
    );
    assert!(plan.conflicts.is_empty(), "{plan:?}");
    assert_eq!(plan.consumed, vec![1]);
    assert_eq!(plan.rebased, vec![(2, 9), (3, 9)]);
    assert!(
        matches!(plan.mirror.0, MirrorAction::Meta { expect_mod_revision: Some(0), meta } if meta.mod_revision == 9),
        "the re-created row takes etcd's metadata: {plan:?}"
    );
}

#[test]
fn a_dropped_delete_that_landed_leaves_later_changes_on_the_absent_key() {
    // The delete was sent and landed (the key is observed absent): the
    // insert made after it is based on the absent key, as it was.
    let mut delete = dropped(pending_delete(1, 5, 400));
    delete.sent = true;
    let insert = pending_put(2, "new", 0, 500);
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &[delete, insert],
        &[observed_absent(9)],
    );
    assert!(plan.conflicts.is_empty(), "{plan:?}");
    assert!(plan.rebased.is_empty());
}

#[test]
fn a_dropped_change_sent_chained_is_recognized_by_its_echo() {
    // p0 went (5 -> 7); d1, chained on it, went too (7 -> 8) before its
    // transaction was dropped; p2 waits.
    let p0 = pending_put(1, "p0", 5, 300);
    let mut d1 = dropped(pending_put(2, "d1", 5, 400));
    d1.sent = true;
    let p2 = pending_put(3, "p2", 5, 500);
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &[p0, d1, p2],
        &[
            put(7, "p0", Some((5, "old"))),
            put(8, "d1", Some((7, "p0"))),
        ],
    );
    assert!(plan.conflicts.is_empty(), "{plan:?}");
    assert_eq!(plan.consumed, vec![1, 2]);
    assert_eq!(plan.rebased, vec![(3, 8)]);
}

#[test]
fn a_dropped_change_follows_the_echo_of_the_change_before_it() {
    // p0 lands (5 -> 7) in one batch; the dropped delete d1 behind it is
    // based on p0's state, and the plan records that.
    let p0 = pending_put(1, "p0", 5, 300);
    let d1 = dropped(pending_delete(2, 5, 400));
    let plan = plan_key(
        ctx(Policy::EtcdWins),
        &[p0, d1.clone()],
        &[put(7, "p0", Some((5, "old")))],
    );
    assert!(plan.conflicts.is_empty(), "{plan:?}");
    assert_eq!(plan.rebased, vec![(2, 7)]);
    // A later observation of the key at 7 shows the delete did not land: a
    // change made after it on the absent row is based on 7.
    let mut d1 = d1;
    d1.base_revision = 7;
    let p2 = pending_put(3, "p2", 0, 500);
    let plan = plan_key(ctx(Policy::EtcdWins), &[d1, p2], &[observed_value("p0", 7)]);
    assert!(plan.conflicts.is_empty(), "{plan:?}");
    assert_eq!(plan.rebased, vec![(3, 7)]);
}
