//! Shared pieces of the fuzz targets: the policy grammar the `compiler` target renders to
//! TOML (`grammar`) and the checks it runs on what compiles (`checks`).
pub mod checks;
pub mod grammar;
