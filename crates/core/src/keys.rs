//! etcd key-range arithmetic (byte order, like etcd and PostgreSQL `bytea`).

/// About how many bytes one compare-and-put of a key and value adds to an
/// etcd txn request (the key twice, the value, framing).
pub fn put_request_bytes(key_len: usize, value_len: usize) -> usize {
    2 * key_len + value_len + 64
}

/// The exclusive end of the range of keys starting with `prefix`, as etcd
/// computes it: the prefix with its last byte below 0xff incremented. `None`
/// means "no upper bound" (empty prefix or a prefix of only 0xff bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The etcd wire form of a range end: "\0" means "to the end of the keyspace".
pub fn range_end_for_etcd(end: Option<&[u8]>) -> Vec<u8> {
    match end {
        Some(end) => end.to_vec(),
        None => vec![0],
    }
}

/// The smallest key greater than `key` (for paging: start after the last key).
pub fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// True when `key` lies in `[start, end)`, `end == None` meaning unbounded.
pub fn in_range(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    key >= start && end.is_none_or(|end| key < end)
}

/// Renders a key for humans and logs: UTF-8 text as is, other bytes escaped.
pub fn display_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_end_examples() {
        assert_eq!(prefix_end(b"/app/"), Some(b"/app0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    proptest! {
        #[test]
        fn prefix_end_bounds_exactly_the_prefixed_keys(prefix in proptest::collection::vec(any::<u8>(), 0..4),
                                                        key in proptest::collection::vec(any::<u8>(), 0..6)) {
            let end = prefix_end(&prefix);
            let inside = in_range(&key, &prefix, end.as_deref());
            prop_assert_eq!(inside, key.starts_with(&prefix));
        }

        #[test]
        fn successor_is_the_next_key(key in proptest::collection::vec(any::<u8>(), 0..6),
                                     other in proptest::collection::vec(any::<u8>(), 0..6)) {
            let next = successor(&key);
            prop_assert!(next > key);
            // nothing lies strictly between key and its successor
            prop_assert!(!(other > key && other < next));
        }
    }
}
