//! `tenuto.Defaults`: complete records from existing values, then fetched values, then
//! defaults; values of the wrong type or out of range are replaced (and counted).

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyMapping, PyString};

use super::Range;

struct Field {
    name: Py<PyString>,
    default: Py<PyAny>,
    range: Option<Range>,
    applied: AtomicU64,
    replaced: AtomicU64,
}

/// Completes records with defaults: `complete(existing, fetched)` takes each key's value
/// from `existing` if present, not None and valid, else from `fetched` likewise, else
/// the default. Inputs are never modified.
#[pyclass(frozen, module = "tenuto._core", name = "Defaults")]
pub struct PyDefaults {
    fields: Vec<Field>,
    records: AtomicU64,
    with_defaults: AtomicU64,
}

fn range_of(name: &str, spec: &Bound<'_, PyAny>) -> PyResult<Range> {
    let attr = |attr: &str| spec.getattr(attr);
    let bound = |value: Bound<'_, PyAny>| -> PyResult<Option<f64>> {
        if value.is_none() {
            Ok(None)
        } else {
            value.extract::<f64>().map(Some).map_err(|_| {
                PyTypeError::new_err(format!("range bounds of {name:?} must be numbers or None"))
            })
        }
    };
    // A tenuto.Range, or a (min, max) pair of inclusive bounds.
    if let Ok((min, max)) = spec.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>() {
        return Ok(Range {
            min: bound(min)?,
            max: bound(max)?,
            min_exclusive: false,
            max_exclusive: false,
            integer: false,
        });
    }
    Ok(Range {
        min: bound(attr("min")?)?,
        max: bound(attr("max")?)?,
        min_exclusive: attr("min_exclusive")?.is_truthy()?,
        max_exclusive: attr("max_exclusive")?.is_truthy()?,
        integer: attr("integer")?.is_truthy()?,
    })
}

impl PyDefaults {
    fn valid(field: &Field, value: &Bound<'_, PyAny>) -> bool {
        let Some(range) = &field.range else {
            return true;
        };
        if value.cast::<PyBool>().is_ok() {
            return false;
        }
        if let Ok(int) = value.cast::<PyInt>() {
            return int.extract::<f64>().is_ok_and(|x| range.allows(x, true));
        }
        if let Ok(float) = value.cast::<PyFloat>() {
            return range.allows(float.value(), false);
        }
        false
    }

    /// The value of `field` from `source`: present, not None and valid; an invalid one
    /// is counted.
    fn take<'py>(
        field: &Field,
        source: Option<&Bound<'py, PyMapping>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(source) = source else {
            return Ok(None);
        };
        let py = source.py();
        let value = match source.get_item(field.name.bind(py)) {
            Ok(v) => v,
            Err(err) if err.is_instance_of::<pyo3::exceptions::PyKeyError>(py) => return Ok(None),
            Err(err) => return Err(err),
        };
        if value.is_none() {
            return Ok(None);
        }
        if Self::valid(field, &value) {
            Ok(Some(value))
        } else {
            field.replaced.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
    }

    fn complete_one<'py>(
        &self,
        py: Python<'py>,
        existing: Option<&Bound<'py, PyMapping>>,
        fetched: Option<&Bound<'py, PyMapping>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        // Keys without defaults pass through: existing first, then fetched (non-None).
        for source in [existing, fetched].into_iter().flatten() {
            for item in source.items()?.iter() {
                let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item.extract()?;
                if !out.contains(&key)? && (!value.is_none() || !self.has_field(&key)) {
                    out.set_item(&key, &value)?;
                }
            }
        }
        let mut used_default = false;
        for field in &self.fields {
            let value = match Self::take(field, existing)? {
                Some(v) => v,
                None => match Self::take(field, fetched)? {
                    Some(v) => v,
                    None => {
                        used_default = true;
                        field.applied.fetch_add(1, Ordering::Relaxed);
                        field.default.bind(py).clone()
                    }
                },
            };
            out.set_item(field.name.bind(py), value)?;
        }
        self.records.fetch_add(1, Ordering::Relaxed);
        if used_default {
            self.with_defaults.fetch_add(1, Ordering::Relaxed);
        }
        Ok(out)
    }

    fn has_field(&self, key: &Bound<'_, PyAny>) -> bool {
        key.cast::<PyString>()
            .ok()
            .and_then(|k| k.to_str().ok())
            .is_some_and(|k| {
                self.fields
                    .iter()
                    .any(|f| f.name.bind(key.py()).to_str().is_ok_and(|n| n == k))
            })
    }
}

