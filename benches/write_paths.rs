//! Write-path benchmark: which way of writing one batch transaction into the demo `person`
//! table (`deploy/sql/person.sql`, 33 columns, 32 written by us, `db_time` left to its
//! default) loads rows fastest?
//!
//! Candidates, each loading the same N generated rows (~650 bytes each, random strings, ints,
//! decimals, dates and a timestamp within every column's declared length, plus a few tabs,
//! newlines, backslashes, quotes and non-ASCII characters) in batches of `pack` rows, one
//! transaction (`BEGIN … COMMIT`) per batch, on one connection, the table truncated (and a
//! `CHECKPOINT` taken) between candidates:
//!
//! * `copy_text`     — `COPY person (cols) FROM STDIN` in text format; the batch is encoded
//!   (with COPY escaping) inside the timed loop, then sent as one `CopyData` stream;
//! * `insert_values` — multi-row `INSERT … VALUES ($1,…),(…)` with bind parameters, a batch
//!   split into statements of at most `floor(65535 / 32)` rows (PostgreSQL's limit on bind
//!   parameters per statement);
//! * `insert_unnest` — `INSERT … SELECT * FROM UNNEST($1::text[], $2::int4[], …)`, one array
//!   parameter per column;
//! * `copy_text_x2`  — `copy_text` on two connections in parallel (two tokio tasks, each with
//!   its own connection and half of the batches): what `sessions = 2` buys on this host.
//!
//! It prints, per candidate and pack: rows, seconds, rows/s and the ratio to `copy_text` at the
//! same pack, and writes the same table as JSON to `target/bench/write_paths.json`.
//!
//! Run it (release build, needs a PostgreSQL it may create and drop a schema in):
//!
//! ```text
//! cargo bench --bench write_paths
//! WP_ROWS=50000 WP_PACKS=100,1000 cargo bench --bench write_paths
//! ```
//!
//! The database is `postgres://postgres@127.0.0.1:5432/test` unless `CONVEYOR_DATABASE_URL`
//! says otherwise. Everything happens in a fresh schema `wp_bench_<random>`, dropped at the
//! end, also when a candidate fails. Without `--bench` among the arguments (as under
//! `cargo test --all-targets`) it does a smoke run instead: 300 rows, pack 100, every
//! candidate, checking the row count and every value read back; no JSON is written.
//! It is self-contained: it does not use the `conveyor` library.

use std::collections::HashMap;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use futures_util::FutureExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Row as _};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const URL_ENV: &str = "CONVEYOR_DATABASE_URL";
const DDL: &str = include_str!("../deploy/sql/person.sql");
/// PostgreSQL's limit on bind parameters in one statement (the protocol counts them in an i16).
const MAX_BIND_PARAMS: usize = 65535;
const SMOKE_ROWS: usize = 300;
const SMOKE_PACK: usize = 100;
const BENCH_ROWS: usize = 200_000;
const BENCH_PACKS: [usize; 3] = [100, 1000, 5000];

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `char(n)`: always exactly n characters (no trailing blanks to lose).
    Char(usize),
    Varchar(usize),
    Int,
    /// `numeric(9,2)`, carried as its decimal text.
    Num,
    Date,
    Ts,
}

use Kind::*;

