//! Errors of the etcd layer, classified twice (docs/design.md D8): retryable or
//! permanent, and connection-level or about one request.

use eps_core::Classify;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd cannot be reached (connection refused, reset, no leader).
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// A request took longer than `etcd.request_timeout_ms`; whether it took
    /// effect is unknown.
    #[error("etcd request timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The revision asked for has been compacted away.
    #[error("etcd revision compacted (compact revision {compact_revision})")]
    Compacted { compact_revision: i64 },
    /// The request exceeds etcd's request size limit.
    #[error("etcd rejected the request as too large: {0}")]
    TooLarge(String),
    /// etcd's answer exceeds `etcd.max_response_bytes`: ask for less (a
    /// smaller page).
    #[error("etcd's response is larger than etcd.max_response_bytes: {0}")]
    ResponseTooLarge(String),
    /// Authentication failed or the user lacks permission.
    #[error("etcd denied the request: {0}")]
    PermissionDenied(String),
    /// The TLS handshake failed: untrusted server certificate, client
    /// certificate missing, expired or refused.
    #[error("etcd TLS handshake failed: {0}")]
    Tls(String),
    /// Malformed request (empty key, too many ops, ...).
    #[error("etcd rejected the request: {0}")]
    Invalid(String),
    /// Anything else.
    #[error("etcd error: {message}")]
    Other { message: String, retryable: bool },
}

impl Classify for EtcdError {
    fn retryable(&self) -> bool {
        match self {
            EtcdError::Unavailable(_) | EtcdError::Timeout(_) => true,
            EtcdError::Other { retryable, .. } => *retryable,
            EtcdError::Compacted { .. }
            | EtcdError::TooLarge(_)
            | EtcdError::ResponseTooLarge(_)
            | EtcdError::PermissionDenied(_)
            | EtcdError::Tls(_)
            | EtcdError::Invalid(_) => false,
        }
    }

    fn connection_level(&self) -> bool {
        matches!(self, EtcdError::Unavailable(_) | EtcdError::Timeout(_))
    }
}

impl From<etcd_client::Error> for EtcdError {
    fn from(error: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match error {
            E::GRpcStatus(status) => from_status(&status),
            E::TransportError(e) => transport(&e),
            E::IoError(e) => EtcdError::Unavailable(e.to_string()),
            E::InvalidArgs(m) => EtcdError::Invalid(m),
            E::WatchError(m) => EtcdError::Unavailable(format!("watch: {m}")),
            E::LeaseKeepAliveError(m) => EtcdError::Unavailable(format!("lease keepalive: {m}")),
            other => EtcdError::Other {
                message: other.to_string(),
                retryable: false,
            },
        }
    }
}

/// The whole error chain as one line (tonic hides the cause).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A handshake failure names a certificate, TLS or an alert.
fn is_tls(text: &str) -> bool {
    [
        "certificate",
        "Certificate",
        "tls",
        "TLS",
        "handshake",
        "alert",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

fn transport(error: &tonic::transport::Error) -> EtcdError {
    let text = chain(error);
    if is_tls(&text) {
        EtcdError::Tls(text)
    } else {
        EtcdError::Unavailable(text)
    }
}

fn from_status(status: &tonic::Status) -> EtcdError {
    use tonic_code::*;
    let message = match std::error::Error::source(status) {
        Some(cause) => format!("{}: {}", status.message(), chain(cause)),
        None => status.message().to_owned(),
    };
    if is_tls(&message) && !message.contains("etcdserver") {
        return EtcdError::Tls(message);
    }
    // tonic refusing to decode a message over the client's limit.
    if message.contains("decoded message length too large") {
        return EtcdError::ResponseTooLarge(message);
    }
    match i32::from(status.code()) {
        UNAVAILABLE | CANCELLED => EtcdError::Unavailable(message),
        DEADLINE_EXCEEDED => EtcdError::Other {
            message,
            retryable: true,
        },
        OUT_OF_RANGE if message.contains("compacted") => EtcdError::Compacted {
            compact_revision: 0,
        },
        PERMISSION_DENIED | UNAUTHENTICATED => EtcdError::PermissionDenied(message),
        INVALID_ARGUMENT if message.contains("too large") => EtcdError::TooLarge(message),
        INVALID_ARGUMENT | FAILED_PRECONDITION | OUT_OF_RANGE | NOT_FOUND => {
            EtcdError::Invalid(message)
        }
        RESOURCE_EXHAUSTED if message.contains("too large") => EtcdError::TooLarge(message),
        // "leader changed", "too many requests", internal hiccups: try again.
        RESOURCE_EXHAUSTED | ABORTED | UNKNOWN | INTERNAL => EtcdError::Other {
            message,
            retryable: true,
        },
        _ => EtcdError::Other {
            message,
            retryable: false,
        },
    }
}

/// gRPC status codes by number, so they can be matched as patterns.
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}
