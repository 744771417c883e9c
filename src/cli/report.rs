//! `pklock status`, `pklock stats` and `pklock ping`: ask the server and
//! print a table for people or JSON for scripts.

use std::time::Duration;

use super::{Access, Failure, StopTime, exit, human};
use crate::client::{Client, Error, Mode, StatsResult, StatusFilter, StatusResult};

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

/// The status as aligned columns: one row per holder and per waiter. A
/// semaphore has a row of its own above them, `api  semaphore  3/5 held`
/// (the permits its holders take, of its permits), and each holder's and
/// waiter's mode is its take: `take 2`.
pub fn status_table(status: &StatusResult) -> String {
    let mut rows = vec![
        [
            "LOCK", "MODE", "STATE", "CONN", "CLIENT", "PEER", "TOKEN", "FOR",
        ]
        .map(String::from),
    ];
    for lock in &status.locks {
        let mode = |mode: Mode, take: Option<u32>| match (lock.permits, take) {
            (Some(_), Some(take)) => format!("take {take}"),
            _ => mode.as_str().to_string(),
        };
        if let Some(permits) = lock.permits {
            let held: u64 = lock
                .holders
                .iter()
                .map(|h| u64::from(h.take.unwrap_or(1)))
                .sum();
            let mut row: [String; 8] = Default::default();
            row[0] = lock.lock_name.clone();
            row[1] = "semaphore".to_string();
            row[2] = format!("{held}/{permits} held");
            rows.push(row);
        }
        for h in &lock.holders {
            rows.push([
                lock.lock_name.clone(),
                mode(h.mode, h.take),
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
                mode(w.mode, w.take),
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
    let rows: [(&str, String); 17] = [
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
        ("deadlocks", s.deadlocks.to_string()),
        ("deadlock checks cut", s.deadlock_checks_cut.to_string()),
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
    fn a_semaphore_shows_the_permits_held_and_each_take() {
        let holder = |conn, take| HolderStatus {
            conn,
            client: format!("worker {conn}"),
            peer: "127.0.0.1:5000".into(),
            mode: Mode::Shared,
            token: 100 + conn,
            take: Some(take),
            held_ms: 2000,
        };
        let status = StatusResult {
            locks: vec![
                LockStatus {
                    lock_name: "api".into(),
                    permits: Some(5),
                    holders: vec![holder(3, 2), holder(4, 1)],
                    waiters: vec![WaiterStatus {
                        conn: 5,
                        client: "worker 5".into(),
                        peer: "127.0.0.1:5001".into(),
                        mode: Mode::Shared,
                        take: Some(3),
                        waiting_ms: 100,
                    }],
                },
                LockStatus {
                    lock_name: "backup-of-everything".into(),
                    permits: None,
                    holders: vec![HolderStatus {
                        take: None,
                        mode: Mode::Exclusive,
                        ..holder(6, 1)
                    }],
                    waiters: vec![],
                },
            ],
            truncated: false,
        };
        let table = status_table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1]),
            ["api", "semaphore", "3/5", "held"],
            "{table}"
        );
        assert_eq!(
            cells(lines[2])[..5],
            ["api", "take", "2", "held", "3"],
            "{table}"
        );
        assert_eq!(
            cells(lines[3])[..5],
            ["api", "take", "1", "held", "4"],
            "{table}"
        );
        assert_eq!(
            cells(lines[4])[..5],
            ["api", "take", "3", "waiting", "5"],
            "{table}"
        );
        assert_eq!(
            cells(lines[5])[..3],
            ["backup-of-everything", "exclusive", "held"]
        );
        // Every column starts where its heading does.
        for heading in ["MODE", "STATE", "CONN", "TOKEN"] {
            let at = lines[0].find(heading).unwrap();
            for line in &lines[2..] {
                let before = line.as_bytes()[at - 1];
                let here = line.as_bytes()[at];
                assert!(
                    before == b' ' && here != b' ',
                    "{heading} in {line:?}\n{table}"
                );
            }
        }
        let state = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][state..], "3/5 held", "{table}");
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
