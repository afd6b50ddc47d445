//! The calendar behind `strftime_now`: [`TemplateDate`] (a local wall-clock reading, parsed from and
//! printed as a run config's `data.template_date`) and [`strftime`], Python's `datetime.strftime` for a
//! naive datetime (glibc, C locale). Dates are proleptic Gregorian in Python's range 1..=9999.

/// A local wall-clock reading, as Python's naive `datetime.now()` gives it to transformers'
/// `strftime_now(format)` (the global that Llama-3.x chat templates call for "Today Date").
///
/// A [`ChatTemplate`](super::ChatTemplate) reads the clock once, when it is built, and every render
/// uses that reading: all renderings of one run show the same date (a conversation rendered across
/// midnight stays prefix-stable), and tests inject a fixed date with
/// [`ChatTemplate::with_date`](super::ChatTemplate::with_date).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateDate {
    /// 1..=9999 (Python's `datetime` range).
    year: i32,
    /// 1..=12.
    month: u32,
    /// 1..=days in the month.
    day: u32,
    hour: u32,
    minute: u32,
    /// 0..=59 (Python has no leap second).
    second: u32,
    /// 0..=999_999 (`%f`).
    microsecond: u32,
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS` (a run config's `data.template_date`).
impl std::str::FromStr for TemplateDate {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{text:?}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS");
        let (date, time) = match text.split_once('T') {
            Some((d, t)) => (d, Some(t)),
            None => (text, None),
        };
        let num = |s: &str, len: usize| -> std::result::Result<u32, String> {
            if s.len() == len && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse().map_err(|_| bad())
            } else {
                Err(bad())
            }
        };
        let d: Vec<&str> = date.split('-').collect();
        let [y, mo, da] = d[..] else {
            return Err(bad());
        };
        let (h, mi, se) = match time {
            None => (0, 0, 0),
            Some(t) => {
                let t: Vec<&str> = t.split(':').collect();
                let [h, mi, se] = t[..] else {
                    return Err(bad());
                };
                (num(h, 2)?, num(mi, 2)?, num(se, 2)?)
            }
        };
        TemplateDate::new(num(y, 4)? as i32, num(mo, 2)?, num(da, 2)?, h, mi, se)
            .ok_or_else(|| format!("{text:?}: no such date or time"))
    }
}

/// The `FromStr` form, to the second (`%f` is not kept).
impl std::fmt::Display for TemplateDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

impl TemplateDate {
    /// A date and time; None outside Python's `datetime` range or for an impossible date/time.
    pub fn new(
        year: i32,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> Option<Self> {
        let ok = (1..=9999).contains(&year)
            && (1..=12).contains(&month)
            && day >= 1
            && day <= days_in_month(year, month)
            && hour < 24
            && minute < 60
            && second < 60;
        ok.then_some(TemplateDate {
            year,
            month,
            day,
            hour,
            minute,
            second,
            microsecond: 0,
        })
    }

    /// The same reading with `%f` = `microsecond` (0..=999999).
    pub fn with_microsecond(self, microsecond: u32) -> Option<Self> {
        (microsecond < 1_000_000).then_some(TemplateDate {
            microsecond,
            ..self
        })
    }

    /// The current local time (what Python's `datetime.now()` reads: the process time zone, `TZ` or
    /// /etc/localtime). Falls back to UTC if the C library cannot convert the time.
    pub fn now_local() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs() as i64;
        let micros = now.subsec_micros();
        if let Some(t) = local_fields(secs) {
            if let Some(d) = TemplateDate::new(t.0, t.1, t.2, t.3, t.4, t.5.min(59)) {
                return TemplateDate {
                    microsecond: micros,
                    ..d
                };
            }
        }
        Self::from_unix_utc(secs, micros)
    }

    /// UTC date and time of `secs` seconds since the Unix epoch (clamped to Python's range).
    pub fn from_unix_utc(secs: i64, microsecond: u32) -> Self {
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let s = secs.rem_euclid(86_400) as u32;
        let year = y.clamp(1, 9999) as i32;
        TemplateDate {
            year,
            month: m,
            day: d.min(days_in_month(year, m)),
            hour: s / 3600,
            minute: s / 60 % 60,
            second: s % 60,
            microsecond: microsecond.min(999_999),
        }
    }

    /// Day of the week, 0 = Sunday (C's `tm_wday`).
    fn wday(&self) -> u32 {
        // 1970-01-01 was a Thursday (4).
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u32
    }

    /// Day of the year, 0-based (C's `tm_yday`).
    fn yday(&self) -> u32 {
        (days_from_civil(self.year, self.month, self.day) - days_from_civil(self.year, 1, 1)) as u32
    }

    /// ISO 8601 (year, week): weeks start on Monday, week 1 holds the year's first Thursday.
    fn iso_week(&self) -> (i32, u32) {
        // Monday = 1 .. Sunday = 7.
        let wd = (self.wday() + 6) % 7 + 1;
        let ordinal = self.yday() + 1;
        let weeks_in = |y: i32| -> u32 {
            // 53 weeks when Jan 1 is a Thursday, or a Wednesday in a leap year.
            let jan1 = (days_from_civil(y, 1, 1) + 4).rem_euclid(7);
            if jan1 == 4 || (jan1 == 3 && is_leap(y)) {
                53
            } else {
                52
            }
        };
        let w = (ordinal as i32 - wd as i32 + 10) / 7;
        if w < 1 {
            (self.year - 1, weeks_in(self.year - 1))
        } else if w as u32 > weeks_in(self.year) {
            (self.year + 1, 1)
        } else {
            (self.year, w as u32)
        }
    }
}

/// Local broken-down time of `secs` through the C library (year, month 1-12, day, h, m, s).
fn local_fields(secs: i64) -> Option<(i32, u32, u32, u32, u32, u32)> {
    // time_t is i64 here but 32 bits on some targets: keep the checked conversion.
    #[allow(clippy::useless_conversion)]
    let t: libc::time_t = secs.try_into().ok()?;
    // SAFETY: `tm` is a plain C struct for which all-zero bytes are a valid value; `localtime_r` only
    // writes into it (it is the re-entrant variant: no shared static buffer) and reads `t` through a
    // valid pointer for the duration of the call. A null return means failure and leaves nothing to read.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm
    };
    Some((
        tm.tm_year.checked_add(1900)?,
        u32::try_from(tm.tm_mon).ok()? + 1,
        u32::try_from(tm.tm_mday).ok()?,
        u32::try_from(tm.tm_hour).ok()?,
        u32::try_from(tm.tm_min).ok()?,
        u32::try_from(tm.tm_sec).ok()?,
    ))
}

/// Python's `datetime.strftime(fmt)` for a naive datetime on Linux (glibc, C locale), which is what
/// transformers' `strftime_now` returns.
///
/// Conversions: `%a %A %b %h %B %c %C %d %D %e %f %F %g %G %H %I %j %k %l %m %M %n %p %P %r %R %S %t
/// %T %u %U %V %w %W %x %X %y %Y %z %Z %%`, with glibc's flags `-` (no padding), `_` (pad with spaces),
/// `0` (pad with zeros), `^` (upper case), a field width (`%10Y`) and the C-locale no-op modifiers `E`
/// and `O`. As in Python: `%z` and `%Z` are empty (a naive datetime has no zone), `%f` is the
/// microseconds, and a conversion glibc does not know (`%Q`) or a trailing `%` is copied literally.
/// `%s` (seconds since the epoch, which needs the zone) is refused with an error rather than guessed.
pub fn strftime(fmt: &str, t: &TemplateDate) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut it = fmt.char_indices().peekable();
    while let Some((start, c)) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // %[flags][width][E|O]conversion
        let mut flag: Option<char> = None;
        while let Some(&(_, f)) = it.peek() {
            if matches!(f, '-' | '_' | '0' | '^' | '#') {
                flag = Some(f);
                it.next();
            } else {
                break;
            }
        }
        let mut width: Option<usize> = None;
        while let Some(&(_, d)) = it.peek() {
            if let Some(v) = d.to_digit(10) {
                width = Some(
                    width
                        .unwrap_or(0)
                        .saturating_mul(10)
                        .saturating_add(v as usize)
                        .min(1024),
                );
                it.next();
            } else {
                break;
            }
        }
        if let Some(&(_, 'E' | 'O')) = it.peek() {
            it.next();
        }
        let Some((end, conv)) = it.next() else {
            // A trailing `%…`: copied as is.
            out.push_str(&fmt[start..]);
            break;
        };
        let literal = || fmt[start..end + conv.len_utf8()].to_string();
        // (text, default padding width, default padding char); numbers are formatted unpadded here.
        let num = |v: i64, w: usize, pad: char| (v.to_string(), w, pad, true);
        let text = |s: String| (s, 0usize, ' ', false);
        let h12 = if t.hour.is_multiple_of(12) {
            12
        } else {
            t.hour % 12
        };
        let wday = t.wday();
        let (iso_year, iso_week) = t.iso_week();
        let (s, def_w, def_pad, numeric) = match conv {
            'a' => text(WEEKDAYS[wday as usize][..3].to_string()),
            'A' => text(WEEKDAYS[wday as usize].to_string()),
            'b' | 'h' => text(MONTHS[t.month as usize - 1][..3].to_string()),
            'B' => text(MONTHS[t.month as usize - 1].to_string()),
            'c' => text(strftime("%a %b %e %H:%M:%S %Y", t)?),
            'C' => num(i64::from(t.year / 100), 2, '0'),
            'd' => num(i64::from(t.day), 2, '0'),
            'D' | 'x' => text(strftime("%m/%d/%y", t)?),
            'e' => num(i64::from(t.day), 2, ' '),
            'f' => num(i64::from(t.microsecond), 6, '0'),
            'F' => text(strftime("%Y-%m-%d", t)?),
            'g' => num(i64::from(iso_year % 100), 2, '0'),
            'G' => num(i64::from(iso_year), 1, '0'),
            'H' => num(i64::from(t.hour), 2, '0'),
            'I' => num(i64::from(h12), 2, '0'),
            'j' => num(i64::from(t.yday() + 1), 3, '0'),
            'k' => num(i64::from(t.hour), 2, ' '),
            'l' => num(i64::from(h12), 2, ' '),
            'm' => num(i64::from(t.month), 2, '0'),
            'M' => num(i64::from(t.minute), 2, '0'),
            'n' => text("\n".into()),
            'p' => text(if t.hour < 12 { "AM" } else { "PM" }.into()),
            'P' => text(if t.hour < 12 { "am" } else { "pm" }.into()),
            'r' => text(strftime("%I:%M:%S %p", t)?),
            'R' => text(strftime("%H:%M", t)?),
            'S' => num(i64::from(t.second), 2, '0'),
            't' => text("\t".into()),
            'T' | 'X' => text(strftime("%H:%M:%S", t)?),
            'u' => num(i64::from((wday + 6) % 7 + 1), 1, '0'),
            'U' => num(i64::from((t.yday() + 7 - wday) / 7), 2, '0'),
            'V' => num(i64::from(iso_week), 2, '0'),
            'w' => num(i64::from(wday), 1, '0'),
            'W' => num(i64::from((t.yday() + 7 - (wday + 6) % 7) / 7), 2, '0'),
            'y' => num(i64::from(t.year % 100), 2, '0'),
            'Y' => num(i64::from(t.year), 1, '0'),
            'z' | 'Z' => text(String::new()),
            '%' => text("%".into()),
            's' => {
                return Err(format!(
                "strftime_now: `%s` (seconds since the epoch) is not supported, in format {fmt:?}"
            ))
            }
            _ => {
                out.push_str(&literal());
                continue;
            }
        };
        let s = match flag {
            Some('^') => s.to_uppercase(),
            // glibc's `#` swaps the case of text conversions: upper case for names, lower for AM/PM.
            Some('#') if matches!(conv, 'p') => s.to_lowercase(),
            Some('#') if matches!(conv, 'a' | 'A' | 'b' | 'B' | 'h' | 'Z') => s.to_uppercase(),
            _ => s,
        };
        let (w, pad) = match flag {
            Some('-') => (0, def_pad),
            Some('_') => (width.unwrap_or(def_w), ' '),
            Some('0') => (width.unwrap_or(def_w), '0'),
            _ => (width.unwrap_or(def_w), if numeric { def_pad } else { ' ' }),
        };
        for _ in s.chars().count()..w {
            out.push(pad);
        }
        out.push_str(&s);
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::{strftime, TemplateDate};

    pub(in crate::jinja) fn date(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> TemplateDate {
        TemplateDate::new(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn strftime_matches_python_datetime() {
        // Expected strings printed by Python 3 (`datetime(...).strftime(fmt)`, glibc, C locale).
        let fmts = [
            "%d %b %Y",
            "%Y-%m-%d",
            "%B %d, %Y",
            "%A %-d %B %Y",
            "%a %e %b %H:%M:%S %p %I %j %y %u %w %C",
            "%F %T %D %R %%",
            "%c",
            "%x %X",
            "%h|%n|%t|",
        ];
        let cases = [
            (
                date(2024, 3, 5, 14, 7, 9),
                [
                    "05 Mar 2024",
                    "2024-03-05",
                    "March 05, 2024",
                    "Tuesday 5 March 2024",
                    "Tue  5 Mar 14:07:09 PM 02 065 24 2 2 20",
                    "2024-03-05 14:07:09 03/05/24 14:07 %",
                    "Tue Mar  5 14:07:09 2024",
                    "03/05/24 14:07:09",
                    "Mar|\n|\t|",
                ],
            ),
            (
                date(2023, 1, 1, 0, 0, 0),
                [
                    "01 Jan 2023",
                    "2023-01-01",
                    "January 01, 2023",
                    "Sunday 1 January 2023",
                    "Sun  1 Jan 00:00:00 AM 12 001 23 7 0 20",
                    "2023-01-01 00:00:00 01/01/23 00:00 %",
                    "Sun Jan  1 00:00:00 2023",
                    "01/01/23 00:00:00",
                    "Jan|\n|\t|",
                ],
            ),
            (
                date(2000, 12, 31, 23, 59, 59),
                [
                    "31 Dec 2000",
                    "2000-12-31",
                    "December 31, 2000",
                    "Sunday 31 December 2000",
                    "Sun 31 Dec 23:59:59 PM 11 366 00 7 0 20",
                    "2000-12-31 23:59:59 12/31/00 23:59 %",
                    "Sun Dec 31 23:59:59 2000",
                    "12/31/00 23:59:59",
                    "Dec|\n|\t|",
                ],
            ),
            (
                date(1999, 7, 4, 12, 30, 0),
                [
                    "04 Jul 1999",
                    "1999-07-04",
                    "July 04, 1999",
                    "Sunday 4 July 1999",
                    "Sun  4 Jul 12:30:00 PM 12 185 99 7 0 19",
                    "1999-07-04 12:30:00 07/04/99 12:30 %",
                    "Sun Jul  4 12:30:00 1999",
                    "07/04/99 12:30:00",
                    "Jul|\n|\t|",
                ],
            ),
        ];
        for (d, want) in cases {
            for (f, w) in fmts.iter().zip(want) {
                assert_eq!(strftime(f, &d).unwrap(), w, "{d:?} {f:?}");
            }
        }
        // Week numbers, ISO years, padding flags, widths, modifiers, %z/%Z of a naive datetime, %f.
        let f = "%z|%Z|%f|%U|%W|%V|%G|%g|%k|%l|%P|%r|%^a|%^B|%_H|%-e|%Ey|%Od|%10Y";
        let d0 = date(2024, 3, 5, 14, 7, 9).with_microsecond(1234).unwrap();
        for (d, w) in [
            (
                d0,
                "||001234|09|10|10|2024|24|14| 2|pm|02:07:09 PM|TUE|MARCH|14|5|24|05|0000002024",
            ),
            (
                date(2023, 1, 1, 0, 0, 0),
                "||000000|01|00|52|2022|22| 0|12|am|12:00:00 AM|SUN|JANUARY| 0|1|23|01|0000002023",
            ),
            (
                date(2021, 1, 3, 9, 5, 0),
                "||000000|01|00|53|2020|20| 9| 9|am|09:05:00 AM|SUN|JANUARY| 9|3|21|03|0000002021",
            ),
            (
                date(2020, 12, 31, 23, 0, 0),
                "||000000|52|52|53|2020|20|23|11|pm|11:00:00 PM|THU|DECEMBER|23|31|20|31|0000002020",
            ),
            (
                date(2026, 12, 29, 1, 2, 3),
                "||000000|52|52|53|2026|26| 1| 1|am|01:02:03 AM|TUE|DECEMBER| 1|29|26|29|0000002026",
            ),
        ] {
            assert_eq!(strftime(f, &d).unwrap(), w, "{d:?}");
        }
        // What glibc does not know is copied; `%s` needs a zone and is refused.
        let d = date(2024, 3, 5, 14, 7, 9);
        assert_eq!(strftime("abc%", &d).unwrap(), "abc%");
        assert_eq!(
            strftime("%Q|%-Q|%E|%_d|%0e", &d).unwrap(),
            "%Q|%-Q|%E| 5|05"
        );
        assert!(strftime("%s", &d).unwrap_err().contains("%s"));
        // Impossible dates are refused up front.
        assert!(TemplateDate::new(2023, 2, 29, 0, 0, 0).is_none());
        assert!(TemplateDate::new(2024, 2, 29, 0, 0, 0).is_some());
        assert!(TemplateDate::new(2024, 13, 1, 0, 0, 0).is_none());
        assert!(TemplateDate::new(0, 1, 1, 0, 0, 0).is_none());
        // The UTC conversion of a known instant: 2024-07-26 12:34:56 UTC = 1721997296.
        assert_eq!(
            TemplateDate::from_unix_utc(1_721_997_296, 0),
            date(2024, 7, 26, 12, 34, 56)
        );
        assert_eq!(
            TemplateDate::from_unix_utc(-1, 0),
            date(1969, 12, 31, 23, 59, 59)
        );
    }

    #[test]
    fn template_date_parses_and_prints_the_config_form() {
        let d: TemplateDate = "2026-11-29".parse().unwrap();
        assert_eq!(d.to_string(), "2026-11-29T00:00:00");
        let d: TemplateDate = "2024-02-29T23:59:58".parse().unwrap();
        assert_eq!(d.to_string(), "2024-02-29T23:59:58");
        assert_eq!(d.to_string().parse::<TemplateDate>().unwrap(), d);
        for bad in [
            "",
            "2026-11",
            "2026-13-01",
            "2023-02-29",
            "26-11-29",
            "2026-11-29T24:00:00",
            "2026-11-29T1:2:3",
            "2026-11-29 10:00:00",
            "+026-11-29",
        ] {
            let e = bad.parse::<TemplateDate>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
