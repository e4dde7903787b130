//! `conveyor view`: a point-in-time view over a pipeline's target table (seeds/001: "point-in-time
//! views, which use … the time the row was inserted into the database, to filter out
//! transactions that do not fall within the data freshness parameter"). A continuous load keeps
//! adding rows; an analysis that needs the data as it was at 08:00 reads the view instead.
//!
//! The view filters on a column the database fills at insert (`db_time timestamp DEFAULT
//! clock_timestamp()` in the demo table): `WHERE db_time <= <TIME>`. Such a column holds the
//! insert's time within its batch's transaction, so a batch in flight at TIME commits rows
//! stamped before TIME a moment later (at most a batch's commit time): a view whose TIME is only
//! seconds old can still gain those rows, one whose TIME is older is fixed.
//!
//! Time zones: conveyor's sessions run with `TimeZone = UTC` (sqlx sets it), so a `timestamp`
//! (without time zone) column filled by them holds UTC; the cut-off is written in UTC for such a
//! column, as an absolute `timestamptz` for the other kind. `now` and durations ago are read on
//! the database's clock, the clock that fills the column.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::config::{is_identifier, Config, PipelineConfig};
use crate::db::quote_ident;

#[derive(Debug, clap::Args)]
pub struct ViewArgs {
    /// Pipeline whose target table the view reads (default: the first in the config).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// The cut-off: the view shows the rows whose COLUMN is at or before TIME. RFC 3339
    /// (2026-11-24T08:00:00Z, 2026-11-24T09:00:00+01:00; without an offset: UTC), `now`, or a
    /// duration ago (30m, 2h, 1d); `now` and durations are read on the database's clock.
    #[arg(long, value_name = "TIME", value_parser = parse_at, required_unless_present = "drop")]
    pub at: Option<At>,
    /// The column to cut at: one the database fills when it inserts the row (a `timestamp` or
    /// `timestamptz` with DEFAULT clock_timestamp()), so the view shows what was loaded by TIME.
    #[arg(long, value_name = "C", default_value = "db_time")]
    pub column: String,
    /// View name: NAME (in the target table's schema) or SCHEMA.NAME. Default:
    /// <table>_at_<yyyymmdd_hhmmss> (TIME in UTC), in the target table's schema. An existing
    /// view of that name is replaced.
    #[arg(long, value_name = "V")]
    pub name: Option<String>,
    /// Drop the view named by --name (or the default name of --at) instead of creating it.
    /// Only a view that reads the pipeline's target table is dropped (or replaced, without
    /// --drop), never a table or another view.
    #[arg(long)]
    pub drop: bool,
}

/// A `--at` value; `Now` and `Ago` are resolved on the database's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    Now,
    Ago(Duration),
    Time(DateTime<Utc>),
}

pub async fn run(config_path: &Path, args: ViewArgs) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let p = super::pick_pipeline(&config, args.pipeline.as_deref())?;
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    let target = resolve_target(&mut conn, p).await?;
    let cutoff = match &args.at {
        Some(at) => Some(resolve_at(&mut conn, at).await?),
        None => None,
    };
    let (schema, name) = match (&args.name, cutoff) {
        (Some(n), _) => parse_name(n, &target.schema)?,
        (None, Some(t)) => (target.schema.clone(), default_name(&target.table, t)?),
        (None, None) => anyhow::bail!(
            "--drop needs the view to drop: --name V, or the --at TIME it was created with"
        ),
    };
    let view = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
    if args.drop {
        drop_view(&mut conn, &target, &schema, &name, &view, p).await?;
    } else if let Some(cutoff) = cutoff {
        create_view(
            &mut conn,
            &target,
            &args.column,
            cutoff,
            (&schema, &name),
            &view,
        )
        .await?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// The pipeline's target table as the catalogue names it.
#[derive(Debug)]
struct Target {
    schema: String,
    table: String,
    /// `"schema"."table"`.
    qualified: String,
}

/// One column of the target.
#[derive(Debug)]
struct Column {
    name: String,
    /// As `format_type` prints it: `timestamp(6) without time zone`.
    type_text: String,
    /// `timestamp`, `timestamptz`, `int4`, …
    typname: String,
    has_default: bool,
}

impl Column {
    fn is_timestamp(&self) -> bool {
        matches!(self.typname.as_str(), "timestamp" | "timestamptz")
    }
}

fn parse_at(s: &str) -> Result<At, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(At::Now);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(t) {
        return Ok(At::Time(t.with_timezone(&Utc)));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(t) {
        return Ok(At::Time(DateTime::<Utc>::from(t)));
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(At::Ago(d)),
        Err(_) => Err(format!(
            "{s:?} is neither a time (RFC 3339, e.g. 2026-11-24T08:00:00Z), `now`, nor a duration ago (e.g. 30m, 2h, 1d)"
        )),
    }
}

/// The cut-off in UTC, to the microsecond (PostgreSQL's precision).
async fn resolve_at(conn: &mut PgConnection, at: &At) -> anyhow::Result<DateTime<Utc>> {
    let t = match at {
        At::Time(t) => *t,
        At::Now | At::Ago(_) => {
            let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| anyhow::anyhow!("reading the database's clock failed: {e}"))?;
            match at {
                At::Ago(d) => chrono::Duration::from_std(*d)
                    .ok()
                    .and_then(|d| now.checked_sub_signed(d))
                    .ok_or_else(|| anyhow::anyhow!("--at {d:?} ago reaches too far back"))?,
                _ => now,
            }
        }
    };
    Ok(t.trunc_subsecs(6))
}

