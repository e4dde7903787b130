//! Routed writes (ETL2's phase-2 loader, seeds/000): one pipeline loading several tables. Each
//! route is a numbered step with its own table and write mode; a message goes to every route
//! whose `when` rule it matches, whole or as the parts it carries, and all of a batch's rows for
//! all its routes commit in the batch's one transaction, with the error rows, the robust mark,
//! the change-journal rows and the steps' counters.
//!
//! A message is the unit of success: all its rows load, or it goes whole to the error table.
//! The fast path writes each route's rows of the batch in one statement per column set
//! (`jsonb_populate_record`, so PostgreSQL's own input functions check the types). A statement
//! the database refuses cannot say which row was wrong, so the batch is then written again one
//! message at a time under savepoints, and each refused message is isolated with the
//! database's reason.

mod plan;
mod route;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value};
use sqlx::postgres::PgConnection;
use sqlx::Row;

pub use route::Route;

use super::SinkError;
use crate::config::{PipelineConfig, UnknownFields};
use crate::db::quote_ident as q;
use crate::decode::{Reject, RejectKind};
use crate::pack::Batch;

/// A pipeline's routes, prepared for one job.
#[derive(Debug)]
pub struct Routes {
    pub routes: Vec<Route>,
    schema: String,
    /// The job whose `steps` rows the counters go to (a re-run's own job name differs).
    steps_job: String,
    job: String,
    unknown: UnknownFields,
    steps_update: String,
    /// `conveyor run-steps`: only these steps are written (messages are still planned over
    /// every route, so they are taken apart exactly as the job did).
    only: Option<Vec<i32>>,
}

/// One row a message brings to a route: (route index, the row, the natural key to resolve).
type Planned = (usize, Map<String, Value>, Option<String>);

/// Counters of one route in one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepCounts {
    pub inserted: i64,
    pub updated: i64,
    pub ignored: i64,
    pub errors: i64,
}

/// Which route refused which message, across the attempts of one batch.
#[derive(Debug, Default)]
pub struct State {
    failed_at: HashMap<usize, usize>,
}

/// Why a routed write stopped; the caller rolls back and tries again as it says.
#[derive(Debug)]
pub enum Fail {
    /// Messages were refused (marked in `excluded`/`db_bad`): write the rest again.
    Retry,
    /// A statement was refused without saying which row: write again message by message.
    Isolate,
    Sql(&'static str, sqlx::Error),
}

impl Routes {
    /// Reads every route's table and checks it against its route, writing nothing
    /// (`conveyor check`).
    pub async fn check(conn: &mut PgConnection, p: &PipelineConfig) -> Result<(), SinkError> {
        Self::read(conn, p).await.map(|_| ())
    }

    async fn read(conn: &mut PgConnection, p: &PipelineConfig) -> Result<Vec<Route>, SinkError> {
        let mut routes = Vec::new();
        for r in &p.routes {
            let columns =
                super::catalog::read_columns(conn, r.target_schema.as_deref(), &r.target_table)
                    .await?;
            let pk: Vec<String> = sqlx::query_scalar(
                "SELECT a.attname::text FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
            )
            .bind(r.table_display())
            .fetch_all(&mut *conn)
            .await
            .map_err(|source| SinkError::Query {
                what: "reading a route's primary key",
                source,
            })?;
            routes.push(
                Route::new(
                    r.clone(),
                    columns,
                    pk.into_iter().map(|c| c.to_lowercase()).collect(),
                )
                .map_err(SinkError::Route)?,
            );
        }
        Ok(routes)
    }

