//! Byte sizes as people write them: `parse_size` reads "20GB", "512MiB", "1.5GiB" or "4096";
//! `format_size` writes "1.17 GB" for tables and error messages.
//!
//! Units are case-insensitive. Decimal units count powers of 1000 (`KB`, `MB`, `GB`, `TB`, `PB`,
//! `EB`): a bare letter means the same as the letter followed by `B`, so "2G" is 2 * 10^9 bytes,
//! as "2GB" is. Binary units count powers of 1024 and always carry an `i` (`KiB`, `MiB`, `GiB`,
//! `TiB`, `PiB`, `EiB`, or `Ki`, `Mi`, ...). No unit, or `B`, means bytes.
//! Lower-case `b` is bytes too: budgets are never given in bits. A fraction is allowed
//! ("1.5GiB") and the byte count is rounded down.

use crate::error::PlanError;

/// The units `parse_size` accepts, lower-cased, with their sizes in bytes.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("t", 1_000_000_000_000),
    ("tb", 1_000_000_000_000),
    ("ki", 1 << 10),
    ("kib", 1 << 10),
    ("mi", 1 << 20),
    ("mib", 1 << 20),
    ("gi", 1 << 30),
    ("gib", 1 << 30),
    ("ti", 1 << 40),
    ("tib", 1 << 40),
    ("p", 1_000_000_000_000_000),
    ("pb", 1_000_000_000_000_000),
    ("pi", 1 << 50),
    ("pib", 1 << 50),
    ("e", 1_000_000_000_000_000_000),
    ("eb", 1_000_000_000_000_000_000),
    ("ei", 1 << 60),
    ("eib", 1 << 60),
];

/// The largest number of digits a size may have before or after its decimal point.
const MAX_DIGITS: usize = 20;

/// Parses a byte size such as "20GB", "512MiB", "1.5GiB", "2G" or "4096" (see the module
/// documentation for the units). Surrounding blanks and blanks between the number and the unit
/// are allowed. The error names the input and says what is wrong with it.
pub fn parse_size(s: &str) -> Result<u64, PlanError> {
    let invalid = |reason: &str| PlanError::InvalidSize { input: s.to_string(), reason: reason.to_string() };
    let text = s.trim();
    if text.is_empty() {
        return Err(invalid("the size is empty; write a number of bytes such as 4096, 512MiB or 20GB"));
    }
    let number_len = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    if number.is_empty() {
        let reason = if text.starts_with('-') {
            "a size cannot be negative"
        } else {
            "a size starts with a number, such as 512MiB or 20GB"
        };
        return Err(invalid(reason));
    }
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    if fraction.contains('.') {
        return Err(invalid("the number has more than one decimal point"));
    }
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid("the number has no digits"));
    }
    if whole.len() > MAX_DIGITS || fraction.len() > MAX_DIGITS {
        return Err(invalid("the number has too many digits"));
    }
    let unit_lower = unit.trim_start().to_ascii_lowercase();
    let Some(&(_, multiplier)) = UNITS.iter().find(|(name, _)| *name == unit_lower) else {
        return Err(invalid(
            "unknown unit; use B, KB, MB, GB, TB (powers of 1000; K, M, G, T mean the same) \
             or KiB, MiB, GiB, TiB (powers of 1024)",
        ));
    };
    // At most 20 digits each side (below 2^67) and a multiplier of at most 2^60 keep every
    // product below 2^127.
    let digits = |d: &str| d.bytes().fold(0u128, |acc, b| acc * 10 + u128::from(b - b'0'));
    let multiplier = u128::from(multiplier);
    let whole_bytes = digits(whole) * multiplier;
    let fraction_bytes = digits(fraction) * multiplier / 10u128.pow(fraction.len() as u32);
    u64::try_from(whole_bytes + fraction_bytes).map_err(|_| invalid("the size is larger than 2^64 - 1 bytes"))
}

