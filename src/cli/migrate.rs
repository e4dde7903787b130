//! `conveyor migrate`: apply the embedded migrations into database.schema.

use std::path::Path;

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, &config.log_level);
    crate::db::migrate(&config.database_url, &config.schema, config.connect_timeout).await?;
    println!(
        "schema {:?} is up to date ({} migration(s))",
        config.schema,
        crate::db::MIGRATOR.iter().count()
    );
    Ok(())
}
