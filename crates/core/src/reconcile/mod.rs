//! What to do with one key when etcd changes reach PostgreSQL: the pure
//! planner behind the apply transaction, the arbiter and the resync.
//!
//! For each key the planner gets the PostgreSQL changes still pending in the
//! outbox and the etcd inputs (watch events, or a state read by a resync) in
//! revision order, and returns the key's *final* effect: history rows, one
//! mirror action, which outbox rows are consumed, rebased or parked, and the
//! conflicts. The store executes the plans of many keys as a few bulk
//! statements, so the planner is where correctness is decided and tested.
//!
//! Rules, for an etcd input `e` and the first pending change `p1`:
//! - no pending change: the mirror takes etcd's state;
//! - `e` is not newer than `p1.base_revision`: the local writer already saw
//!   it; history only;
//! - `e` is exactly `p1` applied (same op and value, `e`'s previous revision
//!   equals `p1`'s base): an echo of the service's own write — consume `p1`,
//!   rebase the changes queued behind it onto `e`, history origin `pg`;
//! - a resync's (or the arbiter's) state equal to a pending change `pi`
//!   that was sent (the last such one; a change never sent cannot have
//!   landed, and a later one with an equal value may be behind a sent
//!   change that etcd has yet to show): `pi` landed and its echo was lost
//!   (compaction, a leader that died before applying it) — consume `p1..=pi`, history
//!   origin `pg`; the earlier ones, whose fate is unknown, are recorded in a
//!   resolved conflict; the changes after `pi` are carried on top of etcd's
//!   state (never dropped: they are newer than anything etcd has);
//! - anything else: a conflict, decided by the mapping's policy.
//!
//! A change dropped with its transaction (another change of it lost a
//! conflict) takes no part: it is consumed, and the mirror row put back,
//! when an observation of etcd's current state comes (the arbiter reads
//! one for every such key), never on a watch event, which may be older than
//! the row.

use crate::mapping::{Direction, Policy};
use crate::model::{EtcdEvent, KeyMeta, KeyValue, Op, Origin, PendingChange};
use crate::policy::{ChangeWindow, Decision, PgWrite, Side, decide};

/// An etcd input for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyInput {
    /// A change from the watch, with its previous state.
    Event(EtcdEvent),
    /// The key's state read at `revision` by a resync or the arbiter: `None`
    /// means absent. The changes that led there are unknown.
    Observed {
        state: Option<KeyValue>,
        revision: i64,
        origin: Origin,
    },
}

impl KeyInput {
    /// The revision the input brings the key to.
    pub fn revision(&self) -> i64 {
        match self {
            KeyInput::Event(e) => e.revision,
            KeyInput::Observed {
                state: Some(kv), ..
            } => kv.meta.mod_revision,
            KeyInput::Observed { revision, .. } => *revision,
        }
    }

    fn final_value(&self) -> Option<&[u8]> {
        match self {
            KeyInput::Event(e) if e.op == Op::Put => Some(&e.value),
            KeyInput::Event(_) => None,
            KeyInput::Observed { state, .. } => state.as_ref().map(|kv| kv.value.as_slice()),
        }
    }

    fn meta(&self) -> KeyMeta {
        match self {
            KeyInput::Event(e) if e.op == Op::Put => e.meta,
            KeyInput::Observed {
                state: Some(kv), ..
            } => kv.meta,
            _ => KeyMeta::default(),
        }
    }
}

/// A history row to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub revision: i64,
    pub op: Op,
    pub value: Option<Vec<u8>>,
    pub prev_value: Option<Vec<u8>>,
    pub meta: KeyMeta,
    pub origin: Origin,
}

/// The one thing that happens to the key's mirror row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorAction {
    Leave,
    /// Make the row equal to etcd's state (`value: None` deletes it), unless
    /// the row already reflects `revision` or later.
    Set {
        value: Option<Vec<u8>>,
        meta: KeyMeta,
        revision: i64,
        origin: Origin,
    },
    /// Keep the row's (local) value, update its etcd metadata; only where the
    /// row's mod revision equals `expect` (when given).
    Meta {
        expect_mod_revision: Option<i64>,
        meta: KeyMeta,
    },
}

