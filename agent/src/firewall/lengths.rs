//! How many ranges of each prefix length a set holds, per address family:
//! the index that lets the reconciler prove a change touches only its own
//! range (no held range inside it or around it) without scanning the set.

use ipnet::IpNet;

/// Counts of ranges by (family, prefix length).
#[derive(Clone)]
pub struct PrefixLengths(Box<[[u32; 129]; 2]>);

impl Default for PrefixLengths {
    fn default() -> Self {
        Self(Box::new([[0; 129]; 2]))
    }
}

impl std::fmt::Debug for PrefixLengths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = |family: &[u32; 129]| family.iter().map(|n| u64::from(*n)).sum::<u64>();
        f.debug_struct("PrefixLengths").field("v4", &held(&self.0[0])).field("v6", &held(&self.0[1])).finish()
    }
}

impl PrefixLengths {
    /// The counts of `nets`.
    pub fn of<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut lengths = Self::default();
        for net in nets {
            lengths.add(*net);
        }
        lengths
    }

    /// One more range like `net`.
    pub fn add(&mut self, net: IpNet) {
        let count = self.slot(net);
        *count = count.saturating_add(1);
    }

    /// One range like `net` fewer (never below zero).
    pub fn remove(&mut self, net: IpNet) {
        let count = self.slot(net);
        *count = count.saturating_sub(1);
    }

    /// The counts of `net`'s family, indexed by prefix length.
    pub fn family(&self, net: IpNet) -> &[u32; 129] {
        &self.0[usize::from(net.addr().is_ipv6())]
    }

    fn slot(&mut self, net: IpNet) -> &mut u32 {
        &mut self.0[usize::from(net.addr().is_ipv6())][usize::from(net.prefix_len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_family_and_length() {
        let nets: Vec<IpNet> = ["192.0.2.0/24", "198.51.100.0/24", "192.0.2.7/32", "2001:db8::/64"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut lengths = PrefixLengths::of(&nets);
        let v4: IpNet = "203.0.113.0/24".parse().unwrap();
        let v6: IpNet = "2001:db8:1::/48".parse().unwrap();
        assert_eq!(lengths.family(v4)[24], 2);
        assert_eq!(lengths.family(v4)[32], 1);
        assert_eq!(lengths.family(v6)[64], 1);
        assert_eq!(lengths.family(v6)[24], 0, "families are apart");
        lengths.remove(nets[0]);
        lengths.remove(nets[0]);
        lengths.remove(nets[0]);
        assert_eq!(lengths.family(v4)[24], 0, "never below zero");
        lengths.add(v6);
        assert_eq!(lengths.family(v6)[48], 1);
    }
}
