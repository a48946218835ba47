//! tenuto's Rust core. Each mechanism lives in its own folder: a pure-Rust core (no pyo3)
//! and, behind the `python` feature, a thin `py.rs` with its bindings. The one native
//! module, `tenuto._core`, is declared at the bottom; `python/tenuto/__init__.py` decides
//! the public names.

pub mod cache;
pub mod cached;
pub mod clock;
pub mod codec;
pub mod defaults;
pub mod error;
pub mod flight;
pub mod key;
pub mod limit;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod sync;

#[cfg(feature = "python")]
mod graveyard;

#[cfg(feature = "python")]
#[pyo3::pymodule(gil_used = false)]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::cache::py::{all_cache_stats, seconds_py, PyCache, PyEnvelope, PyLookup};
    #[pymodule_export]
    use crate::cached::py::{
        current_state, record_state_py, request_var_py, PyCachedCall, PyRequestState, PyTicket,
    };
    #[pymodule_export]
    use crate::clock::py::PyFakeClock;
    #[pymodule_export]
    use crate::defaults::py::PyDefaults;
    #[pymodule_export]
    use crate::error::py::{BackendError, BackendUnavailable, TenutoError};
    #[pymodule_export]
    use crate::flight::py::{PyFlight, PyFlightGroup};
    #[pymodule_export]
    use crate::key::py::{companion_key, stable_key};
    #[pymodule_export]
    use crate::limit::py::{CircuitOpen, PyCircuitBreaker, PyRateLimiter, RateLimited};
    #[pymodule_export]
    use crate::registry::py::PyIdRegistry;
    #[pymodule_export]
    use crate::runtime::py::{Pending, Ready};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        // Rust `log` records go to Python logging under the "tenuto" logger.
        // Only tenuto's own records: redis-rs and tokio trace logging would otherwise take
        // the GIL on runtime threads for nothing. Levels are not cached, so changing the
        // "tenuto" logger's level at run time takes effect (tenuto logs rare events only).
        let _ = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::Loggers)?
            .filter(log::LevelFilter::Off)
            .filter_target("tenuto".to_owned(), log::LevelFilter::Trace)
            .install();
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        crate::runtime::py::install_ready_send(m.py());
        Ok(())
    }
}
