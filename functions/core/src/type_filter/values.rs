//! Search values of each parameter kind and how they match the elements a path selects,
//! following the R4 search rules: prefixes on dates, numbers and quantities with implicit
//! precision ranges, `system|code` tokens, case- and accent-insensitive string prefixes.

use super::decimal::Decimal;
use super::{Modifier, ParamKind, split_unescaped, unescape};
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
    Number(NumberValue),
    Quantity {
        number: NumberValue,
        system: Option<String>,
        code: Option<String>,
    },
}

/// A number search value (alone, or the number of a quantity) with the exact edges its prefix
/// compares against.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberValue {
    prefix: Prefix,
    value: Decimal,
    /// The implicit range `[low, high)` of the value's significant figures.
    low: Decimal,
    high: Decimal,
    /// `ap`: `[near_low, near_high]`, 10% of the value either side (R4's recommendation), or
    /// the implicit range where that is wider.
    near_low: Decimal,
    near_high: Decimal,
}

impl NumberValue {
    fn parse(text: &str) -> Result<NumberValue, String> {
        let (prefix, rest) = prefix(text);
        let value = Decimal::parse(rest).ok_or_else(|| format!("'{rest}' is not a number"))?;
        let half = value.half_unit();
        let near = value.tenth_of_magnitude().max(half.clone());
        Ok(NumberValue {
            prefix,
            low: value.minus(&half),
            high: value.plus(&half),
            near_low: value.minus(&near),
            near_high: value.plus(&near),
            value,
        })
    }

    /// The R4 number prefix rules; `eq` and `ne` use the implicit range of the search value's
    /// precision, the others the value itself.
    fn matches(&self, v: &Decimal) -> bool {
        let n = &self.value;
        let within = self.low <= *v && *v < self.high;
        match self.prefix {
            Prefix::Eq => within,
            Prefix::Ne => !within,
            Prefix::Gt | Prefix::Sa => v > n,
            Prefix::Lt | Prefix::Eb => v < n,
            Prefix::Ge => v >= n,
            Prefix::Le => v <= n,
            Prefix::Ap => self.near_low <= *v && *v <= self.near_high,
        }
    }
}

/// The system of the codes in Money.currency (R4 Money: an ISO 4217 currency code).
const ISO_4217: &str = "urn:iso:std:iso:4217";

impl SearchValue {
    /// Reads one value (one alternative of a comma-separated list, its escapes still in it).
    pub fn parse(kind: ParamKind, text: &str) -> Result<SearchValue, String> {
        Ok(match kind {
            ParamKind::Token => match split_unescaped(text, '|', 2).as_slice() {
                [system, code] => SearchValue::Token {
                    system: Some(unescape(system)),
                    code: (!code.is_empty()).then(|| unescape(code)),
                },
                _ => SearchValue::Token {
                    system: None,
                    code: Some(unescape(text)),
                },
            },
            ParamKind::Reference => SearchValue::Reference(unescape(text)),
            ParamKind::String | ParamKind::Uri => SearchValue::Text(unescape(text)),
            ParamKind::Date => {
                let text = unescape(text);
                let (prefix, rest) = prefix(&text);
                let (low, high) = date_range(rest)
                    .ok_or_else(|| format!("'{rest}' is not a FHIR date, dateTime or instant"))?;
                SearchValue::Date(prefix, low, high)
            }
            ParamKind::Number => SearchValue::Number(NumberValue::parse(&unescape(text))?),
            ParamKind::Quantity => {
                let parts = split_unescaped(text, '|', 3);
                let part = |i: usize| parts.get(i).filter(|s| !s.is_empty()).map(|s| unescape(s));
                SearchValue::Quantity {
                    number: NumberValue::parse(&part(0).unwrap_or_default())?,
                    system: part(1),
                    code: part(2),
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
        (ParamKind::Number, SearchValue::Number(number)) => match found {
            Value::Object(_) => found.get("value"),
            _ => Some(found),
        }
        .and_then(decimal)
        .is_some_and(|v| number.matches(&v)),
        (
            ParamKind::Quantity,
            SearchValue::Quantity {
                number,
                system,
                code,
            },
        ) => {
            let Some(value) = found.get("value").and_then(decimal) else {
                return false;
            };
            let text = |k: &str| found.get(k).and_then(Value::as_str);
            // A Money's currency is a code of ISO 4217; a Quantity has its own system and code,
            // and its unit is compared only when no system is asked for.
            let (found_system, found_code) = match text("currency") {
                Some(currency) => (Some(ISO_4217), Some(currency)),
                None => (text("system"), text("code")),
            };
            let system_ok = system.as_deref().is_none_or(|s| found_system == Some(s));
            let code_ok = code.as_deref().is_none_or(|c| {
                found_code == Some(c) || (system.is_none() && text("unit") == Some(c))
            });
            system_ok && code_ok && number.matches(&value)
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

/// A JSON number, exactly.
fn decimal(found: &Value) -> Option<Decimal> {
    match found {
        Value::Number(n) => Decimal::of_json(n),
        _ => None,
    }
}
