//! The conflict decision (SPEC 2): pure, so it can be tested exhaustively and
//! called inside the store's apply transaction.

use crate::mapping::Policy;

/// Which side a resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Leave both stores as they are until an operator decides (`manual`).
    Park,
}

/// Decides a conflict. Times are microseconds on PostgreSQL's clock: the
/// local change's write time and the time the etcd change was observed, so
/// the service's own clock never matters. Ties go to etcd.
pub fn decide(policy: Policy, pg_changed_at_us: i64, etcd_observed_at_us: i64) -> Decision {
    match policy {
        Policy::EtcdWins => Decision::Keep(Side::Etcd),
        Policy::PgWins => Decision::Keep(Side::Pg),
        Policy::Manual => Decision::Park,
        Policy::NewestWins if pg_changed_at_us > etcd_observed_at_us => Decision::Keep(Side::Pg),
        Policy::NewestWins => Decision::Keep(Side::Etcd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_policies_ignore_time() {
        assert_eq!(decide(Policy::EtcdWins, 10, 0), Decision::Keep(Side::Etcd));
        assert_eq!(decide(Policy::PgWins, 0, 10), Decision::Keep(Side::Pg));
        assert_eq!(decide(Policy::Manual, 0, 10), Decision::Park);
    }

    #[test]
    fn newest_wins_ties_go_to_etcd() {
        assert_eq!(decide(Policy::NewestWins, 5, 5), Decision::Keep(Side::Etcd));
        assert_eq!(decide(Policy::NewestWins, 6, 5), Decision::Keep(Side::Pg));
        assert_eq!(decide(Policy::NewestWins, 4, 5), Decision::Keep(Side::Etcd));
    }

    proptest! {
        #[test]
        fn newest_wins_keeps_the_later_change(pg in any::<i64>(), etcd in any::<i64>()) {
            let expected = if pg > etcd { Side::Pg } else { Side::Etcd };
            prop_assert_eq!(decide(Policy::NewestWins, pg, etcd), Decision::Keep(expected));
        }

        #[test]
        fn only_manual_parks(pg in any::<i64>(), etcd in any::<i64>()) {
            for policy in [Policy::NewestWins, Policy::EtcdWins, Policy::PgWins] {
                prop_assert_ne!(decide(policy, pg, etcd), Decision::Park);
            }
        }
    }
}