async fn resolve_target(conn: &mut PgConnection, p: &PipelineConfig) -> anyhow::Result<Target> {
    let configured = match &p.target_schema {
        Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&p.target_table)),
        None => quote_ident(&p.target_table),
    };
    let row = sqlx::query(
        "SELECT n.nspname::text AS schema, c.relname::text AS tbl
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1)",
    )
    .bind(&configured)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| anyhow::anyhow!("looking up the target table {configured} failed: {e}"))?;
    let Some(row) = row else {
        anyhow::bail!(
            "pipeline {:?}'s target table {configured} does not exist: create it (the demo's is deploy/sql/person.sql) or fix `target` in the config",
            p.name
        );
    };
    let schema: String = row.try_get("schema")?;
    let table: String = row.try_get("tbl")?;
    Ok(Target {
        qualified: format!("{}.{}", quote_ident(&schema), quote_ident(&table)),
        schema,
        table,
    })
}

async fn columns(conn: &mut PgConnection, target: &Target) -> anyhow::Result<Vec<Column>> {
    let rows = sqlx::query(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type_text,
                t.typname::text AS typname, a.atthasdef AS has_default
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(&target.qualified)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| anyhow::anyhow!("reading the columns of {} failed: {e}", target.qualified))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(Column {
            name: r.try_get("name")?,
            type_text: r.try_get("type_text")?,
            typname: r.try_get("typname")?,
            has_default: r.try_get("has_default")?,
        });
    }
    Ok(out)
}

/// The column `wanted` (exact name, else the one matching case-insensitively), if it is a
/// timestamp; else an error naming the columns that are.
fn pick_column<'c>(
    cols: &'c [Column],
    wanted: &str,
    target: &Target,
) -> anyhow::Result<&'c Column> {
    let found = cols.iter().find(|c| c.name == wanted).or_else(|| {
        let mut m = cols.iter().filter(|c| c.name.eq_ignore_ascii_case(wanted));
        match (m.next(), m.next()) {
            (Some(c), None) => Some(c),
            _ => None,
        }
    });
    let stamps: Vec<String> = cols
        .iter()
        .filter(|c| c.is_timestamp())
        .map(|c| {
            format!(
                "{} ({}{})",
                c.name,
                c.type_text,
                if c.has_default {
                    ", filled by the database"
                } else {
                    ""
                }
            )
        })
        .collect();
    let choose = if stamps.is_empty() {
        format!(
            "{} has no timestamp column to cut at: add one the database fills at insert, e.g. `ALTER TABLE {} ADD COLUMN db_time timestamp(6) DEFAULT clock_timestamp()` (rows already there get the time of the ALTER)",
            target.qualified, target.qualified
        )
    } else {
        format!(
            "its timestamp columns are: {}; choose one with --column (the one the database fills at insert)",
            stamps.join(", ")
        )
    };
    match found {
        None => anyhow::bail!("column {wanted:?} is not in {}; {choose}", target.qualified),
        Some(c) if !c.is_timestamp() => anyhow::bail!(
            "column {:?} of {} is {}, not a timestamp; {choose}",
            c.name,
            target.qualified,
            c.type_text
        ),
        Some(c) => Ok(c),
    }
}

/// (schema, name) of `--name`: `NAME` in `default_schema`, or `SCHEMA.NAME`.
fn parse_name(s: &str, default_schema: &str) -> anyhow::Result<(String, String)> {
    let (schema, name) = match s.split_once('.') {
        Some((sc, n)) => (sc.to_string(), n.to_string()),
        None => (default_schema.to_string(), s.to_string()),
    };
    if !is_identifier(&name) || !is_identifier(&schema) {
        anyhow::bail!(
            "--name {s:?} is not NAME or SCHEMA.NAME made of plain SQL identifiers (a letter or _, then letters, digits or _; at most 63 bytes)"
        );
    }
    Ok((schema, name))
}