/// One side of a conflict as recorded in the `conflicts` ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSide {
    pub value: Option<Vec<u8>>,
    pub revision: i64,
    pub observed_at_us: i64,
    /// When etcd's change was made (the revision clock's window).
    pub changed: ChangeWindow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictEntry {
    pub etcd: EtcdSide,
    /// The local state that conflicted: the last pending change's value.
    pub pg_value: Option<Vec<u8>>,
    /// The values of the earlier pending changes of the key, oldest first.
    pub pg_superseded: Vec<Option<Vec<u8>>>,
    pub pg_base_revision: i64,
    pub pg_changed_at_us: i64,
    /// When the last pending change's transaction committed, at the latest.
    pub pg_committed_by_us: i64,
    pub policy: Policy,
    /// `None` while parked (`manual`).
    pub winner: Option<Side>,
    /// `newest-wins` could not order the two changes: the tie rule chose.
    pub decided_by_tie: bool,
    /// Outbox rows parked behind this conflict.
    pub parks: Vec<i64>,
    /// The transaction of the last pending change (`None`: not recorded).
    pub pg_xact: Option<i64>,
    /// The transactions of every pending change the decision covers: all
    /// their changes, of any key, follow it (dropped with an etcd win,
    /// parked with a `manual` one).
    pub xacts: Vec<i64>,
}

/// The final effect of a batch on one key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPlan {
    pub history: Vec<HistoryEntry>,
    pub mirror: MirrorActionSlot,
    pub consumed: Vec<i64>,
    /// Outbox rows that stay, with their new base revision.
    pub rebased: Vec<(i64, i64)>,
    pub conflicts: Vec<ConflictEntry>,
    /// New etcd side of a conflict already parked (id from `conflict_id`).
    pub refreshed_conflicts: Vec<(i64, EtcdSide)>,
    /// The mirror row showed a dropped change: how to put it back.
    pub restore: Restore,
}

/// Putting back a mirror row that shows a dropped change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Restore {
    #[default]
    None,
    /// The mirror action (a `Set` to etcd's observed state) is written even
    /// where the row's mod revision already equals the state's: the row's
    /// metadata is etcd's, its value is not.
    Etcd,
    /// A change queued before the dropped one remains: the row shows its
    /// value (`None`: deleted); a present row keeps its metadata, one the
    /// dropped change deleted comes back with `base` as mod revision.
    Local { value: Option<Vec<u8>>, base: i64 },
}

/// `MirrorAction` with a default, so `KeyPlan` can derive `Default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorActionSlot(pub MirrorAction);

impl Default for MirrorActionSlot {
    fn default() -> Self {
        MirrorActionSlot(MirrorAction::Leave)
    }
}

/// Everything the planner needs to know about the key's mapping and the
/// moment of observation.
#[derive(Debug, Clone, Copy)]
pub struct PlanContext {
    pub policy: Policy,
    pub direction: Direction,
    /// When the etcd inputs were observed, microseconds on PostgreSQL's clock.
    pub observed_at_us: i64,
    /// The side `newest-wins` keeps when it cannot order two changes.
    pub tie: Side,
}

/// The times of one etcd input, microseconds on PostgreSQL's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputTime {
    /// When the service read it from etcd.
    pub observed_at_us: i64,
    /// When etcd's change was made.
    pub changed: ChangeWindow,
}

/// Plans one key. `pending` is in outbox id order, `inputs` in revision
/// order; every input is taken as made at `ctx.observed_at_us` exactly.
pub fn plan_key(ctx: PlanContext, pending: &[PendingChange], inputs: &[KeyInput]) -> KeyPlan {
    let time = InputTime {
        observed_at_us: ctx.observed_at_us,
        changed: ChangeWindow::exactly(ctx.observed_at_us),
    };
    plan_key_timed(ctx, pending, inputs, &vec![time; inputs.len()])
}

