//! Which peer addresses may connect: single IPs and CIDR ranges, IPv4 and IPv6.
//! Matching only; the server decides what to do with a peer outside.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::{self, Deserialize, Deserializer};

/// A set of IP addresses and ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<IpNet>,
}

impl AllowList {
    /// Parses entries such as `127.0.0.1`, `::1`, `10.0.0.0/8`, `fd00::/8`.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        if entries.is_empty() {
            return Err("the list is empty, so no peer could connect; \
                 to allow every address write [\"0.0.0.0/0\", \"::/0\"]"
                .to_string());
        }
        let nets = entries
            .iter()
            .map(|entry| parse_entry(entry.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { nets })
    }

    /// Whether `ip` may connect. An IPv4 peer seen through an IPv6 socket
    /// (`::ffff:a.b.c.d`) is matched as the IPv4 address it is.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match net.prefix_len() == net.max_prefix_len() {
                true => write!(f, "{}", net.addr())?,
                false => write!(f, "{net}")?,
            }
        }
        Ok(())
    }
}

fn parse_entry(entry: &str) -> Result<IpNet, String> {
    let trimmed = entry.trim();
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net = trimmed.parse::<IpNet>().map_err(|_| {
        format!("`{entry}` is not an IP address or a CIDR range such as 10.0.0.0/8 or fd00::/8")
    })?;
    Ok(ipv4_of_mapped(net).unwrap_or(net).trunc())
}

/// An IPv4-mapped range (`::ffff:a.b.c.d/(96+n)`) as the IPv4 range it
/// names, since peers are matched by their IPv4 address; `None` for any
/// other range.
fn ipv4_of_mapped(net: IpNet) -> Option<IpNet> {
    let IpNet::V6(v6) = net else {
        return None;
    };
    let v4 = v6.addr().to_ipv4_mapped()?;
    let prefix = v6.prefix_len().checked_sub(96)?;
    ipnet::Ipv4Net::new(v4, prefix).ok().map(IpNet::V4)
}

impl<'de> Deserialize<'de> for AllowList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        AllowList::parse(&entries).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn single_addresses_and_ranges_match() {
        let list = AllowList::parse(&["127.0.0.1", "10.1.0.0/16", "::1", "fd00::/8"]).unwrap();
        assert!(list.permits(ip("127.0.0.1")));
        assert!(!list.permits(ip("127.0.0.2")));
        assert!(list.permits(ip("10.1.200.3")));
        assert!(!list.permits(ip("10.2.0.1")));
        assert!(list.permits(ip("::1")));
        assert!(list.permits(ip("fd12:3456::9")));
        assert!(!list.permits(ip("fe80::1")));
    }

    #[test]
    fn ipv4_mapped_peers_match_their_ipv4_entry() {
        let list = AllowList::parse(&["127.0.0.1"]).unwrap();
        assert!(list.permits(ip("::ffff:127.0.0.1")));
        let list = AllowList::parse(&["::ffff:192.168.1.5"]).unwrap();
        assert!(list.permits(ip("192.168.1.5")));
    }

    #[test]
    fn ipv4_mapped_ranges_match_their_ipv4_members() {
        let list = AllowList::parse(&["::ffff:127.0.0.0/104"]).unwrap();
        assert!(list.permits(ip("127.0.0.1")));
        assert!(list.permits(ip("::ffff:127.9.9.9")));
        assert!(!list.permits(ip("128.0.0.1")));
        assert_eq!(list.to_string(), "127.0.0.0/8");
        // Shorter than the mapped prefix: an IPv6 range like any other.
        let list = AllowList::parse(&["::ffff:0:0/95"]).unwrap();
        assert!(!list.permits(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_and_empty_lists_are_refused_with_the_entry_named() {
        let err = AllowList::parse(&["127.0.0.1", "10.0.0/8"]).unwrap_err();
        assert!(err.contains("`10.0.0/8`"), "{err}");
        assert!(AllowList::parse::<&str>(&[]).unwrap_err().contains("empty"));
        assert!(AllowList::parse(&["localhost"]).is_err());
    }

    #[test]
    fn display_lists_entries() {
        let list = AllowList::parse(&["127.0.0.1", "10.0.0.0/8"]).unwrap();
        assert_eq!(list.to_string(), "127.0.0.1, 10.0.0.0/8");
    }
}