/// `<table>_at_<yyyymmdd_hhmmss>` of the cut-off in UTC.
fn default_name(table: &str, at: DateTime<Utc>) -> anyhow::Result<String> {
    let name = format!("{table}_at_{}", at.format("%Y%m%d_%H%M%S"));
    if !is_identifier(&name) {
        anyhow::bail!(
            "the default view name {name:?} is not a plain SQL identifier of at most 63 bytes: give one with --name"
        );
    }
    Ok(name)
}

/// The cut-off as a SQL literal for a column of type `typname`.
fn cutoff_literal(typname: &str, at: DateTime<Utc>) -> String {
    let text = at.format("%Y-%m-%d %H:%M:%S%.6f");
    if typname == "timestamptz" {
        format!("TIMESTAMPTZ '{text}+00'")
    } else {
        // Wall-clock UTC: what conveyor's sessions (TimeZone = UTC) store in such a column.
        format!("TIMESTAMP '{text}'")
    }
}

fn view_sql(view: &str, target: &Target, column: &Column, at: DateTime<Utc>) -> String {
    format!(
        "CREATE OR REPLACE VIEW {view} AS\nSELECT * FROM {}\nWHERE {} <= {}",
        target.qualified,
        quote_ident(&column.name),
        cutoff_literal(&column.typname, at)
    )
}

async fn create_view(
    conn: &mut PgConnection,
    target: &Target,
    wanted: &str,
    cutoff: DateTime<Utc>,
    (schema, name): (&str, &str),
    view: &str,
) -> anyhow::Result<()> {
    let cols = columns(conn, target).await?;
    let column = pick_column(&cols, wanted, target)?;
    // CREATE OR REPLACE would replace any view of that name: only ours (over the target) may go.
    let existing = relkind(conn, schema, name, view).await?;
    if let Some(k) = existing.as_deref().filter(|k| *k != "v") {
        anyhow::bail!(
            "{view} exists and is {}: choose another --name; nothing changed",
            kind_name(k)
        );
    }
    if existing.is_some()
        && !views_over(conn, target)
            .await?
            .iter()
            .any(|v| *v == format!("{schema}.{name}"))
    {
        anyhow::bail!(
            "a view {view} exists and does not read {}: not replaced; choose another --name",
            target.qualified
        );
    }
    if !column.has_default {
        eprintln!(
            "note: column {} has no DEFAULT, so the database does not fill it at insert: the view cuts at the values the rows carry, not at when they were loaded",
            column.name
        );
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| anyhow::anyhow!("reading the database's clock failed: {e}"))?;
    let sql = view_sql(view, target, column, cutoff);
    let at_text = format!("{} UTC", cutoff.format("%Y-%m-%d %H:%M:%S%.6f"));
    let comment = format!(
        "conveyor point-in-time view: the rows of {} with {} <= {at_text}",
        target.qualified, column.name
    );
    let result: Result<(), sqlx::Error> = async {
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "COMMENT ON VIEW {view} IS '{}'",
            comment.replace('\'', "''")
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = result {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .unwrap_or_default();
        anyhow::bail!(
            "creating view {view} failed: {e}{}",
            match code.as_ref() {
                "42P16" => " (a view of that name exists with other columns: drop it first with --drop --name)",
                "42501" => " (the database user needs CREATE on the view's schema and SELECT on the target table)",
                "3F000" => " (no such schema: create it, or name an existing one in --name)",
                _ => "",
            }
        );
    }
    println!(
        "created view {view}: the rows of {} with {} <= {at_text}",
        target.qualified, column.name
    );
    println!("{sql};");
    if cutoff > now {
        eprintln!(
            "note: the cut-off is {:.1} s ahead of the database's clock: the view keeps gaining rows until then",
            (cutoff - now).num_milliseconds() as f64 / 1000.0
        );
    }
    Ok(())
}

async fn drop_view(
    conn: &mut PgConnection,
    target: &Target,
    schema: &str,
    name: &str,
    view: &str,
    p: &PipelineConfig,
) -> anyhow::Result<()> {
    let kind = relkind(conn, schema, name, view).await?;
    let over_target = views_over(conn, target).await?;
    let listing = if over_target.is_empty() {
        format!("no view reads {}", target.qualified)
    } else {
        format!(
            "the views that read {}: {}",
            target.qualified,
            over_target.join(", ")
        )
    };
    match kind.as_deref() {
        None => anyhow::bail!("there is no view {view}; {listing}"),
        Some("v") => {}
        Some(k) => anyhow::bail!("{view} is {}, not a view: nothing dropped", kind_name(k)),
    }
    if !over_target.iter().any(|v| *v == format!("{schema}.{name}")) {
        anyhow::bail!(
            "view {view} does not read {} (pipeline {:?}'s target): not dropped; {listing}",
            target.qualified,
            p.name
        );
    }
    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP VIEW {view}")))
        .execute(&mut *conn)
        .await
    {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .unwrap_or_default();
        anyhow::bail!(
            "dropping view {view} failed: {e}{}",
            match code.as_ref() {
                "2BP01" =>
                    " (other objects read it: drop them first; conveyor never drops with CASCADE)",
                "42501" => " (only the view's owner may drop it)",
                _ => "",
            }
        );
    }
    println!("dropped view {view}");
    Ok(())
}

/// The `pg_class.relkind` of `schema.name`, if it exists.
async fn relkind(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
    view: &str,
) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| anyhow::anyhow!("looking up {view} failed: {e}"))
}

