//! Settings written as text: durations such as `5ms`, `15s` or `2m`.

use std::time::Duration;

/// Parses a non-negative duration such as `5ms`, `15s`, `2m` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let span: jiff::Span = text
        .parse()
        .map_err(|e| format!("{e} (write it as 5ms, 15s or 2m)"))?;
    let d = jiff::SignedDuration::try_from(span).map_err(|e| e.to_string())?;
    Duration::try_from(d).map_err(|_| "it is negative".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("soon").unwrap_err().contains("15s"));
        assert!(parse_duration("-5s").is_err());
    }
}
