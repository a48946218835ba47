//! Locking that survives a panic elsewhere: a poisoned mutex still holds consistent data
//! here (every critical section leaves its state whole), so callers go on instead of
//! turning one panic into a panic in every later call.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
