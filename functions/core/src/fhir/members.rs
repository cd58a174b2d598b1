//! The top-level members of a stored resource, found without parsing their values.
//!
//! `_typeFilter` reads a few elements of each resource and `_elements` keeps a few: parsing the
//! whole resource into a `serde_json::Value` (every nested object, array and string allocated)
//! costs more than reading it from the store. Scanning the bytes once for where each top-level
//! member starts and ends lets the filter parse only the members its paths begin with, and lets
//! `_elements` copy the kept members' bytes as stored.

/// One top-level member: its key (as written, without quotes) and its value's bytes.
pub type Member<'a> = (&'a str, &'a [u8]);

/// The members of a JSON object in their order, or `None` when `json` is not an object this
/// scanner reads exactly (a key with an escape sequence, or malformed JSON): the caller then
/// parses the whole resource, so nothing is decided on a guess.
pub fn members(json: &[u8]) -> Option<Vec<Member<'_>>> {
    let mut at = skip_space(json, 0);
    if json.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(json, at + 1);
    let mut out = Vec::with_capacity(16);
    if json.get(at) == Some(&b'}') {
        return (skip_space(json, at + 1) == json.len()).then_some(out);
    }
    loop {
        if json.get(at) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, at)?;
        let key = std::str::from_utf8(&json[at + 1..key_end - 1]).ok()?;
        if key.contains('\\') {
            return None;
        }
        at = skip_space(json, key_end);
        if json.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_space(json, at + 1);
        let end = value_end(json, start)?;
        out.push((key, &json[start..end]));
        at = skip_space(json, end);
        match json.get(at) {
            Some(b',') => at = skip_space(json, at + 1),
            Some(b'}') => {
                return (skip_space(json, at + 1) == json.len()).then_some(out);
            }
            _ => return None,
        }
    }
}

fn skip_space(json: &[u8], mut at: usize) -> usize {
    while matches!(json.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Eight bytes at a time: a word with the high bit set in each byte equal to `byte`. Exact up
/// to its lowest mark (a borrow can only mark bytes above a true one), which is all a search for
/// the first one reads, also when several such words are OR-ed.
fn marks(word: u64, byte: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let v = word ^ (ONES * byte as u64);
    v.wrapping_sub(ONES) & !v & (ONES << 7)
}

/// Quotes and escapes: where a string's plain run ends.
fn string_marks(word: u64) -> u64 {
    marks(word, b'"') | marks(word, b'\\')
}

/// Quotes and brackets: what matters inside an object or array outside its strings. `[` and
/// `]` differ from `{` and `}` only in bit 0x20, so setting it finds both with one test each.
fn container_marks(word: u64) -> u64 {
    let folded = word | 0x2020_2020_2020_2020;
    marks(word, b'"') | marks(folded, b'{') | marks(folded, b'}')
}

/// The index of the first byte from `at` on that `find` marks (a whole word at a time) or
/// `is` says (the last few bytes).
#[inline(always)]
fn next(
    json: &[u8],
    mut at: usize,
    find: impl Fn(u64) -> u64,
    is: impl Fn(u8) -> bool,
) -> Option<usize> {
    while let Some(chunk) = json.get(at..at + 8) {
        let found = find(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    json.get(at..)?.iter().position(|&c| is(c)).map(|p| at + p)
}

/// The index just past the string that starts (with its quote) at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut at = start + 1;
    loop {
        at = next(json, at, string_marks, |c| matches!(c, b'"' | b'\\'))?;
        if json[at] == b'"' {
            return Some(at + 1);
        }
        at += 2;
    }
}

/// The index just past the value that starts at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match json.get(start)? {
        b'"' => string_end(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = start;
            loop {
                at = next(json, at, container_marks, |c| {
                    matches!(c, b'"' | b'{' | b'}' | b'[' | b']')
                })?;
                match json[at] {
                    b'"' => {
                        at = string_end(json, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                }
                at += 1;
            }
        }
        _ => {
            let mut at = start;
            while let Some(c) = json.get(at) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                at += 1;
            }
            (at > start).then_some(at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The members as an independent parse sees them: each key with its value re-parsed.
    fn check(json: &str) {
        let found = members(json.as_bytes()).expect("an object");
        let parsed: Value = serde_json::from_str(json).unwrap();
        let map = parsed.as_object().unwrap();
        assert_eq!(found.len(), map.len(), "{json}");
        for ((key, value), (want_key, want_value)) in found.iter().zip(map) {
            assert_eq!(key, want_key);
            assert_eq!(&serde_json::from_slice::<Value>(value).unwrap(), want_value);
        }
    }

    /// Strings and containers of every length around the eight bytes read at once, with the
    /// special bytes at every offset in a word.
    #[test]
    fn members_match_a_full_parse_at_every_offset() {
        for n in 0..20 {
            let pad = "x".repeat(n);
            check(&format!(
                r#"{{"a{pad}":"{pad}","b":["{pad}",{{"c":"{pad}\"{pad}"}},[]],"d{pad}":{{"e":[[["{pad}]}}"]]]}},"f":"\\{pad}"}}"#
            ));
            check(&format!(
                r#"{{"{pad}":[{n},"{{{pad}[",{{}}],"z":{{"{pad}":"é{pad}☃"}}}}"#
            ));
        }
    }

    #[test]
    fn members_match_a_full_parse() {
        check(r#"{}"#);
        check(r#"{"a":1}"#);
        check(
            r#"{"resourceType":"Observation","id":"o1","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"valueQuantity":{"value":-1.5e3},"note":[{"text":"a \"quoted\" {brace} [and] \\ back"}],"flag":true,"n":null}"#,
        );
        check(" { \"a\" : [ 1 , { \"b\" : \"}\" } ] , \"c\" : false } ");
        check(r#"{"e":"é ☃ \u00e9","x":[[],{}],"y":{}}"#);
    }

    #[test]
    fn what_it_cannot_read_exactly_is_left_to_a_full_parse() {
        for bad in [
            r#"[1,2]"#,
            r#"{"a\"b":1}"#,
            r#"{"a":1"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":{"b":1}"#,
            r#"{"a":1} x"#,
            r#"{"a" 1}"#,
            r#""#,
        ] {
            assert!(members(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
