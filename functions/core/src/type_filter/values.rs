//! Search values of each parameter kind and how they match the elements a path selects,
//! following the R4 search rules: prefixes on dates, numbers and quantities with implicit
//! precision ranges, `system|code` tokens, case- and accent-insensitive string prefixes.

use super::{Modifier, ParamKind};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use serde_json::Value;

/// A comparison prefix of date, number and quantity values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// A parsed search value.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// `code`, `system|code`, `|code` (no system), `system|`.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    Reference(String),
    /// Milliseconds since the epoch, `[low, high)`.
    Date(Prefix, i64, i64),
    Text(String),
    /// The number and half the unit of its last significant digit.
    Number(Prefix, f64, f64),
    Quantity {
        prefix: Prefix,
        number: f64,
        half_unit: f64,
        system: Option<String>,
        code: Option<String>,
    },
}

impl SearchValue {
    pub fn parse(kind: ParamKind, text: &str) -> Result<SearchValue, String> {
        Ok(match kind {
            ParamKind::Token => match text.split_once('|') {
                None => SearchValue::Token {
                    system: None,
                    code: Some(text.to_string()),
                },
                Some((system, code)) => SearchValue::Token {
                    system: Some(system.to_string()),
                    code: (!code.is_empty()).then(|| code.to_string()),
                },
            },
            ParamKind::Reference => SearchValue::Reference(text.to_string()),
            ParamKind::String | ParamKind::Uri => SearchValue::Text(text.to_string()),
            ParamKind::Date => {
                let (prefix, rest) = prefix(text);
                let (low, high) = date_range(rest)
                    .ok_or_else(|| format!("'{rest}' is not a FHIR date, dateTime or instant"))?;
                SearchValue::Date(prefix, low, high)
            }
            ParamKind::Number => {
                let (prefix, rest) = prefix(text);
                let (n, half) = number(rest)?;
                SearchValue::Number(prefix, n, half)
            }
            ParamKind::Quantity => {
                let (prefix, rest) = prefix(text);
                let mut parts = rest.splitn(3, '|');
                let (number, half_unit) = number(parts.next().unwrap_or(""))?;
                let system = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
                let code = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
                SearchValue::Quantity {
                    prefix,
                    number,
                    half_unit,
                    system,
                    code,
                }
            }
        })
    }
}

fn prefix(text: &str) -> (Prefix, &str) {
    const PREFIXES: [(&str, Prefix); 9] = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    for (name, p) in PREFIXES {
        if let Some(rest) = text.strip_prefix(name) {
            return (p, rest);
        }
    }
    (Prefix::Eq, text)
}

/// A decimal and half the unit of its last significant digit (`100` → 0.5, `1.50` → 0.005).
fn number(text: &str) -> Result<(f64, f64), String> {
    let value: f64 = text
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| format!("'{text}' is not a number"))?;
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (
            m,
            e.parse::<i32>()
                .map_err(|_| format!("'{text}' is not a number"))?,
        ),
        None => (text, 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, d)| d.len() as i32);
    Ok((value, 0.5 * 10f64.powi(exponent - decimals)))
}

/// Whether one value found in a resource matches one search value.
pub fn matches_value(
    kind: ParamKind,
    modifier: &Modifier,
    wanted: &SearchValue,
    found: &Value,
) -> bool {
    match (kind, wanted) {
        (ParamKind::Token, SearchValue::Token { system, code }) => tokens(found)
            .iter()
            .any(|(s, c)| token_matches(system.as_deref(), code.as_deref(), *s, c)),
        (ParamKind::Reference, SearchValue::Reference(wanted)) => {
            reference_matches(modifier, wanted, found)
        }
        (ParamKind::String, SearchValue::Text(wanted)) => {
            let mut texts = Vec::new();
            strings(found, &mut texts);
            texts.iter().any(|t| match modifier {
                Modifier::Exact => *t == wanted,
                Modifier::Contains => fold(t).contains(&fold(wanted)),
                _ => fold(t).starts_with(&fold(wanted)),
            })
        }
        (ParamKind::Uri, SearchValue::Text(wanted)) => {
            found.as_str().is_some_and(|t| match modifier {
                Modifier::Below => t.starts_with(wanted.as_str()),
                Modifier::Above => wanted.starts_with(t),
                _ => t == wanted,
            })
        }
        (ParamKind::Date, SearchValue::Date(prefix, low, high)) => date_ranges(found)
            .into_iter()
            .any(|target| date_matches(*prefix, (*low, *high), target)),
        (ParamKind::Number, SearchValue::Number(prefix, n, half)) => found
            .as_f64()
            .or_else(|| found.get("value").and_then(Value::as_f64))
            .is_some_and(|v| number_matches(*prefix, *n, *half, v)),
        (
            ParamKind::Quantity,
            SearchValue::Quantity {
                prefix,
                number,
                half_unit,
                system,
                code,
            },
        ) => {
            let Some(value) = found.get("value").and_then(Value::as_f64) else {
                return false;
            };
            let text = |k: &str| found.get(k).and_then(Value::as_str);
            let system_ok = system.as_deref().is_none_or(|s| text("system") == Some(s));
            let code_ok = code.as_deref().is_none_or(|c| {
                text("code") == Some(c)
                    || text("currency") == Some(c)
                    || (system.is_none() && text("unit") == Some(c))
            });
            system_ok && code_ok && number_matches(*prefix, *number, *half_unit, value)
        }
        _ => false,
    }
}

