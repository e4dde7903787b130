//! Value checks and COPY text encoding: one JSON value against one column's type, and the text
//! forms (COPY escaping, timestamps) the sink receives. Pure, like the rest of decode.

use std::borrow::Cow;

use super::{Column, ColumnKind, Reject, RejectKind};

/// The value's JSON text class, by its first byte.
pub(super) enum Json<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    Str(Cow<'a, str>),
    Nested(&'a str),
}

pub(super) fn classify(s: &str) -> Json<'_> {
    match s.as_bytes().first() {
        Some(b'n') => Json::Null,
        Some(b't') => Json::Bool(true),
        Some(b'f') => Json::Bool(false),
        Some(b'"') => {
            let inner = &s[1..s.len() - 1];
            if inner.contains('\\') {
                // serde_json already validated the escapes; this parse cannot fail.
                Json::Str(Cow::Owned(
                    serde_json::from_str::<String>(s).unwrap_or_default(),
                ))
            } else {
                Json::Str(Cow::Borrowed(inner))
            }
        }
        Some(b'{') | Some(b'[') => Json::Nested(s),
        _ => Json::Number(s),
    }
}

fn reject(kind: RejectKind, col: &Column, msg: String) -> Reject {
    Reject::new(kind, Some(&col.name), msg)
}