/// "a table", "an index", … for a `relkind` that is not a view.
fn kind_name(relkind: &str) -> &'static str {
    match relkind {
        "r" | "p" => "a table",
        "m" => "a materialized view",
        "S" => "a sequence",
        "i" | "I" => "an index",
        "f" => "a foreign table",
        "v" => "a view",
        _ => "another kind of object",
    }
}

/// `schema.name` of every view that reads the target table, sorted.
async fn views_over(conn: &mut PgConnection, target: &Target) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT n.nspname::text || '.' || v.relname::text
         FROM pg_depend d
         JOIN pg_rewrite r ON r.oid = d.objid
         JOIN pg_class v ON v.oid = r.ev_class
         JOIN pg_namespace n ON n.oid = v.relnamespace
         WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
           AND d.refobjid = $1::regclass AND v.oid <> $1::regclass AND v.relkind = 'v'
         ORDER BY 1",
    )
    .bind(&target.qualified)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| anyhow::anyhow!("listing the views over {} failed: {e}", target.qualified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_at("now"), Ok(At::Now));
        assert_eq!(parse_at("NOW"), Ok(At::Now));
        assert_eq!(parse_at("1h"), Ok(At::Ago(Duration::from_secs(3600))));
        assert_eq!(
            parse_at("2026-11-24T09:00:00+01:00"),
            Ok(At::Time(utc("2026-11-24T08:00:00Z")))
        );
        // Without an offset: UTC.
        assert_eq!(
            parse_at("2026-11-24 08:00:00"),
            Ok(At::Time(utc("2026-11-24T08:00:00Z")))
        );
        assert!(parse_at("tomorrow-ish").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn names_default_to_the_table_and_the_time() {
        let t = utc("2026-11-24T08:05:09.123456Z");
        assert_eq!(
            default_name("person", t).unwrap(),
            "person_at_20261124_080509"
        );
        assert!(default_name(&"x".repeat(60), t)
            .unwrap_err()
            .to_string()
            .contains("--name"));
        assert_eq!(
            parse_name("v1", "public").unwrap(),
            ("public".into(), "v1".into())
        );
        assert_eq!(
            parse_name("rep.v1", "public").unwrap(),
            ("rep".into(), "v1".into())
        );
        assert!(parse_name("v1; DROP TABLE x", "public").is_err());
        assert!(parse_name("a.b.c", "public").is_err());
    }

    #[test]
    fn the_cutoff_is_written_for_the_columns_type() {
        let t = utc("2026-11-24T08:05:09.1234567Z").trunc_subsecs(6);
        assert_eq!(
            cutoff_literal("timestamp", t),
            "TIMESTAMP '2026-11-24 08:05:09.123456'"
        );
        assert_eq!(
            cutoff_literal("timestamptz", t),
            "TIMESTAMPTZ '2026-11-24 08:05:09.123456+00'"
        );
    }

    #[test]
    fn only_timestamp_columns_are_accepted() {
        let col = |name: &str, typname: &str, has_default| Column {
            name: name.into(),
            type_text: typname.into(),
            typname: typname.into(),
            has_default,
        };
        let cols = [
            col("id", "bpchar", false),
            col("queue_time", "timestamp", false),
            col("DB_Time", "timestamp", true),
        ];
        let target = Target {
            schema: "s".into(),
            table: "t".into(),
            qualified: "\"s\".\"t\"".into(),
        };
        assert_eq!(
            pick_column(&cols, "db_time", &target).unwrap().name,
            "DB_Time"
        );
        let e = pick_column(&cols, "nope", &target).unwrap_err().to_string();
        assert!(e.contains("queue_time") && e.contains("DB_Time"), "{e}");
        let e = pick_column(&cols, "id", &target).unwrap_err().to_string();
        assert!(e.contains("not a timestamp"), "{e}");
        let e = pick_column(&cols[..1], "db_time", &target)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ADD COLUMN db_time"), "{e}");
    }
}
