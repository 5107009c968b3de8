//! Which resolved addresses a CONNECT tunnel may reach.
//!
//! A forward proxy that tunnels anywhere lets whoever reaches it probe the networks behind it
//! (loopback admin ports, cloud metadata at 169.254.169.254, the office LAN). Tunnels therefore
//! go only to globally routable unicast addresses, unless an operator lists a range in
//! `proxy.allowed_private_cidrs`. The check runs on every *resolved* address, and the tunnel
//! connects to exactly the address that passed, so DNS cannot swap in another one in between.
//!
//! Not here: resolution and connecting (`tunnel`), or the addresses of MITM hosts (`governed`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use crate::cidr::Cidr;

/// IPv4 ranges that are not globally routable unicast (IANA special-purpose registry).
const RESERVED_V4: &[Cidr] = &[
    Cidr::v4(0, 0, 0, 0, 8),       // "this network", unspecified
    Cidr::v4(10, 0, 0, 0, 8),      // private
    Cidr::v4(100, 64, 0, 0, 10),   // carrier-grade NAT
    Cidr::v4(127, 0, 0, 0, 8),     // loopback
    Cidr::v4(169, 254, 0, 0, 16),  // link-local (cloud metadata lives here)
    Cidr::v4(172, 16, 0, 0, 12),   // private
    Cidr::v4(192, 0, 0, 0, 24),    // IETF protocol assignments
    Cidr::v4(192, 0, 2, 0, 24),    // documentation
    Cidr::v4(192, 88, 99, 0, 24),  // 6to4 relay anycast
    Cidr::v4(192, 168, 0, 0, 16),  // private
    Cidr::v4(198, 18, 0, 0, 15),   // benchmarking
    Cidr::v4(198, 51, 100, 0, 24), // documentation
    Cidr::v4(203, 0, 113, 0, 24),  // documentation
    Cidr::v4(224, 0, 0, 0, 4),     // multicast
    Cidr::v4(240, 0, 0, 0, 4),     // reserved, broadcast
];

/// IPv6 ranges that are not globally routable unicast. Addresses that embed an IPv4 address
/// (mapped, NAT64, 6to4) are judged by that address instead.
const RESERVED_V6: &[Cidr] = &[
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96), // unspecified, loopback, v4-compatible
    Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), // local-use NAT64
    Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), // discard
    Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), // IETF protocol assignments, Teredo
    Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    Cidr::v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), // documentation
    Cidr::v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), // segment routing SIDs
    Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), // unique local
    Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), // link-local
    Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), // site-local (deprecated)
    Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), // multicast
];

const V4_MAPPED: Cidr = Cidr::v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96);
const NAT64: Cidr = Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
const SIX_TO_FOUR: Cidr = Cidr::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// The IPv4 address an IPv6 address stands for, if it embeds one.
pub(crate) fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let v6 = IpAddr::V6(ip);
    if V4_MAPPED.contains(v6) || NAT64.contains(v6) {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if SIX_TO_FOUR.contains(v6) {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

/// True for addresses outside the global unicast space (see the module docs).
pub fn is_reserved(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => RESERVED_V4.iter().any(|c| c.contains(IpAddr::V4(v4))),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_reserved(IpAddr::V4(v4)),
            None => RESERVED_V6.iter().any(|c| c.contains(IpAddr::V6(v6))),
        },
    }
}

/// The tunnel destination rule: global unicast, or reserved but listed by the operator.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    allowed: Vec<Cidr>,
}

impl DestinationPolicy {
    pub fn new(allowed: Vec<Cidr>) -> DestinationPolicy {
        DestinationPolicy { allowed }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        if !is_reserved(ip) {
            return true;
        }
        let listed = |ip: IpAddr| self.allowed.iter().any(|c| c.contains(ip));
        listed(ip)
            || match ip {
                // ::ffff:10.0.0.1 is allowed by a listed 10.0.0.0/8 (and vice versa below).
                IpAddr::V6(v6) => embedded_v4(v6).is_some_and(|v4| listed(IpAddr::V4(v4))),
                IpAddr::V4(v4) => listed(IpAddr::V6(v4.to_ipv6_mapped())),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_ranges_are_recognised_in_both_families() {
        for s in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.168.1.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:0101::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(is_reserved(ip(s)), "{s} should be reserved");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!is_reserved(ip(s)), "{s} should be public");
        }
    }

    #[test]
    fn listed_ranges_open_reserved_addresses_only() {
        let policy = DestinationPolicy::new(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!(!policy.permits(ip("::1")));
        assert!(policy.permits(ip("8.8.8.8")));
        assert!(!DestinationPolicy::default().permits(ip("10.0.0.1")));
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "192.168.1.7".parse::<Cidr>().unwrap().to_string(),
            "192.168.1.7/32"
        );
        let err = "10.1.0.0/8".parse::<Cidr>().unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        let c: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(c.contains(ip("172.31.1.1")));
        assert!(!c.contains(ip("172.32.0.0")));
        assert!(!c.contains(ip("::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("9.9.9.9")));
    }
}
