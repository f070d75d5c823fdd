//! Network addresses as users type and read them: IPv4 subnets in CIDR form and Ethernet MACs.
//!
//! Shared by the CLI (to refuse a typo before a round trip) and the control plane (which stores these types in
//! the cluster state and is the authority on every rule). Both types serialize as plain values (an address and a
//! prefix length; six bytes), so their stored form does not depend on the text form.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 subnet: a network address and a prefix length, such as `10.0.0.0/24`.
///
/// The fields are public so that a value can travel in a command unchecked; [`Ipv4Subnet::check`] says whether it
/// is well formed (prefix at most 32, no host bits set), and parsing applies the same check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ipv4Subnet {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

/// Why a subnet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("'{0}' is not a subnet: write it as ADDRESS/PREFIX, e.g. 10.0.0.0/24")]
    Malformed(String),
    #[error("prefix length {0} is out of range; use 0 to 32")]
    PrefixTooLong(u8),
    #[error("{address}/{prefix} has host bits set; the network address for /{prefix} is {network}")]
    HostBitsSet {
        address: Ipv4Addr,
        prefix: u8,
        network: Ipv4Addr,
    },
}

impl Ipv4Subnet {
    /// The netmask of `prefix` (at most 32) as a number.
    fn mask(prefix: u8) -> u32 {
        match prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    /// Whether the prefix is at most 32 and the address is the subnet's network address.
    pub fn check(&self) -> Result<(), SubnetError> {
        if self.prefix > 32 {
            return Err(SubnetError::PrefixTooLong(self.prefix));
        }
        let network = self.network();
        if network != self.address {
            return Err(SubnetError::HostBitsSet {
                address: self.address,
                prefix: self.prefix,
                network,
            });
        }
        Ok(())
    }

    /// The network address: the address with its host bits cleared.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & Self::mask(self.prefix))
    }

    /// The broadcast address: the address with every host bit set.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !Self::mask(self.prefix))
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = Self::mask(self.prefix);
        u32::from(ip) & mask == u32::from(self.address) & mask
    }

    /// Whether the subnet reserves its first and last addresses (network and broadcast): every prefix shorter
    /// than /31 does (RFC 3021 makes /31 two hosts; /32 is one).
    pub fn reserves_ends(&self) -> bool {
        self.prefix < 31
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = SubnetError;

    /// Parses `a.b.c.d/p`, refusing a missing prefix, a prefix above 32 and host bits set.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || SubnetError::Malformed(text.to_owned());
        let (address, prefix) = text.trim().split_once('/').ok_or_else(malformed)?;
        let address: Ipv4Addr = address.parse().map_err(|_| malformed())?;
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let prefix: u8 = prefix.parse().map_err(|_| malformed())?;
        let subnet = Ipv4Subnet { address, prefix };
        subnet.check()?;
        Ok(subnet)
    }
}

/// A 48-bit Ethernet MAC address, in wire order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct MacAddress(pub [u8; 6]);

/// A string that is not six colon-separated pairs of hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a MAC address; write six hex pairs such as 52:54:00:12:34:56")]
pub struct MacError(String);

impl MacAddress {
    /// The group bit (I/G) is set: broadcast or multicast, never one station's address.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// The U/L bit is set: assigned locally rather than by a vendor.
    pub const fn is_locally_administered(self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Whether it is all zeroes (never a valid station address).
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }

    /// A locally administered unicast address made from `random` bytes (the U/L bit set, the group bit
    /// cleared), as hypervisors generate for NICs without a configured MAC.
    pub fn local_unicast(mut random: [u8; 6]) -> Self {
        random[0] = (random[0] | 0x02) & !0x01;
        MacAddress(random)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddress({self})")
    }
}

impl FromStr for MacAddress {
    type Err = MacError;