/// [`plan_key`] with the times of each input (one per input;
/// `ctx.observed_at_us` is not used): a conflict is decided by when etcd's
/// change was made, and records when it was read.
pub fn plan_key_timed(
    ctx: PlanContext,
    pending: &[PendingChange],
    inputs: &[KeyInput],
    times: &[InputTime],
) -> KeyPlan {
    debug_assert!(pending.windows(2).all(|w| w[0].id < w[1].id));
    debug_assert!(
        inputs
            .windows(2)
            .all(|w| w[0].revision() <= w[1].revision())
    );
    debug_assert_eq!(inputs.len(), times.len());
    let mut planner = Planner {
        ctx,
        time: times.first().copied().unwrap_or(InputTime {
            observed_at_us: ctx.observed_at_us,
            changed: ChangeWindow::exactly(ctx.observed_at_us),
        }),
        // An etcd-to-pg mapping never propagates local changes: they are
        // dead-lettered by the poller, and etcd's state always wins here.
        pending: if ctx.direction.pg_to_etcd() {
            without_dropped(pending)
        } else {
            Vec::new()
        },
        original_bases: pending.iter().map(|p| (p.id, p.base_revision)).collect(),
        plan: KeyPlan::default(),
        parked_here: false,
        restoring: false,
        dropped_rows: pending.iter().filter(|p| p.dropped).cloned().collect(),
    };
    let observed = inputs
        .iter()
        .any(|i| matches!(i, KeyInput::Observed { .. }));
    let dropped_last = pending.last().is_some_and(|p| p.dropped);
    // Changes made on the row a dropped delete removed (base 0) were made,
    // as far as etcd is concerned, over the state the delete started from,
    // when etcd is observed still there: they take that base, up to the
    // next local delete, and so does the re-created row.
    let observed_state = inputs.iter().find_map(|i| match i {
        KeyInput::Observed { state, .. } => Some(state.as_ref().map(|kv| kv.meta)),
        KeyInput::Event(_) => None,
    });
    if let Some(Some(meta)) = observed_state
        && let Some(base) = unlanded_dropped_delete(&planner.dropped_rows, meta.mod_revision)
    {
        let mut moved = false;
        for change in planner.pending.iter_mut() {
            if change.base_revision == 0 {
                change.base_revision = base;
                moved = true;
            }
            if change.op == Op::Delete {
                break;
            }
        }
        if moved && planner.pending.iter().all(|p| p.op == Op::Put) {
            planner.set_meta(Some(0), meta);
        }
    }
    if observed && !planner.dropped_rows.is_empty() {
        let ids = planner.dropped_rows.iter().map(|d| d.id);
        planner.plan.consumed.extend(ids);
        planner.restoring = dropped_last && planner.pending.is_empty();
    }
    for (input, time) in inputs.iter().zip(times) {
        planner.time = *time;
        planner.apply(input);
    }
    if observed && dropped_last {
        planner.restore();
    }
    planner.finish()
}

struct Planner {
    ctx: PlanContext,
    /// The times of the input being planned.
    time: InputTime,
    pending: Vec<PendingChange>,
    original_bases: Vec<(i64, i64)>,
    plan: KeyPlan,
    /// A conflict of this batch parked the key: later inputs refresh it.
    parked_here: bool,
    /// The row shows a dropped change and nothing else is pending: it takes
    /// etcd's observed state whatever the mapping's direction.
    restoring: bool,
    /// The dropped changes not consumed, their bases kept current as the
    /// changes before them land (chained): a sent one may have landed (a
    /// transaction split over several txns), and its echo is recognized; a
    /// delete's base says where etcd stays if it did not.
    dropped_rows: Vec<PendingChange>,
}

impl Planner {
    fn apply(&mut self, input: &KeyInput) {
        if self.echo_of_dropped(input) {
            return;
        }
        let Some(first) = self.pending.first().cloned() else {
            self.record_history(input, default_origin(input));
            if self.ctx.direction.etcd_to_pg() || self.restoring {
                self.set_mirror_to(input, default_origin(input));
            }
            return;
        };
        if let KeyInput::Observed { state, .. } = input {
            let observed_revision = state.as_ref().map_or(0, |kv| kv.meta.mod_revision);
            if observed_revision == first.base_revision {
                // etcd is still where the local change started from.
                return;
            }
        }
        if input.revision() <= first.base_revision {
            // The local change was written on top of this state already.
            self.record_history(input, default_origin(input));
            return;
        }
        if self.parked_here {
            self.record_history(input, default_origin(input));
            let side = self.etcd_side(input);
            if let Some(entry) = self.plan.conflicts.last_mut() {
                entry.etcd = side;
            }
            return;
        }
        if let Some(parked) = first.conflict_id {
            self.record_history(input, default_origin(input));
            self.plan
                .refreshed_conflicts
                .push((parked, self.etcd_side(input)));
            return;
        }
        if is_echo(&first, input) {
            self.consume_echo(input);
            return;
        }
        if let Some(agreed) = agreeing_change(&self.pending, input) {
            self.consume_agreement(input, agreed);
            return;
        }
        self.conflict(input);
    }