/// The written columns of `person`, in table order, with the chance of a NULL.
const COLS: [(&str, Kind, f64); 32] = [
    ("id", Char(20), 0.0),
    ("home_status", Varchar(12), 0.05),
    ("age", Int, 0.02),
    ("gender", Char(1), 0.0),
    ("occupation", Varchar(50), 0.05),
    ("income", Num, 0.02),
    ("os", Varchar(15), 0.0),
    ("last_update", Date, 0.0),
    ("marital_status", Varchar(12), 0.05),
    ("zip", Char(10), 0.0),
    ("education", Varchar(24), 0.05),
    ("prefix_description", Varchar(4), 0.3),
    ("isp", Varchar(100), 0.0),
    ("fname", Varchar(20), 0.0),
    ("dma_lu", Varchar(12), 0.05),
    ("lname", Varchar(20), 0.0),
    ("browser", Varchar(55), 0.0),
    ("mname", Varchar(20), 0.3),
    ("creditnum", Varchar(20), 0.0),
    ("suffix_description", Varchar(4), 0.5),
    ("creditexp", Date, 0.0),
    ("address1", Varchar(40), 0.0),
    ("work_status", Varchar(12), 0.05),
    ("credit_type", Varchar(12), 0.0),
    ("events", Varchar(50), 0.0),
    ("address2", Varchar(40), 0.3),
    ("city", Varchar(20), 0.0),
    ("telephone", Char(14), 0.0),
    ("email", Varchar(55), 0.0),
    ("state", Varchar(20), 0.0),
    ("country", Varchar(20), 0.0),
    ("queue_time", Ts, 0.0),
];
const NCOLS: usize = COLS.len();
/// Rows per multi-row INSERT statement.
const VALUES_CHUNK: usize = MAX_BIND_PARAMS / NCOLS;

#[derive(Clone, Debug, PartialEq)]
enum Val {
    /// `Char`, `Varchar` and `Num` columns.
    Text(Option<String>),
    Int(Option<i32>),
    Date(Option<NaiveDate>),
    Ts(Option<NaiveDateTime>),
}

type Row = Vec<Val>;

// ---------------------------------------------------------------------------------------------
// Row generation

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Occasional characters that COPY text must escape or that are otherwise easy to mangle.
const SPECIAL: [char; 12] = [
    '\\', '\t', '\n', '\r', '\'', '"', ',', '|', 'é', 'ß', '€', 'N',
];

fn random_text(rng: &mut StdRng, len: usize, specials: bool) -> String {
    let mut chars: Vec<char> = (0..len)
        .map(|i| {
            // Inner blanks only: a trailing blank would vanish from char(n).
            if i > 0 && i + 1 < len && rng.random_bool(0.12) {
                ' '
            } else {
                ALNUM[rng.random_range(0..ALNUM.len())] as char
            }
        })
        .collect();
    if specials && len >= 2 && rng.random_bool(0.05) {
        let at = rng.random_range(0..len);
        chars[at] = SPECIAL[rng.random_range(0..SPECIAL.len())];
        if rng.random_bool(0.2) {
            // The COPY NULL marker spelled out as data.
            chars[0] = '\\';
            chars[1] = 'N';
        }
    }
    chars.into_iter().collect()
}

fn gen_rows(n: usize, seed: u64) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base_date = NaiveDate::from_ymd_opt(1990, 1, 1).expect("valid date");
    let base_ts = DateTime::from_timestamp(1_704_067_200, 0).expect("valid ts"); // 2024-01-01
    let mut ids = std::collections::HashSet::with_capacity(n);
    (0..n)
        .map(|_| {
            COLS.iter()
                .map(|&(name, kind, null_p)| {
                    let null = null_p > 0.0 && rng.random_bool(null_p);
                    match kind {
                        Char(len) if name == "id" => loop {
                            let id = random_text(&mut rng, len, false).replace(' ', "x");
                            if ids.insert(id.clone()) {
                                break Val::Text(Some(id));
                            }
                        },
                        Char(len) => Val::Text((!null).then(|| random_text(&mut rng, len, false))),
                        Varchar(max) => {
                            let len = rng.random_range((max * 7).div_ceil(10).max(1)..=max);
                            Val::Text((!null).then(|| random_text(&mut rng, len, true)))
                        }
                        Int => Val::Int((!null).then(|| rng.random_range(18..=95))),
                        Num => Val::Text((!null).then(|| {
                            let cents: u64 = rng.random_range(0..1_000_000_000);
                            format!("{}.{:02}", cents / 100, cents % 100)
                        })),
                        Date => {
                            Val::Date((!null).then(|| {
                                base_date + chrono::Days::new(rng.random_range(0..15_000))
                            }))
                        }
                        Ts => Val::Ts((!null).then(|| {
                            let micros = rng.random_range(0..366 * 86_400 * 1_000_000i64);
                            (base_ts + chrono::TimeDelta::microseconds(micros)).naive_utc()
                        })),
                    }
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// COPY text encoding

fn copy_escape(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        buf.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            _ => buf.push(b),
        }
    }
}

fn encode_copy_text(rows: &[Row], buf: &mut Vec<u8>) {
    for row in rows {
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            // Writing into a Vec cannot fail.
            let _ = match v {
                Val::Text(Some(s)) => {
                    copy_escape(buf, s);
                    Ok(())
                }
                Val::Int(Some(n)) => write!(buf, "{n}"),
                Val::Date(Some(d)) => write!(buf, "{d}"),
                Val::Ts(Some(t)) => write!(buf, "{t}"),
                Val::Text(None) | Val::Int(None) | Val::Date(None) | Val::Ts(None) => {
                    buf.extend_from_slice(b"\\N");
                    Ok(())
                }
            };
        }
        buf.push(b'\n');
    }
}

// ---------------------------------------------------------------------------------------------
// The candidates

#[derive(Clone, Copy, PartialEq)]
enum Candidate {
    CopyText,
    InsertValues,
    InsertUnnest,
    CopyTextX2,
}

impl Candidate {
    const ALL: [Candidate; 4] = [
        Candidate::CopyText,
        Candidate::InsertValues,
        Candidate::InsertUnnest,
        Candidate::CopyTextX2,
    ];

    fn name(self) -> &'static str {
        match self {
            Candidate::CopyText => "copy_text",
            Candidate::InsertValues => "insert_values",
            Candidate::InsertUnnest => "insert_unnest",
            Candidate::CopyTextX2 => "copy_text_x2",
        }
    }
}

