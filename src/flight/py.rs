//! `FlightGroup` and `Flight`: single-flight for Python threads and asyncio tasks alike.
//! `FlightGroup.do` runs a sync function once per key; `tenuto.SingleFlight.ado` (Python)
//! builds the async side on `join` / `Flight.wait_async`.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyException, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::{Flight, Joined, LeaderGuard, Outcome, SingleFlight};
use crate::runtime::py::{LoopFuture, Ready};

type PyValue = Py<PyAny>;

fn outcome_pair<'py>(py: Python<'py>, outcome: &Outcome<PyValue>) -> PyResult<Bound<'py, PyTuple>> {
    let (kind, value) = match outcome {
        Outcome::Value(v) => ("value", v.clone_ref(py)),
        Outcome::Error(e) => ("error", e.clone_ref(py)),
        Outcome::Abandoned => ("abandoned", py.None()),
    };
    PyTuple::new(
        py,
        [kind.into_pyobject(py)?.into_any(), value.into_bound(py)],
    )
}

fn would_deadlock() -> PyErr {
    PyRuntimeError::new_err(
        "single-flight: this thread started the flight it is now waiting for (a recursive \
         call, or a sync call inside the event loop running the async leader); it would \
         wait for itself forever",
    )
}

/// Concurrent callers of one key share one execution; the key is forgotten when it lands.
#[pyclass(frozen, module = "tenuto._core", name = "FlightGroup")]
pub struct PyFlightGroup {
    core: Arc<SingleFlight<PyValue>>,
}

#[pymethods]
impl PyFlightGroup {
    #[new]
    fn new() -> Self {
        Self {
            core: SingleFlight::new(),
        }
    }

    /// Calls `func()` once for all threads calling `do` with `key` at the same time; each
    /// gets its result, or its exception raised. Waiting releases the GIL.
    #[pyo3(name = "do")]
    fn do_(&self, py: Python<'_>, key: &str, func: &Bound<'_, PyAny>) -> PyResult<PyValue> {
        loop {
            match self.core.join(key) {
                Joined::Leader(guard) => return lead(py, guard, func),
                Joined::Follower(flight) => {
                    if flight.would_wait_for_itself() {
                        return Err(would_deadlock());
                    }
                    let outcome = py.detach(|| flight.wait());
                    match &*outcome {
                        Outcome::Value(v) => return Ok(v.clone_ref(py)),
                        Outcome::Error(e) => return Err(PyErr::from_value(e.bind(py).clone())),
                        Outcome::Abandoned => continue,
                    }
                }
            }
        }
    }

    /// `(is_leader, flight)`: the leader must land the flight (`land_value`, `land_error`
    /// or `abandon`); a follower waits on it.
    fn join(&self, key: &str) -> (bool, PyFlight) {
        match self.core.join(key) {
            Joined::Leader(guard) => (
                true,
                PyFlight {
                    flight: Arc::clone(guard.flight()),
                    leader: Mutex::new(Some(guard)),
                },
            ),
            Joined::Follower(flight) => (
                false,
                PyFlight {
                    flight,
                    leader: Mutex::new(None),
                },
            ),
        }
    }

    fn in_flight(&self, key: &str) -> bool {
        self.core.is_in_flight(key)
    }

    /// How many callers are waiting on the flight of `key` (0 when none is in flight).
    fn followers(&self, key: &str) -> usize {
        self.core.followers(key)
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }
}

fn lead(py: Python<'_>, guard: LeaderGuard<PyValue>, func: &Bound<'_, PyAny>) -> PyResult<PyValue> {
    match func.call0() {
        Ok(value) => {
            guard.land(Outcome::Value(value.clone().unbind()));
            Ok(value.unbind())
        }
        // Exceptions are shared with the waiters; BaseExceptions (KeyboardInterrupt,
        // SystemExit, CancelledError) are this caller's own: the flight is abandoned and a
        // waiter takes over.
        Err(err) if err.is_instance_of::<PyException>(py) => {
            guard.land(Outcome::Error(err.value(py).clone().into_any().unbind()));
            Err(err)
        }
        Err(err) => {
            drop(guard);
            Err(err)
        }
    }
}

/// One flight: its leader lands it, its followers wait for it.
#[pyclass(frozen, module = "tenuto._core", name = "Flight")]
pub struct PyFlight {
    flight: Arc<Flight<PyValue>>,
    leader: Mutex<Option<LeaderGuard<PyValue>>>,
}

impl PyFlight {
    fn land(&self, outcome: Outcome<PyValue>) -> PyResult<()> {
        // Take the guard out first: landing runs callbacks, never under our lock.
        let guard = crate::sync::lock(&self.leader).take();
        match guard {
            Some(guard) => {
                guard.land(outcome);
                Ok(())
            }
            None => Err(PyRuntimeError::new_err(
                "only the leader lands a flight, and only once",
            )),
        }
    }
}

#[pymethods]
impl PyFlight {
    #[getter]
    fn is_leader(&self) -> bool {
        crate::sync::lock(&self.leader).is_some()
    }

    fn land_value(&self, value: PyValue) -> PyResult<()> {
        self.land(Outcome::Value(value))
    }

    fn land_error(&self, error: &Bound<'_, pyo3::exceptions::PyBaseException>) -> PyResult<()> {
        self.land(Outcome::Error(error.clone().into_any().unbind()))
    }

    /// Ends the flight without a result; a waiter takes over.
    fn abandon(&self) -> PyResult<()> {
        self.land(Outcome::Abandoned)
    }

    /// Blocks (GIL released) until the flight lands: `(kind, value)` with kind
    /// `"value"`, `"error"` or `"abandoned"`.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        if self.flight.would_wait_for_itself() {
            return Err(would_deadlock());
        }
        let flight = Arc::clone(&self.flight);
        let outcome = py.detach(move || flight.wait());
        outcome_pair(py, &outcome)
    }

    /// Like `wait`, giving up after `timeout` seconds (then None).
    fn wait_timeout<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let flight = Arc::clone(&self.flight);
        // Saturating: an enormous timeout waits "forever" instead of panicking.
        let timeout = std::time::Duration::try_from_secs_f64(timeout.max(0.0))
            .unwrap_or(std::time::Duration::MAX);
        let outcome = py.detach(move || flight.wait_timeout(timeout));
        outcome.map(|o| outcome_pair(py, &o)).transpose()
    }

    /// An awaitable of `(kind, value)` that never blocks the event loop.
    fn wait_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(outcome) = self.flight.has_landed().then(|| self.flight.wait()) {
            let pair = outcome_pair(py, &outcome)?;
            return Ok(Bound::new(py, Ready::new(pair.into_any().unbind()))?.into_any());
        }
        let pending = LoopFuture::new(py)?;
        let future = pending.future(py).clone();
        self.flight.on_landed(move |outcome| {
            pending.complete(move |py| Ok(outcome_pair(py, &outcome)?.into_any().unbind()))
        });
        Ok(future)
    }

    /// Declares that the leader's work runs on another thread from now on (so a blocking
    /// wait on this thread is fine).
    fn hand_off(&self) {
        self.flight.hand_off();
    }

    #[getter]
    fn landed(&self) -> bool {
        self.flight.has_landed()
    }
}