    /// `input` is the echo of a dropped change that had been sent before
    /// the pending ones: it landed after all (its transaction was split
    /// over txns), so it is consumed as an echo and what follows is based
    /// on it.
    fn echo_of_dropped(&mut self, input: &KeyInput) -> bool {
        let Some(at) = self.dropped_rows.iter().position(|d| {
            d.sent && is_echo(d, input) && self.pending.first().is_none_or(|first| d.id < first.id)
        }) else {
            return false;
        };
        let landed = self.dropped_rows.remove(at);
        self.pending.insert(0, landed);
        self.consume_echo(input);
        true
    }

    fn consume_echo(&mut self, input: &KeyInput) {
        let KeyInput::Event(event) = input else {
            unreachable!("only watch events are echoes");
        };
        self.record_history(input, Origin::Pg);
        let echoed = self.pending.remove(0);
        self.plan.consumed.push(echoed.id);
        let new_base = match event.op {
            Op::Put => event.revision,
            Op::Delete => 0,
        };
        // Dropped changes made after it were based on it too.
        for dropped in &mut self.dropped_rows {
            if dropped.base_revision == event.prev_revision() {
                dropped.base_revision = new_base;
            }
        }
        // Queued changes up to the next local delete were made on the row
        // this echo updated: they move onto its revision. Changes after a
        // local delete were made on a re-created row (base 0, unknown to
        // etcd) and keep their base, even when the numbers coincide.
        for queued in &mut self.pending {
            if queued.base_revision == event.prev_revision() {
                queued.base_revision = new_base;
            }
            if queued.op == Op::Delete {
                break;
            }
        }
        if self.pending.is_empty() {
            self.set_mirror_to(input, Origin::Pg);
        } else if event.op == Op::Put && self.pending.iter().all(|p| p.op == Op::Put) {
            // The row shows the newest local value; only its metadata moves.
            // After a queued local delete the row, if any, is a re-created
            // one: its metadata (not in etcd yet) must stay.
            self.set_meta(Some(event.prev_revision()), event.meta);
        }
    }

    /// etcd's observed state is the one pending change `agreed` (an index)
    /// produced: it landed. With changes before it, that says nothing about
    /// them (a put between two deletes may never have left): the states
    /// agree, so nothing is replayed, but they are recorded as superseded
    /// in a resolved conflict — none vanishes. The changes after it were
    /// written later than anything etcd has and are carried on top of it.
    fn consume_agreement(&mut self, input: &KeyInput, agreed: usize) {
        let landed: Vec<PendingChange> = self.pending.drain(..=agreed).collect();
        let last = &landed[agreed];
        if agreed > 0 {
            let mut superseded = self.conflict_entry_for(input, &landed);
            // Decided, not a choice: etcd's state (= a local one) stands.
            superseded.winner = Some(Side::Etcd);
            self.plan.conflicts.push(superseded);
        }
        self.record_history(input, Origin::Pg);
        self.plan.consumed.extend(landed.iter().map(|p| p.id));
        if self.pending.is_empty() {
            self.set_mirror_to(input, Origin::Pg);
            return;
        }
        if last.op == Op::Delete {
            // What follows was written on a re-created row, unknown to etcd
            // (base 0, as etcd now has no key): nothing moves.
            return;
        }
        // Changes up to the next local delete were made on the row `last`
        // left, which etcd now holds at its revision.
        let new_base = input.revision();
        for queued in &mut self.pending {
            queued.base_revision = new_base;
            if queued.op == Op::Delete {
                break;
            }
        }
        if self.pending.iter().all(|p| p.op == Op::Put) {
            // The row shows the newest local value; only its metadata moves.
            // Its mod revision is the base of the first change, or 0 when a
            // local delete re-created it.
            let row_revision = if landed.iter().any(|p| p.op == Op::Delete) {
                0
            } else {
                landed[0].base_revision
            };
            self.set_meta(Some(row_revision), input.meta());
        }
    }

