//! Address ranges in CIDR notation: `--trusted-proxy` and access-list
//! rules. Its own module because both the proxy and the access lists
//! ([`crate::access`]) read them, and neither should depend on the other
//! for it.

use std::net::IpAddr;

/// An address range in CIDR notation, for `--trusted-proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// The range with its host bits cleared (`10.1.2.3/8` → `10.0.0.0/8`),
    /// the form access lists store.
    pub fn network(&self) -> Cidr {
        let (start, _) = self.range();
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4((start as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(start.into()),
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// First and last address, as numbers of the range's own family (an
    /// IPv4 range's are below 2^32): what access lists sort and search.
    pub fn range(&self) -> (u128, u128) {
        let (bits, value) = match self.addr {
            IpAddr::V4(v4) => (32, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (128, u128::from(v6)),
        };
        let host_bits = bits - u32::from(self.prefix);
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        (value & !host_mask, value | host_mask)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}
