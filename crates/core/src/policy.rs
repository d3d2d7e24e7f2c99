//! The conflict decision (SPEC 2): pure, so it can be tested exhaustively and
//! called inside the store's apply transaction.

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

/// Decides a conflict between a PostgreSQL change written at
/// `pg_changed_at_us` and an etcd change made within `etcd`, both on
/// PostgreSQL's clock (the service's own clock never matters).
/// `newest-wins` keeps PostgreSQL's change when it was written after the
/// window, etcd's when it was written no later than the window's start, and
/// otherwise `tie`'s side (a [`Decision::Tie`]).
pub fn decide(policy: Policy, pg_changed_at_us: i64, etcd: ChangeWindow, tie: Side) -> Decision {
    match policy {
        Policy::EtcdWins => Decision::Keep(Side::Etcd),
        Policy::PgWins => Decision::Keep(Side::Pg),
        Policy::Manual => Decision::Park,
        Policy::NewestWins if pg_changed_at_us > etcd.by_us => Decision::Keep(Side::Pg),
        Policy::NewestWins if etcd.after_us.is_some_and(|after| pg_changed_at_us <= after) => {
            Decision::Keep(Side::Etcd)
        }
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

    #[test]
    fn fixed_policies_ignore_time() {
        let w = window(Some(0), 10);
        assert_eq!(
            decide(Policy::EtcdWins, 100, w, Side::Pg),
            Decision::Keep(Side::Etcd)
        );
        assert_eq!(
            decide(Policy::PgWins, -100, w, Side::Etcd),
            Decision::Keep(Side::Pg)
        );
        assert_eq!(decide(Policy::Manual, 5, w, Side::Etcd), Decision::Park);
    }

    #[test]
    fn newest_wins_compares_with_the_window_and_ties_inside_it() {
        let w = window(Some(10), 20);
        assert_eq!(
            decide(Policy::NewestWins, 21, w, Side::Etcd),
            Decision::Keep(Side::Pg)
        );
        assert_eq!(
            decide(Policy::NewestWins, 10, w, Side::Pg),
            Decision::Keep(Side::Etcd)
        );
        assert_eq!(
            decide(Policy::NewestWins, 11, w, Side::Etcd),
            Decision::Tie(Side::Etcd)
        );
        assert_eq!(
            decide(Policy::NewestWins, 20, w, Side::Pg),
            Decision::Tie(Side::Pg)
        );
        // Nothing known of the start: any write up to the end is a tie.
        let open = window(None, 20);
        assert_eq!(
            decide(Policy::NewestWins, -1_000_000, open, Side::Pg),
            Decision::Tie(Side::Pg)
        );
        assert_eq!(
            decide(Policy::NewestWins, 21, open, Side::Etcd),
            Decision::Keep(Side::Pg)
        );
    }

    proptest! {
        /// Whatever the true time of the etcd change inside its window, a
        /// decision that is not a tie keeps the change made later.
        #[test]
        fn newest_wins_keeps_the_later_change(
            pg in -1_000i64..1_000,
            after in proptest::option::of(-1_000i64..1_000),
            width in 1i64..500,
            at in 0i64..500,
            tie in prop_oneof![Just(Side::Etcd), Just(Side::Pg)],
        ) {
            let start = after.unwrap_or(-2_000);
            let by = start + width;
            let etcd_at = start + 1 + at % width;
            let decision = decide(Policy::NewestWins, pg, window(after, by), tie);
            match decision {
                Decision::Keep(Side::Pg) => prop_assert!(pg > etcd_at),
                Decision::Keep(Side::Etcd) => prop_assert!(pg < etcd_at),
                Decision::Tie(side) => {
                    prop_assert_eq!(side, tie);
                    prop_assert!(pg <= by && after.is_none_or(|a| pg > a));
                }
                Decision::Park => prop_assert!(false, "newest-wins never parks"),
            }
        }

        #[test]
        fn only_manual_parks(pg in any::<i64>(), after in any::<Option<i64>>(), by in any::<i64>()) {
            for policy in [Policy::NewestWins, Policy::EtcdWins, Policy::PgWins] {
                prop_assert_ne!(decide(policy, pg, window(after, by), Side::Etcd), Decision::Park);
            }
        }
    }
}