    fn conflict(&mut self, input: &KeyInput) {
        self.record_history(input, default_origin(input));
        let mut entry = self.conflict_entry(input);
        let pg = PgWrite {
            written_us: entry.pg_changed_at_us,
            committed_by_us: entry.pg_committed_by_us,
        };
        let decision = decide(self.ctx.policy, pg, self.time.changed, self.ctx.tie);
        entry.decided_by_tie = matches!(decision, Decision::Tie(_));
        // The decision covers the transactions of every pending change.
        for xact in self.pending.iter().filter_map(|p| p.xact) {
            if !entry.xacts.contains(&xact) {
                entry.xacts.push(xact);
            }
        }
        match decision.side() {
            Some(Side::Etcd) => {
                entry.winner = Some(Side::Etcd);
                self.plan
                    .consumed
                    .extend(self.pending.drain(..).map(|p| p.id));
                self.set_mirror_to(input, default_origin(input));
            }
            Some(Side::Pg) => {
                entry.winner = Some(Side::Pg);
                let new_base = match input.final_value() {
                    Some(_) => input.revision(),
                    None => 0,
                };
                // The local changes now go on top of etcd's state: those up
                // to the first local delete. Changes after it were made on a
                // re-created row (base 0, absent from etcd once the delete
                // lands) and keep their base; moving them made the echo of
                // their own write look like a conflict and sent it twice.
                for queued in &mut self.pending {
                    queued.base_revision = new_base;
                    if queued.op == Op::Delete {
                        break;
                    }
                }
                // A re-created row keeps its metadata (not in etcd yet).
                if self.pending.iter().all(|p| p.op == Op::Put) {
                    self.set_meta(None, input.meta());
                }
            }
            None => {
                // The store links these rows to the new conflict's id.
                entry.parks = self.pending.iter().map(|p| p.id).collect();
                self.parked_here = true;
            }
        }
        self.plan.conflicts.push(entry);
    }

    fn etcd_side(&self, input: &KeyInput) -> EtcdSide {
        EtcdSide {
            value: input.final_value().map(<[u8]>::to_vec),
            revision: input.revision(),
            observed_at_us: self.time.observed_at_us,
            changed: self.time.changed,
        }
    }

    /// The conflict record of `input` against the pending changes, not
    /// decided yet (`winner: None`).
    fn conflict_entry(&self, input: &KeyInput) -> ConflictEntry {
        self.conflict_entry_for(input, &self.pending)
    }

    /// The conflict record of `input` against `changes` (not empty).
    fn conflict_entry_for(&self, input: &KeyInput, changes: &[PendingChange]) -> ConflictEntry {
        let (first, last) = match (changes.first(), changes.last()) {
            (Some(first), Some(last)) => (first, last),
            _ => unreachable!("a conflict needs pending changes"),
        };
        ConflictEntry {
            etcd: self.etcd_side(input),
            pg_value: last.value.clone(),
            pg_superseded: changes[..changes.len() - 1]
                .iter()
                .map(|p| p.value.clone())
                .collect(),
            pg_base_revision: first.base_revision,
            pg_changed_at_us: last.changed_at_us,
            pg_committed_by_us: last.committed_by_us,
            policy: self.ctx.policy,
            winner: None,
            decided_by_tie: false,
            parks: Vec::new(),
            pg_xact: last.xact,
            xacts: Vec::new(),
        }
    }

    fn record_history(&mut self, input: &KeyInput, origin: Origin) {
        match input {
            KeyInput::Event(e) => self.plan.history.push(HistoryEntry {
                revision: e.revision,
                op: e.op,
                value: (e.op == Op::Put).then(|| e.value.clone()),
                prev_value: e.prev.as_ref().map(|p| p.value.clone()),
                meta: e.meta,
                origin,
            }),
            KeyInput::Observed {
                state, revision, ..
            } => self.plan.history.push(match state {
                Some(kv) => HistoryEntry {
                    revision: kv.meta.mod_revision,
                    op: Op::Put,
                    value: Some(kv.value.clone()),
                    prev_value: None,
                    meta: kv.meta,
                    origin,
                },
                // The deletion happened at an unknown revision up to this
                // one: the tombstone says "gone as of the resync".
                None => HistoryEntry {
                    revision: *revision,
                    op: Op::Delete,
                    value: None,
                    prev_value: None,
                    meta: KeyMeta::default(),
                    origin,
                },
            }),
        }
    }

