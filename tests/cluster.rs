//! Several servers on a real etcd (Debian's `etcd-server`, started by the
//! tests on loopback ports of their own): exactly one leader, standbys that
//! name it; the leader SIGKILLed ten times in a row under fifty `pklock run`
//! holders and a contended lock; a planned switchover (SIGTERM); a leader
//! cut off from etcd but not from its clients (a network namespace); and
//! etcd itself down. The failover figures are printed (`--nocapture`).
//!
//! Needs etcd, and for the cut root, `ip` and `iptables`; without them the
//! tests say so and pass, unless `PKLOCK_REQUIRE_ALL=1` (set by .ci/run).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, die_with_this_thread, etcd_or_skip};
use common::netns::{Netns, netns_or_skip};
use common::{PATIENCE, Peer, ServerProcess, TempDir, eventually, temp_dir};
use pklock::client::{Client, ClientOptions, LockOptions};
use serde_json::{Value, json};

/// The leadership's lease in etcd: the shortest the server takes.
const LEASE_TTL: Duration = Duration::from_millis(2000);

/// `[keepalive]` for an earliest release of 8 s: `pklock run --kill-grace
/// 200ms` then keeps a lease of 4 s, longer than a failover takes (the old
/// leadership expires in etcd within LEASE_TTL, then a standby wins).
const KEEPALIVE: &str =
    "[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 1\nuser_timeout_ms = 8000\n";

/// What holders give their command to stop.
const KILL_GRACE: &str = "200ms";

/// After a crash the new leader grants nothing but reclaims for this long:
/// the holders' lease (4 s) plus their kill grace, by when a holder that
/// has not reclaimed has stopped its command. The default (the earliest
/// release, 8 s) would make ten failovers in a row take too long.
const GRACE: Duration = Duration::from_millis(4200);

/// Scheduling slack allowed on top of a deadline (a noisy 2-core machine).
const SLACK: Duration = Duration::from_secs(3);

/// Every test here starts several servers and many processes, and measures
/// times: they take turns.
static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A connection, or `None` if the address does not take one now.
fn try_peer(addr: SocketAddr) -> Option<Peer> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_nodelay(true).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    Some(Peer { stream })
}

/// `hello`'s result, or `None` if the server cannot be asked now.
fn hello(addr: SocketAddr) -> Option<Value> {
    let mut peer = try_peer(addr)?;
    if !peer.try_send(json!({"command": "hello", "id": 0, "parameters": {"client": "probe"}})) {
        return None;
    }
    Some(peer.try_recv()?["result"].clone())
}

/// `hello`'s role and leader.
fn role(addr: SocketAddr) -> Option<(String, Value)> {
    let result = hello(addr)?;
    Some((
        result["role"].as_str()?.to_string(),
        result["leader"].clone(),
    ))
}

/// One server of a cluster, which can be killed and started again on the
/// same address and directory.
struct Member {
    addr: SocketAddr,
    dir: PathBuf,
    config: String,
    /// The namespace it runs in, if not the test's own.
    netns: Option<String>,
    process: Option<ServerProcess>,
}

impl Member {
    fn start(&mut self) {
        let command = match &self.netns {
            None => Command::new(ServerProcess::BINARY),
            Some(name) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name, ServerProcess::BINARY]);
                command
            }
        };
        let mut command = command;
        die_with_this_thread(&mut command);
        self.process = Some(ServerProcess::launch(&self.dir, &self.config, command));
    }

    fn process(&mut self) -> &mut ServerProcess {
        self.process.as_mut().expect("the server runs")
    }

    /// SIGKILL; returns when it was sent, once the process is gone.
    fn kill(&mut self) -> Instant {
        let mut process = self.process.take().expect("the server runs");
        let at = Instant::now();
        process.signal("KILL");
        process.wait_exit();
        at
    }

    fn running(&self) -> bool {
        self.process.is_some()
    }
}

