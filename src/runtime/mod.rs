//! tenuto's own tokio runtime, one per process.
//!
//! Created on first use, never at import, so that importing tenuto in a gunicorn
//! `--preload` master starts no threads. After `fork()` the child has none of the parent's
//! runtime threads: a `pthread_atfork` child handler bumps the fork epoch, and the next
//! call builds a fresh runtime. The parent's runtime is leaked in the child on purpose:
//! dropping it would wait for worker threads that do not exist there.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use tokio::runtime::{Builder, Handle, Runtime};

#[cfg(feature = "python")]
pub mod py;

static FORK_EPOCH: AtomicU64 = AtomicU64::new(0);
static REGISTER_FORK_HANDLER: Once = Once::new();
static RUNTIME: Mutex<Option<OwnedRuntime>> = Mutex::new(None);

struct OwnedRuntime {
    epoch: u64,
    runtime: Runtime,
}

extern "C" fn bump_fork_epoch_in_child() {
    // Async-signal-safe: one atomic add, nothing else.
    FORK_EPOCH.fetch_add(1, Ordering::SeqCst);
}

/// How many forks this process descends from since tenuto was first used. Anything tied
/// to a runtime or a socket (Redis connections) is tagged with the epoch it was made in
/// and rebuilt when the epoch moves.
pub fn fork_epoch() -> u64 {
    // Registered on first use of anything fork-sensitive (flights of a memory-only cache
    // too, which never start the runtime), not only when the runtime is built.
    REGISTER_FORK_HANDLER.call_once(|| {
        // SAFETY: registers a plain extern "C" fn that only touches an atomic.
        unsafe {
            libc::pthread_atfork(None, None, Some(bump_fork_epoch_in_child));
        }
    });
    FORK_EPOCH.load(Ordering::Acquire)
}

/// The handle of this process's runtime, building it on first use and after a fork.
pub fn handle() -> Handle {
    let epoch = fork_epoch();
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(owned) = slot.as_ref() {
        if owned.epoch == epoch {
            return owned.runtime.handle().clone();
        }
    }
    if let Some(stale) = slot.take() {
        std::mem::forget(stale);
    }
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tenuto-io")
        .enable_all()
        .build()
        .expect("tenuto: cannot start its tokio runtime");
    let handle = runtime.handle().clone();
    *slot = Some(OwnedRuntime { epoch, runtime });
    handle
}

/// A token no other process, thread or call produces: pid, a per-process sequence number,
/// and randomness. Random alone is not enough: a forked child inherits its parent's
/// random generator state and would repeat its sequence (lock tokens, limiter entries).
pub fn unique_token() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{:x}-{:016x}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed),
        fastrand::u64(..)
    )
}

/// Run a future to completion from a thread that is not a runtime worker.
pub fn block_on<F: Future>(future: F) -> F::Output {
    handle().block_on(future)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_is_built_once_per_epoch() {
        let a = handle();
        let b = handle();
        assert_eq!(a.id(), b.id());
        assert_eq!(block_on(async { 40 + 2 }), 42);
    }

    #[test]
    fn tokens_are_unique() {
        let tokens: std::collections::HashSet<String> = (0..1000).map(|_| unique_token()).collect();
        assert_eq!(tokens.len(), 1000);
    }
}