    fn set_mirror_to(&mut self, input: &KeyInput, origin: Origin) {
        debug_assert!(
            !matches!(self.plan.mirror.0, MirrorAction::Meta { .. }) || self.pending.is_empty(),
            "a Set follows a Meta only once nothing is pending"
        );
        self.plan.mirror = MirrorActionSlot(MirrorAction::Set {
            value: input.final_value().map(<[u8]>::to_vec),
            meta: input.meta(),
            revision: input.revision(),
            origin,
        });
    }

    fn set_meta(&mut self, expect: Option<i64>, meta: KeyMeta) {
        let expect = match &self.plan.mirror.0 {
            // Composing: the row must still be where the first update expected.
            MirrorAction::Meta {
                expect_mod_revision,
                ..
            } => *expect_mod_revision,
            _ => expect,
        };
        self.plan.mirror = MirrorActionSlot(MirrorAction::Meta {
            expect_mod_revision: expect,
            meta,
        });
    }

    /// The key's last pending change was dropped: its value must leave the
    /// row. After etcd's state was planned, the row takes that state (if a
    /// `Set` of it was planned) or the last change still pending.
    fn restore(&mut self) {
        self.plan.restore = match (&self.plan.mirror.0, self.pending.last()) {
            (MirrorAction::Set { .. }, _) => Restore::Etcd,
            (_, Some(last)) => Restore::Local {
                value: last.value.clone(),
                base: last.base_revision,
            },
            (_, None) => {
                // Nothing would put the row back: the dropped changes stay
                // for a later observation.
                let dropped = &self.dropped_rows;
                self.plan
                    .consumed
                    .retain(|id| dropped.iter().all(|d| d.id != *id));
                Restore::None
            }
        };
    }

    fn finish(mut self) -> KeyPlan {
        let consumed = &self.plan.consumed;
        let dropped_left = self
            .dropped_rows
            .iter()
            .filter(|d| !consumed.contains(&d.id));
        for queued in self.pending.iter().chain(dropped_left) {
            let original = self
                .original_bases
                .iter()
                .find(|(id, _)| *id == queued.id)
                .map(|(_, base)| *base);
            if original != Some(queued.base_revision) {
                self.plan.rebased.push((queued.id, queued.base_revision));
            }
        }
        self.plan
    }
}

/// The changes that take part in planning: all but the dropped ones.
fn without_dropped(pending: &[PendingChange]) -> Vec<PendingChange> {
    pending.iter().filter(|p| !p.dropped).cloned().collect()
}

/// The key's last dropped change was a delete that etcd, observed present
/// at mod revision `observed`, did not take: the key is still at the
/// delete's base. Returns that base.
fn unlanded_dropped_delete(dropped: &[PendingChange], observed: i64) -> Option<i64> {
    let delete = dropped
        .last()
        .filter(|p| p.op == Op::Delete && p.base_revision != 0)?;
    (observed == delete.base_revision).then_some(delete.base_revision)
}

fn default_origin(input: &KeyInput) -> Origin {
    match input {
        KeyInput::Event(_) => Origin::Etcd,
        KeyInput::Observed { origin, .. } => *origin,
    }
}

/// True when the etcd change is exactly the pending change applied.
fn is_echo(pending: &PendingChange, input: &KeyInput) -> bool {
    let KeyInput::Event(event) = input else {
        return false;
    };
    if event.op != pending.op || event.prev_revision() != pending.base_revision {
        return false;
    }
    match event.op {
        Op::Put => pending.value.as_deref() == Some(event.value.as_slice()),
        Op::Delete => true,
    }
}

/// The last sent pending change whose state a resync's (or the arbiter's)
/// observation equals, if any.
fn agreeing_change(pending: &[PendingChange], input: &KeyInput) -> Option<usize> {
    let KeyInput::Observed { state, .. } = input else {
        return None;
    };
    let observed = state.as_ref().map(|kv| kv.value.as_slice());
    pending
        .iter()
        .rposition(|p| p.sent && p.value.as_deref() == observed)
}

#[cfg(test)]
mod tests;
