//! The `--watch` loops of `conveyor status` and `conveyor stats`: the connection kept across
//! refreshes, Ctrl-C, the screen, and `Watch`, which runs the loop's common part (a first
//! failure is the answer, later ones are shown and retried; print, then wait or stop).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use sqlx::postgres::PgConnection;

use super::table::{duration, short_time};
use crate::config::Config;

/// Shortest `--watch` period: below it the refreshes themselves would load the database more
/// than the dashboard is worth.
const MIN_WATCH: Duration = Duration::from_millis(100);

/// One command's refresh loop: shows each refresh, then waits `every` (None: once only).
pub(super) struct Watch {
    every: Option<Duration>,
    interrupt: Option<Interrupt>,
    first: bool,
}

impl Watch {
    pub(super) fn new(every: Option<Duration>) -> anyhow::Result<Watch> {
        Ok(Watch {
            every,
            interrupt: every.map(|_| Interrupt::new()).transpose()?,
            first: true,
        })
    }

    /// A refresh failed: on the first one that is the answer (`Err`); later ones (a database
    /// restart) are shown, and the watch goes on trying (`Ok`).
    pub(super) fn failed(&self, e: anyhow::Error) -> anyhow::Result<anyhow::Error> {
        if self.first {
            Err(e)
        } else {
            Ok(e)
        }
    }

    /// The refresh period (zero without --watch), for messages.
    pub(super) fn every(&self) -> Duration {
        self.every.unwrap_or_default()
    }

    /// Prints `text`, then waits for the next refresh; false when the loop ends (no --watch,
    /// Ctrl-C, or stdout closed, e.g. piped into head).
    pub(super) async fn shown(&mut self, text: &str) -> anyhow::Result<bool> {
        self.first = false;
        if !text.is_empty() && !print_out(text)? {
            return Ok(false);
        }
        match (self.every, self.interrupt.as_mut()) {
            (Some(every), Some(i)) => Ok(i.sleep(every).await),
            _ => Ok(false),
        }
    }
}

/// The first line of a `--watch` screen of `conveyor <command>`.
pub(super) fn watch_header(command: &str, taken_at: &str, every: Duration) -> String {
    format!(
        "conveyor {command} at {} UTC (every {}; Ctrl-C to stop)\n\n",
        short_time(taken_at),
        duration(every.as_secs_f64())
    )
}

/// The watch loops' connection: the one kept from the last refresh, or a new one whose schema
/// is checked to hold conveyor's `tables` first.
pub(super) async fn connection<'c>(
    conn: &'c mut Option<PgConnection>,
    config: &Config,
    config_path: &Path,
    tables: &[&str],
) -> anyhow::Result<&'c mut PgConnection> {
    if conn.is_none() {
        let mut c = crate::db::connect(&config.database_url, config.connect_timeout).await?;
        super::check_tables(&mut c, &config.schema, tables, config_path).await?;
        *conn = Some(c);
    }
    conn.as_mut()
        .ok_or_else(|| anyhow::anyhow!("no database connection"))
}

/// Parses `--watch`: seconds, a decimal number (2, 0.5), at least [`MIN_WATCH`].
pub(super) fn parse_watch(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 2 or 0.5)"))?;
    let d = Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 2 or 0.5)"))?;
    if d < MIN_WATCH {
        return Err(format!(
            "{s:?} is too short: refresh at most every {} s",
            MIN_WATCH.as_secs_f64()
        ));
    }
    Ok(d)
}

/// Ends a `--watch` loop on Ctrl-C (SIGINT) or SIGTERM. Registered before the first refresh,
/// so a signal arriving during a query is kept for the next wait.
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn new() -> anyhow::Result<Interrupt> {
        use tokio::signal::unix::{signal, SignalKind};
        let err = |e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}");
        Ok(Interrupt {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
        })
    }

    /// Waits `d`; false when interrupted meanwhile (or before).
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.int.recv() => false,
            _ = self.term.recv() => false,
        }
    }
}

/// The escape sequence that clears a terminal (cursor home, erase display); when stdout is not
/// a terminal (a file or pipe keeps every refresh), an empty line between refreshes.
pub(super) fn clear_screen() -> &'static str {
    if std::io::stdout().is_terminal() {
        "\x1b[H\x1b[2J"
    } else {
        "\n"
    }
}

/// Writes `text` to stdout; false when stdout has been closed (the reader went away).
fn print_out(text: &str) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_periods_parse() {
        assert_eq!(parse_watch("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_watch("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_watch("3s"), Ok(Duration::from_secs(3)));
        assert!(parse_watch("0").unwrap_err().contains("too short"));
        assert!(parse_watch("-1").is_err());
        assert!(parse_watch("soon").unwrap_err().contains("seconds"));
    }
}
