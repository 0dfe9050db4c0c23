//! Byte sizes as users write them: `512MiB`, `2GiB`, `1.5GB`, `4096`.

use crate::error::{Error, Result};

/// Parses a size; binary (`KiB`, `MiB`, `GiB`, `TiB`) and decimal (`KB`, `MB`, `GB`, `TB`)
/// suffixes, case-insensitive, optional `B`; a bare number is bytes. `flag` names the option
/// in the error message.
pub fn parse_size(text: &str, flag: &str) -> Result<u64> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(Error::invalid(
            flag,
            format!("`{text}` is negative: a size is at least 0 (e.g. 512MiB, 2GiB)"),
        ));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(Error::invalid(
                flag,
                format!("`{text}`: unknown unit (use e.g. 512MiB, 2GiB, 1.5GB)"),
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| Error::invalid(flag, format!("`{text}` is not a size like 512MiB")))?;
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(Error::invalid(flag, format!("`{text}` is too large")));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a binary unit, e.g. `1.50 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB", "--x").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB", "--x").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GB", "--x").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096", "--x").unwrap(), 4096);
        assert_eq!(parse_size("3 gib", "--x").unwrap(), 3 << 30);
        let e = parse_size("12 parsecs", "--gpu-mem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gpu-mem") && e.contains("unit"), "{e}");
        assert!(parse_size("lots", "--x").is_err());
        for negative in ["-5MiB", " -1", "-0.5GiB"] {
            let e = parse_size(negative, "--cpu-mem").unwrap_err().to_string();
            assert!(e.contains("--cpu-mem") && e.contains("negative"), "{e}");
        }
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
