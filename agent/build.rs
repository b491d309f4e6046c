//! Builds the kernel programs (agent-ebpf) with nightly for bpfel-unknown-none
//! and hands the object to the agent through OUT_DIR.
//!
//! `cargo xtask setup` installs what this needs (nightly rust-src,
//! llvm-22-dev, bpf-linker); every error below says so.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let ebpf_dir = manifest_dir.join("..").join("agent-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", manifest_dir.join("../agent-common/src").display());
    println!("cargo:rerun-if-env-changed=CORDON_EBPF_OBJECT");

    // A prebuilt object (packaging, or hosts without nightly) may be supplied.
    if let Some(prebuilt) = env::var_os("CORDON_EBPF_OBJECT") {
        copy(Path::new(&prebuilt), &out_dir.join("cordon.bpf.o"));
        return;
    }

    // Shared across profiles so `core` is built for BPF once, not per OUT_DIR.
    let target_dir = manifest_dir.join("..").join("target").join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(key);
    }
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => fail(&format!("cannot run rustup to build agent-ebpf: {e}")),
    };
    if !status.success() {
        fail("building agent-ebpf failed (see the errors above)");
    }
    copy(&target_dir.join("bpfel-unknown-none/release/cordon"), &out_dir.join("cordon.bpf.o"));
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        fail(&format!("cannot copy {} to {}: {e}", from.display(), to.display()));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!(
        "error: {msg}\nThe eBPF programs need nightly with rust-src, llvm-22-dev and bpf-linker: \
         run `cargo xtask setup` (as root) to install them."
    );
    std::process::exit(1);
}
