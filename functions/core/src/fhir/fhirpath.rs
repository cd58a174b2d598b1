//! The small part of FHIRPath that R4 search parameter expressions use: element paths with
//! choice types (`.as(T)`, `(x as T)`), `.where(resolve() is T)`, `.where(field='literal')`,
//! `[n]`, and Patient.deceased's `x.exists() and x != false`. Enough to evaluate every
//! expression in [`super::search_table`] on a resource's JSON.

use serde_json::Value;

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// A child element; a choice element `value[x]` matches every `valueXxx`.
    Child(String),
    /// Keeps the values of one choice type (`as Quantity`).
    As(String),
    /// Keeps references whose target is of this type.
    ResolvesTo(String),
    /// Keeps objects whose `field` equals the literal.
    FieldEquals(String, String),
    Index(usize),
    /// `exists() and != false`: one `true` when some value is not `false`.
    Truthy,
}

/// A compiled expression: its branches (`a | b`) are evaluated in turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    branches: Vec<Vec<Step>>,
}

/// A value found by a path, with the JSON name it was found under (choice types need it).
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    pub name: &'a str,
    pub value: &'a Value,
}

const TRUE: Value = Value::Bool(true);

impl Expression {
    /// Compiles `expression`, whose paths start with `resource_type` or `Resource`/`DomainResource`.
    pub fn parse(expression: &str) -> Result<Expression, String> {
        let branches = split_top(expression, '|')
            .into_iter()
            .map(|b| parse_branch(b.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Expression { branches })
    }

    /// The top-level elements the expression's paths start from, or `None` when a branch does
    /// not start with one. A resource reduced to the members these name (see [`names_member`])
    /// evaluates exactly as the whole resource does.
    pub fn top_level_names(&self) -> Option<Vec<&str>> {
        self.branches
            .iter()
            .map(|steps| match steps.first() {
                Some(Step::Child(name)) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether every value the expression selects is one written in the resource (not one it
    /// computes, like `exists() and != false`'s `true`).
    pub fn selects_stored_values(&self) -> bool {
        self.branches.iter().flatten().all(|step| match step {
            Step::Child(_)
            | Step::As(_)
            | Step::ResolvesTo(_)
            | Step::FieldEquals(..)
            | Step::Index(_) => true,
            Step::Truthy => false,
        })
    }

    /// Every value the expression selects in `resource`.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Found<'a>> {
        let mut out = Vec::new();
        for steps in &self.branches {
            let mut current = vec![Found {
                name: "",
                value: resource,
            }];
            for step in steps {
                current = apply(step, current);
                if current.is_empty() {
                    break;
                }
            }
            out.extend(current);
        }
        out
    }
}

fn apply<'a>(step: &Step, input: Vec<Found<'a>>) -> Vec<Found<'a>> {
    let mut out = Vec::new();
    match step {
        Step::Child(name) => {
            for found in input {
                let Value::Object(map) = found.value else {
                    continue;
                };
                for (key, value) in map {
                    if names_member(name, key) {
                        push_flat(&mut out, key, value);
                    }
                }
            }
        }
        Step::As(type_name) => out.extend(input.into_iter().filter(|f| {
            let suffix = f.name.trim_start_matches(|c: char| c.is_ascii_lowercase());
            suffix.is_empty() || suffix.eq_ignore_ascii_case(type_name)
        })),
        Step::ResolvesTo(target) => out.extend(input.into_iter().filter(|f| {
            f.value
                .get("reference")
                .and_then(Value::as_str)
                .is_some_and(|r| reference_type(r) == Some(target.as_str()))
        })),
        Step::FieldEquals(field, literal) => out.extend(
            input
                .into_iter()
                .filter(|f| f.value.get(field).and_then(Value::as_str) == Some(literal.as_str())),
        ),
        Step::Index(n) => out.extend(input.into_iter().nth(*n)),
        Step::Truthy => {
            if input.iter().any(|f| f.value != &Value::Bool(false)) {
                out.push(Found {
                    name: "",
                    value: &TRUE,
                });
            }
        }
    }
    out
}

/// Whether the element `name` of a path is the JSON member `key`: itself, or one type of a
/// choice element (`value` names `valueQuantity`).
pub fn names_member(name: &str, key: &str) -> bool {
    // Most pairs differ in their first letter: that test spares a comparison call per pair
    // (a dozen members against a handful of names, for every resource `_elements` or
    // `_typeFilter` reads).
    if name.as_bytes().first() != key.as_bytes().first() {
        return false;
    }
    key == name
        || (key.len() > name.len()
            && key.starts_with(name)
            && key[name.len()..].starts_with(|c: char| c.is_ascii_uppercase()))
}

fn push_flat<'a>(out: &mut Vec<Found<'a>>, name: &'a str, value: &'a Value) {
    match value {
        Value::Array(items) => out.extend(items.iter().map(|value| Found { name, value })),
        Value::Null => {}
        value => out.push(Found { name, value }),
    }
}

/// The type of a reference `Type/id`, `Type/id/_history/v` or `http://base/Type/id`.
pub fn reference_type(reference: &str) -> Option<&str> {
    let mut parts: Vec<&str> = reference.split('/').collect();
    if let Some(pos) = parts.iter().position(|p| *p == "_history") {
        parts.truncate(pos);
    }
    let n = parts.len();
    (n >= 2).then(|| parts[n - 2])
}

/// Splits at `sep` outside parentheses and quotes.
fn split_top(text: &str, sep: char) -> Vec<&str> {
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    let mut parts = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            c if c == sep && !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_branch(branch: &str) -> Result<Vec<Step>, String> {
    // `X.exists() and X != false`
    if let Some((left, right)) = branch.split_once(" and ") {
        let path = left
            .trim()
            .strip_suffix(".exists()")
            .ok_or_else(|| format!("unsupported expression '{branch}'"))?;
        if right.trim() != format!("{path} != false") {
            return Err(format!("unsupported expression '{branch}'"));
        }
        let mut steps = parse_branch(path)?;
        steps.push(Step::Truthy);
        return Ok(steps);
    }
    // `(path as Type)` possibly followed by `.more`
    if let Some(inner) = branch.strip_prefix('(') {
        let close = inner
            .find(')')
            .ok_or_else(|| format!("unbalanced '{branch}'"))?;
        let (path, type_name) = inner[..close]
            .split_once(" as ")
            .ok_or_else(|| format!("unsupported expression '{branch}'"))?;
        let mut steps = parse_branch(path.trim())?;
        steps.push(Step::As(type_name.trim().to_string()));
        let rest = &inner[close + 1..];
        if let Some(rest) = rest.strip_prefix('.') {
            steps.extend(parse_steps(rest)?);
        } else if !rest.is_empty() {
            return Err(format!("unsupported expression '{branch}'"));
        }
        return Ok(steps);
    }
    // The first segment names the type the path starts from.
    let rest = branch
        .split_once('.')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("expression '{branch}' has no element path"))?;
    parse_steps(rest)
}

fn parse_steps(path: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for segment in split_top(path, '.') {
        if let Some(arg) = call_argument(segment, "where") {
            steps.push(parse_where(arg)?);
        } else if let Some(type_name) = call_argument(segment, "as") {
            steps.push(Step::As(type_name.trim().to_string()));
        } else if let Some((name, index)) = segment.split_once('[') {
            let n = index
                .strip_suffix(']')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad index in '{segment}'"))?;
            steps.push(Step::Child(name.to_string()));
            steps.push(Step::Index(n));
        } else if !segment.is_empty() && segment.chars().all(|c| c.is_ascii_alphanumeric()) {
            steps.push(Step::Child(segment.to_string()));
        } else {
            return Err(format!("unsupported path segment '{segment}'"));
        }
    }
    Ok(steps)
}

fn call_argument<'a>(segment: &'a str, function: &str) -> Option<&'a str> {
    segment
        .strip_prefix(function)?
        .strip_prefix('(')?
        .strip_suffix(')')
}

