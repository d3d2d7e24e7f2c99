//! Trace ids of the current OpenTelemetry spans, for `history.trace_id` and
//! `sync_events.trace_id`, and the trace contexts that let the watcher's
//! recognition of an echo join the trace of the poller's etcd txn (one trace
//! per change across both stores).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace id of `span` (32 hex digits), when traces are exported.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    span_context(span).map(|c| c.trace_id().to_string())
}

/// The span context of `span`, when traces are exported.
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Per key, the spans of the poller's txns whose echoes the watcher has
/// not seen yet, oldest first. Registered *before* the txn is sent: the
/// echo can reach the watcher before the txn's response reaches the poller.
#[derive(Debug, Default)]
pub struct EchoTraces {
    inner: Mutex<HashMap<Vec<u8>, TxnSpans>>,
    next_txn: AtomicU64,
}

/// Txn id and span of the txns that wrote one key, oldest first.
type TxnSpans = VecDeque<(u64, SpanContext)>;

/// Most txns remembered per key (a key whose echoes never come back, e.g.
/// lost to a compaction, must not grow without bound).
const PER_KEY: usize = 16;

/// Most keys remembered: past it, the keys written longest ago are
/// forgotten (their echoes, if they ever come, start traces of their own).
const MAX_KEYS: usize = 65_536;

impl EchoTraces {
    /// Remembers `context` for the echoes of `keys`; returns a txn id.
    pub fn register<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a [u8]>,
        context: SpanContext,
    ) -> u64 {
        let txn = self.next_txn.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            let queue = inner.entry(key.to_vec()).or_default();
            queue.push_back((txn, context.clone()));
            while queue.len() > PER_KEY {
                queue.pop_front();
            }
        }
        if inner.len() > MAX_KEYS {
            forget_oldest(&mut inner, MAX_KEYS / 2);
        }
        txn
    }

    /// Forgets a txn that did not apply.
    pub fn unregister<'a>(&self, txn: u64, keys: impl IntoIterator<Item = &'a [u8]>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some(queue) = inner.get_mut(key) {
                queue.retain(|(id, _)| *id != txn);
                if queue.is_empty() {
                    inner.remove(key);
                }
            }
        }
    }

    /// The trace ids the next echoes of these keys belong to.
    pub fn trace_ids<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> HashMap<Vec<u8>, String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        keys.into_iter()
            .filter_map(|key| {
                let (_, context) = inner.get(key)?.front()?;
                Some((key.to_vec(), context.trace_id().to_string()))
            })
            .collect()
    }

    /// Keys remembered (for tests and the memory bound).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The span of the txn an echo of `key` came from, forgotten.
    pub fn consume(&self, key: &[u8]) -> Option<SpanContext> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let queue = inner.get_mut(key)?;
        let (_, context) = queue.pop_front()?;
        if queue.is_empty() {
            inner.remove(key);
        }
        Some(context)
    }
}

/// Keeps the `keep` keys written most recently.
fn forget_oldest(inner: &mut HashMap<Vec<u8>, TxnSpans>, keep: usize) {
    let mut newest: Vec<u64> = inner
        .values()
        .filter_map(|queue| queue.back().map(|(txn, _)| *txn))
        .collect();
    newest.sort_unstable_by(|a, b| b.cmp(a));
    let Some(&cutoff) = newest.get(keep) else {
        return;
    };
    inner.retain(|_, queue| queue.back().is_some_and(|(txn, _)| *txn > cutoff));
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn keys_whose_echoes_never_come_are_forgotten_past_a_bound() {
        let traces = EchoTraces::default();
        let context = SpanContext::new(
            TraceId::from_bytes([1; 16]),
            SpanId::from_bytes([1; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        for i in 0..(MAX_KEYS as u64 + 10) {
            let key = i.to_be_bytes();
            traces.register([key.as_slice()], context.clone());
        }
        assert!(traces.len() <= MAX_KEYS, "{} keys remembered", traces.len());
        let newest = (MAX_KEYS as u64 + 9).to_be_bytes();
        assert!(traces.consume(&newest).is_some(), "the newest key is kept");
    }
}
