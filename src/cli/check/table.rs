//! `conveyor check`, the database side: conveyor's schema, the target table (or each route's),
//! how the messages' fields map onto its columns, and the privileges conveyor needs.

use super::*;

pub(super) async fn check_table(config: &Config, p: &PipelineConfig, r: &mut PipelineReport) {
    let mut db = match crate::db::connect(&config.database_url, config.connect_timeout).await {
        Ok(db) => db,
        Err(e) => {
            r.problems.push(format!("PostgreSQL unreachable: {e}"));
            return;
        }
    };
    table_checks(&mut db, config, p, r).await;
    use sqlx::Connection;
    let _ = db.close().await;
}

async fn table_checks(
    db: &mut sqlx::PgConnection,
    config: &Config,
    p: &PipelineConfig,
    r: &mut PipelineReport,
) {
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *db)
        .await
        .unwrap_or_else(|_| "the database user".into());
    schema_checks(db, config, &user, r).await;
    if !p.routes.is_empty() {
        route_checks(db, p, &user, r).await;
        return;
    }
    let columns = match crate::sink::catalog::read_columns(
        db,
        p.target_schema.as_deref(),
        &p.target_table,
    )
    .await
    {
        Ok(c) => c,
        Err(crate::sink::SinkError::NoTable { table }) => {
            r.problems.push(format!(
                    "target table {table} does not exist: create it (e.g. deploy/sql/person.sql), or fix the pipeline's target = {:?}",
                    r.plan.target
                ));
            return;
        }
        Err(e) => {
            r.problems
                .push(format!("cannot read the columns of {}: {e}", r.plan.target));
            return;
        }
    };
    r.plan.columns = Some(columns.len());
    let qualified = match &p.target_schema {
        Some(s) => format!(
            "{}.{}",
            crate::db::quote_ident(s),
            crate::db::quote_ident(&p.target_table)
        ),
        None => crate::db::quote_ident(&p.target_table),
    };
    match sqlx::query_scalar::<_, bool>("SELECT has_table_privilege($1, 'INSERT')")
        .bind(&qualified)
        .fetch_one(&mut *db)
        .await
    {
        Ok(true) => {}
        Ok(false) => r.problems.push(format!(
            "{user} may not INSERT into {}: GRANT INSERT ON {qualified} TO {user}",
            r.plan.target
        )),
        Err(e) => r.problems.push(format!(
            "cannot check the INSERT privilege on {}: {e}",
            r.plan.target
        )),
    }
    let decoder = match crate::decode::Decoder::new(&columns, p) {
        Ok(d) => d,
        Err(e) => {
            r.problems.push(format!(
                "the pipeline does not fit table {}: {e}",
                r.plan.target
            ));
            return;
        }
    };
    let copy: Vec<&str> = decoder.copy_columns().collect();
    r.plan.columns_mapped = Some(copy.len());
    for c in unfillable(&columns, p) {
        let col = columns.iter().find(|x| x.name == c);
        if col.is_some_and(|x| x.not_null) {
            r.problems.push(format!(
                "column {c:?} of {} is NOT NULL without a default, and no field fills it (a rename took its field): every row would be rejected. Map a field to it in [pipeline.rename]",
                r.plan.target
            ));
        } else {
            r.warnings.push(format!(
                "column {c:?} of {} is filled by no field (a rename took its field): it stays NULL",
                r.plan.target
            ));
        }
    }
    match crate::sink::keys::read_unique_keys(db, &qualified, &copy).await {
        Ok(keys) => {
            r.plan.unique_keys = keys
                .iter()
                .map(|k| format!("{} ({})", k.name, k.columns.join(", ")))
                .collect()
        }
        Err(e) => r.warnings.push(format!(
            "cannot read the unique keys of {}: {e}",
            r.plan.target
        )),
    }
}