    /// Reads every route's table, checks it against the route, and creates the job's `steps`
    /// rows (counters at 0, status 0). `rerun`: `conveyor run-steps` writes only these steps,
    /// counted for that job (the job it re-runs, not `job`).
    pub async fn prepare(
        conn: &mut PgConnection,
        schema: &str,
        p: &PipelineConfig,
        job: &str,
        rerun: Option<(&str, &[i32])>,
    ) -> Result<Routes, SinkError> {
        let steps_job = rerun.map_or(job, |(j, _)| j);
        let routes = Self::read(conn, p).await?;
        let s = q(schema);
        for r in &routes {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.steps (job_name, step, pipeline, kind, name) VALUES ($1, $2, $3, 'load', $4)
                 ON CONFLICT (job_name, step) DO NOTHING"
            )))
            .bind(steps_job)
            .bind(r.cfg.step)
            .bind(&p.name)
            .bind(r.cfg.table_display())
            .execute(&mut *conn)
            .await
            .map_err(|source| SinkError::Query {
                what: "creating the job's steps rows",
                source,
            })?;
        }
        Ok(Routes {
            routes,
            schema: schema.to_string(),
            steps_job: steps_job.to_string(),
            job: job.to_string(),
            unknown: p.unknown_fields,
            steps_update: format!(
                "UPDATE {s}.steps SET inserted = inserted + $3, updated = updated + $4, ignored = ignored + $5,
                    errors = errors + $6, updated_at = now() WHERE job_name = $1 AND step = $2"
            ),
            only: rerun.map(|(_, steps)| steps.to_vec()),
        })
    }

    fn selected(&self, ri: usize) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.contains(&self.routes[ri].cfg.step))
    }

    /// Routes built without a database (tests).
    pub fn from_routes(routes: Vec<Route>, job: &str, unknown: UnknownFields) -> Routes {
        Routes {
            routes,
            schema: "conveyor".into(),
            steps_job: job.into(),
            job: job.into(),
            unknown,
            steps_update: String::new(),
            only: None,
        }
    }

    /// Writes the batch's live messages into their routes' tables and adds the steps'
    /// counters, inside the caller's transaction. `isolate` (after a refused statement):
    /// the messages are bisected under savepoints and each refused one isolated.
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        batch: &Batch,
        excluded: &mut [bool],
        db_bad: &mut Vec<(usize, Reject)>,
        state: &mut State,
        isolate: bool,
    ) -> Result<(), Fail> {
        let mut plans: Vec<(usize, Vec<Planned>)> = Vec::new();
        for (i, row) in batch.good.iter().enumerate() {
            if excluded[i] {
                continue;
            }
            match self.plan(&row.raw) {
                Ok(p) => plans.push((i, p)),
                Err((reject, route)) => {
                    excluded[i] = true;
                    db_bad.push((i, reject));
                    if let Some(r) = route {
                        state.failed_at.insert(i, r);
                    }
                }
            }
        }
        let mut counts = vec![StepCounts::default(); self.routes.len()];
        let mut mark = |i: usize, reject: Reject, ri: usize| {
            if !excluded[i] {
                excluded[i] = true;
                db_bad.push((i, reject));
                state.failed_at.insert(i, ri);
            }
        };
        if !isolate {
            let all: Vec<usize> = (0..plans.len()).collect();
            match self.write_set(conn, &plans, &all, &mut counts).await {
                Ok(()) => {}
                Err(SetError::Refused(..)) => return Err(Fail::Isolate),
                Err(SetError::Marked(ri, refused)) => {
                    for (i, reject) in refused {
                        mark(i, reject, ri);
                    }
                    return Err(Fail::Retry);
                }
                Err(SetError::Sql(what, e)) => return Err(Fail::Sql(what, e)),
            }
        } else {
            // The database refused a statement without naming its row: halve the messages
            // under savepoints until each refused one stands alone (a message is the unit).
            let mut stack: Vec<Vec<usize>> = vec![(0..plans.len()).collect()];
            while let Some(set) = stack.pop() {
                if set.is_empty() {
                    continue;
                }
                exec(conn, "SAVEPOINT conveyor_set").await?;
                let mut mine = vec![StepCounts::default(); self.routes.len()];
                let r = self.write_set(conn, &plans, &set, &mut mine).await;
                if r.is_ok() {
                    exec(conn, "RELEASE SAVEPOINT conveyor_set").await?;
                    for (c, m) in counts.iter_mut().zip(&mine) {
                        c.inserted += m.inserted;
                        c.updated += m.updated;
                        c.ignored += m.ignored;
                    }
                    continue;
                }
                exec(conn, "ROLLBACK TO SAVEPOINT conveyor_set").await?;
                exec(conn, "RELEASE SAVEPOINT conveyor_set").await?;
                match r {
                    Ok(()) => {}
                    Err(SetError::Refused(reject, ri)) if set.len() == 1 => {
                        mark(plans[set[0]].0, reject, ri)
                    }
                    Err(SetError::Refused(..)) => {
                        let (a, b) = set.split_at(set.len() / 2);
                        stack.push(b.to_vec());
                        stack.push(a.to_vec());
                    }
                    Err(SetError::Marked(ri, refused)) => {
                        let msgs: HashSet<usize> = refused.iter().map(|(i, _)| *i).collect();
                        for (i, reject) in refused {
                            mark(i, reject, ri);
                        }
                        stack.push(
                            set.into_iter()
                                .filter(|&k| !msgs.contains(&plans[k].0))
                                .collect(),
                        );
                    }
                    Err(SetError::Sql(what, e)) => return Err(Fail::Sql(what, e)),
                }
            }
        }
        for (i, _) in db_bad.iter() {
            if let Some(&ri) = state.failed_at.get(i) {
                counts[ri].errors += 1;
            }
        }
        for (ri, (r, c)) in self.routes.iter().zip(&counts).enumerate() {
            if !self.selected(ri) {
                continue;
            }
            sqlx::query(sqlx::AssertSqlSafe(self.steps_update.as_str()))
                .bind(&self.steps_job)
                .bind(r.cfg.step)
                .bind(c.inserted)
                .bind(c.updated)
                .bind(c.ignored)
                .bind(c.errors)
                .execute(&mut *conn)
                .await
                .map_err(|e| Fail::Sql("counting the steps", e))?;
        }
        Ok(())
    }

    /// Writes the messages `set` (indexes into `plans`) into every selected route, in step
    /// order, adding to `counts`.
    async fn write_set(
        &self,
        conn: &mut PgConnection,
        plans: &[(usize, Vec<Planned>)],
        set: &[usize],
        counts: &mut [StepCounts],
    ) -> Result<(), SetError> {
        for (ri, count) in counts.iter_mut().enumerate() {
            if !self.selected(ri) {
                continue;
            }
            let rows: Vec<(usize, &Map<String, Value>, Option<&str>)> = set
                .iter()
                .flat_map(|&k| {
                    let (i, plan) = &plans[k];
                    plan.iter()
                        .filter(move |(r, _, _)| *r == ri)
                        .map(move |(_, row, n)| (*i, row, n.as_deref()))
                })
                .collect();
            match self.write_route(conn, ri, &rows, count).await {
                Ok(()) => {}
                Err(RouteError::Refused(reject)) => return Err(SetError::Refused(reject, ri)),
                Err(RouteError::Marked(refused)) => return Err(SetError::Marked(ri, refused)),
                Err(RouteError::Sql(what, e)) => return Err(SetError::Sql(what, e)),
            }
        }
        Ok(())
    }

    /// An insert route's rows whose key repeats an earlier message of the batch or a row
    /// already in the table: found here, as the single-target path does, so that only what
    /// the checks cannot see (a foreign key, a key filled by an identity) makes the database
    /// refuse a statement.
    async fn duplicates(
        &self,
        conn: &mut PgConnection,
        r: &Route,
        rows: &[(usize, &Map<String, Value>, Option<&str>)],
    ) -> Result<Vec<(usize, Reject)>, RouteError> {
        let key_text = |row: &Map<String, Value>| -> Option<String> {
            let parts: Option<Vec<String>> = r
                .key
                .iter()
                .map(|k| row.get(k).filter(|v| !v.is_null()).map(plan::text))
                .collect();
            parts.map(|p| p.join("\u{1f}"))
        };
        let mut first: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, row, _) in rows {
            let Some(k) = key_text(row) else { continue };
            match first.get(&k) {
                Some(&f) if f != *i => {
                    out.push((*i, duplicate_key(r, &k, "an earlier message of the batch")))
                }
                Some(_) => {}
                None => {
                    first.insert(k, *i);
                }
            }
        }
        if r.key.len() == 1 && !first.is_empty() {
            let k = &r.key[0];
            let probe: Vec<Value> = rows
                .iter()
                .filter_map(|(_, row, _)| row.get(k).map(|v| serde_json::json!({ k.as_str(): v })))
                .collect();
            let existing: HashSet<String> =
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
                    "SELECT t.{c}::text FROM {table} t WHERE t.{c} IN
                   (SELECT p.{c} FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb) p)",
                    c = q(k),
                    table = r.table
                )))
                .bind(sqlx::types::Json(Value::Array(probe)))
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| RouteError::from_sql("checking an insert route's keys", e))?
                .into_iter()
                .collect();
            let mut marked: HashSet<usize> = out.iter().map(|(i, _)| *i).collect();
            for (i, row, _) in rows {
                if let Some(key) = key_text(row) {
                    if existing.contains(&key) && marked.insert(*i) {
                        out.push((*i, duplicate_key(r, &key, "a row already in the table")));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes `rows` (message index, row, natural key) into route `ri`: identities resolved,
    /// then one statement per column set and per round of distinct keys.
    async fn write_route(
        &self,
        conn: &mut PgConnection,
        ri: usize,
        rows: &[(usize, &Map<String, Value>, Option<&str>)],
        count: &mut StepCounts,
    ) -> Result<(), RouteError> {
        if rows.is_empty() {
            return Ok(());
        }
        let r = &self.routes[ri];
        let mut resolved: Option<HashMap<String, Value>> = None;
        if let Some(sql) = &r.identity_sql {
            let keys: Vec<&str> = rows
                .iter()
                .filter_map(|(_, _, n)| *n)
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let found: HashMap<String, Value> = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(&keys)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| RouteError::from_sql("resolving identities", e))?
                .into_iter()
                .map(|row| {
                    (
                        row.get::<String, _>(0),
                        row.get::<sqlx::types::Json<Value>, _>(1).0,
                    )
                })
                .collect();
            let missing: Vec<(usize, Reject)> = rows
                .iter()
                .filter(|(_, _, n)| n.is_some_and(|n| !found.contains_key(n)))
                .map(|(i, _, _)| (*i, identity_missing(r)))
                .collect();
            if !missing.is_empty() {
                return Err(RouteError::Marked(missing));
            }
            resolved = Some(found);
        }
        if r.cfg.mode == crate::config::RouteMode::Insert && !r.key.is_empty() {
            let duplicates = self.duplicates(conn, r, rows).await?;
            if !duplicates.is_empty() {
                return Err(RouteError::Marked(duplicates));
            }
        }
        // Statements: rows grouped by their column set (an absent field keeps the column's
        // default), and split into rounds so no statement holds one key twice (an upsert may
        // not touch a row twice in one statement).
        let mut groups: BTreeMap<(usize, Vec<String>), Vec<Value>> = BTreeMap::new();
        let mut round_of: HashMap<(Vec<String>, String), usize> = HashMap::new();
        for (_, row, natural) in rows {
            let mut row: Map<String, Value> = (*row).clone();
            if let (Some(found), Some(id), Some(n)) = (&resolved, &r.cfg.identity, natural) {
                if let Some(v) = found.get(*n) {
                    row.insert(id.column.clone(), v.clone());
                }
            }
            let cols: Vec<String> = r
                .columns
                .iter()
                .filter(|c| row.contains_key(*c))
                .cloned()
                .collect();
            let round = match r.key_of(&row) {
                Some(k) => {
                    let n = round_of.entry((cols.clone(), k)).or_insert(0);
                    *n += 1;
                    *n - 1
                }
                None => 0,
            };
            groups
                .entry((round, cols))
                .or_default()
                .push(Value::Object(row));
        }
        for ((_, cols), docs) in groups {
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            let sql = r.statement(&cols, &self.schema);
            let sent = docs.len() as i64;
            let mut query =
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(sqlx::types::Json(Value::Array(docs)));
            if !r.cfg.journal.is_empty() {
                query = query
                    .bind(r.cfg.table_display())
                    .bind(&self.job)
                    .bind(&r.cfg.journal);
            }
            let row = query
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| RouteError::from_sql("writing a route's rows", e))?;
            let (ins, upd): (i64, i64) = (row.get(0), row.get(1));
            count.inserted += ins;
            count.updated += upd;
            count.ignored += sent - ins - upd;
        }
        Ok(())
    }
}

