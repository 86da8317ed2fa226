//! Names and address blocks, each with its one rule.
//!
//! A value of these types has passed its rule: serde, config validation and
//! request handling all build them through the same `FromStr`, so flaps,
//! flyd and the proxy cannot disagree on what an app name, a region, a
//! machine id or an address block is.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A value that does not follow its type's rule; its `Display` says the
/// rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {rule}")]
pub struct InvalidName {
    /// What was given.
    pub value: String,
    /// What was expected, as a phrase ("an app name (...)").
    pub rule: &'static str,
}

/// Whether `label` is a DNS label as Hangar writes them: 1-63 lowercase
/// letters, digits and dashes, starting and ending with a letter or digit.
pub fn dns_label(label: &str) -> bool {
    let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    (1..=63).contains(&label.len())
        && label.as_bytes().iter().all(ok)
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Whether `name` is a DNS name of [`dns_label`]s, at most 253 bytes.
pub fn dns_name(name: &str) -> bool {
    (1..=253).contains(&name.len()) && name.split('.').all(dns_label)
}

/// A string newtype whose values all pass `$valid`: parsed (and
/// deserialized) only through it, shown and serialized as the string.
macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $valid:path, $rule:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The rule, as a phrase for error messages.
            pub const RULE: &'static str = $rule;

            /// Whether `text` follows the rule, without making a value.
            pub fn valid(text: &str) -> bool {
                $valid(text)
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                if $valid(&value) {
                    Ok(Self(value))
                } else {
                    Err(InvalidName {
                        value,
                        rule: Self::RULE,
                    })
                }
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::try_from(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_name!(
    /// An app's name. It is a DNS label (`<app>.localhost`,
    /// `<app>.flycast`, `<app>.internal`): flaps creates only such names and
    /// the proxy routes only to them.
    AppName,
    dns_label,
    "an app name (1-63 characters of a-z, 0-9 and -, not starting or ending with -)"
);

checked_name!(
    /// A region's name (`ord`, `dev`). It is a DNS label, since it ends up
    /// in names (`<region>.<app>.internal`), header values (`Fly-Region`)
    /// and metric labels.
    Region,
    dns_label,
    "a region name (1-63 characters of a-z, 0-9 and -, not starting or ending with -)"
);

checked_name!(
    /// A machine's id: 14 lowercase hex digits, as Fly's are and as flyd
    /// makes them.
    MachineId,
    machine_id,
    "a machine id (14 characters of 0-9 and a-f)"
);

fn machine_id(id: &str) -> bool {
    id.len() == 14 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A block of IPv4 addresses in CIDR notation (`127.10.0.0/16`), between
/// /8 and /30 so that it has usable addresses and no more than a host can
/// manage. The base is the block's own (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AddrBlock {
    base: Ipv4Addr,
    prefix: u8,
}

impl AddrBlock {
    /// The rule, as a phrase for error messages.
    pub const RULE: &'static str =
        "an IPv4 CIDR block between /8 and /30 (such as \"127.10.0.0/16\")";

    /// The block's first address.
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// The usable addresses, as numbers: all but the block's first
    /// (network) and last (broadcast).
    pub fn hosts(&self) -> std::ops::RangeInclusive<u32> {
        let base = u32::from(self.base);
        let size = 1u64 << (32 - u32::from(self.prefix));
        base + 1..=(u64::from(base) + size - 2) as u32
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.base)
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &AddrBlock) -> bool {
        self.contains(other.base) || other.contains(self.base)
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl FromStr for AddrBlock {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        let invalid = || InvalidName {
            value: s.to_string(),
            rule: Self::RULE,
        };
        let (ip, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| invalid())?;
        // `u8::from_str` alone would accept a leading `+`.
        let prefix: u8 = Some(prefix)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(invalid)?;
        Ok(Self {
            base: Ipv4Addr::from(u32::from(ip) & Self::mask(prefix)),
            prefix,
        })
    }
}

impl TryFrom<String> for AddrBlock {
    type Error = InvalidName;
    fn try_from(value: String) -> Result<Self, InvalidName> {
        value.parse()
    }
}

impl From<AddrBlock> for String {
    fn from(block: AddrBlock) -> String {
        block.to_string()
    }
}

impl fmt::Display for AddrBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_and_regions_are_dns_labels() {
        for good in ["hello", "a", "my-app-2", &"x".repeat(63)] {
            assert!(good.parse::<AppName>().is_ok(), "{good}");
            assert!(good.parse::<Region>().is_ok(), "{good}");
        }
        for bad in ["", "Hello", "-a", "a-", "a_b", "a.b", &"x".repeat(64), "ä"] {
            let e = bad.parse::<AppName>().unwrap_err();
            assert!(e.to_string().contains("is not an app name"), "{e}");
            assert!(bad.parse::<Region>().is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_ids_are_fourteen_hex_digits() {
        assert!("0123456789abcd".parse::<MachineId>().is_ok());
        for bad in [
            "",
            "0123456789abc",
            "0123456789abcde",
            "0123456789ABCD",
            "../../../../..",
        ] {
            assert!(bad.parse::<MachineId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_deserialize_only_through_their_rule() {
        let name: AppName = serde_json::from_str("\"hello\"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"hello\"");
        let e = serde_json::from_str::<Region>("\"Ord\"").unwrap_err();
        assert!(e.to_string().contains("is not a region name"), "{e}");
    }

    #[test]
    fn address_blocks_parse_to_their_base_and_usable_hosts() {
        let block: AddrBlock = "127.20.1.7/16".parse().unwrap();
        assert_eq!(block.to_string(), "127.20.0.0/16");
        assert_eq!(
            block.hosts(),
            u32::from(Ipv4Addr::new(127, 20, 0, 1))..=u32::from(Ipv4Addr::new(127, 20, 255, 254))
        );
        for bad in [
            "127.20.0.0",
            "127.20.0.0/31",
            "127.20.0.0/7",
            "127.20.0.0/+16",
            "x/16",
            "",
        ] {
            assert!(bad.parse::<AddrBlock>().is_err(), "{bad}");
        }
        let back: AddrBlock = serde_json::from_str("\"10.0.0.0/8\"").unwrap();
        assert_eq!(back.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn address_blocks_hold_and_overlap_what_they_should() {
        let block: AddrBlock = "10.1.2.0/24".parse().unwrap();
        assert_eq!(block.prefix(), 24);
        assert!(block.contains(Ipv4Addr::new(10, 1, 2, 255)));
        assert!(!block.contains(Ipv4Addr::new(10, 1, 3, 0)));
        let wider: AddrBlock = "10.0.0.0/8".parse().unwrap();
        let beside: AddrBlock = "10.1.3.0/24".parse().unwrap();
        assert!(block.overlaps(&wider) && wider.overlaps(&block));
        assert!(!block.overlaps(&beside) && !beside.overlaps(&block));
    }
}
