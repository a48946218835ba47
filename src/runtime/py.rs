//! A small asyncio bridge over tenuto's own runtime.
//!
//! pyo3-async-runtimes' global runtime hangs a forked child on its first await, so tenuto
//! bridges by hand: the Rust future runs on `runtime::handle()` (rebuilt after a fork), and
//! its result reaches the asyncio future through `loop.call_soon_threadsafe`. Work that
//! needs no I/O (a memory hit) returns a `Ready` awaitable instead: no loop round trip.

use std::future::Future;

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyCFunction;

/// An awaitable whose result is already known; `await` returns it without suspending.
#[pyclass(frozen, module = "tenuto._core", name = "Ready")]
pub struct Ready {
    value: Py<PyAny>,
}

impl Ready {
    pub fn new(value: Py<PyAny>) -> Self {
        Self { value }
    }
}

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Err(PyStopIteration::new_err((self.value.clone_ref(py),)))
    }

    fn send(&self, py: Python<'_>, _value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        self.__next__(py)
    }

    #[pyo3(signature = (exc, *_rest))]
    fn throw(&self, exc: Bound<'_, PyAny>, _rest: Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        Err(PyErr::from_value(exc))
    }

    fn close(&self) {}

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.value)
    }
}

/// `await Ready(...)` without an exception: CPython (3.10+) sends to an awaitable through
/// its `am_send` slot when it has one, and `PYGEN_RETURN` hands the value back directly.
/// Without it, every await of a hit would raise and catch a `StopIteration`.
// NOTE: decorated async hit, `python benches/bench_cached.py`: 371 ns with StopIteration,
// 240 ns with this slot (plain `async def`: 93 ns).
#[cfg(all(Py_3_10, not(Py_LIMITED_API), not(PyPy), not(GraalPy)))]
unsafe extern "C" fn ready_send(
    awaitable: *mut pyo3::ffi::PyObject,
    _sent: *mut pyo3::ffi::PyObject,
    result: *mut *mut pyo3::ffi::PyObject,
) -> pyo3::ffi::PySendResult {
    // SAFETY: CPython calls am_send attached, with a live `Ready` (this slot is installed on
    // the `Ready` type only) and a valid out pointer.
    unsafe {
        let py = Python::assume_attached();
        let obj = Bound::from_borrowed_ptr(py, awaitable);
        let ready = obj.cast_unchecked::<Ready>();
        *result = ready.get().value.clone_ref(py).into_ptr();
    }
    pyo3::ffi::PySendResult::PYGEN_RETURN
}

/// Installs `ready_send` on the `Ready` type (once, at module init).
pub(crate) fn install_ready_send(py: Python<'_>) {
    #[cfg(all(Py_3_10, not(Py_LIMITED_API), not(PyPy), not(GraalPy)))]
    {
        let ty = py.get_type::<Ready>();
        // SAFETY: `Ready` is a heap type whose async slots pyo3 allocated (it has
        // `__await__`); nothing has used the type yet, and PyType_Modified drops caches.
        unsafe {
            let tp = ty.as_type_ptr();
            let slots = (*tp).tp_as_async;
            if !slots.is_null() {
                (*slots).am_send = Some(ready_send);
                pyo3::ffi::PyType_Modified(tp);
            }
        }
    }
    #[cfg(not(all(Py_3_10, not(Py_LIMITED_API), not(PyPy), not(GraalPy))))]
    let _ = py;
}

pub(crate) fn get_running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET_RUNNING_LOOP
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
        })?
        .bind(py)
        .call0()
}

