//! `conveyor errors`: shows the rejected rows of jobs — the error tables of jobs not yet
//! consolidated (`et_<job>`, `uv_<job>`) and `error_history` — as a table, JSON or JSON lines,
//! or exports them as JSON lines that `conveyor feed --file` re-sends.
//!
//! Consistency: consolidation moves rows from a job's table into the history, one transaction
//! per step, and drops the table, at any moment. So every read here happens in one
//! `REPEATABLE READ` transaction (one snapshot: the listing of the tables, the count and the
//! rows agree), and the rows come from one statement, a `UNION ALL` of the history and every
//! listed table: a row is seen either in its job's table or in the history, never both, never
//! neither. A table dropped between the listing and the read (SQLSTATE 42P01) makes the read
//! start again.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::db::quote_ident;
use crate::decode::RejectKind;

mod read;

use read::read_rows;

/// Rows shown when `--limit` is not given (an export writes every matching row).
const DEFAULT_LIMIT: u64 = 1000;
/// Characters of a message shown in the table.
const TABLE_MESSAGE_CHARS: usize = 60;
/// Characters of a payload shown in the table.
const TABLE_PAYLOAD_CHARS: usize = 100;
/// Attempts to read while tables keep vanishing under consolidation.
const READ_ATTEMPTS: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns: job, kind, seq, code, column, message and payload, both shortened.
    Table,
    /// One JSON array of objects (the fields of --export, whole payloads).
    Json,
    /// One JSON object per line (the format of --export).
    Jsonl,
}

/// Which rows `--kind` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindFilter {
    /// `et` or `uv`: one of the two error tables.
    Table(&'static str),
    /// One reject code (`RejectKind::as_str`).
    Code(&'static str),
}

#[derive(Debug, clap::Args)]
pub struct ErrorsArgs {
    /// Only this job's rows (a name like 20261124_013000_person_01, as in the jobs table and
    /// the report files).
    #[arg(long)]
    pub job: Option<String>,
    /// Only rows of this pipeline's jobs.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Only rows recorded at or after this time: RFC 3339 (2026-11-24T01:00:00Z) or a
    /// duration ago (30m, 2h, 1d).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// Only `et` (rows refused for their content), `uv` (duplicates of a unique key), or the
    /// rows of one error code, e.g. malformed_json, invalid_utf8, nul_byte, duplicate_key
    /// (an unknown value lists them all).
    #[arg(long, value_name = "KIND", value_parser = parse_kind)]
    pub kind: Option<KindFilter>,
    /// Output format [default: table]. json and jsonl carry every field and the whole payload:
    /// "body" (the payload as a string) when it is UTF-8 text, else "body_base64".
    #[arg(long, value_enum, conflicts_with = "export")]
    pub format: Option<Format>,
    /// At most N rows, oldest first (by recorded_at, then seq); 0 = all. Default 1000 shown;
    /// --export writes every matching row unless --limit is given. When more rows match than
    /// are shown, a line on stderr says how many.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Write the rows to FILE as JSON lines (the jsonl objects) instead of printing them.
    /// Fix the "body" of the lines you want loaded, delete the others, then re-send them with
    /// `conveyor feed --file FILE --queue QUEUE` (the command prints the exact line).
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(DateTime::<Utc>::from(t));
    }
    match humantime::parse_duration(s) {
        Ok(d) => chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| Utc::now().checked_sub_signed(d))
            .ok_or_else(|| format!("{s:?} reaches too far back")),
        Err(_) => Err(format!(
            "{s:?} is neither a time (RFC 3339, e.g. 2026-11-24T01:00:00Z) nor a duration ago (e.g. 30m, 2h, 1d)"
        )),
    }
}