/// Servers of one election on one etcd.
struct Cluster {
    members: Vec<Member>,
    dir: TempDir,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        Cluster {
            members: Vec::new(),
            dir: temp_dir(name),
        }
    }

    /// A cluster of `n` servers on loopback, started one after the other.
    fn on_loopback(name: &str, etcd: &Etcd, n: usize) -> Cluster {
        let mut cluster = Cluster::new(name);
        for _ in 0..n {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            cluster.add(addr, &etcd.endpoint(), "", None);
        }
        cluster
    }

    /// Adds a server listening on `addr` and starts it.
    fn add(&mut self, addr: SocketAddr, etcd: &str, extra: &str, netns: Option<&Netns>) {
        let config = format!(
            "listen = [\"{addr}\"]\n{extra}restart_grace_ms = {grace}\n{KEEPALIVE}\
             [cluster]\netcd_endpoints = [\"{etcd}\"]\nelection = \"/pklock-test/leader\"\n\
             advertise = \"{addr}\"\nlease_ttl_ms = {ttl}\n",
            grace = GRACE.as_millis(),
            ttl = LEASE_TTL.as_millis(),
        );
        let dir = self.next_dir();
        self.add_configured(addr, dir, config, netns);
    }

    /// The directory of the next server added, made.
    fn next_dir(&self) -> PathBuf {
        let dir = self.dir.join(format!("server-{}", self.members.len()));
        std::fs::create_dir_all(&dir).expect("the server's directory");
        dir
    }

    /// Adds a server listening on `addr`, in `dir`, with the whole of
    /// `config`, and starts it.
    fn add_configured(
        &mut self,
        addr: SocketAddr,
        dir: PathBuf,
        config: String,
        netns: Option<&Netns>,
    ) {
        let mut member = Member {
            addr,
            dir,
            config,
            netns: netns.map(|n| n.name.clone()),
            process: None,
        };
        member.start();
        self.members.push(member);
    }

    /// A directory for the clients' files, made.
    fn work_dir(&self) -> PathBuf {
        let work = self.dir.join("work");
        std::fs::create_dir_all(&work).expect("a work directory");
        work
    }

    /// Every address, comma-separated, as `--server` takes them.
    fn list(&self) -> String {
        let addrs: Vec<String> = self.members.iter().map(|m| m.addr.to_string()).collect();
        addrs.join(",")
    }

    /// Waits until exactly one of `among` (running members) says it leads
    /// and the others of `among` say they stand by naming it; returns it.
    fn leader_among(&self, among: &[usize]) -> usize {
        let start = Instant::now();
        loop {
            let seen = among
                .iter()
                .map(|&i| role(self.members[i].addr))
                .collect::<Vec<_>>();
            let leaders: Vec<usize> = among
                .iter()
                .zip(&seen)
                .filter(|(_, r)| r.as_ref().is_some_and(|(role, _)| role == "leader"))
                .map(|(&i, _)| i)
                .collect();
            if let [leader] = leaders[..] {
                let named = json!(self.members[leader].addr.to_string());
                let agreed = among.iter().zip(&seen).all(|(&i, r)| {
                    i == leader
                        || r.as_ref()
                            .is_some_and(|(role, l)| role == "standby" && *l == named)
                });
                if agreed {
                    return leader;
                }
            }
            assert!(
                start.elapsed() < PATIENCE,
                "no single leader that the others name: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Cluster::leader_among`] the running members.
    fn leader(&self) -> usize {
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].running())
            .collect();
        self.leader_among(&running)
    }
}

