//! Restarts keep locks: the server stopped (SIGTERM) or killed (SIGKILL) and
//! started again on the same address and state file while `pklock run`
//! holders, library clients and a waiter are connected. Holders reclaim
//! their locks and their commands run on; a server down for longer than the
//! lease still stops every holder before anyone else is granted anything;
//! and a reclaim that is not genuine, or comes too late, is refused.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{PATIENCE, Peer, ServerProcess, TempDir, eventually, temp_dir};
use pklock::client::{Client, ClientOptions, LockOptions};
use serde_json::json;

/// A port free now, for a server that must come back on the same address.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn config(port: u16, state: &Path, extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:{port}\"]\nstate_file = \"{}\"\n{extra}",
        state.display()
    )
}

/// `pklock run NAME -- CMD` processes, each command writing a file once it
/// runs, and another if it is sent SIGTERM.
struct Fleet {
    runs: BTreeMap<String, Child>,
    dir: PathBuf,
}

impl Fleet {
    fn new(dir: &Path) -> Fleet {
        Fleet {
            runs: BTreeMap::new(),
            dir: dir.to_path_buf(),
        }
    }

    /// Starts `pklock run LOCK`, known here as `name`.
    fn start(&mut self, addr: SocketAddr, name: &str, lock: &str, extra: &[&str]) {
        let started = self.dir.join(format!("{name}.started"));
        let stopped = self.dir.join(format!("{name}.stopped"));
        let script = format!(
            "trap 'touch {}; exit 0' TERM; touch {}; while :; do sleep 1; done",
            stopped.display(),
            started.display()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_pklock"))
            .args(["--server", &addr.to_string(), "run"])
            .args(extra)
            .args([lock, "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        self.runs.insert(name.to_string(), child);
    }

    fn started(&self, name: &str) -> bool {
        self.dir.join(format!("{name}.started")).exists()
    }

    /// What `pklock run` said on stderr so far.
    fn said(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.err"))).unwrap_or_default()
    }

    fn stopped(&self, name: &str) -> bool {
        self.dir.join(format!("{name}.stopped")).exists()
    }

    /// The names whose `pklock run` has exited, with its code.
    fn exited(&mut self) -> Vec<(String, Option<i32>)> {
        self.runs
            .iter_mut()
            .filter_map(|(name, child)| {
                let status = child.try_wait().unwrap()?;
                Some((name.clone(), status.code()))
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        common::stop_pklock_runs(self.runs.values_mut());
    }
}

/// Holders and their tokens, and waiters, by lock name, as `status` shows them.
fn status(addr: SocketAddr) -> (BTreeMap<String, Vec<u64>>, BTreeMap<String, usize>) {
    let mut holders = BTreeMap::new();
    let mut waiters = BTreeMap::new();
    let mut peer = Peer::connect(addr);
    let mut after = String::new();
    loop {
        let reply = peer.rpc(
            "status",
            json!(1),
            json!({"after": after, "limit": 100_000}),
        );
        let locks = reply["locks"].as_array().cloned().unwrap_or_default();
        for lock in &locks {
            let name = lock["lockName"].as_str().unwrap().to_string();
            let tokens: Vec<u64> = lock["holders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["token"].as_u64().unwrap())
                .collect();
            if !tokens.is_empty() {
                holders.insert(name.clone(), tokens);
            }
            let waiting = lock["waiters"].as_array().unwrap().len();
            if waiting > 0 {
                waiters.insert(name.clone(), waiting);
            }
            after = name;
        }
        if reply["truncated"] != json!(true) || locks.is_empty() {
            return (holders, waiters);
        }
    }
}

const HOLDERS: usize = 100;

/// The two tests with a hundred `pklock run` holders take turns: together,
/// two hundred processes reconnecting on a 2-core machine measure the
/// machine rather than the reclaim.
static FLEETS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 100 `pklock run` holders of distinct locks, one of a contended lock
/// with a `pklock run` waiter behind it, and a library client holding a
/// shared lock; returns what `status` shows once everyone is in place.
fn fleet_in_place(
    addr: SocketAddr,
    dir: &Path,
) -> (
    Fleet,
    Client,
    Vec<pklock::client::LockGuard>,
    BTreeMap<String, Vec<u64>>,
) {
    let mut fleet = Fleet::new(dir);
    for i in 0..HOLDERS {
        let name = format!("job-{i:03}");
        fleet.start(addr, &name, &name, &[]);
    }
    fleet.start(addr, "contended", "contended", &[]);
    eventually("the contended lock held", || fleet.started("contended"));
    fleet.start(addr, "contended-waiter", "contended", &[]);
    let client = Client::connect(addr.to_string(), &ClientOptions::named("library")).unwrap();
    let guards = vec![
        client.lock("shared", &LockOptions::shared()).unwrap(),
        client.lock("own", &LockOptions::exclusive()).unwrap(),
    ];
    let mut before = BTreeMap::new();
    eventually("every holder and the waiter in place", || {
        let (holders, waiters) = status(addr);
        before = holders;
        before.len() == HOLDERS + 3 && waiters.get("contended") == Some(&1)
    });
    (fleet, client, guards, before)
}

/// What the restarted server must show: every holder back with its token
/// within 1 s of the new start, the waiter still waiting, no command
/// stopped; then a lock on a fresh name. Returns how long the fresh lock took.
fn check_everything_came_back(
    server: &ServerProcess,
    started: Instant,
    fleet: &mut Fleet,
    guards: &[pklock::client::LockGuard],
    before: &BTreeMap<String, Vec<u64>>,
) {
    let mut after = BTreeMap::new();
    let mut waiters = BTreeMap::new();
    while started.elapsed() < PATIENCE {
        (after, waiters) = status(server.addr);
        if after == *before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    eprintln!("every holder back with its token {took:?} after the new start");
    assert_eq!(after, *before, "holders and tokens after the restart");
    // The figure; a client that did not reclaim would never show.
    assert!(took < Duration::from_secs(1), "reclaimed after {took:?}");
    assert_eq!(waiters.get("contended"), Some(&1), "the waiter still waits");
    assert!(!fleet.started("contended-waiter"));
    assert_eq!(fleet.exited(), Vec::new(), "no pklock run exited");
    for name in fleet.runs.keys() {
        assert!(!fleet.stopped(name), "{name}'s command was stopped");
    }
    for guard in guards {
        assert!(guard.is_held(), "{} lost", guard.name());
    }
    eventually("pklock run says it reclaimed its lock", || {
        fleet.said("contended").contains("reclaimed \"contended\"")
    });
    let stats = common::stats(server.addr);
    assert_eq!(stats["reclaims"], json!(HOLDERS + 3));
    assert_eq!(stats["reclaimConflicts"], json!(0));
    assert_eq!(stats["awaitingReclaim"], json!(0));
}

#[test]
fn a_planned_restart_loses_no_lock_and_grants_fresh_names_at_once() {
    let _turn = common::take_turn(&FLEETS);
    let dir: TempDir = temp_dir("restart-planned");
    let state = dir.join("tokens");
    let port = free_port();
    let config = config(port, &state, "");
    let mut server = ServerProcess::start(&dir, &config);
    let addr = server.addr;
    let (mut fleet, _client, guards, before) = fleet_in_place(addr, &dir);

    server.signal("TERM");
    assert_eq!(server.wait_exit(), Some(0));
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains(&format!("stopped-holding {}", HOLDERS + 3)),
        "{text}"
    );

    let server = ServerProcess::start(&dir, &config);
    let started = Instant::now();
    let fresh = Peer::connect(server.addr).lock("fresh", 1);
    let fresh_took = started.elapsed();
    eprintln!("a fresh name granted {fresh_took:?} after the new start");
    assert_eq!(fresh["status"], "ok", "{fresh}");
    assert!(
        fresh_took < Duration::from_secs(1),
        "a fresh name granted after {fresh_took:?}"
    );
    check_everything_came_back(&server, started, &mut fleet, &guards, &before);

    // The lock goes on to the waiter as usual once its holder is done.
    let mut holder = fleet.runs.remove("contended").unwrap();
    Command::new("kill")
        .args(["-s", "TERM", &holder.id().to_string()])
        .status()
        .unwrap();
    common::wait_exit(&mut holder, PATIENCE).expect("the holder exits");
    eventually("the waiter's command runs", || {
        fleet.started("contended-waiter")
    });
}

#[test]
fn a_crash_restart_loses_no_lock_and_grants_fresh_names_after_the_grace() {
    let _turn = common::take_turn(&FLEETS);
    let dir: TempDir = temp_dir("restart-crash");
    let state = dir.join("tokens");
    let port = free_port();
    // A ceiling well ahead of the clock, as after the clock stepped back:
    // only the state file keeps tokens above it.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        + 1_000_000_000_000;
    std::fs::write(&state, format!("{ahead}\n")).unwrap();
    let config = config(port, &state, "restart_grace_ms = 3000\n");
    let mut server = ServerProcess::start(&dir, &config);
    let addr = server.addr;
    let (mut fleet, _client, guards, before) = fleet_in_place(addr, &dir);
    // A v1 peer never reclaims: it sees the close, as before.
    let mut raw = Peer::connect(addr);
    raw.take("raw", 1);

    server.signal("KILL");
    server.wait_exit();
    assert!(raw.expect_closed().is_empty());
    std::thread::sleep(Duration::from_millis(300));

    let server = ServerProcess::start(&dir, &config);
    let started = Instant::now();
    let mut fresh = Peer::connect(server.addr);
    fresh.ask("fresh", 1);
    fresh.ask("raw", 2);
    check_everything_came_back(&server, started, &mut fleet, &guards, &before);
    fresh.expect_nothing(Duration::from_millis(1000).saturating_sub(started.elapsed()));
    let mut grants = Vec::new();
    for _ in 0..2 {
        let reply = fresh.recv();
        assert_eq!(reply["result"]["status"], "ok", "{reply}");
        grants.push(reply["result"]["token"].as_u64().unwrap());
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "granted {waited:?} into a 3 s grace"
    );
    let highest = before.values().flatten().max().copied().unwrap();
    assert!(highest >= ahead);
    for token in grants {
        assert!(
            token > highest,
            "token {token} after the restart, {highest} before"
        );
    }
}

/// `[keepalive]` for a release time of 2 s: a lease of 1 s.
const SHORT_KEEPALIVE: &str =
    "[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 1\nuser_timeout_ms = 2000\n";

#[test]
fn a_server_down_longer_than_the_lease_stops_every_holder_before_anyone_else_is_granted() {
    let dir: TempDir = temp_dir("restart-down");
    let state = dir.join("tokens");
    let port = free_port();
    let config = config(port, &state, SHORT_KEEPALIVE);
    let mut server = ServerProcess::start(&dir, &config);
    let addr = server.addr;
    let mut fleet = Fleet::new(&dir);
    let names: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    for name in &names {
        fleet.start(addr, name, name, &["--kill-grace", "200ms"]);
    }
    eventually("every holder runs", || {
        names.iter().all(|name| fleet.started(name))
    });

    server.signal("KILL");
    server.wait_exit();
    let killed_at = Instant::now();
    // Down for twice the lease.
    std::thread::sleep(Duration::from_secs(2));
    let server = ServerProcess::start(&dir, &config);
    let mut fresh = Peer::connect(server.addr);
    for (i, name) in names.iter().enumerate() {
        fresh.ask(name, i as u64);
    }
    let first_grant = fresh.recv();
    let granted_at = killed_at.elapsed();
    assert_eq!(first_grant["result"]["status"], "ok", "{first_grant}");
    let exited = fleet.exited();
    assert_eq!(exited.len(), names.len(), "{exited:?}");
    for (name, code) in exited {
        assert_eq!(code, Some(75), "{name}");
        assert!(fleet.stopped(&name), "{name}'s command got no SIGTERM");
    }
    // They stopped at the lease, 1 s after the last answer; the grant came
    // after the down time and the restart grace (2 s).
    assert!(granted_at >= Duration::from_secs(3), "{granted_at:?}");
}

#[test]
fn a_reclaim_is_refused_unless_genuine_in_time_and_uncontested() {
    let dir: TempDir = temp_dir("restart-refused");
    let state = dir.join("tokens");
    let port = free_port();
    let config = config(port, &state, "restart_grace_ms = 1500\n");
    let mut server = ServerProcess::start(&dir, &config);
    let hello = |peer: &mut Peer| peer.rpc("hello", json!(0), json!({"client": "c"}));
    let mut first = Peer::connect(server.addr);
    assert_eq!(
        hello(&mut first)["reclaimForMs"],
        json!(0),
        "a first start gives nothing back"
    );
    // The same lock granted twice: to `first`, then, after its unlock, to
    // `second`. Both proofs are genuine; only the second grant was in force.
    let old = first.lock("c", 1);
    let old_token = old["token"].as_u64().unwrap();
    let old_proof = old["proof"].as_str().unwrap().to_string();
    first.unlock("c");
    let mut second = Peer::connect(server.addr);
    hello(&mut second);
    let current = second.lock("c", 1);
    let token = current["token"].as_u64().unwrap();
    let proof = current["proof"].as_str().unwrap().to_string();
    // A peer that never said hello gets the reply the v1 client always got.
    let v1 = Peer::connect(server.addr).lock("v1", 1);
    assert_eq!(v1.get("proof"), None, "{v1}");

    server.signal("KILL");
    server.wait_exit();
    let server = ServerProcess::start(&dir, &config);
    let reclaim = |peer: &mut Peer, id: u64, name: &str, mode: &str, token: u64, proof: &str| {
        peer.rpc(
            "lock",
            json!(id),
            json!({"lockName": name, "mode": mode, "reclaim": {"token": token, "proof": proof}}),
        )
    };
    let mut other = Peer::connect(server.addr);
    assert!(hello(&mut other)["reclaimForMs"].as_u64().unwrap() > 0);
    let forged = reclaim(&mut other, 1, "c", "exclusive", token, &"0".repeat(32));
    assert_eq!(forged["status"], "refused", "{forged}");
    let other_name = reclaim(&mut other, 2, "d", "exclusive", token, &proof);
    assert_eq!(other_name["status"], "refused", "{other_name}");
    let other_mode = reclaim(&mut other, 3, "c", "shared", token, &proof);
    assert_eq!(other_mode["status"], "refused", "{other_mode}");
    let fresh = other.rpc("lock", json!(4), json!({"lockName": "c", "timeoutMs": 0}));
    assert_eq!(fresh["status"], "timeout", "nothing new during the grace");

    // After a crash the server cannot tell which grant was in force: the
    // first reclaim wins, and the conflicting one is refused and counted.
    let mut stale = Peer::connect(server.addr);
    let back = reclaim(&mut stale, 1, "c", "exclusive", old_token, &old_proof);
    assert_eq!(back["status"], "ok", "{back}");
    assert_eq!(back["token"], json!(old_token), "the grant's own token");
    let mut rightful = Peer::connect(server.addr);
    let conflict = reclaim(&mut rightful, 1, "c", "exclusive", token, &proof);
    assert_eq!(conflict["status"], "refused", "{conflict}");
    let twice = reclaim(&mut other, 5, "c", "exclusive", old_token, &old_proof);
    assert_eq!(
        twice["status"], "refused",
        "a grant comes back once: {twice}"
    );

    std::thread::sleep(Duration::from_millis(1600));
    drop(stale);
    let late = reclaim(&mut rightful, 2, "c", "exclusive", token, &proof);
    assert_eq!(late["status"], "refused", "after the grace: {late}");
    let stats = common::stats(server.addr);
    assert_eq!(
        (
            &stats["reclaims"],
            &stats["reclaimsRefused"],
            &stats["reclaimConflicts"]
        ),
        (&json!(1), &json!(6), &json!(1)),
        "{stats}"
    );
    let shown = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["--server", &server.addr.to_string(), "stats"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    let line = |key: &str| {
        shown
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l[key.len()..].trim().to_string())
    };
    assert_eq!(line("reclaim conflicts").as_deref(), Some("1"), "{shown}");
    assert_eq!(line("reclaims refused").as_deref(), Some("6"), "{shown}");
}

#[test]
fn a_stop_during_the_window_passes_on_what_is_not_reclaimed_yet() {
    let dir: TempDir = temp_dir("restart-twice");
    let state = dir.join("tokens");
    let port = free_port();
    let config = config(port, &state, "restart_grace_ms = 5000\n");
    let try_once = |addr, name: &str| {
        Peer::connect(addr).rpc("lock", json!(1), json!({"lockName": name, "timeoutMs": 0}))
    };

    // A clean stop while X is held, and another before X is reclaimed.
    let mut server = ServerProcess::start(&dir, &config);
    let mut holder = Peer::connect(server.addr);
    holder.rpc("hello", json!(0), json!({"client": "h"}));
    let grant = holder.lock("x", 1);
    let (token, proof) = (grant["token"].clone(), grant["proof"].clone());
    server.signal("TERM");
    server.wait_exit();
    let mut server = ServerProcess::start(&dir, &config);
    server.signal("TERM");
    server.wait_exit();
    let server = ServerProcess::start(&dir, &config);
    assert_eq!(
        try_once(server.addr, "x")["status"],
        "timeout",
        "x is still owed"
    );
    assert_eq!(common::stats(server.addr)["awaitingReclaim"], json!(1));
    assert_eq!(try_once(server.addr, "y")["status"], "ok");
    let back = Peer::connect(server.addr).rpc(
        "lock",
        json!(1),
        json!({"lockName": "x", "reclaim": {"token": token, "proof": proof}}),
    );
    assert_eq!(back["status"], "ok", "{back}");
    drop(server);

    // A clean stop of a run that followed a crash, within its grace: the
    // next run cannot know what was held, and takes it for a crash too.
    let mut server = ServerProcess::start(&dir, &config);
    Peer::connect(server.addr).rpc("hello", json!(0), json!({"client": "h"}));
    server.signal("KILL");
    server.wait_exit();
    let mut server = ServerProcess::start(&dir, &config);
    server.signal("TERM");
    server.wait_exit();
    let server = ServerProcess::start(&dir, &config);
    assert_eq!(
        try_once(server.addr, "z")["status"],
        "timeout",
        "granted in the grace after a crash"
    );
}

#[test]
fn an_unlock_sent_while_the_server_is_away_still_withdraws_the_wait() {
    let dir: TempDir = temp_dir("restart-withdraw");
    let state = dir.join("tokens");
    let port = free_port();
    let config = pklock::Config {
        listen: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        state_file: Some(state.clone()),
        restart_grace_ms: Some(500),
        ..pklock::Config::default()
    };
    let server = common::TestServer::from_config(config.clone());
    let addr = server.addr.to_string();
    let holder = Client::connect(&addr, &ClientOptions::named("holder")).unwrap();
    let held = holder.lock("x", &LockOptions::exclusive()).unwrap();
    let waiter =
        std::sync::Arc::new(Client::connect(&addr, &ClientOptions::named("waiter")).unwrap());
    let (tx, waiting) = std::sync::mpsc::channel();
    {
        let waiter = std::sync::Arc::clone(&waiter);
        std::thread::spawn(move || {
            let _ = tx.send(
                waiter
                    .lock("x", &LockOptions::exclusive())
                    .map(|g| g.token()),
            );
        });
    }
    eventually("the wait is queued", || {
        status(server.addr).1.get("x") == Some(&1)
    });
    server.stop().unwrap();
    // While no server is there, the waiter gives up its wait.
    let withdrawing = {
        let waiter = std::sync::Arc::clone(&waiter);
        std::thread::spawn(move || waiter.unlock("x"))
    };
    std::thread::sleep(Duration::from_millis(200));
    let server = common::TestServer::from_config(config);
    assert!(withdrawing.join().unwrap().unwrap(), "the wait was there");
    let outcome = waiting.recv_timeout(PATIENCE);
    assert!(
        matches!(outcome, Ok(Err(pklock::client::Error::Cancelled))),
        "the wait went on: {outcome:?}"
    );
    assert!(held.is_held());
    held.unlock().unwrap();
    let (holders, waiters) = status(server.addr);
    assert!(
        holders.is_empty() && waiters.is_empty(),
        "{holders:?} {waiters:?}"
    );
}
