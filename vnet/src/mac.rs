//! Ethernet MAC addresses. The text form (display and parsing) is `vessel_proto::net::MacAddress`'s, the one the
//! CLI and the cluster state use.

use std::fmt;
use std::str::FromStr;

use vessel_proto::net::MacAddress;

/// A 48-bit Ethernet MAC address, in wire order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// 00:00:00:00:00:00: never a valid source.
    pub const ZERO: Mac = Mac([0; 6]);

    /// The group bit (I/G) is set: broadcast or multicast, never a single station.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// A single station's address: what a frame's source must be.
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && self != Self::ZERO
    }

    /// The U/L bit is set: assigned locally (as Vessel does for ports without --mac) rather than
    /// by a vendor.
    pub const fn is_locally_administered(self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl From<[u8; 6]> for Mac {
    fn from(bytes: [u8; 6]) -> Self {
        Mac(bytes)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        MacAddress(self.0).fmt(f)
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// A string that is not six colon-separated pairs of hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a MAC address (expected six hex pairs such as 52:54:00:12:34:56)")]
pub struct ParseMacError(String);

impl FromStr for Mac {
    type Err = ParseMacError;

    /// Parses `aa:bb:cc:dd:ee:ff` (either case; `-` also accepted as the separator).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse::<MacAddress>()
            .map(|mac| Mac(mac.0))
            .map_err(|_| ParseMacError(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn displays_and_parses_the_usual_form() {
        let mac = Mac([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52:54:00:AB:cd:0f".parse::<Mac>(), Ok(mac));
        assert_eq!("52-54-00-ab-cd-0f".parse::<Mac>(), Ok(mac));
        assert_eq!(format!("{mac:?}"), "Mac(52:54:00:ab:cd:0f)");
    }

    #[test]
    fn refuses_anything_else() {
        for text in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52:54:00:ab:cd:0",
            "52:54:00:ab:cd:0g",
            "525:4:00:ab:cd:0f",
            "+5:54:00:ab:cd:0f",
            "52:54:00:ab:cd:0f:",
        ] {
            let error = text.parse::<Mac>().unwrap_err();
            assert!(error.to_string().contains(&format!("'{text}'")), "{error}");
        }
    }

    #[test]
    fn classifies_group_and_station_addresses() {
        assert!(Mac::BROADCAST.is_broadcast());
        assert!(Mac::BROADCAST.is_multicast());
        let ipv4_multicast: Mac = "01:00:5e:00:00:fb".parse().unwrap();
        assert!(ipv4_multicast.is_multicast() && !ipv4_multicast.is_broadcast());
        let ipv6_multicast: Mac = "33:33:00:00:00:01".parse().unwrap();
        assert!(ipv6_multicast.is_multicast());
        let station: Mac = "52:54:00:12:34:56".parse().unwrap();
        assert!(station.is_unicast() && !station.is_multicast());
        // QEMU's 52:54:00 prefix is a locally administered one; a vendor's OUI is not.
        assert!(station.is_locally_administered());
        assert!(
            !"00:1b:21:00:00:01"
                .parse::<Mac>()
                .unwrap()
                .is_locally_administered()
        );
        assert!(!Mac::ZERO.is_unicast());
    }

    proptest! {
        #[test]
        fn display_round_trips(bytes: [u8; 6]) {
            let mac = Mac(bytes);
            prop_assert_eq!(mac.to_string().parse::<Mac>(), Ok(mac));
        }
    }
}