fn mapping_arg<'a, 'py>(
    what: &str,
    obj: &'a Bound<'py, PyAny>,
) -> PyResult<Option<&'a Bound<'py, PyMapping>>> {
    if obj.is_none() {
        return Ok(None);
    }
    obj.cast::<PyMapping>().map(Some).map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a mapping or None, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

#[pymethods]
impl PyDefaults {
    #[new]
    #[pyo3(signature = (defaults, ranges = None))]
    fn new(
        py: Python<'_>,
        defaults: &Bound<'_, PyAny>,
        ranges: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let defaults = defaults.cast::<PyMapping>().map_err(|_| {
            PyTypeError::new_err("defaults must be a mapping of field name to default value")
        })?;
        let ranges = match ranges {
            Some(r) if !r.is_none() => Some(
                r.cast::<PyMapping>()
                    .map_err(|_| PyTypeError::new_err("ranges must be a mapping"))?
                    .clone(),
            ),
            _ => None,
        };
        let mut fields = Vec::new();
        for item in defaults.items()?.iter() {
            let (name, default): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            let name = name
                .cast_into::<PyString>()
                .map_err(|_| PyTypeError::new_err("field names must be str"))?;
            let range = match &ranges {
                Some(r) if r.contains(&name)? => {
                    Some(range_of(name.to_str()?, &r.get_item(&name)?)?)
                }
                _ => None,
            };
            fields.push(Field {
                name: name.unbind(),
                default: default.unbind(),
                range,
                applied: AtomicU64::new(0),
                replaced: AtomicU64::new(0),
            });
        }
        if let Some(r) = &ranges {
            for key in r.keys()?.iter() {
                if !fields
                    .iter()
                    .any(|f| f.name.bind(py).as_any().eq(&key).unwrap_or(false))
                {
                    return Err(PyValueError::new_err(format!(
                        "range given for {key}, which has no default"
                    )));
                }
            }
        }
        Ok(Self {
            fields,
            records: AtomicU64::new(0),
            with_defaults: AtomicU64::new(0),
        })
    }

    /// One complete record (a new dict).
    #[pyo3(signature = (existing = None, fetched = None))]
    fn complete<'py>(
        &self,
        py: Python<'py>,
        existing: Option<&Bound<'py, PyAny>>,
        fetched: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let none = py.None().into_bound(py);
        let existing = mapping_arg("existing", existing.unwrap_or(&none))?;
        let fetched = mapping_arg("fetched", fetched.unwrap_or(&none))?;
        self.complete_one(py, existing, fetched)
    }

    /// `{id: record}` for every id in either mapping (existing's order first).
    #[pyo3(signature = (existing_by_id, fetched_by_id = None))]
    fn complete_many<'py>(
        &self,
        py: Python<'py>,
        existing_by_id: &Bound<'py, PyAny>,
        fetched_by_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let none = py.None().into_bound(py);
        let existing = mapping_arg("existing_by_id", existing_by_id)?;
        let fetched = mapping_arg("fetched_by_id", fetched_by_id.unwrap_or(&none))?;
        let out = PyDict::new(py);
        for source in [existing, fetched].into_iter().flatten() {
            for id in source.keys()?.iter() {
                if out.contains(&id)? {
                    continue;
                }
                let record_of =
                    |m: Option<&Bound<'py, PyMapping>>| -> PyResult<Option<Bound<'py, PyAny>>> {
                        match m {
                            Some(m) if m.contains(&id)? => Ok(Some(m.get_item(&id)?)),
                            _ => Ok(None),
                        }
                    };
                let (e, f) = (record_of(existing)?, record_of(fetched)?);
                let e = match &e {
                    Some(v) => mapping_arg("a record", v)?,
                    None => None,
                };
                let f = match &f {
                    Some(v) => mapping_arg("a record", v)?,
                    None => None,
                };
                out.set_item(&id, self.complete_one(py, e, f)?)?;
            }
        }
        Ok(out)
    }

    /// Counters since creation (or `reset()`): records completed, records that needed a
    /// default, defaults applied and invalid values replaced, per field.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let applied = PyDict::new(py);
        let replaced = PyDict::new(py);
        for f in &self.fields {
            applied.set_item(f.name.bind(py), f.applied.load(Ordering::Relaxed))?;
            replaced.set_item(f.name.bind(py), f.replaced.load(Ordering::Relaxed))?;
        }
        d.set_item("records", self.records.load(Ordering::Relaxed))?;
        d.set_item("with_defaults", self.with_defaults.load(Ordering::Relaxed))?;
        d.set_item("defaults_applied", applied)?;
        d.set_item("invalid_replaced", replaced)?;
        Ok(d)
    }

    /// The host app's log line, e.g. "features for 41/50 tracks, 9 using defaults".
    #[pyo3(signature = (what = "features", unit = "tracks"))]
    fn summary(&self, what: &str, unit: &str) -> String {
        let records = self.records.load(Ordering::Relaxed);
        let with_defaults = self.with_defaults.load(Ordering::Relaxed);
        format!(
            "{what} for {}/{records} {unit}, {with_defaults} using defaults",
            records - with_defaults
        )
    }

    /// Zeroes the counters (e.g. per batch, before logging `summary()`).
    fn reset(&self) {
        self.records.store(0, Ordering::Relaxed);
        self.with_defaults.store(0, Ordering::Relaxed);
        for f in &self.fields {
            f.applied.store(0, Ordering::Relaxed);
            f.replaced.store(0, Ordering::Relaxed);
        }
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        for f in &self.fields {
            visit.call(&f.default)?;
        }
        Ok(())
    }
}
