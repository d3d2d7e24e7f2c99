//! A watch over a key range from a revision, with previous values, as a
//! sequence of [`WatchItem`]s.

use eps_core::model::EtcdEvent;
use etcd_client::WatchOptions;

use crate::error::EtcdError;
use crate::{EtcdClient, convert};

#[derive(Debug)]
pub enum WatchItem {
    /// Events of whole revisions, in order. etcd fragments its responses
    /// (at `--max-request-bytes`, asked for so that a catch-up over many
    /// revisions of large values stays in small messages); the fragments
    /// are put back together at revision boundaries.
    Events(Vec<EtcdEvent>),
    /// Progress notification: every event of the range up to this revision
    /// has been delivered.
    Progress(i64),
    /// The answer to a progress request from an etcd that sends it ahead
    /// of events not yet delivered (see
    /// [`crate::orders_progress_requests`]): the stream is alive, and
    /// nothing is known of its progress.
    Alive,
    /// The start revision is compacted: never re-watch from it, re-snapshot.
    Compacted { compact_revision: i64 },
}

pub struct WatchSession {
    requests: etcd_client::WatchRequestSender,
    responses: Responses,
}

/// The response stream, with the events of a revision whose fragments have
/// not all arrived yet.
struct Responses {
    stream: etcd_client::WatchResponseStream,
    held: Vec<EtcdEvent>,
    /// Whether etcd's answers to progress requests are in order with the
    /// events (its own periodic notifications always are).
    requested_progress_ordered: bool,
}

impl WatchSession {
    /// Watches `[start, end)` (`end == None`: to the end of the keyspace)
    /// from `from_revision`, with `prev_kv`. Asks etcd's members first
    /// whether their answers to progress requests can be trusted.
    pub async fn start(
        client: &EtcdClient,
        start: &[u8],
        end: Option<&[u8]>,
        from_revision: i64,
    ) -> Result<Self, EtcdError> {
        let requested_progress_ordered = client.progress_requests_ordered().await;
        let options = WatchOptions::new()
            .with_range(eps_core::keys::range_end_for_etcd(end))
            .with_start_revision(from_revision)
            .with_prev_key()
            .with_progress_notify()
            .with_fragment();
        let mut watch_client = client
            .raw()
            .watch_client()
            .max_decoding_message_size(client.max_response_bytes());
        let stream = tokio::time::timeout(
            client.request_timeout(),
            watch_client.watch(crate::range_start(start), Some(options)),
        )
        .await
        .map_err(|_| EtcdError::Timeout(client.request_timeout()))??;
        let (requests, responses) = stream.split();
        Ok(Self {
            requests,
            responses: Responses {
                stream: responses,
                held: Vec::new(),
                requested_progress_ordered,
            },
        })
    }

    /// Splits the session: items to read (e.g. in a reader task) and a handle
    /// to ask for progress notifications.
    pub fn split(self) -> (ProgressRequester, WatchItems) {
        (
            ProgressRequester {
                requests: self.requests,
            },
            WatchItems {
                responses: self.responses,
            },
        )
    }

    /// The next item; `Ok(None)` when the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchItem>, EtcdError> {
        next_item(&mut self.responses).await
    }

    /// Asks etcd for a progress notification (answered only once the watch
    /// has caught up; by an etcd that answers out of order, with
    /// [`WatchItem::Alive`]).
    pub async fn request_progress(&mut self) -> Result<(), EtcdError> {
        self.requests.request_progress().await?;
        Ok(())
    }
}

/// The reading half of a [`WatchSession`].
pub struct WatchItems {
    responses: Responses,
}

impl WatchItems {
    /// The next item; `Ok(None)` when the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchItem>, EtcdError> {
        next_item(&mut self.responses).await
    }
}

/// The requesting half of a [`WatchSession`].
pub struct ProgressRequester {
    requests: etcd_client::WatchRequestSender,
}

impl ProgressRequester {
    /// Asks etcd for a progress notification.
    pub async fn request_progress(&mut self) -> Result<(), EtcdError> {
        self.requests.request_progress().await?;
        Ok(())
    }
}

async fn next_item(responses: &mut Responses) -> Result<Option<WatchItem>, EtcdError> {
    loop {
        let Some(response) = responses.stream.message().await? else {
            return Ok(None);
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                return Ok(Some(WatchItem::Compacted {
                    compact_revision: response.compact_revision(),
                }));
            }
            return Err(EtcdError::Unavailable(format!(
                "watch canceled by etcd: {}",
                response.cancel_reason()
            )));
        }
        if response.compact_revision() > 0 {
            return Ok(Some(WatchItem::Compacted {
                compact_revision: response.compact_revision(),
            }));
        }
        if response.events().is_empty() {
            if response.created() {
                continue;
            }
            // An answer to a progress request carries no watch id (-1);
            // etcd's periodic notifications carry the watch's own.
            if response.watch_id() == -1 && !responses.requested_progress_ordered {
                return Ok(Some(WatchItem::Alive));
            }
            let revision = response.header().map_or(0, |h| h.revision());
            return Ok(Some(WatchItem::Progress(revision)));
        }
        let mut events = std::mem::take(&mut responses.held);
        events.extend(response.events().iter().filter_map(convert::event));
        if response.0.fragment {
            // More of this response follows: its last revision may go on
            // in the next fragment, so it waits for it.
            let last = events.last().map_or(0, |e| e.revision);
            let split = events.partition_point(|e| e.revision < last);
            responses.held = events.split_off(split);
            if events.is_empty() {
                continue;
            }
        }
        return Ok(Some(WatchItem::Events(events)));
    }
}