/// The (system, code) pairs of a token element.
fn tokens(found: &Value) -> Vec<(Option<&str>, String)> {
    fn text<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
        v.get(k).and_then(Value::as_str)
    }
    match found {
        Value::String(s) => vec![(None, s.clone())],
        Value::Bool(b) => vec![(None, b.to_string())],
        Value::Number(n) => vec![(None, n.to_string())],
        Value::Object(_) => {
            if let Some(Value::Array(codings)) = found.get("coding") {
                codings
                    .iter()
                    .filter_map(|c| {
                        text(c, "code").map(|code| (text(c, "system"), code.to_string()))
                    })
                    .collect()
            } else if let Some(code) = text(found, "code") {
                vec![(text(found, "system"), code.to_string())]
            } else if let Some(value) = text(found, "value") {
                vec![(text(found, "system"), value.to_string())]
            } else {
                Vec::new()
            }
        }
        _ => Vec::new(),
    }
}

fn token_matches(
    system: Option<&str>,
    code: Option<&str>,
    found_system: Option<&str>,
    found_code: &str,
) -> bool {
    let code_ok = code.is_none_or(|c| c == found_code);
    let system_ok = match system {
        None => true,
        Some("") => found_system.is_none(),
        Some(s) => found_system == Some(s),
    };
    code_ok && system_ok
}

fn reference_matches(modifier: &Modifier, wanted: &str, found: &Value) -> bool {
    let Some(reference) = found
        .get("reference")
        .and_then(Value::as_str)
        .or_else(|| found.as_str())
    else {
        return false;
    };
    let reference = reference.split("/_history/").next().unwrap_or(reference);
    let wanted = wanted.split("/_history/").next().unwrap_or(wanted);
    if let Modifier::TargetType(t) = modifier {
        return reference == format!("{t}/{wanted}")
            || reference.ends_with(&format!("/{t}/{wanted}"));
    }
    if wanted.contains('/') {
        reference == wanted
            || reference.ends_with(&format!("/{wanted}"))
            || wanted.ends_with(&format!("/{reference}"))
    } else {
        reference.rsplit('/').next() == Some(wanted) && reference.contains('/')
    }
}