fn parse_where(condition: &str) -> Result<Step, String> {
    if let Some(target) = condition.strip_prefix("resolve() is ") {
        return Ok(Step::ResolvesTo(target.trim().to_string()));
    }
    if let Some((field, literal)) = condition.split_once('=') {
        let literal = literal
            .trim()
            .strip_prefix('\'')
            .and_then(|l| l.strip_suffix('\''));
        if let Some(literal) = literal {
            return Ok(Step::FieldEquals(
                field.trim().to_string(),
                literal.to_string(),
            ));
        }
    }
    Err(format!("unsupported where({condition})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search_table::SEARCH_PARAMS;
    use serde_json::json;

    fn values(expr: &str, resource: &Value) -> Vec<Value> {
        Expression::parse(expr)
            .unwrap()
            .evaluate(resource)
            .into_iter()
            .map(|f| f.value.clone())
            .collect()
    }

    #[test]
    fn every_r4_search_expression_compiles() {
        for (t, code, _, expr) in SEARCH_PARAMS {
            Expression::parse(expr).unwrap_or_else(|e| panic!("{t}.{code}: {e}"));
        }
    }

    #[test]
    fn evaluates_paths_and_choices() {
        let obs = json!({"resourceType": "Observation", "code": {"coding": [{"code": "a"}]},
            "valueQuantity": {"value": 5}, "effectivePeriod": {"start": "2020"},
            "component": [{"code": {"text": "x"}}, {"code": {"text": "y"}}],
            "subject": {"reference": "Patient/1"}, "performer": [{"reference": "Practitioner/2"}]});
        assert_eq!(values("Observation.code", &obs).len(), 1);
        assert_eq!(values("Observation.component.code", &obs).len(), 2);
        assert_eq!(
            values("Observation.effective", &obs),
            vec![json!({"start": "2020"})]
        );
        assert_eq!(
            values(
                "(Observation.value as Quantity) | (Observation.value as SampledData)",
                &obs
            ),
            vec![json!({"value": 5})]
        );
        assert!(values("(Observation.value as CodeableConcept).text", &obs).is_empty());
        assert_eq!(
            values("Observation.subject.where(resolve() is Patient)", &obs).len(),
            1
        );
        assert!(values("Observation.performer.where(resolve() is Patient)", &obs).is_empty());
        let p = json!({"telecom": [{"system": "email", "value": "a@b"}, {"system": "phone", "value": "1"}],
            "deceasedDateTime": "2020-01-01"});
        assert_eq!(
            values("Patient.telecom.where(system='email')", &p),
            vec![json!({"system": "email", "value": "a@b"})]
        );
        let deceased = "Patient.deceased.exists() and Patient.deceased != false";
        assert_eq!(values(deceased, &p), vec![json!(true)]);
        assert!(values(deceased, &json!({"deceasedBoolean": false})).is_empty());
        assert!(
            values(
                "Condition.abatement.as(Age)",
                &json!({"abatementString": "x"})
            )
            .is_empty()
        );
    }

    #[test]
    fn reference_types() {
        assert_eq!(reference_type("Patient/1"), Some("Patient"));
        assert_eq!(
            reference_type("http://x/fhir/Patient/1/_history/2"),
            Some("Patient")
        );
        assert_eq!(reference_type("1"), None);
    }
}
