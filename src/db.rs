//! Database plumbing shared by every stage: connecting with the configured timeout and running
//! the embedded migrations into the configured schema.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::config::SecretUrl;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database.url is not a valid PostgreSQL URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot connect to PostgreSQL at {url}: {source} (is it running? start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or fix database.url / CONVEYOR_DATABASE_URL)")]
    Connect { url: String, source: sqlx::Error },
    #[error("connecting to PostgreSQL at {url} timed out after {timeout:?} (check the host and port, or raise database.connect_timeout_ms)")]
    Timeout { url: String, timeout: Duration },
    #[error("migration into schema {schema:?} failed: {source} (the user needs CREATE on the database; run `conveyor migrate` as an owner)")]
    Migrate {
        schema: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
}

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub fn options(url: &SecretUrl) -> Result<PgConnectOptions, DbError> {
    PgConnectOptions::from_str(url.expose())
        .map(|o| o.application_name("conveyor"))
        .map_err(DbError::BadUrl)
}

/// Opens one connection, failing after `timeout`.
pub async fn connect(url: &SecretUrl, timeout: Duration) -> Result<PgConnection, DbError> {
    let opts = options(url)?;
    match tokio::time::timeout(timeout, opts.connect()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(DbError::Connect {
            url: url.to_string(),
            source,
        }),
        Err(_) => Err(DbError::Timeout {
            url: url.to_string(),
            timeout,
        }),
    }
}

/// Applies pending migrations into `schema` (created if missing); safe to run any number of
/// times and from several processes at once (sqlx takes an advisory lock).
pub async fn migrate(url: &SecretUrl, schema: &str, timeout: Duration) -> Result<(), DbError> {
    let opts = options(url)?.options([("search_path", schema)]);
    let mut conn = match tokio::time::timeout(timeout, opts.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(source)) => {
            return Err(DbError::Connect {
                url: url.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(DbError::Timeout {
                url: url.to_string(),
                timeout,
            })
        }
    };
    let mut migrator = sqlx::migrate::Migrator {
        migrations: MIGRATOR.migrations.clone(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    migrator.create_schema(schema.to_string());
    migrator.dangerous_set_table_name(format!("{schema}._sqlx_migrations"));
    // run_direct, not run: `run` takes `impl Acquire`, whose lifetime bound makes the daemon's
    // future non-Send for tokio::spawn (sqlx's own workaround).
    let r = migrator
        .run_direct(None, &mut conn, false)
        .await
        .map_err(|source| DbError::Migrate {
            schema: schema.to_string(),
            source,
        });
    let _ = conn.close().await;
    r
}

/// `"name"`: a checked identifier (see `config::is_identifier`) quoted for SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
