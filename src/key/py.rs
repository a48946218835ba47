use pyo3::prelude::*;

use crate::codec::py::{to_json, CANONICAL};

/// `name + ":" + sha256(json.dumps(data, sort_keys=True, separators=(",", ":"),
/// ensure_ascii=True))`, byte for byte the host apps' key format.
#[pyfunction]
pub fn stable_key(name: &str, data: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(super::key_from_json(name, &to_json(data, CANONICAL)?))
}
