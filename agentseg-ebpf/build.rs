use which::which;

/// Rebuild when the bpf-linker binary changes (aya-template does the same): building this crate
/// depends on that binary, which cargo cannot see.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask bootstrap`"),
    }
}
