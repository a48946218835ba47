// Gives the crate pyo3's Python-version cfgs (e.g. `Py_3_10`), so version-specific
// C-API code (the `am_send` slot of `Ready`) compiles only where it exists.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
