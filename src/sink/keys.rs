//! The cheap path for duplicate keys (DESIGN §4, `uv_<job>`). A batch whose row repeats a unique
//! key would otherwise fail its COPY once per duplicate, and each retry re-sends the whole batch:
//! at 1 % bad rows that costs more than the load. So the unique keys of the target are read at
//! job start and each batch is checked before its COPY: repeats inside the batch on the client
//! (free), keys already in the table with one indexed lookup per key (`probe`). Both are only a
//! shortcut: a duplicate they miss (another session committing the same key a moment later, or
//! two spellings of one value) still fails the COPY, which names the line, and is isolated there.

use std::borrow::Cow;
use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::Row;

use crate::decode::{Reject, RejectKind};
use crate::pack::Batch;

/// One unique index of the target whose columns the load fills.
#[derive(Debug, Clone)]
pub struct UniqueKey {
    /// The index's name, as PostgreSQL's own message would name it.
    pub name: String,
    pub columns: Vec<String>,
    /// Position of each key column in the COPY line.
    pub fields: Vec<usize>,
    /// `SELECT ord FROM unnest(...) WITH ORDINALITY … WHERE EXISTS (row with that key)`.
    pub probe_sql: String,
}

/// Reads the target's unique indexes (immediate, not partial, no expressions) whose columns are
/// all among `copy_columns`; an index on a column the database fills cannot be hit by the load.
pub async fn read_unique_keys(
    conn: &mut PgConnection,
    qualified_table: &str,
    copy_columns: &[&str],
) -> Result<Vec<UniqueKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.relname::text AS name,
                array_agg(a.attname::text ORDER BY k.ord) AS cols,
                array_agg(format('%I.%I', tn.nspname, ty.typname) ORDER BY k.ord) AS types
         FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         JOIN pg_type ty ON ty.oid = a.atttypid
         JOIN pg_namespace tn ON tn.oid = ty.typnamespace
         WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indimmediate
           AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
         GROUP BY c.relname, i.indisprimary
         ORDER BY i.indisprimary DESC, c.relname",
    )
    .bind(qualified_table)
    .fetch_all(&mut *conn)
    .await?;
    let mut keys = Vec::new();
    for r in rows {
        let name: String = r.get("name");
        let cols: Vec<String> = r.get("cols");
        let types: Vec<String> = r.get("types");
        let fields: Option<Vec<usize>> = cols
            .iter()
            .map(|c| copy_columns.iter().position(|k| k == c))
            .collect();
        let Some(fields) = fields else { continue };
        let probe_sql = probe_sql(qualified_table, &cols, &types);
        keys.push(UniqueKey {
            name,
            columns: cols,
            fields,
            probe_sql,
        });
    }
    Ok(keys)
}

/// `$1..$n` are text arrays, one per key column, holding the batch's key values in row order;
/// the query returns the 1-based positions whose key is already in the table. Casting the text
/// to the column's type by its plain name (`pg_catalog.bpchar`, not `character`, which means
/// `character(1)`; a modifier would truncate) keeps the index usable.
fn probe_sql(table: &str, cols: &[String], types: &[String]) -> String {
    use crate::db::quote_ident as q;
    let arrays: Vec<String> = (1..=cols.len()).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (0..cols.len()).map(|i| format!("k{i}")).collect();
    let conds: Vec<String> = cols
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (c, t))| format!("t.{} = u.k{i}::{t}", q(c)))
        .collect();
    format!(
        "SELECT u.ord FROM unnest({}) WITH ORDINALITY AS u({}, ord) WHERE EXISTS (SELECT 1 FROM {table} t WHERE {})",
        arrays.join(", "),
        names.join(", "),
        conds.join(" AND ")
    )
}

/// The `n`-th tab-separated field of a COPY text line (without the trailing newline).
fn field(line: &[u8], n: usize) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.split(|b| *b == b'\t').nth(n)
}

