//! Which client addresses may use a server: the `--allow` list that the NFS front, the
//! portmapper, NBD and iSCSI check at accept (or, for UDP, per datagram).
//!
//! Owns: parsing CIDRs and single addresses, and matching an address (an IPv4-mapped IPv6
//! address matches as the IPv4 address it carries).
//! Must not: know any protocol, or decide what an allowed client may do once connected.

use std::net::IpAddr;

/// Which client addresses may use the server.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<ipnet::IpNet>);

impl AllowList {
    /// Loopback only: 127.0.0.0/8 and ::1.
    pub fn loopback() -> Self {
        AllowList(vec![
            "127.0.0.0/8"
                .parse()
                .unwrap_or_else(|_| unreachable!("constant")),
            "::1/128"
                .parse()
                .unwrap_or_else(|_| unreachable!("constant")),
        ])
    }

    /// Parses CIDRs (`10.0.0.0/8`) or single addresses.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut nets = Vec::new();
        for s in items {
            let net = s
                .parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{s:?} is not an address or CIDR such as 10.1.0.0/16"))?;
            nets.push(net);
        }
        Ok(AllowList(nets))
    }

    /// Whether every address of `net` is allowed (a mount's own `--allow` entry, say).
    pub fn covers(&self, net: &ipnet::IpNet) -> bool {
        self.0.iter().any(|n| n.contains(net))
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

impl std::fmt::Display for AllowList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(|n| n.to_string()).collect();
        f.write_str(&list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_cidrs_and_mapped_addresses() {
        let l = AllowList::loopback();
        assert!(l.allows("127.0.0.1".parse().unwrap()));
        assert!(l.allows("127.8.9.1".parse().unwrap()));
        assert!(l.allows("::1".parse().unwrap()));
        assert!(l.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!l.allows("10.0.0.1".parse().unwrap()));
        let l = AllowList::parse(&["10.1.0.0/16".into(), "192.0.2.7".into()]).unwrap();
        assert!(l.allows("10.1.2.3".parse().unwrap()));
        assert!(l.allows("192.0.2.7".parse().unwrap()));
        assert!(!l.allows("192.0.2.8".parse().unwrap()));
        assert!(AllowList::parse(&["10.0.0.0/33".into()]).is_err());
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        assert!(l.covers(&net("10.1.4.0/24")));
        assert!(l.covers(&net("192.0.2.7/32")));
        assert!(!l.covers(&net("10.0.0.0/8")));
        assert!(!l.covers(&net("192.0.2.8/32")));
        assert_eq!(l.to_string(), "10.1.0.0/16, 192.0.2.7/32");
    }
}
