//! Kubernetes resource quantities: validation of the text form, and the forms rustci's own
//! `resources` become.

/// Checks `s` against the Kubernetes quantity grammar (`500m`, `1.5`, `2Gi`, `1e3`, `+4k`).
/// The error says what is wrong.
pub fn validate_quantity(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{s:?} is not a Kubernetes quantity: {why}"));
    if s.is_empty() {
        return bad("it is empty");
    }
    let rest = s.strip_prefix(['+', '-']).unwrap_or(s);
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits == 0 {
        return bad("it has no digits");
    }
    if number.matches('.').count() > 1 {
        return bad("it has more than one decimal point");
    }
    match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            Ok(())
        }
        exp if exp.starts_with(['e', 'E']) => {
            let e = &exp[1..];
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            if !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()) {
                Ok(())
            } else {
                bad("the exponent is not a whole number")
            }
        }
        other => bad(&format!(
            "unknown suffix {other:?} (expected one of m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or an exponent)"
        )),
    }
}

/// `cpus` (fractions of a CPU) as a quantity in millicores, rounded up.
pub(crate) fn cpu_quantity(cpus: f64) -> String {
    let milli = (cpus * 1000.0).ceil().max(1.0) as u64;
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

/// A quantity's value in base units, when it can be read (for node capacity).
pub(crate) fn quantity_value(s: &str) -> Option<f64> {
    validate_quantity(s).ok()?;
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp => 10f64.powi(exp[1..].parse().ok()?),
    };
    Some(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in [
            "1",
            "500m",
            "1.5",
            "2Gi",
            "1e3",
            "1E-2",
            "+4k",
            "-1",
            ".5",
            "5.",
            "128974848",
            "129M",
        ] {
            assert!(validate_quantity(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "abc", "1.5.5", "10MB", "m", "1e", "1ex", "Gi", "1 Gi", "1gi",
        ] {
            let e = validate_quantity(bad).unwrap_err();
            assert!(e.contains("not a Kubernetes quantity"), "{bad}: {e}");
        }
    }

    #[test]
    fn conversions() {
        assert_eq!(cpu_quantity(1.5), "1500m");
        assert_eq!(cpu_quantity(2.0), "2");
        assert_eq!(cpu_quantity(0.0001), "1m");
        assert_eq!(quantity_value("2Gi"), Some(2.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(quantity_value("1500m"), Some(1.5));
        assert_eq!(quantity_value("1e3"), Some(1000.0));
        assert_eq!(quantity_value("x"), None);
    }
}