/// Holders and their tokens, and waiter counts, by lock name, as the
/// server at `addr` (a leader) shows them.
fn status(addr: SocketAddr) -> (BTreeMap<String, Vec<u64>>, BTreeMap<String, usize>) {
    let mut holders = BTreeMap::new();
    let mut waiters = BTreeMap::new();
    let mut peer = Peer::connect(addr);
    let mut after = String::new();
    loop {
        let reply = peer.rpc("status", json!(1), json!({"after": after, "limit": 1000}));
        let locks = reply["locks"]
            .as_array()
            .unwrap_or_else(|| panic!("status at {addr}: {reply}"))
            .clone();
        for lock in &locks {
            let name = lock["lockName"].as_str().expect("lockName").to_string();
            let tokens: Vec<u64> = lock["holders"]
                .as_array()
                .expect("holders")
                .iter()
                .map(|h| h["token"].as_u64().expect("token"))
                .collect();
            if !tokens.is_empty() {
                holders.insert(name.clone(), tokens);
            }
            let waiting = lock["waiters"].as_array().expect("waiters").len();
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

/// The `job-*` holders and their tokens at `addr`.
fn jobs(addr: SocketAddr) -> BTreeMap<String, Vec<u64>> {
    let (mut holders, _) = status(addr);
    holders.retain(|name, _| name.starts_with("job-"));
    holders
}

/// `pklock --server LIST run --kill-grace 200ms job-N -- sh -c ...`
/// holders, each command writing a file once it runs, and another if it
/// is sent SIGTERM.
struct Fleet {
    runs: BTreeMap<String, Child>,
    dir: PathBuf,
}

impl Fleet {
    fn start(servers: &str, dir: &Path, n: usize) -> Fleet {
        let mut fleet = Fleet {
            runs: BTreeMap::new(),
            dir: dir.to_path_buf(),
        };
        for i in 0..n {
            let name = format!("job-{i:02}");
            let script = format!(
                "trap 'touch {stopped}; exit 0' TERM; touch {started}; while :; do sleep 1; done",
                stopped = fleet.file(&name, "stopped").display(),
                started = fleet.file(&name, "started").display(),
            );
            let err = std::fs::File::create(fleet.file(&name, "err")).expect("a log file");
            let child = Command::new(env!("CARGO_BIN_EXE_pklock"))
                .args(["--server", servers, "run", "--kill-grace", KILL_GRACE])
                .args([&name, "--", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .expect("start pklock run");
            fleet.runs.insert(name, child);
        }
        fleet
    }

    fn file(&self, name: &str, what: &str) -> PathBuf {
        self.dir.join(format!("{name}.{what}"))
    }

    fn all_started(&self) -> bool {
        self.runs.keys().all(|n| self.file(n, "started").exists())
    }

    /// Asserts that every `pklock run` still runs its command.
    fn assert_none_stopped(&mut self, when: &str) {
        let mut exited = Vec::new();
        for (name, child) in &mut self.runs {
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read_to_string(self.dir.join(format!("{name}.err")))
                    .unwrap_or_default();
                exited.push(format!("{name} ({status}): {said}"));
            }
        }
        assert!(exited.is_empty(), "{when}: pklock run exited: {exited:#?}");
        let stopped: Vec<&String> = self
            .runs
            .keys()
            .filter(|n| self.file(n, "stopped").exists())
            .collect();
        assert!(stopped.is_empty(), "{when}: commands stopped: {stopped:?}");
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        common::stop_pklock_runs(self.runs.values_mut());
    }
}

/// Workers taking turns on one contended lock, `hot`: each runs `pklock
/// run hot` in a loop, with a command that logs `start TOKEN PID` and
/// `end TOKEN PID` (also when stopped) around a 0.3 s sleep, so that at
/// any time one holds the lock and the others wait for it.
struct Contended {
    workers: Vec<Child>,
    log: PathBuf,
}

impl Contended {
    fn start(servers: &str, dir: &Path, n: usize) -> Contended {
        let log = dir.join("hot.log");
        let command = format!(
            "trap 'echo end $PKLOCK_TOKEN $$ >> {log}; exit 0' TERM; \
             echo start $PKLOCK_TOKEN $$ >> {log}; sleep 0.3; echo end $PKLOCK_TOKEN $$ >> {log}",
            log = log.display()
        );
        let workers = (0..n)
            .map(|_| {
                Command::new("sh")
                    .args([
                        "-c",
                        "while :; do \"$0\" --server \"$1\" run --kill-grace \"$2\" hot -- sh -c \"$3\"; \
                         sleep 0.1; done",
                        env!("CARGO_BIN_EXE_pklock"),
                        servers,
                        KILL_GRACE,
                        &command,
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0)
                    .spawn()
                    .expect("start a worker")
            })
            .collect();
        Contended { workers, log }
    }

    /// The complete lines of the log: (start or end, token, pid).
    fn entries(&self) -> Vec<(String, u64, u32)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|line| {
                let mut words = line.split(' ');
                let parsed = (|| {
                    let kind = words.next()?.to_string();
                    let token = words.next()?.parse().ok()?;
                    let pid = words.next()?.parse().ok()?;
                    Some((kind, token, pid))
                })();
                parsed.unwrap_or_else(|| panic!("a line of {}: {line:?}", self.log.display()))
            })
            .collect()
    }

    fn grants(&self) -> usize {
        self.entries().iter().filter(|e| e.0 == "start").count()
    }

    /// Checks the log: never two commands running at once, and every grant
    /// with a token above the one before. Returns the number of grants.
    fn check(&self) -> usize {
        let mut current: Option<(u64, u32)> = None;
        let mut last_token = 0;
        let mut ended = HashSet::new();
        let entries = self.entries();
        for (i, (kind, token, pid)) in entries.iter().enumerate() {
            let context = || {
                let from = i.saturating_sub(4);
                format!("{:?}", &entries[from..(i + 2).min(entries.len())])
            };
            if kind == "start" {
                assert_eq!(
                    current,
                    None,
                    "`hot` granted to {pid} while {current:?} held it: {}",
                    context()
                );
                assert!(
                    *token > last_token,
                    "token {token} after {last_token}: {}",
                    context()
                );
                last_token = *token;
                current = Some((*token, *pid));
            } else if current.is_some_and(|(_, p)| p == *pid) {
                current = None;
                ended.insert(*pid);
            } else {
                assert!(ended.contains(pid), "an end without a start: {}", context());
            }
        }
        entries.iter().filter(|e| e.0 == "start").count()
    }

    fn last_token(&self) -> u64 {
        self.entries().iter().map(|e| e.1).max().unwrap_or(0)
    }
}

impl Drop for Contended {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = Command::new("kill")
                .args(["-s", "TERM", "--", &format!("-{}", worker.id())])
                .stderr(Stdio::null())
                .status();
        }
        for worker in &mut self.workers {
            let _ = common::wait_exit(worker, PATIENCE);
            let _ = worker.kill();
        }
    }
}

#[test]
fn two_and_three_servers_elect_one_leader_that_the_standbys_name() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("one-leader", &[]) else {
        return;
    };
    for n in [2, 3] {
        let mut cluster = Cluster::on_loopback(&format!("one-leader-{n}"), &etcd, n);
        let leader = cluster.leader();
        let leader_addr = cluster.members[leader].addr;
        let named = leader_addr.to_string();
        let line = cluster.members[leader]
            .process()
            .wait_for_log("leading now");
        assert!(line.contains(&named), "{line}");
        for (i, member) in cluster.members.iter().enumerate() {
            if i == leader {
                continue;
            }
            let mut peer = Peer::connect(member.addr);
            let lock =
                peer.call(json!({"command": "lock", "id": 7, "parameters": {"lockName": "x"}}));
            assert_eq!(
                lock,
                json!({"error": "notLeader", "leader": named, "id": 7}),
                "{n} servers, a standby's answer to lock"
            );
            let status = peer.call(json!({"command": "status", "id": 8, "parameters": {}}));
            assert_eq!(status["error"], "notLeader", "{status}");
            let ping = peer.call(json!({"command": "ping", "id": 9}));
            assert_eq!(ping["result"]["status"], "ok", "{ping}");
            let stats = common::stats(member.addr);
            assert_eq!(stats["status"], "ok", "{stats}");
        }
        let mut peer = Peer::connect(leader_addr);
        let token = peer.take("x", 1);
        assert!(token > 0);
        // A client given every address finds the leader and locks there.
        let client = Client::connect(cluster.list(), &ClientOptions::named("list"))
            .unwrap_or_else(|e| panic!("{n} servers: connect to {}: {e}", cluster.list()));
        let guard = client
            .lock("y", &LockOptions::exclusive())
            .unwrap_or_else(|e| panic!("{n} servers: lock y: {e}"));
        assert!(guard.token() > token);
        let (holders, _) = status(leader_addr);
        assert_eq!(holders.keys().collect::<Vec<_>>(), ["x", "y"]);
        drop(cluster);
    }
}

