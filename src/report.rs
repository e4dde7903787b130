//! The job report `<report_dir>/<job>.output` (DESIGN §5): one line per event, in the style of
//! TPump's notify exit (seeds/001) — Init, QueueOpen, PhaseBegin, ImportEnd, TableStats,
//! ErrTableDrop, Exit — closed by a final stats line. Appends go through tokio's file API
//! (a blocking pool), never blocking the runtime; a report that cannot be written is logged and
//! never stops the load.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tracing::warn;

#[derive(Debug)]
pub struct Report {
    path: PathBuf,
    job: String,
    failed: bool,
}

impl Report {
    pub fn new(dir: &Path, job: &str) -> Report {
        Report {
            path: dir.join(format!("{job}.output")),
            job: job.to_string(),
            failed: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `HH:MM:SS conveyor - <event>: <detail>`.
    pub async fn event(&mut self, event: &str, detail: &str) {
        let line = format!(
            "{} conveyor - {event}: {detail}\n",
            chrono::Utc::now().format("%H:%M:%S%.3f")
        );
        self.append(&line).await;
    }

    async fn append(&mut self, line: &str) {
        if self.failed {
            return;
        }
        let r = async {
            if let Some(dir) = self.path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            f.write_all(line.as_bytes()).await?;
            f.flush().await
        }
        .await;
        if let Err(e) = r {
            warn!(job = %self.job, path = %self.path.display(), error = %e, "cannot write the job report (set report.dir to a writable directory); continuing without it");
            self.failed = true;
        }
    }
}
