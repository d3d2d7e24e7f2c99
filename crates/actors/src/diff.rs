//! Walks etcd (at one revision) and a mirror table side by side in key
//! order, page by page, yielding the keys where they differ. Used by the
//! resync (snapshot, compaction recovery), `verify` and anti-entropy.
//! Memory is bounded by one page of each side.

use std::collections::VecDeque;

use eps_core::mapping::Mapping;
use eps_core::model::KeyValue;
use eps_etcd::{EtcdClient, EtcdError};
use eps_store::mirror::{MirrorRow, PageRequest};
use eps_store::{Store, StoreError};

/// Target bytes per page (values can be 1.5 MiB each).
pub const PAGE_BYTES: usize = 8 * 1024 * 1024;

/// One key where etcd (at the walk's revision) and the mirror differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: Vec<u8>,
    pub etcd: Option<KeyValue>,
    pub pg: Option<MirrorRow>,
}

/// How etcd and the mirror differ on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DifferenceKind {
    MissingInPg,
    MissingInEtcd,
    DifferentValue,
}

impl DifferenceKind {
    /// As `verify` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DifferenceKind::MissingInPg => "missing-in-pg",
            DifferenceKind::MissingInEtcd => "missing-in-etcd",
            DifferenceKind::DifferentValue => "different-value",
        }
    }
}

impl std::fmt::Display for DifferenceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Difference {
    pub fn kind(&self) -> DifferenceKind {
        match (&self.etcd, &self.pg) {
            (Some(_), None) => DifferenceKind::MissingInPg,
            (None, Some(_)) => DifferenceKind::MissingInEtcd,
            _ => DifferenceKind::DifferentValue,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<DiffError> for crate::shell::ActorError {
    fn from(error: DiffError) -> Self {
        match error {
            DiffError::Etcd(e) => e.into(),
            DiffError::Store(e) => e.into(),
        }
    }
}

/// Page size that keeps a page near [`PAGE_BYTES`] given the average entry
/// size seen so far.
fn adaptive_limit(max: usize, avg_bytes: usize) -> usize {
    (PAGE_BYTES / avg_bytes.max(1)).clamp(1, max)
}

/// The entry size assumed before any is seen: the first page asks for 16
/// keys, so a keyspace of large values does not start with a huge message.
const FIRST_GUESS_BYTES: usize = PAGE_BYTES / 16;

pub struct DiffCursor<'a> {
    etcd: &'a EtcdClient,
    store: &'a Store,
    mapping: &'a Mapping,
    revision: i64,
    page_size: usize,
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    etcd_buf: VecDeque<KeyValue>,
    etcd_next: Option<Vec<u8>>,
    pg_buf: VecDeque<MirrorRow>,
    pg_after: Option<Vec<u8>>,
    pg_done: bool,
    avg_bytes: usize,
    /// Keys seen in etcd so far.
    pub etcd_keys: u64,
    /// Rows seen in the mirror so far.
    pub pg_rows: u64,
    /// Ticked at every page read: a walk over keys that all match finds
    /// no difference for long, yet moves.
    progress: Option<std::sync::Arc<crate::shell::Progress>>,
}

impl<'a> DiffCursor<'a> {
    /// Walks `mapping` (optionally only keys under `within`) at `revision`.
    pub fn new(
        etcd: &'a EtcdClient,
        store: &'a Store,
        mapping: &'a Mapping,
        revision: i64,
        page_size: usize,
        within: Option<&[u8]>,
    ) -> Self {
        let (start, end) = mapping.range_within(within);
        DiffCursor {
            etcd,
            store,
            mapping,
            revision,
            page_size,
            etcd_next: Some(start.clone()),
            start,
            end,
            etcd_buf: VecDeque::new(),
            pg_buf: VecDeque::new(),
            pg_after: None,
            pg_done: false,
            avg_bytes: FIRST_GUESS_BYTES,
            etcd_keys: 0,
            pg_rows: 0,
            progress: None,
        }
    }

    /// Reports each page read to `progress`.
    pub fn with_progress(mut self, progress: std::sync::Arc<crate::shell::Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    fn tick(&self) {
        if let Some(progress) = &self.progress {
            progress.tick();
        }
    }

    /// The next difference, or `None` when both sides are exhausted.
    pub async fn next(&mut self) -> Result<Option<Difference>, DiffError> {
        loop {
            self.refill().await?;
            let (etcd_key, pg_key) = (
                self.etcd_buf.front().map(|kv| &kv.key),
                self.pg_buf.front().map(|r| &r.key),
            );
            let order = match (etcd_key, pg_key) {
                (None, None) => return Ok(None),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => a.cmp(b),
            };
            match order {
                std::cmp::Ordering::Less => {
                    let kv = self.etcd_buf.pop_front().expect("front checked");
                    return Ok(Some(Difference {
                        key: kv.key.clone(),
                        etcd: Some(kv),
                        pg: None,
                    }));
                }
                std::cmp::Ordering::Greater => {
                    let row = self.pg_buf.pop_front().expect("front checked");
                    return Ok(Some(Difference {
                        key: row.key.clone(),
                        etcd: None,
                        pg: Some(row),
                    }));
                }
                std::cmp::Ordering::Equal => {
                    let kv = self.etcd_buf.pop_front().expect("front checked");
                    let row = self.pg_buf.pop_front().expect("front checked");
                    if kv.meta.mod_revision != row.mod_revision || kv.value != row.value {
                        return Ok(Some(Difference {
                            key: kv.key.clone(),
                            etcd: Some(kv),
                            pg: Some(row),
                        }));
                    }
                }
            }
        }
    }

    async fn refill(&mut self) -> Result<(), DiffError> {
        // Until there is a key or etcd's range is exhausted (a page may hold
        // only the service's own keys, filtered out).
        while self.etcd_buf.is_empty() {
            let Some(from) = self.etcd_next.take() else {
                break;
            };
            let mut limit = adaptive_limit(self.page_size, self.avg_bytes);
            let page = loop {
                match self
                    .etcd
                    .range_page(&from, self.end.as_deref(), self.revision, limit)
                    .await
                {
                    // Larger than the client accepts: fewer keys per page.
                    Err(EtcdError::ResponseTooLarge(_)) if limit > 1 => limit /= 2,
                    other => break other?,
                }
            };
            if let Some(last) = page.kvs.last() {
                if page.more {
                    self.etcd_next = Some(eps_core::keys::successor(&last.key));
                }
                let bytes: usize = page
                    .kvs
                    .iter()
                    .map(|kv| kv.key.len() + kv.value.len())
                    .sum();
                self.avg_bytes = (bytes / page.kvs.len()).max(1);
            }
            self.etcd_keys += page.kvs.len() as u64;
            self.tick();
            let mapping = self.mapping;
            self.etcd_buf
                .extend(page.kvs.into_iter().filter(|kv| mapping.contains(&kv.key)));
        }
        if self.pg_buf.is_empty() && !self.pg_done {
            let page = self
                .store
                .mirror_page(
                    &self.mapping.table,
                    PageRequest {
                        start: &self.start,
                        end: self.end.as_deref(),
                        after: self.pg_after.as_deref(),
                        rows: self.page_size,
                        bytes: PAGE_BYTES,
                    },
                )
                .await?;
            self.pg_done = !page.more;
            self.pg_after = page.rows.last().map(|r| r.key.clone());
            self.pg_rows += page.rows.len() as u64;
            self.tick();
            self.pg_buf.extend(page.rows);
        }
        Ok(())
    }
}
