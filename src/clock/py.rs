//! `tenuto.testing.FakeClock` and the clock argument every tenuto object takes.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::{Clock, ClockRef, ManualClock};

const NANOS: f64 = 1e9;

fn to_nanos(seconds: f64) -> PyResult<i64> {
    if !seconds.is_finite() || seconds.abs() > 9.0e9 {
        return Err(PyValueError::new_err(format!(
            "clock time must be a finite number of epoch seconds, got {seconds}"
        )));
    }
    Ok((seconds * NANOS).round() as i64)
}

/// A clock that moves only when told to: `advance(seconds)`, `set(epoch_seconds)`.
/// Pass it as `clock=` to tenuto objects; calling it returns the time as a float.
#[pyclass(frozen, module = "tenuto._core", name = "FakeClock")]
pub struct PyFakeClock {
    clock: Arc<ManualClock>,
}

#[pymethods]
impl PyFakeClock {
    #[new]
    #[pyo3(signature = (start = 1_700_000_000.0))]
    fn new(start: f64) -> PyResult<Self> {
        Ok(Self {
            clock: ManualClock::new(to_nanos(start)?),
        })
    }

    /// The current fake time in epoch seconds.
    fn now(&self) -> f64 {
        self.clock.now_nanos() as f64 / NANOS
    }

    fn __call__(&self) -> f64 {
        self.now()
    }

    /// Moves the clock forward (or back, with a negative number) by `seconds`.
    fn advance(&self, seconds: f64) -> PyResult<f64> {
        self.clock.advance_nanos(to_nanos(seconds)?);
        Ok(self.now())
    }

    /// Sets the clock to `epoch_seconds`.
    fn set(&self, epoch_seconds: f64) -> PyResult<()> {
        self.clock.set_nanos(to_nanos(epoch_seconds)?);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("FakeClock({})", self.now())
    }
}

impl PyFakeClock {
    pub(crate) fn manual(&self) -> Arc<ManualClock> {
        Arc::clone(&self.clock)
    }
}

/// The clock a tenuto object reads: Rust-side when possible (no Python call per read).
pub enum PyClock {
    Native(ClockRef),
    /// Any callable returning epoch seconds, e.g. `time.time` or a test's own fake.
    Callable(Py<PyAny>),
}

impl PyClock {
    pub fn from_arg(clock: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        match clock {
            None => Ok(PyClock::Native(super::system())),
            Some(obj) if obj.is_none() => Ok(PyClock::Native(super::system())),
            Some(obj) => {
                if let Ok(fake) = obj.cast::<PyFakeClock>() {
                    return Ok(PyClock::Native(fake.get().clock.clone()));
                }
                if !obj.is_callable() {
                    return Err(PyTypeError::new_err(format!(
                        "clock must be a FakeClock or a callable returning epoch seconds, not {}",
                        obj.get_type().name()?
                    )));
                }
                Ok(PyClock::Callable(obj.clone().unbind()))
            }
        }
    }

    pub fn now_nanos(&self, py: Python<'_>) -> PyResult<i64> {
        match self {
            PyClock::Native(clock) => Ok(clock.now_nanos()),
            PyClock::Callable(f) => to_nanos(f.bind(py).call0()?.extract::<f64>()?),
        }
    }

    /// The time from a thread that may not be attached (a runtime thread): a Python
    /// callable is called attached; one that fails reads the system clock instead.
    pub fn now_nanos_detached(&self) -> i64 {
        match self {
            PyClock::Native(clock) => clock.now_nanos(),
            PyClock::Callable(_) => Python::attach(|py| self.now_nanos(py))
                .unwrap_or_else(|_| super::SystemClock.now_nanos()),
        }
    }

    pub fn now_secs(&self, py: Python<'_>) -> PyResult<i64> {
        match self {
            PyClock::Native(clock) => Ok(clock.now_secs()),
            PyClock::Callable(_) => Ok(self.now_nanos(py)?.div_euclid(1_000_000_000)),
        }
    }

    /// Waits `nanos` with the GIL released (a manual clock just moves on).
    pub fn sleep(&self, py: Python<'_>, nanos: i64) {
        match self {
            PyClock::Native(clock) => {
                let clock = clock.clone();
                py.detach(move || clock.sleep(nanos));
            }
            PyClock::Callable(_) => py.detach(|| super::SystemClock.sleep(nanos)),
        }
    }

    pub fn traverse(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        match self {
            PyClock::Callable(f) => visit.call(f),
            PyClock::Native(_) => Ok(()),
        }
    }
}