pub(super) fn encode_value(col: &Column, raw: &str, out: &mut Vec<u8>) -> Result<(), Reject> {
    let v = classify(raw);
    if let Json::Null = v {
        if col.not_null {
            return Err(reject(
                RejectKind::NullNotAllowed,
                col,
                format!("column {:?} is NOT NULL but the field is null", col.name),
            ));
        }
        out.extend_from_slice(b"\\N");
        return Ok(());
    }
    let wrong = |what: &str| {
        reject(
            RejectKind::WrongType,
            col,
            format!("column {:?} cannot take {what}", col.name),
        )
    };
    match &col.kind {
        ColumnKind::Int2 | ColumnKind::Int4 | ColumnKind::Int8 => {
            let s = match &v {
                Json::Number(n) => *n,
                Json::Str(s) => s.trim(),
                Json::Bool(_) => return Err(wrong("a boolean")),
                _ => return Err(wrong("an object or array")),
            };
            let n: i64 = s.parse().map_err(|_| {
                reject(
                    RejectKind::InvalidInteger,
                    col,
                    format!("{s:?} is not an integer"),
                )
            })?;
            let (lo, hi) = match col.kind {
                ColumnKind::Int2 => (i16::MIN as i64, i16::MAX as i64),
                ColumnKind::Int4 => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            if n < lo || n > hi {
                return Err(reject(
                    RejectKind::NumericOutOfRange,
                    col,
                    format!("{n} is outside the column's range {lo}..={hi}"),
                ));
            }
            out.extend_from_slice(s.as_bytes());
        }
        ColumnKind::Numeric(ps) => {
            let s = match &v {
                Json::Number(n) => *n,
                Json::Str(s) => s.trim(),
                Json::Bool(_) => return Err(wrong("a boolean")),
                _ => return Err(wrong("an object or array")),
            };
            check_decimal(s, *ps).map_err(|(kind, msg)| reject(kind, col, msg))?;
            out.extend_from_slice(s.as_bytes());
        }
        ColumnKind::Float => {
            let s = match &v {
                Json::Number(n) => *n,
                Json::Str(s) => s.trim(),
                Json::Bool(_) => return Err(wrong("a boolean")),
                _ => return Err(wrong("an object or array")),
            };
            if s.parse::<f64>().is_err() {
                return Err(reject(
                    RejectKind::InvalidNumber,
                    col,
                    format!("{s:?} is not a number"),
                ));
            }
            out.extend_from_slice(s.as_bytes());
        }
        ColumnKind::Bool => {
            let b = match &v {
                Json::Bool(b) => *b,
                Json::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "t" | "yes" | "y" | "on" | "1" => true,
                    "false" | "f" | "no" | "n" | "off" | "0" => false,
                    _ => {
                        return Err(reject(
                            RejectKind::InvalidBoolean,
                            col,
                            format!("{s:?} is not a boolean"),
                        ))
                    }
                },
                Json::Number("1") => true,
                Json::Number("0") => false,
                _ => return Err(wrong("this value as a boolean")),
            };
            out.push(if b { b't' } else { b'f' });
        }
        ColumnKind::Text { max_chars } => {
            let s: &str = match &v {
                Json::Str(s) => s,
                Json::Number(n) => n,
                Json::Bool(true) => "true",
                Json::Bool(false) => "false",
                _ => return Err(wrong("an object or array")),
            };
            if let Some(max) = max_chars.filter(|m| s.len() > *m) {
                // Only a text with more bytes than the limit can have more characters. PostgreSQL
                // silently trims excess trailing spaces, so only the rest counts.
                let n = s.trim_end_matches(' ').chars().count();
                if n > max {
                    return Err(reject(
                        RejectKind::TooLong,
                        col,
                        format!("{n} characters, the column allows {max}"),
                    ));
                }
            }
            write_copy_text(s, out).map_err(|()| nul(col))?;
        }
        ColumnKind::Date => {
            let Json::Str(s) = &v else {
                return Err(wrong("a non-string as a date"));
            };
            check_date(s.trim()).map_err(|(kind, msg)| reject(kind, col, msg))?;
            out.extend_from_slice(s.trim().as_bytes());
        }
        ColumnKind::Timestamp => {
            let Json::Str(s) = &v else {
                return Err(wrong("a non-string as a timestamp"));
            };
            let s = s.trim();
            if parse_timestamp(s).is_none() {
                return Err(reject(
                    RejectKind::InvalidTimestamp,
                    col,
                    format!("{s:?} is not a timestamp (use RFC 3339, e.g. 2026-11-23T03:55:48Z)"),
                ));
            }
            out.extend_from_slice(s.as_bytes());
        }
        ColumnKind::Uuid => {
            let Json::Str(s) = &v else {
                return Err(wrong("a non-string as a uuid"));
            };
            let hex: String = s.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(reject(
                    RejectKind::InvalidUuid,
                    col,
                    format!("{s:?} is not a uuid"),
                ));
            }
            out.extend_from_slice(s.as_bytes());
        }
        ColumnKind::Json => {
            let text = raw;
            if text.contains("\\u0000") {
                return Err(nul(col));
            }
            write_copy_text(text, out).map_err(|()| nul(col))?;
        }
        ColumnKind::Other(_) => {
            let s: &str = match &v {
                Json::Str(s) => s,
                Json::Number(n) => n,
                Json::Bool(true) => "true",
                Json::Bool(false) => "false",
                Json::Nested(t) => t,
                Json::Null => unreachable!("null handled above"),
            };
            write_copy_text(s, out).map_err(|()| nul(col))?;
        }
    }
    Ok(())
}

fn nul(col: &Column) -> Reject {
    reject(
        RejectKind::NulByte,
        col,
        format!(
            "column {:?}: text contains a NUL byte, which PostgreSQL cannot store",
            col.name
        ),
    )
}

