//! Kubernetes resource quantities (`500m`, `2Gi`, `1e3`): the grammar of
//! `k8s.io/apimachinery/pkg/api/resource`, parsed to a number for comparisons.

/// The regular expression the real API server quotes when a quantity is malformed.
pub(crate) const QUANTITY_REGEX: &str = "^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";

/// Parses `s` as a Kubernetes quantity and returns its value (cores for cpu, bytes for
/// memory), or `None` when `s` does not follow the grammar
/// `<signedNumber><suffix>` with suffix one of `Ki Mi Gi Ti Pi Ei`, `n u m "" k M G T P E`
/// or a decimal exponent `e<signedInteger>` / `E<signedInteger>`.
pub(crate) fn parse(s: &str) -> Option<f64> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut negative = false;
    if let Some(&c) = bytes.first()
        && (c == b'+' || c == b'-')
    {
        negative = c == b'-';
        i = 1;
    }
    let number_start = i;
    let mut digits = 0;
    let mut dots = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'0'..=b'9' => digits += 1,
            b'.' => dots += 1,
            _ => break,
        }
        i += 1;
    }
    if digits == 0 || dots > 1 {
        return None;
    }
    let number: f64 = {
        let text = &s[number_start..i];
        // "5." and ".5" are valid quantities; Rust's parser accepts both forms too.
        text.parse().ok()?
    };
    let suffix = &s[i..];
    let multiplier = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        _ => {
            let rest = suffix.strip_prefix(['e', 'E'])?;
            let exp_digits = rest.strip_prefix(['+', '-']).unwrap_or(rest);
            if exp_digits.is_empty() || !exp_digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let exp: i32 = rest.parse().ok()?;
            10f64.powi(exp)
        }
    };
    let value = number * multiplier;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn valid_quantities() {
        for (text, value) in [
            ("500m", 0.5),
            ("1.5", 1.5),
            ("2Gi", 2.0 * 1024.0 * 1024.0 * 1024.0),
            ("1e3", 1000.0),
            ("1E3", 1000.0),
            ("1E", 1e18),
            ("-1", -1.0),
            ("+2k", 2000.0),
            (".5", 0.5),
            ("5.", 5.0),
            ("128974848", 128974848.0),
            ("129M", 129e6),
            ("123Mi", 123.0 * 1024.0 * 1024.0),
            ("1e-3", 0.001),
        ] {
            let got = parse(text).unwrap_or_else(|| panic!("{text} should parse"));
            assert!((got - value).abs() <= value.abs() * 1e-12, "{text}: {got}");
        }
    }

    #[test]
    fn invalid_quantities() {
        for text in [
            "", "abc", "1.5.5", "10MB", "m", "1 m", "1Ki2", "e3", "1e", "1e+", "--1", "1mi", ".",
            "1KI", "0x10",
        ] {
            assert!(parse(text).is_none(), "{text:?} should not parse");
        }
    }
}
