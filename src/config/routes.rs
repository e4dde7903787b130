//! A pipeline's routes (`[[pipeline.route]]`) and post-job SQL steps (`[[pipeline.post_step]]`):
//! ETL2-style multi-table loading. Each route is a numbered step that takes the messages (or the
//! parts of messages) its `when` rule selects into one table, with its own write mode; post-job
//! steps are SQL statements run after a job's load succeeded.

use serde::Deserialize;

use super::is_identifier;

/// How a route writes its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Plain insert: a duplicate key refuses the message (to `uv_<job>`).
    Insert,
    /// `ON CONFLICT DO NOTHING`: a row whose key exists is counted as ignored.
    InsertIgnore,
    /// `ON CONFLICT (key) DO UPDATE`: inserted and updated rows are counted apart.
    Upsert,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The target column the resolved value fills (e.g. `customer_id`).
    pub column: String,
    /// The message field holding the natural key (e.g. `email`); dropped from the row unless
    /// it is also a column of the table.
    pub field: String,
    /// `schema.table` to resolve it in (e.g. `crm.customer`).
    pub table: String,
    /// Column of `table` matched against the field (e.g. `active_email_address`, or
    /// `alt_customer_id` — ETL2's two variants).
    pub by: String,
    /// Column of `table` whose value fills `column` (e.g. `customer_id`).
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Step number (ETL2's step selector); default: the route's position, from 1.
    pub step: Option<i32>,
    /// `table` or `schema.table`.
    pub table: String,
    /// `field = value`: only messages whose `field` equals `value` (compared as text).
    pub when: Option<String>,
    /// The message field holding this table's row (an object) or rows (an array of objects);
    /// absent: the whole message is the row.
    pub part: Option<String>,
    #[serde(default = "default_route_mode")]
    pub mode: RouteMode,
    /// Conflict columns for `upsert` / `insert_ignore`, and the change journal's key
    /// (default: the table's primary key).
    #[serde(default)]
    pub key: Vec<String>,
    /// A column filled with the job's name (e.g. for a post-job step to find the job's rows).
    pub job_column: Option<String>,
    pub identity: Option<Identity>,
    /// Change-journal subscribers: every row this route loads is journaled once for each.
    #[serde(default)]
    pub journal: Vec<String>,
}

