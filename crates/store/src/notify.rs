//! LISTEN/NOTIFY: the service's channels (`<schema>_outbox`,
//! `<schema>_conflicts`), notifying on them, and a dedicated connection
//! listening on one. The outbox triggers build the same name from
//! `TG_TABLE_SCHEMA` (see the migrations).

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;

use crate::connect::Connector;
use crate::error::StoreError;

/// A notification channel of the service's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Changes were queued for etcd (wakes the poller).
    Outbox,
    /// An operator requested a resolution.
    Conflicts,
}

impl Channel {
    fn suffix(self) -> &'static str {
        match self {
            Channel::Outbox => "_outbox",
            Channel::Conflicts => "_conflicts",
        }
    }
}

/// Notifies `channel` of the connection's schema (its `search_path`), at
/// the commit of the caller's transaction.
pub async fn notify(
    conn: &mut AsyncPgConnection,
    channel: Channel,
    payload: &str,
) -> Result<(), StoreError> {
    diesel::sql_query("SELECT pg_notify(current_schema() || $1, $2)")
        .bind::<diesel::sql_types::Text, _>(channel.suffix())
        .bind::<diesel::sql_types::Text, _>(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// A connection on `LISTEN`. A notification is only a hint: it is sent at
/// commit, never replayed, and lost while reconnecting.
pub struct Notifications {
    conn: AsyncPgConnection,
}

impl Notifications {
    /// Opens a connection and listens on `channel` of the schema.
    pub async fn listen(connector: &Connector, channel: Channel) -> Result<Self, StoreError> {
        let mut conn = connector.connect().await?;
        let name = format!("{}{}", connector.schema(), channel.suffix());
        let channel = format!("\"{}\"", name.replace('"', "\"\""));
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
