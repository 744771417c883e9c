//! The Prometheus endpoint's words: the counters the event loop keeps
//! besides the lock table's, what a walk over the locks gathers, a
//! scrape's request parsed with httparse, and the text exposition format
//! rendered from a [`Snapshot`]. No sockets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::histogram::Durations;
use crate::lock_table::Totals;
use crate::prefixes::Prefixes;

/// The largest scrape request taken: a GET with its headers.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Locks given a series of their own at most (those under
/// `metrics_lock_prefixes`, in name order); the rest are counted in
/// `pklock_lock_series_dropped`.
pub const MAX_LOCK_SERIES: usize = 1000;

/// What the event loop counts for the metrics.
#[derive(Clone, Debug)]
pub struct Counters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused at accept, by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Locks released by closes, by cause (unlocks are the table's).
    pub released: BTreeMap<&'static str, u64>,
    /// Error answers, by their word.
    pub errors: BTreeMap<&'static str, u64>,
}

/// Reasons, causes and words shown from the start at 0, so that alerts
/// on their rate need no series to appear first.
const REFUSALS: [&str; 4] = [
    "not_allowed",
    "max_connections",
    "max_connections_per_ip",
    "out_of_descriptors",
];
const CAUSES: [&str; 5] = [
    "disconnect",
    "keepalive",
    "not_reading",
    "force",
    "stepped_down",
];
const ERRORS: [&str; 11] = [
    "invalidJson",
    "invalidRequest",
    "messageTooLarge",
    "invalid",
    "tooMany",
    "refused",
    "denied",
    "notLeader",
    "tlsRequired",
    "authFailed",
    "forceReleased",
];

impl Default for Counters {
    fn default() -> Counters {
        let zeros = |keys: &[&'static str]| keys.iter().map(|&key| (key, 0)).collect();
        Counters {
            accepted: 0,
            refused: zeros(&REFUSALS),
            released: zeros(&CAUSES),
            errors: zeros(&ERRORS),
        }
    }
}

impl Counters {
    /// Adds `n` to `key` of `map`.
    pub fn add(map: &mut BTreeMap<&'static str, u64>, key: &'static str, n: u64) {
        *map.entry(key).or_default() += n;
    }
}

/// One lock under `metrics_lock_prefixes`.
#[derive(Clone, Debug, PartialEq)]
pub struct LockSeries {
    /// Its name.
    pub name: String,
    /// Its holders.
    pub holders: usize,
    /// Its waiters.
    pub waiters: usize,
    /// How long its oldest holder has held it, in seconds.
    pub held_seconds: f64,
}

/// What a metrics walk gathers from the locks it visits, in name order. The
/// walk is done a slice per loop turn (a million locks take a debug build
/// 0.7 s), so a lock's figures are those of the turn that visited it.
#[derive(Debug)]
pub struct Walk {
    started: Instant,
    prefixes: Prefixes,
    /// The last lock visited: the next slice starts after it.
    last: Option<String>,
    /// Visits left: a peer adding locks ahead of the walk faster than it
    /// goes must not keep it from ending.
    visits_left: usize,
    done: bool,
    longest_hold: Duration,
    deepest_queue: usize,
    lock_series: Vec<LockSeries>,
    lock_series_dropped: usize,
}

impl Walk {
    /// A walk from the first lock, of at most `visits` locks, with series
    /// for locks under `prefixes`.
    pub fn new(prefixes: &[String], now: Instant, visits: usize) -> Walk {
        Walk {
            started: now,
            prefixes: Prefixes::from(prefixes.to_vec()),
            last: None,
            visits_left: visits,
            done: false,
            longest_hold: Duration::ZERO,
            deepest_queue: 0,
            lock_series: Vec::new(),
            lock_series_dropped: 0,
        }
    }

    /// When the walk began: its text is as old as that.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether the walk has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Locks the walk may still visit.
    pub fn visits_left(&self) -> usize {
        self.visits_left
    }

    /// Where the next slice starts: after this name (`None`: at the first
    /// lock). Give it back to [`Walk::end_slice`].
    pub fn take_cursor(&mut self) -> Option<String> {
        self.last.take()
    }

    /// Ends a slice that stopped after the lock `last`, with `more` locks
    /// after it.
    pub fn end_slice(&mut self, last: Option<String>, more: bool) {
        self.last = last;
        self.done = !more || self.visits_left == 0;
    }