#[test]
fn ten_leader_crashes_in_a_row_stop_no_holder_and_never_grant_a_lock_twice() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("crashes", &[]) else {
        return;
    };
    let mut cluster = Cluster::on_loopback("crashes", &etcd, 3);
    let servers = cluster.list();
    let work = cluster.work_dir();
    let mut fleet = Fleet::start(&servers, &work, 50);
    let hot = Contended::start(&servers, &work, 3);
    eventually("every holder runs", || fleet.all_started());
    let mut highest = 0;
    let mut figures = Vec::new();
    for round in 0..10 {
        let leader = cluster.leader();
        let addr = cluster.members[leader].addr;
        let mut before = BTreeMap::new();
        eventually("fifty holders at the leader", || {
            before = jobs(addr);
            before.len() == 50
        });
        let (_, waiters) = status(addr);
        let hot_grants = hot.grants();
        highest = highest
            .max(before.values().flatten().copied().max().unwrap_or(0))
            .max(hot.last_token());

        let killed_at = cluster.members[leader].kill();
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let next = cluster.leader_among(&others);
        let elected = killed_at.elapsed();
        let mut fresh = Peer::connect(cluster.members[next].addr);
        let reply = fresh.lock(&format!("fresh-{round}"), 1);
        let granted = killed_at.elapsed();
        assert_eq!(reply["status"], "ok", "round {round}: {reply}");
        let token = reply["token"].as_u64().expect("token");
        assert!(
            token > highest,
            "round {round}: token {token} after a failover, {highest} before"
        );
        highest = token;
        // Nothing but reclaims during the grace, which starts after the crash.
        assert!(
            granted >= GRACE,
            "round {round}: a fresh lock granted {granted:?} after the crash"
        );
        assert!(
            granted < LEASE_TTL + GRACE + SLACK,
            "round {round}: first grant {granted:?} after the crash"
        );
        // Every holder reclaimed its grant, with its token, within its lease
        // (before the grace ended).
        fleet.assert_none_stopped(&format!("round {round}"));
        let after = jobs(cluster.members[next].addr);
        assert_eq!(after, before, "round {round}: holders at the new leader");
        // Served in turn at the new leader, as many as were waiting.
        eventually("the contended lock granted to its waiters", || {
            hot.grants() >= hot_grants + 2
        });
        eprintln!(
            "crash {round}: new leader {elected:?} after the SIGKILL, first fresh grant \
             {granted:?} after it; {} waiting on the contended lock before",
            waiters.get("hot").copied().unwrap_or(0)
        );
        figures.push((elected, granted));
        cluster.members[leader].start();
    }
    let grants = hot.check();
    let worst = figures.iter().map(|f| f.1).max().unwrap_or_default();
    let elected = figures.iter().map(|f| f.0).max().unwrap_or_default();
    eprintln!(
        "ten crashes: 0 of 50 holders stopped; new leader at most {elected:?}, first fresh grant \
         at most {worst:?} after the SIGKILL (lease_ttl_ms {}, restart_grace_ms {}); \
         the contended lock granted {grants} times, never to two at once",
        LEASE_TTL.as_millis(),
        GRACE.as_millis()
    );
}

