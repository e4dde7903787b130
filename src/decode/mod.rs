//! Decode: one message body → one line of PostgreSQL COPY text, or a `Reject` saying why not.
//!
//! Pure: bytes + the target's catalogue in, bytes out; no I/O, so every rule here is a table-
//! driven unit test. The decoder is built once per job (from the columns read at job start) and
//! reused for every message. It borrows from the body wherever JSON allows (numbers and unescaped
//! strings are copied once, straight into the batch buffer) because this is the per-row hot path.
//!
//! Architecture invariant: a row that leaves `decode` as `Ok` satisfies every check the catalogue
//! lets us make client-side (type, length, precision, nullability), so the database refuses only
//! what needs its own state (unique keys, CHECK and foreign-key constraints).

use std::collections::HashMap;

use serde::de::DeserializeSeed;

use crate::config::{PipelineConfig, UnknownFields};

mod fields;
mod reject;
mod value;

use fields::{FieldsSeed, Route, Scratch};
pub use reject::{Reject, RejectKind};

use value::{encode_value, parse_queue_time_json};
pub use value::{parse_queue_time_text, parse_timestamp, write_timestamp_us};

/// The value checks a target column gets, derived from its PostgreSQL type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnKind {
    Int2,
    Int4,
    Int8,
    /// `numeric(p, s)`; `None` for unconstrained numeric.
    Numeric(Option<(u32, u32)>),
    Float,
    Bool,
    /// text, varchar(n), char(n): `max_chars` from the type modifier.
    Text {
        max_chars: Option<usize>,
    },
    Date,
    Timestamp,
    Uuid,
    Json,
    /// Any other type: passed through as text; the database validates it.
    Other(String),
}

/// One target column as read from the catalogue at job start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
    pub not_null: bool,
    /// Has a DEFAULT, or is an identity or generated column: the database fills it.
    pub db_filled: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("target table has no column {column:?} named by {what}; check the pipeline's rename and queue_time_column settings against the table")]
    NoSuchColumn { column: String, what: &'static str },
    #[error("target table has no loadable column (every column has a default or is generated)")]
    NoColumns,
}

/// Turns message bodies into COPY text lines for one target; built once per job.
#[derive(Debug)]
pub struct Decoder {
    /// Columns in COPY order (the columns conveyor writes).
    columns: Vec<Column>,
    /// Lower-cased JSON field name → index in `columns`.
    fields: HashMap<String, usize>,
    /// Lower-cased names of fields that name database-filled columns (refused as extra).
    db_filled: HashMap<String, String>,
    unknown: UnknownFields,
    /// Lower-cased payload field carrying the queue time, if any.
    queue_time_field: Option<String>,
    /// Index in `columns` that receives the queue time.
    queue_time_column: Option<usize>,
    max_body: usize,
    /// Routed pipelines: only check that the body is a JSON object (each route maps its own
    /// rows onto its table in the sink, `sink::routed`); nothing is written to the COPY buffer.
    envelope: bool,
    /// Per-message working memory, reused so the hot path allocates nothing of its own.
    scratch: Scratch,
}

/// Checks one JSON value against a column as the single-target decoder would (type, range,
/// length, NULL), so a routed row the database would refuse is refused here, with the same
/// code and no round trip.
pub fn check_value(col: &Column, value: &serde_json::Value) -> Result<(), Reject> {
    let mut out = Vec::new();
    value::encode_value(col, &value.to_string(), &mut out)
}

/// What decode learned about a row besides its COPY line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Queue time used for the row, microseconds since the Unix epoch.
    pub queue_time_us: i64,
}

