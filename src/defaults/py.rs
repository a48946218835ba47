//! `tenuto.Defaults`: complete records from existing values, then fetched values, then
//! defaults; values of the wrong type or out of range are replaced (and counted).

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyFrozenSet, PyInt, PyMapping, PyString};

use super::Range;

struct Field {
    name: Py<PyString>,
    default: Py<PyAny>,
    range: Option<Range>,
    applied: AtomicU64,
    replaced: AtomicU64,
}

/// Completes records with defaults: `complete(existing, fetched)` takes each field from
/// `existing` if present, not None and valid, else from `fetched` likewise, else the
/// default; other keys pass through. Inputs are never modified.
#[pyclass(frozen, module = "tenuto._core", name = "Defaults")]
pub struct PyDefaults {
    fields: Vec<Field>,
    /// The field names, to tell fields from pass-through keys.
    names: Py<PyFrozenSet>,
    records: AtomicU64,
    with_defaults: AtomicU64,
}

/// A record: a dict (the fast path: a missing key raises nothing) or another mapping.
enum Source<'a, 'py> {
    Dict(&'a Bound<'py, PyDict>),
    Mapping(&'a Bound<'py, PyMapping>),
}

impl<'py> Source<'_, 'py> {
    fn get(&self, key: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self {
            Source::Dict(d) => d.get_item(key),
            Source::Mapping(m) => match m.get_item(key) {
                Ok(v) => Ok(Some(v)),
                Err(err) if err.is_instance_of::<PyKeyError>(m.py()) => Ok(None),
                Err(err) => Err(err),
            },
        }
    }

    fn for_each(
        &self,
        mut f: impl FnMut(Bound<'py, PyAny>, Bound<'py, PyAny>) -> PyResult<()>,
    ) -> PyResult<()> {
        match self {
            Source::Dict(d) => d.iter().try_for_each(|(k, v)| f(k, v)),
            Source::Mapping(m) => m.items()?.iter().try_for_each(|item| {
                let (k, v) = item.extract()?;
                f(k, v)
            }),
        }
    }
}

fn source_of<'a, 'py>(what: &str, obj: &'a Bound<'py, PyAny>) -> PyResult<Option<Source<'a, 'py>>> {
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        return Ok(Some(Source::Dict(d)));
    }
    match obj.cast::<PyMapping>() {
        Ok(m) => Ok(Some(Source::Mapping(m))),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} must be a mapping or None, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))),
    }
}

fn range_of(name: &str, spec: &Bound<'_, PyAny>) -> PyResult<Range> {
    let bound = |value: Bound<'_, PyAny>| -> PyResult<Option<f64>> {
        if value.is_none() {
            return Ok(None);
        }
        if value.cast::<PyBool>().is_ok() {
            return Err(PyTypeError::new_err(format!(
                "range bounds of {name:?} must be numbers or None, not bool"
            )));
        }
        value.extract::<f64>().map(Some).map_err(|_| {
            PyTypeError::new_err(format!("range bounds of {name:?} must be numbers or None"))
        })
    };
    let flag = |attr: &str| -> PyResult<bool> { spec.getattr(attr)?.is_truthy() };
    // A (min, max) pair of inclusive bounds, or a tenuto.Range.
    let range = if let Ok((min, max)) = spec.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>() {
        Range {
            min: bound(min)?,
            max: bound(max)?,
            min_exclusive: false,
            max_exclusive: false,
            integer: false,
        }
    } else if spec.hasattr("min")? && spec.hasattr("max")? {
        Range {
            min: bound(spec.getattr("min")?)?,
            max: bound(spec.getattr("max")?)?,
            min_exclusive: flag("min_exclusive")?,
            max_exclusive: flag("max_exclusive")?,
            integer: flag("integer")?,
        }
    } else {
        return Err(PyTypeError::new_err(format!(
            "the range of {name:?} must be a (min, max) pair or a tenuto.Range, not {}",
            spec.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )));
    };
    match range.problem() {
        Some(problem) => Err(PyValueError::new_err(format!(
            "the range of {name:?} is invalid: {problem}"
        ))),
        None => Ok(range),
    }
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

    /// The value of `field` in `source` if present, not None and valid (an invalid one
    /// is counted).
    fn take<'py>(
        py: Python<'py>,
        field: &Field,
        source: Option<&Source<'_, 'py>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(source) = source else {
            return Ok(None);
        };
        let Some(value) = source.get(field.name.bind(py).as_any())? else {
            return Ok(None);
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
        existing: Option<&Source<'_, 'py>>,
        fetched: Option<&Source<'_, 'py>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let names = self.names.bind(py);
        // Other keys pass through: existing's first, then fetched's where existing had
        // none or None.
        for source in [existing, fetched].into_iter().flatten() {
            source.for_each(|key, value| {
                if names.contains(&key)? {
                    return Ok(());
                }
                let replace = match out.get_item(&key)? {
                    None => true,
                    Some(current) => current.is_none() && !value.is_none(),
                };
                if replace {
                    out.set_item(&key, &value)?;
                }
                Ok(())
            })?;
        }
        let mut used_default = false;
        for field in &self.fields {
            let value = match Self::take(py, field, existing)? {
                Some(v) => v,
                None => match Self::take(py, field, fetched)? {
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
        let names = PyFrozenSet::new(py, fields.iter().map(|f| f.name.bind(py)))?;
        if let Some(r) = &ranges {
            for key in r.keys()?.iter() {
                if !names.contains(&key)? {
                    return Err(PyValueError::new_err(format!(
                        "range given for {key}, which has no default"
                    )));
                }
            }
        }
        Ok(Self {
            fields,
            names: names.unbind(),
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
        let existing = source_of("existing", existing.unwrap_or(&none))?;
        let fetched = source_of("fetched", fetched.unwrap_or(&none))?;
        self.complete_one(py, existing.as_ref(), fetched.as_ref())
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
        let existing = source_of("existing_by_id", existing_by_id)?;
        let fetched = source_of("fetched_by_id", fetched_by_id.unwrap_or(&none))?;
        let out = PyDict::new(py);
        for source in [&existing, &fetched].into_iter().flatten() {
            source.for_each(|id, _| {
                if out.contains(&id)? {
                    return Ok(());
                }
                let e = match &existing {
                    Some(m) => m.get(&id)?,
                    None => None,
                };
                let f = match &fetched {
                    Some(m) => m.get(&id)?,
                    None => None,
                };
                let e = match &e {
                    Some(v) => source_of("a record", v)?,
                    None => None,
                };
                let f = match &f {
                    Some(v) => source_of("a record", v)?,
                    None => None,
                };
                out.set_item(&id, self.complete_one(py, e.as_ref(), f.as_ref())?)
            })?;
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

    /// Zeroes the counters (e.g. per batch, after logging `summary()`).
    fn reset(&self) {
        self.records.store(0, Ordering::Relaxed);
        self.with_defaults.store(0, Ordering::Relaxed);
        for f in &self.fields {
            f.applied.store(0, Ordering::Relaxed);
            f.replaced.store(0, Ordering::Relaxed);
        }
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.names)?;
        for f in &self.fields {
            visit.call(&f.default)?;
        }
        Ok(())
    }
}
