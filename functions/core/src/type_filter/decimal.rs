//! Exact decimal numbers for number and quantity search.
//!
//! A search number stands for a range that ends half a unit of its last digit either side, and
//! those edges are decimals binary floating point cannot hold: as doubles, `0.05 - 0.005` is
//! above the stored 0.045 and `0.10 + 0.005` is above the stored 0.105, so a third of all
//! two-decimal search values put an edge on the wrong side. Search values and stored numbers are
//! therefore compared digit by digit, from their decimal texts.

use std::cmp::Ordering;

/// An exact decimal, `±digits × 10^exponent`. It keeps the digits it was written with
/// (`100.00` has five), because a search number's precision is that of its text.
#[derive(Debug, Clone)]
pub struct Decimal {
    negative: bool,
    /// Most significant first, without leading zeros; empty for zero.
    digits: Vec<u8>,
    /// The power of ten of the last digit.
    exponent: i64,
}

impl Decimal {
    /// Reads a decimal in JSON or FHIR notation: an optional sign, digits with an optional
    /// fraction, and an optional exponent (`-1.50`, `7.25e1`, `1E-7`, `.5`).
    pub fn parse(text: &str) -> Option<Decimal> {
        let (negative, unsigned) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, power) = match unsigned.split_once(['e', 'E']) {
            Some((m, e)) => (m, e.parse::<i32>().ok()?),
            None => (unsigned, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let mut digits = Vec::with_capacity(whole.len() + fraction.len());
        for c in whole.bytes().chain(fraction.bytes()) {
            if !c.is_ascii_digit() {
                return None;
            }
            if !(digits.is_empty() && c == b'0') {
                digits.push(c - b'0');
            }
        }
        Some(Decimal {
            negative,
            digits,
            exponent: i64::from(power) - fraction.len() as i64,
        })
    }

    /// A JSON number exactly as its text says. Without serde_json's `arbitrary_precision` a
    /// decimal is held as the nearest double, and its text is the shortest one that reads back
    /// as that double: the digits the file had, for every decimal of up to 15 significant digits.
    pub fn of_json(number: &serde_json::Number) -> Option<Decimal> {
        Decimal::parse(&number.to_string())
    }

    fn is_zero(&self) -> bool {
        self.digits.is_empty()
    }

    /// Half a unit of the last digit (`100` → 0.5, `1.50` → 0.005, `1e2` → 50): how far the
    /// implicit range of a search number reaches either side of it.
    pub fn half_unit(&self) -> Decimal {
        Decimal {
            negative: false,
            digits: vec![5],
            exponent: self.exponent - 1,
        }
    }

    /// The absolute value divided by ten.
    pub fn tenth_of_magnitude(&self) -> Decimal {
        Decimal {
            negative: false,
            digits: self.digits.clone(),
            exponent: self.exponent - 1,
        }
    }

    pub fn plus(&self, other: &Decimal) -> Decimal {
        let exponent = self.exponent.min(other.exponent);
        let (a, b) = (self.digits_at(exponent), other.digits_at(exponent));
        let (negative, digits) = if self.negative == other.negative {
            (self.negative, add(&a, &b))
        } else {
            match compare_magnitudes(&a, &b) {
                Ordering::Less => (other.negative, subtract(&b, &a)),
                _ => (self.negative, subtract(&a, &b)),
            }
        };
        Decimal::new(negative, digits, exponent)
    }

    pub fn minus(&self, other: &Decimal) -> Decimal {
        let negated = Decimal {
            negative: !other.negative,
            ..other.clone()
        };
        self.plus(&negated)
    }

    fn new(negative: bool, digits: Vec<u8>, exponent: i64) -> Decimal {
        let first = digits.iter().position(|d| *d != 0).unwrap_or(digits.len());
        Decimal {
            negative,
            digits: digits[first..].to_vec(),
            exponent,
        }
    }

    /// The digits of this value written with its last digit at `10^exponent`, which must not be
    /// above its own. Only ever called with nearby exponents (a search value and its own ranges).
    fn digits_at(&self, exponent: i64) -> Vec<u8> {
        let zeros = (self.exponent - exponent) as usize;
        let mut digits = self.digits.clone();
        digits.resize(digits.len() + zeros, 0);
        digits
    }

    /// The power of ten just above the most significant digit: 10 for 7.25, 0 for 0.5.
    fn magnitude(&self) -> i64 {
        self.exponent + self.digits.len() as i64
    }

    fn cmp_magnitude(&self, other: &Decimal) -> Ordering {
        match (self.is_zero(), other.is_zero()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) => {}
        }
        self.magnitude().cmp(&other.magnitude()).then_with(|| {
            // Same leading position: the digits compare in order, missing ones being zeros.
            let len = self.digits.len().max(other.digits.len());
            (0..len)
                .map(|i| {
                    let a = self.digits.get(i).copied().unwrap_or(0);
                    let b = other.digits.get(i).copied().unwrap_or(0);
                    a.cmp(&b)
                })
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Decimal) -> Ordering {
        let sign = |d: &Decimal| match (d.is_zero(), d.negative) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        };
        match (sign(self), sign(other)) {
            (a, b) if a != b => a.cmp(&b),
            (0, _) => Ordering::Equal,
            (1, _) => self.cmp_magnitude(other),
            _ => other.cmp_magnitude(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Decimal) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Equal in value: `1.50` equals `1.5`.
impl PartialEq for Decimal {
    fn eq(&self, other: &Decimal) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Decimal {}

/// Digit strings of equal scale, most significant first; leading zeros are allowed.
fn compare_magnitudes(a: &[u8], b: &[u8]) -> Ordering {
    let strip = |d: &[u8]| d[d.iter().position(|x| *x != 0).unwrap_or(d.len())..].to_vec();
    let (a, b) = (strip(a), strip(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

fn add(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let (mut i, mut j, mut carry) = (a.len(), b.len(), 0);
    while i > 0 || j > 0 || carry > 0 {
        let x = if i > 0 { a[i - 1] } else { 0 };
        let y = if j > 0 { b[j - 1] } else { 0 };
        let sum = x + y + carry;
        out.push(sum % 10);
        carry = sum / 10;
        i = i.saturating_sub(1);
        j = j.saturating_sub(1);
    }
    out.reverse();
    out
}

/// `a - b` for `a >= b`.
fn subtract(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len());
    let (mut j, mut borrow) = (b.len(), 0);
    for &x in a.iter().rev() {
        let y = if j > 0 { b[j - 1] } else { 0 };
        j = j.saturating_sub(1);
        let (mut d, sub) = (x as i8, y as i8 + borrow);
        borrow = 0;
        if d < sub {
            d += 10;
            borrow = 1;
        }
        out.push((d - sub) as u8);
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::Decimal;

    fn d(text: &str) -> Decimal {
        Decimal::parse(text).unwrap_or_else(|| panic!("{text}"))
    }

    #[test]
    fn parses_decimal_and_exponent_forms() {
        assert_eq!(d("100"), d("1e2"));
        assert_eq!(d("100"), d("100.00"));
        assert_eq!(d("7.25e1"), d("72.5"));
        assert_eq!(d("-0.0"), d("0"));
        assert_eq!(d(".5"), d("0.5"));
        assert_eq!(d("+5"), d("5"));
        assert_eq!(d("1E-7"), d("0.0000001"));
        for bad in [
            "", "-", ".", "e5", "1e", "1.2.3", "abc", "1,5", "inf", "NaN", "1e5.5",
        ] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn orders_exactly() {
        let ascending = [
            "-100.5",
            "-100",
            "-99.5",
            "-0.105",
            "-0.1",
            "-0.0999",
            "0",
            "0.00001",
            "0.045",
            "0.0450001",
            "0.05",
            "0.1",
            "0.1000000000000000001",
            "1",
            "1.21",
            "9.99",
            "10",
            "1e21",
        ];
        for (i, a) in ascending.iter().enumerate() {
            for (j, b) in ascending.iter().enumerate() {
                assert_eq!(d(a).cmp(&d(b)), i.cmp(&j), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn adds_and_subtracts_exactly() {
        for (a, b, sum, difference) in [
            ("0.05", "0.005", "0.055", "0.045"),
            ("0.10", "0.005", "0.105", "0.095"),
            ("100", "0.5", "100.5", "99.5"),
            ("0", "0.005", "0.005", "-0.005"),
            ("-0.3", "0.03", "-0.27", "-0.33"),
            ("0.03", "-0.3", "-0.27", "0.33"),
            ("999.95", "0.05", "1000", "999.9"),
            ("1e2", "50", "150", "50"),
        ] {
            assert_eq!(d(a).plus(&d(b)), d(sum), "{a} + {b}");
            assert_eq!(d(a).minus(&d(b)), d(difference), "{a} - {b}");
        }
    }

    #[test]
    fn half_unit_follows_the_written_precision() {
        assert_eq!(d("100").half_unit(), d("0.5"));
        assert_eq!(d("100.00").half_unit(), d("0.005"));
        assert_eq!(d("1e2").half_unit(), d("50"));
        assert_eq!(d("7.25e1").half_unit(), d("0.05"));
        assert_eq!(d("-0.3").tenth_of_magnitude(), d("0.03"));
    }

    /// The stored number's digits survive serde_json: every decimal of up to three decimals
    /// below 100, and numbers of 15 significant digits, read back as written.
    #[test]
    fn json_numbers_keep_their_digits() {
        for i in 0..100_000u64 {
            let text = format!("{}.{:03}", i / 1000, i % 1000);
            let number: serde_json::Number = serde_json::from_str(&text).unwrap();
            assert_eq!(Decimal::of_json(&number).unwrap(), d(&text), "{text}");
        }
        for text in [
            "123456789012.345",
            "0.000123456789012345",
            "-98765.4321098765",
            "1e300",
        ] {
            let number: serde_json::Number = serde_json::from_str(text).unwrap();
            assert_eq!(Decimal::of_json(&number).unwrap(), d(text), "{text}");
        }
        let integer: serde_json::Number = serde_json::from_str("18446744073709551615").unwrap();
        assert_eq!(
            Decimal::of_json(&integer).unwrap(),
            d("18446744073709551615")
        );
    }
}
