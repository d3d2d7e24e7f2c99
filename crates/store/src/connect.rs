//! Connections: one pool (bb8 + diesel-async) whose every connection runs
//! with `search_path` set to the service's schema.

use std::sync::Arc;
use std::time::Duration;

use diesel::ConnectionError;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use eps_core::config::PostgresConfig;
use eps_core::ident::Ident;
use futures_util::FutureExt;

use crate::error::StoreError;

pub type Pool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// A connection checked out of [`Pool`].
pub type PooledConnection<'a> =
    bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

/// How to open one connection: URL, password and TLS settings resolved
/// once, used by the pool and by dedicated connections (LISTEN, migrations).
#[derive(Clone)]
pub struct Connector {
    config: Arc<tokio_postgres::Config>,
    schema: Ident,
    session: SessionLimits,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Limits every service session runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// A transaction left open this long is aborted by PostgreSQL: a frozen
    /// leader (SIGSTOP, VM pause) must not hold the `sync_state` row lock —
    /// and with it the next leader's term claim — beyond its lease.
    pub idle_in_transaction: Duration,
    /// A statement waiting this long for a lock fails (and is retried)
    /// instead of hanging behind a user's long transaction.
    pub lock_wait: Duration,
}

impl SessionLimits {
    /// Half the lease TTL (at least 1 s): a frozen leader's transaction is
    /// gone before its lease expires and a successor is elected.
    pub fn for_lease_ttl(lease_ttl: Duration) -> Self {
        SessionLimits {
            idle_in_transaction: (lease_ttl / 2).max(Duration::from_secs(1)),
            lock_wait: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub fn new(settings: &PostgresConfig, session: SessionLimits) -> Result<Self, StoreError> {
        let schema = Ident::parse(&settings.schema)
            .map_err(|e| StoreError::Invalid(format!("postgres.schema: {e}")))?;
        let mut config: tokio_postgres::Config = settings
            .url
            .expose()
            .parse()
            .map_err(|e| StoreError::Invalid(format!("postgres.url: {e}")))?;
        if let Some(password) = &settings.password {
            config.password(password.expose());
        }
        config.application_name("etcd-pg-sync");
        config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms));
        let tls = crate::tls::make_tls(&settings.tls)?;
        // The mode's verification lives in the rustls verifier; to the
        // connection library, TLS is simply required or off (never
        // `prefer`, which would fall back to plaintext).
        config.ssl_mode(match tls {
            Some(_) => tokio_postgres::config::SslMode::Require,
            None => tokio_postgres::config::SslMode::Disable,
        });
        if settings.requires_channel_binding() {
            config.channel_binding(tokio_postgres::config::ChannelBinding::Require);
        }
        Ok(Self {
            config: Arc::new(config),
            schema,
            session,
            tls,
        })
    }

    pub fn schema(&self) -> &Ident {
        &self.schema
    }

    /// Opens a connection and points its `search_path` at the schema.
    pub async fn connect(&self) -> Result<AsyncPgConnection, StoreError> {
        let mut connection = match &self.tls {
            None => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(classify)?;
                AsyncPgConnection::try_from_client_and_connection(client, conn).await
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(classify)?;
                AsyncPgConnection::try_from_client_and_connection(client, conn).await
            }
        }
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        connection
            .batch_execute(&format!(
                // `random_page_cost`: the service looks up batches of up to
                // a thousand keys (`key = ANY(...)`) in tables it keeps hot.
                // With PostgreSQL's default of 4 (a disk seek per index
                // page) the planner reads the whole table instead for
                // tables of about 10,000 to 150,000 rows: 27-35 ms a batch
                // at 100,000 rows, against 3 ms through the index (see
                // docs/performance.md).
                "SET search_path TO {}, pg_temp; SET idle_in_transaction_session_timeout = {}; SET lock_timeout = {}; \
                 SET random_page_cost = 1.1",
                self.schema.quoted(),
                self.session.idle_in_transaction.as_millis(),
                self.session.lock_wait.as_millis()
            ))
            .await?;
        Ok(connection)
    }

    /// A pool of `size` connections.
    pub async fn pool(&self, size: u32, wait: Duration) -> Result<Pool, StoreError> {
        let connector = self.clone();
        let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
        manager_config.custom_setup = Box::new(move |_url| {
            let connector = connector.clone();
            async move {
                connector
                    .connect()
                    .await
                    .map_err(|e| ConnectionError::BadConnection(e.to_string()))
            }
            .boxed()
        });
        manager_config.recycling_method = RecyclingMethod::Fast;
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
            "postgres://configured-by-connector",
            manager_config,
        );
        let pool = bb8::Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(wait)
            // No test query on check-out (a round trip per use): a
            // connection that broke while in use is discarded as it is
            // returned (bb8 asks the manager whether it is broken), and the
            // caller's retry takes another.
            .test_on_check_out(false)
            .build_unchecked(manager);
        Ok(pool)
    }
}

/// Connection failures: refused credentials and failed TLS handshakes are
/// permanent (retrying cannot help and would hammer the server); the rest
/// (refused, reset, timed out, server starting) is retried.
fn classify(error: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    if let Some(db) = error.as_db_error() {
        let message = format!("{}: {}", db.severity(), db.message());
        return match *db.code() {
            SqlState::INVALID_PASSWORD
            | SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            | SqlState::INSUFFICIENT_PRIVILEGE
            | SqlState::INVALID_CATALOG_NAME => StoreError::Auth(message),
            _ => StoreError::Unavailable(message),
        };
    }
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    // The server did not authenticate the way the configuration demands
    // (channel binding): permanent, like a refused password.
    if chain.contains("authentication error") {
        return StoreError::Auth(chain);
    }
    let tls = ["certificate", "tls", "TLS", "handshake", "alert"]
        .iter()
        .any(|needle| chain.contains(needle));
    if tls {
        StoreError::Tls(chain)
    } else {
        StoreError::Unavailable(chain)
    }
}