impl Decoder {
    pub fn new(table: &[Column], p: &PipelineConfig) -> Result<Decoder, DecodeError> {
        let qt_col = p.queue_time_column.as_deref().map(str::to_lowercase);
        let mut columns = Vec::new();
        let mut db_filled = HashMap::new();
        for c in table {
            let is_qt = qt_col.as_deref() == Some(c.name.as_str());
            if c.db_filled && !is_qt {
                db_filled.insert(c.name.to_lowercase(), c.name.clone());
            } else {
                columns.push(c.clone());
            }
        }
        if columns.is_empty() {
            return Err(DecodeError::NoColumns);
        }
        let by_name: HashMap<String, usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.to_lowercase(), i))
            .collect();
        let queue_time_column = match &qt_col {
            Some(name) => Some(*by_name.get(name).ok_or_else(|| DecodeError::NoSuchColumn {
                column: name.clone(),
                what: "queue_time_column",
            })?),
            None => None,
        };
        let mut fields = HashMap::new();
        for (name, &i) in &by_name {
            if Some(i) != queue_time_column {
                fields.insert(name.clone(), i);
            }
        }
        for (field, column) in &p.rename {
            let i = *by_name
                .get(column)
                .ok_or_else(|| DecodeError::NoSuchColumn {
                    column: column.clone(),
                    what: "rename",
                })?;
            fields.retain(|_, v| *v != i || Some(*v) == queue_time_column);
            fields.insert(field.clone(), i);
        }
        // A payload field named like the queue-time column is that row's queue time when the
        // message has no header: publishers that stamp the body need no extra setting.
        let queue_time_field = p
            .queue_time_field
            .as_deref()
            .map(str::to_lowercase)
            .or(qt_col);
        Ok(Decoder {
            columns,
            fields,
            db_filled,
            unknown: p.unknown_fields,
            queue_time_field,
            queue_time_column,
            max_body: p.max_body_bytes,
            envelope: false,
            scratch: Scratch::default(),
        })
    }

    /// The decoder of a routed pipeline: size, UTF-8 and "a JSON object" are checked here;
    /// routing, fields and types by the routes (`sink::routed`).
    pub fn envelope(p: &PipelineConfig) -> Decoder {
        Decoder {
            columns: Vec::new(),
            fields: HashMap::new(),
            db_filled: HashMap::new(),
            unknown: p.unknown_fields,
            queue_time_field: None,
            queue_time_column: None,
            max_body: p.max_body_bytes,
            envelope: true,
            scratch: Scratch::default(),
        }
    }

    /// Column names in COPY order.
    pub fn copy_columns(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// Appends one COPY text line for `body` to `out`, or leaves `out` unchanged and says why not.
    ///
    /// `header_queue_time_us` is the queue time from the AMQP header (or broker timestamp);
    /// `received_us` is the fallback when neither header nor payload carries one.
    pub fn decode(
        &mut self,
        body: &[u8],
        header_queue_time_us: Option<i64>,
        received_us: i64,
        out: &mut Vec<u8>,
    ) -> Result<Decoded, Reject> {
        let start = out.len();
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.decode_inner(body, header_queue_time_us, received_us, out, &mut scratch);
        self.scratch = scratch;
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn decode_inner(
        &self,
        body: &[u8],
        header_qt: Option<i64>,
        received_us: i64,
        out: &mut Vec<u8>,
        scratch: &mut Scratch,
    ) -> Result<Decoded, Reject> {
        if body.len() > self.max_body {
            return Err(Reject::new(
                RejectKind::Oversize,
                None,
                format!(
                    "body is {} bytes, max_body_bytes is {}",
                    body.len(),
                    self.max_body
                ),
            ));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            Reject::new(
                RejectKind::InvalidUtf8,
                None,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
        })?;
        if self.envelope {
            return match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
                Ok(_) => Ok(Decoded {
                    queue_time_us: header_qt.unwrap_or(received_us),
                }),
                Err(e) => {
                    let kind = if e.classify() == serde_json::error::Category::Data {
                        RejectKind::NotObject
                    } else {
                        RejectKind::MalformedJson
                    };
                    Err(Reject::new(kind, None, e.to_string()))
                }
            };
        }
        scratch.slots.clear();
        scratch.slots.resize(self.columns.len(), None);
        let mut payload_qt: Option<(usize, usize)> = None;
        let mut problem: Option<Reject> = None;
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = FieldsSeed {
            decoder: self,
            base: text.as_ptr() as usize,
            slots: &mut scratch.slots,
            shape: &mut scratch.shape,
            payload_qt: &mut payload_qt,
            problem: &mut problem,
        };
        match seed.deserialize(&mut de).and_then(|()| de.end()) {
            Ok(()) => {}
            Err(e) => {
                if let Some(p) = problem {
                    return Err(p);
                }
                let kind = if e.classify() == serde_json::error::Category::Data {
                    RejectKind::NotObject
                } else {
                    RejectKind::MalformedJson
                };
                return Err(Reject::new(kind, None, e.to_string()));
            }
        }
        if let Some(p) = problem {
            return Err(p);
        }
        let queue_time_us = match (header_qt, payload_qt) {
            (Some(t), _) => t,
            (None, Some((a, b))) => parse_queue_time_json(&text[a..b]).ok_or_else(|| {
                Reject::new(
                    RejectKind::InvalidQueueTime,
                    self.queue_time_field.as_deref(),
                    format!(
                        "queue time {} is neither microseconds since the epoch nor RFC 3339",
                        &text[a..b]
                    ),
                )
            })?,
            (None, None) => received_us,
        };
        for (i, col) in self.columns.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            if Some(i) == self.queue_time_column {
                write_timestamp_us(out, queue_time_us);
                continue;
            }
            match scratch.slots[i] {
                None => {
                    if col.not_null {
                        return Err(Reject::new(
                            RejectKind::MissingField,
                            Some(&col.name),
                            format!("field {:?} is missing and the column is NOT NULL", col.name),
                        ));
                    }
                    out.extend_from_slice(b"\\N");
                }
                Some((a, b)) => encode_value(col, &text[a..b], out)?,
            }
        }
        out.push(b'\n');
        Ok(Decoded { queue_time_us })
    }

    /// Routes a field by name (uncached path).
    fn route(&self, key: &str) -> Result<Route, Reject> {
        if self
            .queue_time_field
            .as_deref()
            .is_some_and(|f| f.eq_ignore_ascii_case(key))
        {
            return Ok(Route::QueueTime(
                self.fields.get(key.to_lowercase().as_str()).copied(),
            ));
        }
        Ok(match self.field_index(key)? {
            Some(i) => Route::Column(i),
            None => Route::Ignore,
        })
    }

    fn field_index(&self, key: &str) -> Result<Option<usize>, Reject> {
        let lookup = |k: &str| -> Result<Option<usize>, Reject> {
            if let Some(&i) = self.fields.get(k) {
                return Ok(Some(i));
            }
            if self.unknown == UnknownFields::Ignore {
                return Ok(None);
            }
            let why = match self.db_filled.get(k) {
                Some(col) => format!(
                    "field {key:?} names column {col:?}, which the database fills (default, identity or generated)"
                ),
                None => format!("field {key:?} matches no column of the target table"),
            };
            Err(Reject::new(RejectKind::ExtraField, Some(key), why))
        };
        if key.bytes().any(|b| b.is_ascii_uppercase()) || !key.is_ascii() {
            lookup(&key.to_lowercase())
        } else {
            lookup(key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::value::write_copy_text;
    use super::*;
    use crate::config::{PipelineConfig, QueueDeclare};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn col(name: &str, kind: ColumnKind, not_null: bool) -> Column {
        Column {
            name: name.into(),
            kind,
            not_null,
            db_filled: false,
        }
    }

    fn pipeline() -> PipelineConfig {
        PipelineConfig {
            name: "p".into(),
            queue: "q".into(),
            queue_declare: QueueDeclare::Quorum,
            target_schema: None,
            target_table: "t".into(),
            prefetch: 10,
            pack: 10,
            latency: Duration::from_millis(10),
            sessions: 1,
            max_body_bytes: 4096,
            unknown_fields: UnknownFields::Reject,
            mode: crate::config::LoadMode::Insert,
            queue_time_header: "x-queue-time".into(),
            queue_time_field: None,
            queue_time_column: Some("queue_time".into()),
            rename: BTreeMap::from([("last name".to_string(), "lname".to_string())]),
            handoff: crate::config::Handoff::SingleActive,
            retry: Duration::from_secs(1),
            rotate_every: None,
            idle_eoj: None,
            max_rows: None,
            depth_threshold: None,
            depth_poll: Duration::from_secs(1),
            priority_pack: None,
            priority_sessions: None,
            durability: crate::config::Durability::Spool,
            fsync_every: Duration::from_millis(5),
            fsync_rows: 100,
            checkpoint_interval: Duration::from_secs(10),
            checkpoint_rows: 1000,
            journal: false,
            journal_keep: Duration::from_secs(86_400),
            dedup_keep: Duration::from_secs(86_400),
            routes: Vec::new(),
            post_steps: Vec::new(),
        }
    }

    fn decoder() -> Decoder {
        let mut db_time = col("db_time", ColumnKind::Timestamp, false);
        db_time.db_filled = true;
        let table = vec![
            col("id", ColumnKind::Text { max_chars: Some(5) }, true),
            col("age", ColumnKind::Int4, false),
            col("income", ColumnKind::Numeric(Some((9, 2))), false),
            col("born", ColumnKind::Date, false),
            col("lname", ColumnKind::Text { max_chars: None }, false),
            col("ok", ColumnKind::Bool, false),
            col("queue_time", ColumnKind::Timestamp, false),
            db_time,
        ];
        Decoder::new(&table, &pipeline()).expect("decoder")
    }

    /// Decodes `body` with a header queue time of 0 and returns the COPY line or the reject code.
    fn check(body: &[u8]) -> Result<String, &'static str> {
        let mut out = b"prefix|".to_vec();
        match decoder().decode(body, Some(0), 99, &mut out) {
            Ok(_) => Ok(String::from_utf8(out[7..].to_vec()).expect("utf8")),
            Err(r) => {
                assert_eq!(out, b"prefix|", "buffer restored after reject");
                Err(r.kind.as_str())
            }
        }
    }

    const QT: &str = "1970-01-01 00:00:00.000000+00";

    #[test]
    fn table_of_cases() {
        let cases: &[(&[u8], Result<&str, &str>)] = &[
            (br#"{"id":"a1","age":42,"income":"12.50","born":"2001-02-03","Last Name":"x\ty","ok":true}"#,
             Ok("a1\t42\t12.50\t2001-02-03\tx\\ty\tt\tQT\n")),
            (br#"{"ID":"a1"}"#, Ok("a1\t\\N\t\\N\t\\N\t\\N\t\\N\tQT\n")),
            (br#"{"id":"a1","age":"4x"}"#, Err("invalid_integer")),
            (br#"{"id":"a1","age":"3000000000"}"#, Err("numeric_out_of_range")),
            (br#"{"id":"a1","income":"12a.50"}"#, Err("invalid_decimal")),
            (br#"{"id":"a1","income":12345678.9}"#, Err("numeric_out_of_range")),
            (br#"{"id":"a1","income":1234567.891}"#, Ok("a1\t\\N\t1234567.891\t\\N\t\\N\t\\N\tQT\n")),
            (br#"{"id":"a1","born":"2021-02-30"}"#, Err("invalid_date")),
            (br#"{"id":"a1","born":"9999999-01-01"}"#, Err("date_out_of_range")),
            (br#"{"id":"a1","born":"yesterday"}"#, Err("invalid_date")),
            (br#"{"id":"abcdef"}"#, Err("too_long")),
            (br#"{"id":"abcde   "}"#, Ok("abcde   \t\\N\t\\N\t\\N\t\\N\t\\N\tQT\n")),
            (br#"{"age":1}"#, Err("missing_field")),
            (br#"{"id":null}"#, Err("null_not_allowed")),
            (br#"{"id":"a1","zzz":1}"#, Err("extra_field")),
            (br#"{"id":"a1","db_time":"2020-01-01T00:00:00Z"}"#, Err("extra_field")),
            (br#"{"id":"a1","id":"a2"}"#, Err("duplicate_field")),
            (br#"{"id":"a\u0000"}"#, Err("nul_byte")),
            (br#"{"id":"a1","age":{"x":1}}"#, Err("wrong_type")),
            (br#"{"id":"a1","ok":"maybe"}"#, Err("invalid_boolean")),
            (br#"{"id":"a1""#, Err("malformed_json")),
            (br#"{"id":"a1"} trailing"#, Err("malformed_json")),
            (br#"[1,2]"#, Err("not_object")),
            (b"", Err("malformed_json")),
            (b"{\"id\":\"\xff\"}", Err("invalid_utf8")),
            (br#"{"id":"a\\b\nc"}"#, Ok("a\\\\b\\nc\t\\N\t\\N\t\\N\t\\N\t\\N\tQT\n")),
        ];
        for (body, want) in cases {
            let want = want.map(|s| s.replace("QT", QT));
            assert_eq!(
                check(body),
                want.as_deref().map(str::to_string).map_err(|e| *e),
                "body {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn oversize_body_is_rejected_before_parsing() {
        let body = vec![b' '; 5000];
        assert_eq!(check(&body), Err("oversize"));
    }

    #[test]
    fn queue_time_from_payload_when_no_header() {
        let mut d = decoder();
        let mut out = Vec::new();
        let r = d
            .decode(
                br#"{"id":"a","queue_time":"1970-01-01T00:00:01Z"}"#,
                None,
                5,
                &mut out,
            )
            .expect("ok");
        assert_eq!(r.queue_time_us, 1_000_000);
        let r = d
            .decode(br#"{"id":"a","queue_time":2500000}"#, None, 5, &mut out)
            .expect("ok");
        assert_eq!(r.queue_time_us, 2_500_000);
        let r = d.decode(br#"{"id":"a"}"#, None, 5, &mut out).expect("ok");
        assert_eq!(r.queue_time_us, 5, "falls back to receive time");
        let e = d
            .decode(br#"{"id":"a","queue_time":"soon"}"#, None, 5, &mut out)
            .unwrap_err();
        assert_eq!(e.kind, RejectKind::InvalidQueueTime);
    }

    #[test]
    fn header_queue_time_formats() {
        assert_eq!(
            parse_queue_time_text("1700000000000000"),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(
            parse_queue_time_text("1970-01-01T00:00:02Z"),
            Some(2_000_000)
        );
        assert_eq!(parse_queue_time_text("later"), None);
    }

    #[test]
    fn rename_to_unknown_column_is_a_setup_error() {
        let mut p = pipeline();
        p.rename.insert("x".into(), "nope".into());
        let table = vec![col("id", ColumnKind::Int4, true)];
        assert!(Decoder::new(&table, &p).is_err());
    }

    #[test]
    fn reject_codes_are_unique() {
        let mut codes: Vec<_> = RejectKind::ALL.iter().map(|k| k.as_str()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), RejectKind::ALL.len());
    }

    #[test]
    fn field_order_changes_between_messages_are_handled() {
        let mut d = decoder();
        let mut out = Vec::new();
        d.decode(br#"{"id":"a","age":1}"#, Some(0), 0, &mut out)
            .expect("ok");
        d.decode(br#"{"age":2,"id":"b"}"#, Some(0), 0, &mut out)
            .expect("ok");
        d.decode(
            br#"{"ID":"c","Last Name":"z","age":3}"#,
            Some(0),
            0,
            &mut out,
        )
        .expect("ok");
        let e = d
            .decode(br#"{"id":"d","zzz":1}"#, Some(0), 0, &mut out)
            .unwrap_err();
        assert_eq!(e.kind, RejectKind::ExtraField);
        d.decode(br#"{"id":"e","age":5}"#, Some(0), 0, &mut out)
            .expect("ok");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("b\t2\t"), "{}", lines[1]);
        assert!(lines[2].starts_with("c\t3\t\\N\t\\N\tz\t"), "{}", lines[2]);
        assert!(lines[3].starts_with("e\t5\t"), "{}", lines[3]);
    }

    proptest::proptest! {
        /// The hand-written timestamp matches chrono's formatting for every instant in 0000–9999.
        #[test]
        fn timestamp_formatting_matches_chrono(us in -62_167_219_200_000_000i64..253_402_300_799_999_999i64) {
            let mut out = Vec::new();
            write_timestamp_us(&mut out, us);
            let want = chrono::DateTime::from_timestamp_micros(us)
                .expect("in range")
                .format("%Y-%m-%d %H:%M:%S%.6f+00")
                .to_string();
            proptest::prop_assert_eq!(String::from_utf8(out).expect("utf8"), want);
        }

        /// Any text survives COPY escaping: unescaping gives it back, and no raw separator leaks.
        #[test]
        fn copy_escaping_round_trips(s in "[^\u{0}]{0,40}") {
            let mut out = Vec::new();
            write_copy_text(&s, &mut out).expect("no NUL");
            proptest::prop_assert!(!out.contains(&b'\t') && !out.contains(&b'\n'));
            let text = String::from_utf8(out).expect("utf8");
            let mut back = String::new();
            let mut it = text.chars();
            while let Some(c) = it.next() {
                if c == '\\' {
                    match it.next() {
                        Some('t') => back.push('\t'),
                        Some('n') => back.push('\n'),
                        Some('r') => back.push('\r'),
                        Some(o) => back.push(o),
                        None => {}
                    }
                } else {
                    back.push(c);
                }
            }
            proptest::prop_assert_eq!(back, s);
        }
    }
}
