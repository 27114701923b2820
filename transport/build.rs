//! Builds the XDP program (`ebpf/pfs_xdp.bpf.c`) when the `xdp` feature is on.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "xdp")]
    xdp();
}

#[cfg(feature = "xdp")]
fn xdp() {
    use std::path::PathBuf;
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
        .join("../ebpf/pfs_xdp.bpf.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("pfs_xdp.bpf.o");
    if std::process::Command::new("clang")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "the xdp feature compiles ebpf/pfs_xdp.bpf.c with clang, which is not on PATH: \
             install it (`cargo xtask deps`, or apt-get install clang libelf-dev) or build \
             without --features xdp"
        );
    }
    // Debian keeps <asm/types.h> under the multiarch directory, which clang's BPF target
    // does not search by itself.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    libbpf_cargo::SkeletonBuilder::new()
        .source(&src)
        .obj(&out)
        .clang_args([multiarch.as_str(), "-Wall", "-Werror"])
        .build()
        .unwrap_or_else(|e| panic!("building {}: {e:#}", src.display()));
}
