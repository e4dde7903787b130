//! Reads the target table's columns from the PostgreSQL catalogue at job start, so decode can
//! check types, lengths, precision and nullability before a row is ever sent.

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::SinkError;
use crate::decode::{Column, ColumnKind};

/// Columns of `schema.table` (or `table` on the search_path) in attribute order.
pub async fn read_columns(
    conn: &mut PgConnection,
    schema: Option<&str>,
    table: &str,
) -> Result<Vec<Column>, SinkError> {
    let qualified = match schema {
        Some(s) => format!(
            "{}.{}",
            crate::db::quote_ident(s),
            crate::db::quote_ident(table)
        ),
        None => crate::db::quote_ident(table),
    };
    let rows = sqlx::query(
        "SELECT a.attname::text AS name, t.typname::text AS typname, a.atttypmod AS typmod,
                a.attnotnull AS not_null,
                (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS db_filled
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(&qualified)
    .fetch_all(&mut *conn)
    .await
    .map_err(|source| SinkError::Query {
        what: "reading the target table's columns",
        source,
    })?;
    if rows.is_empty() {
        return Err(SinkError::NoTable { table: qualified });
    }
    let mut cols = Vec::with_capacity(rows.len());
    for r in rows {
        let typname: String = r.get("typname");
        let typmod: i32 = r.get("typmod");
        cols.push(Column {
            name: r.get("name"),
            kind: column_kind(&typname, typmod),
            not_null: r.get("not_null"),
            db_filled: r.get("db_filled"),
        });
    }
    Ok(cols)
}

/// Maps a PostgreSQL type name and type modifier to the checks decode applies.
pub fn column_kind(typname: &str, typmod: i32) -> ColumnKind {
    // For varchar/bpchar typmod is length + 4; for numeric ((p << 16) | s) + 4; -1 = none.
    let m = (typmod >= 4).then(|| (typmod - 4) as u32);
    match typname {
        "int2" => ColumnKind::Int2,
        "int4" => ColumnKind::Int4,
        "int8" => ColumnKind::Int8,
        "numeric" => ColumnKind::Numeric(m.map(|m| ((m >> 16) & 0xffff, m & 0xffff))),
        "float4" | "float8" => ColumnKind::Float,
        "bool" => ColumnKind::Bool,
        "text" | "citext" | "name" => ColumnKind::Text { max_chars: None },
        "varchar" | "bpchar" => ColumnKind::Text {
            max_chars: m.map(|m| m as usize),
        },
        "date" => ColumnKind::Date,
        "timestamp" | "timestamptz" => ColumnKind::Timestamp,
        "uuid" => ColumnKind::Uuid,
        "json" | "jsonb" => ColumnKind::Json,
        other => ColumnKind::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_modifiers() {
        assert_eq!(
            column_kind("varchar", 24),
            ColumnKind::Text {
                max_chars: Some(20)
            }
        );
        assert_eq!(
            column_kind("varchar", -1),
            ColumnKind::Text { max_chars: None }
        );
        assert_eq!(
            column_kind("numeric", ((9 << 16) | 2) + 4),
            ColumnKind::Numeric(Some((9, 2)))
        );
        assert_eq!(column_kind("numeric", -1), ColumnKind::Numeric(None));
        assert_eq!(column_kind("inet", -1), ColumnKind::Other("inet".into()));
    }
}
