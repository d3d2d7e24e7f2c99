//! LISTEN/NOTIFY: a dedicated connection listening on one of the service's
//! channels (`<schema>_outbox`, `<schema>_conflicts`).

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;

use crate::connect::Connector;
use crate::error::StoreError;

/// A connection on `LISTEN`. A notification is only a hint: it is sent at
/// commit, never replayed, and lost while reconnecting.
pub struct Notifications {
    conn: AsyncPgConnection,
}

impl Notifications {
    /// Opens a connection and listens on `<schema>_<suffix>`.
    pub async fn listen(connector: &Connector, suffix: &str) -> Result<Self, StoreError> {
        let mut conn = connector.connect().await?;
        let channel = format!("\"{}_{}\"", connector.schema(), suffix.replace('"', ""));
        diesel::sql_query(format!("LISTEN {channel}"))
            .execute(&mut conn)
            .await?;
        Ok(Notifications { conn })
    }

    /// Waits for the next notification; an error when the connection died.
    pub async fn next(&mut self) -> Result<(), StoreError> {
        let mut stream = std::pin::pin!(self.conn.notifications_stream());
        match stream.next().await {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
            None => Err(StoreError::Unavailable(
                "notification connection closed".into(),
            )),
        }
    }
}
