//! The kinds of audit events (`sync_events.kind`): one enum, so an event
//! kind is spelled once and README's list can be checked against it.

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// An apply transaction of etcd changes: revision range, counts, duration.
    BatchApplied,
    /// A conflict detected (and how the policy settled it).
    Conflict,
    /// A conflict resolved by an operator (or skipped, and why).
    Resolution,
    /// A change moved to the dead-letter list.
    DeadLetter,
    /// A change whose retries ran out.
    RetryExhausted,
    /// A PostgreSQL transaction that reached etcd in more than one txn.
    TransactionSplit,
    /// A PostgreSQL transaction settled whole by a conflict on one of its
    /// keys: its changes of other keys dropped or parked with it.
    TransactionSettled,
    /// Elected, resigned or stepped down; node and term.
    Leadership,
    /// The initial snapshot.
    Snapshot,
    /// A resync after the watch's revision was compacted.
    CompactionRecovery,
    /// etcd restored from a backup or replaced: a new timeline followed.
    TimelineChange,
    /// The same, held for an operator (`sync.on_etcd_restore = "pause"`).
    TimelinePaused,
    /// A held timeline released: etcd is the one the mirror follows again.
    TimelineReleased,
    /// The resync onto a new timeline finished: counts.
    TimelineResync,
    /// Mirror tables created while a checkpoint existed, filled from etcd.
    MirrorTablesFilled,
    /// Mirror table triggers found missing or disabled and restored by
    /// `migrate` (recorded by the migration's SQL).
    TriggersRestored,
    /// A user's transaction held a mirror row longer than the alert time.
    KeyBlocked,
    /// A comparison of etcd and PostgreSQL (`verify`, anti-entropy).
    Verify,
    /// etcd rebuilt from the mirror.
    RestoreEtcd,
    /// A key range put back to its state at an earlier revision.
    Rollback,
    /// Old audit events, history rows and clock samples deleted.
    Retention,
}

impl AuditKind {
    /// Every kind, in README's order.
    pub const ALL: [AuditKind; 21] = [
        AuditKind::BatchApplied,
        AuditKind::Conflict,
        AuditKind::Resolution,
        AuditKind::DeadLetter,
        AuditKind::RetryExhausted,
        AuditKind::TransactionSplit,
        AuditKind::TransactionSettled,
        AuditKind::Leadership,
        AuditKind::Snapshot,
        AuditKind::CompactionRecovery,
        AuditKind::TimelineChange,
        AuditKind::TimelinePaused,
        AuditKind::TimelineReleased,
        AuditKind::TimelineResync,
        AuditKind::MirrorTablesFilled,
        AuditKind::TriggersRestored,
        AuditKind::KeyBlocked,
        AuditKind::Verify,
        AuditKind::RestoreEtcd,
        AuditKind::Rollback,
        AuditKind::Retention,
    ];

    /// The `sync_events.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::BatchApplied => "batch-applied",
            AuditKind::Conflict => "conflict",
            AuditKind::Resolution => "resolution",
            AuditKind::DeadLetter => "dead-letter",
            AuditKind::RetryExhausted => "retry-exhausted",
            AuditKind::TransactionSplit => "transaction-split",
            AuditKind::TransactionSettled => "transaction-settled",
            AuditKind::Leadership => "leadership",
            AuditKind::Snapshot => "snapshot",
            AuditKind::CompactionRecovery => "compaction-recovery",
            AuditKind::TimelineChange => "timeline-change",
            AuditKind::TimelinePaused => "timeline-paused",
            AuditKind::TimelineReleased => "timeline-released",
            AuditKind::TimelineResync => "timeline-resync",
            AuditKind::MirrorTablesFilled => "mirror-tables-filled",
            AuditKind::TriggersRestored => "triggers-restored",
            AuditKind::KeyBlocked => "key-blocked",
            AuditKind::Verify => "verify",
            AuditKind::RestoreEtcd => "restore-etcd",
            AuditKind::Rollback => "rollback",
            AuditKind::Retention => "retention",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README's audit table names every kind, in this order, and no other.
    #[test]
    fn readme_lists_exactly_the_audit_kinds() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("| kind | records |")
            .expect("README has the audit table");
        let listed: Vec<&str> = readme[start..]
            .lines()
            .skip(2)
            .map_while(|line| line.trim().strip_prefix("| `"))
            .filter_map(|row| row.split('`').next())
            .collect();
        let kinds: Vec<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(listed, kinds);
    }
}
