//! Durations as people type them on a command line: `30s`, `500ms`, `2m`,
//! `1h`, or a bare number of seconds (`10`, `0.5`).

use std::time::Duration;

/// Parses `text`; the error says what was expected.
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(expected(text)),
    };
    let value: f64 = number.parse().map_err(|_| expected(text))?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| expected(text))
}

fn expected(text: &str) -> String {
    format!("`{text}` is not a duration such as 30s, 500ms, 2m or 10")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_seconds() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn garbage_is_refused_with_the_input_named() {
        for bad in ["", "s", "ten", "5 days", "-1", "1.2.3s", "1e9999"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }
}
