//! `_typeFilter`: FHIR search queries that narrow what one resource type exports.
//!
//! Each query (`Observation?code=x&status=final`) is a conjunction of criteria; several queries for
//! the same type are OR-ed; types without a query are not filtered. A criterion's comma-separated
//! values are OR-ed. Parameters come from the R4 SearchParameter definitions (see
//! [`crate::fhir::search_table`]) and are evaluated on the resource itself, so the same code
//! filters on SQLite and on DynamoDB.

mod decimal;
mod required;
mod values;

use crate::fhir::fhirpath::Expression;
use crate::fhir::is_resource_type;
use crate::fhir::members::Member;
use crate::fhir::search_table::SEARCH_PARAMS;
use percent_encoding::percent_decode_str;
use required::RequiredText;
use serde_json::Value;
use std::collections::BTreeMap;
use values::{SearchValue, matches_value};

/// The kinds of search parameter `_typeFilter` evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    Reference,
    Date,
    String,
    Uri,
    Number,
    Quantity,
}

impl ParamKind {
    fn from_name(name: &str) -> Option<ParamKind> {
        Some(match name {
            "token" => ParamKind::Token,
            "reference" => ParamKind::Reference,
            "date" => ParamKind::Date,
            "string" => ParamKind::String,
            "uri" => ParamKind::Uri,
            "number" => ParamKind::Number,
            "quantity" => ParamKind::Quantity,
            _ => return None,
        })
    }
}

/// A search modifier (`name:modifier=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Modifier {
    None,
    Missing,
    Exact,
    Contains,
    Not,
    Below,
    Above,
    /// `reference:Patient=123`
    TargetType(String),
}

/// One `name[:modifier]=v1,v2` of a query.
#[derive(Debug, Clone)]
struct Criterion {
    expression: Expression,
    kind: ParamKind,
    modifier: Modifier,
    values: Vec<SearchValue>,
    /// For `:missing`: whether the element must be missing.
    missing: bool,
    /// Texts the stored members must contain for the criterion to match, when it has them.
    required: Option<RequiredText>,
}

/// One `_typeFilter` query: all criteria must hold.
#[derive(Debug, Clone)]
struct Query {
    criteria: Vec<Criterion>,
}

/// The compiled `_typeFilter` values of one export.
#[derive(Debug, Clone, Default)]
pub struct TypeFilters {
    by_type: BTreeMap<String, Vec<Query>>,
    /// Criteria left out under lenient handling, as messages for the error file.
    pub warnings: Vec<String>,
}

/// A `_typeFilter` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError(pub String);

impl TypeFilters {
    /// Compiles `_typeFilter` values. With `lenient`, a criterion that cannot be evaluated is left
    /// out of its query and reported in `warnings`; otherwise it is an error. A value that is not a
    /// query at all is always an error.
    pub fn parse(values: &[String], lenient: bool) -> Result<TypeFilters, FilterError> {
        let mut filters = TypeFilters::default();
        for value in values.iter().flat_map(|v| split_queries(v)) {
            let whole = decoded_whole(value);
            let value = whole.as_deref().unwrap_or(value);
            let (resource_type, query) = value.split_once('?').unwrap_or(("", ""));
            let resource_type = resource_type.trim();
            if !is_resource_type(resource_type) || query.trim().is_empty() {
                return Err(FilterError(format!(
                    "_typeFilter '{value}' must be an R4 resource type, '?' and search criteria (e.g. Observation?status=final)"
                )));
            }
            let mut criteria = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match compile_criterion(resource_type, pair) {
                    Ok(c) => criteria.push(c),
                    Err(FilterError(message)) if lenient => filters.warnings.push(format!(
                        "_typeFilter '{value}': {message}; criterion ignored"
                    )),
                    Err(FilterError(message)) => {
                        return Err(FilterError(format!("_typeFilter '{value}': {message}")));
                    }
                }
            }
            filters
                .by_type
                .entry(resource_type.to_string())
                .or_default()
                .push(Query { criteria });
        }
        Ok(filters)
    }

    /// Whether no filter was given.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The types that have at least one query.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }

    /// Whether resources of `resource_type` are filtered at all.
    pub fn filters(&self, resource_type: &str) -> bool {
        self.by_type.contains_key(resource_type)
    }

    /// The top-level elements the filters of `resource_type` read, or `None` when one of them
    /// may read more (the whole resource is then parsed).
    pub fn elements_read(&self, resource_type: &str) -> Option<Vec<&str>> {
        let mut names = Vec::new();
        for query in self.by_type.get(resource_type).into_iter().flatten() {
            for criterion in &query.criteria {
                names.extend(criterion.expression.top_level_names()?);
            }
        }
        names.sort_unstable();
        names.dedup();
        Some(names)
    }

    /// `false` when no resource with these top-level `members` (stored bytes) can pass the
    /// filters of `resource_type`, found without parsing them (see [`required`]); `true` when
    /// it may, and [`TypeFilters::matches`] decides.
    pub fn may_match(&self, resource_type: &str, members: &[Member<'_>]) -> bool {
        self.may_match_by(resource_type, |r| r.may_be_in(members))
    }

    /// [`TypeFilters::may_match`] on a whole stored resource, before its members are found: a
    /// text absent from the resource is absent from every member.
    pub fn may_match_text(&self, resource_type: &str, json: &[u8]) -> bool {
        self.may_match_by(resource_type, |r| r.may_be_in_text(json))
    }

    fn may_match_by(&self, resource_type: &str, may_be: impl Fn(&RequiredText) -> bool) -> bool {
        match self.by_type.get(resource_type) {
            None => true,
            Some(queries) => queries.iter().any(|q| {
                q.criteria
                    .iter()
                    .all(|c| c.required.as_ref().is_none_or(&may_be))
            }),
        }
    }

    /// Whether `resource` passes the filters of its type (always, for an unfiltered type).
    pub fn matches(&self, resource_type: &str, resource: &Value) -> bool {
        match self.by_type.get(resource_type) {
            None => true,
            Some(queries) => queries
                .iter()
                .any(|q| q.criteria.iter().all(|c| c.matches(resource))),
        }
    }
}

