//! Durations as the command line writes them (`500ms`, `10s`, `1m30s`):
//! on their own so that flag modules (`cli`, `balance`) share the parser
//! without importing each other.

use std::time::Duration;

/// Parses a duration written like `500ms`, `10s`, `2m`, `1h` or `1m30s`:
/// whole numbers, each followed by its unit (ms, s, m, h).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    const SHAPE: &str = "expected a number and a unit (ms, s, m, h), e.g. 500ms, 10s, 2m or 1m30s";
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("the duration is empty; {SHAPE}"));
    }
    let too_long = || format!("{value} is too long");
    let mut rest = value;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{value:?} is not a duration; {SHAPE}"));
        }
        let number: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..letters] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(format!("{value:?} lacks a unit; {SHAPE}")),
            unit => return Err(format!("unknown unit {unit:?} in {value:?}; {SHAPE}")),
        };
        rest = &rest[letters..];
        let ms = number.checked_mul(unit_ms).ok_or_else(too_long)?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(too_long)?;
    }
    Ok(total)
}