/// Why writing a set of messages stopped, with the route that refused.
enum SetError {
    Refused(Reject, usize),
    /// Messages (batch indexes) route `.0` refused before writing: an identity that resolved
    /// to nothing, a duplicate key.
    Marked(usize, Vec<(usize, Reject)>),
    Sql(&'static str, sqlx::Error),
}

enum RouteError {
    /// The database refused a row (its content).
    Refused(Reject),
    /// Messages refused before writing (identity not found, duplicate key).
    Marked(Vec<(usize, Reject)>),
    Sql(&'static str, sqlx::Error),
}

impl RouteError {
    fn from_sql(what: &'static str, e: sqlx::Error) -> RouteError {
        if super::is_row_error(&e) {
            RouteError::Refused(super::reject_from_db(&e))
        } else {
            RouteError::Sql(what, e)
        }
    }
}

async fn exec(conn: &mut PgConnection, sql: &'static str) -> Result<(), Fail> {
    sqlx::raw_sql(sql)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| Fail::Sql("savepoint", e))
}

fn duplicate_key(r: &Route, key: &str, what: &str) -> Reject {
    Reject::new(
        RejectKind::DuplicateKey,
        Some(&r.key.join(", ")),
        format!(
            "step {}: key ({}) = ({}) of {} repeats {what}",
            r.cfg.step,
            r.key.join(", "),
            key.replace('\u{1f}', ", "),
            r.cfg.table_display()
        ),
    )
}

fn identity_missing(r: &Route) -> Reject {
    match &r.cfg.identity {
        Some(id) => Reject::new(
            RejectKind::IdentityNotFound,
            Some(&id.field),
            format!(
                "step {}: no row of {} has {} = the message's {}; load it first (an earlier step or job)",
                r.cfg.step, id.table, id.by, id.field
            ),
        ),
        None => Reject::new(RejectKind::IdentityNotFound, None, "identity not found"),
    }
}