    /// Counts one lock: its oldest holder's grant time, and how many hold
    /// it and wait for it.
    pub fn visit(
        &mut self,
        name: &str,
        oldest: Option<Instant>,
        holders: usize,
        waiters: usize,
        now: Instant,
    ) {
        self.visits_left = self.visits_left.saturating_sub(1);
        let held = oldest.map(|since| now.saturating_duration_since(since));
        self.longest_hold = self.longest_hold.max(held.unwrap_or_default());
        self.deepest_queue = self.deepest_queue.max(waiters);
        if !self.prefixes.covers(name) {
            return;
        }
        if self.lock_series.len() == MAX_LOCK_SERIES {
            self.lock_series_dropped += 1;
            return;
        }
        self.lock_series.push(LockSeries {
            name: name.to_string(),
            holders,
            waiters,
            held_seconds: held.map_or(0.0, |d| d.as_secs_f64()),
        });
    }

    /// Puts what the walk gathered into `snapshot`.
    pub fn fill(self, snapshot: &mut Snapshot) {
        snapshot.longest_hold = self.longest_hold.as_secs_f64();
        snapshot.deepest_queue = self.deepest_queue;
        snapshot.lock_series = self.lock_series;
        snapshot.lock_series_dropped = self.lock_series_dropped;
    }
}

/// Everything a scrape shows: the table's totals of the turn its walk
/// ended, and what the walk gathered.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The event loop's counters.
    pub counters: Counters,
    /// The lock table's totals.
    pub totals: Totals,
    /// Open connections.
    pub connections: usize,
    /// Names with a holder or a waiter.
    pub locks: usize,
    /// Requests the lock table keeps, and its limit.
    pub lock_entries: usize,
    /// `max_lock_entries`.
    pub max_lock_entries: usize,
    /// Seconds until grants resume after a restart (0: granting).
    pub grants_resume_in: f64,
    /// Seconds left of the window for reclaims (0: closed).
    pub reclaim_window: f64,
    /// Locks held at the last clean stop not reclaimed yet.
    pub awaiting_reclaim: usize,
    /// Grants the token space (or the term's reservation) still allows.
    pub tokens_left: u64,
    /// Whether this server serves locks: a single server, or a leader.
    pub serving: bool,
    /// The longest any lock has been held, in seconds.
    pub longest_hold: f64,
    /// The most waiters on one lock.
    pub deepest_queue: usize,
    /// Locks under `metrics_lock_prefixes`, at most [`MAX_LOCK_SERIES`].
    pub lock_series: Vec<LockSeries>,
    /// Locks under those prefixes left out past [`MAX_LOCK_SERIES`].
    pub lock_series_dropped: usize,
    /// Seconds since the server started.
    pub uptime: f64,
}

/// What a scrape connection's bytes so far make.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Not all of it yet.
    Incomplete,
    /// `GET /metrics`.
    Metrics,
    /// A request for something else: the status line to answer.
    Other(&'static str),
}

/// Parses what a scrape connection sent.
pub fn parse(bytes: &[u8]) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) if bytes.len() < MAX_REQUEST_BYTES => Request::Incomplete,
        Ok(httparse::Status::Partial) => Request::Other("431 Request Header Fields Too Large"),
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some("GET"), Some("/metrics")) => Request::Metrics,
            (Some("GET"), _) => Request::Other("404 Not Found"),
            _ => Request::Other("405 Method Not Allowed"),
        },
        Err(_) => Request::Other("400 Bad Request"),
    }
}

