//! The job's error tables (DESIGN §4, MultiLoad's pair): `et_<job>` for rows refused for their
//! content, `uv_<job>` for rows refused as duplicates of a unique key. Created at job start,
//! filled inside each batch's transaction (so a crash can neither lose nor double an error row),
//! dropped at job end when they stayed empty (MultiLoad's cleanup); the rest are moved into
//! `error_history` by consolidation after the job.

use sqlx::postgres::PgConnection;

use crate::decode::Reject;
use crate::pack::Batch;

/// `et_<job>`; job names are at most 49 bytes, so this fits PostgreSQL's 63.
pub fn et_table_name(job: &str) -> String {
    format!("et_{job}")
}

/// `uv_<job>`.
pub fn uv_table_name(job: &str) -> String {
    format!("uv_{job}")
}

/// Creates the error table `qualified` (schema-qualified, quoted) if it does not exist.
pub async fn create(conn: &mut PgConnection, qualified: &str) -> Result<(), sqlx::Error> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {qualified} (
            seq         bigint NOT NULL,
            code        text NOT NULL,
            sqlstate    text,
            message     text NOT NULL,
            column_name text,
            raw         bytea NOT NULL,
            queue_time  timestamptz,
            message_id  text,
            recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await?;
    Ok(())
}

/// Rows left in a job's error tables at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorRows {
    pub et: i64,
    pub uv: i64,
}

/// Drops each of the job's error tables that holds no row (MultiLoad's cleanup) and counts the
/// rows of the others, which consolidation moves later.
pub async fn drop_empty(
    conn: &mut PgConnection,
    et: &str,
    uv: &str,
) -> Result<ErrorRows, sqlx::Error> {
    Ok(ErrorRows {
        et: drop_if_empty(conn, et).await?,
        uv: drop_if_empty(conn, uv).await?,
    })
}

/// Drops the error table if it holds no row (or does not exist); returns its row count.
async fn drop_if_empty(conn: &mut PgConnection, qualified: &str) -> Result<i64, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(qualified)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(0);
    }
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {qualified}"
    )))
    .fetch_one(&mut *conn)
    .await?;
    if n == 0 {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {qualified}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(n)
}

/// Inserts the batch's rejected rows (decode rejects plus `db_bad`, rows of `batch.good` the
/// database refused): duplicates of a unique key into `uv`, the rest into `et`, one statement
/// each.
pub async fn insert_rejects(
    conn: &mut PgConnection,
    et: &str,
    uv: &str,
    batch: &Batch,
    db_bad: &[(usize, Reject)],
) -> Result<(), sqlx::Error> {
    for (table, dup) in [(et, false), (uv, true)] {
        insert_kind(conn, table, batch, db_bad, dup).await?;
    }
    Ok(())
}

async fn insert_kind(
    conn: &mut PgConnection,
    qualified: &str,
    batch: &Batch,
    db_bad: &[(usize, Reject)],
    dup: bool,
) -> Result<(), sqlx::Error> {
    let is = |r: &Reject| (r.kind == crate::decode::RejectKind::DuplicateKey) == dup;
    let n = batch.bad.iter().filter(|b| is(&b.reject)).count()
        + db_bad.iter().filter(|(_, r)| is(r)).count();
    if n == 0 {
        return Ok(());
    }
    let mut seq = Vec::with_capacity(n);
    let mut code = Vec::with_capacity(n);
    let mut sqlstate = Vec::with_capacity(n);
    let mut message = Vec::with_capacity(n);
    let mut column = Vec::with_capacity(n);
    let mut raw: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut queue_time = Vec::with_capacity(n);
    let mut message_id = Vec::with_capacity(n);
    let mut push = |s: u64, r: &Reject, body: &[u8], qt: Option<i64>, id: &Option<String>| {
        seq.push(s as i64);
        code.push(r.kind.as_str());
        sqlstate.push(r.sqlstate.clone());
        message.push(r.message.clone());
        column.push(r.column.clone());
        raw.push(body.to_vec());
        queue_time.push(qt.and_then(chrono::DateTime::from_timestamp_micros));
        message_id.push(id.clone());
    };
    for b in batch.bad.iter().filter(|b| is(&b.reject)) {
        push(b.seq, &b.reject, &b.raw, b.queue_time_us, &b.message_id);
    }
    for (i, r) in db_bad.iter().filter(|(_, r)| is(r)) {
        let g = &batch.good[*i];
        push(g.seq, r, &g.raw, Some(g.queue_time_us), &g.message_id);
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {qualified} (seq, code, sqlstate, message, column_name, raw, queue_time, message_id)
         SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::timestamptz[], $8::text[])"
    )))
    .bind(seq)
    .bind(code)
    .bind(sqlstate)
    .bind(message)
    .bind(column)
    .bind(raw)
    .bind(queue_time)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(())
}
