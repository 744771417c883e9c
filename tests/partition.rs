//! Network partitions between a lock holder and the server, made with a
//! network namespace and a veth pair of the test's own, and cut with one
//! atomic iptables-restore (both directions at once).
//!
//! Needs root, `ip` (iproute2) and `iptables`. Without them the tests say so
//! and pass, unless `PKLOCK_REQUIRE_ALL=1` (set by .ci/run: every test must
//! really run there) makes that a failure.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::netns::{Netns, netns_or_skip, server_for};
use common::{Peer, ServerProcess, TempDir, eventually, temp_dir};
use serde_json::json;

/// Keepalive that detects a vanished peer in 3 s (releaseAfterMs and
/// earliestReleaseMs are both 3000); the holder's lease is then 1.5 s.
const KEEPALIVE: &str =
    "[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 3\nuser_timeout_ms = 3000\n";
const RELEASE_AFTER: Duration = Duration::from_millis(3000);
/// Scheduling and timer slack allowed on top of RELEASE_AFTER.
const SLACK: Duration = Duration::from_millis(1000);

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The server in the root namespace, on the veth address and on loopback.
struct Setup {
    _dir: TempDir,
    server: ServerProcess,
    remote: SocketAddr,
    local: SocketAddr,
    marker: PathBuf,
}

fn setup(netns: &Netns, name: &str) -> Setup {
    setup_with(netns, name, KEEPALIVE)
}

fn setup_with(netns: &Netns, name: &str, keepalive: &str) -> Setup {
    let dir = temp_dir(name);
    let (server, remote, local) = server_for(netns, &dir, keepalive);
    let marker = dir.join("stopped-at");
    Setup {
        _dir: dir,
        server,
        remote,
        local,
        marker,
    }
}

/// `pklock run` in the namespace; its command writes the wall-clock time (ns)
/// at which it got SIGTERM to `marker`.
fn holder(netns: &Netns, server: SocketAddr, marker: &Path) -> KillOnDrop {
    let script = format!(
        "trap 'date +%s%N > {0}.tmp && mv {0}.tmp {0}; exit 0' TERM; while :; do sleep 0.02; done",
        marker.display()
    );
    holder_running(netns, server, marker, "300ms", &script)
}

/// `pklock run --kill-grace GRACE part -- sh -c SCRIPT` in the namespace;
/// `marker` must appear in the script (it finds the command to clean up).
fn holder_running(
    netns: &Netns,
    server: SocketAddr,
    marker: &Path,
    grace: &str,
    script: &str,
) -> KillOnDrop {
    let child = Command::new("ip")
        .args(["netns", "exec", &netns.name, env!("CARGO_BIN_EXE_pklock")])
        .args([
            "--server",
            &server.to_string(),
            "run",
            "part",
            "--kill-grace",
            grace,
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pklock run in the namespace");
    KillOnDrop {
        child,
        marker: marker.display().to_string(),
    }
}

/// pklock run and its command, killed when the test ends however it ends
/// (the command runs in its own process group, so it is found by its
/// script, which names the test's own marker file).
struct KillOnDrop {
    child: Child,
    marker: String,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.marker])
            .status();
    }
}

fn held(local: SocketAddr) -> bool {
    let status = Peer::connect(local).rpc("status", json!(1), json!({"lockName": "part"}));
    status["locks"][0]["holders"]
        .as_array()
        .is_some_and(|h| h.len() == 1)
}

#[test]
fn a_cut_off_holder_stops_before_the_server_grants_to_another() {
    let Some(netns) = netns_or_skip("partition") else {
        return;
    };
    let setup = setup(&netns, "partition");
    let mut run = holder(&netns, setup.remote, &setup.marker);
    eventually("the holder holds", || held(setup.local));
    let mut waiter = Peer::connect(setup.local);
    waiter.ask("part", 1);
    waiter.expect_nothing(Duration::from_millis(300));

    let cut_at = now_ns();
    netns.partition();
    let reply = waiter.recv();
    let granted_at = now_ns();
    assert_eq!(reply["result"]["status"], "ok", "{reply}");

    let stopped_at: u128 = std::fs::read_to_string(&setup.marker)
        .expect("the holder's command was stopped")
        .trim()
        .parse()
        .unwrap();
    let ms = |ns: u128| ns as f64 / 1e6;
    println!(
        "partition: command stopped {:.0} ms after the cut, lock granted to the waiter {:.0} ms after it ({:.0} ms later)",
        ms(stopped_at - cut_at),
        ms(granted_at - cut_at),
        ms(granted_at - stopped_at)
    );
    // (a) The holder's side gave up first.
    assert!(
        stopped_at < granted_at,
        "the command ran until {stopped_at}, the grant came at {granted_at}"
    );
    // (b) The server released within releaseAfterMs, plus slack.
    let release = Duration::from_nanos((granted_at - cut_at) as u64);
    assert!(
        release <= RELEASE_AFTER + SLACK,
        "released after {release:?}"
    );
    let status = run.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(75),
        "pklock run exits with the lost-lock code"
    );
    drop(setup.server);
}

