//! What `etcd-pg-sync doctor` asks of PostgreSQL: the server, this role's
//! rights on the schema, and the connection headroom. Read-only.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use eps_core::ident::Ident;

use crate::error::StoreError;

/// The facts, as PostgreSQL reports them.
#[derive(Debug, Clone, QueryableByName)]
pub struct PgFacts {
    /// `server_version`, e.g. "15.8 (Debian 15.8-0+deb12u1)".
    #[diesel(sql_type = Text)]
    pub version: String,
    /// `server_version_num`, e.g. 150008.
    #[diesel(sql_type = Integer)]
    pub version_num: i32,
    #[diesel(sql_type = Text)]
    pub role: String,
    #[diesel(sql_type = Bool)]
    pub superuser: bool,
    /// The schema's owner, when the schema exists.
    #[diesel(sql_type = Nullable<Text>)]
    pub schema_owner: Option<String>,
    /// This role is (a member of) the schema's owner: it may migrate it.
    #[diesel(sql_type = Bool)]
    pub owns_schema: bool,
    /// This role may create the schema (CREATE on the database).
    #[diesel(sql_type = Bool)]
    pub may_create_schema: bool,
    #[diesel(sql_type = Integer)]
    pub max_connections: i32,
    /// Connections kept for superusers (`superuser_reserved_connections`).
    #[diesel(sql_type = Integer)]
    pub reserved_connections: i32,
    /// Client connections open now, this one included.
    #[diesel(sql_type = BigInt)]
    pub connections: i64,
    /// Of those, the service's (`application_name` etcd-pg-sync), this one
    /// included.
    #[diesel(sql_type = BigInt)]
    pub service_connections: i64,
    /// PostgreSQL's clock, microseconds since the Unix epoch.
    #[diesel(sql_type = BigInt)]
    pub now_us: i64,
}

pub async fn facts(conn: &mut AsyncPgConnection, schema: &Ident) -> Result<PgFacts, StoreError> {
    let facts = diesel::sql_query(
        "SELECT current_setting('server_version') AS version, \
                current_setting('server_version_num')::int4 AS version_num, \
                current_user::text AS role, \
                (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser, \
                (SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1) AS schema_owner, \
                coalesce((SELECT pg_has_role(current_user, nspowner, 'MEMBER') FROM pg_namespace \
                          WHERE nspname = $1), false) AS owns_schema, \
                has_database_privilege(current_database(), 'CREATE') AS may_create_schema, \
                current_setting('max_connections')::int4 AS max_connections, \
                current_setting('superuser_reserved_connections')::int4 AS reserved_connections, \
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS connections, \
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                   AND application_name = 'etcd-pg-sync') AS service_connections, \
                (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us",
    )
    .bind::<Text, _>(schema.as_str())
    .get_result(conn)
    .await?;
    Ok(facts)
}
