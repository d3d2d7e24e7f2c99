//! The conflict decision (docs/design.md D1, G12): pure, so it can be tested exhaustively and
//! called inside the store's apply transaction.

use std::fmt;

use crate::mapping::Policy;

/// Which side a resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Etcd,
    Pg,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Etcd => "etcd",
            Side::Pg => "pg",
        }
    }

    pub fn parse(s: &str) -> Option<Side> {
        match s {
            "etcd" => Some(Side::Etcd),
            "pg" => Some(Side::Pg),
            _ => None,
        }
    }
}

/// Where a conflict stands (`conflicts.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictStatus {
    /// Parked (`manual`): waits for an operator.
    Pending,
    Resolved,
}

impl ConflictStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictStatus::Pending => "pending",
            ConflictStatus::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<ConflictStatus> {
        match s {
            "pending" => Some(ConflictStatus::Pending),
            "resolved" => Some(ConflictStatus::Resolved),
            _ => None,
        }
    }
}

/// Who settled a conflict (`conflicts.resolved_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolvedBy {
    /// The mapping's policy.
    Policy,
    /// An operator (`conflicts resolve`).
    Operator,
    /// Following a new etcd timeline rolled the PostgreSQL value back.
    TimelineChange,
    /// Another change of the same PostgreSQL transaction lost a conflict.
    Transaction,
}

impl ResolvedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedBy::Policy => "policy",
            ResolvedBy::Operator => "operator",
            ResolvedBy::TimelineChange => "timeline-change",
            ResolvedBy::Transaction => "transaction",
        }
    }

    pub fn parse(s: &str) -> Option<ResolvedBy> {
        match s {
            "policy" => Some(ResolvedBy::Policy),
            "operator" => Some(ResolvedBy::Operator),
            "timeline-change" => Some(ResolvedBy::TimelineChange),
            "transaction" => Some(ResolvedBy::Transaction),
            _ => None,
        }
    }
}

/// What to do with a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep this side in both stores; the other side's change is the loser.
    Keep(Side),
    /// `newest-wins` could not tell which change came first (PostgreSQL's
    /// write fell inside the etcd change's window): the tie rule keeps this
    /// side.
    Tie(Side),
    /// Leave both stores as they are until an operator decides (`manual`).
    Park,
}

impl Decision {
    /// The side kept, `None` while parked.
    pub fn side(self) -> Option<Side> {
        match self {
            Decision::Keep(side) | Decision::Tie(side) => Some(side),
            Decision::Park => None,
        }
    }
}

/// When an etcd change was made, in microseconds on PostgreSQL's clock:
/// after `after_us` (`None`: no evidence, it may be arbitrarily old) and no
/// later than `by_us`. The revision clock gives the window (see
/// `docs/clocks.md`); it is about a second wide while a replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeWindow {
    pub after_us: Option<i64>,
    pub by_us: i64,
}

impl ChangeWindow {
    /// A change known to have been made at `at_us` (to the microsecond).
    pub fn exactly(at_us: i64) -> ChangeWindow {
        ChangeWindow {
            after_us: Some(at_us.saturating_sub(1)),
            by_us: at_us,
        }
    }
}

/// When a PostgreSQL change took effect, in microseconds on PostgreSQL's
/// clock: written at `written_us`, visible once its transaction committed,
/// no later than `committed_by_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgWrite {
    pub written_us: i64,
    pub committed_by_us: i64,
}

impl PgWrite {
    /// A change written and committed at `at_us`.
    pub fn at(at_us: i64) -> PgWrite {
        PgWrite {
            written_us: at_us,
            committed_by_us: at_us,
        }
    }
}