#[test]
fn a_planned_switchover_stops_no_holder_and_grants_fresh_names_at_once() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("switchover", &[]) else {
        return;
    };
    let mut cluster = Cluster::on_loopback("switchover", &etcd, 3);
    let servers = cluster.list();
    let work = cluster.work_dir();
    let mut fleet = Fleet::start(&servers, &work, 50);
    let hot = Contended::start(&servers, &work, 3);
    eventually("every holder runs", || fleet.all_started());
    let leader = cluster.leader();
    let mut before = BTreeMap::new();
    eventually("fifty holders at the leader", || {
        before = jobs(cluster.members[leader].addr);
        before.len() == 50
    });
    let hot_grants = hot.grants();

    // Asks the others for a fresh name without waiting, until one grants it.
    let others: Vec<SocketAddr> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| cluster.members[i].addr)
        .collect();
    let (tx, granted) = mpsc::channel();
    let prober = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < PATIENCE * 2 {
            for &addr in &others {
                let Some(mut peer) = try_peer(addr) else {
                    continue;
                };
                let ask = json!({"command": "lock", "id": 1, "parameters": {"lockName": "fresh", "timeoutMs": 0}});
                if !peer.try_send(ask) {
                    continue;
                }
                if let Some(reply) = peer.try_recv()
                    && reply["result"]["status"] == "ok"
                {
                    let _ = tx.send((Instant::now(), addr, reply));
                    // Held until the test ends.
                    std::thread::sleep(PATIENCE * 3);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let termed_at = Instant::now();
    let old = cluster.members[leader].process();
    old.signal("TERM");
    assert_eq!(old.wait_exit(), Some(0), "the old leader's exit code");
    let exited_at = Instant::now();
    cluster.members[leader].process = None;
    let (granted_at, at, reply) = granted
        .recv_timeout(PATIENCE * 2)
        .expect("a fresh name granted by another server");
    let switchover = granted_at.saturating_duration_since(exited_at);
    eprintln!(
        "switchover: the old leader exited {:?} after SIGTERM; a fresh name granted by {at} \
         {switchover:?} after that ({:?} after the SIGTERM)",
        exited_at - termed_at,
        granted_at - termed_at
    );
    assert!(
        switchover < Duration::from_secs(1) + SLACK,
        "a fresh name granted {switchover:?} after the old leader exited: {reply}"
    );
    let next = cluster.leader();
    assert_eq!(cluster.members[next].addr, at, "granted by the new leader");
    let mut after = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        after = jobs(at);
        if after == before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "switchover: every holder back with its token {:?} after SIGTERM",
        termed_at.elapsed()
    );
    assert_eq!(after, before, "holders at the new leader");
    fleet.assert_none_stopped("after the switchover");
    eventually("the contended lock granted again", || {
        hot.grants() > hot_grants
    });
    hot.check();
    drop(prober);
}

#[test]
fn a_leader_cut_off_from_etcd_steps_down_before_another_leads() {
    let _turn = common::take_turn(&TURNS);
    let Some(netns) = netns_or_skip("cut-off leader") else {
        return;
    };
    let Some(etcd) = etcd_or_skip("cut-off", &[netns.host_ip]) else {
        return;
    };
    // The first server runs in the namespace and reaches etcd at the host
    // side of the veth pair; its clients (in the test's namespace) reach it
    // at the namespace's side. Only its traffic with etcd is cut.
    let mut cluster = Cluster::new("cut-off");
    let inside = SocketAddr::from((netns.ns_ip, 20934));
    cluster.add(
        inside,
        &etcd.endpoint_at(netns.host_ip),
        &format!("allowed = [\"{}\"]\n", netns.host_ip),
        Some(&netns),
    );
    assert_eq!(cluster.leader(), 0, "the first server leads");
    for _ in 0..2 {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        cluster.add(addr, &etcd.endpoint(), "", None);
    }
    assert_eq!(cluster.leader(), 0, "it still leads");
    let servers = cluster.list();
    let work = cluster.work_dir();
    let mut fleet = Fleet::start(&servers, &work, 5);
    eventually("every holder runs", || fleet.all_started());
    let mut holder = Peer::connect(inside);
    holder.take("contended", 1);
    let mut waiter = Peer::connect(inside);
    waiter.ask("contended", 1);
    let mut before = BTreeMap::new();
    eventually("the holders at the leader", || {
        before = jobs(inside);
        before.len() == 5
    });
    assert_eq!(status(inside).1.get("contended"), Some(&1));

    // Watches the two others: when each hello was sent, and what it said.
    let others = [cluster.members[1].addr, cluster.members[2].addr];
    let (tx, watched) = mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let start = Instant::now();
        let mut last_standby = Instant::now();
        while start.elapsed() < PATIENCE * 2 {
            let sent = Instant::now();
            let roles: Vec<_> = others.iter().map(|&a| role(a)).collect();
            if roles
                .iter()
                .any(|r| r.as_ref().is_some_and(|(role, _)| role == "leader"))
            {
                // Leading since after the last look that found none leading.
                let _ = tx.send(Ok(last_standby));
                return;
            }
            last_standby = sent;
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = tx.send(Err("neither of the others became the leader"));
    });
    // Asks the others for the contended lock until one grants it.
    let (tx, granted) = mpsc::channel();
    let prober = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < PATIENCE * 2 {
            for &addr in &others {
                let Some(mut peer) = try_peer(addr) else {
                    continue;
                };
                peer.ask("contended", 1);
                if let Some(reply) = peer.try_recv()
                    && reply["result"]["status"] == "ok"
                {
                    let _ = tx.send((Instant::now(), reply));
                    std::thread::sleep(PATIENCE * 3);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    let cut_at = Instant::now();
    netns.cut_port(netns.host_ip, etcd.client_port);
    let told_holder = holder.expect_closed();
    let closed_at = Instant::now();
    let told_waiter = waiter.expect_closed();
    let stepped = closed_at - cut_at;
    assert!(told_holder.is_empty(), "{told_holder:?}");
    assert!(
        told_waiter.iter().all(|m| m["result"]["status"] != "ok"),
        "the old leader granted the lock on its way out: {told_waiter:?}"
    );
    let line = cluster.members[0]
        .process()
        .wait_for_log("stepping down as the leader");
    let (role_now, _) = role(inside).expect("the old leader answers hello");
    assert_eq!(role_now, "standby", "the old leader after the cut");
    let new_leader_from = watched
        .recv_timeout(PATIENCE * 2)
        .expect("the watcher")
        .expect("a new leader");
    let (granted_at, reply) = granted
        .recv_timeout(PATIENCE * 2)
        .expect("the contended lock granted by another server");
    eprintln!(
        "cut off from etcd: the leader closed its connections {stepped:?} after the cut \
         ({line}); another led {:?} after the cut at the earliest, and granted the contended \
         lock {:?} after it",
        new_leader_from.saturating_duration_since(cut_at),
        granted_at - cut_at
    );
    assert!(
        closed_at < new_leader_from,
        "the old leader closed its connections {stepped:?} after the cut, another led from {:?}",
        new_leader_from.saturating_duration_since(cut_at)
    );
    assert!(closed_at < granted_at, "{reply}");
    // The lease was renewed at the cut at the latest: the step-down is due
    // before it could expire.
    assert!(
        stepped < LEASE_TTL + SLACK,
        "stepped down {stepped:?} after the cut"
    );
    let next = cluster.leader_among(&[1, 2]);
    let mut after = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < PATIENCE && after != before {
        after = jobs(cluster.members[next].addr);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(after, before, "the holders at the new leader");
    fleet.assert_none_stopped("after the cut");

    // Back in touch with etcd, it stands by and names the new leader.
    netns.heal();
    let named = json!(cluster.members[next].addr.to_string());
    eventually("the old leader names the new one", || {
        role(inside).is_some_and(|(role, leader)| role == "standby" && leader == named)
    });
    drop(watcher);
    drop(prober);
}

/// Waits until the server at `addr` closes `peer` (the leader stepping
/// down), asserting it granted nothing on the way; returns how long after
/// `since` that was.
fn closed_after(peer: &mut Peer, since: Instant) -> Duration {
    let told = peer.expect_closed();
    let at = since.elapsed();
    assert!(told.is_empty(), "{told:?}");
    at
}

/// Asks every member for a fresh name until one grants it; returns how
/// long after `since` that was.
fn served_again(cluster: &Cluster, name: &str, since: Instant) -> Duration {
    loop {
        for member in &cluster.members {
            let Some(mut peer) = try_peer(member.addr) else {
                continue;
            };
            peer.ask(name, 1);
            if let Some(reply) = peer.try_recv() {
                if reply["result"]["status"] == "ok" {
                    return since.elapsed();
                }
                assert_eq!(reply["error"], "notLeader", "{reply}");
            }
        }
        assert!(
            since.elapsed() < PATIENCE + GRACE + LEASE_TTL,
            "nobody granted {name}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn with_etcd_down_the_leader_stops_serving_and_serving_resumes_when_it_returns() {
    let _turn = common::take_turn(&TURNS);
    let Some(mut etcd) = etcd_or_skip("etcd-down", &[]) else {
        return;
    };
    let mut cluster = Cluster::on_loopback("etcd-down", &etcd, 2);
    for (round, how) in ["paused", "killed"].iter().enumerate() {
        let leader = cluster.leader();
        let addr = cluster.members[leader].addr;
        let mut holder = Peer::connect(addr);
        holder.take("held", 1);
        let down_at = Instant::now();
        if round == 0 {
            etcd.pause();
        } else {
            etcd.kill();
        }
        let stepped = closed_after(&mut holder, down_at);
        let line = cluster.members[leader]
            .process()
            .wait_for_log("stepping down as the leader");
        eprintln!("etcd {how}: the leader closed its connections {stepped:?} after ({line})");
        assert!(line.contains("etcd"), "the log says why: {line}");
        assert!(
            stepped < LEASE_TTL + SLACK,
            "etcd {how}: stepped down {stepped:?} after"
        );
        for member in &cluster.members {
            let (role_now, _) = role(member.addr).expect("hello");
            assert_eq!(role_now, "standby", "etcd {how}: {}", member.addr);
            let reply = Peer::connect(member.addr).call(
                json!({"command": "lock", "id": 2, "parameters": {"lockName": "x", "timeoutMs": 0}}),
            );
            assert_eq!(reply["error"], "notLeader", "etcd {how}: {reply}");
        }
        std::thread::sleep(LEASE_TTL);
        let back_at = Instant::now();
        if round == 0 {
            etcd.resume();
        } else {
            etcd.restart()
                .unwrap_or_else(|e| panic!("etcd restarts: {e}"));
        }
        let served = served_again(&cluster, &format!("after-{how}"), back_at);
        eprintln!("etcd {how}: a lock granted {served:?} after etcd came back");
        assert!(
            served < LEASE_TTL + GRACE + SLACK,
            "etcd {how}: served again {served:?} after etcd came back"
        );
    }
}

/// The token ceiling as etcd holds it.
fn ceiling_in(etcd: &mut pklock::cluster::etcd::Etcd) -> u64 {
    let kv = etcd
        .get(b"/pklock-test/leader.tokens")
        .expect("etcd answers")
        .expect("a leader reserved tokens");
    String::from_utf8_lossy(&kv.value)
        .parse()
        .expect("the ceiling is a number")
}

#[test]
fn tokens_go_on_above_the_ceiling_in_etcd_even_with_the_clock_behind_and_stay_under_2_53() {
    use pklock::cluster::etcd::{Etcd as EtcdClient, Op};
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("ceiling", &[]) else {
        return;
    };
    let endpoint = etcd.endpoint();
    let host_port = endpoint.trim_start_matches("http://").to_string();
    let mut client = EtcdClient::new(vec![host_port], Duration::from_secs(5));
    let put = |client: &mut EtcdClient, ceiling: u64| {
        let op = Op::Put {
            key: b"/pklock-test/leader.tokens".to_vec(),
            value: ceiling.to_string().into_bytes(),
            lease: 0,
        };
        assert!(client.txn(&[], &[op]).expect("etcd answers").0);
    };
    // Far ahead of the wall clock in microseconds (about 1.8e15 in 2026).
    let ahead = 4_000_000_000_000_000;
    put(&mut client, ahead);
    let mut cluster = Cluster::on_loopback("ceiling", &etcd, 2);
    let first = cluster.leader();
    let token = Peer::connect(cluster.members[first].addr).take("a", 1);
    assert!(token >= ahead, "token {token} below the ceiling {ahead}");
    let reserved = ceiling_in(&mut client);
    assert!(
        reserved > token,
        "ceiling {reserved} not above token {token}"
    );

    // After a crash the next leader starts above everything reserved.
    cluster.members[first].kill();
    let second = cluster.leader();
    assert_ne!(first, second);
    let mut peer = Peer::connect(cluster.members[second].addr);
    let reply = peer.call(json!({"command": "lock", "id": 2,
        "parameters": {"lockName": "b", "timeoutMs": (GRACE + SLACK).as_millis() as u64}}));
    let next = reply["result"]["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("{reply}"));
    assert!(
        next >= reserved,
        "token {next} below the old ceiling {reserved}"
    );

    // Near 2^53 nothing is granted rather than a token JSON readers round:
    // requests wait (here past the grace, when they would otherwise be served).
    drop(peer);
    put(&mut client, (1 << 53) - 10);
    cluster.members[second].kill();
    cluster.members[first].start();
    let leader = cluster.leader();
    assert_eq!(leader, first);
    let mut peer = Peer::connect(cluster.members[leader].addr);
    let wait = GRACE + SLACK;
    let reply = peer.call(json!({"command": "lock", "id": 3,
        "parameters": {"lockName": "c", "timeoutMs": wait.as_millis() as u64}}));
    assert_eq!(reply["result"]["status"], "timeout", "{reply}");
}

/// The revision etcd is at (an empty transaction's answer).
fn revision_of(etcd: &mut pklock::cluster::etcd::Etcd) -> i64 {
    etcd.txn(&[], &[]).expect("etcd answers").1
}

#[test]
fn at_the_end_of_the_token_space_the_leader_stops_reserving_instead_of_writing_in_a_loop() {
    use pklock::cluster::etcd::{Etcd as EtcdClient, Op};
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("token-end", &[]) else {
        return;
    };
    let host_port = etcd.endpoint().trim_start_matches("http://").to_string();
    let mut client = EtcdClient::new(vec![host_port], Duration::from_secs(5));
    let op = Op::Put {
        key: b"/pklock-test/leader.tokens".to_vec(),
        value: ((1u64 << 53) - 10).to_string().into_bytes(),
        lease: 0,
    };
    assert!(client.txn(&[], &[op]).expect("etcd answers").0);
    let cluster = Cluster::on_loopback("token-end", &etcd, 1);
    cluster.leader();
    std::thread::sleep(Duration::from_millis(500));
    let before = revision_of(&mut client);
    std::thread::sleep(Duration::from_secs(2));
    let writes = revision_of(&mut client) - before;
    // A leader renews and looks without writing; a reservation per loop
    // turn would be hundreds of writes a second.
    assert!(
        writes < 10,
        "{writes} etcd writes in 2 s from a leader at 2^53"
    );
}

#[test]
fn a_new_leader_waits_out_the_longer_grace_of_the_leader_before_it() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("longer-grace", &[]) else {
        return;
    };
    let mut cluster = Cluster::new("longer-grace");
    // The first leader's clients count on 8 s; the next would wait 1 s.
    for grace_ms in [8_000, 1_000] {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let config = format!(
            "listen = [\"{addr}\"]\nrestart_grace_ms = {grace_ms}\n{KEEPALIVE}[cluster]\n\
             etcd_endpoints = [\"{}\"]\nelection = \"/pklock-test/leader\"\nlease_ttl_ms = {}\n",
            etcd.endpoint(),
            LEASE_TTL.as_millis()
        );
        let dir = cluster.next_dir();
        cluster.add_configured(addr, dir, config, None);
        if cluster.members.len() == 1 {
            cluster.leader();
        }
    }
    assert_eq!(cluster.leader(), 0);
    cluster.members[0].kill();
    assert_eq!(cluster.leader(), 1);
    let hello = hello(cluster.members[1].addr).expect("the new leader answers");
    let resume_in = hello["grantsResumeInMs"].as_u64().unwrap_or(0);
    assert!(
        resume_in > 5_000,
        "the new leader grants again in {resume_in} ms, before the 8 s its predecessor's \
         clients count on: {hello}"
    );
}

#[test]
fn a_list_too_long_to_leave_in_etcd_is_not_left_and_the_next_leader_still_leads() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("long-list", &[]) else {
        return;
    };
    let mut cluster = Cluster::on_loopback("long-list", &etcd, 2);
    let leader = cluster.leader();
    let mut peer = Peer::connect(cluster.members[leader].addr);
    // 1,100 locks on 1,000-byte names: a list of over a megabyte.
    for i in 0..1_100u64 {
        peer.take(&format!("{i:0>1000}"), i);
    }
    let old = cluster.members[leader].process();
    old.signal("TERM");
    let line = old.wait_for_log("none is left");
    assert!(line.contains("over 1048576"), "{line}");
    assert_eq!(old.wait_exit(), Some(0), "the old leader's exit code");
    cluster.members[leader].process = None;
    let next = cluster.leader();
    assert_ne!(next, leader);
    let line = cluster.members[next]
        .process()
        .wait_for_log("the previous leader did not resign");
    assert!(line.contains("no lock is granted"), "{line}");
    drop(peer);
}

#[test]
fn with_etcd_auth_on_the_servers_log_in_and_a_wrong_password_leads_nothing() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("etcd-auth", &[]) else {
        return;
    };
    let endpoint = etcd.endpoint();
    let post = |path: &str, body: Value| {
        let mut response = ureq::post(format!("{endpoint}{path}"))
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let text = response.body_mut().read_to_string().unwrap_or_default();
        assert!(response.status().is_success(), "{path}: {text}");
    };
    // A root user (etcd needs one to enable auth) and a user for pklock
    // with rights on its election's keys only: /pklock-test up to /pklock-tesu.
    post(
        "/v3/auth/user/add",
        json!({"name": "root", "password": "root-secret"}),
    );
    post("/v3/auth/role/add", json!({"name": "root"}));
    post(
        "/v3/auth/user/grant",
        json!({"user": "root", "role": "root"}),
    );
    post(
        "/v3/auth/user/add",
        json!({"name": "pklock", "password": "pk-secret"}),
    );
    post("/v3/auth/role/add", json!({"name": "pklock"}));
    post(
        "/v3/auth/role/grant",
        json!({"name": "pklock", "perm": {"permType": "READWRITE",
            "key": "L3BrbG9jay10ZXN0", "range_end": "L3BrbG9jay10ZXN1"}}),
    );
    post(
        "/v3/auth/user/grant",
        json!({"user": "pklock", "role": "pklock"}),
    );
    post("/v3/auth/enable", json!({}));

    let mut cluster = Cluster::new("etcd-auth");
    for password in ["pk-secret", "wrong"] {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let dir = cluster.next_dir();
        let password_file = dir.join("etcd-password");
        std::fs::write(&password_file, format!("{password}\n")).expect("the password file");
        let config = format!(
            "listen = [\"{addr}\"]\n{KEEPALIVE}[cluster]\netcd_endpoints = [\"{endpoint}\"]\n\
             election = \"/pklock-test/leader\"\nlease_ttl_ms = {}\netcd_user = \"pklock\"\n\
             etcd_password_file = \"{}\"\n",
            LEASE_TTL.as_millis(),
            password_file.display()
        );
        cluster.add_configured(addr, dir, config, None);
    }
    let line = cluster.members[1]
        .process()
        .wait_for_log("etcd refused user pklock");
    assert!(line.contains("authentication failed"), "{line}");
    assert_eq!(cluster.leader_among(&[0]), 0);
    let token = Peer::connect(cluster.members[0].addr).take("x", 1);
    assert!(token > 0);
    // The server with the wrong password never leads, and names no leader
    // it could not have seen.
    let (role, leader) = role(cluster.members[1].addr).expect("it answers hello");
    assert_eq!((role.as_str(), leader), ("standby", Value::Null));

    // Turning auth off and on again voids every token etcd gave: the
    // leader's next call is refused, and it must log in again to go on.
    let mut response = ureq::post(format!("{endpoint}/v3/auth/authenticate"))
        .send(json!({"name": "root", "password": "root-secret"}).to_string())
        .expect("root logs in");
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let root: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let root_token = root["token"].as_str().unwrap_or_else(|| panic!("{text}"));
    let disabled = ureq::post(format!("{endpoint}/v3/auth/disable"))
        .header("authorization", root_token)
        .send("{}")
        .expect("auth disabled");
    assert!(disabled.status().is_success());
    post("/v3/auth/enable", json!({}));
    std::thread::sleep(LEASE_TTL * 2);
    assert_eq!(cluster.leader_among(&[0]), 0);
    let token_after = Peer::connect(cluster.members[0].addr).take("y", 2);
    assert!(token_after > token, "{token_after} after {token}");
    // Leaving the held list and resigning take calls etcd checks.
    let leader = cluster.members[0].process();
    leader.signal("TERM");
    let line = leader.wait_for_log("resign");
    assert!(line.contains("resigned the leadership in etcd"), "{line}");
}

/// A TCP proxy on loopback that passes on at once what goes to `to`, and
/// holds what comes back `delay` before passing it on: an etcd whose every
/// answer is late.
fn slow_proxy(to: SocketAddr, delay: Duration) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("a proxy port");
    let addr = listener.local_addr().expect("the proxy's address");
    // Each chunk is passed on `delay` after it came: a line with a latency,
    // not a queue of sleeps.
    let pass = move |mut from: TcpStream, mut into: TcpStream, delay: Duration| {
        let (chunks, arrived) = mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if chunks.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for (at, chunk) in arrived {
                std::thread::sleep((at + delay).saturating_duration_since(Instant::now()));
                if into.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = into.shutdown(std::net::Shutdown::Write);
        });
    };
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let (Ok(client_reader), Ok(server_reader)) = (client.try_clone(), server.try_clone())
            else {
                continue;
            };
            pass(client_reader, server, Duration::ZERO);
            pass(server_reader, client, delay);
        }
    });
    addr
}