/// A COPY text field as the value it stands for; `None` for `\N` (NULL never conflicts).
fn unescape(f: &[u8]) -> Option<String> {
    if f == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(f.len());
    let mut it = f.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(&o) => out.push(o),
            None => out.push(b'\\'),
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn duplicate(key: &UniqueKey, values: &[String], detail: String) -> Reject {
    Reject {
        kind: RejectKind::DuplicateKey,
        column: Some(key.columns.join(", ")),
        message: format!(
            "duplicate key value violates unique constraint \"{}\": Key ({})=({}) {detail}",
            key.name,
            key.columns.join(", "),
            values.join(", ")
        ),
        sqlstate: Some("23505".into()),
    }
}

/// The key values of row `i` of the batch, or `None` when a column is NULL.
fn key_of(batch: &Batch, i: usize, key: &UniqueKey) -> Option<Vec<String>> {
    let row = &batch.good[i];
    let line = &batch.copy[row.start..row.end];
    key.fields
        .iter()
        .map(|&f| field(line, f).and_then(unescape))
        .collect()
}

/// The order to COPY the batch's rows in: by the first unique key's values. Two sessions that
/// insert keys in one global order cannot deadlock on each other's uncommitted keys (a batch's
/// duplicate of a row another in-flight batch is inserting waits for that batch's commit, and
/// then fails and is isolated). Without sorting, parallel COPYs of a feed with duplicates
/// deadlock (and wait `deadlock_timeout`, 1 s, each time). Rows with a NULL key go last.
pub fn insertion_order(batch: &Batch, keys: &[UniqueKey]) -> Option<Vec<usize>> {
    let key = keys.first()?;
    let mut rows: Vec<(Option<Cow<'_, [u8]>>, usize)> = (0..batch.good.len())
        .map(|i| (key_bytes(batch, i, key), i))
        .collect();
    rows.sort_unstable_by(|a, b| match (&a.0, &b.0) {
        (Some(x), Some(y)) => x.cmp(y).then(a.1.cmp(&b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(&b.1),
    });
    Some(rows.into_iter().map(|(_, i)| i).collect())
}

/// The row's key as its COPY text fields, without unescaping or allocating for a one-column
/// key (escaping is one-to-one, so equal text ⇔ equal key text); several columns are joined
/// with a tab, which never appears unescaped inside a field. `None` when a column is NULL.
fn key_bytes<'a>(batch: &'a Batch, i: usize, key: &UniqueKey) -> Option<Cow<'a, [u8]>> {
    let row = &batch.good[i];
    let line = &batch.copy[row.start..row.end];
    if let [f] = key.fields[..] {
        return field(line, f).filter(|v| *v != b"\\N").map(Cow::Borrowed);
    }
    let mut out = Vec::new();
    for (k, &f) in key.fields.iter().enumerate() {
        let v = field(line, f).filter(|v| *v != b"\\N")?;
        if k > 0 {
            out.push(b'\t');
        }
        out.extend_from_slice(v);
    }
    Some(Cow::Owned(out))
}

/// Marks rows that repeat a key of an earlier row of the same batch (client side, no round
/// trip). Pushes them to `bad` as duplicates; the first occurrence stays.
pub fn in_batch(
    batch: &Batch,
    keys: &[UniqueKey],
    excluded: &mut [bool],
    bad: &mut Vec<(usize, Reject)>,
) {
    for key in keys {
        let mut seen: HashMap<Cow<'_, [u8]>, u64> = HashMap::with_capacity(batch.good.len());
        for (i, ex) in excluded.iter_mut().enumerate() {
            if *ex {
                continue;
            }
            let Some(k) = key_bytes(batch, i, key) else {
                continue;
            };
            match seen.get(&k) {
                Some(first) => {
                    let values = key_of(batch, i, key).unwrap_or_default();
                    let detail = format!("appears earlier in the same batch (seq {first}).");
                    bad.push((i, duplicate(key, &values, detail)));
                    *ex = true;
                }
                None => {
                    seen.insert(k, batch.good[i].seq);
                }
            }
        }
    }
}

/// Marks rows whose key is already in the table: one query per unique key. Runs inside the
/// batch's transaction, after its robust check, so a batch that had committed is never probed
/// against its own rows.
pub async fn probe(
    conn: &mut PgConnection,
    batch: &Batch,
    keys: &[UniqueKey],
    excluded: &mut [bool],
    bad: &mut Vec<(usize, Reject)>,
) -> Result<(), sqlx::Error> {
    for key in keys {
        let mut rows = Vec::new();
        let mut arrays: Vec<Vec<String>> = vec![Vec::new(); key.fields.len()];
        for (i, _) in excluded.iter().enumerate().filter(|(_, e)| !**e) {
            let Some(values) = key_of(batch, i, key) else {
                continue;
            };
            rows.push(i);
            for (a, v) in arrays.iter_mut().zip(values) {
                a.push(v);
            }
        }
        if rows.is_empty() {
            continue;
        }
        let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(key.probe_sql.as_str()));
        for a in &arrays {
            q = q.bind(a);
        }
        let hits = q.fetch_all(&mut *conn).await?;
        for ord in hits {
            let Some(&i) = usize::try_from(ord - 1).ok().and_then(|o| rows.get(o)) else {
                continue;
            };
            if excluded[i] {
                continue;
            }
            let values: Vec<String> = arrays
                .iter()
                .map(|a| a[(ord - 1) as usize].clone())
                .collect();
            bad.push((i, duplicate(key, &values, "already exists.".into())));
            excluded[i] = true;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_escapes() {
        let line = b"a\\tb\t\\N\t42\\\\x\n";
        assert_eq!(field(line, 0).and_then(unescape).as_deref(), Some("a\tb"));
        assert_eq!(field(line, 1).and_then(unescape), None);
        assert_eq!(field(line, 2).and_then(unescape).as_deref(), Some("42\\x"));
        assert_eq!(field(line, 3), None);
    }

    #[test]
    fn probe_sql_casts_without_modifier() {
        let s = probe_sql(
            "\"public\".\"t\"",
            &["id".into(), "day".into()],
            &["pg_catalog.varchar".into(), "pg_catalog.date".into()],
        );
        assert_eq!(
            s,
            "SELECT u.ord FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(k0, k1, ord) WHERE EXISTS (SELECT 1 FROM \"public\".\"t\" t WHERE t.\"id\" = u.k0::pg_catalog.varchar AND t.\"day\" = u.k1::pg_catalog.date)"
        );
    }
}
