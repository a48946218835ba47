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