fn parse_kind(s: &str) -> Result<KindFilter, String> {
    let v = s.trim().to_ascii_lowercase();
    match v.as_str() {
        "et" => return Ok(KindFilter::Table("et")),
        "uv" => return Ok(KindFilter::Table("uv")),
        _ => {}
    }
    match RejectKind::ALL.iter().find(|k| k.as_str() == v) {
        Some(k) => Ok(KindFilter::Code(k.as_str())),
        None => Err(format!(
            "{s:?} is not a kind: use et (rows refused for their content), uv (duplicates of a unique key) or an error code: {}",
            RejectKind::ALL
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// What the rows are filtered by (the same in every read).
#[derive(Debug)]
struct Filters {
    job: Option<String>,
    pipeline: Option<String>,
    since: Option<DateTime<Utc>>,
    kind: Option<&'static str>,
    code: Option<&'static str>,
}

/// One job error table that exists now.
#[derive(Debug)]
struct JobTable {
    name: String,
    kind: &'static str,
    job: String,
    pipeline: Option<String>,
}

/// One error row, from a job's table (`consolidated: false`) or from `error_history`.
#[derive(Debug)]
struct ErrorRow {
    job: String,
    pipeline: Option<String>,
    kind: String,
    seq: i64,
    code: String,
    sqlstate: Option<String>,
    column: Option<String>,
    message: String,
    raw: Vec<u8>,
    queue_time: Option<DateTime<Utc>>,
    message_id: Option<String>,
    recorded_at: DateTime<Utc>,
    consolidated: bool,
}

/// The JSON object of one row: `--format json|jsonl` and the lines of `--export`, which
/// `conveyor feed --file` recognises (see `crate::feed` for the rule) and re-sends as `body`'s
/// bytes or the decoded `body_base64`.
#[derive(serde::Serialize)]
struct Envelope<'a> {
    job: &'a str,
    pipeline: Option<&'a str>,
    kind: &'a str,
    seq: i64,
    code: &'a str,
    sqlstate: Option<&'a str>,
    column: Option<&'a str>,
    message: &'a str,
    queue_time: Option<String>,
    message_id: Option<&'a str>,
    recorded_at: String,
    consolidated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl ErrorRow {
    fn envelope(&self) -> Envelope<'_> {
        let text = std::str::from_utf8(&self.raw).ok();
        Envelope {
            job: &self.job,
            pipeline: self.pipeline.as_deref(),
            kind: &self.kind,
            seq: self.seq,
            code: &self.code,
            sqlstate: self.sqlstate.as_deref(),
            column: self.column.as_deref(),
            message: &self.message,
            queue_time: self.queue_time.as_ref().map(time),
            message_id: self.message_id.as_deref(),
            recorded_at: time(&self.recorded_at),
            consolidated: self.consolidated,
            body: text,
            body_base64: match text {
                Some(_) => None,
                None => Some(BASE64.encode(&self.raw)),
            },
        }
    }
}

/// `c` as shown in a terminal: control and invisible formatting characters escaped (`\0`,
/// `\n`, `\u{1b}`, `\u{202e}`), so a payload can neither hide text nor move the cursor.
fn escape_char(c: char, out: &mut String) {
    match c {
        '\0' => out.push_str("\\0"),
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        c if c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}') =>
        {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
        c => out.push(c),
    }
}

/// The payload for the table: text where it is UTF-8 (control characters escaped), `\xNN`
/// for bytes that are not; cut after `max` characters with the total size appended.
fn show_payload(raw: &[u8], max: usize) -> String {
    let mut out = String::new();
    let mut chars = 0usize;
    let mut piece = String::new();
    // Adds `piece` unless it would pass `max`; false when the payload must be cut there.
    let mut add = |piece: &str, out: &mut String| {
        let n = piece.chars().count();
        if chars + n > max {
            return false;
        }
        chars += n;
        out.push_str(piece);
        true
    };
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            piece.clear();
            escape_char(c, &mut piece);
            if !add(&piece, &mut out) {
                out.push_str(&format!("…({} bytes)", raw.len()));
                return out;
            }
        }
        for b in chunk.invalid() {
            if !add(&format!("\\x{b:02x}"), &mut out) {
                out.push_str(&format!("…({} bytes)", raw.len()));
                return out;
            }
        }
    }
    out
}

/// Text for one table cell: escaped, cut after `max` characters.
fn show_text(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut piece = String::new();
    let mut chars = 0usize;
    for c in s.chars() {
        piece.clear();
        escape_char(c, &mut piece);
        let n = piece.chars().count();
        if chars + n > max.saturating_sub(1) {
            out.push('…');
            return out;
        }
        chars += n;
        out.push_str(&piece);
    }
    out
}

/// Where the rows go.
enum Sink {
    /// Display rows, kept until every width is known.
    Table(Vec<[String; 7]>),
    /// A JSON array on stdout; `started` once `[` is written.
    Json { out: Box<dyn Write>, started: bool },
    /// JSON lines on stdout or into the export's temporary file.
    Lines(Box<dyn Write>),
}

impl Sink {
    fn row(&mut self, r: &ErrorRow) -> std::io::Result<()> {
        match self {
            Sink::Table(rows) => {
                rows.push([
                    r.job.clone(),
                    r.kind.clone(),
                    r.seq.to_string(),
                    r.code.clone(),
                    r.column
                        .as_deref()
                        .map_or_else(|| "-".into(), |c| show_text(c, 40)),
                    show_text(&r.message, TABLE_MESSAGE_CHARS),
                    show_payload(&r.raw, TABLE_PAYLOAD_CHARS),
                ]);
                Ok(())
            }
            Sink::Json { out, started } => {
                out.write_all(if *started { b",\n" } else { b"[\n" })?;
                *started = true;
                serde_json::to_writer(&mut *out, &r.envelope())?;
                Ok(())
            }
            Sink::Lines(out) => {
                serde_json::to_writer(&mut *out, &r.envelope())?;
                out.write_all(b"\n")
            }
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Table(rows) if rows.is_empty() => Ok(()),
            Sink::Table(rows) => {
                const HEAD: [&str; 7] =
                    ["JOB", "KIND", "SEQ", "CODE", "COLUMN", "MESSAGE", "PAYLOAD"];
                let mut width = HEAD.map(|h| h.chars().count());
                for r in &rows {
                    for (w, cell) in width.iter_mut().zip(r) {
                        *w = (*w).max(cell.chars().count());
                    }
                }
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let mut line = |cells: [&str; 7]| -> std::io::Result<()> {
                    let mut text = String::new();
                    for (i, cell) in cells.iter().enumerate() {
                        if i == 6 {
                            text.push_str(cell);
                        } else if i == 2 {
                            // Numbers align right.
                            let pad = width[i] - cell.chars().count();
                            text.push_str(&" ".repeat(pad));
                            text.push_str(cell);
                            text.push_str("  ");
                        } else {
                            let pad = width[i] - cell.chars().count();
                            text.push_str(cell);
                            text.push_str(&" ".repeat(pad + 2));
                        }
                    }
                    writeln!(out, "{}", text.trim_end())
                };
                line(HEAD)?;
                for r in &rows {
                    line(r.each_ref().map(String::as_str))?;
                }
                out.flush()
            }
            Sink::Json { mut out, started } => {
                out.write_all(if started { b"\n]\n" } else { b"[]\n" })?;
                out.flush()
            }
            Sink::Lines(mut out) => out.flush(),
        }
    }
}

pub async fn run(config_path: &Path, args: ErrorsArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, "warn");
    let filters = Filters {
        job: args.job.clone(),
        pipeline: args.pipeline.clone(),
        since: args.since,
        kind: match args.kind {
            Some(KindFilter::Table(k)) => Some(k),
            _ => None,
        },
        code: match args.kind {
            Some(KindFilter::Code(c)) => Some(c),
            _ => None,
        },
    };
    let limit = match (args.limit, &args.export) {
        (Some(0), _) | (None, Some(_)) => None,
        (Some(n), _) => Some(n),
        (None, None) => Some(DEFAULT_LIMIT),
    };
    let schema = &config.schema;
    let s = quote_ident(schema);
    let mut conn = crate::db::connect(&config.database_url, config.connect_timeout).await?;
    super::check_tables(&mut conn, schema, &["jobs", "error_history"], config_path).await?;

    // The export goes to a temporary file renamed over FILE once complete, so a failed run
    // never leaves a partial file that could be fed.
    let tmp = args.export.as_ref().map(|f| {
        let mut name = f.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        f.with_file_name(name)
    });
    let mut sink = match (&args.export, &tmp) {
        (Some(file), Some(tmp)) => {
            let f = std::fs::File::create(tmp).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create {}: {e} (check that its directory exists and is writable)",
                    file.display()
                )
            })?;
            Sink::Lines(Box::new(std::io::BufWriter::new(f)))
        }
        _ => {
            let out: Box<dyn Write> = Box::new(std::io::BufWriter::new(std::io::stdout()));
            match args.format.unwrap_or(Format::Table) {
                Format::Table => Sink::Table(Vec::new()),
                Format::Json => Sink::Json {
                    out,
                    started: false,
                },
                Format::Jsonl => Sink::Lines(out),
            }
        }
    };

    let mut pipelines = std::collections::BTreeSet::new();
    let read = read_rows(&mut conn, &s, schema, &filters, limit, |r| {
        pipelines.insert(r.pipeline.clone());
        sink.row(r)
    })
    .await;
    let written = match read {
        Ok(counts) => sink.finish().map(|()| counts).map_err(ReadError::Out),
        Err(e) => Err(e),
    };
    let written = written.and_then(|counts| match (&args.export, &tmp) {
        (Some(file), Some(tmp)) => std::fs::rename(tmp, file)
            .map(|()| counts)
            .map_err(ReadError::Out),
        _ => Ok(counts),
    });
    let (shown, total) = match written {
        Ok(counts) => counts,
        Err(e) => {
            if let Some(tmp) = &tmp {
                let _ = std::fs::remove_file(tmp);
            }
            return match e {
                ReadError::Db(e) => Err(e),
                // A reader that went away (`| head`) is not an error.
                ReadError::Out(e)
                    if args.export.is_none() && e.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    Ok(())
                }
                ReadError::Out(e) => Err(match &args.export {
                    Some(f) => anyhow::anyhow!(
                        "cannot write {}: {e} (is the disk full? nothing was exported)",
                        f.display()
                    ),
                    None => anyhow::anyhow!("cannot write to stdout: {e}"),
                }),
            };
        }
    };

    if shown == 0 {
        no_rows(&mut conn, &s, &args).await?;
    } else if total > shown {
        eprintln!(
            "showing the oldest {shown} of {total} matching rows: raise --limit (0 = all), or narrow with --since, --job or --kind"
        );
    }
    let _ = conn.close().await;
    if let Some(file) = &args.export {
        print_export_hint(&config, config_path, file, shown, &pipelines);
    }
    Ok(())
}

