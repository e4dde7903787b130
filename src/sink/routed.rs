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

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value};
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::SinkError;
use crate::config::{PipelineConfig, RouteConfig, RouteMode, UnknownFields};
use crate::db::quote_ident as q;
use crate::decode::{Reject, RejectKind};
use crate::pack::Batch;

/// One route, its table read from the catalogue.
#[derive(Debug)]
pub struct Route {
    pub cfg: RouteConfig,
    /// Quoted, qualified table name.
    table: String,
    /// Column names (lower-case) in table order.
    columns: Vec<String>,
    colset: HashSet<String>,
    /// Conflict and change-journal key: the configured key, else the primary key.
    key: Vec<String>,
    identity_sql: Option<String>,
}

impl Route {
    /// A route over a table with `columns` (in table order) and primary key `pk`.
    pub fn new(cfg: RouteConfig, columns: Vec<String>, pk: Vec<String>) -> Result<Route, String> {
        let colset: HashSet<String> = columns.iter().cloned().collect();
        let key = if cfg.key.is_empty() {
            pk
        } else {
            cfg.key.clone()
        };
        let display = cfg.table_display();
        let step = cfg.step;
        for c in key
            .iter()
            .chain(cfg.job_column.iter())
            .chain(cfg.identity.iter().map(|i| &i.column))
        {
            if !colset.contains(c) {
                return Err(format!("step {step}: table {display} has no column {c:?}"));
            }
        }
        if cfg.mode == RouteMode::Upsert && key.is_empty() {
            return Err(format!(
                "step {step}: upsert into {display} needs key columns (set `key`, or give the table a primary key)"
            ));
        }
        if !cfg.journal.is_empty() && key.is_empty() {
            return Err(format!(
                "step {step}: the change journal of {display} records each row's key: set `key` or give the table a primary key"
            ));
        }
        let table = match &cfg.target_schema {
            Some(s) => format!("{}.{}", q(s), q(&cfg.target_table)),
            None => q(&cfg.target_table),
        };
        let identity_sql = cfg.identity.as_ref().map(|i| {
            let t = match crate::config::split_table(&i.table) {
                Some((Some(s), t)) => format!("{}.{}", q(&s), q(&t)),
                Some((None, t)) => q(&t),
                None => q(&i.table),
            };
            format!(
                "SELECT {by}::text, to_jsonb({value}) FROM {t} WHERE {by}::text = ANY($1)",
                by = q(&i.by),
                value = q(&i.value)
            )
        });
        Ok(Route {
            cfg,
            table,
            columns,
            colset,
            key,
            identity_sql,
        })
    }

