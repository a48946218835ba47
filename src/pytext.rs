//! The text of a Python `str`. The full C API lends it without a copy; the limited API of
//! an abi3 wheel for Python 3.9 has no such call before 3.10, so the text is copied there
//! (version-specific builds, the default, keep the borrow on every hot path).

use std::borrow::Cow;

use pyo3::prelude::*;
use pyo3::types::PyString;

#[cfg(any(not(Py_LIMITED_API), Py_3_10))]
pub fn str_of<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    s.to_str().map(Cow::Borrowed)
}

#[cfg(all(Py_LIMITED_API, not(Py_3_10)))]
pub fn str_of<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    s.to_cow()
}