/// Why reading or writing the rows failed.
enum ReadError {
    /// The database (the message says what to do).
    Db(anyhow::Error),
    /// Writing the output (stdout or the export file).
    Out(std::io::Error),
}

/// A database error with what was being done and what to check (main prints only the
/// outermost message, so the cause goes into it).
fn db_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> anyhow::Error {
    move |e| {
        anyhow::anyhow!(
            "{what}: {e} (check that the database is reachable and the config's database settings)"
        )
    }
}

/// Nothing matched: say so, and why when a filter names something that does not exist.
async fn no_rows(conn: &mut PgConnection, s: &str, args: &ErrorsArgs) -> anyhow::Result<()> {
    if let Some(job) = &args.job {
        let known: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {s}.jobs WHERE job_name = $1)"
        )))
        .bind(job)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error("looking up the job"))?;
        if !known {
            anyhow::bail!(
                "job {job:?} is not in {s}.jobs: check the name (run `conveyor errors` without --job to see every job's rows), or the config's database.schema"
            );
        }
    }
    if let Some(p) = &args.pipeline {
        let known: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {s}.jobs WHERE pipeline = $1)"
        )))
        .bind(p)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error("looking up the pipeline"))?;
        if !known {
            anyhow::bail!(
                "no job of pipeline {p:?} is in {s}.jobs: check --pipeline (the [[pipeline]] name in the config)"
            );
        }
    }
    let filtered = args.job.is_some()
        || args.pipeline.is_some()
        || args.since.is_some()
        || args.kind.is_some();
    eprintln!(
        "no error rows{}",
        if filtered {
            " match these filters"
        } else {
            " (no message has been refused, or none is kept)"
        }
    );
    Ok(())
}