impl Criterion {
    fn matches(&self, resource: &Value) -> bool {
        let found = self.expression.evaluate(resource);
        match &self.modifier {
            Modifier::Missing => found.is_empty() == self.missing,
            Modifier::Not => !found.iter().any(|f| {
                self.values
                    .iter()
                    .any(|v| matches_value(self.kind, &Modifier::None, v, f.value))
            }),
            modifier => found.iter().any(|f| {
                self.values
                    .iter()
                    .any(|v| matches_value(self.kind, modifier, v, f.value))
            }),
        }
    }
}

/// Splits the legacy comma-separated form (`Patient?x=1,Observation?y=2`) into single queries:
/// a comma starts a new query only where a `Type?` follows it, so commas inside values stay.
fn split_queries(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let rest = &value[i + 1..];
        let starts_query = rest
            .split_once('?')
            .is_some_and(|(t, _)| is_resource_type(t.trim()));
        if starts_query {
            out.push(value[start..i].trim());
            start = i + 1;
        }
    }
    out.push(value[start..].trim());
    out
}

/// A query whose `?` is itself percent-encoded (`Observation%3Fcode%3D...`: the whole query was
/// encoded once more than the URL needs) is decoded as a whole, so it is read, not rejected.
fn decoded_whole(value: &str) -> Option<String> {
    if value.contains('?') {
        return None;
    }
    let decoded = percent_decode_str(value).decode_utf8().ok()?;
    let (resource_type, _) = decoded.split_once('?')?;
    is_resource_type(resource_type.trim()).then(|| decoded.into_owned())
}

/// The (kind, expression) of search parameter `code` on `resource_type`.
pub fn search_param(resource_type: &str, code: &str) -> Option<(ParamKind, &'static str)> {
    [resource_type, "DomainResource", "Resource"]
        .iter()
        .find_map(|t| {
            SEARCH_PARAMS
                .binary_search_by(|(pt, pc, _, _)| (*pt, *pc).cmp(&(*t, code)))
                .ok()
        })
        .and_then(|i| {
            let (_, _, kind, expr) = SEARCH_PARAMS[i];
            ParamKind::from_name(kind).map(|k| (k, expr))
        })
}

/// The search parameter codes usable in `_typeFilter` for `resource_type`, sorted.
pub fn search_params_of(resource_type: &str) -> Vec<(&'static str, ParamKind)> {
    let mut out: Vec<(&str, ParamKind)> = SEARCH_PARAMS
        .iter()
        .filter(|(t, _, _, _)| *t == resource_type || *t == "Resource" || *t == "DomainResource")
        .filter_map(|(_, code, kind, _)| ParamKind::from_name(kind).map(|k| (*code, k)))
        .collect();
    out.sort_unstable_by_key(|(code, _)| *code);
    out.dedup_by_key(|(code, _)| *code);
    out
}

/// Search result parameters and features that a filter of one type cannot use.
const NOT_FILTERS: &[&str] = &[
    "_include",
    "_revinclude",
    "_sort",
    "_count",
    "_summary",
    "_elements",
    "_contained",
    "_containedType",
    "_total",
    "_has",
    "_list",
    "_text",
    "_content",
    "_query",
    "_filter",
];