/// Appends `s` escaped for COPY text format; `Err` if it contains NUL.
pub(super) fn write_copy_text(s: &str, out: &mut Vec<u8>) -> Result<(), ()> {
    let bytes = s.as_bytes();
    if !bytes
        .iter()
        .any(|&b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r' | 0))
    {
        out.extend_from_slice(bytes);
        return Ok(());
    }
    for &b in bytes {
        match b {
            0 => return Err(()),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    Ok(())
}

/// Checks decimal syntax and, for `numeric(p, s)`, that the integer part fits `p - s` digits.
fn check_decimal(s: &str, ps: Option<(u32, u32)>) -> Result<(), (RejectKind, String)> {
    let bad = || {
        (
            RejectKind::InvalidDecimal,
            format!("{s:?} is not a decimal number"),
        )
    };
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    if let Some(e) = exp {
        if e.strip_prefix(['+', '-'])
            .unwrap_or(e)
            .parse::<u32>()
            .is_err()
        {
            return Err(bad());
        }
        // With an exponent the magnitude check is left to the database (rare in practice).
        return Ok(());
    }
    if let Some((p, scale)) = ps {
        let digits = int.trim_start_matches('0').len() as u32;
        if digits > p.saturating_sub(scale) {
            return Err((
                RejectKind::NumericOutOfRange,
                format!(
                    "{s} has {digits} integer digits; numeric({p},{scale}) allows {}",
                    p.saturating_sub(scale)
                ),
            ));
        }
    }
    Ok(())
}

/// PostgreSQL's `date` range ends at 5874897-12-31 (and starts in 4713 BC, which ISO input here
/// does not express).
const PG_MAX_DATE_YEAR: i64 = 5_874_897;

/// Accepts ISO `YYYY-MM-DD` (year ≥ 1): the one unambiguous format.
fn check_date(s: &str) -> Result<(), (RejectKind, String)> {
    let invalid = || {
        (
            RejectKind::InvalidDate,
            format!("{s:?} is not a valid date (expected YYYY-MM-DD)"),
        )
    };
    let mut parts = s.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    if y.len() < 4 || m.len() != 2 || d.len() != 2 {
        return Err(invalid());
    }
    let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i64>(), m.parse::<u32>(), d.parse::<u32>()) else {
        return Err(invalid());
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(invalid());
    }
    if !(1..=PG_MAX_DATE_YEAR).contains(&y) {
        return Err((
            RejectKind::DateOutOfRange,
            format!("{s:?}: year {y} is outside the date range 1..={PG_MAX_DATE_YEAR}"),
        ));
    }
    // chrono knows the calendar up to year 262143; beyond it only the month/day bounds above apply.
    if y <= 262_143 && chrono::NaiveDate::from_ymd_opt(y as i32, m, d).is_none() {
        return Err(invalid());
    }
    Ok(())
}

/// Parses RFC 3339 or `YYYY-MM-DD[ T]HH:MM:SS[.f]` (no zone): returns micros since the epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    None
}

/// A queue time as the header carries it: an integer of microseconds since the epoch, or an
/// RFC 3339 string.
pub fn parse_queue_time_text(s: &str) -> Option<i64> {
    let s = s.trim();
    s.parse::<i64>().ok().or_else(|| parse_timestamp(s))
}

pub(super) fn parse_queue_time_json(raw: &str) -> Option<i64> {
    match classify(raw) {
        Json::Number(n) => n.parse::<i64>().ok(),
        Json::Str(s) => parse_queue_time_text(&s),
        _ => None,
    }
}

/// Writes micros since the epoch as `YYYY-MM-DD HH:MM:SS.ffffff+00` (by hand: this runs for
/// every row, and strftime re-parses its format each time).
pub fn write_timestamp_us(out: &mut Vec<u8>, us: i64) {
    use chrono::{Datelike, Timelike};
    let Some(t) = chrono::DateTime::from_timestamp_micros(us) else {
        out.extend_from_slice(b"\\N");
        return;
    };
    let year = t.year();
    if !(0..=9999).contains(&year) {
        use std::io::Write;
        let _ = write!(out, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f+00"));
        return;
    }
    push_digits(out, year as u32, 4);
    out.push(b'-');
    push_digits(out, t.month(), 2);
    out.push(b'-');
    push_digits(out, t.day(), 2);
    out.push(b' ');
    push_digits(out, t.hour(), 2);
    out.push(b':');
    push_digits(out, t.minute(), 2);
    out.push(b':');
    push_digits(out, t.second(), 2);
    out.push(b'.');
    push_digits(out, (us.rem_euclid(1_000_000)) as u32, 6);
    out.extend_from_slice(b"+00");
}

fn push_digits(out: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for i in (0..width).rev() {
        out[start + i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
}