/// Decides a conflict between a PostgreSQL change `pg` and an etcd change
/// made within `etcd`, both on PostgreSQL's clock (the service's own clock
/// never matters). `newest-wins` keeps PostgreSQL's change when it was
/// written after etcd's window, etcd's when PostgreSQL's had committed
/// before the window began, and otherwise `tie`'s side (a
/// [`Decision::Tie`]): a transaction that wrote before etcd's change and
/// committed after it cannot be ordered with it.
pub fn decide(policy: Policy, pg: PgWrite, etcd: ChangeWindow, tie: Side) -> Decision {
    let etcd_after_commit = etcd
        .after_us
        .is_some_and(|after| pg.committed_by_us <= after);
    match policy {
        Policy::EtcdWins => Decision::Keep(Side::Etcd),
        Policy::PgWins => Decision::Keep(Side::Pg),
        Policy::Manual => Decision::Park,
        Policy::NewestWins if pg.written_us > etcd.by_us => Decision::Keep(Side::Pg),
        Policy::NewestWins if etcd_after_commit => Decision::Keep(Side::Etcd),
        Policy::NewestWins => Decision::Tie(tie),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window(after: Option<i64>, by: i64) -> ChangeWindow {
        ChangeWindow {
            after_us: after,
            by_us: by,
        }
    }

    fn at(t: i64) -> PgWrite {
        PgWrite::at(t)
    }

    #[test]
    fn fixed_policies_ignore_time() {
        let w = window(Some(0), 10);
        let etcd = Decision::Keep(Side::Etcd);
        assert_eq!(decide(Policy::EtcdWins, at(100), w, Side::Pg), etcd);
        let pg = Decision::Keep(Side::Pg);
        assert_eq!(decide(Policy::PgWins, at(-100), w, Side::Etcd), pg);
        assert_eq!(decide(Policy::Manual, at(5), w, Side::Etcd), Decision::Park);
    }

    #[test]
    fn newest_wins_compares_with_the_window_and_ties_inside_it() {
        let w = window(Some(10), 20);
        let decided = |t: i64, tie: Side| decide(Policy::NewestWins, at(t), w, tie);
        assert_eq!(decided(21, Side::Etcd), Decision::Keep(Side::Pg));
        assert_eq!(decided(10, Side::Pg), Decision::Keep(Side::Etcd));
        assert_eq!(decided(11, Side::Etcd), Decision::Tie(Side::Etcd));
        assert_eq!(decided(20, Side::Pg), Decision::Tie(Side::Pg));
        // Nothing known of the start: any write up to the end is a tie.
        let open = window(None, 20);
        let early = decide(Policy::NewestWins, at(-1_000_000), open, Side::Pg);
        assert_eq!(early, Decision::Tie(Side::Pg));
        let late = decide(Policy::NewestWins, at(21), open, Side::Etcd);
        assert_eq!(late, Decision::Keep(Side::Pg));
    }

    /// A transaction that wrote before etcd's change and committed after it
    /// is not older than it.
    #[test]
    fn a_write_committed_after_etcds_change_is_not_older() {
        let w = window(Some(30), 31);
        let open_long = PgWrite {
            written_us: 0,
            committed_by_us: 60,
        };
        let decision = decide(Policy::NewestWins, open_long, w, Side::Pg);
        assert_eq!(decision, Decision::Tie(Side::Pg));
        let committed = PgWrite {
            written_us: 0,
            committed_by_us: 30,
        };
        let decision = decide(Policy::NewestWins, committed, w, Side::Pg);
        assert_eq!(decision, Decision::Keep(Side::Etcd));
    }

    proptest! {
        /// Whatever the true times of both changes inside their windows, a
        /// decision that is not a tie keeps the change that took effect
        /// later.
        #[test]
        fn newest_wins_keeps_the_later_change(
            written in -1_000i64..1_000,
            open_for in 0i64..300,
            effective in 0i64..300,
            after in proptest::option::of(-1_000i64..1_000),
            width in 1i64..500,
            at in 0i64..500,
            tie in prop_oneof![Just(Side::Etcd), Just(Side::Pg)],
        ) {
            let start = after.unwrap_or(-2_000);
            let by = start + width;
            let etcd_at = start + 1 + at % width;
            let pg = PgWrite { written_us: written, committed_by_us: written + open_for };
            let pg_at = written + effective % (open_for + 1);
            match decide(Policy::NewestWins, pg, window(after, by), tie) {
                Decision::Keep(Side::Pg) => prop_assert!(pg_at > etcd_at),
                Decision::Keep(Side::Etcd) => prop_assert!(pg_at < etcd_at),
                Decision::Tie(side) => {
                    prop_assert_eq!(side, tie);
                    prop_assert!(written <= by && after.is_none_or(|a| pg.committed_by_us > a));
                }
                Decision::Park => prop_assert!(false, "newest-wins never parks"),
            }
        }

        #[test]
        fn only_manual_parks(pg in any::<i64>(), after in any::<Option<i64>>(), by in any::<i64>()) {
            for policy in [Policy::NewestWins, Policy::EtcdWins, Policy::PgWins] {
                let decision = decide(policy, PgWrite::at(pg), window(after, by), Side::Etcd);
                prop_assert_ne!(decision, Decision::Park);
            }
        }
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {
        $(impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        })*
    };
}

display_as_str!(Side, ConflictStatus, ResolvedBy);