#[test]
fn a_partition_that_heals_before_detection_loses_nothing() {
    let Some(netns) = netns_or_skip("healed partition") else {
        return;
    };
    let setup = setup(&netns, "healed");
    let mut run = holder(&netns, setup.remote, &setup.marker);
    eventually("the holder holds", || held(setup.local));
    let mut waiter = Peer::connect(setup.local);
    waiter.ask("part", 1);

    netns.partition();
    std::thread::sleep(Duration::from_millis(500));
    netns.heal();
    // Longer than the server's release time and the client's lease together.
    waiter.expect_nothing(RELEASE_AFTER + SLACK);
    assert!(!setup.marker.exists(), "the holder's command was stopped");
    assert!(run.child.try_wait().unwrap().is_none(), "pklock run exited");
    assert!(held(setup.local));
    // The holder still works normally: stopping it hands the lock over.
    Command::new("kill")
        .args(["-TERM", &run.child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(waiter.recv()["result"]["status"], "ok");
}

/// Keepalive that gives earliestReleaseMs 5000: with `--kill-grace 3500ms`
/// the holder's lease is 500 ms, so a cut of 1 s outlasts the lease by far
/// and heals long before the server could release (5 s) or the command is
/// killed (4 s).
const KEEPALIVE_5S: &str =
    "[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 5\nuser_timeout_ms = 5000\n";

#[test]
fn a_healed_network_hands_the_lock_on_only_after_the_command_is_dead() {
    let Some(netns) = netns_or_skip("healed network after the lease") else {
        return;
    };
    let setup = setup_with(&netns, "healed-after-lease", KEEPALIVE_5S);
    let hello = Peer::connect(setup.local).rpc("hello", json!(1), json!({}));
    assert_eq!(hello["earliestReleaseMs"], 5000, "{hello}");
    // A command that ignores SIGTERM and says every 20 ms that it still runs.
    let alive = setup.marker.with_file_name("alive");
    let pid_file = setup.marker.with_file_name("pid");
    let script = format!(
        "trap '' TERM; echo $$ > {pid}; while :; do date +%s%N > {a}.tmp && mv {a}.tmp {a}; sleep 0.02; done # {m}",
        pid = pid_file.display(),
        a = alive.display(),
        m = setup.marker.display()
    );
    let mut run = holder_running(&netns, setup.remote, &setup.marker, "3500ms", &script);
    eventually("the holder holds", || held(setup.local));
    eventually("the command runs", || alive.exists());
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let mut waiter = Peer::connect(setup.local);
    waiter.ask("part", 1);
    waiter.expect_nothing(Duration::from_millis(300));

    // Longer than the lease (500 ms), shorter than the release time (5 s).
    let cut_at = now_ns();
    netns.partition();
    std::thread::sleep(Duration::from_millis(1000));
    netns.heal();
    let reply = waiter.recv();
    let granted_at = now_ns();
    let command_alive = Path::new(&format!("/proc/{pid}")).exists();
    assert_eq!(reply["result"]["status"], "ok", "{reply}");
    let last_alive: u128 = std::fs::read_to_string(&alive)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ms = |ns: u128| ns as f64 / 1e6;
    println!(
        "healed network: the command last ran {:.0} ms after the cut, the lock was granted to the waiter {:.0} ms after it",
        ms(last_alive - cut_at),
        ms(granted_at - cut_at)
    );
    assert!(
        !command_alive && last_alive < granted_at,
        "the lock was granted {:.0} ms after the cut while the command still ran (it last ran at {:.0} ms)",
        ms(granted_at - cut_at),
        ms(last_alive - cut_at)
    );
    let status = run.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(75),
        "pklock run exits with the lost-lock code"
    );
}
