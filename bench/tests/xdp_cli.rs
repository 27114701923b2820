//! The xdp backend's bad-input errors, as a user meets them on the command line: one
//! line naming the fix. Runs as root in the two-host topology (`tools/topology.sh`);
//! without root it says so and passes.
#![cfg(feature = "xdp")]

use std::process::Command;

/// Set the topology up once per process (tests run in parallel).
fn ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: xdp command-line tests need root (namespaces, XDP)");
            return false;
        }
        let topo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/topology.sh");
        let out = Command::new(topo).args(["up"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    })
}

/// Run `pfs-bench server` for an xdp address inside namespace pfs-a, behind `wrap`
/// (a privilege- or limit-changing command); returns its exit code and stderr.
fn server_in_pfs_a(wrap: &[&str], listen: &str) -> (i32, String) {
    // A server that unexpectedly starts would run forever: 20 s at most.
    let mut args: Vec<&str> = vec!["--net=/run/netns/pfs-a", "timeout", "20"];
    args.extend_from_slice(wrap);
    args.extend_from_slice(&[
        env!("CARGO_BIN_EXE_pfs-bench"),
        "server",
        "--listen",
        listen,
    ]);
    let out = Command::new("nsenter")
        .args(&args)
        .output()
        .expect("run nsenter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_line(err: &str) {
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
}

#[test]
fn missing_privileges_name_the_fix() {
    if !ready() {
        return;
    }
    let (code, err) = server_in_pfs_a(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        "xdp://pfs-a0/198.18.0.1:0",
    );
    assert_ne!(code, 0);
    one_line(&err);
    assert!(err.contains("run as root or use udp://"), "{err}");
}

#[test]
fn a_umem_over_the_locked_memory_limit_names_the_fix() {
    if !ready() {
        return;
    }
    // Without CAP_IPC_LOCK the UMEM counts against RLIMIT_MEMLOCK (64 KiB here).
    let (code, err) = server_in_pfs_a(
        &[
            "setpriv",
            "--bounding-set",
            "-ipc_lock",
            "prlimit",
            "--memlock=65536:65536",
        ],
        "xdp://pfs-a0/198.18.0.1:0",
    );
    assert_ne!(code, 0);
    one_line(&err);
    assert!(err.contains("ulimit -l"), "{err}");
}

#[test]
fn a_missing_interface_names_the_fix() {
    if !ready() {
        return;
    }
    let (code, err) = server_in_pfs_a(&[], "xdp://pfs-nope0/198.18.0.1:0");
    assert_ne!(code, 0);
    one_line(&err);
    assert!(
        err.contains("no interface") && err.contains("ip link"),
        "{err}"
    );
}
