//! JSON text the way Python's `json.dumps` writes it (so keys hash identically across the
//! host apps' processes and tenuto), and the envelope wire format other processes read.

use serde::Deserialize;
use serde_json::value::RawValue;

#[cfg(feature = "python")]
pub mod py;

/// Appends a finite float in Python's repr layout, e.g. `1.5`, `1e+16`, `1e-05`, with
/// Rust's shortest digits. These equal Python's except when two shortest decimals are
/// equally close to the value (Rust and Python break that tie differently), so stable
/// keys use Python's repr itself (see `codec::py`).
/// Non-finite values are written as Python's json does: `NaN`, `Infinity`, `-Infinity`.
pub fn write_python_float(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("NaN");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, as Python's repr does;
    // only the layout differs.
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci
        .split_once('e')
        .expect("LowerExp always has an exponent");
    let exponent: i32 = exponent.parse().expect("LowerExp exponent is an integer");
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let point = exponent + 1; // digits before the decimal point
    if negative {
        out.push('-');
    }
    if -4 < point && point <= 16 {
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(&digits);
        } else if point as usize >= digits.len() {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point as usize]);
            out.push('.');
            out.push_str(&digits[point as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let shown = point - 1;
        out.push('e');
        out.push(if shown < 0 { '-' } else { '+' });
        let magnitude = shown.unsigned_abs();
        if magnitude < 10 {
            out.push('0');
        }
        out.push_str(&magnitude.to_string());
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_u16_escape(out: &mut String, unit: u16) {
    out.push_str("\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((unit >> shift) & 0xF) as usize] as char);
    }
}

fn push_short_escape(out: &mut String, ch: char) -> bool {
    let escaped = match ch {
        '"' => "\\\"",
        '\\' => "\\\\",
        '\n' => "\\n",
        '\r' => "\\r",
        '\t' => "\\t",
        '\u{08}' => "\\b",
        '\u{0c}' => "\\f",
        _ => return false,
    };
    out.push_str(escaped);
    true
}

/// Appends a JSON string literal. With `ensure_ascii` everything outside printable ASCII
/// becomes `\uXXXX` (UTF-16 units, lower-case hex), exactly as Python's json does;
/// without it only quotes, backslashes and control characters are escaped.
pub fn write_json_str(out: &mut String, text: &str, ensure_ascii: bool) {
    out.push('"');
    for ch in text.chars() {
        if (' '..='~').contains(&ch) && ch != '"' && ch != '\\' {
            out.push(ch);
        } else if push_short_escape(out, ch) {
        } else if (ch as u32) < 0x20 || (ensure_ascii && ch as u32 >= 0x7f) {
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                push_u16_escape(out, *unit);
            }
        } else {
            out.push(ch);
        }
    }
    out.push('"');
}

/// Appends a JSON string literal from UTF-16 code units that may hold lone surrogates
/// (Python strings can), escaping every non-ASCII unit as Python's `ensure_ascii` does.
pub fn write_json_utf16_ascii(out: &mut String, units: &[u16]) {
    out.push('"');
    for &unit in units {
        let ch = char::from_u32(unit as u32).filter(|c| c.is_ascii());
        match ch {
            Some(c) if (' '..='~').contains(&c) && c != '"' && c != '\\' => out.push(c),
            Some(c) if push_short_escape(out, c) => {}
            _ => push_u16_escape(out, unit),
        }
    }
    out.push('"');
}

/// The envelope as stored in Redis: one JSON object, payload first. `codec` is present
/// only for opt-in pickle payloads (a base64 string then); `negative` only on negative
/// answers (the streak of consecutive ones, which sets the next backoff).
pub fn encode_envelope(
    payload_json: &str,
    times: crate::cache::Times,
    codec: Option<&str>,
    negative: u32,
) -> Vec<u8> {
    let mut out = String::with_capacity(payload_json.len() + 96);
    out.push_str("{\"payload\":");
    out.push_str(payload_json);
    for (name, value) in [
        ("fetched_at", times.fetched_at),
        ("fresh_until", times.fresh_until),
        ("stale_until", times.stale_until),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        out.push_str(&value.to_string());
    }
    if let Some(codec) = codec {
        out.push_str(",\"codec\":");
        write_json_str(&mut out, codec, true);
    }
    if negative > 0 {
        out.push_str(",\"negative\":");
        out.push_str(&negative.to_string());
    }
    out.push('}');
    out.into_bytes()
}

/// Epoch seconds as stored: integers, though floats written by other tools are floored.
fn epoch_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    n.as_f64()
        .filter(|f| f.is_finite())
        .map(|f| f.floor() as i64)
        .ok_or_else(|| serde::de::Error::custom("epoch seconds out of range"))
}

#[derive(Deserialize)]
pub struct WireEnvelope<'a> {
    #[serde(borrow)]
    pub payload: &'a RawValue,
    #[serde(deserialize_with = "epoch_seconds")]
    pub fetched_at: i64,
    #[serde(deserialize_with = "epoch_seconds")]
    pub fresh_until: i64,
    #[serde(deserialize_with = "epoch_seconds")]
    pub stale_until: i64,
    #[serde(default)]
    pub codec: Option<String>,
    #[serde(default)]
    pub negative: u32,
}

impl WireEnvelope<'_> {
    pub fn times(&self) -> crate::cache::Times {
        crate::cache::Times {
            fetched_at: self.fetched_at,
            fresh_until: self.fresh_until,
            stale_until: self.stale_until,
        }
    }
}

/// Parses a stored envelope; anything else under a tenuto key is an error (read as a miss).
pub fn decode_envelope(bytes: &[u8]) -> Result<WireEnvelope<'_>, String> {
    serde_json::from_slice(bytes).map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float(x: f64) -> String {
        let mut s = String::new();
        write_python_float(&mut s, x);
        s
    }

    #[test]
    fn floats_match_python_repr() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.5e-300, "-2.5e-300"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(float(x), want, "{x:e}");
        }
    }

    #[test]
    fn strings_escape_like_python() {
        let mut s = String::new();
        write_json_str(&mut s, "a\"b\\c\n\u{1}é😀\u{7f}", true);
        assert_eq!(s, r#""a\"b\\c\n\u0001\u00e9\ud83d\ude00\u007f""#);
        let mut s = String::new();
        write_json_str(&mut s, "é\u{1}", false);
        assert_eq!(s, "\"é\\u0001\"");
    }

    #[test]
    fn envelope_round_trips() {
        let times = crate::cache::Times {
            fetched_at: 1,
            fresh_until: 2,
            stale_until: 3,
        };
        let bytes = encode_envelope("{\"a\":[1,2]}", times, None, 0);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"payload":{"a":[1,2]},"fetched_at":1,"fresh_until":2,"stale_until":3}"#
        );
        let decoded = decode_envelope(&bytes).unwrap();
        assert_eq!(decoded.times(), times);
        assert_eq!(decoded.payload.get(), "{\"a\":[1,2]}");
        let negative = encode_envelope("null", times, None, 3);
        assert_eq!(decode_envelope(&negative).unwrap().negative, 3);
        assert!(decode_envelope(b"not json").is_err());
        assert!(decode_envelope(br#"{"payload":1}"#).is_err());
        let floats =
            decode_envelope(br#"{"payload":1,"fetched_at":1.9,"fresh_until":2,"stale_until":3}"#);
        assert_eq!(floats.unwrap().fetched_at, 1);
    }
}