/// SQL text shared by the candidates, built once per schema.
struct Sql {
    table: String,
    copy: String,
    unnest: Arc<str>,
    /// Multi-row INSERT per number of rows in the statement.
    values: HashMap<usize, Arc<str>>,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let table = format!("{schema}.person");
        let cols = COLS.iter().map(|c| c.0).collect::<Vec<_>>().join(", ");
        let arrays = COLS
            .iter()
            .enumerate()
            .map(|(i, &(_, kind, _))| format!("${}::{}[]", i + 1, sql_type(kind)))
            .collect::<Vec<_>>()
            .join(", ");
        Sql {
            copy: format!("COPY {table} ({cols}) FROM STDIN"),
            unnest: format!("INSERT INTO {table} ({cols}) SELECT * FROM UNNEST({arrays})").into(),
            values: HashMap::new(),
            table,
        }
    }

    fn values(&mut self, rows: usize) -> Arc<str> {
        let table = &self.table;
        self.values
            .entry(rows)
            .or_insert_with(|| {
                let cols = COLS.iter().map(|c| c.0).collect::<Vec<_>>().join(", ");
                let mut sql = format!("INSERT INTO {table} ({cols}) VALUES ");
                for r in 0..rows {
                    sql.push_str(if r == 0 { "(" } else { ",(" });
                    for (c, &(_, kind, _)) in COLS.iter().enumerate() {
                        if c > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&format!("${}", r * NCOLS + c + 1));
                        if matches!(kind, Num) {
                            sql.push_str("::numeric");
                        }
                    }
                    sql.push(')');
                }
                sql.into()
            })
            .clone()
    }
}

fn sql_type(kind: Kind) -> &'static str {
    match kind {
        Char(_) | Varchar(_) => "text",
        Int => "int4",
        Num => "numeric",
        Date => "date",
        Ts => "timestamp",
    }
}

async fn load_copy_text(
    conn: &mut PgConnection,
    copy_sql: &str,
    batches: &[&[Row]],
) -> Result<u64> {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut total = 0;
    for batch in batches {
        buf.clear();
        encode_copy_text(batch, &mut buf);
        let mut tx = conn.begin().await?;
        let mut copy = tx.copy_in_raw(copy_sql).await?;
        if let Err(e) = copy.send(&buf[..]).await {
            let _ = copy.abort("send failed").await;
            return Err(e.into());
        }
        total += copy.finish().await?;
        tx.commit().await?;
    }
    Ok(total)
}

