//! Conversions between wire addresses and `std::net`/`ipnet` types.
//!
//! The wire carries addresses as raw octets (4 or 16 bytes) and CIDRs as
//! octets plus a prefix length; anything else is an [`AddressError`], never a
//! panic, because frames come from the network.

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