#[test]
fn a_server_takes_the_leadership_and_keeps_it_while_etcd_answers_late() {
    let _turn = common::take_turn(&TURNS);
    let Some(etcd) = etcd_or_skip("slow-etcd", &[]) else {
        return;
    };
    let endpoint: SocketAddr = etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd's address");
    // Each etcd call takes over 250 ms: taking the leadership makes several
    // in a row, more than a 2 s lease lasts without a renewal.
    let proxy = slow_proxy(endpoint, Duration::from_millis(250));
    let mut cluster = Cluster::new("slow-etcd");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    cluster.add(addr, &format!("http://{proxy}"), "", None);
    cluster.members[0].process().wait_for_log("leading now");
    let mut holder = Peer::connect(addr);
    let token = holder.take("x", 1);
    // Held through several leases: the leader never stepped down.
    std::thread::sleep(LEASE_TTL * 3);
    let asked =
        holder.try_send(json!({"command": "lock", "id": 2, "parameters": {"lockName": "x"}}));
    let again = asked.then(|| holder.try_recv()).flatten();
    let Some(again) = again else {
        let log: Vec<String> = cluster.members[0].process().log.try_iter().collect();
        panic!(
            "the leader closed the holder's connection: it stepped down. Its log:\n{}",
            log.join("\n")
        );
    };
    assert_eq!(again["result"]["token"], token, "{again}");
    assert_eq!(role(addr).map(|(role, _)| role).as_deref(), Some("leader"));
}
