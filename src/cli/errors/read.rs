//! Reading error rows in one snapshot: the job tables that match the filters are listed and
//! read together with `error_history` in one `UNION ALL`, inside one `REPEATABLE READ`
//! transaction, so a consolidation step can neither hide nor double a row (see the module `errors`).

use super::*;

/// Reads the matching rows, oldest first, in one snapshot, and hands each to `emit`; returns
/// (rows emitted, rows matching). Starts again when a listed table was dropped meanwhile.
pub(super) async fn read_rows(
    conn: &mut PgConnection,
    s: &str,
    schema: &str,
    f: &Filters,
    limit: Option<u64>,
    mut emit: impl FnMut(&ErrorRow) -> std::io::Result<()>,
) -> Result<(u64, u64), ReadError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut tx = conn
            .begin()
            .await
            .map_err(db_error("starting a transaction"))
            .map_err(ReadError::Db)?;
        let mut emitted = 0u64;
        let mut out_error = None;
        let r: Result<u64, sqlx::Error> = async {
            sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            let tables = list_tables(&mut tx, s, schema, f).await?;
            let rows = union_sql(s, &tables);
            let filter = "WHERE ($1::text IS NULL OR job = $1)
                AND ($2::timestamptz IS NULL OR recorded_at >= $2)
                AND ($3::text IS NULL OR kind = $3)
                AND ($4::text IS NULL OR code = $4)
                AND ($5::text IS NULL OR pipeline = $5)";
            let total = match limit {
                Some(_) => {
                    let sql = format!("SELECT count(*) FROM ({rows}) e {filter}");
                    let q = bind(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), f, &tables);
                    Some(q.fetch_one(&mut *tx).await?)
                }
                None => None,
            };
            let sql = format!(
                "SELECT job, pipeline, kind, seq, code, sqlstate, column_name, message, raw,
                        queue_time, message_id, recorded_at, consolidated
                 FROM ({rows}) e {filter}
                 ORDER BY recorded_at, seq, job, kind{}",
                limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default()
            );
            let q = bind(sqlx::query(sqlx::AssertSqlSafe(sql)), f, &tables);
            let mut stream = q.fetch(&mut *tx);
            while let Some(row) = stream.try_next().await? {
                let row = ErrorRow {
                    job: row.try_get("job")?,
                    pipeline: row.try_get("pipeline")?,
                    kind: row.try_get("kind")?,
                    seq: row.try_get("seq")?,
                    code: row.try_get("code")?,
                    sqlstate: row.try_get("sqlstate")?,
                    column: row.try_get("column_name")?,
                    message: row.try_get("message")?,
                    raw: row.try_get("raw")?,
                    queue_time: row.try_get("queue_time")?,
                    message_id: row.try_get("message_id")?,
                    recorded_at: row.try_get("recorded_at")?,
                    consolidated: row.try_get("consolidated")?,
                };
                if let Err(e) = emit(&row) {
                    out_error = Some(e);
                    break;
                }
                emitted += 1;
            }
            Ok(total.map_or(emitted, |t: i64| t.max(0) as u64))
        }
        .await;
        if let Some(e) = out_error {
            let _ = tx.rollback().await;
            return Err(ReadError::Out(e));
        }
        match r {
            Ok(total) => {
                tx.commit()
                    .await
                    .map_err(db_error("committing the read"))
                    .map_err(ReadError::Db)?;
                return Ok((emitted, total));
            }
            Err(e) => {
                let _ = tx.rollback().await;
                let vanished = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42P01");
                if vanished && emitted == 0 && attempt < READ_ATTEMPTS {
                    // Consolidation dropped a table we listed: list again.
                    tracing::debug!(attempt, error = %e, "an error table vanished while reading; reading again");
                    continue;
                }
                return Err(ReadError::Db(anyhow::anyhow!(
                    "reading the error rows from schema {schema:?} failed: {e}{}",
                    if vanished {
                        " (error tables kept vanishing under a running consolidation; try again)"
                    } else {
                        " (check that the database is reachable, that `conveyor migrate` ran with this config and that the database user may read the schema)"
                    }
                )));
            }
        }
    }
}

/// The job error tables existing in this snapshot that the filters can match.
async fn list_tables(
    conn: &mut PgConnection,
    s: &str,
    schema: &str,
    f: &Filters,
) -> Result<Vec<JobTable>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT c.relname::text AS name, substr(c.relname, 1, 2) AS kind,
                substr(c.relname, 4) AS job, j.pipeline
         FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         LEFT JOIN {s}.jobs j ON j.job_name = substr(c.relname, 4)
         WHERE n.nspname = $1 AND c.relkind = 'r'
           AND (c.relname LIKE 'et\\_%' OR c.relname LIKE 'uv\\_%')
         ORDER BY c.relname"
    )))
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        let kind = if r.try_get::<String, _>("kind")? == "uv" {
            "uv"
        } else {
            "et"
        };
        let t = JobTable {
            name: r.try_get("name")?,
            kind,
            job: r.try_get("job")?,
            pipeline: r.try_get("pipeline")?,
        };
        let wanted = f.job.as_ref().is_none_or(|j| *j == t.job)
            && f.kind.is_none_or(|k| k == t.kind)
            && f.pipeline
                .as_ref()
                .is_none_or(|p| t.pipeline.as_ref() == Some(p));
        if wanted {
            out.push(t);
        }
    }
    Ok(out)
}

/// `error_history UNION ALL` every listed table, with the same columns. A table's job and
/// pipeline are parameters `$6`, `$7` (first table), `$8`, `$9`, …
fn union_sql(s: &str, tables: &[JobTable]) -> String {
    const COLS: &str =
        "seq, code, sqlstate, column_name, message, raw, queue_time, message_id, recorded_at";
    let mut sql = format!(
        "SELECT job_name AS job, pipeline, kind, {COLS}, true AS consolidated FROM {s}.error_history"
    );
    for (i, t) in tables.iter().enumerate() {
        let p = 6 + 2 * i;
        sql.push_str(&format!(
            "\n UNION ALL SELECT ${p}::text, ${}::text, '{}'::text, {COLS}, false FROM {s}.{}",
            p + 1,
            t.kind,
            quote_ident(&t.name)
        ));
    }
    sql
}

/// Binds the filters ($1–$5) and each table's job and pipeline.
fn bind<'q, Q: Bindable<'q>>(q: Q, f: &'q Filters, tables: &'q [JobTable]) -> Q {
    let mut q = q
        .bind_text(f.job.as_deref())
        .bind_time(f.since)
        .bind_text(f.kind)
        .bind_text(f.code)
        .bind_text(f.pipeline.as_deref());
    for t in tables {
        q = q
            .bind_text(Some(t.job.as_str()))
            .bind_text(t.pipeline.as_deref());
    }
    q
}

/// The two query types `bind` fills.
trait Bindable<'q>: Sized {
    fn bind_text(self, v: Option<&'q str>) -> Self;
    fn bind_time(self, v: Option<DateTime<Utc>>) -> Self;
}

impl<'q> Bindable<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_text(self, v: Option<&'q str>) -> Self {
        self.bind(v)
    }
    fn bind_time(self, v: Option<DateTime<Utc>>) -> Self {
        self.bind(v)
    }
}

impl<'q> Bindable<'q>
    for sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments>
{
    fn bind_text(self, v: Option<&'q str>) -> Self {
        self.bind(v)
    }
    fn bind_time(self, v: Option<DateTime<Utc>>) -> Self {
        self.bind(v)
    }
}
