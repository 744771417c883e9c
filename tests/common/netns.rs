//! A network namespace joined to the root one by a veth pair, for tests
//! that need a peer address other than loopback or a network to cut. Needs
//! root, `ip` (iproute2) and `iptables`; without them the test is skipped
//! (a failure under `PKLOCK_REQUIRE_ALL=1`).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A network namespace joined to the root one by a veth pair; removed on drop.
pub struct Netns {
    pub name: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id() % 100_000;
        let name = format!("pklock-{id}-{n}");
        let (a, b) = (format!("pk{id}x{n}a"), format!("pk{id}x{n}b"));
        let net = [10, 200 + (n % 50) as u8, (id % 250) as u8];
        let host_ip = Ipv4Addr::new(net[0], net[1], net[2], 1);
        let ns_ip = Ipv4Addr::new(net[0], net[1], net[2], 2);
        run("ip", &["netns", "add", &name])?;
        let netns = Netns {
            name,
            host_ip,
            ns_ip,
        };
        let ns = netns.name.as_str();
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        )?;
        run("ip", &["link", "set", &b, "netns", ns])?;
        run("ip", &["addr", "add", &format!("{host_ip}/24"), "dev", &a])?;
        run("ip", &["link", "set", &a, "up"])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "ip",
                "addr",
                "add",
                &format!("{ns_ip}/24"),
                "dev",
                &b,
            ],
        )?;
        run("ip", &["netns", "exec", ns, "ip", "link", "set", &b, "up"])?;
        run(
            "ip",
            &["netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        )?;
        // Start with everything allowed, so that healing restores this state.
        netns.set_policy("ACCEPT")?;
        Ok(netns)
    }

    /// `program` to be run inside the namespace (by `ip netns exec`, which
    /// execs it: the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Drops (or accepts) every packet in and out of the namespace, in one
    /// atomic ruleset.
    pub fn set_policy(&self, policy: &str) -> Result<(), String> {
        self.restore(&format!(
            "*filter\n:INPUT {policy} [0:0]\n:FORWARD {policy} [0:0]\n:OUTPUT {policy} [0:0]\nCOMMIT\n"
        ))
    }

    /// Drops only the namespace's TCP traffic with `ip:port` (both
    /// directions, in one atomic ruleset), leaving everything else through;
    /// [`Netns::heal`] lifts it.
    pub fn cut_port(&self, ip: Ipv4Addr, port: u16) {
        self.restore(&format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -p tcp -d {ip} --dport {port} -j DROP\n\
             -A INPUT -p tcp -s {ip} --sport {port} -j DROP\nCOMMIT\n"
        ))
        .expect("cut the traffic to one port");
    }

    /// Replaces the namespace's filter table with `rules` (iptables-save format).
    fn restore(&self, rules: &str) -> Result<(), String> {
        let mut child = self
            .command("iptables-restore")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("iptables-restore: {e}"))?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(rules.as_bytes())
            .map_err(|e| e.to_string())?;
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "iptables-restore: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    pub fn partition(&self) {
        self.set_policy("DROP").expect("cut the network");
    }

    pub fn heal(&self) {
        self.set_policy("ACCEPT").expect("heal the network");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A namespace, or the reason there is none (then the test is skipped).
pub fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::create() {
        Ok(netns) => Some(netns),
        Err(why) => {
            super::skip(
                test,
                &format!("cannot make a network namespace (needs root, ip and iptables): {why}"),
            );
            None
        }
    }
}

/// A server process listening on the namespace's side of the veth pair
/// (`remote`, for clients in the namespace) and on loopback (`local`),
/// allowing both; `extra` is added to its config.
pub fn server_for(
    netns: &Netns,
    dir: &std::path::Path,
    extra: &str,
) -> (
    super::ServerProcess,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let config = format!(
        "listen = [\"{}:0\", \"127.0.0.1:0\"]\nallowed = [\"{}\", \"127.0.0.1\"]\nrestart_grace_ms = 0\n{extra}",
        netns.host_ip, netns.ns_ip
    );
    let mut server = super::ServerProcess::start(dir, &config);
    let remote = server.addr;
    let line = server.wait_for_log("listening on 127.0.0.1:");
    let local = line
        .rsplit("listening on ")
        .next()
        .and_then(|addr| addr.trim().parse().ok())
        .expect("the loopback address in the log");
    (server, remote, local)
}
