//! The Python exception hierarchy: everything tenuto raises on its own account derives
//! from `TenutoError`; bad input raises the `ValueError`/`TypeError` Python users expect.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

use super::CoreError;

create_exception!(
    tenuto._core,
    TenutoError,
    PyException,
    "Base class of the errors tenuto raises on its own account."
);
create_exception!(
    tenuto._core,
    BackendUnavailable,
    TenutoError,
    "The cache backend could not be reached and the cache was built with fail_open=False."
);
create_exception!(
    tenuto._core,
    BackendError,
    TenutoError,
    "The cache backend answered with an error and the cache was built with fail_open=False."
);

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        match err {
            CoreError::InvalidValue(msg) => PyValueError::new_err(msg),
            CoreError::InvalidType(msg) => PyTypeError::new_err(msg),
            CoreError::BackendUnavailable(msg) => BackendUnavailable::new_err(msg),
            CoreError::Backend(msg) => BackendError::new_err(msg),
            CoreError::WouldDeadlock(msg) => PyRuntimeError::new_err(msg),
        }
    }
}

/// An integer argument read without `OverflowError`: values beyond 64 bits saturate, so
/// the argument's own range check answers with a `ValueError` that names it.
pub struct Count(pub i64);

impl<'py> pyo3::FromPyObject<'_, 'py> for Count {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'_, 'py, pyo3::PyAny>) -> Result<Self, Self::Error> {
        use pyo3::types::PyAnyMethods;
        match obj.extract::<i64>() {
            Ok(n) => Ok(Count(n)),
            Err(err) if err.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) => {
                Ok(Count(if obj.lt(0)? { i64::MIN } else { i64::MAX }))
            }
            Err(err) => Err(err),
        }
    }
}
