//! `conveyor run`: load the config, install signal handlers, run the daemon.

use std::path::Path;

use tokio_util::sync::CancellationToken;

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = crate::config::Config::load(config_path)?;
    super::init_logging(config.log_format, &config.log_level);
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot install the SIGTERM handler: {e}"))?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping consumers, committing in-flight batches"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping consumers, committing in-flight batches"),
        }
        on_signal.cancel();
    });
    crate::daemon::run(config, shutdown).await?;
    tracing::info!("conveyor stopped cleanly");
    Ok(())
}
