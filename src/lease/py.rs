//! Bindings of leases: argument conversion only. Routing and fail-open follow the cache:
//! on Redis while it answers, else the process's own table.

use std::sync::Arc;

use pyo3::prelude::*;

use super::{
    check_name, lease_key, memory, redis_acquire, redis_holder, redis_release, redis_renew, ttl_ms,
    LeaseReply,
};
use crate::cache::py::{run_sync, seconds_arg, CacheBinding, PyCache};

/// Named leases in a cache's Redis (or in process memory): `acquire(job, holder, ttl)`.
#[pyclass(frozen, module = "tenuto._core", name = "Leases")]
pub struct PyLeases {
    cache: Arc<CacheBinding>,
    namespace: String,
}

type Answer = (bool, Option<String>, f64);

fn answer(reply: LeaseReply) -> Answer {
    (
        reply.acquired,
        reply.holder,
        reply.remaining_ms as f64 / 1000.0,
    )
}

impl PyLeases {
    fn now_ms(&self, py: Python<'_>) -> PyResult<i64> {
        Ok(self.cache.clock.now_nanos(py)?.div_euclid(1_000_000))
    }

    fn key(&self, job: &str) -> PyResult<String> {
        check_name("job", job)?;
        Ok(lease_key(&self.namespace, job))
    }
}

#[pymethods]
impl PyLeases {
    #[new]
    fn new(cache: &Bound<'_, PyCache>) -> Self {
        let binding = Arc::clone(&cache.get().binding);
        let namespace = binding.engine.namespace().to_owned();
        PyLeases {
            cache: binding,
            namespace,
        }
    }

    /// The Redis key of a job's lease.
    fn lease_key(&self, job: &str) -> PyResult<String> {
        self.key(job)
    }

    /// Takes the lease for `ttl` seconds unless someone holds it:
    /// `(acquired, holder, seconds_left)`.
    fn acquire(
        &self,
        py: Python<'_>,
        job: &str,
        holder: &str,
        ttl: &Bound<'_, PyAny>,
    ) -> PyResult<Answer> {
        let key = self.key(job)?;
        check_name("holder", holder)?;
        let ttl = ttl_ms(seconds_arg("ttl", ttl)?);
        if let Some(store) = self.cache.route()? {
            let work = redis_acquire(&store, key.clone(), holder.to_owned(), ttl);
            match run_sync(py, true, work) {
                Ok(reply) => return Ok(answer(reply)),
                Err(err) => self.cache.absorb(err)?,
            }
        }
        Ok(answer(memory().acquire(
            &key,
            holder,
            ttl,
            self.now_ms(py)?,
        )))
    }

    /// A new TTL from now, only while `holder` holds the lease; True if it did.
    fn renew(
        &self,
        py: Python<'_>,
        job: &str,
        holder: &str,
        ttl: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let key = self.key(job)?;
        check_name("holder", holder)?;
        let ttl = ttl_ms(seconds_arg("ttl", ttl)?);
        if let Some(store) = self.cache.route()? {
            match run_sync(
                py,
                true,
                redis_renew(&store, key.clone(), holder.to_owned(), ttl),
            ) {
                Ok(done) => return Ok(done),
                Err(err) => self.cache.absorb(err)?,
            }
        }
        Ok(memory().renew(&key, holder, ttl, self.now_ms(py)?))
    }

    /// Gives the lease up, only while `holder` holds it; True if it did.
    fn release(&self, py: Python<'_>, job: &str, holder: &str) -> PyResult<bool> {
        let key = self.key(job)?;
        check_name("holder", holder)?;
        if let Some(store) = self.cache.route()? {
            match run_sync(
                py,
                true,
                redis_release(&store, key.clone(), holder.to_owned()),
            ) {
                Ok(done) => return Ok(done),
                Err(err) => self.cache.absorb(err)?,
            }
        }
        Ok(memory().release(&key, holder, self.now_ms(py)?))
    }

    /// Who holds the lease and for how long: `(False, holder or None, seconds_left)`.
    fn holder(&self, py: Python<'_>, job: &str) -> PyResult<Answer> {
        let key = self.key(job)?;
        if let Some(store) = self.cache.route()? {
            match run_sync(py, true, redis_holder(&store, key.clone())) {
                Ok(reply) => return Ok(answer(reply)),
                Err(err) => self.cache.absorb(err)?,
            }
        }
        Ok(answer(memory().holder(&key, self.now_ms(py)?)))
    }
}
