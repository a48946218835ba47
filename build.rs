// Gives the crate pyo3's Python-version cfgs (e.g. `Py_3_10`), so version-specific
// C-API code (the `am_send` slot of `Ready`) compiles only where it exists. Only with the
// `python` feature: the pure core (`--no-default-features`) has no Python to ask.
fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_PYTHON");
    if std::env::var_os("CARGO_FEATURE_PYTHON").is_some() {
        pyo3_build_config::use_pyo3_cfgs();
    }
}
