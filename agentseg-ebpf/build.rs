use which::which;

/// Rebuild when the bpf-linker binary changes (aya-template does the same): building this crate
/// depends on that binary, which cargo cannot see.
fn main() {
    // Keep the event writers global functions (bpf-linker internalises every
    // symbol it is not told to export): the verifier then checks it once, on its own.
    for f in [
        "agentseg_finish",
        "agentseg_refuse",
        "agentseg_lookup",
        "agentseg_resolve_skb",
        "agentseg_parse_skb",
    ] {
        println!("cargo:rustc-link-arg=--export={f}");
    }
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask bootstrap`"),
    }
}