/// Formats a byte count with decimal units and three significant digits, trailing zeros
/// dropped: 999 gives "999 B", 1_170_000_000 gives "1.17 GB", 84_000_000 gives "84 MB".
/// `parse_size` reads the result back to within half a percent.
pub fn format_size(bytes: u64) -> String {
    const NAMES: [&str; 7] = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut scale = 1u64;
    while unit + 1 < NAMES.len() && bytes / scale >= 1000 {
        unit += 1;
        scale *= 1000;
    }
    loop {
        let value = bytes as f64 / scale as f64;
        let decimals = if value < 10.0 {
            2
        } else if value < 100.0 {
            1
        } else {
            0
        };
        let text = format!("{value:.decimals$}");
        // Rounding can carry into the next unit (999_999 bytes is "1000 KB" at three digits).
        if text.parse::<f64>().is_ok_and(|v| v >= 1000.0) && unit + 1 < NAMES.len() {
            unit += 1;
            scale *= 1000;
            continue;
        }
        let trimmed = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
        return format!("{trimmed} {}", NAMES[unit]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(input: &str, expected: u64) {
        assert_eq!(parse_size(input), Ok(expected), "parse_size({input:?})");
    }

    #[test]
    fn parses_decimal_binary_and_plain_sizes() {
        check("4096", 4096);
        check("4096B", 4096);
        check("4096 b", 4096);
        check("20GB", 20_000_000_000);
        check("20gb", 20_000_000_000);
        check("2G", 2_000_000_000);
        check("  300 MB ", 300_000_000);
        check("1k", 1000);
        check("3TB", 3_000_000_000_000);
        check("512MiB", 512 << 20);
        check("512Mi", 512 << 20);
        check("1.5GiB", 3 << 29);
        check("1.5GB", 1_500_000_000);
        check(".5KiB", 512);
        check("7.", 7);
        check("1.0001KB", 1000);
        check("1.17 GB", 1_170_000_000);
        check("16TiB", 16 << 40);
        check("1PB", 1_000_000_000_000_000);
        check("15.99EiB", 18_435_214_858_663_483_146);
        check("18446744073709551615", u64::MAX);
    }

    fn check_error(input: &str, reason_part: &str) {
        match parse_size(input) {
            Err(PlanError::InvalidSize { input: got, reason }) => {
                assert_eq!(got, input);
                assert!(reason.contains(reason_part), "reason {reason:?} lacks {reason_part:?}");
                let message = parse_size(input).unwrap_err().to_string();
                assert!(message.contains(&format!("{input:?}")), "message {message:?} does not name the input");
            }
            other => panic!("parse_size({input:?}) gave {other:?}, expected an InvalidSize error"),
        }
    }

    #[test]
    fn rejects_bad_sizes_naming_the_input() {
        check_error("", "empty");
        check_error("   ", "empty");
        check_error("GB", "starts with a number");
        check_error("-5GB", "negative");
        check_error("1.2.3GB", "more than one decimal point");
        check_error(".", "no digits");
        check_error("12 parsecs", "unknown unit");
        check_error("12 GBs", "unknown unit");
        check_error("5 5", "unknown unit");
        check_error("18446744073709551616", "larger than 2^64");
        check_error("20000000TB", "larger than 2^64");
        check_error("1234567890123456789012345", "too many digits");
    }

    #[test]
    fn formats_with_three_significant_digits() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(999), "999 B");
        assert_eq!(format_size(1000), "1 KB");
        assert_eq!(format_size(1_170_000_000), "1.17 GB");
        assert_eq!(format_size(1_169_999_999), "1.17 GB");
        assert_eq!(format_size(84_000_000), "84 MB");
        assert_eq!(format_size(412_300_000), "412 MB");
        assert_eq!(format_size(66_500_000), "66.5 MB");
        assert_eq!(format_size(1_500_000_000), "1.5 GB");
        assert_eq!(format_size(999_999), "1 MB");
        assert_eq!(format_size(999_499), "999 KB");
        assert_eq!(format_size(u64::MAX), "18.4 EB");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn format_then_parse_is_within_half_a_percent(bytes in any::<u64>()) {
            let text = format_size(bytes);
            let back = parse_size(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let error = (back as f64 - bytes as f64).abs();
            prop_assert!(error <= bytes as f64 * 0.005, "{bytes} -> {text:?} -> {back}");
        }

        #[test]
        fn whole_numbers_of_every_unit_parse_exactly(n in 0u64..16, unit in 0usize..UNITS.len()) {
            let (name, size) = UNITS[unit];
            prop_assert_eq!(parse_size(&format!("{n}{name}")), Ok(n * size));
            prop_assert_eq!(parse_size(&format!("{n} {}", name.to_uppercase())), Ok(n * size));
            let small = n * 1000 + 7;
            if let Some(bytes) = small.checked_mul(size) {
                prop_assert_eq!(parse_size(&format!("{small}{name}")), Ok(bytes));
            }
        }
    }
}
