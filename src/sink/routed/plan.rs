//! Planning one message of a routed pipeline: which routes take it (their `when` rules), the
//! rows it brings to each (whole, or the object or array of objects in a route's `part`), the
//! fields checked against each table, the natural key to resolve, the job column filled. Pure:
//! no database, so every rule is unit-tested here.

use serde_json::{Map, Value};

use super::{Planned, Routes};
use crate::config::UnknownFields;
use crate::decode::{Reject, RejectKind};

impl Routes {
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
                if row.is_empty() && natural.is_none() {
                    return Err((
                        Reject::new(
                            RejectKind::MissingField,
                            None,
                            format!(
                                "step {}: the row has no field for {}",
                                r.cfg.step,
                                r.cfg.table_display()
                            ),
                        ),
                        Some(ri),
                    ));
                }
                for (k, v) in &row {
                    if let Some(col) = r.defs.get(k) {
                        crate::decode::check_value(col, v).map_err(|e| (e, Some(ri)))?;
                    }
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
pub(super) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::route::testing::{cfg, cols, defs};
    use super::super::Route;
    use super::*;
    use crate::config::Identity;

    fn routes() -> Routes {
        let customer = Route::new(
            cfg(1, "customer", Some(("type", "customer")), None),
            defs(&["id", "email", "name"]),
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
            defs(&["id", "customer_id", "name", "value", "load_job"]),
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
        let (e, route) = r.plan(br#"{"type":"customer"}"#).expect_err("empty row");
        assert_eq!((e.kind, route), (RejectKind::MissingField, Some(0)));
        let (e, route) = r
            .plan(br#"{"type":"customer","id":"x1","email":"a@x"}"#)
            .expect_err("not an integer");
        assert_eq!(route, Some(0));
        assert_eq!(e.column.as_deref(), Some("id"), "{e:?}");
        let (e, _) = r.plan(br#"{"id":1,"ID":2}"#).expect_err("dup");

        assert_eq!(e.kind, RejectKind::DuplicateField);
    }
}
