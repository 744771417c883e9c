//! The `pklock` command with a real server and real processes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{PATIENCE, Peer, ServerProcess, TestServer, eventually, stats, temp_dir};
use serde_json::Value;

fn pklock(server: &impl ToString) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pklock"));
    command.env("PKLOCK_SERVER", server.to_string());
    command
}

fn run_output(server: &TestServer, args: &[&str]) -> Output {
    pklock(&server.addr)
        .args(args)
        .output()
        .expect("run pklock")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A shell loop that runs until a signal; `on_term` is its TERM trap.
fn busy_script(on_term: &str) -> String {
    format!("trap '{on_term}' TERM; while true; do sleep 0.05; done")
}

/// Everything the child wrote to its piped stderr.
fn stderr_text(child: &mut std::process::Child) -> String {
    let mut text = String::new();
    if let Some(stderr) = child.stderr.as_mut() {
        std::io::Read::read_to_string(stderr, &mut text).unwrap();
    }
    text
}

/// Whether the server at `addr` has exactly one lock held.
fn one_held(addr: std::net::SocketAddr) -> bool {
    Peer::connect(addr).rpc("stats", "s".into(), Value::Null)["locksHeld"] == 1
}

fn wait_for_file(path: &Path) -> String {
    eventually(&format!("{}", path.display()), || path.exists());
    std::thread::sleep(Duration::from_millis(20));
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn run_passes_the_exit_code_on() {
    let server = TestServer::start();
    for code in [0, 3, 42] {
        let output = run_output(
            &server,
            &["run", "job", "--", "sh", "-c", &format!("exit {code}")],
        );
        assert_eq!(output.status.code(), Some(code), "{}", stderr_of(&output));
    }
    let output = run_output(&server, &["run", "job", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        output.status.code(),
        Some(128 + 15),
        "killed by SIGTERM is 143, as in a shell"
    );
    assert_eq!(stats(server.addr)["locks"], 0, "released after each run");
}

#[test]
fn run_gives_the_command_its_token_and_name_and_tokens_increase() {
    let server = TestServer::start();
    let mut last = 0u64;
    for _ in 0..3 {
        let output = run_output(
            &server,
            &[
                "run",
                "tok",
                "--",
                "sh",
                "-c",
                "echo $PKLOCK_NAME $PKLOCK_TOKEN",
            ],
        );
        assert!(output.status.success(), "{}", stderr_of(&output));
        let stdout = String::from_utf8(output.stdout).unwrap();
        let (name, token) = stdout.trim().split_once(' ').expect("name and token");
        assert_eq!(name, "tok");
        let token: u64 = token.parse().expect("PKLOCK_TOKEN is a number");
        assert!(token > last, "{token} after {last}");
        last = token;
    }
}

#[test]
fn run_with_no_wait_exits_with_the_conflict_code_while_another_holds() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("busy", 1);
    let output = run_output(&server, &["run", "busy", "--no-wait", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr_of(&output).contains("held elsewhere"),
        "{}",
        stderr_of(&output)
    );
    let output = run_output(&server, &["run", "busy", "-n", "-E", "9", "--", "true"]);
    assert_eq!(output.status.code(), Some(9));
    let output = run_output(&server, &["run", "busy", "--wait", "200ms", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_of(&output).contains("not granted within 200ms"));
}

#[test]
fn two_runs_hand_the_lock_over_in_order() {
    let server = TestServer::start();
    let dir = temp_dir("cli-fifo");
    let log = dir.join("log");
    let script = |n: u32| {
        format!(
            "echo {n} start >> {0}; sleep 0.5; echo {n} end >> {0}",
            log.display()
        )
    };
    let mut first = pklock(&server.addr)
        .args(["run", "fifo", "--", "sh", "-c", &script(1)])
        .spawn()
        .unwrap();
    eventually("first holds", || stats(server.addr)["locksHeld"] == 1);
    let mut second = pklock(&server.addr)
        .args(["run", "fifo", "--", "sh", "-c", &script(2)])
        .spawn()
        .unwrap();
    eventually("second waits", || stats(server.addr)["waiters"] == 1);
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines, "1 start\n1 end\n2 start\n2 end\n");
}

#[test]
fn status_shows_holder_and_waiter() {
    let server = TestServer::start();
    let mut holder = pklock(&server.addr)
        .args(["run", "nightly", "--", "sleep", "5"])
        .spawn()
        .unwrap();
    eventually("held", || stats(server.addr)["locksHeld"] == 1);
    let mut waiter = pklock(&server.addr)
        .args(["run", "nightly", "--", "true"])
        .spawn()
        .unwrap();
    eventually("waiting", || stats(server.addr)["waiters"] == 1);

    let output = run_output(&server, &["status"]);
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("LOCK") && lines[0].contains("CLIENT"),
        "{table}"
    );
    assert!(
        lines[1].contains("nightly")
            && lines[1].contains("held")
            && lines[1].contains("pklock run nightly"),
        "{table}"
    );
    assert!(
        lines[2].contains("waiting") && lines[2].contains("pklock run nightly"),
        "{table}"
    );

    let output = run_output(&server, &["status", "--json"]);
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["locks"][0]["holders"].as_array().unwrap().len(), 1);
    assert_eq!(json["locks"][0]["waiters"].as_array().unwrap().len(), 1);
    let output = run_output(&server, &["status", "other/"]);
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "no locks held or waited for\n"
    );

    // SIGTERM reaches the holder's command, which ends, and the lock passes on.
    Command::new("kill")
        .args(["-TERM", &holder.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(holder.wait().unwrap().code(), Some(128 + 15));
    assert!(
        waiter.wait().unwrap().success(),
        "the waiter ran once the holder was done"
    );
}

#[test]
fn signals_to_pklock_reach_the_command() {
    let server = TestServer::start();
    let dir = temp_dir("cli-signal");
    let marker = dir.join("got-term");
    let script = busy_script(&format!("echo TERM > {}; exit 7", marker.display()));
    let mut run = pklock(&server.addr)
        .args(["run", "sig", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    eventually("held", || stats(server.addr)["locksHeld"] == 1);
    std::thread::sleep(Duration::from_millis(100));
    Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    let status = common::wait_exit(&mut run, PATIENCE).expect("pklock exits");
    assert_eq!(status.code(), Some(7), "the command's own exit code");
    assert_eq!(wait_for_file(&marker), "TERM\n");
    assert_eq!(stats(server.addr)["locks"], 0);
}

fn short_keepalive_config() -> &'static str {
    // earliestReleaseMs 2000: leases of about a second.
    "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 2\nuser_timeout_ms = 2000\n"
}

#[test]
fn a_server_killed_for_good_under_run_stops_the_command_when_the_lease_runs_out() {
    let dir = temp_dir("cli-server-killed");
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let marker = dir.join("got-term");
    let script = busy_script(&format!("echo TERM > {}; exit 0", marker.display()));
    let mut run = pklock(&server.addr)
        .args([
            "run",
            "k",
            "--kill-grace",
            "200ms",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("held", || one_held(server.addr));
    std::thread::sleep(Duration::from_millis(100));
    let killed_at = Instant::now();
    server.signal("KILL");
    // A close may be a restart: pklock dials again to reclaim the lock, and
    // gives up when the lease (1 s here) runs out with no server back.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "the command was stopped at the close");
    let status = common::wait_exit(&mut run, PATIENCE).expect("pklock exits");
    let took = killed_at.elapsed();
    assert_eq!(status.code(), Some(75));
    assert_eq!(wait_for_file(&marker), "TERM\n");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let stderr = stderr_text(&mut run);
    assert!(stderr.contains("lost the lock \"k\""), "{stderr}");
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let dir = temp_dir("cli-kill-grace");
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let pid_file = dir.join("pid");
    let script = format!(
        "trap '' TERM; echo $$ > {}; while true; do sleep 0.05; done",
        pid_file.display()
    );
    let mut run = pklock(&server.addr)
        .args([
            "run",
            "stubborn",
            "--kill-grace",
            "300ms",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_for_file(&pid_file).trim().to_string();
    server.signal("KILL");
    let status = common::wait_exit(&mut run, PATIENCE).expect("pklock exits");
    assert_eq!(status.code(), Some(75));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the command is still running"
    );
    let stderr = stderr_text(&mut run);
    assert!(stderr.contains("SIGKILL"), "{stderr}");
}

#[test]
fn a_silent_server_expires_the_lease_and_stops_the_command_before_release() {
    let dir = temp_dir("cli-sigstop");
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let marker = dir.join("got-term");
    let script = busy_script(&format!("echo TERM > {}; exit 0", marker.display()));
    let mut run = pklock(&server.addr)
        .args([
            "run",
            "p",
            "--kill-grace",
            "200ms",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn()
        .unwrap();
    eventually("held", || one_held(server.addr));
    server.signal("STOP");
    let stopped_at = Instant::now();
    let status = common::wait_exit(&mut run, PATIENCE);
    let took = stopped_at.elapsed();
    server.signal("CONT");
    assert_eq!(status.and_then(|s| s.code()), Some(75));
    assert_eq!(wait_for_file(&marker), "TERM\n");
    // The server cannot release a silent peer before 2 s (earliestReleaseMs).
    assert!(
        took < Duration::from_secs(2),
        "the command outlived the lock: {took:?}"
    );
}

#[test]
fn lock_holds_until_stdin_closes() {
    let server = TestServer::start();
    let mut hold = pklock(&server.addr)
        .args(["lock", "shell"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(hold.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let token: u64 = line.trim().parse().expect("the token on stdout");
    let status = server
        .peer()
        .rpc("status", 1.into(), serde_json::json!({"lockName": "shell"}));
    assert_eq!(status["locks"][0]["holders"][0]["token"], token);
    let output = run_output(&server, &["run", "shell", "--no-wait", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    hold.stdin.take().unwrap().write_all(b"ignored\n").unwrap();
    let status = common::wait_exit(&mut hold, PATIENCE).expect("exits once stdin closes");
    assert!(status.success());
    assert!(
        run_output(&server, &["run", "shell", "--no-wait", "--", "true"])
            .status
            .success()
    );
}

#[test]
fn ping_and_stats_report_and_fail_cleanly() {
    let server = TestServer::start();
    let output = run_output(&server, &["ping"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("pklock"));
    let output = run_output(&server, &["stats", "--json"]);
    let stats: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(stats["uptimeMs"].is_u64());
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = pklock(&free_port).arg("ping").output().unwrap();
    assert_eq!(output.status.code(), Some(69));
    assert!(
        stderr_of(&output).contains("cannot connect"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn usage_errors_exit_64_and_help_lists_exit_codes() {
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["run", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("--no-wait") && help.contains("75") && help.contains("--kill-grace"),
        "{help}"
    );
    // A grace period the server's release time cannot cover is refused.
    let server = TestServer::start();
    let output = run_output(&server, &["run", "x", "--kill-grace", "9s", "--", "true"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr_of(&output).contains("lease"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_killed_pklock_leaves_the_lock_with_its_command_until_it_ends() {
    let server = TestServer::start();
    let dir = temp_dir("cli-pklock-killed");
    let done = dir.join("done");
    let script = format!("sleep 1; echo done > {}", done.display());
    let mut run = pklock(&server.addr)
        .args(["run", "job", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    eventually("held", || stats(server.addr)["locksHeld"] == 1);
    // SIGKILL to pklock alone: its command goes on, and keeps the lock.
    run.kill().unwrap();
    run.wait().unwrap();
    let mut other = server.peer();
    let result = other.rpc(
        "lock",
        serde_json::json!(1),
        serde_json::json!({"lockName": "job", "timeoutMs": 0}),
    );
    assert_eq!(
        result["status"], "timeout",
        "the lock went while its command ran"
    );
    other.ask("job", 2);
    assert_eq!(other.recv()["result"]["status"], "ok");
    assert!(done.exists(), "granted before the command was done");
}

#[test]
fn a_kill_grace_the_server_cannot_cover_is_refused_with_the_limit_named() {
    let server = TestServer::start();
    for (grace, said) in [("8s", "8000 ms"), ("7001ms", "7001 ms")] {
        let output = run_output(&server, &["run", "g", "--kill-grace", grace, "--", "true"]);
        assert_eq!(output.status.code(), Some(64), "{grace}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains(&format!("--kill-grace {said} is too long"))
                && stderr.contains("at most 7000 ms"),
            "{stderr}"
        );
    }
    assert!(
        run_output(&server, &["run", "g", "--kill-grace", "7s", "--", "true"])
            .status
            .success()
    );
}

#[test]
fn the_default_kill_grace_fits_a_server_with_a_short_release_time() {
    let dir = temp_dir("cli-short-release");
    // earliestReleaseMs 2000: a 2 s grace would leave no room for a lease.
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let output = pklock(&server.addr)
        .args(["run", "x", "--", "true"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    // Asked for explicitly, the same grace is still refused, in milliseconds.
    let output = pklock(&server.addr)
        .args(["run", "x", "--kill-grace", "2s", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr_of(&output).contains("use at most 1400 ms"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_lost_lock_under_pklock_lock_is_kept_until_stdin_closes() {
    let dir = temp_dir("cli-lock-lost");
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let mut hold = pklock(&server.addr)
        .args(["lock", "shell"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(hold.stdout.take().unwrap());
    let token = lines.recv_timeout(PATIENCE).expect("the token on stdout");
    token.trim().parse::<u64>().expect("a token");
    let mut waiter = Peer::connect(server.addr);
    waiter.ask("shell", 1);

    // Frozen past the 1 s lease, thawed before the 2 s release time.
    server.signal("STOP");
    let line = lines.recv_timeout(PATIENCE);
    server.signal("CONT");
    assert_eq!(line.as_deref(), Ok("lost"));
    // The script may still be at work: the lock stays held until it says
    // it is done by closing stdin.
    waiter.expect_nothing(Duration::from_millis(700));
    assert!(hold.try_wait().unwrap().is_none(), "pklock lock exited");
    drop(hold.stdin.take());
    let status = common::wait_exit(&mut hold, PATIENCE).expect("exits once stdin closes");
    assert_eq!(status.code(), Some(75));
    assert_eq!(waiter.recv()["result"]["status"], "ok");
    let stderr = stderr_text(&mut hold);
    assert!(stderr.contains("stop the work, then close"), "{stderr}");
}

#[test]
fn a_host_outside_allowed_is_told_so_and_exits_69() {
    let server = TestServer::with(|c| {
        c.allowed = pklock::allow_list::AllowList::parse(&["192.0.2.1"]).unwrap();
    });
    for args in [&["ping"][..], &["run", "x", "--", "true"], &["lock", "x"]] {
        let output = run_output(&server, args);
        assert_eq!(output.status.code(), Some(69), "{args:?}");
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains("refused by the server: this host is not in its `allowed` list"),
            "{args:?}: {stderr}"
        );
    }
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &server.addr.port().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    assert!(stderr_of(&output).contains("not in its `allowed` list"));
}

/// A server that answers hello as `real` does, then says `reply` to anything.
fn fake_server(real: &TestServer, reply: Value) -> std::net::SocketAddr {
    let mut hello = real.peer().rpc("hello", 0.into(), serde_json::json!({}));
    hello["status"] = "ok".into();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut answer = serde_json::json!({"id": 0, "result": hello});
        while let Ok(body) = pklock::frame::read_blocking(&mut stream, 1 << 20) {
            let request: Value = serde_json::from_slice(&body).unwrap();
            answer["id"] = request["id"].clone();
            let _ = pklock::frame::write_blocking(&mut stream, answer.to_string().as_bytes());
            answer["result"] = reply.clone();
        }
    });
    addr
}

#[test]
fn an_unknown_status_is_an_unexpected_answer() {
    let real = TestServer::start();
    let fake = fake_server(&real, serde_json::json!({"status": "weird", "error": ""}));
    let output = pklock(&fake)
        .args(["run", "x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(70), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("weird"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_port_where_nothing_answers_hello_is_not_a_pklock_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts (the kernel does, from the backlog) and never says anything.
    let started = Instant::now();
    let output = pklock(&addr).args(["ping"]).output().unwrap();
    assert_eq!(output.status.code(), Some(70), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("does not answer as a pklock server"),
        "{}",
        stderr_of(&output)
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(listener);
}

#[test]
fn lock_help_does_not_mention_run_only_options() {
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["lock", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        help.contains("Exit codes") && !help.contains("kill-grace"),
        "{help}"
    );
}

#[test]
fn the_restart_grace_is_told_once_with_the_time_left() {
    let server = TestServer::with(|c| c.restart_grace_ms = Some(60_000));
    std::thread::sleep(Duration::from_millis(1200));
    let output = run_output(&server, &["run", "cron", "--wait", "1s", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    let told: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("grants locks again in"))
        .collect();
    assert_eq!(told.len(), 1, "{stderr}");
    // Counted from now (under 59 s left), not the figure from start-up.
    let seconds: f64 = told[0]
        .split("grants locks again in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(seconds > 50.0 && seconds < 59.0, "{stderr}");
}

#[test]
fn long_lock_names_work() {
    let server = TestServer::start();
    let name = "n".repeat(1024);
    let output = run_output(&server, &["run", &name, "--", "true"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
}

#[test]
fn no_wait_during_the_restart_grace_says_why() {
    let server = TestServer::with(|c| c.restart_grace_ms = Some(60_000));
    let output = run_output(&server, &["run", "cron", "--no-wait", "--", "true"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr_of(&output).contains("restart grace"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn server_address_without_a_port_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["--server", "localhost", "ping"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr_of(&output).contains("HOST:PORT"));
}

/// The lines a child writes, as they come.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_lost_command_keeps_the_lock_until_its_whole_process_group_is_gone() {
    let dir = temp_dir("cli-group");
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let beat = dir.join("beat");
    // The leader ends on SIGTERM; a child it left behind ignores it and
    // works on until SIGKILL.
    let script = format!(
        "trap 'exit 0' TERM; (trap '' TERM; while :; do date +%s%N > {b}.tmp && mv {b}.tmp {b}; sleep 0.02; done) & while :; do sleep 0.05; done",
        b = beat.display()
    );
    let mut run = pklock(&server.addr)
        .args(["run", "grp", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the child works", || beat.exists());
    let mut waiter = Peer::connect(server.addr);
    waiter.ask("grp", 1);
    // Frozen past the 1 s lease; thawed before the 2 s release time, while
    // the child still has 600 ms of grace to run.
    server.signal("STOP");
    std::thread::sleep(Duration::from_millis(1300));
    server.signal("CONT");
    let reply = waiter.recv();
    let granted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    assert_eq!(reply["result"]["status"], "ok");
    // A child still at work beats every 20 ms: give it the time to show.
    std::thread::sleep(Duration::from_millis(200));
    let last_beat: u128 = std::fs::read_to_string(&beat)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &beat.display().to_string()])
        .status();
    assert!(
        last_beat < granted_at,
        "the child still worked {} ms after the lock was granted to another",
        (last_beat - granted_at) / 1_000_000
    );
    let status = common::wait_exit(&mut run, PATIENCE).expect("pklock exits");
    assert_eq!(status.code(), Some(75));
    let stderr = stderr_text(&mut run);
    assert!(stderr.contains("SIGKILL"), "{stderr}");
}

/// The README's bash example of holding a lock across several commands.
fn readme_hold_script() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("Holding a lock across several commands")
        .expect("the README has the example");
    let block = &readme[start..];
    let body = &block[block.find("```bash\n").unwrap() + 8..];
    body[..body.find("```").unwrap()].to_string()
}

fn run_readme_script(server: &str) -> Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_pklock")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-c", &readme_hold_script()])
        .env("PATH", path)
        .env("PKLOCK_SERVER", server)
        .output()
        .unwrap()
}

#[test]
fn the_readme_script_holds_the_lock_and_fails_cleanly_without_a_server() {
    let server = TestServer::start();
    let output = run_readme_script(&server.addr.to_string());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", stderr_of(&output));
    assert!(
        stdout.starts_with("deploying with fencing token "),
        "{stdout}"
    );
    assert!(!stdout.contains("lock lost"), "{stdout}");
    assert_eq!(stats(server.addr)["locks"], 0);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for _ in 0..5 {
        let output = run_readme_script(&format!("127.0.0.1:{port}"));
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(69), "{stderr}");
        assert!(stderr.starts_with("pklock: cannot connect"), "{stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "only pklock's own message: {stderr}"
        );
    }
}

#[test]
fn a_closed_stderr_does_not_stop_pklock_from_stopping_its_command() {
    let dir = temp_dir("cli-stderr-closed");
    let server = ServerProcess::start(&dir, short_keepalive_config());
    let marker = dir.join("got-term");
    // The command's own stderr stays writable: only pklock's is cut.
    let script = format!(
        "exec 2>/dev/null; {}",
        busy_script(&format!("echo TERM > {}; exit 0", marker.display()))
    );
    let mut run = pklock(&server.addr)
        .args(["run", "p", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("held", || one_held(server.addr));
    // Nobody reads pklock's stderr any more: writing there fails (EPIPE).
    drop(run.stderr.take());
    server.signal("STOP");
    let status = common::wait_exit(&mut run, PATIENCE);
    server.signal("CONT");
    assert_eq!(wait_for_file(&marker), "TERM\n");
    assert_eq!(status.and_then(|s| s.code()), Some(75));
}
