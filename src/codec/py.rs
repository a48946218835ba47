//! Python objects to JSON text and back, in Rust.
//!
//! Two dialects of one writer: `CANONICAL` is byte for byte
//! `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)` (the host
//! apps' key format); `PAYLOAD` is compact UTF-8 JSON that other languages can read, so
//! it refuses NaN and infinities.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::{write_json_str, write_json_utf16_ascii, write_python_float};
use crate::pytext::str_of;

/// serde_json refuses documents nested deeper than this; the writer keeps to the same bound.
const MAX_DEPTH: usize = 127;

#[derive(Clone, Copy)]
pub struct JsonDialect {
    sort_keys: bool,
    ensure_ascii: bool,
    allow_nan: bool,
    /// Floats exactly as Python's repr writes them (else any shortest round-trip form).
    python_floats: bool,
}

pub const CANONICAL: JsonDialect = JsonDialect {
    sort_keys: true,
    ensure_ascii: true,
    allow_nan: true,
    python_floats: true,
};

pub const PAYLOAD: JsonDialect = JsonDialect {
    sort_keys: false,
    ensure_ascii: false,
    allow_nan: false,
    python_floats: false,
};

pub fn to_json(obj: &Bound<'_, PyAny>, dialect: JsonDialect) -> PyResult<String> {
    let mut out = String::with_capacity(64);
    write_value(&mut out, obj, dialect, 0)?;
    Ok(out)
}

thread_local! {
    /// Set by the writer when the JSON it wrote reads back as a different object: a tuple
    /// (a list then), a key that is not a str, a subclass of a JSON type.
    static REWRITTEN: Cell<bool> = const { Cell::new(false) };
}

fn rewritten() {
    REWRITTEN.with(|r| r.set(true));
}

/// The payload JSON of `obj`, and whether reading it back gives an equal object of the
/// same types (then the object itself can be kept as the cached value).
pub fn to_json_checked(obj: &Bound<'_, PyAny>) -> PyResult<(String, bool)> {
    REWRITTEN.with(|r| r.set(false));
    let text = to_json(obj, PAYLOAD)?;
    Ok((text, !REWRITTEN.with(|r| r.get())))
}

fn write_str(out: &mut String, s: &Bound<'_, PyString>, dialect: JsonDialect) -> PyResult<()> {
    match str_of(s) {
        Ok(text) => {
            write_json_str(out, &text, dialect.ensure_ascii);
            Ok(())
        }
        // Lone surrogates: not UTF-8, but Python's ensure_ascii output escapes them.
        Err(_) if dialect.ensure_ascii => {
            let encoded = s.call_method1("encode", ("utf-16-le", "surrogatepass"))?;
            let bytes: &[u8] = encoded.extract()?;
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                .collect();
            write_json_utf16_ascii(out, &units);
            Ok(())
        }
        Err(_) => Err(PyValueError::new_err(
            "string contains a lone surrogate and cannot be stored as UTF-8 JSON",
        )),
    }
}

fn write_int(out: &mut String, obj: &Bound<'_, PyAny>) -> PyResult<()> {
    match obj.extract::<i64>() {
        Ok(n) => out.push_str(&n.to_string()),
        // Big ints (and int subclasses such as IntEnum): int.__repr__, as json does.
        Err(_) => {
            let repr = obj
                .py()
                .get_type::<PyInt>()
                .getattr("__repr__")?
                .call1((obj,))?;
            out.push_str(&str_of(repr.cast::<PyString>()?)?);
        }
    }
    Ok(())
}

fn write_float(py: Python<'_>, out: &mut String, x: f64, dialect: JsonDialect) -> PyResult<()> {
    if !x.is_finite() && !dialect.allow_nan {
        return Err(PyValueError::new_err(format!(
            "Out of range float values are not JSON compliant: {x}"
        )));
    }
    if dialect.python_floats && x.is_finite() {
        // Keys must match Python byte for byte, and when two shortest decimals are equally
        // close (562949953421312.25 → "…312.2" or "…312.3") Python and Rust break the tie
        // differently (found by hypothesis). Python's own repr is the only exact answer.
        out.push_str(&str_of(&PyFloat::new(py, x).repr()?)?);
    } else {
        write_python_float(out, x);
    }
    Ok(())
}

/// A dict key as json writes it: str as is; float, int, bool, None as their JSON text.
fn key_text<'a>(key: &'a Bound<'_, PyAny>, dialect: JsonDialect) -> PyResult<KeyText<'a>> {
    if let Ok(s) = key.cast::<PyString>() {
        if !key.is_exact_instance_of::<PyString>() {
            rewritten();
        }
        return Ok(KeyText::Str(s.clone()));
    }
    rewritten();
    let mut text = String::new();
    if key.is_none() {
        text.push_str("null");
    } else if let Ok(b) = key.cast::<PyBool>() {
        text.push_str(if b.is_true() { "true" } else { "false" });
    } else if key.cast::<PyInt>().is_ok() {
        write_int(&mut text, key)?;
    } else if let Ok(f) = key.cast::<PyFloat>() {
        write_float(key.py(), &mut text, f.value(), dialect)?;
    } else {
        return Err(PyTypeError::new_err(format!(
            "keys must be str, int, float, bool or None, not {}",
            type_name(key)
        )));
    }
    Ok(KeyText::Plain(text))
}

