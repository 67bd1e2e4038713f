//! Conversions between wire addresses and `std::net`/`ipnet` types.
//!
//! The wire carries addresses as raw octets (4 or 16 bytes) and CIDRs as
//! octets plus a prefix length; anything else is an [`AddressError`], never a
//! panic, because frames come from the network.
//!
//! [`canonical_ip`] and [`canonical_net`] are the one normalisation of
//! addresses: an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) or a range
//! inside `::ffff:0:0/96` is the IPv4 address or range it maps. Every policy
//! check (never-block, loopback, allowlist, minimum prefix) sees addresses in
//! this form, so the mapped spelling cannot slip past a check written for
//! IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::v1::{Cidr, IpAddress};

/// A wire address or range that does not describe a valid IP address or CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The octet string is neither 4 nor 16 bytes long.
    #[error("address has {0} octets, expected 4 or 16")]
    Length(usize),
    /// The CIDR has no address.
    #[error("CIDR has no address")]
    MissingAddress,
    /// The prefix length exceeds the family's width.
    #[error("prefix length /{0} is too long for the address family")]
    PrefixLength(u32),
    /// The address has bits set beyond the prefix.
    #[error("{0} has host bits set")]
    HostBits(IpNet),
}

/// The canonical form of an address: IPv4-mapped IPv6 (`::ffff:a.b.c.d`)
/// becomes the IPv4 address; everything else is unchanged.
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// The canonical form of a range: host bits cleared, and a range inside
/// `::ffff:0:0/96` (prefix length 96 or longer) becomes the IPv4 range it
/// maps (`::ffff:0.0.0.0/96` is `0.0.0.0/0`, all of IPv4). A shorter IPv6
/// prefix that merely contains the mapped space stays IPv6.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_or(net.trunc(), |n| n.trunc());
    }
    net.trunc()
}

impl From<IpAddr> for IpAddress {
    fn from(addr: IpAddr) -> Self {
        let octets = match addr {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        IpAddress { octets }
    }
}

impl TryFrom<&IpAddress> for IpAddr {
    type Error = AddressError;

    fn try_from(addr: &IpAddress) -> Result<Self, Self::Error> {
        match addr.octets.len() {
            4 => {
                let mut o = [0u8; 4];
                o.copy_from_slice(&addr.octets);
                Ok(IpAddr::V4(Ipv4Addr::from(o)))
            }
            16 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&addr.octets);
                Ok(IpAddr::V6(Ipv6Addr::from(o)))
            }
            n => Err(AddressError::Length(n)),
        }
    }
}

impl From<IpNet> for Cidr {
    fn from(net: IpNet) -> Self {
        Cidr { address: Some(net.network().into()), prefix_len: u32::from(net.prefix_len()) }
    }
}

impl TryFrom<&Cidr> for IpNet {
    type Error = AddressError;

    /// Converts a wire CIDR, refusing host bits so that two spellings of the
    /// same range can never be stored as two blocks.
    fn try_from(cidr: &Cidr) -> Result<Self, Self::Error> {
        let addr = IpAddr::try_from(cidr.address.as_ref().ok_or(AddressError::MissingAddress)?)?;
        let len = u8::try_from(cidr.prefix_len).map_err(|_| AddressError::PrefixLength(cidr.prefix_len))?;
        let net = IpNet::new(addr, len).map_err(|_| AddressError::PrefixLength(cidr.prefix_len))?;
        if net.network() != addr {
            return Err(AddressError::HostBits(net));
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_addresses_and_ranges_become_ipv4() {
        assert_eq!(canonical_ip("::ffff:127.0.0.1".parse().unwrap()), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(canonical_ip("2001:db8::1".parse().unwrap()), "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(canonical_ip("192.0.2.1".parse().unwrap()), "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(canonical_net(net("::ffff:127.0.0.1/128")), net("127.0.0.1/32"));
        assert_eq!(canonical_net(net("::ffff:0.0.0.0/96")), net("0.0.0.0/0"));
        assert_eq!(canonical_net(net("::ffff:192.0.2.77/120")), net("192.0.2.0/24"), "host bits cleared");
        assert_eq!(canonical_net(net("::ffff:0:0/95")), net("::fffe:0:0/95"), "broader than the mapped space");
        assert_eq!(canonical_net(net("2001:db8::7/64")), net("2001:db8::/64"));
        assert_eq!(canonical_net(net("198.51.100.9/24")), net("198.51.100.0/24"));
        // The IPv4-compatible (deprecated) form is not mapped.
        assert_eq!(canonical_net(net("::127.0.0.1/128")), net("::127.0.0.1/128"));
    }

    #[test]
    fn address_round_trip_and_bad_lengths() {
        for s in ["192.0.2.1", "2001:db8::1", "::"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(IpAddr::try_from(&IpAddress::from(ip)).unwrap(), ip);
        }
        for n in [0, 3, 5, 15, 17] {
            let bad = IpAddress { octets: vec![1; n] };
            assert_eq!(IpAddr::try_from(&bad), Err(AddressError::Length(n)));
        }
    }

    #[test]
    fn cidr_round_trip_and_rejections() {
        for s in ["192.0.2.0/24", "2001:db8:bad::/64", "198.51.100.7/32", "0.0.0.0/0"] {
            let net: IpNet = s.parse().unwrap();
            assert_eq!(IpNet::try_from(&Cidr::from(net)).unwrap(), net);
        }
        let host_bits = Cidr { address: Some("192.0.2.1".parse::<IpAddr>().unwrap().into()), prefix_len: 24 };
        assert!(matches!(IpNet::try_from(&host_bits), Err(AddressError::HostBits(_))));
        let too_long = Cidr { address: Some("192.0.2.1".parse::<IpAddr>().unwrap().into()), prefix_len: 33 };
        assert_eq!(IpNet::try_from(&too_long), Err(AddressError::PrefixLength(33)));
        let none = Cidr { address: None, prefix_len: 8 };
        assert_eq!(IpNet::try_from(&none), Err(AddressError::MissingAddress));
    }
}
