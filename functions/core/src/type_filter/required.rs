//! Texts a matching resource must contain: a test on the stored bytes that spares parsing most
//! of what a selective `_typeFilter` leaves out.
//!
//! `Observation?code=http://loinc.org|8867-4` matches only an Observation whose `code` holds a
//! coding with code `8867-4`, and a stored code is written as that very text. So when the bytes
//! of the members the criterion reads contain none of its codes, it cannot match, and the
//! resource need not be parsed (measured on a 1M store: parsing `code` into a `serde_json::Value`
//! was a fifth of a filtered export's CPU). The test only ever says "cannot match"; whatever it
//! lets through is evaluated as before, so it changes no result.

use super::values::SearchValue;
use super::{Modifier, ParamKind};
use crate::fhir::fhirpath::{Expression, names_member};
use crate::fhir::members::Member;
use memchr::memmem::Finder;

/// Where a criterion's values can only be, and the texts one of which must be there.
#[derive(Debug, Clone)]
pub(super) struct RequiredText {
    /// The top-level members the criterion's expression reads.
    members: Vec<String>,
    /// Its codes: a value that matches is one of them.
    texts: Vec<Finder<'static>>,
}

impl RequiredText {
    /// The texts of a criterion, when it has them: a token search without modifier on values the
    /// expression selects from the resource, each value with a code. When a code reads as a
    /// number the criterion has none (a number might be written differently from the code it
    /// matches); `true` and `false` are written as such.
    pub(super) fn of(
        kind: ParamKind,
        modifier: &Modifier,
        values: &[SearchValue],
        expression: &Expression,
    ) -> Option<RequiredText> {
        if kind != ParamKind::Token || *modifier != Modifier::None {
            return None;
        }
        if !expression.selects_stored_values() || values.is_empty() {
            return None;
        }
        let members = expression
            .top_level_names()?
            .into_iter()
            .map(String::from)
            .collect();
        let texts = values
            .iter()
            .map(|value| match value {
                SearchValue::Token {
                    code: Some(code), ..
                } if !code.is_empty() && code.parse::<f64>().is_err() => {
                    Some(Finder::new(code.as_bytes()).into_owned())
                }
                _ => None,
            })
            .collect::<Option<_>>()?;
        Some(RequiredText { members, texts })
    }

    /// Whether a resource with these top-level members may match: one of the texts is in a
    /// member the criterion reads, or such a member has an escape (`\u0038` is an `8`), where
    /// the bytes do not say.
    pub(super) fn may_be_in(&self, members: &[Member<'_>]) -> bool {
        members
            .iter()
            .filter(|(key, _)| self.members.iter().any(|name| names_member(name, key)))
            .any(|(_, bytes)| self.may_be_in_text(bytes))
    }

    /// The same test on bytes that hold the members (a whole stored resource): a vector search
    /// for each text, before the members are even found.
    pub(super) fn may_be_in_text(&self, bytes: &[u8]) -> bool {
        memchr::memchr(b'\\', bytes).is_some()
            || self.texts.iter().any(|text| text.find(bytes).is_some())
    }
}