fn bind_val<'q>(q: Query<'q, Postgres, PgArguments>, v: &Val) -> Query<'q, Postgres, PgArguments> {
    match v {
        Val::Text(s) => q.bind(s.as_deref()),
        Val::Int(n) => q.bind(*n),
        Val::Date(d) => q.bind(*d),
        Val::Ts(t) => q.bind(*t),
    }
}

async fn load_insert_values(
    conn: &mut PgConnection,
    sql: &mut Sql,
    batches: &[&[Row]],
) -> Result<u64> {
    let mut total = 0;
    for batch in batches {
        let mut tx = conn.begin().await?;
        for chunk in batch.chunks(VALUES_CHUNK) {
            let mut q = sqlx::query(AssertSqlSafe(sql.values(chunk.len())));
            for row in chunk {
                for v in row {
                    q = bind_val(q, v);
                }
            }
            total += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
    }
    Ok(total)
}

async fn load_insert_unnest(conn: &mut PgConnection, sql: &Sql, batches: &[&[Row]]) -> Result<u64> {
    let mut total = 0;
    for batch in batches {
        let mut q = sqlx::query(AssertSqlSafe(sql.unnest.clone()));
        for (c, &(_, kind, _)) in COLS.iter().enumerate() {
            q = match kind {
                Char(_) | Varchar(_) | Num => q.bind(
                    batch
                        .iter()
                        .map(|r| match &r[c] {
                            Val::Text(s) => s.as_deref(),
                            _ => unreachable!("text column"),
                        })
                        .collect::<Vec<Option<&str>>>(),
                ),
                Int => q.bind(
                    batch
                        .iter()
                        .map(|r| match r[c] {
                            Val::Int(n) => n,
                            _ => unreachable!("int column"),
                        })
                        .collect::<Vec<Option<i32>>>(),
                ),
                Date => q.bind(
                    batch
                        .iter()
                        .map(|r| match r[c] {
                            Val::Date(d) => d,
                            _ => unreachable!("date column"),
                        })
                        .collect::<Vec<Option<NaiveDate>>>(),
                ),
                Ts => q.bind(
                    batch
                        .iter()
                        .map(|r| match r[c] {
                            Val::Ts(t) => t,
                            _ => unreachable!("timestamp column"),
                        })
                        .collect::<Vec<Option<NaiveDateTime>>>(),
                ),
            };
        }
        let mut tx = conn.begin().await?;
        total += q.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
    }
    Ok(total)
}

/// `copy_text` on two connections, each loading half of the batches, in parallel.
async fn load_copy_text_x2(
    conns: [PgConnection; 2],
    copy_sql: &str,
    rows: &Arc<Vec<Row>>,
    pack: usize,
) -> Result<(u64, [PgConnection; 2])> {
    let nbatches = rows.len().div_ceil(pack);
    let split = nbatches.div_ceil(2) * pack;
    let ranges = [0..split.min(rows.len()), split.min(rows.len())..rows.len()];
    let mut tasks = Vec::new();
    for (mut conn, range) in conns.into_iter().zip(ranges) {
        let rows = Arc::clone(rows);
        let copy_sql = copy_sql.to_owned();
        tasks.push(tokio::spawn(async move {
            let batches: Vec<&[Row]> = rows[range].chunks(pack).collect();
            let n = load_copy_text(&mut conn, &copy_sql, &batches).await;
            (n, conn)
        }));
    }
    let mut total = 0;
    let mut back = Vec::new();
    for task in tasks {
        let (n, conn) = task.await.context("copy_text_x2 task panicked")?;
        total += n?;
        back.push(conn);
    }
    let back: [PgConnection; 2] = back
        .try_into()
        .map_err(|_| anyhow::anyhow!("lost a connection"))?;
    Ok((total, back))
}

// ---------------------------------------------------------------------------------------------
// Driver

struct Measured {
    candidate: &'static str,
    pack: usize,
    rows: usize,
    seconds: f64,
    rows_per_s: f64,
    ratio_to_copy: f64,
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

async fn create_schema(conn: &mut PgConnection, schema: &str) -> Result<()> {
    exec(
        conn,
        format!("CREATE SCHEMA {schema}; SET search_path TO {schema}; {DDL}; RESET search_path"),
    )
    .await
    .context("creating the bench schema and table")?;
    // The column list above must still match deploy/sql/person.sql.
    let cols: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'person' AND column_name <> 'db_time' \
         ORDER BY ordinal_position",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    let ours: Vec<&str> = COLS.iter().map(|c| c.0).collect();
    ensure!(
        cols == ours,
        "deploy/sql/person.sql columns changed; update COLS in benches/write_paths.rs: {cols:?}"
    );
    Ok(())
}

async fn drop_schema(conn: &mut PgConnection, url: &str, schema: &str) -> Result<()> {
    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
    if exec(conn, sql.clone()).await.is_ok() {
        return Ok(());
    }
    // The main connection may be unusable after a failure: retry on a fresh one.
    let mut fresh = PgConnection::connect(url).await?;
    exec(&mut fresh, sql)
        .await
        .with_context(|| format!("dropping schema {schema}"))
}

/// Reads everything back and compares it with what was generated.
async fn verify_contents(conn: &mut PgConnection, table: &str, rows: &[Row]) -> Result<()> {
    let select = COLS
        .iter()
        .map(|&(name, kind, _)| match kind {
            Char(_) | Varchar(_) | Num => format!("{name}::text"),
            _ => name.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let got: Vec<PgRow> = sqlx::query(AssertSqlSafe(format!("SELECT {select} FROM {table}")))
        .fetch_all(&mut *conn)
        .await?;
    let mut by_id: HashMap<String, Row> = HashMap::with_capacity(got.len());
    for r in &got {
        let mut row = Row::with_capacity(NCOLS);
        for (c, &(_, kind, _)) in COLS.iter().enumerate() {
            row.push(match kind {
                Char(_) | Varchar(_) | Num => Val::Text(r.try_get(c)?),
                Int => Val::Int(r.try_get(c)?),
                Date => Val::Date(r.try_get(c)?),
                Ts => Val::Ts(r.try_get(c)?),
            });
        }
        let Val::Text(Some(id)) = &row[0] else {
            bail!("row without id")
        };
        by_id.insert(id.clone(), row);
    }
    for want in rows {
        let Val::Text(Some(id)) = &want[0] else {
            bail!("generated row without id")
        };
        let Some(have) = by_id.get(id) else {
            bail!("row {id} missing")
        };
        for (c, (w, h)) in want.iter().zip(have).enumerate() {
            ensure!(
                w == h,
                "row {id}, column {}: wrote {w:?}, read back {h:?}",
                COLS[c].0
            );
        }
    }
    Ok(())
}

async fn measure(
    conn: &mut PgConnection,
    url: &str,
    schema: &str,
    rows: &Arc<Vec<Row>>,
    packs: &[usize],
    smoke: bool,
) -> Result<Vec<Measured>> {
    let mut sql = Sql::new(schema);
    let mut pair = [
        PgConnection::connect(url).await?,
        PgConnection::connect(url).await?,
    ];
    let n = rows.len();
    let mut out = Vec::new();
    for &pack in packs {
        let batches: Vec<&[Row]> = rows.chunks(pack).collect();
        let mut copy_rate = None;
        for cand in Candidate::ALL {
            exec(conn, format!("TRUNCATE {}", sql.table)).await?;
            // Keep a checkpoint triggered by the previous candidate out of this one's time.
            let _ = exec(conn, "CHECKPOINT".to_owned()).await;
            let start = Instant::now();
            let loaded = match cand {
                Candidate::CopyText => load_copy_text(conn, &sql.copy, &batches).await?,
                Candidate::InsertValues => load_insert_values(conn, &mut sql, &batches).await?,
                Candidate::InsertUnnest => load_insert_unnest(conn, &sql, &batches).await?,
                Candidate::CopyTextX2 => {
                    let (loaded, back) = load_copy_text_x2(pair, &sql.copy, rows, pack).await?;
                    pair = back;
                    loaded
                }
            };
            let seconds = start.elapsed().as_secs_f64();
            let counted: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {}", sql.table)))
                    .fetch_one(&mut *conn)
                    .await?;
            ensure!(
                loaded == n as u64 && counted == n as i64,
                "{} at pack {pack}: reported {loaded} rows, table holds {counted}, expected {n}",
                cand.name()
            );
            if smoke {
                verify_contents(conn, &sql.table, rows)
                    .await
                    .with_context(|| format!("{} at pack {pack}", cand.name()))?;
            }
            let rows_per_s = n as f64 / seconds;
            let base = *copy_rate.get_or_insert(rows_per_s);
            out.push(Measured {
                candidate: cand.name(),
                pack,
                rows: n,
                seconds,
                rows_per_s,
                ratio_to_copy: rows_per_s / base,
            });
            eprintln!(
                "  {:<14} pack {:>5}: {:>9.0} rows/s",
                cand.name(),
                pack,
                rows_per_s
            );
        }
    }
    for c in pair {
        let _ = c.close().await;
    }
    Ok(out)
}

fn print_table(results: &[Measured]) {
    println!(
        "{:<14} {:>6} {:>8} {:>9} {:>10} {:>8}",
        "candidate", "pack", "rows", "seconds", "rows/s", "vs COPY"
    );
    for m in results {
        println!(
            "{:<14} {:>6} {:>8} {:>9.3} {:>10.0} {:>8.2}",
            m.candidate, m.pack, m.rows, m.seconds, m.rows_per_s, m.ratio_to_copy
        );
    }
}

fn write_json(results: &[Measured], avg_row_bytes: f64) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    std::fs::create_dir_all(&dir)?;
    let table: Vec<serde_json::Value> = results
        .iter()
        .map(|m| {
            serde_json::json!({
                "candidate": m.candidate,
                "pack": m.pack,
                "rows": m.rows,
                "seconds": m.seconds,
                "rows_per_s": m.rows_per_s,
                "ratio_to_copy": m.ratio_to_copy,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "bench": "write_paths",
        "avg_row_bytes_copy_text": avg_row_bytes,
        "columns_written": NCOLS,
        "values_rows_per_statement": VALUES_CHUNK,
        "results": table,
    });
    let path = dir.join("write_paths.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.trim().parse().with_context(|| format!("{name}={v:?}"))?,
        )),
        Err(_) => Ok(None),
    }
}

async fn run(bench: bool) -> Result<()> {
    let (n, packs) = if bench {
        let n = env_usize("WP_ROWS")?.unwrap_or(BENCH_ROWS);
        let packs = match std::env::var("WP_PACKS") {
            Ok(v) => v
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<usize>()
                        .with_context(|| format!("WP_PACKS={v:?}"))
                })
                .collect::<Result<Vec<_>>>()?,
            Err(_) => BENCH_PACKS.to_vec(),
        };
        (n, packs)
    } else {
        (SMOKE_ROWS, vec![SMOKE_PACK])
    };
    ensure!(
        n > 0 && packs.iter().all(|&p| p > 0),
        "rows and packs must be positive"
    );

    let rows = Arc::new(gen_rows(n, 0x5EED));
    let mut probe = Vec::new();
    encode_copy_text(&rows, &mut probe);
    let avg_row_bytes = probe.len() as f64 / n as f64;
    drop(probe);
    eprintln!(
        "write_paths: {n} rows (~{avg_row_bytes:.0} bytes each as COPY text), packs {packs:?}{}",
        if bench {
            ""
        } else {
            " (smoke run; pass --bench for the real one)"
        }
    );

    let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let mut conn = PgConnection::connect(&url)
        .await
        .with_context(|| format!("connecting to {url} (set {URL_ENV} to use another database)"))?;
    let schema = format!("wp_bench_{:08x}", rand::random::<u32>());

    let outcome = AssertUnwindSafe(async {
        create_schema(&mut conn, &schema).await?;
        measure(&mut conn, &url, &schema, &rows, &packs, !bench).await
    })
    .catch_unwind()
    .await;
    let dropped = drop_schema(&mut conn, &url, &schema).await;
    let results = match outcome {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    dropped?;
    let _ = conn.close().await;

    print_table(&results);
    if bench {
        write_json(&results, avg_row_bytes)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(bench))
}