    /// The statement writing rows with `cols` (table order): $1 jsonb array of the rows;
    /// journaled routes also $2 target, $3 job, $4 text[] subscribers. Returns one row:
    /// (inserted, updated).
    fn statement(&self, cols: &[&str], schema: &str) -> String {
        let list = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        let conflict = match self.cfg.mode {
            RouteMode::Insert => String::new(),
            RouteMode::InsertIgnore if self.key.is_empty() => " ON CONFLICT DO NOTHING".into(),
            RouteMode::InsertIgnore => format!(" ON CONFLICT ({}) DO NOTHING", self.key_list()),
            RouteMode::Upsert => {
                let mut set: Vec<String> = cols
                    .iter()
                    .filter(|c| !self.key.iter().any(|k| k == *c))
                    .map(|c| format!("{0} = EXCLUDED.{0}", q(c)))
                    .collect();
                if set.is_empty() {
                    // Only the key was sent: still an update, so it is counted as one.
                    set.push(format!("{0} = EXCLUDED.{0}", q(&self.key[0])));
                }
                format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    self.key_list(),
                    set.join(", ")
                )
            }
        };
        let journal = !self.cfg.journal.is_empty();
        let returning = if journal {
            let pairs = self
                .key
                .iter()
                .map(|k| format!("'{k}', t.{}", q(k)))
                .collect::<Vec<_>>()
                .join(", ");
            format!("(t.xmax = 0) AS inserted, jsonb_build_object({pairs}) AS k")
        } else {
            "(t.xmax = 0) AS inserted".into()
        };
        let jr = if journal {
            format!(
                ", jr AS (INSERT INTO {s}.change_journal (subscriber, target, flag, key, job_name)
                    SELECT sub, $2, CASE WHEN inserted THEN 'I' ELSE 'U' END, k, $3
                    FROM ins CROSS JOIN unnest($4::text[]) AS sub)",
                s = q(schema)
            )
        } else {
            String::new()
        };
        format!(
            "WITH src AS (SELECT r.* FROM jsonb_array_elements($1::jsonb) AS e(doc)
                 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, e.doc) AS r),
             ins AS (INSERT INTO {table} AS t ({list}) SELECT {list} FROM src{conflict}
                 RETURNING {returning}){jr}
             SELECT count(*) FILTER (WHERE inserted)::int8, count(*) FILTER (WHERE NOT inserted)::int8 FROM ins",
            table = self.table
        )
    }

    fn key_list(&self) -> String {
        self.key.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ")
    }

    /// The value of the key columns in `row`, for keeping one key per statement.
    fn key_of(&self, row: &Map<String, Value>) -> Option<String> {
        if self.key.is_empty() || self.cfg.mode == RouteMode::Insert {
            return None;
        }
        Some(
            self.key
                .iter()
                .map(|k| row.get(k).map(Value::to_string).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\u{1f}"),
        )
    }
}

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
            let columns: Vec<String> =
                super::catalog::read_columns(conn, r.target_schema.as_deref(), &r.target_table)
                    .await?
                    .into_iter()
                    .map(|c| c.name.to_lowercase())
                    .collect();
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

    /// What one message brings to each route, or why it cannot load (with the route that
    /// refused it, when one did).
    pub fn plan(&self, body: &[u8]) -> Result<Vec<Planned>, (Reject, Option<usize>)> {
        let msg: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
            (
                Reject::new(RejectKind::MalformedJson, None, e.to_string()),
                None,
            )
        })?;
        let msg = lower_keys(msg).map_err(|f| (duplicate_field(&f), None))?;
        let mut out = Vec::new();
        for (ri, r) in self.routes.iter().enumerate() {
            if let Some((field, value)) = &r.cfg.when {
                match msg.get(field) {
                    Some(v) if text(v) == *value => {}
                    _ => continue,
                }
            }
            let rows: Vec<Map<String, Value>> = match &r.cfg.part {
                None => vec![msg.clone()],
                Some(part) => match msg.get(part) {
                    None | Some(Value::Null) => continue,
                    Some(Value::Object(o)) => {
                        vec![lower_keys(o.clone()).map_err(|f| (duplicate_field(&f), Some(ri)))?]
                    }
                    Some(Value::Array(a)) => {
                        let mut rows = Vec::with_capacity(a.len());
                        for v in a {
                            match v {
                                Value::Object(o) => rows.push(
                                    lower_keys(o.clone())
                                        .map_err(|f| (duplicate_field(&f), Some(ri)))?,
                                ),
                                _ => return Err((part_not_rows(part), Some(ri))),
                            }
                        }
                        rows
                    }
                    Some(_) => return Err((part_not_rows(part), Some(ri))),
                },
            };
            for mut row in rows {
                if r.cfg.part.is_none() {
                    // The whole message: the routing field and other routes' parts are not
                    // this table's columns.
                    if let Some((field, _)) = &r.cfg.when {
                        if !r.colset.contains(field) {
                            row.remove(field);
                        }
                    }
                    for other in &self.routes {
                        if let Some(p) = &other.cfg.part {
                            if !r.colset.contains(p) {
                                row.remove(p);
                            }
                        }
                    }
                }
                let natural = match &r.cfg.identity {
                    Some(id) => {
                        // A part's rows may leave the natural key to the message around them.
                        let v = match row.get(&id.field).or_else(|| msg.get(&id.field)) {
                            Some(v) if !v.is_null() => text(v),
                            _ => {
                                return Err((
                                    Reject::new(
                                        RejectKind::MissingField,
                                        Some(&id.field),
                                        format!(
                                            "step {}: field {:?} identifies the row's {} and is missing",
                                            r.cfg.step, id.field, id.column
                                        ),
                                    ),
                                    Some(ri),
                                ))
                            }
                        };
                        if !r.colset.contains(&id.field) {
                            row.remove(&id.field);
                        }
                        Some(v)
                    }
                    None => None,
                };
                if let Some(extra) = row.keys().find(|k| !r.colset.contains(*k)).cloned() {
                    if self.unknown == UnknownFields::Reject {
                        return Err((
                            Reject::new(
                                RejectKind::ExtraField,
                                Some(&extra),
                                format!(
                                    "step {}: field {extra:?} is not a column of {}",
                                    r.cfg.step,
                                    r.cfg.table_display()
                                ),
                            ),
                            Some(ri),
                        ));
                    }
                    row.retain(|k, _| r.colset.contains(k));
                }
                if let Some(c) = &r.cfg.job_column {
                    row.insert(c.clone(), Value::String(self.job.clone()));
                }
                out.push((ri, row, natural));
            }
        }
        if out.is_empty() {
            let rules: Vec<String> = self
                .routes
                .iter()
                .map(|r| match (&r.cfg.when, &r.cfg.part) {
                    (Some((f, v)), _) => format!("{f} = {v}"),
                    (None, Some(p)) => format!("has {p}"),
                    (None, None) => "any".into(),
                })
                .collect();
            return Err((
                Reject::new(
                    RejectKind::NoRoute,
                    None,
                    format!("no route takes this message (routes: {})", rules.join(", ")),
                ),
                None,
            ));
        }
        Ok(out)
    }

    /// Writes the batch's live messages into their routes' tables and adds the steps'
    /// counters, inside the caller's transaction. `one_by_one`: each message under a savepoint
    /// (after a refused statement), refused ones isolated.
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        batch: &Batch,
        excluded: &mut [bool],
        db_bad: &mut Vec<(usize, Reject)>,
        state: &mut State,
        one_by_one: bool,
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
        if one_by_one {
            for (i, plan) in &plans {
                exec(conn, "SAVEPOINT conveyor_msg").await?;
                let mut mine = vec![StepCounts::default(); self.routes.len()];
                let mut refused = None;
                for ri in (0..self.routes.len()).filter(|&ri| self.selected(ri)) {
                    let rows: Vec<(usize, &Map<String, Value>, Option<&str>)> = plan
                        .iter()
                        .filter(|(r, _, _)| *r == ri)
                        .map(|(_, row, n)| (*i, row, n.as_deref()))
                        .collect();
                    match self.write_route(conn, ri, &rows, &mut mine[ri]).await {
                        Ok(()) => {}
                        Err(RouteError::Refused(reject)) => {
                            refused = Some((ri, reject));
                            break;
                        }
                        Err(RouteError::Missing(_)) => {
                            let id = self.routes[ri].cfg.identity.as_ref();
                            refused = Some((ri, identity_missing(&self.routes[ri], id)));
                            break;
                        }
                        Err(RouteError::Sql(what, e)) => return Err(Fail::Sql(what, e)),
                    }
                }
                match refused {
                    None => {
                        exec(conn, "RELEASE SAVEPOINT conveyor_msg").await?;
                        for (c, m) in counts.iter_mut().zip(&mine) {
                            c.inserted += m.inserted;
                            c.updated += m.updated;
                            c.ignored += m.ignored;
                        }
                    }
                    Some((ri, reject)) => {
                        exec(conn, "ROLLBACK TO SAVEPOINT conveyor_msg").await?;
                        excluded[*i] = true;
                        db_bad.push((*i, reject));
                        state.failed_at.insert(*i, ri);
                    }
                }
            }
        } else {
            for (ri, count) in counts.iter_mut().enumerate() {
                if !self.selected(ri) {
                    continue;
                }
                let rows: Vec<(usize, &Map<String, Value>, Option<&str>)> = plans
                    .iter()
                    .flat_map(|(i, plan)| {
                        plan.iter()
                            .filter(move |(r, _, _)| *r == ri)
                            .map(move |(_, row, n)| (*i, row, n.as_deref()))
                    })
                    .collect();
                match self.write_route(conn, ri, &rows, count).await {
                    Ok(()) => {}
                    Err(RouteError::Refused(_)) => return Err(Fail::Isolate),
                    Err(RouteError::Missing(msgs)) => {
                        let id = self.routes[ri].cfg.identity.as_ref();
                        for i in msgs {
                            if !excluded[i] {
                                excluded[i] = true;
                                db_bad.push((i, identity_missing(&self.routes[ri], id)));
                                state.failed_at.insert(i, ri);
                            }
                        }
                        return Err(Fail::Retry);
                    }
                    Err(RouteError::Sql(what, e)) => return Err(Fail::Sql(what, e)),
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
        if let (Some(sql), Some(id)) = (&r.identity_sql, &r.cfg.identity) {
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
            let missing: Vec<usize> = rows
                .iter()
                .filter(|(_, _, n)| n.is_some_and(|n| !found.contains_key(n)))
                .map(|(i, _, _)| *i)
                .collect();
            if !missing.is_empty() {
                return Err(RouteError::Missing(missing));
            }
            let _ = id;
            resolved = Some(found);
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
            if cols.is_empty() {
                continue;
            }
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

enum RouteError {
    /// The database refused a row (its content).
    Refused(Reject),
    /// These messages' natural keys resolved to nothing.
    Missing(Vec<usize>),
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

fn identity_missing(r: &Route, id: Option<&crate::config::Identity>) -> Reject {
    match id {
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

fn duplicate_field(f: &str) -> Reject {
    Reject::new(
        RejectKind::DuplicateField,
        Some(f),
        format!("field {f:?} appears twice (names compare without case)"),
    )
}

fn part_not_rows(part: &str) -> Reject {
    Reject::new(
        RejectKind::WrongType,
        Some(part),
        format!("part {part:?} must be an object or an array of objects"),
    )
}

/// Field names compare without case, as with a single target; a name twice is an error.
fn lower_keys(m: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::with_capacity(m.len());
    for (k, v) in m {
        let lk = k.to_lowercase();
        if out.insert(lk.clone(), v).is_some() {
            return Err(lk);
        }
    }
    Ok(out)
}

/// A JSON value as the text a `when` rule compares.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Identity;

    fn cfg(step: i32, table: &str, when: Option<(&str, &str)>, part: Option<&str>) -> RouteConfig {
        RouteConfig {
            step,
            target_schema: Some("crm".into()),
            target_table: table.into(),
            when: when.map(|(f, v)| (f.into(), v.into())),
            part: part.map(Into::into),
            mode: RouteMode::Insert,
            key: vec![],
            job_column: None,
            identity: None,
            journal: vec![],
        }
    }

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    fn routes() -> Routes {
        let customer = Route::new(
            cfg(1, "customer", Some(("type", "customer")), None),
            cols(&["id", "email", "name"]),
            cols(&["id"]),
        )
        .expect("route");
        let mut attr = cfg(2, "attribute", None, Some("attributes"));
        attr.identity = Some(Identity {
            column: "customer_id".into(),
            field: "email".into(),
            table: "crm.customer".into(),
            by: "email".into(),
            value: "id".into(),
        });
        attr.job_column = Some("load_job".into());
        let attr = Route::new(
            attr,
            cols(&["id", "customer_id", "name", "value", "load_job"]),
            cols(&["id"]),
        )
        .expect("route");
        Routes::from_routes(vec![customer, attr], "J1", UnknownFields::Reject)
    }

    #[test]
    fn a_message_goes_to_the_routes_its_rules_select() {
        let r = routes();
        let plan = r
            .plan(br#"{"Type":"customer","id":1,"email":"a@x","name":"A","attributes":[{"name":"n","value":"v","email":"a@x"}]}"#)
            .expect("routed");
        assert_eq!(plan.len(), 2);
        let (ri, row, natural) = &plan[0];
        assert_eq!(*ri, 0);
        assert!(
            !row.contains_key("type") && !row.contains_key("attributes"),
            "{row:?}"
        );
        assert_eq!(natural, &None);
        let (ri, row, natural) = &plan[1];
        assert_eq!(*ri, 1);
        assert_eq!(natural.as_deref(), Some("a@x"));
        assert!(
            !row.contains_key("email"),
            "the natural key is not a column: {row:?}"
        );
        assert_eq!(row.get("load_job"), Some(&Value::String("J1".into())));
    }

    #[test]
    fn unknown_types_extra_fields_and_bad_parts_are_refused_with_a_code() {
        let r = routes();
        let (e, route) = r.plan(br#"{"type":"order","id":1}"#).expect_err("no route");
        assert_eq!(e.kind, RejectKind::NoRoute);
        assert_eq!(route, None);
        assert!(e.message.contains("type = customer"), "{}", e.message);
        let (e, route) = r
            .plan(br#"{"type":"customer","id":1,"shoe":42}"#)
            .expect_err("extra");
        assert_eq!((e.kind, route), (RejectKind::ExtraField, Some(0)));
        let (e, route) = r.plan(br#"{"attributes":[1,2]}"#).expect_err("not rows");
        assert_eq!((e.kind, route), (RejectKind::WrongType, Some(1)));
        let (e, _) = r
            .plan(br#"{"attributes":{"name":"n"}}"#)
            .expect_err("no natural key");
        assert_eq!(e.kind, RejectKind::MissingField);
        let (e, _) = r.plan(br#"{"id":1,"ID":2}"#).expect_err("dup");
        assert_eq!(e.kind, RejectKind::DuplicateField);
    }

    #[test]
    fn upsert_statement_counts_inserts_and_updates_and_journals_keys() {
        let mut c = cfg(1, "customer", None, None);
        c.mode = RouteMode::Upsert;
        c.key = cols(&["email"]);
        c.journal = cols(&["crm", "marketing"]);
        let r = Route::new(c, cols(&["id", "email", "name"]), cols(&["id"])).expect("route");
        let sql = r.statement(&["email", "name"], "conveyor");
        assert!(
            sql.contains(r#"ON CONFLICT ("email") DO UPDATE SET "name" = EXCLUDED."name""#),
            "{sql}"
        );
        assert!(sql.contains("(t.xmax = 0) AS inserted"), "{sql}");
        assert!(
            sql.contains("jsonb_build_object('email', t.\"email\")"),
            "{sql}"
        );
        assert!(sql.contains("\"conveyor\".change_journal"), "{sql}");
        let mut bad = cfg(1, "customer", None, None);
        bad.mode = RouteMode::Upsert;
        assert!(
            Route::new(bad, cols(&["id"]), vec![]).is_err(),
            "upsert needs a key"
        );
    }
}
