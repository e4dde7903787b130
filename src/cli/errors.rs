//! `conveyor errors`: shows the error rows of jobs (placeholder until implemented).

use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct ErrorsArgs {}

pub async fn run(_config_path: &Path, _args: ErrorsArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
