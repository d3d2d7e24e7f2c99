//! etcd-client types to the shared model.

use eps_core::model::{EtcdEvent, KeyMeta, KeyValue, Op, PrevKv};

pub fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        meta: meta(kv),
    }
}

pub fn meta(kv: &etcd_client::KeyValue) -> KeyMeta {
    KeyMeta {
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

/// A watch event; `None` for an event without a key-value (never sent by a
/// well-behaved server).
pub fn event(event: &etcd_client::Event) -> Option<EtcdEvent> {
    let kv = event.kv()?;
    let prev = event.prev_kv().map(|p| PrevKv {
        value: p.value().to_vec(),
        mod_revision: p.mod_revision(),
    });
    Some(match event.event_type() {
        etcd_client::EventType::Put => EtcdEvent {
            op: Op::Put,
            key: kv.key().to_vec(),
            revision: kv.mod_revision(),
            value: kv.value().to_vec(),
            meta: meta(kv),
            prev,
        },
        etcd_client::EventType::Delete => EtcdEvent {
            op: Op::Delete,
            key: kv.key().to_vec(),
            revision: kv.mod_revision(),
            value: Vec::new(),
            meta: KeyMeta::default(),
            prev,
        },
    })
}
