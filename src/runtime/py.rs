//! A small asyncio bridge over tenuto's own runtime.
//!
//! pyo3-async-runtimes' global runtime hangs a forked child on its first await, so tenuto
//! bridges by hand: the Rust future runs on `runtime::handle()` (rebuilt after a fork), and
//! its result reaches the asyncio future through `loop.call_soon_threadsafe`. Work that
//! needs no I/O (a memory hit) returns a `Ready` awaitable instead: no loop round trip.

use std::future::Future;
use std::sync::Arc;

use pyo3::exceptions::PyStopIteration;
use pyo3::intern;
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

/// Work handed back to an event loop's thread: runs there with the GIL held.
type Completion = Box<dyn FnOnce(Python<'_>) + Send>;

/// Completions waiting for one event loop. Runtime threads push and, when the queue was
/// empty, ask the loop once (`call_soon_threadsafe`) to drain it: many results that land
/// together cost the loop one wake-up, and runtime threads take the GIL once per batch,
/// not once per result.
pub(crate) struct LoopQueue {
    event_loop: Py<PyAny>,
    /// The loop-side callback that runs `batch`.
    drain: Py<PyAny>,
    batch: Arc<Batch>,
}

/// The completions of one loop not run yet, and whether a drain is on its way.
struct Batch {
    pending: std::sync::Mutex<Vec<Completion>>,
    scheduled: std::sync::atomic::AtomicBool,
}

impl Batch {
    /// On the loop's thread: runs every completion queued so far.
    fn run(&self, py: Python<'_>) {
        self.scheduled
            .store(false, std::sync::atomic::Ordering::Release);
        let batch = std::mem::take(&mut *crate::sync::lock(&self.pending));
        for completion in batch {
            completion(py);
        }
    }
}

impl LoopQueue {
    fn new(py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<Self>> {
        let batch = Arc::new(Batch {
            pending: std::sync::Mutex::new(Vec::new()),
            scheduled: std::sync::atomic::AtomicBool::new(false),
        });
        let drained = Arc::clone(&batch);
        let drain = PyCFunction::new_closure(py, None, None, move |args, _kwargs| {
            drained.run(args.py());
            Ok::<_, PyErr>(())
        })?;
        Ok(Arc::new(LoopQueue {
            event_loop: event_loop.clone().unbind(),
            drain: drain.into_any().unbind(),
            batch,
        }))
    }

    /// The queue of the running loop (one per loop, remembered per thread).
    fn current(py: Python<'_>) -> PyResult<Arc<Self>> {
        thread_local! {
            static CURRENT: std::cell::RefCell<Option<Arc<LoopQueue>>> =
                const { std::cell::RefCell::new(None) };
        }
        let event_loop = get_running_loop(py)?;
        let known = CURRENT.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|q| q.event_loop.bind(py).is(&event_loop))
                .cloned()
        });
        if let Some(queue) = known {
            return Ok(queue);
        }
        let queue = Self::new(py, &event_loop)?;
        CURRENT.with(|c| *c.borrow_mut() = Some(Arc::clone(&queue)));
        Ok(queue)
    }

    /// From any thread: runs `completion` on the loop's thread soon.
    fn push(self: &Arc<Self>, completion: Completion) {
        crate::sync::lock(&self.batch.pending).push(completion);
        if self
            .batch
            .scheduled
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return; // a drain is already on its way
        }
        Python::attach(|py| {
            let event_loop = self.event_loop.bind(py);
            if let Err(err) = event_loop.call_method1("call_soon_threadsafe", (&self.drain,)) {
                self.batch
                    .scheduled
                    .store(false, std::sync::atomic::Ordering::Release);
                // A closed loop has nobody left to tell; anything else is worth seeing.
                let closed = event_loop
                    .call_method0("is_closed")
                    .and_then(|v| v.is_truthy())
                    .unwrap_or(true);
                if !closed {
                    err.write_unraisable(py, None);
                }
            }
        });
    }
}

/// Sets a future's result (or exception) unless it was cancelled meanwhile.
fn settle(future: &Bound<'_, PyAny>, outcome: PyResult<Py<PyAny>>) {
    let py = future.py();
    let done = future
        .call_method0(intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true);
    if done {
        return;
    }
    let set = match outcome {
        Ok(value) => future.call_method1(intern!(py, "set_result"), (value,)),
        Err(err) => future.call_method1(intern!(py, "set_exception"), (err.into_value(py),)),
    };
    if let Err(err) = set {
        err.write_unraisable(py, None);
    }
}

/// An asyncio future of the running loop that any thread may complete.
pub(crate) struct LoopFuture {
    queue: Arc<LoopQueue>,
    future: Py<PyAny>,
}

impl LoopFuture {
    /// A new future of the running loop (an error outside one).
    pub(crate) fn new(py: Python<'_>) -> PyResult<Self> {
        let queue = LoopQueue::current(py)?;
        let future = queue
            .event_loop
            .bind(py)
            .call_method0(intern!(py, "create_future"))?
            .unbind();
        Ok(Self { queue, future })
    }

    pub(crate) fn future<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.future.bind(py)
    }

    /// From any thread: completes the future with `outcome`, computed on the loop's
    /// thread (unless the future was cancelled meanwhile).
    pub(crate) fn complete(
        self,
        outcome: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send + 'static,
    ) {
        let Self { queue, future } = self;
        let deliver = Arc::clone(&queue);
        deliver.push(Box::new(move |py| {
            settle(future.bind(py), outcome(py));
            drop(queue);
        }));
    }
}

type Start = Box<dyn FnOnce(LoopFuture) -> tokio::task::AbortHandle + Send>;

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
        crate::sync::lock(&self.stage)
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
        let pending = LoopFuture::new(py)?;
        let future = pending.future(py).clone();
        let abort = start(pending);
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

impl Drop for Pending {
    /// Like a coroutine: one that is dropped without ever being awaited did nothing, which
    /// is almost always a forgotten `await` (a write that never happened).
    fn drop(&mut self) {
        let stage = self.stage.get_mut().unwrap_or_else(|p| p.into_inner());
        if !matches!(stage, Stage::Created(_)) {
            return;
        }
        Python::attach(|py| {
            let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
            let message =
                c"a tenuto awaitable was never awaited, so it did nothing (a missing `await`?)";
            if let Err(err) = PyErr::warn(py, &category, message, 1) {
                err.write_unraisable(py, None);
            }
        });
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
    let start: Start = Box::new(move |pending| {
        let task = async move {
            let output = work.await;
            // `finish` converts on the loop's thread, where the GIL is at hand.
            pending.complete(move |py| finish(py, output));
        };
        crate::runtime::handle().spawn(task).abort_handle()
    });
    Ok(Bound::new(
        py,
        Pending {
            stage: std::sync::Mutex::new(Stage::Created(start)),
        },
    )?
    .into_any())
}
