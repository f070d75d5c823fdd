//! Byte sizes as users type and read them.
//!
//! Suffixes are binary, as in `qemu-img` and `rbd`: `K`, `M`, `G`, `T`, `P` mean KiB, MiB, GiB, TiB, PiB, and the
//! spellings `KiB`/`KB`/`k` are accepted too. A bare number is bytes. Fractions are allowed when the result is a whole
//! number of bytes (`1.5G`). Parsing never overflows silently.

use std::fmt;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty: give a number with an optional K/M/G/T suffix, e.g. 10G")]
    Empty,
    #[error("'{0}' is not a size: give a number with an optional K/M/G/T suffix, e.g. 10G or 512M")]
    Malformed(String),
    #[error("'{0}' has an unknown unit: use K, M, G, T or P (binary: 1K = 1024 bytes)")]
    UnknownUnit(String),
    #[error("'{0}' is too large")]
    Overflow(String),
    #[error("'{0}' is not a whole number of bytes")]
    Fractional(String),
}

const UNITS: [(&str, u32); 6] = [
    ("", 0),
    ("K", 10),
    ("M", 20),
    ("G", 30),
    ("T", 40),
    ("P", 50),
];

/// Parses a size such as `10G`, `512M`, `1.5T`, `4096` or `64KiB` into bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 || number.ends_with('.') {
        return Err(SizeError::Malformed(text.to_owned()));
    }
    let shift = unit_shift(unit.trim()).ok_or_else(|| SizeError::UnknownUnit(text.to_owned()))?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = whole
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_owned()))?;
    let mut bytes = whole
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_owned()))?;
    if !fraction.is_empty() {
        // fraction / 10^digits * 2^shift must be whole: compute it exactly in u128.
        let digits =
            u32::try_from(fraction.len()).map_err(|_| SizeError::Malformed(text.to_owned()))?;
        let denominator = 10u128
            .checked_pow(digits)
            .ok_or_else(|| SizeError::Malformed(text.to_owned()))?;
        let numerator: u128 = fraction
            .parse()
            .map_err(|_| SizeError::Malformed(text.to_owned()))?;
        let scaled = numerator << shift;
        if !scaled.is_multiple_of(denominator) {
            return Err(SizeError::Fractional(text.to_owned()));
        }
        let extra = u64::try_from(scaled / denominator)
            .map_err(|_| SizeError::Overflow(text.to_owned()))?;
        bytes = bytes
            .checked_add(extra)
            .ok_or_else(|| SizeError::Overflow(text.to_owned()))?;
    }
    Ok(bytes)
}

fn unit_shift(unit: &str) -> Option<u32> {
    let upper = unit.to_ascii_uppercase();
    if upper == "B" {
        return Some(0);
    }
    let base = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B').filter(|rest| !rest.is_empty()))
        .unwrap_or(&upper);
    UNITS
        .iter()
        .find(|(name, _)| *name == base)
        .map(|(_, shift)| *shift)
}

/// A byte count shown the way users read it: `10 GiB`, `1.5 MiB`, `512 B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let bytes = self.0;
        let Some(index) = (0..NAMES.len()).rev().find(|&i| bytes >= 1u64 << (10 * i)) else {
            return write!(f, "0 B");
        };
        if index == 0 {
            return write!(f, "{bytes} B");
        }
        let unit = 1u64 << (10 * index);
        if bytes.is_multiple_of(unit) {
            write!(f, "{} {}", bytes / unit, NAMES[index])
        } else {
            // Display only: the precision loss of the float is irrelevant at one decimal.
            #[allow(clippy::cast_precision_loss)]
            let value = bytes as f64 / unit as f64;
            write!(f, "{value:.1} {}", NAMES[index])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_users_type() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size(" 1.5G "), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1.2.3G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("10X"), Err(SizeError::UnknownUnit(_))));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("20000000P"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("1.0001K"),
            Err(SizeError::Fractional(_))
        ));
        assert!(matches!(parse_size("1Q"), Err(SizeError::UnknownUnit(_))));
    }

    #[test]
    fn shows_sizes_in_binary_units() {
        assert_eq!(HumanSize(0).to_string(), "0 B");
        assert_eq!(HumanSize(512).to_string(), "512 B");
        assert_eq!(HumanSize(10 << 30).to_string(), "10 GiB");
        assert_eq!(HumanSize(3 << 29).to_string(), "1.5 GiB");
    }
}