enum KeyText<'py> {
    Str(Bound<'py, PyString>),
    Plain(String),
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn utf8_of<'a>(obj: &'a Bound<'_, PyAny>) -> Cow<'a, str> {
    obj.cast::<PyString>()
        .ok()
        .and_then(|s| str_of(s).ok())
        .unwrap_or(Cow::Borrowed(""))
}

fn write_dict(
    out: &mut String,
    dict: &Bound<'_, PyDict>,
    dialect: JsonDialect,
    depth: usize,
) -> PyResult<()> {
    let mut items: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)> = dict.iter().collect();
    if dialect.sort_keys && items.len() > 1 {
        let all_utf8_str = items.iter().all(|(k, _)| {
            k.cast::<PyString>()
                .map(|s| str_of(s).is_ok())
                .unwrap_or(false)
        });
        if all_utf8_str {
            // UTF-8 byte order is code point order, which is how Python compares str.
            items.sort_by(|(a, _), (b, _)| utf8_of(a).cmp(&utf8_of(b)));
        } else {
            // Mixed or exotic keys: let Python compare them (and raise TypeError as json does).
            let keys = PyList::new(dict.py(), items.iter().map(|(k, _)| k))?;
            keys.sort()?;
            items = keys
                .iter()
                .map(|k| {
                    let v = dict.get_item(&k)?.expect("key taken from this dict");
                    Ok((k, v))
                })
                .collect::<PyResult<_>>()?;
        }
    }
    out.push('{');
    for (i, (key, value)) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match key_text(key, dialect)? {
            KeyText::Str(s) => write_str(out, &s, dialect)?,
            KeyText::Plain(text) => write_json_str(out, &text, dialect.ensure_ascii),
        }
        out.push(':');
        write_value(out, value, dialect, depth + 1)?;
    }
    out.push('}');
    Ok(())
}

/// Appends `obj` as JSON text in `dialect`.
pub fn write_value(
    out: &mut String,
    obj: &Bound<'_, PyAny>,
    dialect: JsonDialect,
    depth: usize,
) -> PyResult<()> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "value is nested deeper than {MAX_DEPTH} levels (or refers to itself)"
        )));
    }
    if obj.is_none() {
        out.push_str("null");
    } else if let Ok(b) = obj.cast::<PyBool>() {
        out.push_str(if b.is_true() { "true" } else { "false" });
    } else if let Ok(s) = obj.cast::<PyString>() {
        if !obj.is_exact_instance_of::<PyString>() {
            rewritten();
        }
        write_str(out, s, dialect)?;
    } else if obj.cast::<PyInt>().is_ok() {
        if !obj.is_exact_instance_of::<PyInt>() {
            rewritten();
        }
        write_int(out, obj)?;
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        if !obj.is_exact_instance_of::<PyFloat>() {
            rewritten();
        }
        write_float(obj.py(), out, f.value(), dialect)?;
    } else if let Ok(list) = obj.cast::<PyList>() {
        if !obj.is_exact_instance_of::<PyList>() {
            rewritten();
        }
        out.push('[');
        for (i, item) in list.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_value(out, &item, dialect, depth + 1)?;
        }
        out.push(']');
    } else if let Ok(tuple) = obj.cast::<PyTuple>() {
        rewritten();
        out.push('[');
        for (i, item) in tuple.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_value(out, &item, dialect, depth + 1)?;
        }
        out.push(']');
    } else if let Ok(dict) = obj.cast::<PyDict>() {
        if !obj.is_exact_instance_of::<PyDict>() {
            rewritten();
        }
        write_dict(out, dict, dialect, depth)?;
    } else {
        return Err(PyTypeError::new_err(format!(
            "Object of type {} is not JSON serializable",
            type_name(obj)
        )));
    }
    Ok(())
}

/// Builds Python objects straight from JSON text (no intermediate tree).
pub fn from_json<'py>(py: Python<'py>, text: &str) -> Result<Bound<'py, PyAny>, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = PySeed(py).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

struct PySeed<'py>(Python<'py>);

/// The map key under which serde_json (with `arbitrary_precision`) passes a number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A JSON number as Python reads it: an int of any size, or the float nearest the text
/// (Rust's parser rounds correctly, as Python's does).
fn number<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        let x: f64 = text
            .parse()
            .map_err(|_| PyValueError::new_err(format!("invalid JSON number {text:?}")))?;
        return Ok(PyFloat::new(py, x).into_any());
    }
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n.into_pyobject(py)?.into_any());
    }
    py.get_type::<PyInt>().call1((text,))
}

impl<'de, 'py> DeserializeSeed<'de> for PySeed<'py> {
    type Value = Bound<'py, PyAny>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn py_err<E: serde::de::Error>(err: PyErr) -> E {
    E::custom(err.to_string())
}

impl<'de, 'py> Visitor<'de> for PySeed<'py> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0.None().into_bound(self.0))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(PyBool::new(self.0, v).to_owned().into_any())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into_pyobject(self.0)
            .unwrap_or_else(|never| match never {})
            .into_any())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into_pyobject(self.0)
            .unwrap_or_else(|never| match never {})
            .into_any())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(PyFloat::new(self.0, v).into_any())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.0, v).into_any())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let list = PyList::empty(self.0);
        while let Some(item) = seq.next_element_seed(PySeed(self.0))? {
            list.append(item).map_err(py_err)?;
        }
        Ok(list.into_any())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let dict = PyDict::new(self.0);
        let mut first = true;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if first && key == NUMBER_TOKEN {
                // serde_json's arbitrary_precision hands every number over as its text.
                let text = map.next_value::<Cow<'de, str>>()?;
                return number(self.0, &text).map_err(py_err);
            }
            first = false;
            let value = map.next_value_seed(PySeed(self.0))?;
            dict.set_item(PyString::new(self.0, &key), value)
                .map_err(py_err)?;
        }
        Ok(dict.into_any())
    }
}
