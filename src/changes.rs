//! The change journal (seeds/003, ODI's J$ tables): routes with `journal = [subscribers]` record
//! every row they load — its key, I or U, the time — once per subscriber, in the batch's own
//! transaction (`sink::routed`). Each subscriber consumes independently:
//!
//! 1. `lock` marks the subscriber's unconsumed rows consumed under a new window number and
//!    returns the window: every consumed, not yet purged row of the subscriber (so a run that
//!    failed before its purge sees its rows again, plus what arrived since);
//! 2. the subscriber processes those rows;
//! 3. `purge` deletes the window's rows, only after the subscriber reports success.
//!
//! Rows journaled while a subscriber works stay unconsumed and wait for its next lock: nothing
//! is lost to timing, and a failed run loses nothing.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::db::quote_ident as q;

/// A subscriber's locked window.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub subscriber: String,
    /// Purge with this number: it covers every row in the window.
    pub window: i64,
    /// Rows newly locked by this call.
    pub locked: i64,
    /// Rows in the window (earlier unpurged windows included).
    pub rows: i64,
}

/// One journal row of a window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    pub id: i64,
    pub target: String,
    pub flag: String,
    pub key: serde_json::Value,
    pub jrn_date: chrono::DateTime<chrono::Utc>,
    pub job_name: String,
}

/// Backlog of one subscriber.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    pub subscriber: String,
    pub target: String,
    /// Not yet locked.
    pub unconsumed: i64,
    /// Locked, waiting for the subscriber's purge.
    pub consumed: i64,
    pub oldest: Option<chrono::DateTime<chrono::Utc>>,
}

/// Marks `subscriber`'s unconsumed rows consumed under a new window, in one transaction.
pub async fn lock(
    conn: &mut PgConnection,
    schema: &str,
    subscriber: &str,
) -> Result<Window, sqlx::Error> {
    let s = q(schema);
    let mut tx = conn.begin().await?;
    let window: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT nextval('{s}.change_window')"
    )))
    .fetch_one(&mut *tx)
    .await?;
    let locked = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {s}.change_journal SET consumed = 1, window_id = $2 WHERE subscriber = $1 AND consumed = 0"
    )))
    .bind(subscriber)
    .bind(window)
    .execute(&mut *tx)
    .await?
    .rows_affected() as i64;
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {s}.change_journal WHERE subscriber = $1 AND consumed = 1 AND window_id <= $2"
    )))
    .bind(subscriber)
    .bind(window)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Window {
        subscriber: subscriber.to_string(),
        window,
        locked,
        rows,
    })
}

/// The rows of `subscriber`'s window `window` (every consumed row up to it), oldest first.
pub async fn rows(
    conn: &mut PgConnection,
    schema: &str,
    subscriber: &str,
    window: i64,
) -> Result<Vec<Change>, sqlx::Error> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, target, flag::text, key, jrn_date, job_name FROM {}.change_journal
         WHERE subscriber = $1 AND consumed = 1 AND window_id <= $2 ORDER BY id",
        q(schema)
    )))
    .bind(subscriber)
    .bind(window)
    .fetch_all(conn)
    .await?;
    Ok(r.into_iter()
        .map(|r| Change {
            id: r.get(0),
            target: r.get(1),
            flag: r.get(2),
            key: r.get::<sqlx::types::Json<serde_json::Value>, _>(3).0,
            jrn_date: r.get(4),
            job_name: r.get(5),
        })
        .collect())
}

/// Deletes `subscriber`'s window `window` (its consumed rows up to that number); returns how
/// many. Rows locked by a later window, and unconsumed ones, stay.
pub async fn purge(
    conn: &mut PgConnection,
    schema: &str,
    subscriber: &str,
    window: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {}.change_journal WHERE subscriber = $1 AND consumed = 1 AND window_id <= $2",
        q(schema)
    )))
    .bind(subscriber)
    .bind(window)
    .execute(conn)
    .await?
    .rows_affected())
}

/// The backlog of every subscriber and journaled table.
pub async fn status(conn: &mut PgConnection, schema: &str) -> Result<Vec<Backlog>, sqlx::Error> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT subscriber, target, count(*) FILTER (WHERE consumed = 0)::int8,
                count(*) FILTER (WHERE consumed = 1)::int8, min(jrn_date)
         FROM {}.change_journal GROUP BY subscriber, target ORDER BY subscriber, target",
        q(schema)
    )))
    .fetch_all(conn)
    .await?;
    Ok(r.into_iter()
        .map(|r| Backlog {
            subscriber: r.get(0),
            target: r.get(1),
            unconsumed: r.get(2),
            consumed: r.get(3),
            oldest: r.get(4),
        })
        .collect())
}