/// Every string under a value: itself, or the string fields (and string lists) of an object
/// such as HumanName or Address.
fn strings<'a>(found: &'a Value, out: &mut Vec<&'a str>) {
    match found {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Value::Object(map) => {
            for value in map.values() {
                match value {
                    Value::String(s) => out.push(s),
                    Value::Array(items) => out.extend(items.iter().filter_map(Value::as_str)),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Lower case without accents, for the default string match.
fn fold(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'à'..='å' | 'À'..='Å' => 'a',
            'ç' | 'Ç' => 'c',
            'è'..='ë' | 'È'..='Ë' => 'e',
            'ì'..='ï' | 'Ì'..='Ï' => 'i',
            'ñ' | 'Ñ' => 'n',
            'ò'..='ö' | 'ø' | 'Ò'..='Ö' | 'Ø' => 'o',
            'ù'..='ü' | 'Ù'..='Ü' => 'u',
            'ý' | 'ÿ' | 'Ý' => 'y',
            c => c,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// The time ranges of a date element: a date/dateTime/instant, a Period, or a Timing's events.
fn date_ranges(found: &Value) -> Vec<(i64, i64)> {
    match found {
        Value::String(s) => date_range(s).into_iter().collect(),
        Value::Object(_) if found.get("start").is_some() || found.get("end").is_some() => {
            let bound = |k: &str| found.get(k).and_then(Value::as_str).and_then(date_range);
            let low = bound("start").map_or(i64::MIN, |(low, _)| low);
            let high = bound("end").map_or(i64::MAX, |(_, high)| high);
            vec![(low, high)]
        }
        Value::Object(_) => match found.get("event") {
            Some(Value::Array(events)) => events
                .iter()
                .filter_map(Value::as_str)
                .filter_map(date_range)
                .collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The range `[low, high)` in epoch milliseconds that a FHIR date, dateTime or instant covers
/// at its precision. A time without a zone is read as UTC.
pub fn date_range(text: &str) -> Option<(i64, i64)> {
    let ms = |dt: NaiveDateTime| dt.and_utc().timestamp_millis();
    let day = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    let year_of = |s: &str| (s.len() == 4).then(|| s.parse::<i32>().ok()).flatten();
    match text.len() {
        4 => {
            let y = year_of(text)?;
            Some((ms(day(y, 1, 1)?.into()), ms(day(y + 1, 1, 1)?.into())))
        }
        7 => {
            let (y, m) = text.split_once('-')?;
            let (y, m) = (year_of(y)?, m.parse::<u32>().ok()?);
            let next = if m == 12 {
                day(y + 1, 1, 1)
            } else {
                day(y, m + 1, 1)
            };
            Some((ms(day(y, m, 1)?.into()), ms(next?.into())))
        }
        10 => {
            let d = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            Some((ms(d.into()), ms(d.succ_opt()?.into())))
        }
        _ => {
            let (date, time) = text.split_once('T')?;
            let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
            let zone_at = time.find(['Z', '+', '-']).unwrap_or(time.len());
            let (clock, zone) = time.split_at(zone_at);
            let offset = match zone {
                "" | "Z" => FixedOffset::east_opt(0)?,
                z => {
                    let sign = if z.starts_with('-') { -1 } else { 1 };
                    let (h, m) = z[1..].split_once(':')?;
                    FixedOffset::east_opt(
                        sign * (h.parse::<i32>().ok()? * 3600 + m.parse::<i32>().ok()? * 60),
                    )?
                }
            };
            let (fmt, width) = match clock.len() {
                5 => ("%H:%M", 60_000),
                8 => ("%H:%M:%S", 1_000),
                n if n > 9 => (
                    "%H:%M:%S%.f",
                    10i64.pow(3u32.saturating_sub((n - 9) as u32)).max(1),
                ),
                _ => return None,
            };
            let clock = NaiveTime::parse_from_str(clock, fmt).ok()?;
            let local: DateTime<FixedOffset> =
                offset.from_local_datetime(&date.and_time(clock)).single()?;
            let low = local.with_timezone(&Utc).timestamp_millis();
            Some((low, low + width))
        }
    }
}

/// The R4 date prefix rules: the search range against the target's range.
fn date_matches(prefix: Prefix, (low, high): (i64, i64), (t_low, t_high): (i64, i64)) -> bool {
    let contains = low <= t_low && t_high <= high;
    match prefix {
        Prefix::Eq => contains,
        Prefix::Ne => !contains,
        Prefix::Gt => t_high > high,
        Prefix::Lt => t_low < low,
        Prefix::Ge => t_high > high || contains,
        Prefix::Le => t_low < low || contains,
        Prefix::Sa => t_low >= high,
        Prefix::Eb => t_high <= low,
        Prefix::Ap => {
            let now = Utc::now().timestamp_millis();
            let slack = ((now - low).abs() / 10).max(high - low);
            t_low < high.saturating_add(slack) && t_high > low.saturating_sub(slack)
        }
    }
}

/// The R4 number prefix rules; `eq` and `ne` use the implicit range of the search value's precision.
fn number_matches(prefix: Prefix, n: f64, half: f64, v: f64) -> bool {
    let within = v >= n - half && v < n + half;
    match prefix {
        Prefix::Eq => within,
        Prefix::Ne => !within,
        Prefix::Gt | Prefix::Sa => v > n,
        Prefix::Lt | Prefix::Eb => v < n,
        Prefix::Ge => v >= n,
        Prefix::Le => v <= n,
        Prefix::Ap => (v - n).abs() <= (n.abs() * 0.1).max(half),
    }
}
