//! Small things every module needs and none should own: the wall clock, a
//! fast hasher for short keys, and the one date format the node writes.
//!
//! They live here rather than where they were first written so that using
//! them does not make a module depend on another's internals (`telemetry`
//! took `Fnv` from `proxy::routes`, everyone took the clock from
//! `store::hlc`).

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch by the wall clock; 0 if the clock is
/// set before 1970. Stamps (the HLC), deadlines shared between nodes and
/// log timestamps all read it.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// FNV-1a: host names are short, and SipHash (std's default, built to
/// resist collision floods) costs more than the rest of a lookup. Use it
/// only for maps whose keys the operator chooses (domains, host names,
/// fixed labels): a client only chooses what is looked up, which cannot
/// make the table's buckets collide.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

const RFC3339_MS: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
const RFC3339_SECS: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

/// RFC 3339 UTC with milliseconds (`2026-11-24T09:38:20.550Z`), for log
/// lines: fixed width, so lines sort and align.
pub fn rfc3339_ms(ms: u64) -> String {
    format_utc(ms, RFC3339_MS)
}

/// RFC 3339 UTC to the second (`2026-11-24T09:38:20Z`), for messages to
/// operators such as a certificate's validity dates.
pub fn rfc3339_secs(ms: u64) -> String {
    format_utc(ms, RFC3339_SECS)
}

fn format_utc(ms: u64, format: &[BorrowedFormatItem<'_>]) -> String {
    i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| t.format(format).ok())
        // Past year 9999: no RFC 3339 form; the number still says when.
        .unwrap_or_else(|| format!("{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault};

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_513_100_550), "2026-11-24T09:38:20.550Z");
        assert_eq!(rfc3339_ms(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(rfc3339_secs(1_795_513_100_550), "2026-11-24T09:38:20Z");
        assert_eq!(rfc3339_ms(u64::MAX), format!("{}ms", u64::MAX));
    }

    #[test]
    fn fnv_1a_known_values() {
        // Reference values of 64-bit FNV-1a.
        let h = |s: &str| BuildHasherDefault::<Fnv>::default().hash_one(s.as_bytes());
        let mut empty = Fnv::default();
        std::hash::Hasher::write(&mut empty, b"");
        assert_eq!(std::hash::Hasher::finish(&empty), 0xcbf2_9ce4_8422_2325);
        let mut a = Fnv::default();
        std::hash::Hasher::write(&mut a, b"a");
        assert_eq!(std::hash::Hasher::finish(&a), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(h("example.com"), h("example.org"));
    }

    #[test]
    fn wall_clock_is_after_2020() {
        assert!(wall_ms() > 1_577_836_800_000);
    }
}
