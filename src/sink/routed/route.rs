//! One route of a routed pipeline: its table's columns and key, checked against the route's
//! settings at job start, and the SQL that writes a set of its rows (conflict handling by
//! mode, inserted vs updated counted by `xmax = 0`, change-journal rows in the same statement).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::config::{RouteConfig, RouteMode};
use crate::db::quote_ident as q;
use crate::decode::Column;

/// One route, its table read from the catalogue.
#[derive(Debug)]
pub struct Route {
    pub cfg: RouteConfig,
    /// Quoted, qualified table name.
    pub(super) table: String,
    /// Column names (lower-case) in table order.
    pub(super) columns: Vec<String>,
    pub(super) colset: HashSet<String>,
    /// Each column's type, for the value checks of `plan`.
    pub(super) defs: HashMap<String, Column>,
    /// Conflict and change-journal key: the configured key, else the primary key.
    pub(super) key: Vec<String>,
    pub(super) identity_sql: Option<String>,
}

impl Route {
    /// A route over a table with `columns` (in table order) and primary key `pk`.
    pub fn new(cfg: RouteConfig, table: Vec<Column>, pk: Vec<String>) -> Result<Route, String> {
        let columns: Vec<String> = table.iter().map(|c| c.name.to_lowercase()).collect();
        let defs: HashMap<String, Column> = table
            .into_iter()
            .map(|c| (c.name.to_lowercase(), c))
            .collect();
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
            defs,
            key,
            identity_sql,
        })
    }

    /// The statement writing rows with `cols` (table order): $1 jsonb array of the rows;
    /// journaled routes also $2 target, $3 job, $4 text[] subscribers. Returns one row:
    /// (inserted, updated).
    pub(super) fn statement(&self, cols: &[&str], schema: &str) -> String {
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
    pub(super) fn key_of(&self, row: &Map<String, Value>) -> Option<String> {
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

#[cfg(test)]
pub(super) mod testing {
    use crate::config::{RouteConfig, RouteMode};
    use crate::decode::{Column, ColumnKind};

    /// Columns of the given names: `id` and `*_id` integers, the rest text.
    pub fn defs(c: &[&str]) -> Vec<Column> {
        c.iter()
            .map(|n| Column {
                name: n.to_string(),
                kind: if *n == "id" || n.ends_with("_id") {
                    ColumnKind::Int8
                } else {
                    ColumnKind::Text { max_chars: None }
                },
                not_null: false,
                db_filled: false,
            })
            .collect()
    }

    pub fn cfg(
        step: i32,
        table: &str,
        when: Option<(&str, &str)>,
        part: Option<&str>,
    ) -> RouteConfig {
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

    pub fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{cfg, cols, defs};
    use super::*;

    #[test]
    fn upsert_statement_counts_inserts_and_updates_and_journals_keys() {
        let mut c = cfg(1, "customer", None, None);
        c.mode = RouteMode::Upsert;
        c.key = cols(&["email"]);
        c.journal = cols(&["crm", "marketing"]);
        let r = Route::new(c, defs(&["id", "email", "name"]), cols(&["id"])).expect("route");
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
            Route::new(bad, defs(&["id"]), vec![]).is_err(),
            "upsert needs a key"
        );
    }
}
