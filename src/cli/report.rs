//! `pklock status`, `pklock stats` and `pklock ping`: ask the server and
//! print a table for people or JSON for scripts.

use std::time::Duration;

use super::{Access, Failure, StopTime, exit, human};
use crate::client::{Client, Error, StatsResult, StatusFilter, StatusResult};

pub(crate) fn query_failed(what: &str, e: Error) -> Failure {
    let code = match e {
        Error::PermissionDenied { .. } => return Failure::new(exit::NOPERM, e.to_string()),
        Error::Lost(_) | Error::Refused { .. } => exit::UNAVAILABLE,
        _ => exit::SOFTWARE,
    };
    Failure::new(code, format!("{what}: {e}"))
}

fn json(value: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string_pretty(value)
        .map(|text| text + "\n")
        .map_err(|e| Failure::new(exit::SOFTWARE, e.to_string()))
}

/// Locks whose names start with `prefix` (all without one), as a table or JSON.
pub fn status(
    server: &str,
    access: &Access,
    prefix: Option<&str>,
    as_json: bool,
) -> Result<String, Failure> {
    let client = super::connect(
        server,
        access,
        "pklock status",
        StopTime::Exactly(Duration::ZERO),
    )?;
    let filter = prefix.map_or(StatusFilter::All, |p| StatusFilter::Prefix(p.to_string()));
    let mut status = StatusResult {
        locks: Vec::new(),
        truncated: false,
    };
    // Page by page: the server cuts each reply short at about 64 KiB.
    loop {
        let after = status.locks.last().map(|lock| lock.lock_name.clone());
        let page = client
            .status_after(
                &filter,
                after.as_deref(),
                Some(crate::protocol::MAX_STATUS_LIMIT),
            )
            .map_err(|e| query_failed("status", e))?;
        let progress = !page.locks.is_empty();
        status.locks.extend(page.locks);
        status.truncated = page.truncated;
        // A lock whose holders and waiters alone fill a page is shown cut
        // (the next page starts after it).
        if !page.truncated || !progress {
            break;
        }
    }
    if as_json {
        return json(&status);
    }
    Ok(status_table(&status))
}

/// The status as aligned columns: one row per holder and per waiter.
pub fn status_table(status: &StatusResult) -> String {
    let mut rows = vec![
        [
            "LOCK", "MODE", "STATE", "CONN", "CLIENT", "PEER", "TOKEN", "FOR",
        ]
        .map(String::from),
    ];
    for lock in &status.locks {
        for h in &lock.holders {
            rows.push([
                lock.lock_name.clone(),
                h.mode.as_str().to_string(),
                "held".to_string(),
                h.conn.to_string(),
                h.client.clone(),
                h.peer.clone(),
                h.token.to_string(),
                human(Duration::from_millis(h.held_ms)),
            ]);
        }
        for w in &lock.waiters {
            rows.push([
                lock.lock_name.clone(),
                w.mode.as_str().to_string(),
                "waiting".to_string(),
                w.conn.to_string(),
                w.client.clone(),
                w.peer.clone(),
                "-".to_string(),
                human(Duration::from_millis(w.waiting_ms)),
            ]);
        }
    }
    if rows.len() == 1 {
        return "no locks held or waited for\n".to_string();
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if status.truncated {
        out.push_str("(list cut short: use a prefix)\n");
    }
    out
}

/// Server counters, as `key value` lines or JSON.
pub fn stats(server: &str, access: &Access, as_json: bool) -> Result<String, Failure> {
    let client = super::connect(
        server,
        access,
        "pklock stats",
        StopTime::Exactly(Duration::ZERO),
    )?;
    let stats = client.stats().map_err(|e| query_failed("stats", e))?;
    if as_json {
        return json(&stats);
    }
    Ok(stats_lines(&stats))
}

fn stats_lines(s: &StatsResult) -> String {
    let rows: [(&str, String); 15] = [
        ("uptime", human(Duration::from_millis(s.uptime_ms))),
        ("connections", s.connections.to_string()),
        ("locks", s.locks.to_string()),
        ("locks held", s.locks_held.to_string()),
        ("waiters", s.waiters.to_string()),
        ("grants", s.grants.to_string()),
        ("timeouts", s.timeouts.to_string()),
        (
            "released by disconnect",
            s.released_by_disconnect.to_string(),
        ),
        ("rejected connections", s.rejected_connections.to_string()),
        ("bad messages", s.bad_messages.to_string()),
        ("frame timeouts", s.frame_timeouts.to_string()),
        ("reclaims", s.reclaims.to_string()),
        ("reclaims refused", s.reclaims_refused.to_string()),
        ("reclaim conflicts", s.reclaim_conflicts.to_string()),
        ("awaiting reclaim", s.awaiting_reclaim.to_string()),
    ];
    rows.iter()
        .map(|(key, value)| format!("{key:<24}{value}\n"))
        .collect()
}

/// Checks that the server answers; says who answered and how fast.
pub fn ping(server: &str, access: &Access) -> Result<String, Failure> {
    let client: Client = super::connect(
        server,
        access,
        "pklock ping",
        StopTime::Exactly(Duration::ZERO),
    )?;
    let round_trip = client.ping().map_err(|e| query_failed("ping", e))?;
    let hello = client.hello();
    Ok(format!(
        "{}: {} {} answered in {:.2} ms\n",
        client.server(),
        hello.server.name,
        hello.server.version,
        round_trip.as_secs_f64() * 1000.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock_table::Mode;
    use crate::protocol::{HolderStatus, LockStatus, WaiterStatus};

    #[test]
    fn table_has_a_row_per_holder_and_waiter_with_aligned_columns() {
        let status = StatusResult {
            locks: vec![LockStatus {
                lock_name: "backup".into(),
                permits: None,
                holders: vec![HolderStatus {
                    conn: 3,
                    client: "nightly".into(),
                    peer: "127.0.0.1:5000".into(),
                    mode: Mode::Exclusive,
                    token: 42,
                    take: None,
                    held_ms: 1500,
                }],
                waiters: vec![WaiterStatus {
                    conn: 12,
                    client: "deploy job".into(),
                    peer: "10.0.0.7:40000".into(),
                    mode: Mode::Shared,
                    take: None,
                    waiting_ms: 250,
                }],
            }],
            truncated: false,
        };
        let table = status_table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("backup  exclusive  held"), "{table}");
        assert!(
            lines[1].contains("nightly") && lines[1].contains("42") && lines[1].ends_with("1.5s")
        );
        assert!(
            lines[2].contains("waiting")
                && lines[2].contains("deploy job")
                && lines[2].ends_with("250ms")
        );
        let token_column = lines[0].find("TOKEN").unwrap();
        assert_eq!(&lines[1][token_column..token_column + 2], "42");
    }

    #[test]
    fn empty_status_says_so() {
        let status = StatusResult {
            locks: vec![],
            truncated: false,
        };
        assert_eq!(status_table(&status), "no locks held or waited for\n");
    }
}
