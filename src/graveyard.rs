//! Deferred release of Python references held inside Rust containers.
//!
//! Values held by the engine are dropped wherever their last `Arc` goes: inside a store,
//! a flight, or a runtime thread without the GIL. Dropping a `Py<…>` there could run
//! arbitrary Python (`__del__`, weakref callbacks) that re-enters the cache and deadlocks
//! (cachebox issues 67, 68, 84).
//! So values stored in Rust containers are wrapped in `Deferred`, whose drop only queues
//! the reference; `release_pending` decrefs the queue at safe points (no Rust lock held).

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;

static PENDING: Mutex<Vec<Py<PyAny>>> = Mutex::new(Vec::new());
static HAS_PENDING: AtomicBool = AtomicBool::new(false);

pub struct Deferred<T>(ManuallyDrop<Py<T>>);

impl<T> Deferred<T> {
    pub fn new(obj: Py<T>) -> Self {
        Self(ManuallyDrop::new(obj))
    }

    pub fn get(&self) -> &Py<T> {
        &self.0
    }
}

impl<T> Drop for Deferred<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and never used again.
        let obj = unsafe { ManuallyDrop::take(&mut self.0) }.into_any();
        crate::sync::lock(&PENDING).push(obj);
        HAS_PENDING.store(true, Ordering::Release);
    }
}

/// Drops queued references. Call only where no Rust lock is held.
pub fn release_pending(_py: Python<'_>) {
    // A plain load first: the common case (nothing queued) then writes no shared cache line.
    if HAS_PENDING.load(Ordering::Relaxed) && HAS_PENDING.swap(false, Ordering::AcqRel) {
        let queued = std::mem::take(&mut *crate::sync::lock(&PENDING));
        drop(queued);
    }
}
