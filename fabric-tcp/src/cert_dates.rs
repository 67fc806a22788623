//! When an X.509 certificate stops being valid: its `notAfter`, read
//! straight from the DER (RFC 5280 §4.1), so an operator sees a renewal
//! coming without braid carrying a full certificate parser.

/// One DER element at the start of `der`: its tag, its contents, and
/// what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the next `n` bytes give the length, big-endian.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| len << 8 | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
/// `[0] EXPLICIT`: the version, present from v2 on.
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The certificate's `notAfter` in seconds since the Unix epoch; `None`
/// if `cert` is not a DER certificate this can read.
pub(crate) fn not_after(cert: &[u8]) -> Option<i64> {
    let (SEQUENCE, certificate, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(certificate)? else {
        return None;
    };
    let mut fields = tbs;
    if element(fields)?.0 == VERSION {
        fields = element(fields)?.2;
    }
    // serialNumber, signature, issuer; then validity.
    for _ in 0..3 {
        fields = element(fields)?.2;
    }
    let (SEQUENCE, validity, _) = element(fields)? else {
        return None;
    };
    let not_before_and_after = element(validity)?.2;
    let (tag, time, _) = element(not_before_and_after)?;
    seconds(tag, time)
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) as DER has them, in seconds since the epoch.
fn seconds(tag: u8, time: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let number = |s: Option<&str>| -> Option<i64> {
        let s = s?;
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, rest) = match tag {
        UTC_TIME => {
            let yy = number(text.get(..2))?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        GENERALIZED_TIME => (number(text.get(..4))?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 {
        return None;
    }
    let field = |at: usize| number(rest.get(at..at + 2));
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    Some(days_since_epoch(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian
/// calendar (counting from March, so the leap day ends a year).
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_expiring(year: i32, month: u8, day: u8) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_not_after_in_both_time_forms() {
        // Before 2050 a certificate carries a UTCTime, from 2050 on a
        // GeneralizedTime (RFC 5280 §4.1.2.5).
        assert_eq!(not_after(&cert_expiring(2031, 5, 17)), Some(1_936_742_400));
        assert_eq!(not_after(&cert_expiring(2061, 1, 1)), Some(2_871_763_200));
        assert_eq!(not_after(&cert_expiring(2028, 2, 29)), Some(1_835_395_200));
    }

    #[test]
    fn what_is_not_a_certificate_has_no_date() {
        let good = cert_expiring(2031, 5, 17);
        assert_eq!(not_after(b"not a certificate"), None);
        assert_eq!(not_after(&[]), None);
        // Cut anywhere, the DER no longer holds its validity whole.
        for cut in [1, 4, 40, good.len() / 2] {
            assert_eq!(not_after(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(seconds(UTC_TIME, b"310517000000"), None, "no Z");
        assert_eq!(seconds(UTC_TIME, b"311317000000Z"), None, "month 13");
        assert_eq!(seconds(0x04, b"310517000000Z"), None, "not a time");
    }

    #[test]
    fn days_count_leap_years() {
        assert_eq!(days_since_epoch(1970, 1, 1), 0);
        assert_eq!(days_since_epoch(2000, 3, 1), 11_017);
        assert_eq!(
            days_since_epoch(2024, 2, 29) + 1,
            days_since_epoch(2024, 3, 1)
        );
        assert_eq!(days_since_epoch(1969, 12, 31), -1);
    }
}