fn compile_criterion(resource_type: &str, pair: &str) -> Result<Criterion, FilterError> {
    let (raw_name, raw_value) = pair
        .split_once('=')
        .ok_or_else(|| FilterError(format!("'{pair}' is not name=value")))?;
    let name = decode(raw_name)?;
    let (code, modifier) = match name.split_once(':') {
        Some((code, modifier)) => (code, Some(modifier)),
        None => (name.as_str(), None),
    };
    if NOT_FILTERS.contains(&code) {
        return Err(FilterError(format!(
            "{code} is not a filter; only search parameters can be used"
        )));
    }
    if code.contains('.') {
        return Err(FilterError(format!(
            "chained parameter {code} is not supported"
        )));
    }
    let (kind, expression_text) = search_param(resource_type, code).ok_or_else(|| {
        FilterError(format!(
            "{code} is not a supported search parameter of {resource_type}"
        ))
    })?;
    let modifier = match modifier {
        None => Modifier::None,
        Some(m) => parse_modifier(kind, m)
            .ok_or_else(|| FilterError(format!("modifier :{m} is not supported for {code}")))?,
    };
    let expression = Expression::parse(expression_text).map_err(FilterError)?;

    // Decode first, then split: `%2C` is the comma that separates alternatives (the form clients
    // such as smart-fetch send), and `\,` (`%5C%2C`) is the escape for a comma inside a value.
    // The alternatives keep their escapes until each is read, so `\|` is not a separator there.
    let decoded = decode(raw_value)?;
    let texts = split_unescaped(&decoded, ',', usize::MAX);
    if texts.iter().any(|t| t.is_empty()) {
        return Err(FilterError(format!("{name} has an empty value")));
    }
    let mut missing = false;
    let mut values = Vec::new();
    if modifier == Modifier::Missing {
        missing = match texts.as_slice() {
            [t] if unescape(t) == "true" => true,
            [t] if unescape(t) == "false" => false,
            _ => {
                return Err(FilterError(format!("{name} must be true or false")));
            }
        };
    } else {
        for text in &texts {
            let value = SearchValue::parse(kind, text)
                .map_err(|e| FilterError(format!("{name}={text}: {e}")))?;
            values.push(value);
        }
    }
    let required = RequiredText::of(kind, &modifier, &values, &expression);
    Ok(Criterion {
        expression,
        kind,
        modifier,
        values,
        missing,
        required,
    })
}

fn parse_modifier(kind: ParamKind, modifier: &str) -> Option<Modifier> {
    Some(match (kind, modifier) {
        (_, "missing") => Modifier::Missing,
        (ParamKind::String, "exact") => Modifier::Exact,
        (ParamKind::String, "contains") => Modifier::Contains,
        (ParamKind::Token, "not") => Modifier::Not,
        (ParamKind::Uri, "below") => Modifier::Below,
        (ParamKind::Uri, "above") => Modifier::Above,
        (ParamKind::Reference, t) if is_resource_type(t) => Modifier::TargetType(t.to_string()),
        _ => return None,
    })
}

/// The characters R4 search escapes with a backslash inside a value: the separators of
/// alternatives (`,`), of composite parts (`$`) and of `system|code` (`|`), and the backslash.
const ESCAPED: [char; 4] = [',', '$', '|', '\\'];

/// Splits `text` into at most `parts` parts at each `separator` that is not escaped (`\,`, and
/// not the comma of `\\,`, an escaped backslash before a separator). The parts keep their escapes:
/// [`unescape`] reads each once it is split as far as it will be.
fn split_unescaped(text: &str, separator: char, parts: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\\' && chars.peek().is_some_and(|(_, next)| ESCAPED.contains(next)) {
            chars.next();
        } else if c == separator && out.len() + 1 < parts {
            out.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&text[start..]);
    out
}

/// Removes the escapes: `\,` `\$` `\|` `\\` become the character. A backslash before any other
/// character is not an escape and stays, as does a trailing one.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match chars.peek() {
            Some(next) if c == '\\' && ESCAPED.contains(next) => {
                out.push(*next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// Percent-decodes one name or value of a query after it was split at `&` and `=`, so encoded
/// `%26` and `%3D` stay inside it (`+` is kept: it is a time zone sign in dates).
fn decode(text: &str) -> Result<String, FilterError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| FilterError(format!("'{text}' is not valid UTF-8 once decoded")))
}

#[cfg(test)]
mod tests;