/// A routed pipeline: every route's table exists, fits the route (keys, identity, job column)
/// and may be written; the identity tables exist; the post steps are listed.
async fn route_checks(
    db: &mut sqlx::PgConnection,
    p: &PipelineConfig,
    user: &str,
    r: &mut PipelineReport,
) {
    for route in &p.routes {
        let table = route.table_display();
        let rule = match (&route.when, &route.part) {
            (Some((f, v)), Some(part)) => format!("{f} = {v}, part {part}"),
            (Some((f, v)), None) => format!("{f} = {v}"),
            (None, Some(part)) => format!("part {part}"),
            (None, None) => "every message".into(),
        };
        r.plan.steps.push(format!(
            "step {}: {table} ({rule}; {:?}{}{})",
            route.step,
            route.mode,
            route
                .identity
                .as_ref()
                .map(|i| format!("; {} from {}.{} by {}", i.column, i.table, i.value, i.by))
                .unwrap_or_default(),
            if route.journal.is_empty() {
                String::new()
            } else {
                format!("; journal for {}", route.journal.join(", "))
            }
        ));
        if let Some(id) = &route.identity {
            let (schema, t) =
                crate::config::split_table(&id.table).unwrap_or((None, id.table.clone()));
            if let Err(e) = crate::sink::catalog::read_columns(db, schema.as_deref(), &t).await {
                r.problems.push(format!(
                    "step {}: identity table {}: {e}",
                    route.step, id.table
                ));
            }
        }
        let mut one = p.clone();
        one.routes = vec![route.clone()];
        match crate::sink::routed::Routes::check(db, &one).await {
            Ok(()) => {}
            Err(crate::sink::SinkError::NoTable { table }) => r.problems.push(format!(
                "step {}: table {table} does not exist: create it, or fix the route's table",
                route.step
            )),
            Err(e) => r.problems.push(format!("step {}: {e}", route.step)),
        }
        let privileges = if route.mode == crate::config::RouteMode::Upsert {
            "INSERT, UPDATE"
        } else {
            "INSERT"
        };
        match sqlx::query_scalar::<_, bool>("SELECT has_table_privilege($1, $2)")
            .bind(&table)
            .bind(privileges)
            .fetch_one(&mut *db)
            .await
        {
            Ok(true) => {}
            Ok(false) => r.problems.push(format!(
                "step {}: {user} may not {privileges} {table}: GRANT {privileges} ON {table} TO {user}",
                route.step
            )),
            Err(_) => {}
        }
    }
    for x in &p.post_steps {
        r.plan.steps.push(format!(
            "step {}: after each job: {} ({})",
            x.step, x.name, x.sql
        ));
    }
}

/// COPY columns that no JSON field reaches: the mapping `Decoder::new` builds (each column by
/// its own name, except the queue-time column; a rename moves a column to another field and
/// takes it from its own name), replayed here because the decoder keeps it private.
fn unfillable(columns: &[crate::decode::Column], p: &PipelineConfig) -> Vec<String> {
    let qt = p.queue_time_column.as_deref().map(str::to_lowercase);
    let copy: Vec<String> = columns
        .iter()
        .filter(|c| !c.db_filled || qt.as_deref() == Some(c.name.as_str()))
        .map(|c| c.name.to_lowercase())
        .collect();
    let mut fields: std::collections::HashMap<String, String> = copy
        .iter()
        .filter(|c| qt.as_deref() != Some(c.as_str()))
        .map(|c| (c.clone(), c.clone()))
        .collect();
    for (field, column) in &p.rename {
        fields.retain(|_, v| v != column || qt.as_deref() == Some(v.as_str()));
        fields.insert(field.clone(), column.clone());
    }
    copy.into_iter()
        .filter(|c| qt.as_deref() != Some(c.as_str()) && !fields.values().any(|v| v == c))
        .collect()
}

/// conveyor's schema: error tables `et_<job>`/`uv_<job>` are created there at every job start.
async fn schema_checks(
    db: &mut sqlx::PgConnection,
    config: &Config,
    user: &str,
    r: &mut PipelineReport,
) {
    let schema = &config.schema;
    let exists: Result<bool, _> =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *db)
            .await;
    let sql = match exists {
        Ok(true) => "SELECT has_schema_privilege($1, 'CREATE')",
        Ok(false) => "SELECT has_database_privilege(current_database(), 'CREATE')",
        Err(e) => {
            r.problems
                .push(format!("cannot look up schema {schema:?}: {e}"));
            return;
        }
    };
    let exists = exists.unwrap_or(false);
    let mut q = sqlx::query_scalar::<_, bool>(sql);
    if exists {
        q = q.bind(schema);
    }
    match q.fetch_one(&mut *db).await {
        Ok(true) if exists => r.plan.conveyor_schema = format!("{schema} (exists)"),
        Ok(true) => {
            r.plan.conveyor_schema =
                format!("{schema} (missing: `conveyor run` or `conveyor migrate` creates it)")
        }
        Ok(false) if exists => {
            r.plan.conveyor_schema = format!("{schema} (exists, no CREATE)");
            r.problems.push(format!(
                "{user} may not CREATE in schema {schema} (each job creates its error tables there): GRANT CREATE ON SCHEMA {schema} TO {user}"
            ));
        }
        Ok(false) => {
            r.plan.conveyor_schema = format!("{schema} (missing)");
            r.problems.push(format!(
                "schema {schema} does not exist and {user} may not create it: run `conveyor migrate` as the database owner, then GRANT CREATE ON SCHEMA {schema} TO {user}"
            ));
        }
        Err(e) => r
            .problems
            .push(format!("cannot check privileges on schema {schema:?}: {e}")),
    }
}

// ---- Disk --------------------------------------------------------------------------------
