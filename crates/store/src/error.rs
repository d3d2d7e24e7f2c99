//! Errors of the PostgreSQL layer, classified for the retry machinery.

use eps_core::Classify;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// This replica's term is no longer the stored one: another leader took
    /// over. Nothing of the transaction was written.
    #[error("fenced: term {term} is no longer current")]
    Fenced { term: i64 },
    /// No connection could be had (server down, network, pool timeout).
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// A statement failed.
    #[error("postgres error: {message}")]
    Query { message: String, retryable: bool },
    /// PostgreSQL refused the credentials (password, certificate, role,
    /// database): fixing needs an operator.
    #[error("postgres refused the connection: {0}")]
    Auth(String),
    /// The TLS handshake failed (untrusted or expired certificate, none
    /// presented, server without TLS).
    #[error("postgres TLS handshake failed: {0}")]
    Tls(String),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(String),
    /// Bad input from the caller or data that cannot be stored.
    #[error("{0}")]
    Invalid(String),
    /// A row this operation needs is held by another transaction (a user's,
    /// left open): it did not wait; try again later.
    #[error("a row is held by another transaction: {0}")]
    RowHeld(String),
}

impl Classify for StoreError {
    fn retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::RowHeld(_) => true,
            StoreError::Query { retryable, .. } => *retryable,
            StoreError::Fenced { .. }
            | StoreError::Auth(_)
            | StoreError::Tls(_)
            | StoreError::Migration(_)
            | StoreError::Invalid(_) => false,
        }
    }

    fn connection_level(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<diesel::result::Error> for StoreError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match &error {
            Error::DatabaseError(Kind::UnableToSendCommand | Kind::ClosedConnection, info) => {
                StoreError::Unavailable(info.message().to_owned())
            }
            Error::DatabaseError(Kind::SerializationFailure, info) => StoreError::Query {
                message: info.message().to_owned(),
                retryable: true,
            },
            Error::DatabaseError(_, info)
                if info.message().contains("could not obtain lock on row") =>
            {
                StoreError::RowHeld(info.message().to_owned())
            }
            Error::DatabaseError(_, info) => {
                let message = info.message().to_owned();
                // diesel folds these SQLSTATEs into `Unknown`; their texts are
                // stable across PostgreSQL versions.
                let transient = [
                    "deadlock detected",
                    "could not serialize",
                    "terminating connection",
                    "the database system is",
                    "canceling statement due to",
                    "connection to server",
                    "lock timeout",
                    "idle-in-transaction timeout",
                ]
                .iter()
                .any(|needle| message.contains(needle));
                if transient && message.contains("terminating connection") {
                    return StoreError::Unavailable(message);
                }
                StoreError::Query {
                    message,
                    retryable: transient,
                }
            }
            _ => StoreError::Query {
                message: error.to_string(),
                retryable: false,
            },
        }
    }
}

impl From<bb8::RunError<diesel_async::pooled_connection::PoolError>> for StoreError {
    fn from(error: bb8::RunError<diesel_async::pooled_connection::PoolError>) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}
