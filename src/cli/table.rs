//! Text output shared by the CLI's reports: aligned tables, times, durations, numbers.

use chrono::{DateTime, Utc};

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    /// Numbers.
    Right,
}

/// An aligned text table: a header line and rows, columns two spaces apart, the last column
/// unpadded.
#[derive(Debug)]
pub(super) struct Table {
    head: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(head: &[(&'static str, Align)]) -> Table {
        Table {
            head: head.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Appends the table to `out`, each line prefixed with `indent`.
    pub(super) fn render(&self, indent: &str, out: &mut String) {
        let mut width: Vec<usize> = self.head.iter().map(|(h, _)| h.chars().count()).collect();
        for r in &self.rows {
            for (w, cell) in width.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let head: Vec<String> = self.head.iter().map(|(h, _)| h.to_string()).collect();
        for cells in std::iter::once(&head).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, cell) in cells.iter().enumerate() {
                let pad = width[i].saturating_sub(cell.chars().count());
                let last = i + 1 == cells.len();
                match self.head[i].1 {
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(cell);
                    }
                    Align::Left => {
                        line.push_str(cell);
                        if !last {
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                }
                if !last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// RFC 3339 in UTC with milliseconds (the JSON form).
pub(super) fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `2026-11-24 01:02:03` from an RFC 3339 time (the table form, UTC).
pub(super) fn short_time(rfc3339: &str) -> String {
    match DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => t
            .with_timezone(&Utc)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        Err(_) => rfc3339.to_string(),
    }
}

/// A duration for people: `0.4s`, `12s`, `4m05s`, `2h03m`, `3d04h`.
pub(super) fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `1234567` → `1,234,567` (as the seed's tables).
pub(super) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// `s` cut to `max` characters (an ellipsis marks the cut), control characters as spaces.
pub(super) fn cut(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= max {
        return clean;
    }
    let mut out: String = clean.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(13028), "13,028");
        assert_eq!(thousands(-1234567), "-1,234,567");
        assert_eq!(duration(0.42), "0.4s");
        assert_eq!(duration(12.4), "12s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(duration(3.0 * 86400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(cut("abc\ndef", 10), "abc def");
        assert_eq!(cut("abcdef", 4), "abc…");
    }

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&[("A", Align::Left), ("N", Align::Right), ("Z", Align::Left)]);
        t.row(vec!["xy".into(), "5".into(), "".into()]);
        t.row(vec!["x".into(), "1,000".into(), "end".into()]);
        let mut out = String::new();
        t.render("  ", &mut out);
        assert_eq!(out, "  A       N  Z\n  xy      5\n  x   1,000  end\n");
    }
}
