//! FHIR `instant` values. Timestamps are kept as microseconds since the Unix epoch (UTC) so that
//! stores can compare and index them as plain integers.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// A point in time, UTC, microsecond precision.
pub type Instant = DateTime<Utc>;

/// The current time truncated to milliseconds: the precision of every instant this service writes,
/// so that a value written and read back compares equal.
pub fn now_millis() -> Instant {
    from_micros(Utc::now().timestamp_millis() * 1000)
}

/// Formats as a FHIR instant, e.g. `2024-05-01T10:00:00.000Z`.
pub fn format_instant(t: Instant) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Microseconds since the epoch.
pub fn to_micros(t: Instant) -> i64 {
    t.timestamp_micros()
}

/// The instant `micros` microseconds after the epoch.
pub fn from_micros(micros: i64) -> Instant {
    Utc.timestamp_micros(micros).single().unwrap_or_default()
}

/// Parses a FHIR `instant`: `YYYY-MM-DDThh:mm:ss[.fff]` followed by `Z` or `±hh:mm`.
///
/// A space where the offset sign belongs is read as `+`: an unencoded `+` in a query string arrives
/// as a space, and rejecting that would punish the client for a transport detail.
pub fn parse_instant(text: &str) -> Result<Instant, String> {
    let fixed;
    let mut s = text;
    if s.len() >= 25 && s.as_bytes()[s.len() - 6] == b' ' {
        fixed = format!("{}+{}", &s[..s.len() - 6], &s[s.len() - 5..]);
        s = &fixed;
    }
    let b = s.as_bytes();
    let shape_ok = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|&i| b[i].is_ascii_digit());
    if !shape_ok {
        return Err(format!(
            "'{text}' is not a FHIR instant (expected e.g. 2024-01-31T12:00:00Z or 2024-01-31T12:00:00.000+02:00)"
        ));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("'{text}' is not a valid FHIR instant: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instants() {
        let t = parse_instant("2024-01-31T12:00:00Z").unwrap();
        assert_eq!(format_instant(t), "2024-01-31T12:00:00.000Z");
        let t = parse_instant("2024-01-31T12:00:00.123+02:00").unwrap();
        assert_eq!(format_instant(t), "2024-01-31T10:00:00.123Z");
        let t = parse_instant("2024-01-31T12:00:00 02:00").unwrap();
        assert_eq!(format_instant(t), "2024-01-31T10:00:00.000Z");
    }

    #[test]
    fn rejects_non_instants() {
        for bad in [
            "",
            "2024",
            "2024-01-31",
            "2024-01-31T12:00",
            "2024-01-31T12:00:00",
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "yesterday",
            "2024-01-31 12:00:00Z",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn micros_round_trip() {
        let t = parse_instant("2021-06-01T00:00:00.250Z").unwrap();
        assert_eq!(from_micros(to_micros(t)), t);
    }
}