/// The whole HTTP response to a request.
pub fn response(request: &Request, body: &str) -> Vec<u8> {
    let (status, content_type, body) = match request {
        Request::Metrics => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
        Request::Other(status) => (*status, "text/plain; charset=utf-8", ""),
        Request::Incomplete => ("400 Bad Request", "text/plain; charset=utf-8", ""),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The text exposition format of `snapshot`.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let s = snapshot;
    let t = &s.totals;
    gauge(
        &mut out,
        "pklock_up",
        "1 when this server serves locks (a single server, or the cluster's leader); 0 for a standby",
        &[(None, u(s.serving as u64))],
    );
    gauge(
        &mut out,
        "pklock_uptime_seconds",
        "Seconds since the server started",
        &[(None, f(s.uptime))],
    );
    gauge(
        &mut out,
        "pklock_connections",
        "Open client connections",
        &[(None, u(s.connections as u64))],
    );
    counter(
        &mut out,
        "pklock_connections_accepted_total",
        "Client connections accepted",
        &[(None, u(s.counters.accepted))],
    );
    labelled(
        &mut out,
        "pklock_connections_refused_total",
        "counter",
        "Client connections refused at accept, by reason",
        "reason",
        &s.counters.refused,
    );
    gauge(
        &mut out,
        "pklock_locks",
        "Lock names with a holder or a waiter",
        &[(None, u(s.locks as u64))],
    );
    gauge(
        &mut out,
        "pklock_locks_held",
        "Grants in force (a shared lock with three holders counts three)",
        &[(None, u(t.held as u64))],
    );
    gauge(
        &mut out,
        "pklock_waiters",
        "Requests waiting for a lock",
        &[(None, u(t.waiting as u64))],
    );
    gauge(
        &mut out,
        "pklock_lock_entries",
        "Requests the lock table keeps (held, waiting, and waits of closed connections not cleared yet)",
        &[(None, u(s.lock_entries as u64))],
    );
    gauge(
        &mut out,
        "pklock_lock_entries_limit",
        "max_lock_entries",
        &[(None, u(s.max_lock_entries as u64))],
    );
    counter(
        &mut out,
        "pklock_grants_total",
        "Locks granted",
        &[(None, u(t.grants))],
    );
    counter(
        &mut out,
        "pklock_timeouts_total",
        "Lock requests that ran out of time",
        &[(None, u(t.timeouts))],
    );
    counter(
        &mut out,
        "pklock_cancels_total",
        "Waits withdrawn by an unlock",
        &[(None, u(t.cancels))],
    );
    counter(
        &mut out,
        "pklock_deadlocks_total",
        "Lock requests answered deadlock: their wait would have closed a cycle",
        &[(None, u(t.deadlocks))],
    );
    counter(
        &mut out,
        "pklock_deadlock_checks_cut_total",
        "Waits queued unchecked: what they depend on was too big to look at",
        &[(None, u(t.deadlock_checks_cut))],
    );
    counter(
        &mut out,
        "pklock_reclaims_total",
        "Grants of an earlier run given back after a restart or failover",
        &[(None, u(t.reclaims))],
    );
    let mut released = s.counters.released.clone();
    Counters::add(&mut released, "unlock", t.released_by_unlock);
    labelled(
        &mut out,
        "pklock_releases_total",
        "counter",
        "Locks released, by cause: unlock, disconnect (the peer closed or failed), keepalive (the peer vanished: keepalive or user timeout), not_reading, force (forceRelease), stepped_down",
        "cause",
        &released,
    );
    labelled(
        &mut out,
        "pklock_errors_total",
        "counter",
        "Error answers sent, by their word (error or status)",
        "code",
        &s.counters.errors,
    );
    gauge(
        &mut out,
        "pklock_restart_grace_seconds",
        "Seconds until grants resume after a restart (0: granting)",
        &[(None, f(s.grants_resume_in))],
    );
    gauge(
        &mut out,
        "pklock_reclaim_window_seconds",
        "Seconds left for holders of the previous run to reclaim (0: closed)",
        &[(None, f(s.reclaim_window))],
    );
    gauge(
        &mut out,
        "pklock_awaiting_reclaim",
        "Locks held at the last clean stop, not reclaimed yet",
        &[(None, u(s.awaiting_reclaim as u64))],
    );
    gauge(
        &mut out,
        "pklock_tokens_left",
        "Grants the fencing-token space (or the leader's reservation) still allows",
        &[(None, u(s.tokens_left))],
    );
    gauge(
        &mut out,
        "pklock_longest_hold_seconds",
        "The longest any lock has been held",
        &[(None, f(s.longest_hold))],
    );
    gauge(
        &mut out,
        "pklock_deepest_queue",
        "The most waiters on one lock",
        &[(None, u(s.deepest_queue as u64))],
    );
    histogram(
        &mut out,
        "pklock_wait_seconds",
        "From lock request to grant",
        &t.waits,
    );
    histogram(
        &mut out,
        "pklock_hold_seconds",
        "From grant to release",
        &t.holds,
    );
    if !s.lock_series.is_empty() || s.lock_series_dropped > 0 {
        let per_lock = |value: fn(&LockSeries) -> String| -> Vec<(Option<(&str, &str)>, String)> {
            s.lock_series
                .iter()
                .map(|lock| (Some(("lock", lock.name.as_str())), value(lock)))
                .collect()
        };
        gauge(
            &mut out,
            "pklock_lock_holders",
            "Holders of a lock under metrics_lock_prefixes",
            &per_lock(|l| u(l.holders as u64)),
        );
        gauge(
            &mut out,
            "pklock_lock_waiters",
            "Waiters of a lock under metrics_lock_prefixes",
            &per_lock(|l| u(l.waiters as u64)),
        );
        gauge(
            &mut out,
            "pklock_lock_held_seconds",
            "How long the oldest holder of a lock under metrics_lock_prefixes has held it",
            &per_lock(|l| f(l.held_seconds)),
        );
        gauge(
            &mut out,
            "pklock_lock_series_dropped",
            "Locks under metrics_lock_prefixes left without series of their own (over 1000)",
            &[(None, u(s.lock_series_dropped as u64))],
        );
    }
    out
}

fn u(value: u64) -> String {
    value.to_string()
}

fn f(value: f64) -> String {
    format!("{value:.3}")
}

type Sample<'a> = (Option<(&'a str, &'a str)>, String);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn samples(out: &mut String, name: &str, samples: &[Sample<'_>]) {
    for (label, value) in samples {
        match label {
            Some((key, text)) => {
                let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {value}", escape_label(text));
            }
            None => {
                let _ = writeln!(out, "{name} {value}");
            }
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, values: &[Sample<'_>]) {
    header(out, name, "gauge", help);
    samples(out, name, values);
}

fn counter(out: &mut String, name: &str, help: &str, values: &[Sample<'_>]) {
    header(out, name, "counter", help);
    samples(out, name, values);
}

fn labelled(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    key: &str,
    values: &BTreeMap<&'static str, u64>,
) {
    header(out, name, kind, help);
    let rows: Vec<Sample<'_>> = values
        .iter()
        .map(|(label, n)| (Some((key, *label)), u(*n)))
        .collect();
    samples(out, name, &rows);
}

fn histogram(out: &mut String, name: &str, help: &str, durations: &Durations) {
    header(out, name, "histogram", help);
    for (bound, count) in durations.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", durations.count());
    let _ = writeln!(out, "{name}_sum {}", f(durations.sum_seconds()));
    let _ = writeln!(out, "{name}_count {}", durations.count());
}

/// A label value as the text format wants it: backslash, quote and newline
/// escaped.
fn escape_label(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_gives_series_to_locks_under_the_prefixes_up_to_the_cap() {
        let start = Instant::now();
        let now = start + Duration::from_secs(10);
        let prefixes = ["jobs/", "jobs/nightly/", "x", "jobs/"].map(String::from);
        let mut walk = Walk::new(&prefixes, start, usize::MAX);
        let locks = [
            ("a", Some(start), 1, 7),
            ("jobs/1", Some(start + Duration::from_secs(4)), 1, 0),
            ("jobs/nightly/2", None, 0, 2),
            ("jobsx", Some(start), 1, 0),
            ("x1", Some(start + Duration::from_secs(9)), 3, 1),
            ("y", None, 0, 1),
        ];
        for (name, oldest, holders, waiters) in locks {
            walk.visit(name, oldest, holders, waiters, now);
        }
        for i in 0..MAX_LOCK_SERIES {
            walk.visit(&format!("x{i:04}"), None, 0, 1, now);
        }
        let mut snapshot = Snapshot::default();
        walk.fill(&mut snapshot);
        assert_eq!(snapshot.longest_hold, 10.0);
        assert_eq!(snapshot.deepest_queue, 7);
        let first: Vec<(&str, usize, usize, f64)> = snapshot
            .lock_series
            .iter()
            .take(3)
            .map(|s| (s.name.as_str(), s.holders, s.waiters, s.held_seconds))
            .collect();
        assert_eq!(
            first,
            [
                ("jobs/1", 1, 0, 6.0),
                ("jobs/nightly/2", 0, 2, 0.0),
                ("x1", 3, 1, 1.0)
            ]
        );
        assert_eq!(snapshot.lock_series.len(), MAX_LOCK_SERIES);
        assert_eq!(snapshot.lock_series_dropped, 3);
    }

    #[test]
    fn only_a_whole_get_of_metrics_is_served() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Request::Incomplete
        );
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Request::Other("404 Not Found")
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::Other("405 Method Not Allowed")
        );
        assert_eq!(
            parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Request::Other("400 Bad Request")
        );
        let endless = [
            b"GET /metrics HTTP/1.1\r\n".as_slice(),
            &[b'x'; MAX_REQUEST_BYTES],
        ]
        .concat();
        assert_eq!(
            parse(&endless),
            Request::Other("431 Request Header Fields Too Large")
        );
    }

    #[test]
    fn lock_names_are_escaped_in_labels() {
        let snapshot = Snapshot {
            lock_series: vec![LockSeries {
                name: "a\"b\\c\nd".to_string(),
                holders: 1,
                waiters: 2,
                held_seconds: 1.5,
            }],
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        assert!(
            text.contains("pklock_lock_waiters{lock=\"a\\\"b\\\\c\\nd\"} 2"),
            "{text}"
        );
    }
}