/// Sets a future's outcome unless it was cancelled meanwhile; runs on the loop's thread.
fn resolver(py: Python<'_>) -> PyResult<&Bound<'_, PyCFunction>> {
    static RESOLVER: PyOnceLock<Py<PyCFunction>> = PyOnceLock::new();
    RESOLVER
        .get_or_try_init(py, || {
            let f = PyCFunction::new_closure(
                py,
                Some(c"_tenuto_resolve"),
                None,
                |args, _kwargs| -> PyResult<()> {
                    let (future, ok, value): (Bound<'_, PyAny>, bool, Bound<'_, PyAny>) =
                        args.extract()?;
                    if future.call_method0("done")?.is_truthy()? {
                        return Ok(());
                    }
                    let method = if ok { "set_result" } else { "set_exception" };
                    future.call_method1(method, (value,))?;
                    Ok(())
                },
            )?;
            Ok::<_, PyErr>(f.unbind())
        })
        .map(|f| f.bind(py))
}

/// Completes `future` (of `event_loop`) with `value` (or raises it when `ok` is false) on
/// the loop's own thread; safe to call from any thread, attached to Python.
pub(crate) fn resolve_soon(
    event_loop: &Bound<'_, PyAny>,
    future: &Bound<'_, PyAny>,
    ok: bool,
    value: Bound<'_, PyAny>,
) {
    let py = event_loop.py();
    let delivered = resolver(py).and_then(|resolve| {
        event_loop.call_method1("call_soon_threadsafe", (resolve, future, ok, value))
    });
    // A closed loop has nobody left to tell; anything else is a bug worth seeing.
    if let Err(err) = delivered {
        let closed = event_loop
            .call_method0("is_closed")
            .and_then(|v| v.is_truthy())
            .unwrap_or(true);
        if !closed {
            err.write_unraisable(py, None);
        }
    }
}

type Start = Box<dyn FnOnce(Py<PyAny>, Py<PyAny>) -> tokio::task::AbortHandle + Send>;

enum Stage {
    /// Not awaited yet: nothing runs.
    Created(Start),
    /// Running on the runtime; awaiting the asyncio future that it will complete.
    Running {
        waiter: Py<PyAny>,
        future: Py<PyAny>,
    },
    Finished,
}

/// A coroutine of work on tenuto's runtime (so `asyncio.run(cache.aget(k))` and
/// `create_task` take it). Nothing runs until it is first sent to: then it binds to the
/// running loop, and cancelling the awaiting task aborts the Rust work, whose guards
/// then clean up (a held lock is released at once).
#[pyclass(frozen, module = "tenuto._core", name = "Pending")]
pub struct Pending {
    stage: std::sync::Mutex<Stage>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stage> {
        self.stage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The iterator of the asyncio future this coroutine waits on, starting the work on
    /// first use. Never calls Python while holding the stage lock.
    fn waiter<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let start = {
            let mut stage = self.lock();
            match &*stage {
                Stage::Running { waiter, .. } => return Ok(waiter.bind(py).clone()),
                Stage::Finished => {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(
                        "cannot reuse already awaited coroutine",
                    ))
                }
                Stage::Created(_) => {}
            }
            match std::mem::replace(&mut *stage, Stage::Finished) {
                Stage::Created(start) => start,
                _ => unreachable!("checked above"),
            }
        };
        let event_loop = get_running_loop(py)?;
        let future = event_loop.call_method0("create_future")?;
        let abort = start(event_loop.unbind(), future.clone().unbind());
        let on_done = PyCFunction::new_closure(py, None, None, move |args, _kwargs| {
            let future = args.get_item(0)?;
            if future.call_method0("cancelled")?.is_truthy()? {
                abort.abort();
            }
            Ok::<_, PyErr>(())
        })?;
        future.call_method1("add_done_callback", (on_done,))?;
        let waiter = future.call_method0("__await__")?;
        *self.lock() = Stage::Running {
            waiter: waiter.clone().unbind(),
            future: future.unbind(),
        };
        Ok(waiter)
    }

    fn finish_on<T>(&self, result: PyResult<T>) -> PyResult<T> {
        if result.is_err() {
            *self.lock() = Stage::Finished;
        }
        result
    }
}

#[pymethods]
impl Pending {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.send(py, py.None().into_bound(py))
    }

    fn send<'py>(&self, py: Python<'py>, value: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let waiter = self.waiter(py)?;
        self.finish_on(waiter.call_method1("send", (value,)))
    }

    #[pyo3(signature = (exc, *rest))]
    fn throw<'py>(
        &self,
        py: Python<'py>,
        exc: Bound<'py, PyAny>,
        rest: Bound<'py, pyo3::types::PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let running = matches!(&*self.lock(), Stage::Running { .. });
        if !running {
            *self.lock() = Stage::Finished;
            return Err(PyErr::from_value(exc));
        }
        let waiter = self.waiter(py)?;
        let mut args = vec![exc];
        args.extend(rest.iter());
        let args = pyo3::types::PyTuple::new(py, args)?;
        self.finish_on(waiter.getattr("throw")?.call1(args))
    }

    /// Stops the work (the coroutine was dropped or closed before it finished).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let stage = std::mem::replace(&mut *self.lock(), Stage::Finished);
        if let Stage::Running { future, .. } = stage {
            future.bind(py).call_method0("cancel")?;
        }
        Ok(())
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        // try_lock: a collection must never wait for a lock (the holder never runs Python
        // while holding it, so a busy lock only means the stage is changing).
        if let Ok(stage) = self.stage.try_lock() {
            if let Stage::Running { waiter, future } = &*stage {
                visit.call(waiter)?;
                visit.call(future)?;
            }
        }
        Ok(())
    }
}

/// Runs `work` on tenuto's runtime when the returned awaitable is awaited; it completes
/// with `finish(output)`, which runs attached to Python on a runtime thread.
pub fn spawn_for_asyncio<'py, F, T, C>(
    py: Python<'py>,
    work: F,
    finish: C,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
    C: for<'a> FnOnce(Python<'a>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    let start: Start = Box::new(move |loop_ref, future_ref| {
        crate::runtime::handle()
            .spawn(async move {
                let output = work.await;
                Python::attach(move |py| {
                    let (ok, value) = match finish(py, output) {
                        Ok(value) => (true, value.into_bound(py)),
                        Err(err) => (false, err.into_value(py).into_any().into_bound(py)),
                    };
                    resolve_soon(loop_ref.bind(py), future_ref.bind(py), ok, value);
                });
            })
            .abort_handle()
    });
    Ok(Bound::new(
        py,
        Pending {
            stage: std::sync::Mutex::new(Stage::Created(start)),
        },
    )?
    .into_any())
}
