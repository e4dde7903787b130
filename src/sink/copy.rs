//! The COPY write path of a single-target batch: the rows sent in key order, and the bisection
//! under savepoints that isolates refused rows when the database's error names no COPY line.

use sqlx::postgres::PgConnection;
use tracing::warn;

use super::{db_error, is_row_error, reject_from_db, SinkError, Target};
use crate::decode::Reject;
use crate::pack::Batch;

/// The rows to send, in order: `None` for the whole batch as packed (nothing excluded, no key
/// order), else the included rows in key order (or packing order).
pub(super) fn sending_order(order: Option<&[usize]>, excluded: &[bool]) -> Option<Vec<usize>> {
    match order {
        None if !excluded.iter().any(|e| *e) => None,
        None => Some((0..excluded.len()).filter(|&i| !excluded[i]).collect()),
        Some(o) => Some(o.iter().copied().filter(|&i| !excluded[i]).collect()),
    }
}

/// COPY the batch's rows: all of them as packed (`None`), or `rows` in that order, gathered
/// into one buffer so the COPY is still a single stream of large messages.
pub(super) async fn copy_rows(
    conn: &mut PgConnection,
    target: &Target,
    batch: &Batch,
    rows: Option<&[usize]>,
) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(&target.copy_sql).await?;
    let sent = match rows {
        None => copy.send(batch.copy.as_slice()).await.map(|_| ()),
        Some(idx) => {
            let mut buf = Vec::with_capacity(batch.copy.len());
            for &i in idx {
                let row = &batch.good[i];
                buf.extend_from_slice(&batch.copy[row.start..row.end]);
            }
            copy.send(buf).await.map(|_| ())
        }
    };
    match sent {
        Ok(()) => copy.finish().await.map(|_| ()),
        Err(e) => {
            let _ = copy.abort("conveyor: send failed").await;
            Err(e)
        }
    }
}

/// Loads every included row that the database accepts, isolating refused rows by halving the
/// set under savepoints. Used only when an error does not name its line.
pub(super) async fn bisect_rows(
    conn: &mut PgConnection,
    target: &Target,
    batch: &Batch,
    all: Vec<usize>,
    excluded: &mut [bool],
    db_bad: &mut Vec<(usize, Reject)>,
) -> Result<(), SinkError> {
    let q = |what: &'static str| move |source| SinkError::Query { what, source };
    let mut stack = vec![all];
    let mut trips = 0u32;
    while let Some(set) = stack.pop() {
        if set.is_empty() {
            continue;
        }
        trips += 1;
        sqlx::raw_sql("SAVEPOINT conveyor_bisect")
            .execute(&mut *conn)
            .await
            .map_err(q("SAVEPOINT"))?;
        match copy_rows(conn, target, batch, Some(&set)).await {
            Ok(()) => {
                sqlx::raw_sql("RELEASE SAVEPOINT conveyor_bisect")
                    .execute(&mut *conn)
                    .await
                    .map_err(q("RELEASE SAVEPOINT"))?;
            }
            Err(e) if is_row_error(&e) => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT conveyor_bisect")
                    .execute(&mut *conn)
                    .await
                    .map_err(q("ROLLBACK TO SAVEPOINT"))?;
                if set.len() == 1 {
                    excluded[set[0]] = true;
                    db_bad.push((set[0], reject_from_db(&e)));
                } else {
                    let (a, b) = set.split_at(set.len() / 2);
                    stack.push(b.to_vec());
                    stack.push(a.to_vec());
                }
            }
            Err(e) => return Err(q("COPY while bisecting")(e)),
        }
    }
    warn!(job = %target.job, batch = batch.id, refused = db_bad.len(), round_trips = trips, "bisected a refused batch");
    Ok(())
}

/// The 1-based COPY input line an error names (`CONTEXT: COPY person, line 17, column …`).
pub(super) fn copy_line(e: &sqlx::Error) -> Option<usize> {
    let w = db_error(e)?.r#where()?;
    let rest = &w[w.find(", line ")? + 7..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