/// After `--export`: how many rows, and the command that re-sends them.
fn print_export_hint(
    config: &crate::config::Config,
    config_path: &Path,
    file: &Path,
    rows: u64,
    pipelines: &std::collections::BTreeSet<Option<String>>,
) {
    println!("wrote {rows} error row(s) to {}", file.display());
    if rows == 0 {
        return;
    }
    let queue_of = |p: &Option<String>| {
        p.as_ref()
            .and_then(|p| config.pipelines.iter().find(|c| c.name == *p))
            .map(|c| c.queue.clone())
    };
    let queue = match pipelines.iter().collect::<Vec<_>>().as_slice() {
        [p] => queue_of(p),
        _ => None,
    };
    println!(
        "To re-send them: fix the \"body\" of each line you want loaded (a line with \"body_base64\" is not UTF-8 text: replace that key with a \"body\"), delete the other lines, then run"
    );
    println!(
        "  conveyor --config {} feed --file {} --queue {}",
        config_path.display(),
        file.display(),
        queue.as_deref().unwrap_or("QUEUE")
    );
    if pipelines.len() > 1 {
        let names: Vec<String> = pipelines
            .iter()
            .map(|p| match (p, queue_of(p)) {
                (Some(p), Some(q)) => format!("{p} (queue {q})"),
                (Some(p), None) => p.clone(),
                (None, _) => "(unknown)".into(),
            })
            .collect();
        println!(
            "The rows come from several pipelines — {}: export each with --pipeline and send it to its own queue.",
            names.join(", ")
        );
    } else if queue.is_none() {
        println!(
            "QUEUE: the queue of the pipeline the rows came from ({}; not in this config).",
            pipelines
                .iter()
                .next()
                .and_then(|p| p.as_deref())
                .unwrap_or("unknown")
        );
    }
    println!("feed gives each line a new message id; a line sent unchanged is refused again.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_shown_escaped_and_cut() {
        assert_eq!(show_payload(br#"{"a":1}"#, 100), r#"{"a":1}"#);
        assert_eq!(show_payload(b"a\0b\n\x1b", 100), r"a\0b\n\u{1b}");
        assert_eq!(show_payload(b"a\xff\xfeb", 100), r"a\xff\xfeb");
        assert_eq!(show_payload("é\u{202e}".as_bytes(), 100), r"é\u{202e}");
        assert_eq!(show_payload(b"abcdefgh", 4), "abcd…(8 bytes)");
        assert_eq!(show_text("abcdef", 4), "abc…");
        assert_eq!(show_text("abc", 4), "abc");
    }

    #[test]
    fn kinds_and_times_parse() {
        assert_eq!(parse_kind("et"), Ok(KindFilter::Table("et")));
        assert_eq!(parse_kind("UV"), Ok(KindFilter::Table("uv")));
        assert_eq!(
            parse_kind("malformed_json"),
            Ok(KindFilter::Code("malformed_json"))
        );
        let e = parse_kind("bogus").unwrap_err();
        assert!(e.contains("duplicate_key") && e.contains("nul_byte"), "{e}");
        let t = parse_since("2026-11-24T01:00:00Z").unwrap();
        assert_eq!(time(&t), "2026-11-24T01:00:00.000000Z");
        let ago = Utc::now() - parse_since("2h").unwrap();
        assert!((7199..=7201).contains(&ago.num_seconds()), "{ago}");
        assert!(parse_since("yesterday-ish").is_err());
    }

    #[test]
    fn envelope_carries_text_or_base64() {
        let mut row = ErrorRow {
            job: "j".into(),
            pipeline: None,
            kind: "et".into(),
            seq: 3,
            code: "malformed_json".into(),
            sqlstate: None,
            column: None,
            message: "m".into(),
            raw: b"{\"id\": \0".to_vec(),
            queue_time: None,
            message_id: None,
            recorded_at: parse_since("2026-11-24T01:00:00Z").unwrap(),
            consolidated: false,
        };
        let v = serde_json::to_value(row.envelope()).unwrap();
        assert_eq!(v["body"], "{\"id\": \u{0}");
        assert!(v.get("body_base64").is_none());
        row.raw = vec![b'a', 0xff];
        let v = serde_json::to_value(row.envelope()).unwrap();
        assert_eq!(v["body_base64"], "Yf8=");
        assert!(v.get("body").is_none());
        // `conveyor feed --file` sends back exactly the bytes exported, text or not.
        for raw in [
            b"{\"id\": \0".to_vec(),
            vec![b'a', 0xff],
            vec![0xff, 0xfe, 0x00],
            (0..=255).collect(),
        ] {
            row.raw = raw;
            let line = serde_json::to_vec(&row.envelope()).unwrap();
            assert_eq!(
                crate::feed::envelope_payload(&line),
                Ok(Some(row.raw.clone()))
            );
        }
    }
}
