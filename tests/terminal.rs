//! `pklock run` with a terminal, in a pseudo-terminal made by the test: the
//! command reads what is typed, Ctrl-C ends it, and Ctrl-Z stops it and
//! pklock together as one job that `fg` resumes with the lock still held.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PATIENCE, Peer, ServerProcess, TestServer, temp_dir};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use serde_json::json;

/// A pseudo-terminal whose far end is the controlling terminal of `child`.
struct Pty {
    master: File,
    screen: Arc<Mutex<String>>,
    child: Child,
}

impl Pty {
    /// Runs `program args` as a session leader on a new pseudo-terminal.
    fn spawn(program: &str, args: &[&str], env: &[(&str, String)]) -> Pty {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        for (key, value) in env {
            command.env(key, value);
        }
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start on the terminal");
        let master = File::from(master);
        let screen = Arc::new(Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let shown = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Pty {
            master,
            screen,
            child,
        }
    }

    fn type_in(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
    }

    /// Waits until the screen shows `text`.
    fn expect(&self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if self.screen.lock().unwrap().contains(text) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "the terminal never showed {text:?}; it shows:\n{}",
            self.screen.lock().unwrap()
        );
    }

    fn wait(&mut self) -> Option<i32> {
        common::wait_exit(&mut self.child, PATIENCE)
            .expect("exits")
            .code()
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // Everything started on this terminal is in the child's session.
        let _ = Command::new("pkill")
            .args(["-KILL", "-s", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pklock_env(addr: std::net::SocketAddr) -> Vec<(&'static str, String)> {
    vec![("PKLOCK_SERVER", addr.to_string())]
}

#[test]
fn the_command_reads_the_terminal_and_ctrl_c_ends_it_with_130() {
    let server = TestServer::start();
    let mut pty = Pty::spawn(
        env!("CARGO_BIN_EXE_pklock"),
        &[
            "run",
            "tty",
            "--",
            "sh",
            "-c",
            "echo ready; read a; echo got:$a; echo again; read b",
        ],
        &pklock_env(server.addr),
    );
    pty.expect("ready");
    pty.type_in("hello\n");
    pty.expect("got:hello");
    pty.expect("again");
    pty.type_in("\x03");
    assert_eq!(pty.wait(), Some(130), "{}", pty.screen.lock().unwrap());
    let mut other = Peer::connect(server.addr);
    other.take("tty", 1);
}

#[test]
fn ctrl_z_stops_the_job_and_fg_resumes_it_with_the_lock_kept() {
    // earliestReleaseMs 2 s: pklock's lease is then 1 s, shorter than the
    // 2 s the job stays stopped.
    let dir = temp_dir("tty-stop");
    let config = "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 2\nuser_timeout_ms = 2000\n";
    let server = ServerProcess::start(&dir, config);
    let script = format!(
        "set -m; {} run job -- sh -c 'echo ready; read a; echo got:$a'; echo stopped:$?; sleep 2; fg; echo exit:$?",
        env!("CARGO_BIN_EXE_pklock")
    );
    let mut pty = Pty::spawn("bash", &["-c", &script], &pklock_env(server.addr));
    pty.expect("ready");
    pty.type_in("\x1a");
    // The shell got the terminal back and sees the job stopped (128 + STOP).
    pty.expect("stopped:147");
    let status = Peer::connect(server.addr).rpc("status", json!(1), json!({"lockName": "job"}));
    assert_eq!(
        status["locks"][0]["holders"].as_array().map(Vec::len),
        Some(1)
    );
    // After `fg` the command has the terminal again and the lock was kept.
    pty.type_in("typed after fg\n");
    pty.expect("got:typed after fg");
    pty.expect("exit:0");
    assert_eq!(pty.wait(), Some(0));
    let screen = pty.screen.lock().unwrap().clone();
    assert!(
        screen.contains("the command was stopped (SIGTSTP)"),
        "{screen}"
    );
    assert!(!screen.contains("lost the lock"), "{screen}");
}

#[test]
fn ctrl_z_for_a_job_whose_command_never_had_the_terminal_stops_the_command_too() {
    let server = TestServer::start();
    let dir = temp_dir("tty-bg-fg");
    let beat = dir.join("beat");
    // Started in the background, pklock gives its command no terminal; `fg`
    // then gives the terminal to pklock's job, not to the command.
    let script = format!(
        "set -m; {pklock} run bgfg -- sh -c 'while :; do date +%s%N > {beat}; sleep 0.02; done' & sleep 0.5; fg; echo stopped:$?; sleep 0.5; kill %1; wait; echo done",
        pklock = env!("CARGO_BIN_EXE_pklock"),
        beat = beat.display()
    );
    let mut pty = Pty::spawn("bash", &["-c", &script], &pklock_env(server.addr));
    common::eventually("the command beats", || beat.exists());
    std::thread::sleep(Duration::from_millis(700));
    pty.type_in("\x1a");
    pty.expect("stopped:147");
    // The command stopped with pklock: its heartbeat no longer moves.
    let before = std::fs::read_to_string(&beat).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read_to_string(&beat).unwrap(),
        before,
        "the command ran on"
    );
    pty.expect("done");
    assert_eq!(pty.wait(), Some(0));
}

#[test]
fn a_background_pklock_leaves_the_terminal_to_the_shell() {
    let server = TestServer::start();
    let mut env = pklock_env(server.addr);
    env.push(("PS1", "prompt> ".to_string()));
    let mut pty = Pty::spawn("bash", &["--norc", "--noprofile", "-i"], &env);
    pty.expect("prompt> ");
    pty.type_in(&format!(
        "{} run bg -- sleep 0.3 &\n",
        env!("CARGO_BIN_EXE_pklock")
    ));
    std::thread::sleep(Duration::from_millis(1500));
    // The interactive shell still has the terminal: it reads what is typed.
    pty.type_in("echo still-$((40+2))\n");
    pty.expect("still-42");
    pty.type_in("exit 0\n");
    assert_eq!(pty.wait(), Some(0));
}
