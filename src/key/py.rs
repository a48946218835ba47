use pyo3::prelude::*;

use crate::codec::py::{to_json, CANONICAL};

/// `name + ":" + sha256(json.dumps(data, sort_keys=True, separators=(",", ":"),
/// ensure_ascii=True))`, byte for byte the host apps' key format.
#[pyfunction]
pub fn stable_key(name: &str, data: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(super::key_from_json(name, &to_json(data, CANONICAL)?))
}

/// Where tenuto keeps `what` ("lock", "waiters", "done") of the Redis key `key`: in
/// `key`'s cluster slot, under a key no user key can name.
#[pyfunction]
pub fn companion_key(key: &str, what: &str) -> String {
    crate::cache::topology::companion_key(key, what)
}