    /// Parses `aa:bb:cc:dd:ee:ff` (either case; `-` also accepted as the separator).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || MacError(text.to_owned());
        let mut bytes = [0u8; 6];
        let mut parts = text.split([':', '-']);
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(error());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddress(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(text: &str) -> Ipv4Subnet {
        text.parse().unwrap()
    }

    #[test]
    fn subnets_parse_and_print_back() {
        for text in [
            "10.0.0.0/24",
            "0.0.0.0/0",
            "192.168.1.128/25",
            "10.1.2.3/32",
            "10.0.0.0/8",
        ] {
            assert_eq!(subnet(text).to_string(), text);
        }
    }

    #[test]
    fn malformed_subnets_say_why() {
        for bad in [
            "10.0.0.0",
            "10.0.0/24",
            "10.0.0.0/",
            "10.0.0.0/+4",
            "x/24",
            "10.0.0.0/24/1",
            "10.0.0.0/1000",
        ] {
            assert_eq!(
                bad.parse::<Ipv4Subnet>().unwrap_err().to_string(),
                format!("'{bad}' is not a subnet: write it as ADDRESS/PREFIX, e.g. 10.0.0.0/24")
            );
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Ipv4Subnet>().unwrap_err().to_string(),
            "prefix length 33 is out of range; use 0 to 32"
        );
        assert_eq!(
            "10.0.0.1/24".parse::<Ipv4Subnet>().unwrap_err().to_string(),
            "10.0.0.1/24 has host bits set; the network address for /24 is 10.0.0.0"
        );
    }

    #[test]
    fn subnet_membership_and_ends() {
        let s = subnet("10.0.0.0/24");
        assert!(s.contains(Ipv4Addr::new(10, 0, 0, 7)));
        assert!(!s.contains(Ipv4Addr::new(10, 0, 1, 7)));
        assert_eq!(s.network(), Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert!(s.reserves_ends());
        assert!(!subnet("10.0.0.0/31").reserves_ends());
        let all = subnet("0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 9)));
        assert_eq!(all.broadcast(), Ipv4Addr::BROADCAST);
        let host = subnet("10.1.2.3/32");
        assert!(host.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!host.contains(Ipv4Addr::new(10, 1, 2, 4)));
    }

    #[test]
    fn macs_parse_print_and_classify() {
        let mac: MacAddress = "52:54:00:AB:cd:0e".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0e");
        assert_eq!("52-54-00-ab-cd-0e".parse::<MacAddress>().unwrap(), mac);
        assert!(!mac.is_multicast());
        assert!(mac.is_locally_administered());
        assert!(
            "01:00:5e:00:00:01"
                .parse::<MacAddress>()
                .unwrap()
                .is_multicast()
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0e:01",
            "5:54:00:ab:cd:0e",
            "zz:54:00:ab:cd:0e",
        ] {
            assert_eq!(
                bad.parse::<MacAddress>().unwrap_err().to_string(),
                format!(
                    "'{bad}' is not a MAC address; write six hex pairs such as 52:54:00:12:34:56"
                )
            );
        }
    }

    #[test]
    fn generated_macs_are_local_unicast() {
        for random in [[0xff; 6], [0; 6], [0x01, 2, 3, 4, 5, 6]] {
            let mac = MacAddress::local_unicast(random);
            assert!(
                mac.is_locally_administered() && !mac.is_multicast(),
                "{mac}"
            );
            assert_eq!(mac.0[1..], random[1..]);
        }
    }

    proptest::proptest! {
        #[test]
        fn every_valid_subnet_prints_and_parses_back(address: u32, prefix in 0u8..=32) {
            let network = Ipv4Subnet { address: Ipv4Addr::from(address), prefix }.network();
            let subnet = Ipv4Subnet { address: network, prefix };
            proptest::prop_assert_eq!(subnet.to_string().parse::<Ipv4Subnet>(), Ok(subnet));
            proptest::prop_assert!(subnet.contains(network) && subnet.contains(subnet.broadcast()));
        }

        #[test]
        fn every_mac_prints_and_parses_back(bytes: [u8; 6]) {
            let mac = MacAddress(bytes);
            proptest::prop_assert_eq!(mac.to_string().parse::<MacAddress>(), Ok(mac));
        }

        #[test]
        fn parsers_refuse_garbage_without_panicking(text in "\\PC{0,24}") {
            let _ = text.parse::<Ipv4Subnet>();
            let _ = text.parse::<MacAddress>();
        }
    }
}
