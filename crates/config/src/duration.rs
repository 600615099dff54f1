//! Durations: `500ms`, `1s`, `5m`, `1h`, and Go's form as Talos writes it (`168h0m0s`, `1.5s`).

use std::time::Duration;

/// Parses a duration: one or more `<number><unit>` parts, units `ns`, `us`/`µs`, `ms`, `s`, `m`,
/// `h`; a number may have a fraction. A bare `0` is zero. Anything else is an error that says
/// what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected =
        || format!("invalid duration `{text}`: expected e.g. `500ms`, `1s`, `5m`, `1h` or `1h30m`");
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.len() > 64 {
        return Err(expected());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(expected)?;
        if num_len == 0 {
            return Err(expected());
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(expected()),
        };
        total = total
            .checked_add(part_nanos(num, nanos_per).ok_or_else(expected)?)
            .ok_or_else(expected)?;
        rest = tail;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| expected())?;
    // The remainder is below 1e9 and fits.
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| expected())?;
    Ok(Duration::new(secs, nanos))
}

/// `num` (digits with an optional fraction) times `nanos_per`, in nanoseconds.
fn part_nanos(num: &str, nanos_per: u128) -> Option<u128> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') || int.len() > 20 {
        return None;
    }
    let int_val: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut value = int_val.checked_mul(nanos_per)?;
    let mut scale = nanos_per;
    for digit in frac.chars().take(18) {
        scale /= 10;
        value = value.checked_add(u128::from(digit.to_digit(10)?) * scale)?;
    }
    Some(value)
}

/// Formats a duration the way the config writes it (`1h`, `5m`, `1s`, `500ms`, `1m30s`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if !nanos.is_multiple_of(1_000_000_000) {
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_ours_and_gos() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_duration("168h0m0s"),
            Ok(Duration::from_secs(168 * 3600))
        );
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "1",
            "s",
            "1x",
            "-1s",
            "1..2s",
            "1s2",
            "99999999999999999999999h",
            ".s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["1h", "5m", "1s", "500ms", "1m30s", "0s"] {
            assert_eq!(format_duration(parse_duration(s).unwrap_or_default()), s);
        }
    }
}