fn default_route_mode() -> RouteMode {
    RouteMode::Insert
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostStep {
    /// Step number; default: after the routes and the post steps before it.
    pub step: Option<i32>,
    /// What it does, for `conveyor status` and the logs.
    pub name: Option<String>,
    /// One SQL statement; `$1` is the job's name (e.g.
    /// `UPDATE crm.event SET status = 1 WHERE status = 200 AND load_job = $1`).
    pub sql: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteConfig {
    pub step: i32,
    pub target_schema: Option<String>,
    pub target_table: String,
    /// (field lower-cased, value).
    pub when: Option<(String, String)>,
    pub part: Option<String>,
    pub mode: RouteMode,
    pub key: Vec<String>,
    pub job_column: Option<String>,
    pub identity: Option<Identity>,
    pub journal: Vec<String>,
}

impl RouteConfig {
    /// `schema.table` or `table`, as configured.
    pub fn table_display(&self) -> String {
        match &self.target_schema {
            Some(s) => format!("{s}.{}", self.target_table),
            None => self.target_table.clone(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PostStep {
    pub step: i32,
    pub name: String,
    pub sql: String,
}

/// `schema.table` or `table` into its parts, if both are plain identifiers.
pub fn split_table(s: &str) -> Option<(Option<String>, String)> {
    let (schema, table) = match s.split_once('.') {
        Some((a, b)) => (Some(a.to_string()), b.to_string()),
        None => (None, s.to_string()),
    };
    (schema.as_deref().is_none_or(is_identifier) && is_identifier(&table))
        .then_some((schema, table))
}

/// Checks the routes and post steps of the pipeline at `at`, adding every problem.
pub fn validate(
    at: &str,
    routes: Vec<RawRoute>,
    post: Vec<RawPostStep>,
    problems: &mut Vec<String>,
) -> (Vec<RouteConfig>, Vec<PostStep>) {
    let mut out = Vec::new();
    let mut steps = std::collections::BTreeSet::new();
    for (i, r) in routes.into_iter().enumerate() {
        let here = format!("{at}.route[{i}]");
        let step = r.step.unwrap_or(i as i32 + 1);
        if step < 1 {
            problems.push(format!("{here}.step = {step} must be 1 or more"));
        }
        if !steps.insert(step) {
            problems.push(format!(
                "{here}.step = {step} is used twice: give each step its own number"
            ));
        }
        let Some((target_schema, target_table)) = split_table(&r.table) else {
            problems.push(format!(
                "{here}.table = {:?} must be table or schema.table (plain identifiers)",
                r.table
            ));
            continue;
        };
        let when = match r.when.as_deref().map(|w| w.split_once('=')) {
            None => None,
            Some(Some((f, v))) if !f.trim().is_empty() => Some((
                f.trim().to_lowercase(),
                v.trim().trim_matches('"').trim_matches('\'').to_string(),
            )),
            Some(_) => {
                problems.push(format!(
                    "{here}.when = {:?} must read `field = value` (e.g. \"type = customer\")",
                    r.when.unwrap_or_default()
                ));
                None
            }
        };
        for c in r
            .key
            .iter()
            .chain(r.job_column.iter())
            .chain(r.identity.iter().flat_map(|i| [&i.column, &i.by, &i.value]))
        {
            if !is_identifier(c) {
                problems.push(format!("{here}: column {c:?} must be a plain identifier"));
            }
        }
        if let Some(id) = &r.identity {
            if split_table(&id.table).is_none() {
                problems.push(format!(
                    "{here}.identity.table = {:?} must be table or schema.table",
                    id.table
                ));
            }
        }
        for s in &r.journal {
            if s.is_empty() || s.len() > 100 {
                problems.push(format!(
                    "{here}.journal: subscriber {s:?} must be 1 to 100 bytes"
                ));
            }
        }
        out.push(RouteConfig {
            step,
            target_schema,
            target_table,
            when,
            part: r.part.map(|p| p.to_lowercase()),
            mode: r.mode,
            key: r.key.iter().map(|k| k.to_lowercase()).collect(),
            job_column: r.job_column.map(|c| c.to_lowercase()),
            identity: r.identity.map(|i| Identity {
                column: i.column.to_lowercase(),
                field: i.field.to_lowercase(),
                table: i.table,
                by: i.by.to_lowercase(),
                value: i.value.to_lowercase(),
            }),
            journal: r.journal,
        });
    }
    let mut next = steps.iter().max().copied().unwrap_or(0) + 1;
    let mut post_steps = Vec::new();
    for (i, s) in post.into_iter().enumerate() {
        let here = format!("{at}.post_step[{i}]");
        let step = s.step.unwrap_or(next);
        next = next.max(step + 1);
        if !steps.insert(step) {
            problems.push(format!("{here}.step = {step} is used twice"));
        }
        if s.sql.trim().is_empty() {
            problems.push(format!("{here}.sql is empty"));
        }
        post_steps.push(PostStep {
            step,
            name: s.name.unwrap_or_else(|| format!("post step {step}")),
            sql: s.sql,
        });
    }
    if let Some(s) = post_steps.windows(2).find(|w| w[0].step > w[1].step) {
        problems.push(format!(
            "{at}.post_step: steps must be in increasing order ({} before {})",
            s[0].step, s[1].step
        ));
    }
    out.sort_by_key(|r| r.step);
    (out, post_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(table: &str, when: Option<&str>) -> RawRoute {
        RawRoute {
            step: None,
            table: table.into(),
            when: when.map(Into::into),
            part: None,
            mode: RouteMode::Insert,
            key: vec![],
            job_column: None,
            identity: None,
            journal: vec![],
        }
    }

    #[test]
    fn steps_number_routes_then_post_steps() {
        let mut problems = Vec::new();
        let (routes, post) = validate(
            "p",
            vec![
                route("a.customer", Some("type = customer")),
                route("a.event", None),
            ],
            vec![RawPostStep {
                step: None,
                name: None,
                sql: "UPDATE a.event SET status = 1 WHERE load_job = $1".into(),
            }],
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(routes.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(routes[0].when, Some(("type".into(), "customer".into())));
        assert_eq!(post[0].step, 3);
    }

    #[test]
    fn bad_routes_are_each_reported() {
        let mut problems = Vec::new();
        let mut dup = route("t", Some("nonsense"));
        dup.step = Some(1);
        validate(
            "p",
            vec![route("x.y.z", None), route("t", None), dup],
            vec![RawPostStep {
                step: Some(1),
                name: None,
                sql: " ".into(),
            }],
            &mut problems,
        );
        let all = problems.join("\n");
        assert!(all.contains("route[0].table"), "{all}");
        assert!(all.contains("used twice"), "{all}");
        assert!(all.contains("field = value"), "{all}");
        assert!(all.contains("sql is empty"), "{all}");
    }
}
