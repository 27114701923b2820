//! Parsing and printing sizes, durations and rates.

use std::time::Duration;

/// Parse a byte size: `64`, `4K`, `1M`, `2G`, `1MiB`, `512KB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let form = "expected a byte count with an optional K, M or G suffix (binary), e.g. 64, 4K, 1M";
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: {form}"))?;
    let v = n
        .checked_mul(mul)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))?;
    if v == 0 {
        return Err(format!("invalid size {s:?}: must be at least 1 byte"));
    }
    Ok(v)
}

/// Parse a duration: `3`, `3s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let form = "expected seconds, or a number with s, ms or m, e.g. 3, 2.5s, 500ms";
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: {form}"))?;
    if !v.is_finite() || v <= 0.0 || v * scale > 3600.0 {
        return Err(format!(
            "invalid duration {s:?}: must be more than 0 and at most an hour"
        ));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// `1048576` → `1 MiB`.
pub fn fmt_size(n: u64) -> String {
    for (unit, sh) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << sh && n.is_multiple_of(1 << sh) {
            return format!("{} {unit}", n >> sh);
        }
    }
    format!("{n} B")
}

/// Progress for a person: a line that rewrites itself on a terminal, plain lines in a
/// pipe (so logs stay readable).
pub fn progress(msg: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// Clear the progress line on a terminal.
pub fn progress_done() {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

/// A rate in bytes per second as GB/s (10^9).
pub fn gbytes(bps: f64) -> String {
    format!("{:.2} GB/s", bps / 1e9)
}

/// A large number with thousands separators.
pub fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64").unwrap(), 64);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
        for bad in ["", "x", "1Q", "-1", "0", "99999999999G"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{e}");
        }
        assert!(parse_size("1Q").unwrap_err().contains("e.g. 64, 4K, 1M"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2.5s").unwrap(), Duration::from_millis(2500));
        for bad in ["", "abc", "0", "-1s", "1d", "NaN"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_size(1 << 20), "1 MiB");
        assert_eq!(fmt_size(64), "64 B");
        assert_eq!(fmt_size(1500), "1500 B");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(12.0), "12");
    }
}
