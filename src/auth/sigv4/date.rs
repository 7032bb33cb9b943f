//! `X-Amz-Date` (`yyyymmddThhmmssZ`, always UTC) parsing and formatting.
//!
//! Hand-written on purpose: the format is fixed-width, the verifier parses one per request, and a
//! general date library would allocate or validate more than needed. A leaf: depends on `std` only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of an `X-Amz-Date` value.
pub(super) const AMZ_DATE_LEN: usize = 16;

/// Parses `yyyymmddThhmmssZ` into seconds since the Unix epoch; `None` if it is not exactly that
/// shape or names an impossible calendar time (month 13, 31 February, second 60 …).
pub(super) fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != AMZ_DATE_LEN || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[4..6])?;
    let day = digits(&b[6..8])?;
    let hour = digits(&b[9..11])?;
    let minute = digits(&b[11..13])?;
    let second = digits(&b[13..15])?;
    // Leap seconds are not accepted: SigV4 signers never produce them and rejecting is safe.
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Formats `time` as `yyyymmddThhmmssZ` (sub-second part dropped). `None` for times before 1970
/// or after year 9999, which a signer never has a reason to use.
pub(super) fn format_amz_date(time: SystemTime) -> Option<[u8; AMZ_DATE_LEN]> {
    let secs = i64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    if year > 9999 {
        return None;
    }
    let mut out = *b"00000000T000000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[4..6], month);
    put_digits(&mut out[6..8], day);
    put_digits(&mut out[9..11], rem / 3_600);
    put_digits(&mut out[11..13], rem % 3_600 / 60);
    put_digits(&mut out[13..15], rem % 60);
    Some(out)
}

/// Signed distance `now - then` in nanoseconds (`then` in whole seconds since the epoch), so the
/// skew check works for dates on either side of `now` and for clocks before 1970.
pub(super) fn nanos_since(now: SystemTime, then_secs: i64) -> i128 {
    let now_nanos = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    now_nanos - i128::from(then_secs) * 1_000_000_000
}

/// Whether `now` and `then_secs` are at most `max_skew` apart (either direction).
pub(super) fn within_skew(now: SystemTime, then_secs: i64, max_skew: Duration) -> bool {
    nanos_since(now, then_secs).unsigned_abs() <= max_skew.as_nanos()
}

fn digits(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn put_digits(out: &mut [u8], mut value: i64) {
    for slot in out.iter_mut().rev() {
        // `value` is in range by construction (0..=9999 for the widest field), so the cast is exact.
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`] (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_test_suite_date() {
        // 2015-08-30T12:36:00Z, the AWS SigV4 test-suite date.
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        assert_eq!(&format_amz_date(t).unwrap_or_default(), b"20150830T123600Z");
    }

    #[test]
    fn round_trips_across_calendar_edges() {
        for secs in [
            0,
            951_782_400,
            951_868_799,
            1_709_164_800,
            4_102_444_799,
            253_402_300_799,
        ] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            let f = format_amz_date(t).unwrap_or_default();
            let s = std::str::from_utf8(&f).unwrap_or_default();
            assert_eq!(parse_amz_date(s), Some(secs as i64), "{s}");
        }
    }

    #[test]
    fn rejects_malformed_dates() {
        for bad in [
            "",
            "20150830T123600",
            "20150830 123600Z",
            "2015083OT123600Z",
            "20151330T123600Z",
            "20150230T123600Z",
            "20150229T000000Z",
            "20150830T243600Z",
            "20150830T126000Z",
            "20150830T123660Z",
            "+0150830T123600Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        assert!(parse_amz_date("20160229T000000Z").is_some());
    }

    #[test]
    fn skew_is_symmetric() {
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let five = Duration::from_secs(300);
        assert!(within_skew(t, 1_000_300, five));
        assert!(within_skew(t, 999_700, five));
        assert!(!within_skew(t, 1_000_301, five));
        assert!(!within_skew(t, 999_699, five));
        assert!(format_amz_date(UNIX_EPOCH - Duration::from_secs(1)).is_none());
    }
}
