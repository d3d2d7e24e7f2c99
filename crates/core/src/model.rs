//! The vocabulary shared by the etcd adapter, the store and the actors:
//! changes, key states and pending PostgreSQL changes. No I/O types.

use std::fmt;

/// A change's kind, as etcd and the `op` columns name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "put" => Some(Op::Put),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// etcd's revision metadata of a live key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyMeta {
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// A live key in etcd: value and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub meta: KeyMeta,
}

/// One change seen on the etcd watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEvent {
    pub op: Op,
    pub key: Vec<u8>,
    /// The revision of the change (the mod revision of a put, the revision
    /// of the deletion for a delete).
    pub revision: i64,
    /// The new value; empty for deletes.
    pub value: Vec<u8>,
    /// Metadata after a put; zeroes for deletes.
    pub meta: KeyMeta,
    /// The key just before the change, when it existed (etcd's `prev_kv`).
    pub prev: Option<PrevKv>,
}

impl EtcdEvent {
    /// The mod revision the key had before this change; 0 if it did not exist.
    pub fn prev_revision(&self) -> i64 {
        self.prev.as_ref().map_or(0, |p| p.mod_revision)
    }

    /// Approximate bytes held by this event (for memory-bounded batching).
    pub fn size_bytes(&self) -> usize {
        self.key.len() + self.value.len() + self.prev.as_ref().map_or(0, |p| p.value.len()) + 64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevKv {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A change written in PostgreSQL and not yet in etcd (an outbox row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    pub id: i64,
    pub op: Op,
    /// The new value; `None` for deletes.
    pub value: Option<Vec<u8>>,
    /// The etcd mod revision the row had when it was written (0 = the key did
    /// not exist): the compare of the etcd txn that applies it.
    pub base_revision: i64,
    /// When the change was written, microseconds on PostgreSQL's clock.
    pub changed_at_us: i64,
    /// When its transaction committed, at the latest (the change took
    /// effect between the two).
    pub committed_by_us: i64,
    /// Set while the change is parked behind a pending `manual` conflict.
    pub conflict_id: Option<i64>,
    /// The poller may have sent it to etcd (marked before the txn). A
    /// change never sent cannot have landed, whatever etcd holds.
    pub sent: bool,
    /// The PostgreSQL transaction that wrote it (`None`: not recorded).
    pub xact: Option<i64>,
    /// Dropped with its transaction, another change of which lost a
    /// conflict: it never goes to etcd, and the mirror row is put back.
    pub dropped: bool,
}

/// Where a history row or mirror row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A change made in etcd, seen on the watch.
    Etcd,
    /// A change made in PostgreSQL, propagated to etcd and seen back.
    Pg,
    /// Read by the initial snapshot.
    Snapshot,
    /// Read by a resync after compaction (the revisions in between are
    /// unknown) or by an operator's repair.
    Resync,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Etcd => "etcd",
            Origin::Pg => "pg",
            Origin::Snapshot => "snapshot",
            Origin::Resync => "resync",
        }
    }

    pub fn parse(s: &str) -> Option<Origin> {
        match s {
            "etcd" => Some(Origin::Etcd),
            "pg" => Some(Origin::Pg),
            "snapshot" => Some(Origin::Snapshot),
            "resync" => Some(Origin::Resync),
            _ => None,
        }
    }

    /// The `origin` column of a mirror row only says which store wrote last.
    pub fn row_origin(self) -> &'static str {
        match self {
            Origin::Pg => "pg",
            Origin::Etcd | Origin::Snapshot | Origin::Resync => "etcd",
        }
    }
}

/// Why a change cannot go to etcd (the `kind` column of `dead_letters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterKind {
    TooLarge,
    Unmapped,
    ReadOnlyMapping,
    Invalid,
    /// etcd refused it for good (permission denied, an invalid request).
    Refused,
    RetriesExhausted,
    /// `restore-etcd --at-revision --set-aside-queued` restored an older
    /// state than the one the change was written on.
    SetAsideByRestore,
}

impl DeadLetterKind {
    pub const ALL: [DeadLetterKind; 7] = [
        DeadLetterKind::TooLarge,
        DeadLetterKind::Unmapped,
        DeadLetterKind::ReadOnlyMapping,
        DeadLetterKind::Invalid,
        DeadLetterKind::Refused,
        DeadLetterKind::RetriesExhausted,
        DeadLetterKind::SetAsideByRestore,
    ];

    pub fn parse(s: &str) -> Option<DeadLetterKind> {
        DeadLetterKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::TooLarge => "too-large",
            DeadLetterKind::Unmapped => "unmapped",
            DeadLetterKind::ReadOnlyMapping => "read-only-mapping",
            DeadLetterKind::Invalid => "invalid",
            DeadLetterKind::Refused => "refused",
            DeadLetterKind::RetriesExhausted => "retries-exhausted",
            DeadLetterKind::SetAsideByRestore => "set-aside-by-restore",
        }
    }
}

impl fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
